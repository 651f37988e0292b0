"""Everything a run needs after a restart, as named parts that save, check and load themselves.

A *part* is any object with ``state_dict()`` and ``load_state_dict(state)``;
it may also have ``check_fits(state)``, which raises (``CheckpointError``,
``KeyError``, ``TypeError`` or ``ValueError``) when a saved state cannot be
loaded into it. The trainer registers its parts in one ``StateRegistry``:
its ``state_dict()`` is the registry's, and a load checks every part before
it changes any, so adding a part to a run touches one place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from .distributed import Ranks, gather_tree
from .errors import CheckpointError, HalfLoadedError
from .machine import AT_REST
from .optimizer_step import optimizer_class_name
from .rng import Generators
from .saved_state import (
    REQUIRED_TO_LOAD,
    check_flag,
    check_integer,
    check_keys,
    describe,
    is_real,
    tensors_to,
    unwrap_model,
)

if TYPE_CHECKING:
    from .callbacks.base import Callback

__all__ = ["CallbackStates", "Metrics", "Position", "RunIdentity", "RunSettings", "StateRegistry",
           "Stateful", "check_position_fits", "is_metric_value"]  # fmt: skip


@runtime_checkable
class Stateful(Protocol):
    """What survives a restart: the protocol of ``torch.nn.Module``, optimizers and torchdata's loaders."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class StateRegistry:
    """The parts of a run that survive a restart, by name, loaded in the order they were registered."""

    def __init__(self, **parts: Stateful) -> None:
        self._parts: dict[str, Stateful] = {}
        self._checks: list[Callable[[dict[str, Any]], None]] = []
        for name, part in parts.items():
            self.register(name, part)

    def add_check(self, check: Callable[[dict[str, Any]], None]) -> None:
        """Also run ``check(state)`` on a whole saved state, after every part's own check (checks across parts)."""
        self._checks.append(check)

    def register(self, name: str, part: Stateful) -> None:
        """Add ``part`` under ``name``; its state is saved and loaded with the run's from now on."""
        if not isinstance(part, Stateful):
            raise TypeError(f"state part {name!r}: a {type(part).__name__} has no state_dict()/load_state_dict()")
        if name in self._parts:
            raise ValueError(f"a state part named {name!r} is registered already")
        self._parts[name] = part

    def __contains__(self, name: str) -> bool:
        return name in self._parts

    def __getitem__(self, name: str) -> Stateful:
        return self._parts[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._parts)

    def state_dict(self) -> dict[str, Any]:
        """Every part's state, by name."""
        return {name: part.state_dict() for name, part in self._parts.items()}

    def check_fits(self, state: Any) -> None:
        """Raise ``CheckpointError`` naming the first part whose saved state is missing or does not fit."""
        if not isinstance(state, dict):
            raise CheckpointError(f"a saved run is a dict of parts, got a {type(state).__name__}")
        missing = [name for name in self._parts if name not in state]
        if missing:
            raise CheckpointError(f"the checkpoint has no state for part(s) {', '.join(missing)} of this run")
        checks = [(f"{name}: ", check, state[name]) for name, part in self._parts.items()
                  if (check := getattr(part, "check_fits", None)) is not None]  # fmt: skip
        checks += [("", check, state) for check in self._checks]  # across parts, once each part fits
        for label, check, saved in checks:
            try:
                check(saved)
            except CheckpointError as error:
                raise CheckpointError(f"{label}{error}") from error
            except _MISFITS as error:
                raise CheckpointError(f"{label}the saved state does not fit this run: {error!r}") from error

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Check every part's saved state, then load each: nothing is loaded unless all of it fits.

        Every part's ``check_fits`` runs before the first part loads, so a part
        whose ``load_state_dict`` can fail on a saved state must refuse that
        state in its ``check_fits``: the built-in parts do."""
        self.check_fits(state)
        for name, part in self._parts.items():
            try:
                part.load_state_dict(state[name])
            except Exception as error:  # a part (a user's own) whose check let through what it cannot load
                raise HalfLoadedError(
                    f"{name}: loading raised {error!r} after every check passed, so the parts "
                    "before it are loaded and the rest are not: this trainer cannot be used; build "
                    f"a new one, and give the part a check_fits that refuses this state"
                ) from error


@dataclass
class Position:
    """Where a run is: which epoch, which phase, which batch, how many optimizer steps.

    Attributes:
        epoch: The current epoch, from 0.
        epochs_done: Epochs finished.
        phase_index: Index of the current phase in the epoch; -1 before the first.
        batch_index: Index of the current batch in its phase; -1 before the first.
        global_step: Optimizer steps taken.
        finished: Whether the run has ended.
        stop_requested: Whether ``stop()`` was called.
    """

    epoch: int = 0
    epochs_done: int = 0
    phase_index: int = -1
    batch_index: int = -1
    global_step: int = 0
    finished: bool = False
    stop_requested: bool = False

    def took(self, max_steps: int | None) -> bool:
        """Whether the run has taken its ``max_steps`` (False without them)."""
        return max_steps is not None and self.global_step >= max_steps

    def extend_to(self, epochs: int | None, max_steps: int | None = None) -> None:
        """Let a run that finished all its epochs or steps (not stopped) go on, when it now has more."""
        more_epochs = epochs is None or self.epochs_done < epochs
        if self.finished and not self.stop_requested and more_epochs and not self.took(max_steps):
            self.finished = False

    def epoch_for_people(self, state: str) -> int:
        """The epoch a person would name, counted from 1: the one under way inside an epoch, else the last done."""
        return self.epochs_done if state in ("epoch", "idle") else self.epochs_done + 1

    def end_reason(self, max_steps: int | None = None) -> str:
        """Why a finished run ended, in words."""
        if self.stop_requested:
            return "stopped"
        if self.took(max_steps):
            return f"max_steps={max_steps} taken"
        return f"all {self.epochs_done} epoch(s) done"

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check_fits(self, state: dict[str, Any]) -> None:
        """Refuse a saved position whose fields are missing or not of their kind (flags, counts).

        A position saved before ``phase_position`` was renamed ``phase_index`` is read under the new name.
        """
        if isinstance(state, dict) and "phase_position" in state and "phase_index" not in state:
            state["phase_index"] = state.pop("phase_position")
        check_keys("the saved position", state, [field.name for field in dataclasses.fields(self)])
        for field in dataclasses.fields(self):
            value = state[field.name]
            if field.type == "bool":
                check_flag(field.name, value)
            else:  # the phase and the batch are -1 before the first
                check_integer(field.name, value, -1 if field.name in ("phase_index", "batch_index") else 0)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, state[field.name])


def check_position_fits(epochs: int | None, state: dict[str, Any], max_steps: int | None = None) -> None:
    """Raise ``CheckpointError`` unless the saved position is one this run can be at, between batches.

    Args:
        epochs: The run's epochs (a finished run may be given more, not fewer); None: no limit.
        state: A whole saved state (its ``position``, ``machine`` and ``data`` parts; the data part, already
            checked against this run, gives the batches of each phase where the run was saved).
        max_steps: The run's ``max_steps`` (the checkpoint's steps may not be more); None: no limit.
    """
    # A phase that streams takes a set number of batches an epoch, which the settings compare.
    phase_lengths = [None if phase.get("stream") else phase["batches"] for phase in state["data"]]
    position, where = state["position"], state["machine"]["state"]
    phase, batch = position["phase_index"], position["batch_index"]
    if where not in AT_REST:
        raise CheckpointError(f"the run was saved in state {where!r}, inside a batch; a run is saved between batches")
    if not -1 <= phase < len(phase_lengths) or (where == "phase" and phase < 0):
        raise CheckpointError(f"the saved phase index {phase} is not one of this run's {len(phase_lengths)} phase(s)")
    length = phase_lengths[phase] if where == "phase" else None
    if length is not None and batch >= length:
        raise CheckpointError(f"the saved batch index {batch} is past the {length} batches of phase {phase}")
    if position["epoch"] > position["epochs_done"] or position["epochs_done"] > position["epoch"] + 1:
        raise CheckpointError(f"the saved epoch {position['epoch']} and epochs done {position['epochs_done']} disagree")
    finishing = (state["machine"].get("pending") or {}).get("event") == "finish"  # saved as the run ended
    if max_steps is not None and position["global_step"] > max_steps:
        raise CheckpointError(f"the checkpoint is from a run past max_steps={max_steps} (it has taken "
                              f"{position['global_step']} steps); resume with at least that many")  # fmt: skip
    if epochs is None:
        return
    if position["epochs_done"] > epochs or (position["epochs_done"] == epochs and not position["finished"]
                                            and not finishing):  # fmt: skip
        raise CheckpointError(f"the checkpoint is from a run of more than epochs={epochs} (it is at epoch "
                              f"{position['epoch'] + 1}, {position['epochs_done']} done); resume with at least "
                              f"epochs={position['epochs_done'] + (not position['finished'])}")  # fmt: skip


class Shown:
    """A read-only attribute that shows the attribute of the same name of one of its owner's parts.

    Once its name is known it puts a ``property`` of an ``operator.attrgetter`` in its place on the owner: the read
    runs in C (callbacks read ``trainer.loss`` every batch), at about a third of a Python ``__get__``'s cost.

    Args:
        part: The owner's attribute that holds the part (``"position"``).
    """

    def __init__(self, part: str) -> None:
        self.part = part

    def __set_name__(self, owner: type, name: str) -> None:
        setattr(owner, name, property(attrgetter(f"{self.part}.{name}"), doc=f"The {self.part}'s {name}."))

    def __get__(self, instance: Any, owner: type | None = None) -> Any:  # for type checkers: replaced at run time
        raise AttributeError(self.part)


class Metrics(dict):  # type: ignore[type-arg]
    """The latest value of every metric, by name (``train_loss``...): a dict that saves itself.

    A metric's value is a number (an int or a float, NaN and infinities
    included: a phase without batches, a diverged loss) or a 0-dim tensor of
    one, as the loggers read it; never a bool or a string. A save refuses
    anything else, so every checkpoint the run writes loads again.
    """

    def state_dict(self) -> dict[str, Any]:
        """The metrics, by name; ``TypeError`` naming a value that is not a metric's."""
        for name, value in self.items():
            if not isinstance(name, str) or not is_metric_value(value):
                raise TypeError(f"trainer.metrics[{name!r}] is {describe(value)}: a metric is a number or a 0-dim "
                                "tensor, under a string name")  # fmt: skip
        return dict(self)

    def check_fits(self, state: Any) -> None:
        """Refuse saved metrics that are not a dict of names to numbers or 0-dim tensors."""
        if not isinstance(state, dict):
            raise CheckpointError(f"the saved metrics are {describe(state)}, not a dict of names to values")
        for name, value in state.items():
            if not isinstance(name, str):
                raise CheckpointError(f"a metric's name is {describe(name)}, not a string")
            if not is_metric_value(value):
                raise CheckpointError(f"{name} is {describe(value)}, not a number or a 0-dim tensor")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clear()
        self.update(tensors_to(state, torch.device("cpu")))  # copies, not views of the checkpoint file


class CallbackStates:
    """The callbacks' states, by callback key, each loaded with its tensors on the run's device.

    Args:
        callbacks: The trainer's callbacks.
        device: Where every tensor of a loaded callback state goes (a new copy,
            whatever device wrote it).
        running: The callbacks that run in this process, which load their state
            (all but the ``rank_zero_only`` ones on ranks other than 0); None: all.
    """

    def __init__(self, callbacks: Sequence[Callback], device: torch.device,
                 running: Sequence[Callback] | None = None, ranks: Ranks = Ranks()) -> None:  # fmt: skip
        self.callbacks, self.device, self.ranks = callbacks, device, ranks
        self.running = list(callbacks) if running is None else list(running)

    def state_dict(self) -> dict[str, Any]:
        return {callback.key: {"ranks": gather_tree(callback.state_dict(), self.ranks, self.device)}
                if callback.state_per_rank else callback.state_dict() for callback in self.callbacks}  # fmt: skip

    def check_fits(self, state: dict[str, Any]) -> None:
        """Refuse the callbacks' saved states unless each callback loaded here accepts its own.

        Every callback needs a state; each one that runs in this process is given
        what it would load to its ``check_fits``: a callback with a state per rank,
        every saved rank's and, from another number of ranks, this rank's
        regrouped state. Errors are ``CheckpointError`` that begin with the
        callback's key (and the saved rank)."""
        if not isinstance(state, dict):
            raise CheckpointError(f"the callbacks' states are {describe(state)}, not a dict by callback key")
        missing = [callback.key for callback in self.callbacks if callback.key not in state]
        if missing:
            raise CheckpointError(f"the checkpoint has no state for callback(s) {', '.join(missing)}")
        here = {callback.key for callback in self.callbacks}
        for key, saved in state.items():
            if key not in here and isinstance(saved, dict) and isinstance(saved.get(REQUIRED_TO_LOAD), str):
                raise CheckpointError(f"{key}: the checkpoint needs this callback to load: {saved[REQUIRED_TO_LOAD]}")
        for callback in self.callbacks:
            saved = state[callback.key]
            if callback.state_per_rank and not (isinstance(saved, dict) and isinstance(saved.get("ranks"), list)
                                                and saved["ranks"]):  # fmt: skip
                raise CheckpointError(f"{callback.key}: the checkpoint holds no state per rank for it")
        for callback in self.running:
            saved = state[callback.key]
            if not callback.state_per_rank:
                _check_callback_state(callback, saved, callback.key)
                continue
            states = saved["ranks"]
            for rank, rank_state in enumerate(states):
                _check_callback_state(callback, rank_state, f"{callback.key}: rank {rank}")
            if len(states) != self.ranks.world_size:
                where = f"{callback.key}: its {len(states)} saved rank(s) regrouped for {self.ranks.world_size}"
                try:
                    regrouped = callback.regroup_states(states, self.ranks.world_size)[self.ranks.rank]
                except _MISFITS as error:
                    raise CheckpointError(f"{where}: {error!r}") from error
                _check_callback_state(callback, regrouped, where)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rank, world_size = self.ranks.rank, self.ranks.world_size
        for callback in self.running:
            saved = state[callback.key]
            if callback.state_per_rank:
                states = saved["ranks"]
                saved = states[rank] if len(states) == world_size else callback.regroup_states(states, world_size)[rank]
            callback.load_state_dict(tensors_to(saved, self.device))


_MISFITS = (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError)  # a state of the wrong kind


def is_metric_value(value: Any) -> bool:
    """Whether ``value`` can be a metric's: an int or a float (not a bool), or a 0-dim tensor of a real dtype."""
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not value.is_complex() and value.dtype != torch.bool
    return is_real(value)


def _check_callback_state(callback: Callback, state: Any, where: str) -> None:
    """``callback.check_fits(state)``, its errors as ``CheckpointError`` that begin with ``where``."""
    try:
        callback.check_fits(state)
    except CheckpointError as error:
        raise CheckpointError(f"{where}: {error}") from error
    except _MISFITS as error:
        raise CheckpointError(f"{where}: the saved state does not fit this callback: {error!r}") from error


class RunIdentity:
    """Which run this is: an id its checkpoints carry, and a fingerprint of what makes it the same run.

    A folder of checkpoints belongs to one run: its ``run.json`` marker (see
    ``statetrainer.checkpoint.folder``) holds the run's id, seed and
    fingerprint, so a second run given the same folder is stopped before it
    saves or prunes anything there, and a restart never adopts another run.

    Args:
        fingerprint: What must not change between a run and its resumption
            (phases, model keys and shapes, optimizer class), hashed.
        generators: The run's generators: its seed, and whether the user chose
            it (an open seed takes the checkpoint's).
    """

    def __init__(self, fingerprint: str, generators: Generators) -> None:
        self.id, self.fingerprint, self.generators = uuid.uuid4().hex, fingerprint, generators

    @classmethod
    def for_run(cls, phase_layout: list[tuple[str, int | None]], model: torch.nn.Module,
                optimizer: torch.optim.Optimizer | None, generators: Generators) -> RunIdentity:  # fmt: skip
        """The identity of a new run of these phases (name, batches), model and optimizer."""
        tensors = [
            (key, list(value.shape), str(value.dtype)) for key, value in unwrap_model(model).state_dict().items()
        ]
        described = json.dumps([phase_layout, tensors, optimizer_class_name(optimizer)]).encode()
        return cls(hashlib.blake2b(described, digest_size=8).hexdigest(), generators)

    def marker(self) -> dict[str, Any]:
        """What a folder's run marker records of this run."""
        return {"run": self.id, "seed": self.generators.seed, "fingerprint": self.fingerprint}

    def accept_marker(self, marker: dict[str, Any], folder: Any) -> None:
        """Continue the run ``folder``'s marker describes, or raise ``CheckpointError`` if it is another run."""
        seed = self.generators.seed
        seed_differs = self.generators.chosen and marker.get("seed") != seed
        if seed_differs or marker.get("fingerprint") != self.fingerprint:
            why = (f"seed {marker.get('seed')}, this trainer's is {seed}" if seed_differs
                   else "other phases, model or optimizer than this trainer's")  # fmt: skip
            raise CheckpointError(f"{folder} holds another run (run {marker.get('run')}, {why}); give this run a "
                                  "folder of its own, or build the trainer as that run was built to resume it")  # fmt: skip
        self.id = str(marker.get("run", self.id))  # this run, restarted (perhaps before its first checkpoint)

    def state_dict(self) -> dict[str, Any]:
        return {"id": self.id, "fingerprint": self.fingerprint}

    def check_fits(self, state: dict[str, Any]) -> None:
        """Refuse a saved identity without a run id (printable text) and a fingerprint."""
        check_keys("the saved run identity", state, ("id", "fingerprint"))
        if not isinstance(state["id"], str) or not state["id"] or not state["id"].isprintable():
            raise CheckpointError(f"id is {describe(state['id'])}, not a run id")
        if not isinstance(state["fingerprint"], str):
            raise CheckpointError(f"fingerprint is {describe(state['fingerprint'])}, not a string")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.id = state["id"]  # the same run, continued


class RunSettings:
    """The settings an exact resume depends on: saved with the run, and compared when it resumes.

    A checkpoint saved with other settings is refused with ``CheckpointError``
    naming each old and new value, unless ``allowed`` (set by
    ``load_checkpoint(..., allow_changes=...)``) names the change: a setting
    (``"accumulate"``), or one phase's (``"train.batch_size"``) or every
    phase's (``"batch_size"``). An allowed change loads, and the run goes on
    from there, but no longer as the uninterrupted run would have.

    Args:
        settings: Each setting's name and value.
    """

    RECORDED_LATER = frozenset({"sharded_precision"})  # a checkpoint from before they were recorded has none

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings, self.allowed = settings, frozenset[str]()

    def allow(self, names: Iterable[str]) -> None:
        """Let the settings ``names`` differ from a checkpoint's (``load_checkpoint``'s ``allow_changes``)."""
        self.allowed = frozenset(names)

    @classmethod
    def for_run(cls, phases: Sequence[Any], accumulate: int, precision: str | None, world_size: int = 1,
                sharded_precision: dict[str, str] | None = None) -> RunSettings:  # fmt: skip
        """The settings of a run of ``phases`` (``Phase`` objects) on ``world_size`` processes: each phase's batch
        size and samples, the mixed precision of a model sharded with FSDP2 (``sharded_precision``), and more."""
        settings: dict[str, Any] = {"accumulate": accumulate, "precision": precision, "world_size": world_size}
        if sharded_precision is not None:  # absent otherwise, as in checkpoints from before it was recorded
            settings["sharded_precision"] = sharded_precision
        for phase in phases:
            dataset = getattr(phase.loader, "dataset", None)
            settings[f"{phase.name}.batch_size"] = getattr(phase.loader, "batch_size", None)
            settings[f"{phase.name}.limit"] = phase.limit
            settings[f"{phase.name}.batches"] = phase.batches
            settings[f"{phase.name}.samples"] = len(dataset) if isinstance(dataset, Sized) else None
        return cls(settings)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.settings)

    def check_fits(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict):
            raise CheckpointError(f"the saved settings are {describe(state)}, not a dict of names to values")
        changed = [name for name, value in self.settings.items() if state.get(name) != value
                   and name not in self.allowed and name.split(".")[-1] not in self.allowed
                   and (name in state or name not in self.RECORDED_LATER)]  # fmt: skip
        if changed:
            values = "; ".join(f"{name}={state.get(name)!r} in the checkpoint, {self.settings[name]!r} now"
                               for name in changed)  # fmt: skip
            raise CheckpointError(f"the run was saved with other settings: {values}. Resume with the same settings, "
                                  f"or allow the change with load_checkpoint(..., allow_changes={sorted(changed)})"
                                  " (the run then no longer repeats the uninterrupted one)")  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to take: the settings are the trainer's own."""
