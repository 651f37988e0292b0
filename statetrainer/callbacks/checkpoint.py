"""Periodic checkpoints of the whole run, the best one kept apart, old ones pruned."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

from ..checkpoint import (
    CheckpointError,
    CheckpointFolder,
    copy_with_pieces,
    read_document,
    remove_orphan_pieces,
    remove_shard_files,
    remove_stale_temporaries,
    run_of,
)
from ..saved_state import check_integer, check_real
from ..validation import check_count
from .base import Callback, TrainerView
from .finite import NonFiniteError, first_non_finite
from .periodic import check_every, due

__all__ = ["Checkpoint"]


class Checkpoint(Callback):
    """Saves the run into ``folder`` every few steps and/or epochs.

    Each save is a numbered safetensors file written atomically, taken once
    the machine is between batches (the request made in a hook is carried out
    at the end of that transition). After a new file is durable, all but the
    newest ``keep_last`` are deleted. With ``best``, the checkpoint of the
    epoch with the best value of that metric is also kept as ``best.safetensors``,
    and with ``keep_best=k`` the k best epochs' as ``best-epoch0003.safetensors``
    (epochs counted from 1), the others deleted as they drop out.

    Resuming is ``trainer.load_checkpoint(folder)`` before ``trainer.fit()``.

    With ``background=True`` the scheduled saves return once the state is
    staged, and a worker thread writes the file while training goes on (see
    ``Trainer.save_checkpoint``); pruning and the best copies follow once that
    file is durable. A save due while the previous one is still being written
    waits for it, or with ``when_busy="skip"`` is skipped; the
    ``statetrainer.checkpoint`` log says which. The save a stop signal asks for
    is always written before the process exits.

    Where the run cannot be resumed (``trainer.why_not_checkpoint_here()``),
    the checkpoint is skipped with a warning: in a phase whose loader cannot
    be resumed mid-phase (see ``statetrainer.data.resumable``) the step
    checkpoints are, so such a run resumes from an epoch boundary; once a
    stream that cannot start again where it stands has begun, all are.

    Args:
        folder: Where the checkpoints go.
        every_steps: Save after every this many optimizer steps; None: never.
        every_epochs: Save after every this many epochs; None: never.
        keep_last: How many numbered checkpoints to keep (None keeps all).
        best: A ``trainer.metrics`` name to keep the best checkpoint of.
        best_mode: ``"min"`` or ``"max"``; ``"auto"`` means min for names with
            ``loss`` or ``error`` in them, else max.
        keep_best: How many of the best epochs' checkpoints to keep (with ``best``).
        background: Write the scheduled saves in a worker thread while training goes on.
        when_busy: With ``background``, what a save due while a write is in flight does: ``"wait"`` for it,
            or ``"skip"`` this save.
        name: The callback's unique name (defaults to the class name).
    """

    saves_checkpoints = True

    def __init__(self, folder: str | os.PathLike[str] = "checkpoints", every_steps: int | None = None,
                 every_epochs: int | None = 1, keep_last: int | None = 3, best: str | None = None,
                 best_mode: str = "auto", keep_best: int | None = None, background: bool = False,
                 when_busy: str = "wait", name: str | None = None) -> None:  # fmt: skip
        check_every("Checkpoint: every_steps", every_steps, never=True)
        check_every("Checkpoint: every_epochs", every_epochs, never=True)
        for label, value in (("keep_last", keep_last), ("keep_best", keep_best)):
            check_count(f"Checkpoint: {label}", value, optional=True)
        if keep_best is not None and best is None:
            raise ValueError("Checkpoint: keep_best needs best='<metric>' to rank the checkpoints by")
        if best is not None and not isinstance(best, str):
            raise TypeError(f"Checkpoint: best is the name of a metric to keep the best checkpoint of, such as "
                            f"best='valid_accuracy' (its mode inferred, or best_mode='max'), not {best!r}")  # fmt: skip
        if when_busy not in ("wait", "skip"):
            raise ValueError(f"Checkpoint: when_busy is 'wait' (for the write in flight) or 'skip' (this save), "
                             f"not {when_busy!r}")  # fmt: skip
        if best_mode not in ("auto", "min", "max"):
            raise ValueError(f"Checkpoint: best_mode must be 'auto', 'min' or 'max', got {best_mode!r}")
        if best_mode == "auto" and best is not None:
            best_mode = "min" if ("loss" in best or "error" in best) else "max"
        self.folder = Path(folder)
        self.every_steps, self.every_epochs, self.keep_last = every_steps, every_epochs, keep_last
        self.best, self.best_mode, self.name = best, best_mode, name
        self.best_value = math.inf if best_mode == "min" else -math.inf
        self.keep_best, self.background, self.when_busy = keep_best, bool(background), when_busy
        self.best_epoch: int | None = None  # the epoch (from 1) whose checkpoint best.safetensors is
        self.ranked: list[tuple[float, int]] = []  # the best epochs kept (value, epoch from 1), best first
        self._due = False
        self._must_write = False  # a save of the best epochs, which is never skipped
        self._warned = False
        self._last_saved: tuple[tuple[Any, ...], Path] | None = None
        self._runs: dict[Path, str | None] = {}  # the run of each checkpoint file read so far

    @property
    def layout(self) -> CheckpointFolder:
        """The folder's layout: which file is which."""
        return CheckpointFolder(self.folder)

    @property
    def best_path(self) -> Path:
        return self.layout.best

    def best_epoch_path(self, epoch: int) -> Path:
        """Where the checkpoint of ``epoch`` (from 1) is kept while it ranks among the best."""
        return self.layout.best_of_epoch(epoch)

    def output_files(self) -> list[Path]:
        return self.layout.written()

    def monitored_metrics(self) -> set[str]:
        return set() if self.best is None else {self.best}

    def open_files(self, trainer: TrainerView) -> None:
        """Remove what a killed writer left half-written, and remake the best copies the loaded state names."""
        remove_stale_temporaries(self.folder)
        remove_orphan_pieces(self.folder)
        if self.best is not None:
            remake_best_copies(self.layout, self._wanted_best_copies(), None)
        self._prune((self.layout.read_marker() or {}).get("run"))  # a run killed before it pruned

    def on_exit_step(self, trainer: TrainerView) -> None:
        if due(trainer.global_step, self.every_steps):
            self._request(trainer)

    def on_exit_epoch(self, trainer: TrainerView) -> None:
        if self.best is not None:
            if self.best not in trainer.metrics:
                raise KeyError(
                    f"Checkpoint(best={self.best!r}): no such metric; trainer.metrics has "
                    f"{', '.join(trainer.metrics) or 'nothing'}"
                )
            value, epoch = float(trainer.metrics[self.best]), trainer.epoch + 1
            if value < self.best_value if self.best_mode == "min" else value > self.best_value:
                self.best_value, self.best_epoch = value, epoch
                self._request(trainer, must_write=True)
            if self.keep_best is not None and self._ranks_among_best(value, epoch):
                self._request(trainer, must_write=True)
        if due(trainer.epoch + 1, self.every_epochs):
            self._request(trainer)

    def _request(self, trainer: TrainerView, must_write: bool = False) -> None:
        self._must_write = self._must_write or must_write  # the best copies are made from this epoch's file
        if not self._due:
            self._due = True
            trainer.defer(self._save)

    def _save(self, trainer: TrainerView) -> None:
        must_write, self._due, self._must_write = self._must_write, False, False
        why_not = trainer.why_not_checkpoint_here()
        if why_not is not None:
            if not self._warned:
                self._warned = True
                where = f"inside phase {trainer.phase.name!r}" if trainer.state == "phase" and trainer.phase else "here"
                warnings.warn(f"Checkpoint: the run cannot be resumed from {where} ({why_not}), so its checkpoints "
                              "there are skipped; a restart resumes from the newest one saved", stacklevel=2)  # fmt: skip
            return
        self._write(trainer, self.background, "wait" if must_write else self.when_busy)

    def save(self, trainer: TrainerView) -> Path:
        """Checkpoint ``trainer`` into the folder now, then update the best copies and prune; return the file
        once it is durable. A background write in flight is waited for first; if it failed, that is warned
        about, and this save is made all the same (the save a stop signal asks for is this one).

        The trainer must be between batches (a deferred action, or outside
        ``fit()``). Asked twice at one position, it writes once and returns
        that file again. Pruning deletes only this run's own checkpoints.
        Under torchrun every rank calls it.
        """
        try:
            trainer.wait_for_checkpoints()
        except Exception as failure:  # noqa: BLE001 -- reported, and replaced by the save made here
            warnings.warn(f"Checkpoint: the background write in flight failed ({failure}); saving here instead",
                          stacklevel=2)  # fmt: skip
        path = self._write(trainer, background=False)
        assert path is not None  # only a background save is ever skipped
        return path

    def _write(self, trainer: TrainerView, background: bool, when_busy: str = "wait") -> Path | None:
        position = (trainer.state, trainer.epoch, trainer.phase, trainer.batch_index, trainer.global_step)
        if self._last_saved is not None and self._last_saved[0] == position:
            if background:  # written, or being written
                return self._last_saved[1]
            trainer.wait_for_checkpoints()  # on every rank: then every rank sees the file rank 0 wrote
            if self._last_saved[1].exists():
                return self._last_saved[1]
        bad = first_non_finite(dict(trainer.model.named_parameters()))
        if bad is not None:  # never save, nor prune the good ones for, a run that has gone to NaN
            kept = self.layout.checkpoints()
            raise NonFiniteError(f"Checkpoint: parameter {bad!r} is not finite, so the run is not saved; the last "
                                 f"checkpoint, {kept[-1] if kept else 'none'}, is kept")  # fmt: skip
        wanted = self._wanted_best_copies()  # taken now: the training may change the ranking while the file is written
        path = trainer.save_checkpoint(self.folder, background=background, when_busy=when_busy,
                                       on_written=lambda written: self._written(written, wanted))  # fmt: skip
        if path is not None:
            self._last_saved = position, path
        return path

    def _written(self, path: Path, wanted: dict[Path, int]) -> None:
        """Once ``path`` is durable, in the process that wrote it: the best copies, then pruning."""
        if self.best is not None:  # made from the checkpoints, so a kill at any point leaves them remade on resume
            remake_best_copies(self.layout, wanted, path)
        self._prune(self._run_of(path))

    def _prune(self, run: str | None) -> None:
        """Delete all but the newest ``keep_last`` checkpoints of run ``run`` (never another run's)."""
        if self.keep_last is None:
            return
        ours = [path for path in self.layout.checkpoints() if run is not None and self._run_of(path) == run]
        for old in ours[: -self.keep_last]:
            old.unlink(missing_ok=True)  # the checkpoint first: it no longer counts
            remove_shard_files(old)
            self._runs.pop(old, None)

    def _run_of(self, path: Path) -> str | None:
        """The run a checkpoint of the folder belongs to (read once per file: a checkpoint never changes)."""
        if path not in self._runs:
            self._runs[path] = run_of(path)
        return self._runs[path]

    def _ranks_among_best(self, value: float, epoch: int) -> bool:
        """Enter this epoch among the ``keep_best`` best, if it is; True when it is (its checkpoint is due)."""
        ranked = sorted([*self.ranked, (value, epoch)], key=lambda entry: entry[0], reverse=self.best_mode == "max")
        self.ranked = ranked[: self.keep_best]
        return (value, epoch) in self.ranked

    def _wanted_best_copies(self) -> dict[Path, int]:
        """The best copies the state names: each file, and the epoch (from 1) whose end it must hold."""
        wanted = {self.best_epoch_path(epoch): epoch for _, epoch in self.ranked}
        if self.best_epoch is not None:
            wanted[self.best_path] = self.best_epoch
        return wanted

    def state_dict(self) -> dict[str, Any]:
        return {"best_value": self.best_value, "best_epoch": self.best_epoch,
                "ranked": [[value, epoch] for value, epoch in self.ranked]}  # fmt: skip

    def check_fits(self, state: dict[str, Any]) -> None:
        check_real("best_value", state["best_value"], finite=False)
        if state.get("best_epoch") is not None:
            check_integer("best_epoch", state["best_epoch"], minimum=1)
        ranked = state["ranked"]
        if not isinstance(ranked, list) or not all(isinstance(entry, list) and len(entry) == 2 for entry in ranked):
            raise CheckpointError(f"ranked is {ranked!r}, not a list of [value, epoch from 1] pairs")
        for index, (value, epoch) in enumerate(ranked):
            check_real(f"ranked[{index}] value", value, finite=False)
            check_integer(f"ranked[{index}] epoch", epoch, minimum=1)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_value, self.best_epoch = float(state["best_value"]), state.get("best_epoch")
        self.ranked = [(float(value), int(epoch)) for value, epoch in state["ranked"]][: self.keep_best]


def remake_best_copies(layout: CheckpointFolder, wanted: dict[Path, int], newest: Path | None) -> None:
    """Make each best copy in ``wanted`` the run's checkpoint of the end of its epoch (from 1), taken from the
    folder's checkpoints (``newest`` first), and delete the best-epoch copies not wanted."""
    run = (layout.read_marker() or {}).get("run")
    for target, epoch in wanted.items():
        if _ends_epoch(target, epoch, run):
            continue
        sources = [newest] if newest is not None else []
        sources += reversed(layout.checkpoints(epoch))
        source = next((path for path in sources if _ends_epoch(path, epoch, run)), None)
        if source is None:
            warnings.warn(f"Checkpoint: {target} cannot be made: no checkpoint of the end of epoch {epoch} is left "
                          f"in {layout.path}", stacklevel=4)  # fmt: skip
            continue
        copy_with_pieces(source, target)
    for old in layout.ranked_copies():
        if old not in wanted:  # dropped out, or written by a run killed after its newest checkpoint
            old.unlink(missing_ok=True)
            remove_shard_files(old)


def _ends_epoch(path: Path, epoch: int, run: str | None) -> bool:
    """Whether ``path`` is a checkpoint of run ``run`` saved at the end of epoch ``epoch`` (from 1)."""
    if not path.is_file():
        return False
    try:
        document = read_document(path)
        position, machine, saved_run = document["position"], document["machine"], document["run"]["id"]
        return (saved_run == run and machine["state"] in ("epoch", "idle") and machine.get("pending") is None
                and position["epochs_done"] == epoch)  # fmt: skip
    except (CheckpointError, KeyError, TypeError):
        return False
