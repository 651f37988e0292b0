"""The trainer: the public API over the machine, its work and its deciders.

The machine (``machine.py``) knows the states, the transitions and the order of
the callbacks; ``work.py`` does each state's work; ``deciding.py`` picks each
next transition. ``fit()`` and ``advance()`` run the same deciders, so a
stepped run and a fitted run are the same run.
Everything that survives a restart is a part of ``trainer.parts``.
"""

from __future__ import annotations

import os
import signal
import warnings
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint
from .arguments import check_trainer_arguments, resolve_device
from .callbacks.base import Callback, hooks_by_state
from .callbacks.checkpoint import Checkpoint
from .data import PhaseSources, unpack_pair
from .deciding import Deciders
from .determinism import require_cublas_workspace
from .distributed import StopVote, join_process_group, on_every_rank, wrap_model
from .driving import RunGuard
from .machine import AT_REST, Move, TrainingMachine
from .optimizer_step import StepRunner
from .outputs import RunOutputs
from .parts import (
    CallbackStates,
    HalfLoadedError,
    Metrics,
    Position,
    PositionField,
    RunIdentity,
    RunSettings,
    StateRegistry,  # fmt: skip
    check_position_fits,
)
from .phase import Phase
from .preemption import DEFAULT_STOP_SIGNALS, resolve_signals
from .recovery import plan_recovery
from .rng import Generators
from .stop_condition import stop_condition
from .validation import check_count
from .version import __version__
from .work import StateWork

__all__ = ["Trainer", "unpack_pair"]

_NEVER = "no state"  # advance() stops at no state, only at its count


class Trainer:
    """Trains ``model`` by running a state machine over epochs, phases and batches.

    Args:
        model: The module to train; it is moved to ``device``.
        optimizer: Steps the model's parameters; None when no phase has ``grad=True``.
        loss_fn: ``loss_fn(output, target)`` gives the batch's scalar loss.
        phases: The phases of every epoch, run in order.
        callbacks: Observers of the machine's states; their names must be unique.
        epochs: How many epochs to run.
        device: Where the model and batches go; None picks CUDA when available.
        accumulate: Batches per step, which follows the window's mean gradient (a short last window's own).
        grad_clip: Clip the gradients' total 2-norm to this before each step.
        precision: None, ``"bf16"`` or ``"fp16"`` autocast (fp16 on CUDA adds a GradScaler).
        unpack: Turns a batch into ``(input, target)``; to change the model's call, override ``forward``.
        seed: Decides the order of shuffled DataLoaders and the random augmentation
            of every batch; None takes ``torch.initial_seed()``. A checkpoint carries it.
        deterministic: Deterministic algorithms while ``fit()``/``advance()`` run, so a CUDA run
            repeats bit for bit (sets ``CUBLAS_WORKSPACE_CONFIG`` before CUDA starts, or raises).
        stop_signals: Signals that preempt the run inside ``fit()``/``advance()``: the
            batch in flight finishes, the first ``Checkpoint`` callback saves there, and
            ``Preempted`` (a ``SystemExit``) is raised. ``()`` keeps Python's handlers.

    Under ``torchrun`` the same script trains on every rank (see ``statetrainer.distributed``):
    the model is wrapped in DDP, rebuilt DataLoaders are sharded, metrics are reduced over
    the ranks, rank 0 alone writes checkpoints and logs, and every rank's generators are saved.

    Attributes:
        epoch, batch_index, global_step: From the run's ``position``: epoch and batch in its phase from 0, steps taken.
        phase, batch, target, output, loss: The current ``Phase``, batch (on the device) and its results.
        loss_weight: How much this rank's ``loss`` weighs in its global batch's mean, times the world size:
            1.0 except in a short last global batch that the ranks share unevenly (see ``SeededOrder``).
        metrics: The latest value of every metric, by name (``train_loss``...).
        parts: The ``StateRegistry`` of everything a checkpoint holds.
        ranks: This process's ``Ranks`` (rank, world size) among the run's processes.
    """

    epoch, batch_index, global_step = PositionField(), PositionField(), PositionField()

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        phases: Sequence[Phase],
        *,
        callbacks: Iterable[Callback] = (),
        epochs: int = 1,
        device: str | torch.device | None = None,
        accumulate: int = 1,
        grad_clip: float | None = None,
        precision: str | None = None,
        unpack: Callable[[Any], tuple[Any, Any]] = unpack_pair,
        seed: int | None = None,
        deterministic: bool = False,
        stop_signals: Iterable[str | int | signal.Signals] | None = DEFAULT_STOP_SIGNALS,
    ) -> None:
        self.phases, self.callbacks = check_trainer_arguments(
            model, optimizer, loss_fn, phases, callbacks,
            epochs=epochs, accumulate=accumulate, grad_clip=grad_clip, deterministic=deterministic)  # fmt: skip
        self.stop_signals = resolve_signals(stop_signals)
        device = resolve_device(device)
        if deterministic and device.type == "cuda":
            require_cublas_workspace()  # before anything starts CUDA
        self.ranks, self.device = join_process_group(device)  # under torchrun: this rank's GPU
        self.model = wrap_model(model.to(self.device), self.ranks, self.device)
        self.optimizer, self.loss_fn = optimizer, loss_fn
        self.epochs, self.accumulate, self.unpack = epochs, accumulate, unpack
        ranks = self.ranks
        self.step_runner = StepRunner(self.model, optimizer, self.device, accumulate, grad_clip, precision, ranks)
        self.position, self.metrics = Position(), Metrics()
        self._generators = Generators.for_run(seed, self.device, ranks)
        self._generators.global_step = lambda: self.position.global_step
        self._sources = PhaseSources.for_phases(self.phases, self.stop_signals, self.position, ranks.rank,
                                                ranks.world_size)  # fmt: skip
        self._work = StateWork(self._sources, self.step_runner, self.device)
        self.phase: Phase | None = None
        self.batch = self.target = self.output = self.loss = None
        self.loss_weight = 1.0
        speaking = [callback for callback in self.callbacks if ranks.is_global_zero or not callback.rank_zero_only]
        self.run = RunIdentity.for_run(self._sources.global_layout(), self.model, optimizer, self._generators)
        self._outputs = RunOutputs(speaking, self.run, ranks, self.device)
        self._guard = RunGuard(speaking, self.stop_signals, deterministic, on_error=self._work.release,
                               recover=lambda: plan_recovery(self, self._machine, self._work),
                               vote=StopVote(ranks) if ranks.distributed and self.stop_signals else None,
                               outputs=self._outputs)  # fmt: skip
        enter, exit = hooks_by_state(speaking)
        if self._guard.vote is not None:  # after every batch, the ranks share whether a stop signal came
            exit["batch"].append(self._guard.exchange_stop_vote)
        self._machine = TrainingMachine(self, prepare=self._work.prepare_calls(), enter=enter,
                                        work=self._work.work_calls(), exit=exit)  # fmt: skip
        self._deciders = Deciders(self, self._machine, self._work).by_state
        self.parts = StateRegistry(  # loaded in this order: the generators last, as they were saved
            run=self.run, position=self.position, machine=self._machine, data=self._sources,
            settings=RunSettings.for_run(self.phases, accumulate, precision, ranks.world_size), step=self.step_runner,
            metrics=self.metrics, callbacks=CallbackStates(self.callbacks, self.device, speaking, ranks),
            rng=self._generators)  # fmt: skip
        self.parts.add_check(partial(check_position_fits, epochs))

    # ------------------------------------------------------------------ public API

    @property
    def state(self) -> str:
        """The machine's current state: idle, epoch, phase, batch, backward or step."""
        return self._machine.state

    @property
    def history(self) -> list[Move]:
        """The most recent transitions, newest last."""
        return list(self._machine.history)

    @property
    def seed(self) -> int:
        """The run's seed (a resumed run's is the checkpoint's)."""
        return self._generators.seed

    @property
    def phase_batches(self) -> int | None:
        """The current phase's batches per epoch in this process (its share under torchrun); None: unknown."""
        if self.phase is None:
            return None
        return self.phase.batches(self._sources[self.position.phase_index].length)

    @property
    def is_global_zero(self) -> bool:
        """Whether this process is rank 0: the one that writes checkpoints and logs (True in one process)."""
        return self.ranks.is_global_zero

    @property
    def world_size(self) -> int:
        """How many processes train together (1 unless launched by torchrun)."""
        return self.ranks.world_size

    @property
    def finished(self) -> bool:
        """Whether the run has ended (all epochs done, or stopped)."""
        return self.position.finished

    def diagram(self, format: str = "mermaid") -> str:
        """The state diagram drawn by ``transitions`` from the table the machine runs, the current state
        highlighted: Mermaid source, or ``"dot"`` (Graphviz, with the ``diagram`` extra)."""
        return self._machine.diagram(format)

    def fit(self) -> Trainer:
        """Run to the end, or continue a stepped or resumed run to the end (a finished run warns and returns)."""
        if self.position.finished and self._guard.error is None and self._machine.pending is None:
            self._outputs.open(self)  # a run killed as it finished still remakes its files
            warnings.warn(
                f"the run has already finished ({self.position.end_reason()}); fit() has nothing to do", stacklevel=2
            )
            return self
        deciders, machine, position, guard = self._deciders, self._machine, self.position, self._guard
        with guard.driving(self):
            machine.finish_pending()  # a run saved mid-transition (after an error) first finishes it
            while not position.finished:
                deciders[machine.state]()
                if guard.deferred:
                    guard.run_deferred(self)
        return self

    def advance(self, n: int = 1) -> str:
        """Make ``n`` transitions (fewer if the run ends first), with their callbacks and work; return the new state."""
        check_count("advance: n", n)
        with self._guard.driving(self):
            self._drive(_NEVER, None, limit=n)
        return self._machine.state

    def run_until(self, state: str | None = None, *, epoch: int | None = None, phase: str | None = None,
                  batch: int | None = None, step: int | None = None, when: Callable[[Trainer], bool] | None = None,
                  ) -> str:  # fmt: skip
        """Advance until ``state`` is next entered where every given condition holds; return the state.

        ``epoch``, ``phase``, ``batch`` and ``step`` are what ``trainer.epoch``, ``trainer.phase.name``,
        ``trainer.batch_index`` and ``trainer.global_step`` must be there, read once the transition and its
        work are done; ``when`` is any predicate of the trainer. Without a state it stops after the first
        transition where the conditions hold, for example
        ``run_until(when=lambda trainer: not trainer.loss.isfinite())``.

        Raises:
            ValueError: No such state or phase, or a condition this run can never meet (checked first).
            RuntimeError: The run ended before the stop.
        """
        check = stop_condition(self, state, epoch=epoch, phase=phase, batch=batch, step=step, when=when)
        with self._guard.driving(self):
            stopped = self._drive(state, check)
        if not stopped:
            given = {"epoch": epoch, "phase": phase, "batch": batch, "step": step, "when": when and "the predicate"}
            conditions = ", ".join(f"{name}={value!r}" for name, value in given.items() if value is not None)
            target = f"entering {state!r}" if state is not None else "its conditions held"
            raise RuntimeError(f"the run finished before {target}" + (f" ({conditions})" if conditions else ""))
        return self._machine.state

    def _drive(self, state: str | None, check: Callable[[], bool] | None, limit: int | None = None) -> bool:
        """Make transitions until one enters ``state`` (any, for None) where ``check()`` holds (True), or
        ``limit`` are made, or the run ends (False). Only a state comparison runs after each transition."""
        machine, deciders, guard, position = self._machine, self._deciders, self._guard, self.position
        if machine.pending is not None:  # a run saved mid-transition finishes that transition first
            machine.finish_pending()
        else:
            deciders[machine.state]()
        made = 1
        while True:
            if guard.deferred:
                guard.run_deferred(self)
            if (state is None or machine.state == state) and (check is None or check()):
                return True
            if made == limit or position.finished:
                return False
            deciders[machine.state]()
            made += 1

    def defer(self, action: Callable[[Trainer], None]) -> None:
        """Run ``action(trainer)`` as soon as the machine is between batches (as a checkpoint save needs)."""
        self._guard.deferred.append(action)

    def stop(self) -> None:
        """Ask for a clean stop: the batch ends, then the phase, epoch and run; an unstepped window is dropped."""
        self.position.stop_requested = True

    def forward(self, inputs: Any, target: Any) -> tuple[Any, torch.Tensor]:
        """Run the model and the loss on one batch; override for other signatures."""
        output = self.model(inputs)
        return output, self.loss_fn(output, target)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Every part's state, taken between batches; ``load_state_dict`` on a fresh, same trainer continues here.

        Under torchrun every rank must call it at the same point: it gathers every rank's generators, window
        gradients and metric accumulators."""
        self._guard.check_at_rest(self, "state_dict()")
        return self.parts.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()``'s result, in a trainer not started; ``CheckpointError`` loads nothing."""
        if self.state != "idle" or self.position != Position():
            raise RuntimeError("load a checkpoint into a trainer that has not started: build a new Trainer")
        try:
            self.parts.load_state_dict(state)
        except HalfLoadedError as error:
            self._guard.error = error  # neither driven nor saved again: build a new trainer
            raise
        self._outputs.opened, self._outputs.resumed = False, True  # its files are remade when the run next opens them
        self.position.extend_to(self.epochs)  # a finished run given more epochs goes on to train them
        self.phase = self.phases[self.position.phase_index] if self.position.phase_index >= 0 else None
        if self.state == "phase" and self._machine.pending is None:  # mid-phase: reopen after the last batch done
            self._work.open_phase(self, start=self.position.batch_index + 1)

    def save_checkpoint(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write ``state_dict()`` atomically to a ``.safetensors`` file, or as the next checkpoint of a folder
        (default ``checkpoints/``); return the file. ``ValueError`` for another kind of file (``model.pt``);
        ``CheckpointError`` for a folder of another run, or a file there that is not this run's checkpoint.

        Under torchrun every rank calls it: rank 0 writes the one file, and every rank returns once it is written.
        """
        self._guard.check_at_rest(self, "save_checkpoint()")
        ranks, epoch, folder = self.ranks, self.position.epoch_for_people(self.state), checkpoint.save_folder(path)
        with on_every_rank(ranks, self.device, "claim the checkpoint folder"):
            if ranks.is_global_zero and folder.suffix != ".safetensors":
                self._outputs.claim(folder, ["ckpt-*.safetensors"])
            elif ranks.is_global_zero:
                checkpoint.refuse_overwrite(folder, self.run.id)
            target = checkpoint.save_target(path, epoch, self.global_step)
        state = self.state_dict()  # every rank's generators, window gradients and metric accumulators, gathered
        with on_every_rank(ranks, self.device, f"write the checkpoint {target}"):  # all wait for rank 0's write
            if ranks.is_global_zero:
                checkpoint.write_tree(target, state, __version__)
        return target

    def load_checkpoint(self, path: str | os.PathLike[str], *, allow_changes: Iterable[str] = ()) -> Path | None:
        """Continue from a checkpoint file, or the newest good one in a folder (falling back past a corrupt one).

        Returns the file, or None for a folder with no checkpoint yet or a ``Checkpoint`` callback's folder not
        made yet (a first run): ``trainer.load_checkpoint(folder); trainer.fit()`` is the auto-resume recipe.
        ``allow_changes`` names settings that may differ from the checkpoint's (see ``RunSettings``). Raises
        ``CheckpointError`` for a file that is unusable or does not fit, and for a missing path (a typo).
        """
        self.parts["settings"].allowed = frozenset(allow_changes)
        folders = [callback.folder for callback in self.callbacks if isinstance(callback, Checkpoint)]
        self._outputs.lock()  # a second live copy of the run is refused before it reads anything
        with on_every_rank(self.ranks, self.device, f"load the checkpoint from {path}"):  # all load it, or none
            found = checkpoint.find_checkpoint(path, folders, self.parts.check_fits, self.run.accept_marker)
        if found is None:
            return None
        self.load_state_dict(found[1])
        return found[0]

    def can_checkpoint_here(self) -> bool:
        """Whether the run can be saved and resumed at this point (between batches, in a phase that resumes)."""
        return self.state in AT_REST and self.why_not_checkpoint_here() is None

    def why_not_checkpoint_here(self) -> str | None:
        """Why the run cannot be resumed from here, inside its current phase; None when it can."""
        mid_phase = self.state == "phase" and self._machine.pending is None
        return self._work.why_not_resumable(self.position.phase_index) if mid_phase else None

    def __repr__(self) -> str:
        loss, phase = None if self.loss is None else float(self.loss.detach()), self.phase and self.phase.name
        return (f"Trainer(state={self.state!r}, epoch={self.epoch}, phase={phase!r}, batch_index={self.batch_index}, "
                f"global_step={self.global_step}, loss={'None' if loss is None else f'{loss:.4g}'})")  # fmt: skip
