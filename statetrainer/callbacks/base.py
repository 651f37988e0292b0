"""The callback protocol: a hook per state entry and exit, plus a state_dict."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from torch import nn

from ..distributed import Ranks
from ..machine import STATES
from ..phase import Phase
from ..timing import CheckpointTime

__all__ = [
    "HOOK_NAMES",
    "Callback",
    "CheckpointSaver",
    "TrainerView",
    "checkpoint_savers",
    "hooks_by_state",
    "overridden_hooks",
    "surround_hooks",
]

Call = Callable[[Any], None]

HOOK_NAMES: tuple[str, ...] = tuple(f"on_{kind}_{state}" for state in STATES for kind in ("enter", "exit"))


class TrainerView(Protocol):
    """What a callback may read and call on the trainer it observes.

    Callbacks may also change ``model``'s and ``optimizer``'s settings (a
    scheduler sets learning rates) and write ``metrics``; they never drive the
    machine (``fit``, ``advance``). Where the run stands is ``state``, ``epoch``, ``batch_index``,
    ``global_step`` and ``phase``; the current batch and its results are ``batch`` (its dataset indices ``batch_samples``), ``target``, ``output``,
    ``loss`` and ``loss_weight``; this process's place among the ranks is ``ranks``.
    """

    @property
    def state(self) -> str: ...
    @property
    def epoch(self) -> int: ...
    @property
    def batch_index(self) -> int: ...
    @property
    def global_step(self) -> int: ...

    phase: Phase | None
    phases: Sequence[Phase]
    callbacks: Sequence[Callback]
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    device: torch.device
    batch: Any
    target: Any
    output: Any
    loss: torch.Tensor | None
    loss_weight: float

    @property
    def metrics(self) -> dict[str, Any]: ...

    ranks: Ranks

    @property
    def phase_batches(self) -> int | None: ...
    @property
    def batch_samples(self) -> list[int] | None: ...
    @property
    def total_steps(self) -> int | None: ...
    @property
    def checkpoint_time(self) -> CheckpointTime: ...
    @property
    def run_id(self) -> str: ...
    @property
    def finished(self) -> bool: ...

    def stop(self) -> None: ...
    def defer(self, action: Callable[[Any], None]) -> None: ...
    def why_not_checkpoint_here(self) -> str | None: ...
    def save_checkpoint(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        background: bool = False,
        when_busy: str = "wait",
        on_written: Callable[[Path], None] | None = None,
    ) -> Path | None: ...
    def wait_for_checkpoints(self) -> None: ...


class Callback:
    """Base class for everything that reacts to the training machine.

    Override any of ``on_enter_<state>`` / ``on_exit_<state>`` for the states
    ``idle, epoch, phase, batch, backward, step``; each receives the trainer.
    ``on_exception`` runs when driving the machine ends with an error. Hooks
    you do not override are never called, so they cost nothing.

    A callback whose state must survive a restart returns it from
    ``state_dict`` (tensors, numbers, strings, lists and dicts of them) and takes
    it back in ``load_state_dict``. It is stored under ``name``, which must be
    unique among a trainer's callbacks: the class name unless you set one.
    ``load_state_dict`` receives the same structure with every tensor already
    on ``trainer.device`` (the run's device, whichever device wrote the
    checkpoint) and owned by the callback, so it can keep them as they are.

    Hooks receive the trainer as a ``TrainerView``: what a callback may read
    and call. A callback never drives the machine (``advance``, ``fit``).

    Under torchrun every rank runs every callback, except those whose
    ``rank_zero_only`` is True (loggers, progress bars, plots): they run on
    rank 0 alone, and only rank 0 saves and loads their state. A callback
    whose state differs between the ranks (a metric's accumulators) sets
    ``state_per_rank``: a checkpoint holds every rank's state (gathered as
    tensors: the same structure and shapes on every rank), each rank loads its
    own, and ``regroup_states`` maps the states of one number of ranks to another's.

    ``validate()`` and ``predict()`` run the phase and batch hooks of every
    callback that writes no files and whose ``runs_in_evaluation`` is True,
    and put its state back afterwards; one that judges training epochs
    (``EarlyStopping``) sets it False.
    """

    name: str | None = None
    runs_in_evaluation: bool = True
    rank_zero_only: bool = False
    state_per_rank: bool = False
    saves_checkpoints: bool = False  # True: a CheckpointSaver, through which a stop signal saves
    times_hooks: bool = False  # True: its surrounding_calls run before and after every other hook (GoodputLedger)
    swaps_weights: bool = False  # True: evaluation phases run on weights it puts into the model (EMA): one may

    @classmethod
    def regroup_states(cls, states: list[dict[str, Any]], world_size: int) -> list[dict[str, Any]]:
        """The states of ``world_size`` ranks continuing a run saved with ``states`` (one per rank) on another
        number of ranks; by default rank ``r`` takes the state of saved rank ``r`` modulo their number."""
        return [states[rank % len(states)] for rank in range(world_size)]

    @property
    def key(self) -> str:
        """The unique name this callback's state is stored under."""
        return self.name or type(self).__name__

    def active_hooks(self) -> dict[str, Callable[[Any], None]]:
        """The hooks this callback listens to, by hook name: those its class overrides.

        Read once, when the trainer is built; a callback that chooses its hooks
        per instance (``Breakpoint``) returns its own.
        """
        return overridden_hooks(self)

    def surrounding_calls(self, side: str, state: str, hooked: bool) -> tuple[Call | None, Call | None]:
        """For a callback that ``times_hooks``: the calls to run first and last on ``side`` (``"enter"`` or
        ``"exit"``) of ``state``, around every other callback's hooks there (``hooked``: there are some; on entry
        the state's work runs after the last). None for no call. Read once, when the trainer is built."""
        return None, None

    def state_dict(self) -> dict[str, Any]:
        """What this callback needs to continue exactly after a restart."""
        return {}

    def check_fits(self, state: dict[str, Any]) -> None:
        """Raise unless ``load_state_dict(state)`` would take ``state``; change nothing. By default: accept anything.

        A load checks every part of a checkpoint, this callback's saved state
        included, before it loads the first: a callback whose ``load_state_dict``
        can fail, or would take a value of the wrong kind, shape or range, refuses
        it here, so a bad file never leaves a trainer half-loaded. ``state`` is
        what ``load_state_dict`` would receive (for ``state_per_rank``: each saved
        rank's, and the regrouped one), its tensors still where the file has them.

        Raises:
            CheckpointError: The state does not fit; name the key (the trainer adds the callback's key).
            KeyError, TypeError, ValueError: The same, reported as a ``CheckpointError``.
        """

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned; its tensors are on the trainer's device."""

    def metric_names(self, phases: Sequence[Phase]) -> set[str] | None:
        """The ``trainer.metrics`` names this callback writes in a run of ``phases``: none by default.

        A callback that writes ``trainer.metrics`` declares the names here, so
        that a trainer can refuse, when it is built, a monitored name that
        nothing writes (see ``monitored_metrics``). None means the names cannot
        be told ahead, and turns that check off.
        """
        return set()

    def output_files(self) -> list[Path]:
        """The files this callback writes, glob patterns allowed in their names (``folder/ckpt-*.safetensors``).

        Before the first hook runs, the trainer claims their folders for the run
        (``statetrainer.checkpoint.claim_folder``: a ``run.json`` and a lock), so
        no run writes, truncates or deletes a file of another run or of a second
        live copy of itself.
        """
        return []

    def writes_records(self) -> bool:
        """Whether this callback writes records of the run outside the process (its ``output_files``, an experiment
        tracker's run): a replay (``travel_to``, ``bisect``) refuses it, as it would write the run's past again."""
        return bool(self.output_files())

    def open_files(self, trainer: TrainerView) -> None:
        """Once the folders are claimed, before the run's first hook in this process: make the files what the loaded
        state says (a resumed run), or start them afresh. Called in the process that writes (rank 0)."""

    def monitored_metrics(self) -> set[str]:
        """The ``trainer.metrics`` names this callback reads (``EarlyStopping``'s ``monitor``): none by default.

        The trainer refuses to be built when one of them is in no callback's ``metric_names``.
        """
        return set()

    def on_exception(self, trainer: TrainerView, error: BaseException) -> None:
        """``fit()`` or ``advance()`` is ending with ``error`` (a crash, Ctrl-C, ``Preempted``): release what you hold.

        The run cannot continue. An exception raised here is reported as a
        warning, so the original error is the one that propagates.
        """

    def on_close(self, trainer: TrainerView) -> None:
        """Driving has ended for good (the run finished, or an error stopped it): close writers, let go of files.

        Runs once, after ``on_enter_idle`` or ``on_exception``. After an error, an
        exception raised here is reported as a warning.
        """

    def on_enter_idle(self, trainer: TrainerView) -> None:
        """The run has ended (after the last epoch, or after ``stop()``)."""

    def on_exit_idle(self, trainer: TrainerView) -> None:
        """The run is starting."""

    def on_enter_epoch(self, trainer: TrainerView) -> None:
        """An epoch starts; ``trainer.epoch`` is its index."""

    def on_exit_epoch(self, trainer: TrainerView) -> None:
        """An epoch has run all its phases."""

    def on_enter_phase(self, trainer: TrainerView) -> None:
        """A phase starts; ``trainer.phase`` is it. Its loader is not open yet."""

    def on_exit_phase(self, trainer: TrainerView) -> None:
        """A phase has run all its batches."""

    def on_enter_batch(self, trainer: TrainerView) -> None:
        """``trainer.batch`` holds the batch as the loader gave it; forward has not run."""

    def on_exit_batch(self, trainer: TrainerView) -> None:
        """``trainer.output`` and ``trainer.loss`` hold the batch's results (and its step is done)."""

    def on_enter_backward(self, trainer: TrainerView) -> None:
        """The backward pass is about to run on ``trainer.loss``."""

    def on_exit_backward(self, trainer: TrainerView) -> None:
        """Gradients of this batch have been accumulated into ``.grad``."""

    def on_enter_step(self, trainer: TrainerView) -> None:
        """The optimizer is about to step (the place to set hyper-parameters)."""

    def on_exit_step(self, trainer: TrainerView) -> None:
        """The optimizer has stepped and the gradients are zeroed."""


def overridden_hooks(callback: Callback) -> dict[str, Any]:
    """The bound hook methods a callback overrides, by hook name."""
    cls = type(callback)
    return {
        hook: getattr(callback, hook) for hook in HOOK_NAMES if getattr(cls, hook, None) is not getattr(Callback, hook)
    }


def hooks_by_state(callbacks: Sequence[Callback]) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
    """The overridden ``on_enter_<state>`` and ``on_exit_<state>`` hooks of ``callbacks``, by state, in order."""
    enter: dict[str, list[Any]] = {state: [] for state in STATES}
    exit: dict[str, list[Any]] = {state: [] for state in STATES}
    for callback in callbacks:
        for hook, method in callback.active_hooks().items():
            _, kind, state = hook.split("_", 2)
            (enter if kind == "enter" else exit)[state].append(method)
    return enter, exit


def surround_hooks(enter: dict[str, list[Any]], exit: dict[str, list[Any]], callbacks: Sequence[Callback]) -> None:
    """Put the ``surrounding_calls`` of the callback that ``times_hooks`` around every state's hooks, in place.

    Raises:
        ValueError: More than one callback times the hooks (each would count the other's calls).
    """
    timers = [callback for callback in callbacks if callback.times_hooks]
    if len(timers) > 1:
        raise ValueError(f"callbacks {', '.join(timer.key for timer in timers)} each time the run's hooks; keep one")
    for timer in timers:
        for side, hooks in (("enter", enter), ("exit", exit)):
            for state in STATES:
                first, last = timer.surrounding_calls(side, state, bool(hooks[state]))
                hooks[state] = [call for call in (first, *hooks[state], last) if call is not None]


class CheckpointSaver(Protocol):
    """A callback that saves the run's checkpoints into ``folder`` (``Checkpoint``); it says so by setting
    ``saves_checkpoints = True``, so a callback that merely has a ``folder`` and a ``save`` is none.

    A stop signal saves through the first one, and ``load_checkpoint`` takes its
    folder, not made yet, for a first run rather than a typo. ``background``
    says whether its scheduled saves are written in the background.
    """

    folder: Path
    background: bool

    def save(self, trainer: Any) -> Path: ...


def checkpoint_savers(callbacks: Sequence[Callback]) -> list[CheckpointSaver]:
    """The callbacks that save the run's checkpoints (``saves_checkpoints``), in order."""
    return [cast(CheckpointSaver, callback) for callback in callbacks if callback.saves_checkpoints]
