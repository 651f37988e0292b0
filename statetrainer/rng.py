"""Capturing and restoring every random generator a training step may draw from."""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .checkpoint import CheckpointError

__all__ = ["Generators", "capture_rng", "restore_rng"]


def capture_rng(cuda_devices: Sequence[torch.device] = ()) -> dict[str, Any]:
    """Python's, NumPy's and torch's CPU generator state, and that of each of ``cuda_devices``.

    Only the devices the run uses are read, so a CPU run never starts CUDA and a
    process of a multi-GPU run never touches another process's device.
    """
    version, python_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": version, "state": list(python_state), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached": float(cached)},  # fmt: skip
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state(device) for device in cuda_devices],
    }


def restore_rng(state: dict[str, Any], cuda_devices: Sequence[torch.device] = ()) -> None:
    """Put back what ``capture_rng`` returned; CUDA states go to ``cuda_devices``, in order.

    A checkpoint written on CUDA and loaded by a CPU run has no CUDA generator to
    restore and skips those states; a CUDA run loading one written on the CPU
    keeps its CUDA generators as they are, with a warning, since draws on the GPU
    cannot then repeat.
    """
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached"]))  # fmt: skip
    torch.set_rng_state(state["torch"].cpu())
    saved = state["cuda"]
    if not cuda_devices:
        return
    if len(saved) != len(cuda_devices):
        warnings.warn(
            f"the checkpoint holds {len(saved)} CUDA generator state(s) but this run uses {len(cuda_devices)} "
            "CUDA device(s); random draws on the GPU (dropout) will not repeat the original run's",
            stacklevel=3,
        )
    for device, device_state in zip(cuda_devices, saved):
        torch.cuda.set_rng_state(device_state.cpu(), device)


class Generators:
    """The run's seed and every random generator's state: a part of the run's state.

    Args:
        seed: The run's seed (it decides the data order; see ``statetrainer.data``).
        cuda_devices: The CUDA devices whose generators the run draws from.
    """

    def __init__(self, seed: int, cuda_devices: Sequence[torch.device] = (), chosen: bool = True) -> None:
        self.seed, self.cuda_devices, self.chosen = seed, tuple(cuda_devices), chosen

    @classmethod
    def for_run(cls, seed: int | None, device: torch.device) -> Generators:
        """The generators of a run on ``device``; a None seed takes ``torch.initial_seed()`` until a checkpoint's."""
        chosen = seed is not None
        seed = int(seed) if chosen else torch.initial_seed() % 2**63
        return cls(seed, (device,) if device.type == "cuda" else (), chosen)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, **capture_rng(self.cuda_devices)}

    def check_fits(self, state: dict[str, Any]) -> None:
        if isinstance(state["seed"], bool) or not isinstance(state["seed"], int):
            raise ValueError(f"the seed is {state['seed']!r}, not an integer")
        if self.chosen and state["seed"] != self.seed:
            raise CheckpointError(f"the checkpoint is of a run with seed={state['seed']}, this trainer has seed={self.seed}: "
                                  "it is another run; resume it with its seed, or save this run to another folder")  # fmt: skip
        if not isinstance(state["torch"], torch.Tensor) or not isinstance(state["cuda"], list):
            raise TypeError("the torch and CUDA generator states are not tensors")
        state["python"]["state"], state["numpy"]["keys"]  # noqa: B018 -- present, or a KeyError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        restore_rng(state, self.cuda_devices)
