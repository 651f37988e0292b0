"""Periodic checkpoints of the whole run, the best one kept apart, old ones pruned."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

from ..checkpoint import atomic_copy, checkpoint_files, remove_stale_temporaries
from ..validation import check_count
from .base import Callback, TrainerView
from .finite import NonFiniteError, first_non_finite

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

    In a phase whose loader cannot be resumed mid-phase (see
    ``statetrainer.data.resumable``), step checkpoints are skipped with a
    warning, so such a run resumes from an epoch boundary.

    Args:
        folder: Where the checkpoints go.
        every_steps: Save after every this many optimizer steps; None: never.
        every_epochs: Save after every this many epochs; None: never.
        keep_last: How many numbered checkpoints to keep (None keeps all).
        best: A ``trainer.metrics`` name to keep the best checkpoint of.
        best_mode: ``"min"`` or ``"max"``; ``"auto"`` means min for names with
            ``loss`` or ``error`` in them, else max.
        keep_best: How many of the best epochs' checkpoints to keep (with ``best``).
        name: The callback's unique name (defaults to the class name).
    """

    def __init__(
        self,
        folder: str | os.PathLike[str] = "checkpoints",
        every_steps: int | None = None,
        every_epochs: int | None = 1,
        keep_last: int | None = 3,
        best: str | None = None,
        best_mode: str = "auto",
        keep_best: int | None = None,
        name: str | None = None,
    ) -> None:
        for label, value in (("every_steps", every_steps), ("every_epochs", every_epochs), ("keep_last", keep_last),
                             ("keep_best", keep_best)):  # fmt: skip
            check_count(f"Checkpoint: {label}", value, optional=True)
        if keep_best is not None and best is None:
            raise ValueError("Checkpoint: keep_best needs best='<metric>' to rank the checkpoints by")
        if best is not None and not isinstance(best, str):
            raise TypeError(f"Checkpoint: best is the name of a metric to keep the best checkpoint of, such as "
                            f"best='valid_accuracy' (its mode inferred, or best_mode='max'), not {best!r}")  # fmt: skip
        if best_mode not in ("auto", "min", "max"):
            raise ValueError(f"Checkpoint: best_mode must be 'auto', 'min' or 'max', got {best_mode!r}")
        if best_mode == "auto" and best is not None:
            best_mode = "min" if ("loss" in best or "error" in best) else "max"
        self.folder = Path(folder)
        self.every_steps, self.every_epochs, self.keep_last = every_steps, every_epochs, keep_last
        self.best, self.best_mode, self.name = best, best_mode, name
        self.best_value = math.inf if best_mode == "min" else -math.inf
        self.keep_best = keep_best
        self.ranked: list[tuple[float, int]] = []  # the best epochs kept (value, epoch from 1), best first
        self._keep_epoch: int | None = None  # the epoch whose checkpoint is due to join the best
        self._due = False
        self._best_due = False
        self._warned = False
        self._cleaned = False
        self._last_saved: tuple[tuple[Any, ...], Path] | None = None

    @property
    def best_path(self) -> Path:
        return self.folder / "best.safetensors"

    def on_exit_step(self, trainer: TrainerView) -> None:
        if self.every_steps is not None and trainer.global_step % self.every_steps == 0:
            self._request(trainer)

    def on_exit_epoch(self, trainer: TrainerView) -> None:
        if self.best is not None:
            if self.best not in trainer.metrics:
                raise KeyError(
                    f"Checkpoint(best={self.best!r}): no such metric; trainer.metrics has "
                    f"{', '.join(trainer.metrics) or 'nothing'}"
                )
            value = trainer.metrics[self.best]
            if value < self.best_value if self.best_mode == "min" else value > self.best_value:
                self.best_value = value
                self._best_due = True
                self._request(trainer)
            if self.keep_best is not None and self._ranks_among_best(value, trainer.epoch + 1):
                self._request(trainer)
        if self.every_epochs is not None and (trainer.epoch + 1) % self.every_epochs == 0:
            self._request(trainer)

    def _request(self, trainer: TrainerView) -> None:
        if not self._due:
            self._due = True
            trainer.defer(self._save)

    def _save(self, trainer: TrainerView) -> None:
        self._due = False
        if trainer.state == "phase" and not trainer.can_checkpoint_here():
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"Checkpoint: phase {trainer.phase.name!r} cannot be resumed mid-phase; "
                    "its step checkpoints are skipped, so this run resumes from an epoch boundary",
                    stacklevel=2,
                )
            return
        self.save(trainer)

    def save(self, trainer: TrainerView) -> Path:
        """Checkpoint ``trainer`` into the folder now, then prune; return the file.

        The trainer must be between batches (a deferred action, or outside
        ``fit()``). Asked twice at one position, it writes once and returns
        that file again.
        """
        position = (trainer.state, trainer.epoch, trainer.phase, trainer.batch_index, trainer.global_step)
        if self._last_saved is not None and self._last_saved[0] == position and self._last_saved[1].exists():
            return self._last_saved[1]
        writer = trainer.is_global_zero  # under torchrun, rank 0 alone touches the folder
        if not self._cleaned and writer:  # what an earlier, killed run left half-written
            self._cleaned = True
            remove_stale_temporaries(self.folder)
        bad = first_non_finite(dict(trainer.model.named_parameters()))
        if bad is not None:  # never save, nor prune the good ones for, a run that has gone to NaN
            kept = checkpoint_files(self.folder)
            raise NonFiniteError(f"Checkpoint: parameter {bad!r} is not finite, so the run is not saved; the last "
                                 f"checkpoint, {kept[-1] if kept else 'none'}, is kept")  # fmt: skip
        best_due, self._best_due = self._best_due, False
        path = trainer.save_checkpoint(self.folder)
        self._last_saved = position, path
        if best_due and writer:
            atomic_copy(path, self.best_path)
        if self.keep_best is not None and writer:
            self._keep_the_best(path)
        if self.keep_last is not None and writer:  # only now that the new file is durable
            for old in checkpoint_files(self.folder)[: -self.keep_last]:
                old.unlink(missing_ok=True)
        return path

    def _ranks_among_best(self, value: float, epoch: int) -> bool:
        """Enter this epoch among the ``keep_best`` best, if it is; True when it is (its checkpoint is due)."""
        ranked = sorted([*self.ranked, (value, epoch)], key=lambda entry: entry[0], reverse=self.best_mode == "max")
        self.ranked = ranked[: self.keep_best]
        self._keep_epoch = epoch if (value, epoch) in self.ranked else None
        return self._keep_epoch is not None

    def best_epoch_path(self, epoch: int) -> Path:
        """Where the checkpoint of ``epoch`` (from 1) is kept while it ranks among the best."""
        return self.folder / f"best-epoch{epoch:04d}.safetensors"

    def _keep_the_best(self, path: Path) -> None:
        """Copy ``path`` as its epoch's best checkpoint if it ranks, and delete those that dropped out."""
        if self._keep_epoch is not None:
            atomic_copy(path, self.best_epoch_path(self._keep_epoch))
            self._keep_epoch = None
        kept = {self.best_epoch_path(epoch) for _, epoch in self.ranked}
        for old in self.folder.glob("best-epoch*.safetensors"):
            if old not in kept:  # dropped out, or written by a run killed after its newest checkpoint
                old.unlink(missing_ok=True)

    def state_dict(self) -> dict[str, Any]:
        return {"best_value": self.best_value, "ranked": [[value, epoch] for value, epoch in self.ranked]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_value = float(state["best_value"])
        self.ranked = [(float(value), int(epoch)) for value, epoch in state.get("ranked", [])]

