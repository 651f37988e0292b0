"""TensorBoard scalars per step and per epoch, written so that a resumed run leaves no duplicate and no gap."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..optional import require
from .base import Callback, TrainerView
from .loggers import learning_rates
from .metrics import running_metrics
from .periodic import check_every, due

__all__ = ["TensorBoardLogger"]


class TensorBoardLogger(Callback):
    """Writes scalars for TensorBoard with ``torch.utils.tensorboard`` (the ``tensorboard`` extra).

    Every ``every_steps`` optimizer steps, as the batch that took the step
    ends: ``step/lr`` (``step/lr_0``... for several param groups) and the
    training phase's running metrics (``step/train_loss``...; reading them waits
    for the device, hence not every step; list the logger after the metrics). At each epoch's end: every ``trainer.metrics`` entry as
    ``epoch/<name>``. The x-axis is always ``trainer.global_step``.

    A fresh run hides whatever an earlier run left in ``log_dir`` (TensorBoard's
    ``purge_step=0``). A resumed run purges every event from the checkpoint's
    step on, which drops what the interrupted run wrote after its checkpoint,
    and writes again the events it had written at that step, so each tag has
    one point per step, none missing. Under torchrun it runs on rank 0 only.

    Args:
        log_dir: The run's TensorBoard folder (``tensorboard --logdir`` its parent).
        every_steps: Steps between per-step points.
        name: The callback's unique name (defaults to the class name).
    """

    rank_zero_only = True

    def __init__(self, log_dir: str | os.PathLike[str], every_steps: int = 10, name: str | None = None) -> None:
        check_every("TensorBoardLogger: every_steps", every_steps)
        require("tensorboard", "tensorboard", "TensorBoardLogger")  # what torch.utils.tensorboard needs
        self._writer_class = importlib.import_module("torch.utils.tensorboard").SummaryWriter
        self.log_dir, self.every_steps, self.name = Path(log_dir), every_steps, name
        self.writer: Any = None
        self._step, self._written = -1, {}  # the newest step written, and what was written at it
        self._resumed_at: tuple[int, dict[str, float]] | None = None
        self._stepped = False  # the batch ending took a step to write

    def _write(self, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            self._open()
            assert self.writer is not None  # _open made it
        if step != self._step:
            self._step, self._written = step, {}
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
            self._written[tag] = value

    def _open(self) -> None:
        if self._resumed_at is None:
            self.writer = self._writer_class(str(self.log_dir), purge_step=0)  # a fresh run hides an older one's
            return
        step, written = self._resumed_at
        self.writer = self._writer_class(str(self.log_dir), purge_step=max(step, 0))
        self._resumed_at = None
        if written:
            self._write(written, step)  # the points of the newest step written before the checkpoint, purged too

    def on_exit_step(self, trainer: TrainerView) -> None:
        self._stepped = due(trainer.global_step, self.every_steps)

    def on_exit_batch(self, trainer: TrainerView) -> None:
        if self._stepped:  # once the batch's metrics are updated (list the logger after them)
            self._stepped = False
            running = {f"step/{name}": value for name, value in running_metrics(trainer).items()}
            lrs = {f"step/{name}": value for name, value in learning_rates(trainer).items()}
            self._write({**lrs, **running}, trainer.global_step)

    def on_exit_epoch(self, trainer: TrainerView) -> None:
        self._write({f"epoch/{name}": float(value) for name, value in trainer.metrics.items()}, trainer.global_step)

    def on_close(self, trainer: TrainerView) -> None:
        if self.writer is not None:  # the run has ended, or an error stopped it: flushed and its file closed
            self.writer.close()
            self.writer = None

    def state_dict(self) -> dict[str, Any]:
        """The newest step written and its points, once they are on disk (a checkpoint must not get ahead)."""
        if self.writer is not None:
            self.writer.flush()
        if self._resumed_at is not None:  # saved again before writing anything since the resume
            return {"step": self._resumed_at[0], "written": dict(self._resumed_at[1])}
        return {"step": self._step, "written": dict(self._written)}

    def output_files(self) -> list[Path]:
        return [self.log_dir / "events.out.tfevents.*"]

    def check_fits(self, state: dict[str, Any]) -> None:
        step, written = state["step"], state["written"]
        if isinstance(step, bool) or not isinstance(step, int) or step < -1:
            raise CheckpointError(f"step is {step!r}, not a step number")
        if not isinstance(written, dict) or not all(
            isinstance(value, (int, float)) and not isinstance(value, bool) for value in written.values()
        ):
            raise CheckpointError("written is not a {tag: number} dict")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        step = int(state["step"])
        self._resumed_at = (step, {str(tag): float(value) for tag, value in state["written"].items()})
        if self.writer is not None:
            self.writer.close()
            self.writer = None
