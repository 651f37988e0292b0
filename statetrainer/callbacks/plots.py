"""PNG plots of a run: metrics per epoch and the learning rate per step."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import atomic_write
from ..errors import CheckpointError
from ..optional import require
from .base import Callback, TrainerView

__all__ = ["Plots"]


class Plots(Callback):
    """Writes ``metrics.png`` (every metric per epoch, losses and the rest apart)
    and ``lr.png`` (the learning rate of every step) into ``folder`` after each epoch.

    Args:
        folder: Where the PNGs go, e.g. next to the CSV log.
        name: The callback's unique name (defaults to the class name).
    """

    rank_zero_only = True  # under torchrun, rank 0 alone speaks

    def __init__(self, folder: str | os.PathLike[str], name: str | None = None) -> None:
        require("matplotlib", "plots", "Plots")  # now, rather than after the first epoch
        self.folder, self.name = Path(folder), name
        self.epochs: list[dict[str, float]] = []
        self.learning_rates: list[float] = []

    def output_files(self) -> list[Path]:
        return [self.folder / "metrics.png", self.folder / "lr.png"]

    def open_files(self, trainer: TrainerView) -> None:
        """A resumed run draws the plots of its checkpoint again: a killed run may have drawn epochs past it."""
        if self.epochs:
            self.write()

    def on_exit_step(self, trainer: TrainerView) -> None:
        assert trainer.optimizer is not None  # a step: a phase with gradients, which has an optimizer
        self.learning_rates.append(trainer.optimizer.param_groups[0]["lr"])

    def on_exit_epoch(self, trainer: TrainerView) -> None:
        self.epochs.append(dict(trainer.metrics))
        self.write()

    def write(self) -> None:
        # Figures of their own on the Agg canvas: pyplot's global backend (a notebook's) is left alone.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        self.folder.mkdir(parents=True, exist_ok=True)
        names = list(dict.fromkeys(key for epoch in self.epochs for key in epoch))
        groups = [[n for n in names if n.endswith("loss")], [n for n in names if not n.endswith("loss")]]
        groups = [group for group in groups if group]
        figure = Figure(figsize=(5.5 * max(len(groups), 1), 4))
        FigureCanvasAgg(figure)
        axes = figure.subplots(1, max(len(groups), 1), squeeze=False)
        epochs = range(1, len(self.epochs) + 1)
        for axis, group in zip(axes[0], groups, strict=False):  # no metrics yet: one empty axis, no group
            for metric in group:
                axis.plot(epochs, [epoch.get(metric, float("nan")) for epoch in self.epochs], marker="o", label=metric)
            axis.set_xlabel("epoch")
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
            axis.set_title("loss" if group[0].endswith("loss") else "metrics")
            axis.grid(alpha=0.3)
            axis.legend()
        figure.tight_layout()
        _save(figure, self.folder / "metrics.png")

        figure = Figure(figsize=(6, 3.5))
        FigureCanvasAgg(figure)
        axis = figure.subplots()
        axis.plot(range(len(self.learning_rates)), self.learning_rates)
        axis.set_xlabel("step")
        axis.set_ylabel("learning rate")
        axis.set_title("learning-rate schedule")
        axis.grid(alpha=0.3)
        figure.tight_layout()
        _save(figure, self.folder / "lr.png")

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": [dict(epoch) for epoch in self.epochs],
                "learning_rates": torch.tensor(self.learning_rates, dtype=torch.float64)}  # fmt: skip

    def check_fits(self, state: dict[str, Any]) -> None:
        epochs, rates = state["epochs"], state["learning_rates"]
        if not isinstance(epochs, list) or not all(
            isinstance(epoch, dict) and all(_is_number(value) for value in epoch.values()) for epoch in epochs
        ):  # fmt: skip
            raise CheckpointError("epochs is not a list of {metric: number} per epoch")
        if not isinstance(rates, torch.Tensor) or rates.dim() != 1 or not rates.dtype.is_floating_point:
            raise CheckpointError("learning_rates is not a 1-d tensor of floats")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epochs = [dict(epoch) for epoch in state["epochs"]]
        self.learning_rates = state["learning_rates"].tolist()


def _is_number(value: Any) -> bool:
    """A metric's value as ``trainer.metrics`` may hold it: a number, or a one-element tensor."""
    if isinstance(value, torch.Tensor):
        return value.numel() == 1
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _save(figure: Any, path: Path) -> None:
    """Write ``figure`` as a PNG, atomically: a reader never sees a half-drawn image."""
    with atomic_write(path) as temporary:
        figure.savefig(temporary, dpi=100, format="png")
