"""The trainer: one driver that advances the training machine, one state at a time.

The machine (``machine.py``) knows the states, the transitions and the order of
the callbacks. The trainer knows the data and the model: for the current state
it decides which transition comes next (``_decide_*``), and it provides the
work each state does on entry (``_prepare_*`` before the callbacks,
``_run_*`` after them). ``fit()`` and ``advance()`` run the same deciders, so a
stepped run and a fitted run are the same run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint
from .callbacks.base import Callback, overridden_hooks
from .callbacks.checkpoint import Checkpoint
from .checkpoint import CheckpointError
from .data import END, BatchCursor, BatchSource, to_device
from .determinism import deterministic_algorithms, require_cublas_workspace
from .machine import STATES, Move, TrainingMachine
from .phase import Phase
from .precision import make_autocast, make_grad_scaler
from .preemption import DEFAULT_STOP_SIGNALS, Preempted, SignalCatcher, resolve_signals
from .rng import capture_rng, restore_rng
from .state import check_model_state, tensors_to, unwrap_model
from .validation import check_count, check_number
from .version import __version__

__all__ = ["DEFAULT_CHECKPOINT_FOLDER", "Trainer", "unpack_pair"]

_NO_CONTEXT = contextlib.nullcontext()
_AT_REST = ("idle", "epoch", "phase")  # the states a run can be saved in: between batches
DEFAULT_CHECKPOINT_FOLDER = Path("checkpoints")


def unpack_pair(batch: Any) -> tuple[Any, Any]:
    """The default ``unpack``: a batch is an ``(input, target)`` pair."""
    try:
        inputs, target = batch
    except (TypeError, ValueError):
        raise TypeError(
            f"by default a batch is an (input, target) pair, got {type(batch).__name__}; "
            "pass unpack=lambda batch: (input, target) to the Trainer for other shapes"
        ) from None
    return inputs, target


class Trainer:
    """Trains ``model`` by running a state machine over epochs, phases and batches.

    Args:
        model: The module to train; it is moved to ``device``.
        optimizer: Steps the model's parameters; may be None when no phase has
            ``grad=True``.
        loss_fn: ``loss_fn(output, target)`` gives the batch's scalar loss.
        phases: The phases of every epoch, run in order.
        callbacks: Observers of the machine's states; their names must be unique.
        epochs: How many epochs to run.
        device: Where the model and batches go; None picks CUDA when available.
        accumulate: How many batches' gradients make one optimizer step. The step
            follows the mean of the window's batch gradients; a phase whose batch
            count is not a multiple of ``accumulate`` steps on its last batch, with
            the mean of that shorter window.
        grad_clip: Clip the gradients' total 2-norm to this before each step.
        precision: None for full precision, ``"bf16"`` or ``"fp16"`` for autocast
            (fp16 on CUDA also scales the loss with a GradScaler).
        unpack: Turns a batch into ``(input, target)``; the default takes a pair.
            To change what the model is called with, override ``forward``.
        seed: Decides the order of shuffled DataLoaders and the random
            augmentation of every sample (see ``statetrainer.data.resumable``);
            None takes ``torch.initial_seed()``. A checkpoint carries its run's seed.
        deterministic: Run with PyTorch's deterministic algorithms and cuDNN's
            deterministic mode (benchmarking off) while ``fit()``/``advance()``
            run, so a CUDA run repeats bit for bit and a resumed one matches the
            uninterrupted run. On CUDA it sets ``CUBLAS_WORKSPACE_CONFIG`` if
            CUDA has not started yet, and raises ``RuntimeError`` if it has.
        stop_signals: Signals (names or numbers) that preempt the run while
            ``fit()``/``advance()`` run in the main thread: the batch in flight
            finishes, the first ``Checkpoint`` callback saves there, and
            ``Preempted`` (a ``SystemExit``, status 128 + the signal) is raised.
            A second Ctrl-C aborts at once. ``()`` keeps Python's handlers.

    Attributes:
        epoch: Index of the current epoch, from 0.
        phase: The current (or last) ``Phase``.
        batch_index: Index of the current batch within its phase, from 0.
        global_step: Optimizer steps taken so far.
        batch, target, output, loss: The current batch (on the device) and its results.
        metrics: The latest value of every metric, by name (``train_loss``...).
    """

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
        self.phases = _check_phases(phases, optimizer)
        self.callbacks = _check_callbacks(callbacks)
        check_count("epochs", epochs)
        check_count("accumulate", accumulate)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        check_number("grad_clip", grad_clip, 0, low_open=True, optional=True)
        if not isinstance(deterministic, bool):
            raise TypeError(f"deterministic must be True or False, got {deterministic!r}")
        self.stop_signals = resolve_signals(stop_signals)

        self.device = torch.device(device) if device is not None else _default_device()
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {str(self.device)!r} was asked for, but CUDA is not available here")
        if deterministic and self.device.type == "cuda":
            require_cublas_workspace()  # before the model goes to the GPU, which starts CUDA
        self.deterministic = deterministic
        self._cuda_devices = (self.device,) if self.device.type == "cuda" else ()
        self.model = model.to(self.device)
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.epochs = epochs
        self.accumulate = accumulate
        self.grad_clip = grad_clip
        self.precision = precision
        self.unpack = unpack
        self.seed = int(seed) if seed is not None else torch.initial_seed() % 2**63
        self._sources = [BatchSource(phase.loader, index, self.stop_signals) for index, phase in enumerate(self.phases)]
        self.autocast = make_autocast(precision, self.device)
        self.scaler = make_grad_scaler(precision, self.device)
        self._move_batches = self.device.type != "cpu"
        self._parameters = [p for group in optimizer.param_groups for p in group["params"]] if optimizer else []

        self.epoch = 0
        self.phase: Phase | None = None
        self.batch_index = -1
        self.global_step = 0
        self.batch: Any = None
        self.target: Any = None
        self.output: Any = None
        self.loss: torch.Tensor | None = None
        self.metrics: dict[str, Any] = {}

        self._epochs_done = 0
        self._phase_position = -1
        self._cursor: BatchCursor | None = None
        self._incoming: Any = None
        self._contexts: tuple[Any, Any] | None = None
        self._stop_requested = False
        self._finished = False
        self._driving = False
        self._error: BaseException | None = None
        self._deferred: list[Callable[[Trainer], None]] = []
        self._at_rest = False
        self._catcher = SignalCatcher(self.stop_signals, self._on_stop_signal)
        self._exception_hooks = [callback.on_exception for callback in self.callbacks
                                 if type(callback).on_exception is not Callback.on_exception]  # fmt: skip
        self._machine = self._build_machine()
        fire = self._machine.firer
        self._start_epoch, self._start_phase, self._start_batch = (
            fire("start_epoch"), fire("start_phase"), fire("start_batch"))
        self._backward, self._step, self._end_batch = fire("backward"), fire("step"), fire("end_batch")
        self._end_phase, self._next_epoch, self._finish = fire("end_phase"), fire("next_epoch"), fire("finish")
        self._deciders: dict[str, Callable[[], None]] = {state: getattr(self, f"_decide_{state}") for state in STATES}

    def _build_machine(self) -> TrainingMachine:
        enter: dict[str, list[Callable[[Any], None]]] = {state: [] for state in STATES}
        exit: dict[str, list[Callable[[Any], None]]] = {state: [] for state in STATES}
        for callback in self.callbacks:
            for hook, method in overridden_hooks(callback).items():
                _, kind, state = hook.split("_", 2)
                (enter if kind == "enter" else exit)[state].append(method)
        cls = type(self)
        return TrainingMachine(
            self,
            prepare={"idle": cls._prepare_idle, "epoch": cls._prepare_epoch, "phase": cls._prepare_phase,
                     "batch": cls._prepare_batch, "step": cls._prepare_step},
            enter=enter,
            work={"phase": cls._open_new_phase, "batch": cls._run_batch, "backward": cls._run_backward,
                  "step": cls._run_step},
            exit=exit,
        )

    # ------------------------------------------------------------------ public API

    @property
    def state(self) -> str:
        """The machine's current state: idle, epoch, phase, batch, backward or step."""
        return self._machine.state

    @property
    def history(self) -> list[Move]:
        """The most recent transitions, newest last."""
        return list(self._machine.history)

    def diagram(self) -> str:
        """The state diagram (Mermaid source) drawn by ``transitions`` from the table the machine runs,
        with the current state marked."""
        return self._machine.diagram()

    @property
    def finished(self) -> bool:
        """Whether the run has ended (all epochs done, or stopped)."""
        return self._finished

    def fit(self) -> Trainer:
        """Run to the end, or continue a stepped or resumed run to the end.

        On a run that has already finished (a restarted script whose last
        checkpoint is the final one), it warns and returns.
        """
        if self._finished and self._error is None:
            warnings.warn(f"the run has already finished ({self._end_reason()}); fit() has nothing to do", stacklevel=2)
            return self
        deciders, machine = self._deciders, self._machine
        with self._driving_the_machine():
            while not self._finished:
                deciders[machine.state]()
                if self._deferred:
                    self._run_deferred()
        return self

    def advance(self) -> str:
        """Make exactly one transition, with its callbacks and work; return the new state.

        A stop signal that arrives during a transition that ends inside a batch
        takes effect at the end of that batch, in a later ``advance()``.
        """
        with self._driving_the_machine():
            self._deciders[self._machine.state]()
            if self._deferred:
                self._run_deferred()
        return self._machine.state

    def run_until(self, state: str) -> str:
        """Advance until ``state`` is entered next; return it.

        Raises:
            ValueError: ``state`` is not a state, or this run can never enter it.
            RuntimeError: The run ended before entering ``state``.
        """
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}; states are {', '.join(STATES)}")
        if state in ("backward", "step") and not any(phase.grad for phase in self.phases):
            raise ValueError(f"this run never enters {state!r}: no phase has grad=True")
        while True:
            if self.advance() == state:
                return state
            if self._finished:
                raise RuntimeError(f"the run finished before entering {state!r}")

    def defer(self, action: Callable[[Trainer], None]) -> None:
        """Run ``action(trainer)`` as soon as the machine is between batches.

        Callbacks run in the middle of a transition; an action that needs the
        whole machine at rest (saving a checkpoint) is deferred to its end.
        """
        self._deferred.append(action)

    def _run_deferred(self) -> None:
        if self._machine.state not in _AT_REST:
            return
        self._at_rest = True
        try:
            while self._deferred:  # popped one by one: a signal handler may append meanwhile
                self._deferred.pop(0)(self)
        finally:
            self._at_rest = False

    def stop(self) -> None:
        """Ask for a clean stop: the current batch ends, then the phase, the epoch and the run.

        An accumulation window that has not stepped yet is dropped.
        """
        self._stop_requested = True

    def forward(self, inputs: Any, target: Any) -> tuple[Any, torch.Tensor]:
        """Run the model and the loss on one batch; override for other signatures."""
        output = self.model(inputs)
        return output, self.loss_fn(output, target)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything the next batch depends on, as a tree of tensors and plain values.

        Taken between batches (states idle, epoch or phase); ``load_state_dict``
        on a fresh trainer built the same way continues exactly from here.
        """
        self._check_at_rest("state_dict()")
        parameters = self._parameters
        return {
            "position": {
                "state": self.state, "epoch": self.epoch, "epochs_done": self._epochs_done,
                "phase_position": self._phase_position, "batch_index": self.batch_index,
                "global_step": self.global_step, "finished": self._finished, "stop_requested": self._stop_requested,
            },  # fmt: skip
            "seed": self.seed,
            "phases": [{"name": phase.name, "length": source.length} for phase, source in zip(self.phases, self._sources)],
            "metrics": dict(self.metrics),
            "model": unwrap_model(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            # Inside an accumulation window the gradients so far are part of the state.
            "grads": {str(index): p.grad for index, p in enumerate(parameters) if p.grad is not None},
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "callbacks": {callback.key: callback.state_dict() for callback in self.callbacks},
            "rng": capture_rng(self._cuda_devices),
            # The position of every loader that keeps its own (None for the others: theirs is computed).
            "data": [source.state_dict() for source in self._sources],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()``'s result; the trainer must not have started.

        Raises:
            CheckpointError: The state does not fit this trainer (model, phases,
                callbacks or optimizer differ).
        """
        if self.state != "idle" or self._finished or self.global_step or self._epochs_done:
            raise RuntimeError("load a checkpoint into a trainer that has not started: build a new Trainer")
        self._check_fits(state)
        unwrap_model(self.model).load_state_dict(state["model"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        for index, grad in state["grads"].items():
            parameter = self._parameters[int(index)]
            parameter.grad = grad.to(parameter.device, parameter.dtype)
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        for callback in self.callbacks:  # on the run's device, whatever device wrote them
            callback.load_state_dict(tensors_to(state["callbacks"][callback.key], self.device))
        position = state["position"]
        self.seed = int(state["seed"])
        self.metrics = dict(state["metrics"])
        self.epoch, self._epochs_done = position["epoch"], position["epochs_done"]
        self._phase_position, self.batch_index = position["phase_position"], position["batch_index"]
        self.global_step = position["global_step"]
        self._finished, self._stop_requested = position["finished"], position["stop_requested"]
        self.phase = self.phases[self._phase_position] if self._phase_position >= 0 else None
        self._machine.restore(position["state"])
        restore_rng(state["rng"], self._cuda_devices)
        for source, saved in zip(self._sources, state.get("data") or [None] * len(self._sources), strict=True):
            source.load_state_dict(saved)  # applied when the source next opens
        if position["state"] == "phase":  # mid-phase: reopen its batches after the last one done
            self._open_phase(start=self.batch_index + 1)

    def save_checkpoint(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write ``state_dict()`` to a safetensors file, atomically; return its path.

        Args:
            path: A ``.safetensors`` file, or a folder to add a numbered
                checkpoint to; None means the ``checkpoints/`` folder.

        Raises:
            RuntimeError: The machine is not between batches, or it is inside a
                phase whose loader cannot be resumed mid-phase.
            ValueError: ``path`` names a file of another kind (``model.pt``).
        """
        self._check_at_rest("save_checkpoint()")
        target = Path(path) if path is not None else DEFAULT_CHECKPOINT_FOLDER
        if target.suffix not in ("", ".safetensors") and not target.is_dir():
            raise ValueError(
                f"save_checkpoint({str(target)!r}): checkpoints are safetensors files; name a file ending in "
                "'.safetensors' or a folder (a new folder whose name has a dot must exist first)"
            )
        if target.suffix != ".safetensors":
            target = checkpoint.next_checkpoint_path(target, self.epoch, self.global_step)
        return checkpoint.write_tree(target, self.state_dict(), __version__)

    def load_checkpoint(self, path: str | os.PathLike[str]) -> Path | None:
        """Continue from a checkpoint file, or from the newest good checkpoint in a folder.

        Returns the file loaded, or None for a folder that holds no checkpoint
        yet, or for the folder of one of the trainer's ``Checkpoint`` callbacks
        before it exists (a first run), so ``trainer.load_checkpoint(folder);
        trainer.fit()`` is the whole auto-resume recipe. A folder whose newest
        file is corrupt falls back to the one before, with a warning.

        Raises:
            CheckpointError: The file is missing, truncated, corrupted, from a
                newer format, or does not fit this trainer; or ``path`` does
                not exist and is no ``Checkpoint`` callback's folder (a typo).
        """
        path = Path(path)
        if path.is_dir():
            found = checkpoint.newest_valid(path, check=self._check_fits)
            if found is None:
                return None
            path, state = found
        elif path.exists() or path.suffix == ".safetensors":
            state = checkpoint.read_tree(path)
        else:
            folders = [callback.folder for callback in self.callbacks if isinstance(callback, Checkpoint)]
            if any(path.resolve() == folder.resolve() for folder in folders):
                return None  # the run's own checkpoint folder, not made yet: a first run
            saving_to = f"this trainer's Checkpoint callback saves to {', '.join(map(str, folders))}" if folders else \
                "this trainer has no Checkpoint callback"  # fmt: skip
            raise CheckpointError(f"no checkpoint file or folder at {path}; {saving_to}. Check the path")
        self.load_state_dict(state)
        return path

    def can_checkpoint_here(self) -> bool:
        """Whether the run can be saved and resumed at this point.

        False inside a batch, and inside a phase whose loader cannot start past
        its first batch (``statetrainer.data.resumable`` says which).
        """
        return self.state in _AT_REST and self._why_not_mid_phase() is None

    def _why_not_mid_phase(self) -> str | None:
        """Why the run cannot be resumed from here, inside its current phase; None when it can."""
        if self.state != "phase":
            return None
        source = self._sources[self._phase_position]
        if not source.resumable:
            return source.reason
        if source.keeps_own_state and self._cursor is not None and self._cursor.looked_ahead:
            return ("the trainer has read its next batch already, to see whether the phase ends, "
                    "so the loader's saved position would skip that batch")
        return None

    def _check_at_rest(self, what: str) -> None:
        if self._driving and not self._at_rest:
            raise RuntimeError(
                f"{what} was called from a callback, in the middle of a transition; "
                "use trainer.defer(lambda trainer: ...) or the Checkpoint callback"
            )
        if self.state not in _AT_REST:
            raise RuntimeError(
                f"{what} needs the machine between batches (idle, epoch or phase), but it is in {self.state!r}; "
                "advance to the end of the batch first"
            )
        if not self.can_checkpoint_here():
            raise RuntimeError(
                f"phase {self.phase.name!r} cannot be resumed mid-phase here ({self._why_not_mid_phase()}); "
                "checkpoint it at an epoch boundary instead"
            )

    def _check_fits(self, state: dict[str, Any]) -> None:
        """Raise ``CheckpointError`` if ``state`` was not saved by a trainer built like this one."""
        try:
            saved_phases = [(phase["name"], phase["length"]) for phase in state["phases"]]
            ours = [(phase.name, source.length) for phase, source in zip(self.phases, self._sources)]
            if saved_phases != ours:
                raise CheckpointError(f"the checkpoint's phases (name, batches) are {saved_phases}, this trainer's {ours}")
            check_model_state(unwrap_model(self.model).state_dict(), state["model"])
            if (state["optimizer"] is None) != (self.optimizer is None):
                raise CheckpointError("the checkpoint and this trainer disagree on having an optimizer")
            if self.optimizer is not None:
                saved_groups = [len(group["params"]) for group in state["optimizer"]["param_groups"]]
                our_groups = [len(group["params"]) for group in self.optimizer.param_groups]
                if saved_groups != our_groups:
                    raise CheckpointError(
                        f"the checkpoint's optimizer has param groups of sizes {saved_groups}, this one {our_groups}"
                    )
            saved_data = state.get("data") or [None] * len(self._sources)
            if [saved is None for saved in saved_data] != [not source.keeps_own_state for source in self._sources]:
                raise CheckpointError("the checkpoint's loaders and this trainer's disagree on which keep their own state")
            missing = [callback.key for callback in self.callbacks if callback.key not in state["callbacks"]]
            if missing:
                raise CheckpointError(f"the checkpoint has no state for callback(s) {', '.join(missing)}")
            ours = {callback.key for callback in self.callbacks}
            extra = [key for key in state["callbacks"] if key not in ours]
            if extra:
                warnings.warn(f"the checkpoint holds state for callbacks this trainer lacks: {', '.join(extra)}",
                              stacklevel=4)  # fmt: skip
        except (KeyError, TypeError) as error:
            raise CheckpointError(f"the checkpoint lacks part of a statetrainer state: {error!r}") from error

    def __repr__(self) -> str:
        loss = "None" if self.loss is None else f"{float(self.loss.detach()):.4g}"
        phase = self.phase.name if self.phase is not None else None
        return (
            f"Trainer(state={self.state!r}, epoch={self.epoch}, phase={phase!r}, "
            f"batch_index={self.batch_index}, global_step={self.global_step}, loss={loss})"
        )

    # ------------------------------------------------------------------ driving

    @contextlib.contextmanager
    def _driving_the_machine(self) -> Iterator[None]:
        """Around ``fit()``/``advance()``: one driver at a time, stop signals caught, determinism on."""
        self._begin_driving()
        try:
            with self._catcher, deterministic_algorithms() if self.deterministic else _NO_CONTEXT:
                yield
            if self._deferred:  # a stop signal that came after the last check
                self._run_deferred()
        except BaseException as error:
            self._error = error
            if self._cursor is not None:  # the run cannot go on: shut the loader's workers down now
                self._cursor.close()
                self._cursor = None
            for hook in self._exception_hooks:
                try:
                    hook(self, error)
                except Exception as hook_error:  # noqa: BLE001 -- the run's own error must propagate
                    warnings.warn(f"{hook.__qualname__} raised {hook_error!r} while handling {error!r}", stacklevel=3)
            raise
        finally:
            self._driving = False

    def _on_stop_signal(self, received: signal.Signals) -> None:
        self._deferred.append(type(self)._stop_on_signal)

    def _stop_on_signal(self) -> None:
        """At the first batch boundary after a stop signal: save exactly here, then raise ``Preempted``."""
        received = self._catcher.received
        if self.state == "phase":
            where = f"epoch {self.epoch}, phase {self.phase.name!r}, after batch {self.batch_index}"
        else:
            where = f"epoch {self.epoch}, state {self.state!r}"
        savers = [callback for callback in self.callbacks if isinstance(callback, Checkpoint)]
        saved = None
        if not savers:
            outcome = ("nothing was saved, because the trainer has no Checkpoint callback; "
                       "add statetrainer.callbacks.Checkpoint(folder) to resume from a stop")  # fmt: skip
        elif not self.can_checkpoint_here():
            outcome = (f"nothing was saved, because phase {self.phase.name!r} cannot be resumed mid-phase here "
                       f"({self._why_not_mid_phase()}); a restart resumes from the newest checkpoint in "
                       f"{savers[0].folder}")  # fmt: skip
        else:
            saved = savers[0].save(self)
            outcome = f"saved {saved}"
        message = f"stopped by {received.name} at {where} (global step {self.global_step}): {outcome}"
        print(f"statetrainer: {message}", file=sys.stderr, flush=True)
        raise Preempted(received, saved, message)

    def _begin_driving(self) -> None:
        if self._driving:
            raise RuntimeError(
                "the trainer is already advancing: callbacks must not call fit(), advance() or run_until(); "
                "use trainer.stop() to end the run"
            )
        if self._error is not None:
            raise RuntimeError(
                f"the trainer cannot continue: an earlier transition raised {self._error!r} in state "
                f"{self.state!r}, so its work may be half done; build a new Trainer"
            ) from self._error
        if self._finished:
            raise RuntimeError(f"the run has finished ({self._end_reason()}); there is nothing left to advance")
        self._driving = True

    def _end_reason(self) -> str:
        return "stopped" if self._stop_requested else f"all {self.epochs} epoch(s) done"

    # Each decider picks and fires the one transition out of its state.

    def _decide_idle(self) -> None:
        self._start_epoch()

    def _decide_epoch(self) -> None:
        if not self._stop_requested and self._phase_position + 1 < len(self.phases):
            self._start_phase()
            return
        self._epochs_done += 1
        if self._stop_requested or self._epochs_done >= self.epochs:
            self._finish()
        else:
            self._next_epoch()

    def _decide_phase(self) -> None:
        cursor = self._cursor
        if not self._stop_requested:
            batch = cursor.next()
            if batch is not END:
                self._incoming = batch
                self._start_batch()
                return
            if cursor.fetched == 0:
                raise ValueError(f"phase {self.phase.name!r}: its loader yielded no batches")
        self._cursor = None  # lets a DataLoader's workers shut down
        self._end_phase()

    def _decide_batch(self) -> None:
        if self.phase.grad:
            self._backward()
        else:
            self._end_batch()

    def _decide_backward(self) -> None:
        if (self.batch_index + 1) % self.accumulate == 0 or self._cursor.is_last():
            self._step()
        else:
            self._end_batch()

    def _decide_step(self) -> None:
        self._end_batch()

    # ------------------------------------------------------------------ the states' work

    def _prepare_idle(self) -> None:
        self._finished = True

    def _prepare_epoch(self) -> None:
        self.epoch = self._epochs_done
        self._phase_position = -1

    def _prepare_phase(self) -> None:
        self._phase_position += 1
        self.phase = self.phases[self._phase_position]
        self.batch_index = -1

    def _open_new_phase(self) -> None:
        if self.phase.grad:
            self.optimizer.zero_grad(set_to_none=True)
        self._open_phase(start=0)

    def _open_phase(self, start: int) -> None:
        """Set train/eval and grad mode and open the phase's batches at batch ``start``."""
        phase = self.phase
        self.model.train(phase.grad)
        if phase.grad:
            grad_context = None if torch.is_grad_enabled() else torch.enable_grad()
        else:
            grad_context = torch.no_grad()
        if grad_context is None and self.autocast is None:
            self._contexts = None
        else:
            self._contexts = (grad_context or _NO_CONTEXT, self.autocast or _NO_CONTEXT)
        source = self._sources[self._phase_position]
        self._cursor = BatchCursor(source.open(self.seed, self.epoch, start), source.length, start)

    def _prepare_batch(self) -> None:
        self.batch_index += 1
        self.batch, self._incoming = self._incoming, None
        self.target = self.output = self.loss = None

    def _run_batch(self) -> None:
        batch = self.batch
        if self._move_batches:
            batch = self.batch = to_device(batch, self.device, non_blocking=True)
        inputs, target = self.unpack(batch)
        self.target = target
        contexts = self._contexts
        if contexts is None:
            self.output, self.loss = self.forward(inputs, target)
        else:
            with contexts[0], contexts[1]:
                self.output, self.loss = self.forward(inputs, target)

    def _run_backward(self) -> None:
        loss = self.loss
        if self.accumulate > 1:
            loss = loss / self.accumulate
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()

    def _prepare_step(self) -> None:
        window = self.batch_index % self.accumulate + 1
        if window != self.accumulate:  # a ragged last window: make it the mean of its own batches
            gradients = [p.grad for p in self._parameters if p.grad is not None]
            torch._foreach_mul_(gradients, self.accumulate / window)

    def _run_step(self) -> None:
        optimizer, scaler = self.optimizer, self.scaler
        if self.grad_clip is not None:
            if scaler is not None:
                scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(self._parameters, self.grad_clip)
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        self.global_step += 1


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_phases(phases: Sequence[Phase], optimizer: torch.optim.Optimizer | None) -> list[Phase]:
    phases = list(phases)
    if not phases:
        raise ValueError("phases is empty: give at least one Phase, e.g. [st.Phase('train', loader)]")
    for phase in phases:
        if not isinstance(phase, Phase):
            raise TypeError(f"phases must hold Phase objects, got {type(phase).__name__}")
        if phase.grad and optimizer is None:
            raise ValueError(
                f"phase {phase.name!r} has grad=True (it trains) but the trainer has no optimizer; "
                "pass an optimizer, or grad=False for an evaluation phase"
            )
    names = [phase.name for phase in phases]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"phase names must be unique, got {', '.join(map(repr, duplicates))} more than once")
    return phases


def _check_callbacks(callbacks: Iterable[Callback]) -> list[Callback]:
    callbacks = list(callbacks)
    for callback in callbacks:
        if not isinstance(callback, Callback):
            raise TypeError(f"callbacks must be statetrainer.Callback instances, got {type(callback).__name__}")
    keys = [callback.key for callback in callbacks]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(
            f"callback names must be unique, got {', '.join(map(repr, duplicates))} more than once; "
            "give each a distinct name (callback.name = '...')"
        )
    return callbacks
