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


_last_end = 0.0  # when a ledger of this process last closed (a time.time() reading): where a later one starts


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
    the killed processes got: ``lost_batches`` is the batches they had done
    after the checkpoint the restart resumes from, which it does again.

    It costs four marks a batch (a clock reading and a few stores each, about
    1 µs in all), so it is off unless added. Times are the host's: on CUDA,
    work the host only queued is counted where the host waits for it (usually
    the optimizer step, or a callback that reads a value); ``synchronize=True``
    waits for the GPU at every mark instead, for exact buckets at the cost of
    that wait. Under torchrun every rank times itself (so every rank runs the
    same calls around its hooks); rank 0's ledger is the one written and saved.
    A ledger records one trainer's run.

    Args:
        folder: Where its file goes: the run's checkpoint folder.
        synchronize: On CUDA, wait for the device at every mark.
        name: The callback's unique name (defaults to the class name).
    """

    times_hooks = True

    def __init__(self, folder: str | os.PathLike[str], *, synchronize: bool = False, name: str | None = None) -> None:
        self.folder, self.synchronize, self.name = Path(folder), synchronize, name
        started = max(process_started(), _last_end)  # a second run in this process starts after the first's end
        self._to_wall = time.time() - time.perf_counter()  # a perf_counter reading plus this is a time.time() one
        self._last = started - self._to_wall
        self._current = STARTUP
        self._row: Any = [0.0] * len(COLUMNS)  # a list until the file is open, then the file's live row
        self._row[_STARTED] = started
        self._previous: list[list[float]] = []
        self._route = self._phase_route = _TRAINING
        self._batches, self._redo_until = 0, 0
        self._loaded: _Loaded | None = None
        self._clock = CheckpointTime()
        self._seen_saving = self._seen_loading = 0.0
        self._sync: Callable[[], None] | None = None
        self._table: LiveTable | None = None
        self._opened_for: CheckpointTime | None = None  # the clocks of the trainer whose run it records

    @property
    def rows(self) -> list[LedgerRow]:
        """Every process's row so far, this one's last (up to its last mark)."""
        return [LedgerRow.of(values) for values in self._rows()]

    def _rows(self) -> list[list[float]]:
        previous = self._previous if self._opened_for is not None or self._loaded is None else self._loaded.rows
        return [*previous, list(self._row)]

    def output_files(self) -> list[Path]:
        return [self.folder / LEDGER_FILE]

    def surrounding_calls(self, side: str, state: str, hooked: bool) -> tuple[Any, Any]:
        after = (_AFTER_ENTRY if side == "enter" else _AFTER_EXIT)[state]
        notes = {"settles": (side, state) in _LEAVES_REST, "counts": (side, state) == ("exit", "batch"),
                 "enters_phase": (side, state) == ("enter", "phase")}  # fmt: skip
        leaves_phase = (side, state) == ("exit", "phase")  # after the phase's own exit hooks
        if hooked:
            first = self._mark(f"{side}_{state}_first", CALLBACKS, **notes)
            last = None if after is None else self._mark(f"{side}_{state}_last", after, leaves_phase=leaves_phase)
            return first, last
        if after is None or (side, state) == ("exit", "backward"):
            return None, None  # nothing to switch: the bucket goes on to the next mark
        return None, self._mark(f"{side}_{state}", after, leaves_phase=leaves_phase, **notes)

    def _mark(self, label: str, bucket: int, settles: bool = False, counts: bool = False,
              enters_phase: bool = False, leaves_phase: bool = False) -> Callable[[Any], None]:  # fmt: skip
        """The call that ends the running bucket and starts ``bucket`` (through the route: an evaluation phase's
        buckets are ``evaluation``, a batch run again is ``redone``). The per-batch ones are written out whole:
        each is a clock reading and a few stores (about 0.2-0.3 µs)."""
        ledger = self
        perf_counter = self._synchronized_clock if self.synchronize else time.perf_counter
        if enters_phase or leaves_phase or (settles and counts):

            def switch_and_note(trainer: Any) -> None:
                ledger._account(perf_counter(), settles)
                if counts:
                    ledger._count_batch()
                if enters_phase or leaves_phase:
                    ledger._phase_route = _EVALUATING if enters_phase and not trainer.phase.grad else _TRAINING
                    ledger._route = _REDOING if ledger._batches < ledger._redo_until else ledger._phase_route
                ledger._current = ledger._route[bucket]

            call = switch_and_note
        elif settles:  # leaving a state at rest, where a checkpoint may have been saved or loaded

            def settle_and_switch(_trainer: Any) -> None:
                now = perf_counter()
                row, current, clock = ledger._row, ledger._current, ledger._clock
                row[current] += now - ledger._last
                saving, loading = clock.saving.until(now), clock.loading.until(now)
                if saving != ledger._seen_saving or loading != ledger._seen_loading:
                    row[current] -= saving - ledger._seen_saving + loading - ledger._seen_loading
                    row[SAVE] += saving - ledger._seen_saving
                    row[LOAD] += loading - ledger._seen_loading
                    ledger._seen_saving, ledger._seen_loading = saving, loading
                ledger._last, ledger._current = now, ledger._route[bucket]

            call = settle_and_switch
        elif counts:  # a batch's work is done

            def count_and_switch(_trainer: Any) -> None:
                now = perf_counter()
                row = ledger._row
                row[ledger._current] += now - ledger._last
                ledger._batches += 1
                row[_BATCHES] = ledger._batches
                if ledger._batches == ledger._redo_until:
                    ledger._route = ledger._phase_route
                ledger._last, ledger._current = now, ledger._route[bucket]

            call = count_and_switch
        else:

            def switch(_trainer: Any) -> None:
                now = perf_counter()
                ledger._row[ledger._current] += now - ledger._last
                ledger._last, ledger._current = now, ledger._route[bucket]

            call = switch
        call.__qualname__ = f"{self.key}.{label}"  # as a recovery message or a saved transition names it
        return call

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
        """Start this process's row: after a restart, below the rows the killed processes left in the file (or,
        if it is gone, the checkpoint's), with the batches they lost and the downtime.

        Raises:
            ValueError: The ledger already records another trainer's run.
        """
        if self._opened_for is not None:
            if self._opened_for is not trainer.checkpoint_time:
                raise ValueError(f"{self.key} records one trainer's run, and it is another trainer's callback "
                                 "already: give each trainer a GoodputLedger of its own")  # fmt: skip
            if self._table is None:  # the same run driven again once it closed (fit() of a finished run)
                self._table = LiveTable(self.folder / LEDGER_FILE, LEDGER_KIND, trainer.run_id, COLUMNS, self._rows())
                self._row = self._table.row
            return
        self._opened_for = self._clock = trainer.checkpoint_time
        self._sync = torch.cuda.synchronize if self.synchronize and trainer.device.type == "cuda" else None
        self._account(time.perf_counter())
        path = self.folder / LEDGER_FILE
        row = list(self._row)
        self._previous, row[_LOST], self._redo_until = self._history(path, trainer.run_id)
        if self._previous:
            before = LedgerRow.of(self._previous[-1])
            overlap = before.ended - row[_STARTED]  # the same process again (a second trainer), or clocks apart
            if overlap > 0:
                row[_STARTED] += overlap
                row[STARTUP] = max(row[STARTUP] - overlap, 0.0)
            row[DOWNTIME] = max(row[_STARTED] - before.ended, 0.0)
        row[_BATCHES] = self._batches
        in_phase = trainer.state in ("phase", "batch", "backward", "step") and trainer.phase is not None
        self._phase_route = _EVALUATING if in_phase and not trainer.phase.grad else _TRAINING  # type: ignore[union-attr]
        self._route = _REDOING if self._batches < self._redo_until else self._phase_route
        self._table = LiveTable(path, LEDGER_KIND, trainer.run_id, COLUMNS, [*self._previous, row])
        self._row = self._table.row

    def _history(self, path: Path, run: str) -> tuple[list[list[float]], int, int]:
        """The rows of the processes before this one, the batches they did after the checkpoint loaded that this
        one does again (-1: not known), and the batch count that redone work runs to."""
        loaded, record = self._loaded, self._read_record(path, run)
        if loaded is None:  # a new run, or this run started again before its first checkpoint: all done again
            if record is None:
                return [], 0, 0
            done = max(int(row[_BATCHES]) for row in record.rows)
            return [list(row) for row in record.rows], done, done
        saver = len(loaded.rows) - 1  # the row of the process that saved the checkpoint
        if (record is not None and len(record.rows) > saver
                and [row[_STARTED] for row in record.rows[:saver]] == [row[_STARTED] for row in loaded.rows[:saver]]):  # fmt: skip
            done = max(int(row[_BATCHES]) for row in record.rows[saver:])  # the furthest any later process got
            if done >= loaded.batches:
                return [list(row) for row in record.rows], done - loaded.batches, done
        return [list(row) for row in loaded.rows], -1, 0

    def _read_record(self, path: Path, run: str) -> TableContents | None:
        """The ledger's file of this run, None if there is none (or it is another run's); warned about if damaged."""
        if not path.exists():
            return None
        try:
            record = read_live_table(path, LEDGER_KIND)
            if record.columns != COLUMNS:
                raise CheckpointError(f"{path} has the columns {list(record.columns)}, not {list(COLUMNS)}")
        except (CheckpointError, OSError) as error:
            warnings.warn(f"{self.key}: {error}; the ledger goes on from the checkpoint's rows, and the time after "
                          "its save is counted as downtime", stacklevel=2)  # fmt: skip
            return None
        return record if record.id == run else None

    def on_close(self, trainer: TrainerView) -> None:
        self._account(time.perf_counter())
        self.close_files()

    def on_exception(self, trainer: TrainerView, error: BaseException) -> None:
        self._account(time.perf_counter())

    def close_files(self) -> None:
        """Write the live row back and let the file go (the row stays readable)."""
        global _last_end
        if self._table is not None:
            table, self._table = self._table, None
            self._row = table.close()
            _last_end = max(_last_end, LedgerRow.of(self._row).ended)

    def state_dict(self) -> dict[str, Any]:
        self._account(time.perf_counter())  # in the middle of the save: its seconds so far are the save's
        return {"batches": self._batches, "columns": list(COLUMNS),
                "rows": torch.tensor(self._rows(), dtype=torch.float64)}  # fmt: skip

    def check_fits(self, state: dict[str, Any]) -> None:
        if state.get("columns") != list(COLUMNS):
            raise CheckpointError(f"the saved ledger's columns are {state.get('columns')!r}, not this version's "
                                  f"{list(COLUMNS)}")  # fmt: skip
        rows, batches = state["rows"], state["batches"]
        if isinstance(batches, bool) or not isinstance(batches, int) or batches < 0:
            raise CheckpointError(f"the saved ledger's batch count is {batches!r}, not a count")
        if not (isinstance(rows, torch.Tensor) and rows.dtype == torch.float64 and rows.dim() == 2
                and rows.shape[0] >= 1 and rows.shape[1] == len(COLUMNS)):  # fmt: skip
            raise CheckpointError(f"the saved ledger's rows are {rows!r}, not float64 rows of {len(COLUMNS)} columns")
        if not all(math.isfinite(value) for value in rows.flatten().tolist()):
            raise CheckpointError("the saved ledger holds a number that is not finite")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._batches = state["batches"]
        self._loaded = _Loaded(state["batches"], state["rows"].cpu().tolist())
        self._row[_BATCHES] = self._batches
