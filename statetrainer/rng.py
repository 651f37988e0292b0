"""Capturing and restoring every random generator a training step may draw from."""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .data.resumable import mix_seed
from .distributed import Ranks, all_gather
from .errors import CheckpointError
from .saved_state import check_integer, check_keys, check_real, check_tensor, describe

__all__ = ["Generators", "capture_rng", "check_rng_state", "restore_rng", "seed_everything"]

_MT_WORDS = 624  # the Mersenne Twister's state: 624 32-bit words and a position among them


def capture_rng(cuda_devices: Sequence[torch.device] = ()) -> dict[str, Any]:
    """Python's, NumPy's and torch's CPU generator state, and that of each of ``cuda_devices``.

    Only the devices the run uses are read, so a CPU run never starts CUDA and a
    process of a multi-GPU run never touches another process's device.
    """
    version, python_state, gauss = random.getstate()
    legacy = np.random.get_state(legacy=True)  # the default, which numpy's stubs type as the dict form
    assert isinstance(legacy, tuple)  # the global generator is an MT19937, whose legacy state is a tuple
    kind, keys, position, has_gauss, cached = legacy
    return {
        "python": {"version": version, "state": list(python_state), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },  # fmt: skip
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
    for device, device_state in zip(cuda_devices, saved, strict=False):  # as many as both have (warned above)
        torch.cuda.set_rng_state(device_state.cpu(), device)


def check_rng_state(state: Any, cuda_devices: Sequence[torch.device] = ()) -> None:
    """Raise ``CheckpointError`` naming the key unless ``restore_rng(state, cuda_devices)`` restores exactly
    what ``capture_rng`` captured; nothing is changed.

    Python's state (version 3, 624 32-bit words and a position, a cached
    Gaussian or None) and NumPy's (MT19937, 624 words as int64, a position, a
    flag and a finite cached Gaussian) are checked value by value, as their
    ``setstate`` accepts some wrong ones silently; torch's CPU state and each
    state restored to one of ``cuda_devices`` are set on a new generator of
    their own, which refuses a state of the wrong size or an invalid one.
    """
    check_keys("the generator state", state, ("python", "numpy", "torch", "cuda"))
    python = state["python"]
    check_keys("python", python, ("version", "state", "gauss"))
    check_integer("python['version']", python["version"], random.Random.VERSION, random.Random.VERSION)
    words = python["state"]
    if not isinstance(words, list) or len(words) != _MT_WORDS + 1:
        raise CheckpointError(f"python['state'] is {describe(words)}, not a list of {_MT_WORDS + 1} integers")
    for index, word in enumerate(words):
        check_integer(f"python['state'][{index}]", word, 0, 2**32 - 1 if index < _MT_WORDS else _MT_WORDS)
    if python["gauss"] is not None:
        check_real("python['gauss']", python["gauss"])
    numpy = state["numpy"]
    check_keys("numpy", numpy, ("kind", "keys", "position", "has_gauss", "cached"))
    if numpy["kind"] != "MT19937":
        raise CheckpointError(f"numpy['kind'] is {describe(numpy['kind'])}, not 'MT19937'")
    check_tensor("numpy['keys']", numpy["keys"], (_MT_WORDS,), torch.int64)
    if not bool(((numpy["keys"] >= 0) & (numpy["keys"] < 2**32)).all()):
        raise CheckpointError("numpy['keys'] holds values that are not 32-bit words")
    check_integer("numpy['position']", numpy["position"], 0, _MT_WORDS)
    check_integer("numpy['has_gauss']", numpy["has_gauss"], 0, 1)
    check_real("numpy['cached']", numpy["cached"])
    like = torch.get_rng_state()
    check_tensor("torch", state["torch"], like.shape, like.dtype)
    _check_on_new_generator("torch", state["torch"], torch.device("cpu"))
    if not isinstance(state["cuda"], list):
        raise CheckpointError(f"cuda is {describe(state['cuda'])}, not a list of CUDA generator states")
    for index, device_state in enumerate(state["cuda"]):
        if not isinstance(device_state, torch.Tensor) or device_state.dtype != torch.uint8 or device_state.dim() != 1:
            raise CheckpointError(f"cuda[{index}] is {describe(device_state)}, not a uint8 tensor of one dimension")
        if index < len(cuda_devices):  # the states restored here; a CPU run skips them
            _check_on_new_generator(f"cuda[{index}]", device_state, cuda_devices[index])


def _check_on_new_generator(name: str, state: torch.Tensor, device: torch.device) -> None:
    """Set ``state`` on a new generator of ``device`` (not the one the run draws from): its own checks."""
    try:
        torch.Generator(device=device).set_state(state.cpu())
    except (RuntimeError, ValueError, TypeError) as error:
        raise CheckpointError(f"{name} is not a generator state of {device.type} here: {error}") from error


def _pack(state: dict[str, Any]) -> torch.Tensor:
    """``capture_rng``'s result as one byte tensor, so the ranks' states travel by ``all_gather`` (never pickle)."""
    python, numpy = state["python"], state["numpy"]
    gauss = python["gauss"]
    integers = np.array([python["version"], *python["state"], numpy["position"], numpy["has_gauss"]], dtype=np.int64)
    floats = np.array([0.0 if gauss is None else gauss, float(gauss is not None), numpy["cached"]], dtype=np.float64)
    parts = [integers.view(np.uint8), floats.view(np.uint8), numpy["keys"].numpy().astype(np.int64).view(np.uint8),
             state["torch"].numpy(), *(cuda.cpu().numpy() for cuda in state["cuda"])]  # fmt: skip
    return torch.from_numpy(np.concatenate(parts))


def _unpack(packed: torch.Tensor, like: dict[str, Any]) -> dict[str, Any]:
    """The state ``_pack`` packed, laid out as ``like`` (this rank's own state: the same sizes on every rank)."""
    data = packed.numpy()
    count = 1 + len(like["python"]["state"]) + 2
    integers = data[: 8 * count].view(np.int64)
    floats = data[8 * count : 8 * count + 24].view(np.float64)
    offset = 8 * count + 24
    keys = data[offset : offset + like["numpy"]["keys"].numel() * 8].view(np.int64)
    offset += keys.nbytes
    torch_state = torch.from_numpy(data[offset : offset + like["torch"].numel()].copy())
    offset += like["torch"].numel()
    cuda = []
    for device_state in like["cuda"]:
        cuda.append(torch.from_numpy(data[offset : offset + device_state.numel()].copy()))
        offset += device_state.numel()
    return {
        "python": {
            "version": int(integers[0]),
            "state": [int(value) for value in integers[1:-2]],
            "gauss": float(floats[0]) if floats[1] else None,
        },  # fmt: skip
        "numpy": {
            "kind": like["numpy"]["kind"],
            "keys": torch.from_numpy(keys.copy()),
            "position": int(integers[-2]),
            "has_gauss": int(integers[-1]),
            "cached": float(floats[2]),
        },  # fmt: skip
        "torch": torch_state,
        "cuda": cuda,
    }


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (the CPU's and every CUDA device's) from ``seed``.

    Call it first in a script, so weight initialisation and dropout repeat; the
    trainer's ``seed`` decides the data order and augmentation.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Generators:
    """The run's seed and every random generator's state, for each rank: a part of the run's state.

    Each rank draws dropout and the like from its own generators, so a
    checkpoint holds every rank's, gathered as tensors, and each rank takes
    its own back. A rank that has no saved state (a run resumed on more
    processes than it was saved from) seeds its generators from the seed, the
    step and its rank.

    Args:
        seed: The run's seed (it decides the data order; see ``statetrainer.data``).
        cuda_devices: The CUDA devices whose generators the run draws from.
        chosen: Whether the user chose the seed (an open one takes the checkpoint's).
        ranks: This process's place among the run's processes.
        global_step: The run's optimizer steps once its position is loaded: a rank without a saved state mixes
            them into its seed.
    """

    def __init__(self, seed: int, cuda_devices: Sequence[torch.device] = (), chosen: bool = True,
                 ranks: Ranks = Ranks(), global_step: Callable[[], int] = lambda: 0) -> None:  # fmt: skip
        self.seed, self.cuda_devices, self.chosen, self.ranks = seed, tuple(cuda_devices), chosen, ranks
        self.global_step = global_step

    @classmethod
    def for_run(cls, seed: int | None, device: torch.device, ranks: Ranks = Ranks(),
                global_step: Callable[[], int] = lambda: 0) -> Generators:  # fmt: skip
        """The generators of a run on ``device``; a None seed takes ``torch.initial_seed()`` until a checkpoint's."""
        chosen = seed is not None
        seed = int(seed) if chosen else torch.initial_seed() % 2**63
        return cls(seed, (device,) if device.type == "cuda" else (), chosen, ranks, global_step)

    def state_dict(self) -> dict[str, Any]:
        own = capture_rng(self.cuda_devices)
        if not self.ranks.distributed:
            return {"seed": self.seed, "ranks": [own]}
        device = self.cuda_devices[0] if self.cuda_devices else torch.device("cpu")
        gathered = all_gather(_pack(own), self.ranks, device)
        return {"seed": self.seed, "ranks": [_unpack(packed, own) for packed in gathered]}

    def check_fits(self, state: dict[str, Any]) -> None:
        """Refuse another run's seed, and any saved rank's generator state that would not restore exactly
        (see ``check_rng_state``); every rank's is checked, so a run on any number of processes can take it."""
        check_keys("the generators' state", state, ("seed", "ranks"))
        check_integer("seed", state["seed"], -(2**63), 2**64 - 1)  # what torch.manual_seed takes
        if self.chosen and state["seed"] != self.seed:
            raise CheckpointError(f"the checkpoint is of a run with seed={state['seed']}, this trainer has seed={self.seed}: "
                                  "it is another run; resume it with its seed, or save this run to another folder")  # fmt: skip
        if not isinstance(state["ranks"], list) or not state["ranks"]:
            raise CheckpointError(f"ranks is {describe(state['ranks'])}, not a list with one entry per rank")
        for rank, rank_state in enumerate(state["ranks"]):
            try:
                check_rng_state(rank_state, self.cuda_devices)
            except CheckpointError as error:
                raise CheckpointError(f"ranks[{rank}]: {error}") from error

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = state["seed"]
        saved, rank = state["ranks"], self.ranks.rank
        if rank < len(saved):
            restore_rng(saved[rank], self.cuda_devices)
        else:
            seed_everything(mix_seed(self.seed, self.global_step(), rank))
