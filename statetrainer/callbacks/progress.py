"""A tqdm progress bar per phase, quiet when the output is not a terminal."""

from __future__ import annotations

import sys
import warnings
from typing import Any, TextIO

from ..optional import require
from .base import Callback, TrainerView
from .metrics import running_metrics
from .periodic import check_every, due

__all__ = ["ProgressBar"]

_EVERY_BATCHES = 20  # ProgressBar's every_batches by default


class ProgressBar(Callback):
    """Shows a bar for each phase with its running metrics.

    Reading a running metric waits for the device, so the metrics shown are
    read after the bar's first batch (so they show from its first refresh),
    then every ``every_batches`` batches and at the phase's last batch (so an
    evaluation bar shows its final values), never older than one refresh. On
    an error or a stop signal the bar is closed before anything else is
    printed, so a stop message starts on its own line.

    Args:
        every_batches: Batches between refreshes of the metrics shown.
        stream: Where to draw; None means ``sys.stderr``. Nothing is drawn
            unless it is a terminal (or ``force=True``).
        force: Draw even when ``stream`` is not a terminal.
        **tqdm_options: Passed on to ``tqdm`` (``mininterval``, ``ncols``, ...).
        name: The callback's unique name (defaults to the class name).
        refresh_every: The old name of ``every_batches``: deprecated, it warns and sets ``every_batches``.
    """

    rank_zero_only = True  # under torchrun, rank 0 alone speaks

    def __init__(
        self,
        every_batches: int = _EVERY_BATCHES,
        stream: TextIO | None = None,
        force: bool = False,
        name: str | None = None,
        *,
        refresh_every: int | None = None,
        **tqdm_options: Any,
    ) -> None:
        if refresh_every is not None:
            warnings.warn("ProgressBar: refresh_every is deprecated, pass every_batches (the name every periodic "
                          "callback uses)", DeprecationWarning, stacklevel=2)  # fmt: skip
            if every_batches != _EVERY_BATCHES:
                raise TypeError("ProgressBar: pass every_batches or its deprecated name refresh_every, not both")
            every_batches = refresh_every
        check_every("ProgressBar: every_batches", every_batches)
        self._tqdm = require("tqdm.auto", "progress", "ProgressBar").tqdm
        self.every_batches, self.stream, self.force, self.name = every_batches, stream, force, name
        self.tqdm_options = {"leave": False, "dynamic_ncols": True, **tqdm_options}
        self.bar: Any = None
        self._opened = False  # for this phase (a run resumed mid-phase opens it at its first batch)
        self._metrics_shown = False  # whether the bar has read the running metrics since it opened

    @property
    def refresh_every(self) -> int:
        """Deprecated: ``every_batches``."""
        warnings.warn("ProgressBar.refresh_every is deprecated, read every_batches", DeprecationWarning, stacklevel=2)
        return self.every_batches

    @refresh_every.setter
    def refresh_every(self, value: int) -> None:
        warnings.warn("ProgressBar.refresh_every is deprecated, set every_batches", DeprecationWarning, stacklevel=2)
        self.every_batches = value

    def _open(self, trainer: TrainerView, done: int) -> None:
        self._opened, self._metrics_shown = True, False
        stream = self.stream or sys.stderr
        if not (self.force or (hasattr(stream, "isatty") and stream.isatty())):
            return
        assert trainer.phase is not None  # opened as the phase starts, or at its first batch
        self.bar = self._tqdm(
            total=trainer.phase_batches, initial=done, file=stream,
            desc=f"epoch {trainer.epoch + 1} {trainer.phase.name}", **self.tqdm_options,
        )  # fmt: skip

    def on_enter_phase(self, trainer: TrainerView) -> None:
        self._open(trainer, done=0)

    def on_exit_batch(self, trainer: TrainerView) -> None:
        if not self._opened:
            self._open(trainer, done=trainer.batch_index)
        bar = self.bar
        if bar is None:
            return
        done = trainer.batch_index + 1
        if not self._metrics_shown or due(done, self.every_batches) or done == bar.total:
            bar.set_postfix(running_metrics(trainer), refresh=False)
            self._metrics_shown = True
        bar.update(1)  # draws, with the metrics just read when it is time to

    def on_exit_phase(self, trainer: TrainerView) -> None:
        self._close()

    def on_exception(self, trainer: TrainerView, error: BaseException) -> None:
        self._close()  # the bar's line would otherwise stay on the terminal under the traceback

    def _close(self) -> None:
        self._opened = False
        if self.bar is not None:
            self.bar.close()
            self.bar = None
