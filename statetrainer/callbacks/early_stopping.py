"""Stop the run when a metric stops improving."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ..validation import check_count
from .base import Callback
from .metrics import Metric

if TYPE_CHECKING:
    from ..trainer import Trainer

__all__ = ["EarlyStopping"]


class EarlyStopping(Callback):
    """Calls ``trainer.stop()`` after ``patience`` checks without improvement.

    The check runs when the phase that produces ``monitor`` ends (``valid_loss``
    is checked at the end of the ``valid`` phase), so the run stops right there,
    without starting another epoch. List it after the metric it monitors.

    Args:
        monitor: A ``trainer.metrics`` name such as ``valid_loss``.
        mode: ``"min"`` when lower is better, ``"max"`` when higher is.
        patience: Checks without improvement before stopping.
        min_delta: How much better than the best a value must be to count.
        name: The callback's unique name (defaults to the class name).
    """

    def __init__(
        self, monitor: str = "valid_loss", mode: str = "min", patience: int = 3, min_delta: float = 0.0,
        name: str | None = None,
    ) -> None:  # fmt: skip
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping: mode must be 'min' or 'max', got {mode!r}")
        check_count("EarlyStopping: patience", patience)
        if min_delta < 0:
            raise ValueError(f"EarlyStopping: min_delta must be >= 0, got {min_delta!r}")
        self.monitor, self.mode, self.patience, self.min_delta, self.name = monitor, mode, patience, min_delta, name
        self.best = math.inf if mode == "min" else -math.inf
        self.bad_checks = 0
        self.stopped_epoch: int | None = None

    def improved(self, value: float) -> bool:
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def on_exit_phase(self, trainer: Trainer) -> None:
        if not self.monitor.startswith(f"{trainer.phase.name}_"):
            return
        self._check_order(trainer)
        if self.monitor not in trainer.metrics:
            raise KeyError(
                f"EarlyStopping monitors {self.monitor!r}, which phase {trainer.phase.name!r} did not produce; "
                f"trainer.metrics has {', '.join(trainer.metrics) or 'nothing'}"
            )
        value = trainer.metrics[self.monitor]
        if self.improved(value):
            self.best, self.bad_checks = value, 0
            return
        self.bad_checks += 1
        if self.bad_checks >= self.patience:
            self.stopped_epoch = trainer.epoch
            trainer.stop()

    def _check_order(self, trainer: Trainer) -> None:
        position = trainer.callbacks.index(self)
        for index, callback in enumerate(trainer.callbacks[position + 1 :], start=position + 1):
            if isinstance(callback, Metric) and callback.active and callback.key_for(trainer) == self.monitor:
                raise ValueError(
                    f"EarlyStopping (callback {position}) would read {self.monitor!r} before {callback.key!r} "
                    f"(callback {index}) updates it: list EarlyStopping after its metric"
                )

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_checks": self.bad_checks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad_checks = float(state["best"]), int(state["bad_checks"])
