"""Loggers: one line per epoch to a stream, and CSV rows that survive a resume."""

from __future__ import annotations

import csv
import io
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from ..validation import check_count
from ..checkpoint import atomic_write, fsync_path
from .base import Callback, TrainerView
from .metrics import running_metrics

__all__ = ["CSVLogger", "StreamLogger", "learning_rates"]


def learning_rates(trainer: TrainerView) -> dict[str, float]:
    """``{"lr": ...}`` for one param group, ``{"lr_0": ..., "lr_1": ...}`` for several."""
    if trainer.optimizer is None:
        return {}
    groups = trainer.optimizer.param_groups
    if len(groups) == 1:
        return {"lr": float(groups[0]["lr"])}
    return {f"lr_{index}": float(group["lr"]) for index, group in enumerate(groups)}


class StreamLogger(Callback):
    """Prints every metric once per epoch::

        Epoch:    1 | train_loss=0.8907, train_accuracy=0.6387, valid_loss=0.1027, valid_accuracy=0.9695

    Args:
        stream: Where to write; None means ``sys.stdout`` at the time of writing.
        name: The callback's unique name (defaults to the class name).
    """

    rank_zero_only = True  # under torchrun, rank 0 alone speaks

    def __init__(self, stream: TextIO | None = None, name: str | None = None) -> None:
        self.stream, self.name = stream, name

    @staticmethod
    def format(epoch: int, metrics: dict[str, float]) -> str:
        """The line for ``epoch`` (counted from 1)."""
        values = ", ".join(f"{key}={value:.4f}" for key, value in metrics.items())
        return f"Epoch: {epoch:4d} | {values}"

    def on_exit_epoch(self, trainer: TrainerView) -> None:
        stream = self.stream or sys.stdout
        print(self.format(trainer.epoch + 1, trainer.metrics), file=stream, flush=True)


class _CSVFile:
    """An append-only CSV file that remembers its columns and how many bytes it holds.

    A row with a column the header lacks rewrites the file with the wider
    header (atomically), so no value is ever dropped.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.columns: list[str] = []
        self.size = 0
        self._unsynced = False  # rows appended since the file was last made durable

    def append(self, row: dict[str, Any]) -> None:
        new_columns = [key for key in row if key not in self.columns]
        if new_columns:
            self._widen(self.columns + new_columns)
        buffer = io.StringIO()
        csv.DictWriter(buffer, self.columns, restval="", lineterminator="\n").writerow(row)
        self._append_text(buffer.getvalue())

    def _widen(self, columns: list[str]) -> None:
        rows = []
        if self.size:
            with open(self.path, "rb") as file:
                rows = list(csv.DictReader(io.StringIO(file.read(self.size).decode(), newline="")))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        with atomic_write(self.path) as temporary:
            temporary.write_text(buffer.getvalue(), newline="")
        self.columns, self.size = columns, len(buffer.getvalue().encode())

    def _append_text(self, text: str) -> None:
        with open(self.path, "a", newline="") as file:
            file.write(text)
        self.size += len(text.encode())
        self._unsynced = True

    def state_dict(self) -> dict[str, Any]:
        """The columns and the byte size, after making those bytes durable.

        A checkpoint records the size and refuses a shorter file, so the rows
        must reach the disk before the checkpoint does.
        """
        if self._unsynced and self.path.exists():
            fsync_path(self.path)
            fsync_path(self.path.parent)  # the file's own name may be new
            self._unsynced = False
        return {"columns": list(self.columns), "size": self.size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Go back to the file as it was when ``state`` was taken, dropping any later rows."""
        size = int(state["size"])
        actual = self.path.stat().st_size if self.path.exists() else 0
        if actual < size:
            raise RuntimeError(
                f"CSV log {self.path} holds {actual} bytes but the checkpoint expects {size}: "
                "it was truncated or replaced since the checkpoint was written"
            )
        if actual > size:
            os.truncate(self.path, size)
        self.columns, self.size = list(state["columns"]), size


class CSVLogger(Callback):
    """One CSV row per epoch with every metric and the learning rate.

    Rows hold ``epoch`` (from 1), ``step`` (optimizer steps so far), every
    ``trainer.metrics`` entry and ``lr`` (``lr_0, lr_1, ...`` for several param
    groups). With ``every_batches=N``, every N-th batch of each phase also gets a
    row in ``<stem>_batches.csv`` beside it, with the phase's running metrics.

    When a run resumes from a checkpoint, the files are cut back to what they
    held at that checkpoint and appended to, so no row is ever written twice.

    Args:
        path: The epoch log, e.g. ``checkpoints/run1/log.csv``.
        every_batches: Also log every N-th batch; None logs epochs only.
        name: The callback's unique name (defaults to the class name).
    """

    rank_zero_only = True  # under torchrun, rank 0 alone speaks

    def __init__(self, path: str | os.PathLike[str], every_batches: int | None = None, name: str | None = None) -> None:
        check_count("CSVLogger: every_batches", every_batches, optional=True)
        self.path = Path(path)
        self.every_batches = every_batches
        self.name = name
        self.epochs = _CSVFile(self.path)
        self.batches = _CSVFile(self.path.with_name(f"{self.path.stem}_batches{self.path.suffix or '.csv'}"))
        self._started = False

    def on_exit_idle(self, trainer: TrainerView) -> None:
        if not self._started:  # a fresh run starts a fresh log
            self._started = True
            for log in (self.epochs, self.batches):
                log.path.unlink(missing_ok=True)

    def on_exit_batch(self, trainer: TrainerView) -> None:
        if self.every_batches is not None and (trainer.batch_index + 1) % self.every_batches == 0:
            row = {"epoch": trainer.epoch + 1, "phase": trainer.phase.name, "batch": trainer.batch_index + 1,
                   "step": trainer.global_step, **running_metrics(trainer), **learning_rates(trainer)}  # fmt: skip
            self.batches.append(row)

    def on_exit_epoch(self, trainer: TrainerView) -> None:
        self.epochs.append(
            {"epoch": trainer.epoch + 1, "step": trainer.global_step, **trainer.metrics, **learning_rates(trainer)}
        )

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs.state_dict(), "batches": self.batches.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epochs.load_state_dict(state["epochs"])
        self.batches.load_state_dict(state["batches"])
        self._started = True
