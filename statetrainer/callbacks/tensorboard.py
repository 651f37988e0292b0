"""TensorBoard scalars per step and per epoch, one run across kills and resumes (a ``Tracker``)."""

from __future__ import annotations

import importlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..optional import require
from .trackers import TrackerLogger

__all__ = ["TensorBoardLogger", "TensorBoardTracker"]

_EVENTS = "events.out.tfevents.*"


class TensorBoardTracker:
    """TensorBoard's integration: event files in ``log_dir``, written with ``torch.utils.tensorboard`` (the
    ``tensorboard`` extra), each named for the statetrainer run (``events.out.tfevents.*.<run id>``).

    It claims ``log_dir`` for the run (``output_files``), as every folder a run writes in. A restart reads its own
    earlier files for the newest step of each tag, and logs past it. Resumed from a checkpoint at step ``S``
    (``rewind``; 0 for a run started again before its first checkpoint), it purges what a killed process wrote
    after ``S`` (``purge_step=S + 1``), so a resume that is not bit for bit (another world size, a changed setting)
    shows the restart's points there, not the killed one's.
    """

    durable = True  # once flush() returns, the events are in the files a restart reads (flushed, not fsynced)

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        require("tensorboard", "tensorboard", "TensorBoardLogger")  # what torch.utils.tensorboard needs
        self._writer_class = importlib.import_module("torch.utils.tensorboard").SummaryWriter
        self.log_dir = Path(log_dir)
        self.writer: Any = None
        self._held: dict[str, int] = {}
        self._rewind_to: int | None = None

    def output_files(self) -> list[Path]:
        return [self.log_dir / _EVENTS]

    def rewind(self, step: int) -> None:
        """Drop, as the run opens, every point after ``step`` (the checkpoint the run resumes from)."""
        self._rewind_to = step

    def start(self, run_key: str, params: dict[str, Any]) -> str:
        own = sorted(self.log_dir.glob(_EVENTS))  # all the run's: its claim on the folder refuses another run's
        held = _newest_steps(own)
        purge: int | None = None
        if self._rewind_to is not None and own:
            purge = self._rewind_to + 1
            held = {tag: min(step, self._rewind_to) for tag, step in held.items()}
        self._held, self._rewind_to = held, None
        _wait_to_be_named_after(own)
        self.writer = self._writer_class(str(self.log_dir), purge_step=purge, filename_suffix=f".{run_key}")
        if not own:
            self.writer.add_text("params", "\n".join(f"    {name}: {json.dumps(value)}"
                                                     for name, value in params.items()), 0)  # fmt: skip
        self.writer.flush()  # the purge on disk before any point that follows it
        return run_key

    def logged(self) -> dict[str, int]:
        return dict(self._held)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self, finished: bool) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _wait_to_be_named_after(files: list[Path], longest: float = 2.0) -> None:
    """Wait, if need be, for the clock's second to pass that of the newest of ``files``: an event file's name
    starts with the second it was made in, and TensorBoard reads a folder's files in name order, so a file made in
    the same second (a restart in the same process) could be read before the older one it purges."""
    seconds = [int(part) for path in files if len(parts := path.name.split(".")) > 3 and (part := parts[3]).isdigit()]
    deadline = time.monotonic() + longest  # a file from a clock ahead of this one is not waited for longer
    while seconds and int(time.time()) <= max(seconds):
        if time.monotonic() > deadline:
            warnings.warn(f"TensorBoardTracker: the newest event file is named after a time ahead of this "
                          f"machine's clock ({max(seconds)} s against {time.time():.0f} s): TensorBoard may read the "
                          "new file first, and show points a purge should hide", stacklevel=3)  # fmt: skip
            return
        time.sleep(0.02)


def _newest_steps(files: list[Path]) -> dict[str, int]:
    """The newest step of each scalar tag in the event ``files`` (read in name order, purges applied), up to a
    record a killed writer left unfinished."""
    loading = importlib.import_module("tensorboard.backend.event_processing.event_file_loader")
    steps: dict[str, list[int]] = {}  # every step, as a purge may leave an older one the newest
    for path in files:
        for event in loading.EventFileLoader(str(path)).Load():
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                steps = {tag: kept for tag, held in steps.items() if (kept := [at for at in held if at < event.step])}
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "scalars":
                    steps.setdefault(value.tag, []).append(event.step)
    return {tag: max(held) for tag, held in steps.items()}


class TensorBoardLogger(TrackerLogger):
    """``TrackerLogger`` with ``TensorBoardTracker``: scalars for TensorBoard (the ``tensorboard`` extra).

    Every ``every_steps`` optimizer steps, as the batch that took the step ends: ``step/lr`` (``step/lr_0``... for
    several param groups) and the training phase's running metrics (``step/train_loss``...; list the logger after
    the metrics); at each epoch's end, every ``trainer.metrics`` entry as ``epoch/<name>``; the run's parameters
    as text. The x-axis is always ``trainer.global_step``. A killed and resumed run has one point per step, none
    missing, the resumed run's after its checkpoint. Under torchrun it runs on rank 0.

    Args:
        log_dir: The run's TensorBoard folder (``tensorboard --logdir`` its parent).
        every_steps: Steps between per-step points.
        name: The callback's unique name (defaults to the class name).
    """

    tracker: TensorBoardTracker

    def __init__(self, log_dir: str | os.PathLike[str], every_steps: int = 10, name: str | None = None) -> None:
        super().__init__(TensorBoardTracker(log_dir), every_steps, name)

    @property
    def log_dir(self) -> Path:
        """The run's TensorBoard folder."""
        return self.tracker.log_dir

    def check_fits(self, state: dict[str, Any]) -> None:
        if _is_older_state(state):
            step, written = state["step"], state["written"]
            if isinstance(step, bool) or not isinstance(step, int) or step < -1:
                raise CheckpointError(f"step is {step!r}, not a step number")
            if not isinstance(written, dict) or not all(
                isinstance(value, (int, float)) and not isinstance(value, bool) for value in written.values()
            ):
                raise CheckpointError("written is not a {tag: number} dict")
            return
        super().check_fits(state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Also a checkpoint from before the logger was a ``TrackerLogger``: its files are cut at the checkpoint's
        step, and the points it had written at that step are logged again."""
        if _is_older_state(state):
            step = int(state["step"])
            state = {"unconfirmed": {tag: torch.tensor([[float(step), float(value)]], dtype=torch.float64)
                                     for tag, value in state["written"].items()}, "step": max(step, 0)}  # fmt: skip
        super().load_state_dict(state)


def _is_older_state(state: dict[str, Any]) -> bool:
    return "unconfirmed" not in state and {"step", "written"} <= state.keys()
