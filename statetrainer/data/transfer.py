"""A batch on its way to the model: moved to the device, split into input and target."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["to_device", "unpack_pair"]


def to_device(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Move every tensor in a (nested) tuple, list, namedtuple or mapping to ``device``.

    Anything that is not a tensor or a container of them is returned unchanged.
    """
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(to_device(item, device, non_blocking) for item in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(item, device, non_blocking) for item in batch)
    if isinstance(batch, Mapping):
        return {key: to_device(value, device, non_blocking) for key, value in batch.items()}
    return batch


def unpack_pair(batch: Any) -> tuple[Any, Any]:
    """The default ``unpack``: a batch is an ``(input, target)`` pair."""
    if isinstance(batch, Mapping):  # unpacking a dict would give its keys
        raise TypeError(
            f"a batch is a {type(batch).__name__} with keys {', '.join(map(repr, batch))}, not an (input, target) "
            "pair; pass unpack=lambda batch: (batch['input'], batch['target']) to the Trainer, with your keys"
        )
    try:
        inputs, target = batch
    except (TypeError, ValueError):
        raise TypeError(
            f"by default a batch is an (input, target) pair, got {type(batch).__name__}; "
            "pass unpack=lambda batch: (input, target) to the Trainer for other shapes"
        ) from None
    return inputs, target
