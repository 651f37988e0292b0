"""What surrounds every ``fit()``/``advance()``: one driver at a time, stop signals, determinism, errors.

``RunGuard.driving()`` wraps each call that advances the machine: it refuses
re-entry (a callback calling ``fit()``) and a run an earlier error left half
done, catches the stop signals, turns on deterministic algorithms when asked,
and on an error shuts the loader down and gives every callback's
``on_exception`` its turn before the error propagates (and before a stop
signal's message is printed).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .callbacks.base import Callback
from .callbacks.checkpoint import Checkpoint
from .determinism import deterministic_algorithms
from .distributed import StopVote
from .machine import AT_REST
from .parts import HalfLoadedError
from .preemption import Preempted, SignalCatcher
from .recovery import Recovery

if TYPE_CHECKING:
    from .outputs import RunOutputs
    from .trainer import Trainer

__all__ = ["RunGuard", "stop_on_signal"]


class RunGuard:
    """The context every machine-advancing call runs in.

    Args:
        callbacks: Their ``on_exception`` overrides run when a call ends in an error.
        stop_signals: The signals that preempt the run.
        deterministic: Turn on deterministic algorithms while driving.
        on_error: Called first when a call ends in an error (to release the loader).
        recover: Called before ``on_error``: where a checkpoint taken after the error stands.
        vote: Shares stop signals between the ranks of a torchrun run (None in one process):
            a signal then stops every rank after the same batch.
        outputs: The run's output folders (``RunOutputs``): claimed, and their files opened, before the first
            hook; released once the run has finished.

    Attributes:
        deferred: Actions waiting for the machine to be between batches.
        at_rest: True while they run: the one time a callback may save.
        recovery: For a run an error stopped, what a checkpoint holds (None: the run as it is).
    """

    def __init__(
        self,
        callbacks: Sequence[Callback],
        stop_signals: Sequence[signal.Signals],
        deterministic: bool,
        on_error: Callable[[], None],
        recover: Callable[[], Recovery | None],
        vote: StopVote | None = None,
        outputs: RunOutputs | None = None,
    ) -> None:
        self.active = False
        self.error: BaseException | None = None
        self.catcher = SignalCatcher(stop_signals, self._on_signal)
        self._deterministic, self._on_error, self._recover = deterministic, on_error, recover
        self.recovery: Recovery | None = None
        self.vote = vote
        self._outputs = outputs
        self.deferred: list[Callable[[Any], None]] = []
        self.at_rest = False
        self._exception_hooks = [callback.on_exception for callback in callbacks
                                 if type(callback).on_exception is not Callback.on_exception]  # fmt: skip

    @contextlib.contextmanager
    def driving(self, trainer: Any) -> Iterator[None]:
        """Drive ``trainer`` for the ``with`` block (refused for a run that has ended)."""
        if self.active:
            raise RuntimeError(
                "the trainer is already advancing: callbacks must not call fit(), advance() or run_until(); "
                "use trainer.stop() to end the run"
            )
        if self.error is not None:
            raise RuntimeError(
                f"the trainer cannot continue: an earlier transition raised {self.error!r} in state "
                f"{trainer.state!r}, so its work may be half done; build a new Trainer"
            ) from self.error
        if trainer.position.finished and trainer.parts["machine"].pending is None:
            raise RuntimeError(
                f"the run has finished ({trainer.position.end_reason()}); there is nothing left to advance"
            )
        if self._outputs is not None:  # another run's folder, or a second live copy, is refused before any hook
            self._outputs.open(trainer)
        self.active = True
        try:
            with self.catcher, deterministic_algorithms() if self._deterministic else contextlib.nullcontext():
                yield
            if self.vote is not None:
                self.vote.settle()  # every rank leaves with no exchange in flight
            self.run_deferred(trainer)  # a stop signal that came after the last check
            if trainer.position.finished and self._outputs is not None:
                self._outputs.release()
        except BaseException as error:
            if self.vote is not None:
                self.vote.abandon()
            self.error, self.recovery = error, self._recover()
            self._on_error()
            for hook in self._exception_hooks:
                try:
                    hook(trainer, error)
                except Exception as hook_error:  # noqa: BLE001 -- the run's own error must propagate
                    warnings.warn(f"{hook.__qualname__} raised {hook_error!r} while handling {error!r}", stacklevel=3)
            if isinstance(error, Preempted) and trainer.is_global_zero:
                # After on_exception, so that no progress bar is left on the line the message starts.
                print(f"statetrainer: {error.message}", file=sys.stderr, flush=True)
            raise
        finally:
            self.active = False

    def _on_signal(self, received: signal.Signals) -> None:
        if self.vote is not None:
            self.vote.received = int(received)  # the ranks decide together, after a batch
        else:
            self.deferred.append(lambda trainer: stop_on_signal(trainer, received))

    def exchange_stop_vote(self, trainer: Any) -> None:
        """After each batch of a torchrun run: stop here if any rank had a stop signal by the previous batch."""
        decided = self.vote.exchange()
        if decided:
            self.deferred.append(lambda trainer: stop_on_signal(trainer, signal.Signals(decided)))

    def check_at_rest(self, trainer: Any, what: str) -> None:
        """Raise ``RuntimeError`` unless ``trainer`` can be saved now (``what`` names the call, for the message).

        After an error, the run is first put at its recovery point (see ``statetrainer.recovery``).
        """
        if isinstance(self.error, HalfLoadedError):
            raise RuntimeError(f"{what}: this trainer holds part of a checkpoint ({self.error}); build a new Trainer")
        if self.error is not None and self.recovery is not None:
            self.recovery.apply(trainer)
        if self.active and not self.at_rest:
            raise RuntimeError(f"{what} was called from a callback, in the middle of a transition; "
                               "use trainer.defer(lambda trainer: ...) or the Checkpoint callback")  # fmt: skip
        if trainer.state not in AT_REST:
            raise RuntimeError(f"{what} needs the machine between batches (idle, epoch or phase), but it is in "
                               f"{trainer.state!r}; advance to the end of the batch first")  # fmt: skip
        why_not = trainer.why_not_checkpoint_here()
        if why_not is not None:
            raise RuntimeError(f"phase {trainer.phase.name!r} cannot be resumed mid-phase here ({why_not}); "
                               "checkpoint it at an epoch boundary instead")  # fmt: skip

    def run_deferred(self, trainer: Any) -> None:
        """Run the deferred actions now, if the machine is between batches."""
        if not self.deferred or trainer.state not in AT_REST:
            return
        self.at_rest = True
        try:
            while self.deferred:  # popped one by one: a signal handler may append meanwhile
                self.deferred.pop(0)(trainer)
        finally:
            self.at_rest = False


def stop_on_signal(trainer: Trainer, received: signal.Signals) -> None:
    """At the first batch boundary after a stop signal: save exactly here, then raise ``Preempted``."""
    epoch = trainer.position.epoch_for_people(trainer.state)
    if trainer.state == "phase":  # counted from 1, for people
        where = f"epoch {epoch}, phase {trainer.phase.name!r}, after batch {trainer.batch_index + 1}"
    else:
        where = f"the end of epoch {epoch}" if epoch else "the start of the run"
    savers = [callback for callback in trainer.callbacks if isinstance(callback, Checkpoint)]
    saved = None
    why_not = trainer.why_not_checkpoint_here()
    if not savers:
        outcome = ("nothing was saved, because the trainer has no Checkpoint callback; "
                   "add statetrainer.callbacks.Checkpoint(folder) to resume from a stop")  # fmt: skip
    elif why_not is not None:
        outcome = (f"nothing was saved, because phase {trainer.phase.name!r} cannot be resumed mid-phase here "
                   f"({why_not}); a restart resumes from the newest checkpoint in {savers[0].folder}")  # fmt: skip
    else:
        saved = savers[0].save(trainer)
        outcome = f"saved {saved}"
    message = f"stopped by {received.name} at {where} (step {trainer.global_step}): {outcome}"
    raise Preempted(received, saved, message)  # RunGuard.driving prints it, once the callbacks have cleaned up
