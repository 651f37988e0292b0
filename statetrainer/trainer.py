"""The trainer: the public API, a facade over the run core (``run.py``) and the run's parts.

The trainer checks its arguments, builds the run's parts (all that survives a restart, ``trainer.parts``)
and its ``Run``, and reads them; the ``Run`` alone advances the machine. Checkpoints are saved and loaded here.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .arguments import check_trainer_arguments, resolve_device
from .callbacks.base import Callback, checkpoint_savers
from .checkpointer import Checkpointer
from .data import PhaseSources, unpack_pair
from .determinism import require_cublas_workspace
from .distributed import join_process_group, sharded_precision, sharding_mesh, wrap_model
from .errors import CheckpointError, HalfLoadedError
from .evaluation import Evaluation, prediction, validation
from .machine import AT_REST, Move
from .optimizer_step import StepRunner
from .outputs import RunOutputs
from .parts import (
    CallbackStates,
    Metrics,
    Position,
    RunIdentity,
    RunSettings,
    Shown,
    StateRegistry,
    check_position_fits,  # fmt: skip
)
from .phase import Phase
from .points import RunPoint
from .preemption import DEFAULT_STOP_SIGNALS, resolve_signals
from .rng import Generators
from .run import Run
from .timing import CheckpointTime
from .validation import check_count

__all__ = ["Trainer", "unpack_pair"]


class Trainer:
    """Trains ``model`` by running a state machine over epochs, phases and batches.

    Args:
        model: The module to train; it is moved to ``device``.
        optimizer: Steps the model's parameters; None when no phase has ``grad=True``.
        loss_fn: ``loss_fn(output, target)`` gives the batch's scalar loss.
        phases: The phases of every epoch, run in order.
        callbacks: Observers of the machine's states; their names must be unique.
        epochs: How many epochs to run; None: one, or with ``max_steps`` as many as it takes.
        max_steps: End the run after this optimizer step: the training phase ends there, the epoch's
            remaining evaluation phases run on the final weights, and the run finishes. None: no limit.
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
        compile: Compile the model in place with ``torch.compile`` (``nn.Module.compile()``; a dict: its
            options), so checkpoints keep the bare model's keys and load into compiled and eager trainers alike.

    Under ``torchrun`` the same script trains on every rank (see ``statetrainer.distributed``):
    the model is wrapped in DDP, rebuilt DataLoaders are sharded, metrics are reduced over
    the ranks, rank 0 alone writes checkpoints and logs, and every rank's generators are saved.

    Attributes:
        epoch, batch_index, global_step: From the run's ``position``: epoch and batch in its phase from 0, steps taken.
        finished: Whether the run has ended (all epochs done, or stopped).
        phase, batch, target, output, loss: The current ``Phase``, batch (on the device) and its results.
        loss_weight: How much this rank's ``loss`` weighs in its global batch's mean, times the world size:
            1.0 except in a short last global batch that the ranks share unevenly (see ``SeededOrder``).
        metrics: The latest value of every metric, by name (``train_loss``...).
        parts: The ``StateRegistry`` of everything a checkpoint holds.
        ranks: This process's ``Ranks`` (rank, world size) among the run's processes.
        is_global_zero, world_size: Whether this process is rank 0, the one that writes checkpoints and logs
            (True in one process), and how many processes train together (1 unless launched by torchrun).
        seed: The run's seed (a resumed run's is the checkpoint's).
        phase_batches: The current phase's batches per epoch in this process (its share under torchrun).
        batch_samples: The dataset indices of the current batch in this process: a rebuilt DataLoader's (with a
            ``DistributedSampler`` too; this rank's share under torchrun), or for a list of batches the batch's
            place in it; None before a phase's first batch and for a loader the trainer uses as it is.
        steps_per_epoch, total_steps: The optimizer steps of an epoch and of the whole run, counting ``limit``,
            ``batches``, ``accumulate``, ``max_steps`` and the world size (every rank takes as many); None when
            they cannot be known (a training phase's length is unknown).
    """

    epoch, batch_index, global_step, finished = (Shown("position") for _ in range(4))
    phase, batch, target, output, loss, loss_weight, unpack = (Shown("_work") for _ in range(7))
    phase_batches, batch_samples = Shown("_work"), Shown("_work")
    steps_per_epoch = Shown("_training.work")  # the training run's, in an evaluation too
    is_global_zero, world_size, seed, total_steps = (
        Shown("ranks"),
        Shown("ranks"),
        Shown("_generators"),
        Shown("_training"),
    )

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                 loss_fn: Callable[[Any, Any], torch.Tensor], phases: Sequence[Phase], *,
                 callbacks: Iterable[Callback] = (), epochs: int | None = None, max_steps: int | None = None,
                 device: str | torch.device | None = None,
                 accumulate: int = 1, grad_clip: float | None = None, precision: str | None = None,
                 unpack: Callable[[Any], tuple[Any, Any]] = unpack_pair, seed: int | None = None,
                 deterministic: bool = False,
                 stop_signals: Iterable[str | int | signal.Signals] | None = DEFAULT_STOP_SIGNALS,
                 compile: bool | dict[str, Any] = False) -> None:  # fmt: skip
        epochs = 1 if epochs is None and max_steps is None else epochs
        self.phases, self.callbacks = check_trainer_arguments(
            model, optimizer, loss_fn, phases, callbacks,
            epochs=epochs, max_steps=max_steps, accumulate=accumulate, grad_clip=grad_clip,
            deterministic=deterministic, compile=compile)  # fmt: skip
        self.stop_signals = resolve_signals(stop_signals)
        device = resolve_device(device)
        if deterministic and device.type == "cuda":
            require_cublas_workspace()  # before anything starts CUDA
        self.ranks, self.device = ranks, _ = join_process_group(device)  # under torchrun: this rank's GPU
        if compile is not False:  # in place: the module's keys stay its own
            model.compile(**({} if compile is True else compile))
        self.model = wrap_model(model.to(self.device), ranks, self.device)
        self.optimizer, self.loss_fn, self.epochs, self.max_steps = optimizer, loss_fn, epochs, max_steps
        self.accumulate = accumulate
        self.step_runner = StepRunner(self.model, optimizer, self.device, accumulate, grad_clip, precision, ranks)
        position, self.metrics = Position(), Metrics()
        self._generators = Generators.for_run(seed, self.device, ranks, global_step=lambda: position.global_step)
        sources = PhaseSources.for_phases(self.phases, self.stop_signals, position, ranks.rank, ranks.world_size)
        speaking = [callback for callback in self.callbacks if ranks.is_global_zero or not callback.rank_zero_only]
        self.run = RunIdentity.for_run(sources.global_layout(), self.model, optimizer, self._generators)
        self._settings = RunSettings.for_run(self.phases, accumulate, precision, ranks.world_size,
                                             sharded_precision(self.model))  # fmt: skip
        self._core = Run(self, phases=self.phases, epochs=epochs, max_steps=max_steps, sources=sources,
                         step_runner=self.step_runner, generators=self._generators, position=position,
                         forward=self.forward, unpack=unpack,
                         callbacks=speaking, stop_signals=self.stop_signals, deterministic=deterministic,
                         outputs=RunOutputs(speaking, self.run, ranks, self.device), ranks=ranks)  # fmt: skip
        self.parts = StateRegistry(  # loaded in this order: the generators last, as they were saved
            run=self.run, position=position, machine=self._core.machine, data=sources, settings=self._settings,
            step=self.step_runner, metrics=self.metrics,
            callbacks=CallbackStates(self.callbacks, self.device, speaking, ranks), rng=self._generators)  # fmt: skip
        self.parts.add_check(partial(check_position_fits, epochs, max_steps=max_steps))
        self._work, self._training, self._speaking = self._core.work, self._core, speaking
        self._checkpointer = Checkpointer(self.parts, self.run, self._core.outputs, ranks, self.device,
                                          failed=self._raise_write_failure_at_the_next_boundary,
                                          mesh=sharding_mesh(self.model))  # fmt: skip
        self._core.guard.settle_writes = (
            self._checkpointer.finish_writes
        )  # a finished run's last write, before on_close

    @property
    def state(self) -> str:
        """The machine's current state: idle, epoch, phase, batch, backward or step."""
        return self._core.machine.state

    @property
    def position(self) -> Position:
        """Where the run is: epoch, phase, batch and steps taken."""
        return self._core.position

    @property
    def run_id(self) -> str:
        """The run's id: its checkpoints and folders carry it, and a resumed run takes its checkpoint's."""
        return self.run.id

    @property
    def checkpoint_time(self) -> CheckpointTime:
        """The seconds this process has been blocked saving and loading checkpoints (``saving``, ``loading``)."""
        return self._checkpointer.time

    @property
    def history(self) -> list[Move]:
        """The most recent transitions, newest last."""
        return list(self._core.machine.history)

    def diagram(self, format: str = "mermaid") -> str:
        """The state diagram of the table the machine runs, current state highlighted: Mermaid, or ``"dot"``."""
        return self._core.machine.diagram(format)

    def fit(self) -> Trainer:
        """Run to the end, or continue a stepped or resumed run to the end (a finished run warns and returns);
        a background checkpoint write in flight is waited for."""
        with self._checkpointer.writes_settled():
            self._core.fit()
        return self

    def advance(self, n: int = 1) -> str:
        """Make ``n`` transitions (fewer if the run ends first), with their callbacks and work; return the new state."""
        check_count("advance: n", n)
        self._core.advance(n)
        return self.state

    def run_until(self, state: str | None = None, *, epoch: int | None = None, phase: str | None = None,
                  batch: int | None = None, step: int | None = None,
                  when: Callable[[Trainer], bool] | None = None) -> str:  # fmt: skip
        """Advance until ``state`` is next entered where every given condition holds; return the state.

        ``epoch``, ``phase``, ``batch`` and ``step`` are what ``trainer.epoch``, ``trainer.phase.name``,
        ``trainer.batch_index`` and ``trainer.global_step`` must be there, once the transition and its work are
        done; ``when`` is any predicate of the trainer. Without a state it stops after the first transition where
        the conditions hold: ``run_until(when=lambda trainer: not trainer.loss.isfinite())``.

        Raises:
            ValueError: No such state or phase, or a condition this run can never meet (checked first).
            RuntimeError: The run ended before the stop.
        """
        self._core.run_until(state, epoch=epoch, phase=phase, batch=batch, step=step, when=when)
        return self.state

    def validate(self, phase: str | None = None) -> dict[str, Any]:
        """Run the evaluation phases (or ``phase``) once, between epochs, and return their metrics: no epoch is
        counted, the position is unchanged (see ``statetrainer.evaluation``; ``validation()`` steps through it)."""
        return self.validation(phase).run()

    def predict(self, loader: Iterable[Any], *, inputs: Callable[[Any], Any] | None = None,
                callbacks: Iterable[Callback] = ()) -> list[Any] | None:  # fmt: skip
        """The model's output for every batch of ``loader``, in order (``inputs(batch)`` is the model's input; the
        batch as it is by default); only ``callbacks`` run. Under torchrun rank 0 gets them all, the others None."""
        return self.prediction(loader, inputs=inputs, callbacks=callbacks).run()

    def validation(self, phase: str | None = None) -> Evaluation:
        """``validate()``'s run, to step: ``with trainer.validation() as run: run.run_until("batch", batch=2)``."""
        return validation(self._training, self, phase, self._speaking, self.metrics, self.forward, self._show)

    def prediction(self, loader: Iterable[Any], *, inputs: Callable[[Any], Any] | None = None,
                   callbacks: Iterable[Callback] = ()) -> Evaluation:  # fmt: skip
        """``predict()``'s run, to step through as ``validation()``'s."""
        return prediction(self._training, self, loader, inputs, list(callbacks), self.metrics, self._show)

    def _show(self, run: Run | None) -> None:
        """Show ``run`` (an evaluation) in the trainer's attributes, or the training run again (None)."""
        if run is not None and self._core is not self._training:
            raise RuntimeError("an evaluation is open already: end its with block before starting another")
        self._core = run or self._training
        self._work = self._core.work

    def defer(self, action: Callable[[Trainer], None]) -> None:
        """Run ``action(trainer)`` as soon as the machine is between batches (as a checkpoint save needs)."""
        self._core.guard.deferred.append(action)

    def stop(self) -> None:
        """Ask for a clean stop: the batch ends, then the phase, epoch and run; an unstepped window is dropped."""
        self._core.position.stop_requested = True

    def forward(self, inputs: Any, target: Any) -> tuple[Any, torch.Tensor]:
        """Run the model and the loss on one batch; override for other signatures."""
        output = self.model(inputs)
        return output, self.loss_fn(output, target)

    def state_dict(self) -> dict[str, Any]:
        """Every part's state, taken between batches; ``load_state_dict`` on a fresh, same trainer continues here.
        Under torchrun every rank calls it at the same point: it gathers the ranks' generators, gradients, metrics."""
        self._core.check_at_rest("state_dict()")
        return self.parts.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()``'s result, in a trainer not started; ``CheckpointError`` loads nothing."""
        if self._core is not self._training:
            raise RuntimeError(
                "load_state_dict() was called inside validate() or predict(): leave the evaluation first"
            )
        if self.state != "idle" or self.position != Position():
            raise RuntimeError("load a checkpoint into a trainer that has not started: build a new Trainer")
        try:
            self.parts.load_state_dict(state)
        except HalfLoadedError as error:
            self._core.loaded(error)
            raise
        self._core.loaded()

    def save_checkpoint(self, path: str | os.PathLike[str] | None = None, *, background: bool = False,
                        when_busy: str = "wait", on_written: Callable[[Path], None] | None = None) -> Path | None:  # fmt: skip
        """Write ``state_dict()`` atomically to a ``.safetensors`` file, or as the next checkpoint of a folder
        (default ``checkpoints/``); return the file. ``ValueError`` for another kind of file (``model.pt``);
        ``CheckpointError`` for a folder of another run, or a file there that is not this run's checkpoint.

        With ``background``, it returns (the file it will write) once the state is copied aside, and a worker
        thread writes the bytes a save here writes while training goes on; a failed write raises at the next batch
        boundary, or in ``wait_for_checkpoints()``; ``fit()`` waits for it at its end. A save while a background
        write is in flight waits for it, or with ``when_busy="skip"`` is skipped and returns None.
        ``on_written(file)`` runs once the file is durable, in the process that wrote it (in the writer's thread
        for a background save). Under torchrun every rank calls it: rank 0 writes the one file, and every rank
        returns once it is written (staged, for a background save).
        """
        if when_busy not in ("wait", "skip"):
            raise ValueError(f"save_checkpoint: when_busy is 'wait' or 'skip', not {when_busy!r}")
        self._core.check_at_rest("save_checkpoint()")
        epoch = self.position.epoch_for_people(self.state)
        return self._checkpointer.save(path, epoch, self.global_step, self.state_dict, background, when_busy,
                                       on_written)  # fmt: skip

    def wait_for_checkpoints(self) -> None:
        """Block until the background checkpoint write in flight is on disk; raise its failure (under torchrun,
        every rank calls it, and every rank raises)."""
        self._checkpointer.wait()

    def _raise_write_failure_at_the_next_boundary(self) -> None:  # called from the writer's thread
        self._training.guard.fail_at_next_boundary(lambda _trainer: self._checkpointer.writer.wait())

    def load_checkpoint(self, path: str | os.PathLike[str], *, allow_changes: Iterable[str] = (),
                        before_step: int | None = None) -> Path | None:  # fmt: skip
        """Continue from a checkpoint file, or the newest good one in a folder (falling back past a corrupt one).

        Returns the file, or None for a folder with no checkpoint yet or a ``Checkpoint`` callback's folder not
        made yet (a first run): ``trainer.load_checkpoint(folder); trainer.fit()`` is the auto-resume recipe.
        ``allow_changes`` names settings that may differ from the checkpoint's (see ``RunSettings``);
        ``before_step`` takes the newest checkpoint saved before that optimizer step. Raises ``CheckpointError``
        for a file that is unusable or does not fit, or saved at ``before_step`` or later, and for a missing path.
        """
        point = None if before_step is None else RunPoint.of([], step=before_step)
        return self._load(path, allow_changes, point)

    def _load(self, path: str | os.PathLike[str], allow_changes: Iterable[str], before: RunPoint | None) -> Path | None:
        self._settings.allow(allow_changes)
        savers = [saver.folder for saver in checkpoint_savers(self.callbacks)]
        with self._checkpointer.time.loading.measuring():
            found = self._checkpointer.find(path, savers, None if before is None else before.saved_before)
            if found is None:
                return None
            if before is not None and not before.saved_before(found[1]["position"]):
                raise CheckpointError(f"{found[0]} was saved at or after {before}, not before it")
            self.load_state_dict(found[1])
        return found[0]

    def travel_to(self, path: str | os.PathLike[str], *, step: int | None = None, epoch: int | None = None,
                  phase: str | None = None, batch: int | None = None) -> Path | None:  # fmt: skip
        """Go back to a point of the run whose checkpoints are in ``path``, as the run was there: optimizer step
        ``step`` just taken, or the forward of batch ``batch`` of ``phase`` in ``epoch`` just run (counted from 0).
        It loads the newest good checkpoint saved before the point (none: it starts from the beginning), then
        ``run_until`` stops there: weights, optimizer, ``loss`` and ``output`` are the run's own, bit for bit.
        Build the trainer as the run was, without the callbacks that write files or log to a tracker (a replay never
        writes into the run's records). Returns the checkpoint it started from (None: none).

        Raises:
            ValueError: Not one point, a point the run never reaches, or a callback that writes files.
        """
        writers = [callback.key for callback in self.callbacks if callback.writes_records()]
        if writers:
            raise ValueError(f"travel_to replays the run, and these callbacks would write into its folders or "
                             f"trackers: "
                             f"{', '.join(writers)}; build the trainer without them")  # fmt: skip
        point = RunPoint.of([each.name for each in self.phases], step, epoch, phase, batch)
        if point.step is not None and self.total_steps is not None and point.step > self.total_steps:
            raise ValueError(f"step={point.step}: the run takes {self.total_steps} steps")
        started = self._load(path, (), point)
        self.run_until(**point.stop())
        return started

    def can_checkpoint_here(self) -> bool:
        """Whether the run can be saved and resumed at this point (between batches, in a phase that resumes)."""
        return self.state in AT_REST and self._core.why_not_checkpoint_here() is None

    def why_not_checkpoint_here(self) -> str | None:
        """Why the run cannot be resumed from here (in its phase, or its stream); None when it can."""
        return self._core.why_not_checkpoint_here()

    def __repr__(self) -> str:
        loss, phase = None if self.loss is None else float(self.loss.detach()), self.phase and self.phase.name
        return (f"Trainer(state={self.state!r}, epoch={self.epoch}, phase={phase!r}, batch_index={self.batch_index}, "
                f"global_step={self.global_step}, loss={'None' if loss is None else f'{loss:.4g}'})")  # fmt: skip
