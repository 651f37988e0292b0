"""Deterministic mode: the same inputs give the same bits on the GPU, so a resumed run can match.

On the CPU, PyTorch's kernels are already run-to-run deterministic. On CUDA,
some kernels (atomic adds in backward passes, cuDNN's autotuned convolutions,
cuBLAS's split reductions) are not; deterministic mode swaps them for
deterministic ones, or raises where an operation has none.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import torch

__all__ = ["CUBLAS_WORKSPACE_SETTINGS", "deterministic_algorithms", "require_cublas_workspace"]

# The cuBLAS workspace sizes under which its kernels are deterministic (CUDA >= 10.2).
CUBLAS_WORKSPACE_SETTINGS = (":4096:8", ":16:8")


def require_cublas_workspace() -> None:
    """See that ``CUBLAS_WORKSPACE_CONFIG`` makes cuBLAS deterministic, setting it while that still works.

    cuBLAS reads the variable when CUDA starts in this process, so it can be
    set here only before then.

    Raises:
        RuntimeError: It is unset or set to another value and CUDA has already
            started; the message says how to set it.
    """
    current = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if current in CUBLAS_WORKSPACE_SETTINGS:
        return
    if not torch.cuda.is_initialized():
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE_SETTINGS[0]
        return
    found = "is not set" if current is None else f"is {current!r}"
    raise RuntimeError(
        f"deterministic=True needs CUBLAS_WORKSPACE_CONFIG={CUBLAS_WORKSPACE_SETTINGS[0]} (or "
        f"{CUBLAS_WORKSPACE_SETTINGS[1]}), but it {found} and CUDA has already started in this process, so it "
        "can no longer take effect. Set it where the script is launched "
        f"(CUBLAS_WORKSPACE_CONFIG={CUBLAS_WORKSPACE_SETTINGS[0]} python train.py), or build the Trainer before "
        "anything touches CUDA (models on the CPU: the Trainer moves them)"
    )


@contextlib.contextmanager
def deterministic_algorithms() -> Iterator[None]:
    """Deterministic algorithms on, cuDNN deterministic and not benchmarking, and a model compiled while driving
    compiled by Inductor without its on-device benchmarking (autotuning picks kernels by timing them, so two runs
    could pick differently); the previous settings come back after."""
    inductor = None
    if "torch._inductor.config" in sys.modules:  # loaded with torch.compile (and torch.optim); its import is slow
        from torch._inductor import config as inductor  # noqa: PLC0415
    saved_inductor = inductor is not None and inductor.deterministic
    if inductor is not None:
        inductor.deterministic = True
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
        if inductor is not None:
            inductor.deterministic = saved_inductor
