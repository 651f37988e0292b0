"""How big a model is, and what a checkpoint of its run holds: ``st.summary(model)`` or ``st.summary(trainer)``.

Parameters are counted once each (tied weights once), by top-level module;
their bytes are their elements times their element size (a sharded
parameter's whole size). For a trainer, the tensors its checkpoint would hold
now are counted as the checkpoint stores them (a tensor seen twice, tied
weights, once), by part: the model's weights and buffers, the optimizer's
state (empty until its first step, for Adam and its kin), and the rest (the
generators, metrics, callbacks' state): the bytes after a checkpoint file's
header.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils._pytree import tree_flatten_with_path

from .checkpoint.serialization import view_key
from .saved_state import unwrap_model


class _Run(Protocol):
    """What ``summary`` reads of a trainer (the facade is above this module, so it is named by what it has)."""

    model: nn.Module

    def state_dict(self) -> dict[str, Any]: ...


__all__ = ["ModuleSize", "ModelSummary", "readable_size", "summary"]


@dataclass(frozen=True)
class ModuleSize:
    """One top-level module (``""``: the parameters the model holds itself)."""

    name: str
    kind: str
    parameters: int
    trainable: int
    bytes: int


@dataclass(frozen=True)
class ModelSummary:
    """A model's parameters, and for a trainer the bytes of its checkpoint's tensors.

    Attributes:
        parameters: Every parameter's elements, each parameter once.
        trainable: Those of the parameters that require gradients.
        parameter_bytes: The parameters' bytes.
        buffer_bytes: The buffers' bytes (BatchNorm's statistics and the like).
        modules: Per top-level module.
        checkpoint_bytes: For a trainer: the bytes of the tensors a checkpoint taken now holds, by ``model``,
            ``optimizer`` and ``other`` (None for a model alone).
    """

    parameters: int
    trainable: int
    parameter_bytes: int
    buffer_bytes: int
    modules: list[ModuleSize]
    checkpoint_bytes: dict[str, int] | None = None

    def __str__(self) -> str:
        width = max([len("module"), *(len(row.name or "(its own)") for row in self.modules)])
        lines = [f"{'module':<{width}}  {'kind':<16}{'parameters':>14}{'trainable':>14}{'size':>11}"]
        for row in self.modules:
            lines.append(f"{row.name or '(its own)':<{width}}  {row.kind[:15]:<16}{row.parameters:>14,}"
                         f"{row.trainable:>14,}{readable_size(row.bytes):>11}")  # fmt: skip
        lines.append(f"{'total':<{width}}  {'':<16}{self.parameters:>14,}{self.trainable:>14,}"
                     f"{readable_size(self.parameter_bytes):>11}")  # fmt: skip
        lines.append(f"parameters {self.parameters:,} ({self.trainable:,} trainable), {readable_size(self.parameter_bytes)}; "
                     f"buffers {readable_size(self.buffer_bytes)}")  # fmt: skip
        if self.checkpoint_bytes is not None:
            parts = ", ".join(f"{name} {readable_size(count)}" for name, count in self.checkpoint_bytes.items())
            lines.append(f"a checkpoint now: {readable_size(sum(self.checkpoint_bytes.values()))} of tensors ({parts})")
        return "\n".join(lines)


def summary(subject: nn.Module | _Run) -> ModelSummary:
    """The summary of a model, or of a trainer's model and checkpoint (a trainer between batches; under torchrun
    call it on every rank, as ``state_dict()``, which gathers the ranks' generators).

    Raises:
        TypeError: ``subject`` is neither a module nor a trainer.
        RuntimeError: A trainer in the middle of a batch (its state cannot be taken there).
    """
    if isinstance(subject, nn.Module):
        return _model_summary(unwrap_model(subject))
    model = getattr(subject, "model", None)
    if not isinstance(model, nn.Module) or not callable(getattr(subject, "state_dict", None)):
        raise TypeError(f"summary() takes a torch.nn.Module or a statetrainer Trainer, not {type(subject).__name__}")
    base = _model_summary(unwrap_model(model))
    return ModelSummary(base.parameters, base.trainable, base.parameter_bytes, base.buffer_bytes, base.modules,
                        _checkpoint_bytes(subject.state_dict()))  # fmt: skip


def _model_summary(model: nn.Module) -> ModelSummary:
    children = list(model.named_children())
    inside = {id(parameter) for _, child in children for parameter in child.parameters()}
    rows = [_sized(name, type(child).__name__, list(child.parameters())) for name, child in children]
    own = [parameter for parameter in model.parameters(recurse=False) if id(parameter) not in inside]
    if own:
        rows.insert(0, _sized("", type(model).__name__, own))
    parameters = list(model.parameters())  # each once, tied ones too
    return ModelSummary(
        parameters=sum(parameter.numel() for parameter in parameters),
        trainable=sum(parameter.numel() for parameter in parameters if parameter.requires_grad),
        parameter_bytes=sum(_bytes(parameter) for parameter in parameters),
        buffer_bytes=sum(_bytes(buffer) for buffer in model.buffers()),
        modules=rows,
    )


def _sized(name: str, kind: str, parameters: list[nn.Parameter]) -> ModuleSize:
    return ModuleSize(name, kind, sum(parameter.numel() for parameter in parameters),
                      sum(parameter.numel() for parameter in parameters if parameter.requires_grad),
                      sum(_bytes(parameter) for parameter in parameters))  # fmt: skip


def _bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _checkpoint_bytes(state: dict[str, Any]) -> dict[str, int]:
    """The bytes of ``state``'s tensors as a checkpoint stores them (each view once), by part."""
    totals, seen = {"model": 0, "optimizer": 0, "other": 0}, set()
    leaves, _ = tree_flatten_with_path(state)
    for path, leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            continue
        key = view_key(leaf) if leaf.numel() else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        names = [str(getattr(entry, "key", getattr(entry, "idx", ""))) for entry in path[:2]]
        part = names[1] if names[:1] == ["step"] and names[1:] in (["model"], ["optimizer"]) else "other"
        totals[part] += _bytes(leaf)
    return totals


def readable_size(count: float) -> str:
    """``count`` bytes for people, in binary units: ``512 B``, ``1.5 KiB``, ``3.2 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return ""
