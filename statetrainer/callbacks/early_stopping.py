"""Stop the run when a metric stops improving."""

from __future__ import annotations

import math
from typing import Any

from ..saved_state import check_flag, check_integer, check_keys, check_real
from ..validation import check_count, check_number
from .base import Callback, TrainerView
from .metrics import Metric

__all__ = ["EarlyStopping"]


class EarlyStopping(Callback):
    """Calls ``trainer.stop()`` after ``patience`` checks without improvement.

    The check runs when the phase that produces ``monitor`` ends (``valid_loss``
    is checked at the end of the ``valid`` phase), so the run stops right there,
    without starting another epoch. That phase is the one in which a ``Metric``
    callback publishes ``monitor``; for a value published by other means, the
    phase whose name prefixes it (the longest such name); for any other value,
    the end of the epoch. A trainer is not built with a monitor that no
    callback declares in its ``metric_names`` (a typo, a missing ``Metric``),
    and a monitor that nothing produced by the end of an epoch is an error.
    List EarlyStopping after the metric it monitors.

    Args:
        monitor: A ``trainer.metrics`` name such as ``valid_loss``.
        mode: ``"min"`` when lower is better, ``"max"`` when higher is.
        patience: Checks without improvement before stopping.
        min_delta: How much better than the best a value must be to count.
        name: The callback's unique name (defaults to the class name).
    """

    runs_in_evaluation = False  # it judges training epochs, which validate() is not

    def __init__(
        self, monitor: str = "valid_loss", mode: str = "min", patience: int = 3, min_delta: float = 0.0,
        name: str | None = None,
    ) -> None:  # fmt: skip
        if not isinstance(monitor, str):
            raise TypeError(f"EarlyStopping: monitor is the name of a trainer.metrics entry, such as "
                            f"monitor='valid_loss', not {monitor!r}")  # fmt: skip
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping: mode must be 'min' or 'max', got {mode!r}")
        check_count("EarlyStopping: patience", patience)
        check_number("EarlyStopping: min_delta", min_delta, 0)
        self.monitor, self.mode, self.patience, self.min_delta, self.name = monitor, mode, patience, min_delta, name
        self.best = math.inf if mode == "min" else -math.inf
        self.bad_checks = 0
        self.checked_this_epoch = False
        self.stopped_epoch: int | None = None

    def monitored_metrics(self) -> set[str]:
        """The one metric this callback reads: ``monitor``."""
        return {self.monitor}

    def improved(self, value: float) -> bool:
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def on_enter_epoch(self, trainer: TrainerView) -> None:
        self.checked_this_epoch = False

    def on_exit_phase(self, trainer: TrainerView) -> None:
        assert trainer.phase is not None  # the phase that ends
        if self._produced_in(trainer) == trainer.phase.name:
            self._check_order(trainer)
            self._check(trainer, f"which phase {trainer.phase.name!r} did not produce")

    def on_exit_epoch(self, trainer: TrainerView) -> None:
        if not self.checked_this_epoch:
            self._check(trainer, "which nothing produced during the epoch")

    def _produced_in(self, trainer: TrainerView) -> str | None:
        """The phase whose end publishes ``monitor``, or None when only the epoch's end can tell."""
        assert trainer.phase is not None  # called as a phase ends
        metrics = [callback for callback in trainer.callbacks if isinstance(callback, Metric)]
        if any(metric.active and metric.key_for(trainer) == self.monitor for metric in metrics):
            return trainer.phase.name
        if any(metric.key_for_phase(phase.name) == self.monitor for metric in metrics for phase in trainer.phases
               if metric.measures(phase.name)):  # fmt: skip
            return None  # a metric publishes it, in another phase
        prefixes = [phase.name for phase in trainer.phases if self.monitor.startswith(f"{phase.name}_")]
        return max(prefixes, key=len) if prefixes else None

    def _check(self, trainer: TrainerView, missing: str) -> None:
        if self.monitor not in trainer.metrics:
            raise KeyError(
                f"EarlyStopping monitors {self.monitor!r}, {missing}; "
                f"trainer.metrics has {', '.join(trainer.metrics) or 'nothing'}"
            )
        self.checked_this_epoch = True
        value = trainer.metrics[self.monitor]
        if self.improved(value):
            self.best, self.bad_checks = value, 0
            return
        self.bad_checks += 1
        if self.bad_checks >= self.patience:
            self.stopped_epoch = trainer.epoch
            if trainer.ranks.is_global_zero:
                print(f"EarlyStopping: {self.monitor} has not improved on {self.best:.6g} for {self.patience} "
                      f"check(s); stopping after epoch {trainer.epoch + 1}", flush=True)  # fmt: skip
            trainer.stop()

    def _check_order(self, trainer: TrainerView) -> None:
        position = trainer.callbacks.index(self)
        for index, callback in enumerate(trainer.callbacks[position + 1 :], start=position + 1):
            if isinstance(callback, Metric) and callback.active and callback.key_for(trainer) == self.monitor:
                raise ValueError(
                    f"EarlyStopping (callback {position}) would read {self.monitor!r} before {callback.key!r} "
                    f"(callback {index}) updates it: list EarlyStopping after its metric"
                )

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_checks": self.bad_checks, "checked_this_epoch": self.checked_this_epoch}

    def check_fits(self, state: dict[str, Any]) -> None:
        """Refuse a saved state without exactly this callback's keys, whose ``best`` is not a number (infinite
        before the first check; a 0-dim tensor for a metric that is one) but NaN, ``bad_checks`` not a count or
        ``checked_this_epoch`` not a flag."""
        check_keys("the saved state", state, self.state_dict())
        check_real("best", state["best"], finite=False, tensor=True)
        check_integer("bad_checks", state["bad_checks"])
        check_flag("checked_this_epoch", state["checked_this_epoch"])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad_checks = float(state["best"]), int(state["bad_checks"])
        self.checked_this_epoch = bool(state["checked_this_epoch"])
