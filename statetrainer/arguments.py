"""The trainer's argument checks: every bad argument gets a typed error that says what to pass instead."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .callbacks.base import Callback
from .phase import Phase
from .validation import check_count, check_number

__all__ = ["check_trainer_arguments", "resolve_device"]


def check_trainer_arguments(
    model: Any,
    optimizer: Any,
    loss_fn: Any,
    phases: Sequence[Phase],
    callbacks: Iterable[Callback],
    *,
    epochs: Any,
    accumulate: Any,
    grad_clip: Any,
    deterministic: Any,
) -> tuple[list[Phase], list[Callback]]:
    """Raise ``TypeError`` or ``ValueError`` for the first bad argument; return the phases and callbacks as lists."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    check_count("epochs", epochs)
    check_count("accumulate", accumulate)
    check_number("grad_clip", grad_clip, 0, low_open=True, optional=True)
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be True or False, got {deterministic!r}")
    return _check_phases(phases, optimizer), _check_callbacks(callbacks)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device``; None picks CUDA when available. Refuses CUDA where there is none."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(resolved)!r} was asked for, but CUDA is not available here")
    return resolved


def _check_phases(phases: Sequence[Phase], optimizer: torch.optim.Optimizer | None) -> list[Phase]:
    phases = list(phases)
    if not phases:
        raise ValueError("phases is empty: give at least one Phase, e.g. [st.Phase('train', loader)]")
    for phase in phases:
        if not isinstance(phase, Phase):
            raise TypeError(f"phases must hold Phase objects, got {type(phase).__name__}")
        if phase.grad and optimizer is None:
            raise ValueError(
                f"phase {phase.name!r} has grad=True (it trains) but the trainer has no optimizer; "
                "pass an optimizer, or grad=False for an evaluation phase"
            )
    _refuse_duplicates("phase names", [phase.name for phase in phases])
    return phases


def _check_callbacks(callbacks: Iterable[Callback]) -> list[Callback]:
    callbacks = list(callbacks)
    for callback in callbacks:
        if not isinstance(callback, Callback):
            raise TypeError(f"callbacks must be statetrainer.Callback instances, got {type(callback).__name__}")
    _refuse_duplicates("callback names", [callback.key for callback in callbacks],
                       "; give each a distinct name (callback.name = '...')")  # fmt: skip
    return callbacks


def _refuse_duplicates(what: str, names: list[str], advice: str = "") -> None:
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"{what} must be unique, got {', '.join(map(repr, duplicates))} more than once{advice}")
