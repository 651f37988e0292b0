"""TensorBoard scalars per step and per epoch, one run across kills and resumes (a ``Tracker``)."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

from ..optional import require
from .trackers import TrackerLogger

__all__ = ["TensorBoardLogger", "TensorBoardTracker"]


class TensorBoardTracker:
    """TensorBoard's integration: event files in ``log_dir``, written with ``torch.utils.tensorboard`` (the
    ``tensorboard`` extra), each named for the statetrainer run (``events.out.tfevents.*.<run id>``).

    A new run in a folder that holds another run's events hides them (TensorBoard's ``purge_step=0``). A resumed
    run reads its earlier files with TensorBoard's own reader to know the newest step of each tag: the points a
    killed process flushed are kept, and the restart, which recomputes them bit for bit, logs past them.
    """

    durable = True  # once flush() returns, the events are in the files a restart reads

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        require("tensorboard", "tensorboard", "TensorBoardLogger")  # what torch.utils.tensorboard needs
        self._writer_class = importlib.import_module("torch.utils.tensorboard").SummaryWriter
        self.log_dir = Path(log_dir)
        self.writer: Any = None
        self._held: dict[str, int] = {}

    def start(self, run_key: str, params: dict[str, Any]) -> str:
        suffix = f".{run_key}"
        files = [path.name for path in self.log_dir.glob("events.out.tfevents.*")]
        earlier = any(name.endswith(suffix) for name in files)
        self._held = self._read_newest_steps() if earlier else {}
        hide_others = not earlier and bool(files)
        self.writer = self._writer_class(str(self.log_dir), purge_step=0 if hide_others else None,
                                         filename_suffix=suffix)  # fmt: skip
        if not earlier:
            self.writer.add_text("params", "\n".join(f"    {name}: {json.dumps(value)}"
                                                     for name, value in params.items()), 0)  # fmt: skip
        return run_key

    def _read_newest_steps(self) -> dict[str, int]:
        reading = importlib.import_module("tensorboard.backend.event_processing.event_accumulator")
        reader = reading.EventAccumulator(str(self.log_dir), size_guidance={reading.SCALARS: 0})
        reader.Reload()  # the whole folder, purges applied; a record a killed writer left unfinished ends a file
        return {tag: max(event.step for event in reader.Scalars(tag)) for tag in reader.Tags()["scalars"]}

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


class TensorBoardLogger(TrackerLogger):
    """``TrackerLogger`` with ``TensorBoardTracker``: scalars for TensorBoard (the ``tensorboard`` extra).

    Every ``every_steps`` optimizer steps, as the batch that took the step ends: ``step/lr`` (``step/lr_0``... for
    several param groups) and the training phase's running metrics (``step/train_loss``...; list the logger after
    the metrics); at each epoch's end, every ``trainer.metrics`` entry as ``epoch/<name>``; the run's parameters
    as text. The x-axis is always ``trainer.global_step``. A killed and resumed run has one point per step, none
    missing; a new run in the same folder hides an older one's points. Under torchrun it runs on rank 0.

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

    def output_files(self) -> list[Path]:
        return [self.log_dir / "events.out.tfevents.*"]
