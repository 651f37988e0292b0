"""The trainer's argument checks: every bad argument gets a typed error that says what to pass instead."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .callbacks.base import HOOK_NAMES, Callback
from .machine import STATES
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
    max_steps: Any = None,
    accumulate: Any,
    grad_clip: Any,
    deterministic: Any,
    compile: Any = False,
) -> tuple[list[Phase], list[Callback]]:
    """Raise ``TypeError`` or ``ValueError`` for the first bad argument; return the phases and callbacks as lists."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    check_count("epochs", epochs, optional=True)
    check_count("max_steps", max_steps, optional=True)
    check_count("accumulate", accumulate)
    check_number("grad_clip", grad_clip, 0, low_open=True, optional=True)
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be True or False, got {deterministic!r}")
    if not isinstance(compile, bool) and not (
        isinstance(compile, dict) and all(isinstance(key, str) for key in compile)
    ):
        raise TypeError(f"compile must be True, False or a dict of torch.compile's options (mode=, dynamic=, ...), "
                        f"got {compile!r}")  # fmt: skip
    if optimizer is not None:
        _check_optimizer_parameters(model, optimizer)
    phases, callbacks = _check_phases(phases, optimizer), _check_callbacks(callbacks)
    if max_steps is not None and not any(phase.grad for phase in phases):
        raise ValueError(f"max_steps={max_steps} counts optimizer steps, but no phase trains (grad=True)")
    _check_monitored_metrics(callbacks, phases)
    return phases, callbacks


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device``; None picks CUDA when available. Refuses CUDA where there is none."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(resolved)!r} was asked for, but CUDA is not available here")
    return resolved


def _check_optimizer_parameters(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Raise ``ValueError`` when ``optimizer`` holds tensors that are not ``model``'s parameters.

    An optimizer built on another model (or a copy of this one) steps tensors
    the forward pass never uses: the run would train nothing, and a checkpoint
    would not hold them. Parameters are compared by identity; an optimizer over
    some of the model's parameters (the others frozen) is fine.
    """
    owned = {id(parameter) for parameter in model.parameters()}
    held = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    foreign = sum(id(parameter) not in owned for parameter in held)
    if foreign:
        kind = type(optimizer)
        prefix = "torch.optim." if kind.__module__.startswith("torch.optim") else ""
        are = "parameter that is" if foreign == 1 else "parameters that are"
        raise ValueError(
            f"the optimizer holds {foreign} {are} not the model's (of {len(held)}), so training would not change "
            f"the model; build it from this model: {prefix}{kind.__name__}(model.parameters(), ...) "
            "(a learnable parameter of the loss belongs in the model, so that it is trained and saved)"
        )


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


# What other frameworks call their hooks, and the hook that does that here.
_HOOKS_ELSEWHERE = {
    "on_batch_end": "on_exit_batch", "on_train_batch_end": "on_exit_batch", "on_batch_begin": "on_enter_batch",
    "on_batch_start": "on_enter_batch", "on_train_batch_start": "on_enter_batch", "on_epoch_end": "on_exit_epoch",
    "on_train_epoch_end": "on_exit_epoch", "on_epoch_begin": "on_enter_epoch", "on_epoch_start": "on_enter_epoch",
    "on_train_epoch_start": "on_enter_epoch", "on_train_begin": "on_exit_idle", "on_train_start": "on_exit_idle",
    "on_fit_start": "on_exit_idle", "on_train_end": "on_enter_idle", "on_fit_end": "on_enter_idle",
    "on_validation_start": "on_enter_phase", "on_validation_end": "on_exit_phase",
    "on_validation_epoch_end": "on_exit_phase", "on_before_backward": "on_enter_backward",
    "on_after_backward": "on_exit_backward", "on_before_optimizer_step": "on_enter_step",
    "on_before_zero_grad": "on_exit_step", "on_step_end": "on_exit_step",
}  # fmt: skip


def _check_hook_names(callback: Callback) -> None:
    """Raise ``TypeError`` for a method named like a hook that is none (it would never be called)."""
    known = {*HOOK_NAMES, "on_exception", "on_close"}
    for name in dir(type(callback)):
        if name.startswith("on_") and name not in known and callable(getattr(type(callback), name)):
            closest = _HOOKS_ELSEWHERE.get(name) or next(
                iter(difflib.get_close_matches(name, sorted(known), 1, 0.6)), None
            )
            hint = f"; did you mean {closest}?" if closest else "; the hooks are on_enter_<state> and on_exit_<state>"
            raise TypeError(f"callback {callback.key} defines {name}, which is not a hook and would never be "
                            f"called{hint} (states: {', '.join(STATES)})")  # fmt: skip


def _check_callbacks(callbacks: Iterable[Callback]) -> list[Callback]:
    callbacks = list(callbacks)
    for callback in callbacks:
        if not isinstance(callback, Callback):
            raise TypeError(f"callbacks must be statetrainer.Callback instances, got {type(callback).__name__}")
        _check_hook_names(callback)
    _refuse_duplicates("callback names", [callback.key for callback in callbacks],
                       "; give each a distinct name (callback.name = '...')")  # fmt: skip
    swapping = [callback.key for callback in callbacks if callback.swaps_weights]
    if len(swapping) > 1:
        raise ValueError(f"callbacks {', '.join(swapping)} each put their weights into the model for evaluation; "
                         "let one do it (EMA(..., evaluate_with=False) for the others)")  # fmt: skip
    return callbacks


def _check_monitored_metrics(callbacks: list[Callback], phases: list[Phase]) -> None:
    """Raise ``ValueError`` for a metric a callback monitors that no callback writes in a run of ``phases``.

    What each callback writes is its ``metric_names(phases)``; a callback that
    cannot tell ahead (None) turns the check off, as any name may then appear.
    """
    produced: set[str] = set()
    for callback in callbacks:
        names = _names_of(callback, "metric_names", callback.metric_names(phases))
        if names is None:
            return
        produced |= names
    for callback in callbacks:
        for monitored in sorted(_names_of(callback, "monitored_metrics", callback.monitored_metrics())):  # type: ignore[arg-type]
            if monitored in produced:
                continue
            closest = difflib.get_close_matches(monitored, sorted(produced), 1, 0.7)
            hint = f"; did you mean {closest[0]!r}?" if closest else "."
            raise ValueError(
                f"callback {callback.key} monitors {monitored!r}, which no callback produces for the phases "
                f"{', '.join(phase.name for phase in phases)}{hint} The callbacks produce "
                f"{', '.join(sorted(produced)) or 'no metrics'}. Add the Metric that produces it (SmoothedLoss gives "
                "'<phase>_loss', Accuracy '<phase>_accuracy'); a callback of yours that writes trainer.metrics "
                "declares the names it writes by overriding metric_names(phases)"
            )


def _names_of(callback: Callback, method: str, names: Any) -> set[str] | None:
    """``names``, as returned by ``callback.<method>()``, as a set; ``TypeError`` unless a collection of strings."""
    if names is None and method == "metric_names":
        return None
    if isinstance(names, (str, bytes)) or not isinstance(names, Iterable):
        raise TypeError(f"callback {callback.key}: {method}() must return a set of metric names, got {names!r}")
    names = set(names)
    if not all(isinstance(name, str) for name in names):
        raise TypeError(f"callback {callback.key}: {method}() must return metric names (strings), got {names!r}")
    return names


def _refuse_duplicates(what: str, names: list[str], advice: str = "") -> None:
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"{what} must be unique, got {', '.join(map(repr, duplicates))} more than once{advice}")
