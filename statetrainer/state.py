"""Helpers for ``Trainer.state_dict``: unwrapping models, checking a saved state fits, placing it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .checkpoint import CheckpointError

__all__ = ["check_model_state", "tensors_to", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under DDP / DataParallel / ``torch.compile`` wrappers, whose keys are the plain ones."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def tensors_to(tree: Any, device: torch.device) -> Any:
    """A copy of ``tree`` whose tensors are new tensors on ``device``; other values are kept.

    Loaded state goes back where the run keeps it, and never aliases the file it
    was read from (a memory-mapped checkpoint that is later pruned or replaced).
    """
    if isinstance(tree, torch.Tensor):
        return tree.to(device, copy=True)
    if isinstance(tree, dict):
        return {key: tensors_to(value, device) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        moved = [tensors_to(value, device) for value in tree]
        return moved if isinstance(tree, list) else tuple(moved)
    return tree


def check_model_state(expected: Mapping[str, torch.Tensor], saved: Mapping[str, torch.Tensor]) -> None:
    """Raise ``CheckpointError`` naming every missing or extra key and every shape or dtype mismatch."""
    problems = []
    missing = [key for key in expected if key not in saved]
    extra = [key for key in saved if key not in expected]
    if missing:
        problems.append(f"missing keys {_some(missing)}")
    if extra:
        problems.append(f"unexpected keys {_some(extra)}")
    for key in expected.keys() & saved.keys():
        want, got = expected[key], saved[key]
        if tuple(want.shape) != tuple(got.shape):
            problems.append(f"{key}: shape {tuple(got.shape)} in the checkpoint, {tuple(want.shape)} in the model")
        elif want.dtype != got.dtype:
            problems.append(f"{key}: dtype {got.dtype} in the checkpoint, {want.dtype} in the model")
    if problems:
        raise CheckpointError("the checkpoint does not fit this model: " + "; ".join(problems))


def _some(keys: list[str], shown: int = 5) -> str:
    listed = ", ".join(keys[:shown])
    return f"{listed} (+{len(keys) - shown} more)" if len(keys) > shown else listed
