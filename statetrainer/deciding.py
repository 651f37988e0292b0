"""The run's control flow: from each state, which one transition the machine makes next."""

from __future__ import annotations

from collections.abc import Callable

from .data import END
from .machine import TrainingMachine
from .work import StateWork

__all__ = ["Deciders"]


class Deciders:
    """Per state, the call that picks and fires the one transition out of it (idle and step have one each).

    ``fit()`` and ``advance()`` both call ``by_state[machine.state]()``, so a
    stepped run and a fitted run make the same transitions.

    Args:
        machine: The machine whose transitions are fired.
        work: The states' work: the position, the phases and the open phase's batches.
        epochs: How many epochs the run has; None: until the work's ``max_steps``.
    """

    def __init__(self, machine: TrainingMachine, work: StateWork, epochs: int | None) -> None:
        self.work, self.position, self.epochs = work, work.position, epochs
        self.phase_count, self.accumulate = len(work.phases), work.step_runner.accumulate
        fire = machine.firer
        self._start_phase, self._start_batch, self._backward = (
            fire("start_phase"),
            fire("start_batch"),
            fire("backward"),
        )
        self._step, self._end_batch, self._end_phase = fire("step"), fire("end_batch"), fire("end_phase")
        self._next_epoch, self._finish = fire("next_epoch"), fire("finish")
        self.by_state: dict[str, Callable[[], None]] = {
            "idle": fire("start_epoch"), "epoch": self.decide_epoch, "phase": self.decide_phase,
            "batch": self.decide_batch, "backward": self.decide_backward, "step": self._end_batch}  # fmt: skip

    def decide_epoch(self) -> None:
        position, work = self.position, self.work
        if not position.stop_requested and work.next_phase_index() < self.phase_count:
            self._start_phase()
            return
        position.epochs_done += 1
        epochs_done = self.epochs is not None and position.epochs_done >= self.epochs
        if position.stop_requested or epochs_done or work.steps_done:
            self._finish()
        else:
            self._next_epoch()

    def decide_phase(self) -> None:
        work = self.work
        cursor = work.cursor
        assert cursor is not None
        if not self.position.stop_requested:
            batch = cursor.next()
            if batch is not END:
                work.incoming = batch
                self._start_batch()
                return
            if cursor.fetched == 0:
                name = work.phase.name if work.phase is not None else None
                raise ValueError(f"phase {name!r}: its loader yielded no batches")
        work.cursor = None  # lets a DataLoader's workers shut down
        self._end_phase()

    def decide_batch(self) -> None:
        if self.work.grad:
            self._backward()
        else:
            self._end_batch()

    def decide_backward(self) -> None:
        if (self.position.batch_index + 1) % self.accumulate == 0 or self.work.ends_phase():
            self._step()
        else:
            self._end_batch()
