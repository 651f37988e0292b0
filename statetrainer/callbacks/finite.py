"""Stop a run whose loss or gradients stop being finite numbers, without a host sync per batch."""

from __future__ import annotations

from typing import Any

import torch

from ..saved_state import check_keys
from .base import Callback, TrainerView
from .periodic import check_every, due

__all__ = ["NonFiniteError", "StopOnNonFinite", "first_non_finite"]


class NonFiniteError(FloatingPointError):
    """The loss or the gradients became NaN or infinite; the message names the batch."""


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first tensor with a NaN or an infinity in it, or None (one host sync). Sharded tensors
    (DTensors, under fully_shard) are checked shard by shard, and the ranks' answers combined in one all-reduce:
    every rank takes part, gets the same answer, and gathers nothing."""
    floating = {name: tensor for name, tensor in tensors.items() if tensor.is_floating_point() and tensor.numel()}
    if not floating:
        return None
    local = [getattr(tensor, "to_local")() if hasattr(tensor, "to_local") else tensor  # noqa: B009 -- a DTensor's shard
             for tensor in floating.values()]  # fmt: skip
    finite = torch.stack([torch.isfinite(tensor).all() for tensor in local]).to(torch.int32)
    mesh = next((getattr(tensor, "device_mesh") for tensor in floating.values() if hasattr(tensor, "device_mesh")),  # noqa: B009
                None)  # fmt: skip
    if mesh is not None:
        torch.distributed.all_reduce(finite, torch.distributed.ReduceOp.MIN, group=mesh.get_group())
    return next((name for name, ok in zip(floating, finite.cpu().tolist(), strict=True) if not ok), None)


class StopOnNonFinite(Callback):
    """Ends the run with ``NonFiniteError`` when a training loss or gradient is not finite.

    Every batch's loss (and, with ``gradients``, each step's gradients) is
    checked on its device into a flag and the number of the first bad batch,
    without a host sync; the flag is read every ``every_batches`` batches and at
    the end of every phase, so the run stops at most that many batches late,
    before a checkpoint at a phase's end could save the damage. ``Checkpoint``
    refuses to write a state whose parameters are not finite in any case.

    Args:
        every_batches: How often the flag is read (a host sync).
        gradients: Also check the gradients before each optimizer step.
        name: The callback's unique name.
    """

    def __init__(self, every_batches: int = 50, gradients: bool = True, name: str | None = None) -> None:
        check_every("StopOnNonFinite: every_batches", every_batches)
        self.every_batches, self.gradients, self.name = every_batches, gradients, name
        self._batches = 0  # batches seen in this process, counted on the host
        self._seen: torch.Tensor | None = None  # the same count, on the device
        self._first_bad: torch.Tensor | None = None  # the first bad batch's count there, or -1
        self._where: dict[int, tuple[int, str, int, int]] = {}  # batch count -> its position, since the last read

    def on_enter_phase(self, trainer: TrainerView) -> None:
        self._counting_on(trainer.device)

    def _counting_on(self, device: torch.device) -> None:
        """Make the device's counters (as a phase starts, or at the first batch of a run resumed mid-phase)."""
        if self._seen is None or self._seen.device != device:
            self._seen = torch.zeros((), dtype=torch.int64, device=device)
            self._first_bad = torch.full((), -1, dtype=torch.int64, device=device)

    def on_exit_batch(self, trainer: TrainerView) -> None:
        if trainer.loss is None:
            return
        if self._seen is None:  # a run resumed mid-phase: no phase was entered in this process
            self._counting_on(trainer.device)
        assert self._seen is not None and trainer.phase is not None
        self._batches += 1
        self._seen += 1
        self._where[self._batches] = (trainer.epoch, trainer.phase.name, trainer.batch_index, trainer.global_step)
        self._flag(~torch.isfinite(trainer.loss.detach()).all())
        if due(self._batches, self.every_batches):
            self._read()

    def on_enter_step(self, trainer: TrainerView) -> None:
        if not self.gradients or trainer.optimizer is None:
            return
        grads = [p.grad for group in trainer.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if self._seen is None:  # a run resumed mid-phase, inside a window that began before the save
            self._counting_on(trainer.device)
        if grads:
            norms = torch._foreach_norm(grads)  # pyright: ignore[reportPrivateImportUsage]  # not re-exported by torch's stubs
            self._flag(~torch.isfinite(torch.stack(norms).sum()), offset=1)

    def on_exit_phase(self, trainer: TrainerView) -> None:
        self._read()

    def _flag(self, bad: torch.Tensor, offset: int = 0) -> None:
        """Record the batch's count as the first bad one, unless one is recorded: all on the device."""
        seen, first_bad = self._seen, self._first_bad
        assert seen is not None and first_bad is not None  # made as the phase started
        count = seen + offset if offset else seen  # a step precedes its batch's exit: the next count
        self._first_bad = torch.where(bad & (first_bad < 0), count, first_bad)

    def _read(self) -> None:
        if self._first_bad is None:
            return
        first = int(self._first_bad)  # the host sync, once every few batches
        if first >= 0:
            epoch, phase, batch, step = self._where.get(first, (-1, "?", -1, -1))
            self._first_bad = torch.full_like(self._first_bad, -1)  # reported: a run that goes on starts clean
            self._where.clear()
            where = f"epoch {epoch + 1}, phase {phase!r}, batch {batch + 1} (step {step})"  # counted from 1
            raise NonFiniteError(f"a non-finite loss or gradient at {where}; the run stops. Lower the learning "
                                 "rate, clip gradients (grad_clip=...) or check the data of that batch: "
                                 "statetrainer.bisect(checkpoint_folder, make_trainer) replays the run from its "
                                 "checkpoints to the first bad batch and names its samples")  # fmt: skip
        self._where.clear()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def check_fits(self, state: dict[str, Any]) -> None:
        """Refuse a saved state that is not the empty dict this callback saves (its flags restart with the run)."""
        check_keys("the saved state", state, ())
