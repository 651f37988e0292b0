"""Loggers: one line per epoch to a stream, and CSV rows that survive a resume."""

from __future__ import annotations

import csv
import io
import os
import stat
import sys
from pathlib import Path
from typing import Any, TextIO

from ..checkpoint import atomic_write, fsync_path, open_no_follow
from ..errors import CheckpointError
from .base import Callback, TrainerView
from .metrics import running_metrics
from .periodic import check_every, due

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
    """An append-only CSV file that remembers its columns, its rows and how many bytes it holds.

    A row with a column the header lacks rewrites the file with the wider
    header (atomically), so no value is ever dropped. A checkpoint records the
    columns, rows and bytes; a resumed run makes the file exactly that again,
    whatever a killed run did to it after the checkpoint (more rows, a wider
    header), and is refused when the file holds less. The file is never
    written through a symbolic link.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.columns: list[str] = []
        self.size = self.rows = 0
        self._unsynced = False  # rows appended since the file was last made durable
        self._restore: dict[str, Any] | None = None  # the loaded state, made real by open()

    def append(self, row: dict[str, Any]) -> None:
        new_columns = [key for key in row if key not in self.columns]
        if new_columns:
            self._widen(self.columns + new_columns)
        buffer = io.StringIO()
        csv.DictWriter(buffer, self.columns, restval="", lineterminator="\n").writerow(row)
        self._append_text(buffer.getvalue())
        self.rows += 1

    def _widen(self, columns: list[str]) -> None:
        rows = self._read_rows(self.size) if self.size else []
        self._rewrite(columns, rows)

    def _read_rows(self, size: int | None = None) -> list[dict[str, str]]:
        """The rows of the file's first ``size`` bytes (all of it for None), by the header the file has."""
        descriptor = open_no_follow(self.path, os.O_RDONLY)
        with os.fdopen(descriptor, "rb") as file:
            text = file.read(size).decode() if size is not None else file.read().decode()
        return list(csv.DictReader(io.StringIO(text, newline="")))

    @staticmethod
    def _render(columns: list[str], rows: list[dict[str, str]]) -> bytes:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, columns, restval="", extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue().encode()

    def _rewrite(self, columns: list[str], rows: list[dict[str, str]]) -> None:
        content = self._render(columns, rows)
        with atomic_write(self.path) as temporary:
            temporary.write_bytes(content)
        self.columns, self.size, self.rows = columns, len(content), len(rows)

    def _append_text(self, text: str) -> None:
        data = text.encode()
        descriptor = open_no_follow(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(descriptor, data)
        finally:
            os.close(descriptor)
        self.size += len(data)
        self._unsynced = True

    def state_dict(self) -> dict[str, Any]:
        """The columns, rows and byte size, after making those bytes durable.

        A checkpoint records the size and refuses a shorter file, so the rows
        must reach the disk before the checkpoint does.
        """
        if self._restore is not None:  # saved again before the file was opened since the load
            return dict(self._restore)
        if self._unsynced and self.path.exists():
            fsync_path(self.path)
            fsync_path(self.path.parent)  # the file's own name may be new
            self._unsynced = False
        return {"columns": list(self.columns), "size": self.size, "rows": self.rows}

    def check_fits(self, state: dict[str, Any]) -> None:
        """Raise ``CheckpointError`` unless the file can be made what ``state`` describes (nothing is changed)."""
        columns, size, rows = state["columns"], state["size"], state.get("rows")
        if not isinstance(columns, list) or not all(isinstance(column, str) for column in columns):
            raise CheckpointError(f"{self.path.name}: columns is {columns!r}, not a list of names")
        for name, value in (("size", size), ("rows", rows)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise CheckpointError(f"{self.path.name}: {name} is {value!r}, not a count")
        self._restored_content(state)

    def _restored_content(self, state: dict[str, Any]) -> bytes | None:
        """What the file must hold to match ``state``: None when cutting it at ``size`` bytes does (its header
        is the saved one), else the whole content rebuilt from its first rows under the saved columns.

        Raises:
            CheckpointError: The file is missing, a link, or holds less than the checkpoint saw.
        """
        size, columns = state["size"], state["columns"]
        try:
            found = self.path.lstat()
        except FileNotFoundError:
            if size == 0:
                return None
            raise CheckpointError(f"CSV log {self.path} is missing but the checkpoint expects {size} bytes: it was "
                                  "deleted or moved since the checkpoint was written") from None  # fmt: skip
        if not stat.S_ISREG(found.st_mode):
            raise CheckpointError(f"CSV log {self.path} is not a regular file (a symbolic link?); statetrainer writes "
                                  "no file through a link: put the log back as a regular file")  # fmt: skip
        if size == 0:
            return None
        header = self._render(columns, [])
        with open(self.path, "rb") as file:
            same_header = file.read(len(header)) == header
        if same_header and found.st_size >= size:
            return None
        rows, found_rows = state.get("rows"), self._read_rows()
        if rows is None:  # a checkpoint from before rows were counted: as many rows as its size holds
            rows, length = 0, len(header)
            while length < size and rows < len(found_rows):
                length, rows = length + len(self._render(columns, found_rows[rows : rows + 1])) - len(header), rows + 1
        kept = found_rows[:rows]
        content = self._render(columns, kept)
        if len(kept) < rows or len(content) != size:
            raise CheckpointError(f"CSV log {self.path} holds less than the checkpoint expects ({size} bytes, {rows} "
                                  "rows under its columns): it was truncated or replaced since the checkpoint was "
                                  "written")  # fmt: skip
        return content

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take ``state``; the file is made to match it when the run opens its files (``open``)."""
        self._restore = {"columns": list(state["columns"]), "size": int(state["size"]), "rows": state.get("rows")}

    def open(self) -> None:
        """Make the file what the loaded state says (later rows dropped, a later wider header undone), or remove
        it for a fresh log."""
        state, self._restore = self._restore, None
        if state is None:
            self.path.unlink(missing_ok=True)
            self.columns, self.size, self.rows = [], 0, 0
            return
        content = self._restored_content(state)
        if content is not None:
            with atomic_write(self.path) as temporary:
                temporary.write_bytes(content)
        elif state["size"] or self.path.exists():
            descriptor = open_no_follow(self.path, os.O_WRONLY)
            try:
                os.ftruncate(descriptor, state["size"])
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        rows = state["rows"] if state["rows"] is not None else len(self._read_rows()) if state["size"] else 0
        self.columns, self.size, self.rows = state["columns"], state["size"], rows


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
        check_every("CSVLogger: every_batches", every_batches, never=True)
        self.path = Path(path)
        self.every_batches = every_batches
        self.name = name
        self.epochs = _CSVFile(self.path)
        self.batches = _CSVFile(self.path.with_name(f"{self.path.stem}_batches{self.path.suffix or '.csv'}"))

    def output_files(self) -> list[Path]:
        return [self.epochs.path, self.batches.path]

    def open_files(self, trainer: TrainerView) -> None:
        for log in (self.epochs, self.batches):
            log.open()

    def on_exit_batch(self, trainer: TrainerView) -> None:
        if due(trainer.batch_index + 1, self.every_batches):
            assert trainer.phase is not None  # a batch's exit, inside its phase
            row = {"epoch": trainer.epoch + 1, "phase": trainer.phase.name, "batch": trainer.batch_index + 1,
                   "step": trainer.global_step, **running_metrics(trainer), **learning_rates(trainer)}  # fmt: skip
            self.batches.append(row)

    def on_exit_epoch(self, trainer: TrainerView) -> None:
        self.epochs.append(
            {"epoch": trainer.epoch + 1, "step": trainer.global_step, **trainer.metrics, **learning_rates(trainer)}
        )

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs.state_dict(), "batches": self.batches.state_dict()}

    def check_fits(self, state: dict[str, Any]) -> None:
        self.epochs.check_fits(state["epochs"])
        self.batches.check_fits(state["batches"])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epochs.load_state_dict(state["epochs"])
        self.batches.load_state_dict(state["batches"])
