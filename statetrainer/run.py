"""The run core: the machine, its work and deciders, the guard around driving, recovery and stop conditions.

``Run`` owns every moving part of a run and is the only thing that advances
it. ``fit()``, ``advance()`` and ``run_until()`` all call the same deciders,
so a stepped run and a fitted run are the same run. The trainer (``trainer.py``)
builds a ``Run`` and reads it; nothing here knows the trainer, only the
*target* that every hook receives.
"""

from __future__ import annotations

import signal
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from .callbacks.base import Callback, checkpoint_savers, hooks_by_state, surround_hooks
from .data import PhaseSources
from .deciding import Deciders
from .distributed import Ranks, StopVote
from .driving import RunGuard
from .errors import HalfLoadedError, Preempted
from .machine import AT_REST, TrainingMachine
from .optimizer_step import StepRunner
from .outputs import RunOutputs
from .parts import Position
from .phase import Phase
from .recovery import plan_recovery
from .rng import Generators
from .stop_condition import stop_condition
from .work import StateWork

__all__ = ["Run"]

_NEVER = "no state"  # advance() stops at no state, only at its count


class Run:
    """The moving parts of one run, and the loops that drive them.

    Args:
        target: What every hook, deferred action and ``when`` predicate receives (the trainer).
        phases: The phases of every epoch, in order.
        epochs: How many epochs to run; None: until ``max_steps``.
        max_steps: The run ends after this optimizer step (see ``StateWork``); None: no limit.
        sources: The phases' batch sources.
        step_runner: Runs backward and the optimizer step.
        generators: The run's generators.
        position: Where the run is; the work advances it.
        forward: ``forward(inputs, target)`` gives ``(output, loss)``.
        unpack: Turns a batch into ``(inputs, target)``.
        callbacks: The callbacks that run in this process, in order.
        stop_signals: The signals that preempt the run.
        deterministic: Deterministic algorithms while driving.
        outputs: The run's output folders.
        ranks: This process's place among the run's processes.
        evaluation: A one-off evaluation or prediction beside the training run (``statetrainer.evaluation``):
            only the callbacks' phase and batch hooks run (it is no epoch: nothing is checkpointed, scheduled
            or logged per epoch), and their ``on_exception``, not ``on_close``.
    """

    def __init__(
        self,
        target: Any,
        *,
        phases: Sequence[Phase],
        epochs: int | None,
        max_steps: int | None,
        sources: PhaseSources,
        step_runner: StepRunner,
        generators: Generators,
        position: Position,
        forward: Callable[[Any, Any], Any],
        unpack: Callable[[Any], tuple[Any, Any]],
        callbacks: Sequence[Callback],
        stop_signals: tuple[signal.Signals, ...],
        deterministic: bool,
        outputs: RunOutputs,
        ranks: Ranks,
        evaluation: bool = False,
    ) -> None:
        self.target, self.epochs, self.max_steps, self.position = target, epochs, max_steps, position
        self.outputs, self.deterministic, self.ranks, self.evaluation = outputs, deterministic, ranks, evaluation
        self.work = StateWork(phases, sources, step_runner, generators, position, forward, unpack, max_steps)
        self.savers = checkpoint_savers(callbacks)
        background = any(saver.background for saver in self.savers)
        vote = StopVote(ranks) if ranks.distributed and (stop_signals or background) else None
        enter, exit = hooks_by_state(callbacks)
        if evaluation:
            for hooks in (enter, exit):
                hooks["idle"], hooks["epoch"] = [], []
        if vote is not None:  # after every batch, the ranks share whether a stop signal came (or a write failed)
            exit["batch"].append(self._exchange_stop_vote)
        surround_hooks(enter, exit, callbacks)
        self.machine = TrainingMachine(target, prepare=self.work.prepare_calls(), enter=enter,
                                       work=self.work.work_calls(), exit=exit)  # fmt: skip
        self.guard = RunGuard(self.machine, position, callbacks, stop_signals, deterministic,
                              on_error=self.work.release, recover=lambda: plan_recovery(self.machine, self.work),
                              stop=self._stop_on_signal, outputs=outputs, speak=ranks.is_global_zero, vote=vote,
                              closes=not evaluation, max_steps=max_steps)  # fmt: skip
        self.deciders = Deciders(self.machine, self.work, epochs).by_state

    @property
    def total_steps(self) -> int | None:
        """The run's optimizer steps over all its epochs, up to ``max_steps``; None when they cannot be known (an
        epoch's steps are unknown, and the epochs may end before ``max_steps``)."""
        if self.epochs is None:
            return self.max_steps
        per_epoch = self.work.steps_per_epoch
        if per_epoch is None:
            return None
        whole = per_epoch * self.epochs
        return whole if self.max_steps is None else min(whole, self.max_steps)

    def fit(self) -> None:
        """Run to the end, or continue a stepped or resumed run to the end (a finished run warns and returns)."""
        deciders, machine, position, guard, target = self.deciders, self.machine, self.position, self.guard, self.target
        if position.finished and guard.error is None and machine.pending is None:
            self.outputs.open(target)  # a run killed as it finished still remakes its files
            self.guard.close(target)  # and closes them (once: a run that finished here has closed already)
            warnings.warn(f"the run has already finished ({position.end_reason(self.max_steps)}); fit() has nothing to do",
                          stacklevel=3)  # fmt: skip
            return
        with guard.driving(target):
            machine.finish_pending()  # a run saved mid-transition (after an error) first finishes it
            while not position.finished:
                deciders[machine.state]()
                if guard.deferred:
                    guard.run_deferred(target)

    def advance(self, count: int) -> None:
        """Make ``count`` transitions (fewer if the run ends first), with their callbacks and work."""
        with self.guard.driving(self.target):
            self._drive(_NEVER, None, limit=count)

    def run_until(self, state: str | None, **conditions: Any) -> None:
        """Advance until ``state`` is next entered where ``conditions`` hold (see ``stop_condition``).

        Raises:
            ValueError, TypeError: Conditions that can never hold (before anything runs).
            RuntimeError: The run ended first.
        """
        check = stop_condition(self.work, self.epochs, self.total_steps, self.target, state, **conditions)
        with self.guard.driving(self.target):
            stopped = self._drive(state, check)
        if not stopped:
            given = ", ".join(f"{name}={'the predicate' if name == 'when' else value!r}"
                              for name, value in conditions.items() if value is not None)  # fmt: skip
            where = f"entering {state!r}" if state is not None else "its conditions held"
            raise RuntimeError(f"the run finished before {where}" + (f" ({given})" if given else ""))

    def _drive(self, state: str | None, check: Callable[[], bool] | None, limit: int | None = None) -> bool:
        """Make transitions until one enters ``state`` (any, for None) where ``check()`` holds (True), or
        ``limit`` are made, or the run ends (False). Only a state comparison runs after each transition."""
        machine, deciders, guard, position, target = self.machine, self.deciders, self.guard, self.position, self.target
        if machine.pending is not None:  # a run saved mid-transition finishes that transition first
            machine.finish_pending()
        else:
            deciders[machine.state]()
        made = 1
        while True:
            if guard.deferred:
                guard.run_deferred(target)
            if (state is None or machine.state == state) and (check is None or check()):
                return True
            if made == limit or position.finished:
                return False
            deciders[machine.state]()
            made += 1

    def why_not_checkpoint_here(self) -> str | None:
        """Why the run cannot be resumed from here (a stream that cannot start again where it stands, or a phase
        that cannot be resumed mid-phase); None when it can."""
        if self.evaluation:
            return "an evaluation (validate() or predict()) is open; a checkpoint is taken after it"
        mid_phase = self.machine.state == "phase" and self.machine.pending is None
        return self.work.sources.why_not_resumable() or (self.work.why_not_resumable() if mid_phase else None)

    def _refusal(self) -> str | None:
        """``why_not_checkpoint_here()`` as a clause of a message, with what to do."""
        stream = self.work.sources.why_not_resumable()
        if stream is not None:
            return f"the run cannot be resumed from here: {stream}"
        why_not = self.why_not_checkpoint_here()
        if why_not is None:
            return None
        name = self.work.phase.name if self.work.phase is not None else None
        return f"phase {name!r} cannot be resumed mid-phase here ({why_not})"

    def check_at_rest(self, what: str) -> None:
        """Raise ``RuntimeError`` unless the run can be saved now (``what`` names the call, for the message).

        After an error, the run is first put at its recovery point (see ``statetrainer.recovery``).
        """
        guard, state = self.guard, self.machine.state
        if self.evaluation:
            raise RuntimeError(f"{what} was called during validate() or predict(); call it after the evaluation")
        if isinstance(guard.error, HalfLoadedError):
            raise RuntimeError(f"{what}: this trainer holds part of a checkpoint ({guard.error}); build a new Trainer")
        if guard.error is not None and guard.recovery is not None:
            guard.recovery.apply(self.machine, self.work, self.guard.speak)
            state = self.machine.state
        if guard.active and not guard.at_rest:
            raise RuntimeError(f"{what} was called from a callback, in the middle of a transition; "
                               "use trainer.defer(lambda trainer: ...) or the Checkpoint callback")  # fmt: skip
        if state not in AT_REST:
            raise RuntimeError(f"{what} needs the machine between batches (idle, epoch or phase), but it is in "
                               f"{state!r}; advance to the end of the batch first")  # fmt: skip
        refusal = self._refusal()
        if refusal is not None:
            remedy = "" if self.work.sources.why_not_resumable() else "; checkpoint it at an epoch boundary instead"
            raise RuntimeError(f"{what}: {refusal}{remedy}")

    def check_between_epochs(self, what: str) -> None:
        """Raise ``RuntimeError`` unless the run is between epochs or phases (or not started, or finished), not
        driving, and not stopped by an error: where a one-off evaluation may run beside it."""
        if self.guard.active:
            raise RuntimeError(f"{what} was called from a callback, while the trainer advances; call it between "
                               "fit(), advance() or run_until() calls")  # fmt: skip
        if self.guard.error is not None:
            raise RuntimeError(f"{what}: an earlier transition raised {self.guard.error!r}, so the model may be half "
                               "updated; load a checkpoint into a new Trainer")  # fmt: skip
        if self.machine.state not in ("idle", "epoch") or self.machine.pending is not None:
            raise RuntimeError(f"{what} runs between epochs or phases, but the run is in {self.machine.state!r}; "
                               "advance to the end of the phase first: trainer.run_until('epoch')")  # fmt: skip

    def loaded(self, error: HalfLoadedError | None = None) -> None:
        """A checkpoint was loaded into the run (``error``: only part of it): continue from where it stands."""
        if error is not None:
            self.guard.error = error  # neither driven nor saved again: build a new trainer
            return
        self.outputs.opened, self.outputs.resumed = False, True  # its files are remade when the run next opens them
        self.position.extend_to(self.epochs, self.max_steps)  # a finished run given more epochs or steps goes on
        self.work.resume_phase()
        if self.machine.state == "phase" and self.machine.pending is None:  # mid-phase: after the last batch done
            self.work.open_phase(start=self.position.batch_index + 1)
        else:  # the saved pass is done with (a phase cut by limit or max_steps): the next opens whole
            self.work.sources.drop_resume_points()

    def _exchange_stop_vote(self, target: Any) -> None:
        self.guard.exchange_stop_vote(target)

    def _stop_on_signal(self, target: Any, received: signal.Signals) -> None:
        """At the first batch boundary after a stop signal: save exactly here, then raise ``Preempted``."""
        position, state, phase = self.position, self.machine.state, self.work.phase
        epoch = position.epoch_for_people(state)
        if state == "phase" and phase is not None:  # counted from 1, for people
            where = f"epoch {epoch}, phase {phase.name!r}, after batch {position.batch_index + 1}"
        else:
            where = f"the end of epoch {epoch}" if epoch else "the start of the run"
        saved, refusal = None, self._refusal()
        if not self.savers:
            outcome = ("nothing was saved, because the trainer has no Checkpoint callback; "
                       "add statetrainer.callbacks.Checkpoint(folder) to resume from a stop")  # fmt: skip
        elif refusal is not None:
            outcome = (f"nothing was saved, because {refusal}; a restart resumes from the newest checkpoint in "
                       f"{self.savers[0].folder}")  # fmt: skip
        else:
            saved = self.savers[0].save(target)
            outcome = f"saved {saved}"
        message = f"stopped by {received.name} at {where} (step {position.global_step}): {outcome}"
        raise Preempted(received, saved, message)  # RunGuard.driving prints it, once the callbacks have cleaned up
