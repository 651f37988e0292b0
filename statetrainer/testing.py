"""Test helpers: a callback that records every state entry and exit."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from .callbacks.base import Callback
from .machine import STATES

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["EventRecorder", "Event"]


class Event(NamedTuple):
    """One callback as the recorder saw it, with the trainer's counters at that moment."""

    hook: str  # "enter batch", "exit phase", ...
    epoch: int
    phase: str | None
    batch_index: int
    global_step: int


class EventRecorder(Callback):
    """Records every hook the machine calls, in order.

    ``recorder.hooks`` is the bare sequence (``["exit idle", "enter epoch", ...]``);
    ``recorder.events`` adds the epoch, phase, batch index and global step seen.
    """

    def __init__(self, name: str | None = None) -> None:
        self.name = name
        self.events: list[Event] = []

    @property
    def hooks(self) -> list[str]:
        return [event.hook for event in self.events]

    def clear(self) -> None:
        self.events.clear()

    def _record(self, hook: str, trainer: Trainer) -> None:
        phase = trainer.phase.name if trainer.phase is not None else None
        self.events.append(Event(hook, trainer.epoch, phase, trainer.batch_index, trainer.global_step))


def _recording_hook(kind: str, state: str):  # noqa: ANN202
    hook = f"{kind} {state}"

    def record(self: EventRecorder, trainer: Trainer) -> None:
        self._record(hook, trainer)

    record.__name__ = f"on_{kind}_{state}"
    return record


def _add_recording_hooks() -> None:
    """One recording method per hook, written out by a loop rather than twelve near-copies."""
    for state in STATES:
        for kind in ("enter", "exit"):
            setattr(EventRecorder, f"on_{kind}_{state}", _recording_hook(kind, state))


_add_recording_hooks()
