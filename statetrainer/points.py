"""A point of a run to go back to, and which of its checkpoints were saved before it (``Trainer.travel_to``).

A point is the moment optimizer step ``step`` has just been taken (the
trainer in ``step``), or the moment batch ``batch`` of phase ``phase`` in epoch
``epoch`` has just run its forward (the trainer in ``batch``): where
``run_until`` stops for those conditions. A checkpoint is saved between
batches; its position says how far the run had got, so it is before the point
when its optimizer steps are fewer than ``step``, or when the batch it
finished comes before that batch in the run's order (epoch, phase, batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["RunPoint"]


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class RunPoint:
    """Where ``travel_to`` goes: a step, or a batch of a phase in an epoch (all counted from 0 but the step).

    Raises:
        ValueError: Neither or both kinds given, a part of a batch's point missing, or a phase the run does not
            have; a number that is not a whole number in range.
    """

    step: int | None = None
    epoch: int | None = None
    phase: str | None = None
    batch: int | None = None
    phase_index: int = -1

    @classmethod
    def of(cls, phases: Sequence[str], step: int | None = None, epoch: int | None = None, phase: str | None = None,
           batch: int | None = None) -> RunPoint:  # fmt: skip
        """The point named by ``step``, or by ``epoch``, ``phase`` and ``batch`` together, in a run of ``phases``."""
        by_batch = (epoch, phase, batch)
        if (step is None) == all(value is None for value in by_batch):
            raise ValueError("name one point: step=, or epoch=, phase= and batch= together")
        if step is not None:
            if not _whole(step) or step < 1:
                raise ValueError(f"step={step!r}: optimizer steps count from 1")
            return cls(step=step)
        if any(value is None for value in by_batch):
            raise ValueError(f"a batch's point needs epoch=, phase= and batch= (given {epoch=}, {phase=}, {batch=})")
        if not isinstance(phase, str) or phase not in phases:
            raise ValueError(f"this run has no phase {phase!r}; its phases are {', '.join(map(repr, phases))}")
        if not (_whole(epoch) and _whole(batch)) or epoch < 0 or batch < 0:  # type: ignore[operator]
            raise ValueError(f"epoch={epoch!r}, batch={batch!r}: whole numbers from 0")
        return cls(epoch=epoch, phase=phase, batch=batch, phase_index=list(phases).index(phase))

    def saved_before(self, position: dict[str, Any]) -> bool:
        """Whether a checkpoint whose position is ``position`` was saved before this point."""
        if self.step is not None:
            return position["global_step"] < self.step
        finished = (position["epoch"], position.get("phase_index", position.get("phase_position", -1)),
                    position["batch_index"])  # fmt: skip
        return bool(finished < (self.epoch, self.phase_index, self.batch))

    def stop(self) -> dict[str, Any]:
        """``run_until``'s arguments that stop the trainer at this point."""
        if self.step is not None:
            return {"step": self.step}
        return {"state": "batch", "epoch": self.epoch, "phase": self.phase, "batch": self.batch}

    def __str__(self) -> str:
        if self.step is not None:
            return f"step {self.step}"
        return f"epoch {self.epoch}, phase {self.phase!r}, batch {self.batch}"
