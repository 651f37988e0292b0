"""The goodput ledger: where a run's wall time went, in every process that ran it, restarts and kills included.

Each process of a run is one row: when it started, and its seconds in each
bucket, from the moment the operating system started it to its last update.
The buckets partition that time: the ledger switches from one bucket to the
next at marks placed first and last around every state's hooks (see
``Callback.surrounding_calls``), so every second between two marks lands in
exactly one bucket and the row's seconds add up to the process's time. What
a restart knows of the process before it comes from the ledger's file in the
run's folder, updated in place at every mark (``checkpoint.LiveTable``): a
SIGKILL leaves it as it was at the last mark.
"""

from __future__ import annotations

import math
import os
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CheckpointError, LiveTable, TableContents, read_live_table
from ..timing import CheckpointTime, process_started
from .base import Callback, TrainerView

__all__ = ["BUCKETS", "COLUMNS", "LEDGER_FILE", "LEDGER_KIND", "GoodputLedger", "LedgerRow"]

BUCKETS: tuple[str, ...] = (
    "startup",  # from the process's start to the run's first transition, loading aside
    "checkpoint_load",
    "data",  # between training batches: waiting for the next batch, opening a phase's loader
    "forward",  # moving a training batch to the device, the forward and the loss
    "backward",
    "step",  # unscaling, clipping, the optimizer step and zero_grad
    "evaluation",  # everything in a phase without gradients: its data, forward and callbacks
    "callbacks",  # the other callbacks' hooks in training phases, epochs and the run's start and end
    "checkpoint_save",  # blocked saving: staging, waiting for a write in flight, a synchronous write
    "redone",  # training again the batches a killed process had done after its last checkpoint
    "downtime",  # from the killed process's last mark to this process's start
    "other",  # between phases and epochs, and after the run's end
)
COLUMNS: tuple[str, ...] = ("started", "batches", "lost_batches", *BUCKETS)
LEDGER_FILE = "goodput.ledger"
LEDGER_KIND = "goodput"

_STARTED, _BATCHES, _LOST = 0, 1, 2
_COLUMN = {name: index for index, name in enumerate(COLUMNS)}
(STARTUP, LOAD, DATA, FORWARD, BACKWARD, STEP, EVALUATION, CALLBACKS, SAVE, REDONE, DOWNTIME, OTHER) = (
    _COLUMN[name] for name in BUCKETS
)
_TRAINING = tuple(range(len(COLUMNS)))  # each bucket is itself
_EVALUATING = tuple(EVALUATION if index in (DATA, FORWARD, CALLBACKS) else index for index in _TRAINING)
_REDOING = tuple(REDONE if index in (DATA, FORWARD, BACKWARD, STEP, EVALUATION, CALLBACKS) else index
                 for index in _TRAINING)  # fmt: skip

# The bucket that runs after the last mark on each side of each state (None: the next mark follows at once).
_AFTER_ENTRY = {"idle": OTHER, "epoch": OTHER, "phase": DATA, "batch": FORWARD, "backward": BACKWARD, "step": STEP}
_AFTER_EXIT = {"idle": CALLBACKS, "epoch": OTHER, "phase": OTHER, "batch": DATA, "backward": BACKWARD, "step": None}
# Where a checkpoint can have been saved or loaded since the last mark: the marks that leave a state at rest.
_LEAVES_REST = {("enter", "idle"), ("enter", "epoch"), ("enter", "phase"), ("enter", "batch"),
                ("exit", "idle"), ("exit", "epoch"), ("exit", "phase")}  # fmt: skip


@dataclass(frozen=True)
class LedgerRow:
    """One process's row of a ledger, read back.

    Attributes:
        started: When the process started (a ``time.time()`` reading).
        batches: The run's batches done (all phases, counted over the run) at its last mark.
        lost_batches: Batches the process before it had done after the checkpoint this one resumed from, so this
            one ran them again; -1: not known (the ledger's file was missing, and the checkpoint was used).
        seconds: Its seconds per bucket, ``BUCKETS``' order.
    """

    started: float
    batches: int
    lost_batches: int
    seconds: dict[str, float]

    @classmethod
    def of(cls, values: list[float]) -> LedgerRow:
        return cls(values[_STARTED], int(values[_BATCHES]), int(values[_LOST]),
                   {name: values[_COLUMN[name]] for name in BUCKETS})  # fmt: skip

    @property
    def ran(self) -> float:
        """The seconds from the process's start to its last mark."""
        return sum(self.seconds.values()) - self.seconds["downtime"]

    @property
    def ended(self) -> float:
        """When its last mark was (a ``time.time()`` reading)."""
        return self.started + self.ran


@dataclass(frozen=True)
class _Loaded:
    """A checkpoint's ledger: the run's batches done and every process's row when it was saved."""

    batches: int
    rows: list[list[float]]


class GoodputLedger(Callback):
    """Records where the run's wall time goes, per process, across restarts: ``python -m statetrainer report``.

    Each process's seconds are split into ``BUCKETS``: startup (from the
    process's start, interpreter and imports included), checkpoint loads and
    saves (the time training was blocked), data, forward, backward and step of
    training batches, evaluation phases, the other callbacks' hooks, and after
    a restart the batches run again (``redone``) and the time between the
    killed process's last record and the restart (``downtime``). A checkpoint
    carries the ledger; its file (``goodput.ledger`` in ``folder``, the
    checkpoints' folder) is updated at every mark, so a restart learns how far
    a killed process got: ``lost_batches`` is the batches it had done after the
    checkpoint the restart resumes from.

    It costs a few marks per batch (a clock reading each, about 0.2 µs), so it
    is off unless added. Times are the host's: on CUDA, work the host only
    queued is counted where the host waits for it (usually the optimizer step,
    or a callback that reads a value); ``synchronize=True`` waits for the GPU
    at every mark instead, for exact buckets at the cost of that wait. Under
    torchrun it records rank 0.

    Args:
        folder: Where its file goes: the run's checkpoint folder.
        synchronize: On CUDA, wait for the device at every mark.
        name: The callback's unique name (defaults to the class name).
    """

    rank_zero_only = True
    times_hooks = True

    def __init__(self, folder: str | os.PathLike[str], *, synchronize: bool = False, name: str | None = None) -> None:
        self.folder, self.synchronize, self.name = Path(folder), synchronize, name
        self.id = uuid.uuid4().hex
        started = process_started()
        self._to_wall = time.time() - time.perf_counter()  # a perf_counter reading plus this is a time.time() one
        self._last = started - self._to_wall
        self._current = STARTUP
        self._row: Any = [0.0] * len(COLUMNS)  # a list until the file is open, then the file's live row
        self._row[_STARTED] = started
        self._previous: list[list[float]] = []
        self._route = _TRAINING
        self._phase_route = _TRAINING
        self._batches, self._redo_until = 0, 0
        self._loaded: _Loaded | None = None
        self._clock = CheckpointTime()
        self._seen_saving = self._seen_loading = 0.0
        self._sync: Callable[[], None] | None = None
        self._table: LiveTable | None = None

    @property
    def rows(self) -> list[LedgerRow]:
        """Every process's row so far, this one's last (up to its last mark)."""
        return [LedgerRow.of(values) for values in (*self._previous, list(self._row))]

    def output_files(self) -> list[Path]:
        return [self.folder / LEDGER_FILE]

    def surrounding_calls(self, side: str, state: str, hooked: bool) -> tuple[Any, Any]:
        after = (_AFTER_ENTRY if side == "enter" else _AFTER_EXIT)[state]
        settles, counts = (side, state) in _LEAVES_REST, (side, state) == ("exit", "batch")
        enters_phase = (side, state) == ("enter", "phase")
        if hooked:
            first = self._mark(CALLBACKS, settles, counts, enters_phase)
            return first, None if after is None else self._mark(after)
        if after is None or (not (settles or counts or enters_phase) and side == "exit" and state == "backward"):
            return None, None  # nothing to switch: the bucket goes on to the next mark
        return None, self._mark(after, settles, counts, enters_phase)

    def _mark(self, bucket: int, settles: bool = False, counts: bool = False,
              enters_phase: bool = False) -> Callable[[Any], None]:  # fmt: skip
        """The call that ends the running bucket and starts ``bucket`` (through the route: an evaluation phase's
        buckets are ``evaluation``, a batch run again is ``redone``). The per-batch ones are written out whole:
        each is a clock reading and a few stores (about 0.2-0.4 µs)."""
        ledger = self
        perf_counter = self._synchronized_clock if self.synchronize else time.perf_counter
        if enters_phase or (settles and counts):

            def switch_and_note(trainer: Any) -> None:
                ledger._account(perf_counter(), settles)
                if counts:
                    ledger._count_batch()
                if enters_phase:
                    ledger._phase_route = _TRAINING if trainer.phase.grad else _EVALUATING
                    ledger._route = _REDOING if ledger._batches < ledger._redo_until else ledger._phase_route
                ledger._current = ledger._route[bucket]

            return switch_and_note
        if settles:  # leaving a state at rest, where a checkpoint may have been saved

            def settle_and_switch(_trainer: Any) -> None:
                now = perf_counter()
                row, current = ledger._row, ledger._current
                row[current] += now - ledger._last
                saving = ledger._clock.saving.until(now)
                if saving != ledger._seen_saving:
                    row[current] -= saving - ledger._seen_saving
                    row[SAVE] += saving - ledger._seen_saving
                    ledger._seen_saving = saving
                ledger._last, ledger._current = now, ledger._route[bucket]

            return settle_and_switch
        if counts:  # a batch's work is done

            def count_and_switch(_trainer: Any) -> None:
                now = perf_counter()
                row = ledger._row
                row[ledger._current] += now - ledger._last
                ledger._batches += 1
                row[_BATCHES] = ledger._batches
                if ledger._batches == ledger._redo_until:
                    ledger._route = ledger._phase_route
                ledger._last, ledger._current = now, ledger._route[bucket]

            return count_and_switch

        def switch(_trainer: Any) -> None:
            now = perf_counter()
            ledger._row[ledger._current] += now - ledger._last
            ledger._last, ledger._current = now, ledger._route[bucket]

        return switch

    def _synchronized_clock(self) -> float:
        """``perf_counter()`` once the device has done the work queued so far (``synchronize=True`` on CUDA)."""
        if self._sync is not None:
            self._sync()
        return time.perf_counter()

    def _account(self, now: float, settles: bool = True) -> None:
        """End the running bucket's interval at ``now``; with ``settles``, move the seconds the process was blocked
        saving or loading checkpoints since the last settle out of it, into their own buckets."""
        row = self._row
        row[self._current] += now - self._last
        self._last = now
        if settles:
            saving, loading = self._clock.saving.until(now), self._clock.loading.until(now)
            moved_saving, moved_loading = saving - self._seen_saving, loading - self._seen_loading
            if moved_saving or moved_loading:
                row[self._current] -= moved_saving + moved_loading
                row[SAVE] += moved_saving
                row[LOAD] += moved_loading
                self._seen_saving, self._seen_loading = saving, loading

    def _count_batch(self) -> None:
        self._batches += 1
        self._row[_BATCHES] = self._batches
        if self._batches == self._redo_until:
            self._route = self._phase_route

    def open_files(self, trainer: TrainerView) -> None:
        """Start this process's row: after a restart, below the rows the killed process left in the file (or, if
        it is gone, the checkpoint's), with the batches it lost and the downtime."""
        if self._clock is not trainer.checkpoint_time:  # this trainer's clocks (once: a reload opens again)
            self._clock, self._seen_saving, self._seen_loading = trainer.checkpoint_time, 0.0, 0.0
        self._sync = torch.cuda.synchronize if self.synchronize and trainer.device.type == "cuda" else None
        self._account(time.perf_counter())
        path = self.folder / LEDGER_FILE
        row = list(self._row)
        self._previous, row[_LOST], self._redo_until = self._history(path)
        if self._previous:
            before = LedgerRow.of(self._previous[-1])
            overlap = before.ended - row[_STARTED]  # the same process again (a second trainer), or clocks apart
            if overlap > 0:
                row[_STARTED] += overlap
                row[STARTUP] = max(row[STARTUP] - overlap, 0.0)
            row[DOWNTIME] = max(row[_STARTED] - before.ended, 0.0)
        row[_BATCHES] = self._batches
        phase = trainer.phase  # a run resumed in the middle of a phase enters none first
        self._phase_route = _TRAINING if phase is None or phase.grad else _EVALUATING
        self._route = _REDOING if self._batches < self._redo_until else self._phase_route
        self.close_files()
        self._table = LiveTable(path, LEDGER_KIND, self.id, COLUMNS, [*self._previous, row])
        self._row = self._table.row

    def _history(self, path: Path) -> tuple[list[list[float]], int, int]:
        """The rows of the processes before this one, the batches lost after the checkpoint loaded (-1: not
        known), and the batch count the redone work runs to."""
        loaded = self._loaded
        if loaded is None:
            return [], 0, 0  # a new run: a file there is of a run that started over, and is replaced
        record = self._read_record(path)
        if (record is not None and record.id == self.id and len(record.rows) >= len(loaded.rows)
                and record.rows[-1][_BATCHES] >= loaded.batches):  # fmt: skip
            lost = int(record.rows[-1][_BATCHES]) - loaded.batches
            return [list(row) for row in record.rows], lost, loaded.batches + lost
        return [list(row) for row in loaded.rows], -1, 0

    def _read_record(self, path: Path) -> TableContents | None:
        if not path.exists():
            return None
        try:
            return read_live_table(path, LEDGER_KIND)
        except (CheckpointError, OSError) as error:
            warnings.warn(f"{self.key}: {error}; the ledger goes on from the checkpoint's rows, and the time after "
                          "its save is counted as downtime", stacklevel=2)  # fmt: skip
            return None

    def on_close(self, trainer: TrainerView) -> None:
        self._account(time.perf_counter())
        self.close_files()

    def on_exception(self, trainer: TrainerView, error: BaseException) -> None:
        self._account(time.perf_counter())

    def close_files(self) -> None:
        """Write the live row back and let the file go (the row stays readable)."""
        if self._table is not None:
            table, self._table = self._table, None
            self._row = table.close()

    def state_dict(self) -> dict[str, Any]:
        self._account(time.perf_counter())  # in the middle of the save: its seconds so far are the save's
        rows = [*self._previous, list(self._row)]
        return {"id": self.id, "batches": self._batches, "columns": list(COLUMNS),
                "rows": torch.tensor(rows, dtype=torch.float64)}  # fmt: skip

    def check_fits(self, state: dict[str, Any]) -> None:
        if state.get("columns") != list(COLUMNS):
            raise CheckpointError(f"the saved ledger's columns are {state.get('columns')!r}, not this version's "
                                  f"{list(COLUMNS)}")  # fmt: skip
        rows, batches, ledger = state["rows"], state["batches"], state["id"]
        if not isinstance(ledger, str) or not ledger:
            raise CheckpointError(f"the saved ledger's id is {ledger!r}, not a name")
        if isinstance(batches, bool) or not isinstance(batches, int) or batches < 0:
            raise CheckpointError(f"the saved ledger's batch count is {batches!r}, not a count")
        if not (isinstance(rows, torch.Tensor) and rows.dtype == torch.float64 and rows.dim() == 2
                and rows.shape[0] >= 1 and rows.shape[1] == len(COLUMNS)):  # fmt: skip
            raise CheckpointError(f"the saved ledger's rows are {rows!r}, not float64 rows of {len(COLUMNS)} columns")
        if not all(math.isfinite(value) for value in rows.flatten().tolist()):
            raise CheckpointError("the saved ledger holds a number that is not finite")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.id, self._batches = state["id"], state["batches"]
        self._loaded = _Loaded(state["batches"], state["rows"].cpu().tolist())
        self._row[_BATCHES] = self._batches
