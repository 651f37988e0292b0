"""Mixed precision: which autocast and GradScaler a ``precision`` setting means."""

from __future__ import annotations

import torch

__all__ = ["PRECISIONS", "make_autocast", "make_grad_scaler"]

PRECISIONS: dict[str | None, torch.dtype | None] = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _dtype(precision: str | None) -> torch.dtype | None:
    try:
        return PRECISIONS[precision]
    except (KeyError, TypeError):
        raise ValueError(f"unknown precision {precision!r}; use None, 'bf16' or 'fp16'") from None


def make_autocast(precision: str | None, device: torch.device) -> torch.autocast | None:
    """The autocast context for forward and loss, or None for full precision."""
    dtype = _dtype(precision)
    return None if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(precision: str | None, device: torch.device) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 on CUDA, where small gradients would underflow; else None."""
    if _dtype(precision) is torch.float16 and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None
