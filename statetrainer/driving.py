"""What surrounds every ``fit()``/``advance()``: one driver at a time, stop signals, determinism, errors, close.

``RunGuard.driving()`` wraps each call that advances the machine: it refuses
re-entry (a callback calling ``fit()``) and a run an earlier error left half
done, catches the stop signals, turns on deterministic algorithms when asked,
and on an error shuts the loader down and gives every callback's
``on_exception`` its turn before the error propagates (and before a stop
signal's message is printed). When driving ends for good (the run finished, or
an error stopped it), every callback's ``on_close`` runs once and the run's
output folders are let go.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .callbacks.base import Callback
from .determinism import deterministic_algorithms
from .distributed import StopVote
from .errors import CheckpointError, Preempted
from .machine import AT_REST, TrainingMachine
from .outputs import RunOutputs
from .parts import Position
from .preemption import SignalCatcher
from .recovery import Recovery

__all__ = ["RunGuard"]


class RunGuard:
    """The context every machine-advancing call runs in.

    Args:
        machine: The machine driven.
        position: The run's position (a finished run is not driven).
        callbacks: Their ``on_exception`` and ``on_close`` overrides run when driving ends in an error, or for good.
        stop_signals: The signals that preempt the run.
        deterministic: Turn on deterministic algorithms while driving.
        on_error: Called first when a call ends in an error (to release the loader).
        recover: Called before ``on_error``: where a checkpoint taken after the error stands.
        stop: ``stop(target, signal)`` runs at the first batch boundary after a stop signal (it saves and raises).
        outputs: The run's output folders: claimed, and their files opened, before the first hook; let go when
            driving ends for good.
        speak: Whether this process prints the run's messages (rank 0).
        vote: Shares stop signals between the ranks of a torchrun run (None in one process):
            a signal then stops every rank after the same batch.
        closes: Whether the callbacks' ``on_close`` runs when driving ends for good (not for an evaluation).
        max_steps: The run's ``max_steps``, for the message that a finished run cannot be advanced.

    Attributes:
        settle_writes: Called (on every rank) when a run has finished, before the callbacks' ``on_close``: waits for
            the background checkpoint write in flight, so the run's last callbacks see it done (it may raise its
            failure, after ``on_close`` has run).
        deferred: Actions waiting for the machine to be between batches.
        at_rest: True while they run: the one time a callback may save.
        error: The error that stopped driving for good; None while the run can go on.
        recovery: For a run an error stopped, what a checkpoint holds (None: the run as it is).
    """

    def __init__(
        self,
        machine: TrainingMachine,
        position: Position,
        callbacks: Sequence[Callback],
        stop_signals: tuple[signal.Signals, ...],
        deterministic: bool,
        on_error: Callable[[], None],
        recover: Callable[[], Recovery | None],
        stop: Callable[[Any, signal.Signals], None],
        outputs: RunOutputs,
        speak: bool,
        vote: StopVote | None = None,
        closes: bool = True,
        max_steps: int | None = None,
    ) -> None:
        self.machine, self.position, self.outputs, self.speak, self.vote = machine, position, outputs, speak, vote
        self.active = self.at_rest = self.closed = False
        self.error: BaseException | None = None
        self.recovery: Recovery | None = None
        self.catcher = SignalCatcher(stop_signals, self._on_signal)
        self._deterministic, self._on_error, self._recover, self._stop = deterministic, on_error, recover, stop
        self.deferred: list[Callable[[Any], None]] = []
        self._raise_failure: Callable[[Any], None] | None = None  # this rank's failed background write, to raise
        self._exception_hooks = [callback.on_exception for callback in callbacks
                                 if type(callback).on_exception is not Callback.on_exception]  # fmt: skip
        self._close_hooks = [callback.on_close for callback in callbacks
                             if closes and type(callback).on_close is not Callback.on_close]  # fmt: skip
        self._max_steps = max_steps
        self.settle_writes: Callable[[], None] = lambda: None

    @contextlib.contextmanager
    def driving(self, target: Any) -> Iterator[None]:
        """Drive the machine for the ``with`` block; ``target`` is what hooks and deferred actions receive."""
        if self.active:
            raise RuntimeError(
                "the trainer is already advancing: callbacks must not call fit(), advance() or run_until(); "
                "use trainer.stop() to end the run"
            )
        if self.error is not None:
            raise RuntimeError(
                f"the trainer cannot continue: an earlier transition raised {self.error!r} in state "
                f"{self.machine.state!r}, so its work may be half done; build a new Trainer"
            ) from self.error
        if self.position.finished and self.machine.pending is None:
            raise RuntimeError(f"the run has finished ({self.position.end_reason(self._max_steps)}); there is nothing "
                               "left to advance")  # fmt: skip
        self.outputs.open(target)  # another run's folder, or a second live copy, is refused before any hook
        self.closed, self.active = False, True
        try:
            with self.catcher, deterministic_algorithms() if self._deterministic else contextlib.nullcontext():
                yield
            if self.vote is not None:
                self.vote.settle()  # every rank leaves with no exchange in flight
            self.run_deferred(target)  # a stop signal that came after the last check
        except BaseException as error:
            if self.vote is not None:
                self.vote.abandon()
            self.error, self.recovery = error, self._recover()
            self._on_error()
            for hook in self._exception_hooks:
                _warn_if_raises(error, hook, target, error)
            if isinstance(error, Preempted) and self.speak:
                # After on_exception, so that no progress bar is left on the line the message starts.
                print(f"statetrainer: {error.message}", file=sys.stderr, flush=True)
            self.close(target, error)
            raise
        finally:
            self.active = False
        if self.position.finished:
            self.close(target)

    def close(self, target: Any, error: BaseException | None = None) -> None:
        """Driving has ended for good: every ``on_close`` runs (once), and the output folders are let go.

        After an error, a hook that raises is warned about, so that the run's own error propagates."""
        if self.closed:
            return
        self.closed = True
        try:
            if error is None:
                try:
                    self.settle_writes()
                except BaseException as failure:
                    self.close_hooks(target, failure)
                    raise
            self.close_hooks(target, error)
        finally:
            self.outputs.release()

    def close_hooks(self, target: Any, error: BaseException | None) -> None:
        """Every ``on_close``; while ``error`` propagates, one that raises is warned about."""
        for hook in self._close_hooks:
            if error is None:
                hook(target)
            else:
                _warn_if_raises(error, hook, target)

    def _on_signal(self, received: signal.Signals) -> None:
        if self.vote is not None:
            self.vote.received = max(self.vote.received, int(received))  # the ranks decide together, after a batch
        else:
            self.deferred.append(lambda target: self._stop(target, received))

    def fail_at_next_boundary(self, raise_failure: Callable[[Any], None]) -> None:
        """Have ``raise_failure(target)`` raise at the next batch boundary (called from a background writer's
        thread); under torchrun, at one boundary on every rank, the others raising a ``CheckpointError``."""
        if self.vote is None:
            self.deferred.append(raise_failure)
            return
        self._raise_failure = raise_failure
        self.vote.received = StopVote.WRITE_FAILED

    def exchange_stop_vote(self, _target: Any) -> None:
        """After each batch of a torchrun run: stop here if any rank had a stop signal by the previous batch."""
        assert self.vote is not None
        decided = self.vote.exchange()
        if decided == StopVote.WRITE_FAILED:
            self.deferred.append(self._raise_failure or _raise_another_ranks_failure)
        elif decided:
            self.deferred.append(lambda target: self._stop(target, signal.Signals(decided)))

    def run_deferred(self, target: Any) -> None:
        """Run the deferred actions now, if the machine is between batches."""
        if not self.deferred or self.machine.state not in AT_REST:
            return
        self.at_rest = True
        try:
            while self.deferred:  # popped one by one: a signal handler may append meanwhile
                self.deferred.pop(0)(target)
        finally:
            self.at_rest = False


def _raise_another_ranks_failure(_target: Any) -> None:
    raise CheckpointError("another rank's background checkpoint write failed; see its error")


def _warn_if_raises(error: BaseException, hook: Callable[..., None], *args: Any) -> None:
    """Call a callback's hook while ``error`` propagates: a hook that raises is warned about, not raised."""
    try:
        hook(*args)
    except Exception as hook_error:  # noqa: BLE001 -- the run's own error must propagate
        warnings.warn(f"{hook.__qualname__} raised {hook_error!r} while handling {error!r}", stacklevel=4)
