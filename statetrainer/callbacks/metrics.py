"""Metrics that accumulate on the device and publish to ``trainer.metrics`` at phase end.

Each batch's update is a few in-place tensor ops: nothing is read back to the
host until the phase ends (or a logger asks for a running value), so metrics
never force a GPU sync per batch. Under torchrun a metric is reduced over the
ranks as its phase ends, so ``trainer.metrics`` is the same on every rank.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from ..distributed import Ranks, all_reduce
from ..errors import CheckpointError
from ..phase import Phase
from ..saved_state import check_flag, check_integer, check_keys, check_tensor
from ..validation import check_count, check_number
from .base import Callback, TrainerView

__all__ = ["Accuracy", "Metric", "SmoothedLoss", "running_metrics"]


class Metric(Callback):
    """A value accumulated over one phase, published as ``<phase>_<metric_name>``.

    Subclasses implement ``reset`` (start of a phase), ``update`` (each batch, on
    the device) and ``compute`` (a 0-dim tensor, called only after a batch), and
    extend ``state_dict``/``load_state_dict`` with their accumulators.

    Args:
        phases: Names of the phases to measure; None measures every phase.
        name: The callback's unique name (defaults to the class name).
    """

    metric_name = "metric"
    state_per_rank = True  # each rank accumulates its own share of the phase

    def __init__(self, phases: Iterable[str] | None = None, name: str | None = None) -> None:
        self.phases = None if phases is None else frozenset(phases)
        self.name = name
        self.active = False  # measuring the current phase
        self.batches = 0  # batches seen in the current phase

    def key_for(self, trainer: TrainerView) -> str:
        """The ``trainer.metrics`` name this metric publishes in the current phase."""
        assert trainer.phase is not None  # called while a phase runs
        return self.key_for_phase(trainer.phase.name)

    def key_for_phase(self, phase: str) -> str:
        """The ``trainer.metrics`` name this metric publishes in ``phase``."""
        return f"{phase}_{self.metric_name}"

    def measures(self, phase: str) -> bool:
        """Whether this metric is measured in ``phase``."""
        return self.phases is None or phase in self.phases

    def metric_names(self, phases: Sequence[Phase]) -> set[str]:
        """``<phase>_<metric_name>`` for each of ``phases`` this metric measures."""
        return {self.key_for_phase(phase.name) for phase in phases if self.measures(phase.name)}

    def reset(self, trainer: TrainerView) -> None:
        raise NotImplementedError

    def update(self, trainer: TrainerView) -> None:
        raise NotImplementedError

    def compute(self) -> torch.Tensor:
        raise NotImplementedError

    def value(self) -> float:
        """The current value, read back to the host; NaN before the first batch."""
        return float(self.compute()) if self.batches else float("nan")

    def on_enter_phase(self, trainer: TrainerView) -> None:
        assert trainer.phase is not None  # the phase that starts
        self.active = self.measures(trainer.phase.name)
        self.batches = 0
        if self.active:
            self.reset(trainer)

    def on_exit_batch(self, trainer: TrainerView) -> None:
        if self.active:
            self.batches += 1
            self.update(trainer)

    def global_value(self, ranks: Ranks) -> float:
        """The phase's value over every rank: the mean of the ranks' values (a metric of counts sums them)."""
        if not ranks.distributed:
            return self.value()
        value = self.compute().detach().double() if self.batches else torch.tensor(float("nan"), dtype=torch.float64)
        return float(all_reduce(value, ranks)) / ranks.world_size

    def on_exit_phase(self, trainer: TrainerView) -> None:
        if self.active:
            trainer.metrics[self.key_for(trainer)] = self.global_value(trainer.ranks)

    def state_dict(self) -> dict[str, Any]:
        return {"active": self.active, "batches": self.batches}

    def check_fits(self, state: dict[str, Any]) -> None:
        """Refuse a saved state whose ``active`` is not a flag or whose ``batches`` is not a count; a subclass
        extends it with its accumulators."""
        check_flag("active", state["active"])
        check_integer("batches", state["batches"])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.active, self.batches = bool(state["active"]), int(state["batches"])


class SmoothedLoss(Metric):
    """The phase's loss: smoothed while training, the exact sample mean while evaluating.

    In a phase with ``grad=True`` it is the exponential moving average of the
    batch loss, bias-corrected: ``avg = beta * avg + (1 - beta) * loss`` after
    each batch, reported as ``avg / (1 - beta ** n)`` after ``n`` batches, so
    early values are not pulled towards zero. In a phase without gradients
    (validation, test) it is the exact mean over the phase's samples, each
    batch's mean loss weighed by its number of samples, so ``valid_loss`` (and
    ``EarlyStopping`` or ``Checkpoint(best=...)`` on it) does not depend on the
    order of the data. Both accumulate on the device. Reset every phase.
    """

    metric_name = "loss"

    def __init__(self, beta: float = 0.98, phases: Iterable[str] | None = None, name: str | None = None) -> None:
        check_number("SmoothedLoss: beta", beta, 0, 1, high_open=True)
        super().__init__(phases, name)
        self.beta = beta
        self.average = torch.zeros(())  # the moving average, or the sum of sample losses when exact
        self.exact, self.samples = False, 0

    def reset(self, trainer: TrainerView) -> None:
        assert trainer.phase is not None  # reset as a phase starts
        self.average = torch.zeros((), device=trainer.device)
        self.exact, self.samples = not trainer.phase.grad, 0

    def update(self, trainer: TrainerView) -> None:
        assert trainer.loss is not None  # a batch's exit: its forward gave the loss
        loss = trainer.loss.detach()
        if self.exact:
            target = trainer.target
            count = len(target) if isinstance(target, torch.Tensor) and target.dim() else 1
            self.average.add_(loss, alpha=count)
            self.samples += count
            return
        weight = trainer.loss_weight  # under torchrun, the mean over the ranks is then the global batch's mean
        self.average.mul_(self.beta).add_(loss, alpha=(1 - self.beta) * weight)

    def compute(self) -> torch.Tensor:
        if self.exact:
            return self.average / self.samples
        return self.average / (1 - self.beta**self.batches)

    def global_value(self, ranks: Ranks) -> float:
        """Over every rank: the sum of sample losses over all samples when exact, else the ranks' mean."""
        if not (self.exact and ranks.distributed):
            return super().global_value(ranks)
        sums = all_reduce(torch.stack([self.average.double(), torch.tensor(float(self.samples), dtype=torch.float64,
                                                                           device=self.average.device)]), ranks)  # fmt: skip
        total, samples = sums.tolist()
        return total / samples if samples else float("nan")

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "average": self.average, "exact": self.exact, "samples": self.samples}

    def check_fits(self, state: dict[str, Any]) -> None:
        """Refuse a saved state without exactly this metric's keys, or whose ``average`` is not a 0-dim tensor of
        its own dtype, ``exact`` not a flag or ``samples`` not a count."""
        check_keys("the saved state", state, self.state_dict())
        super().check_fits(state)
        check_tensor("average", state["average"], (), self.average.dtype)
        check_flag("exact", state["exact"])
        check_integer("samples", state["samples"])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.average, self.exact, self.samples = state["average"], bool(state["exact"]), int(state["samples"])

    @classmethod
    def regroup_states(cls, states: list[dict[str, Any]], world_size: int) -> list[dict[str, Any]]:
        """Exact: rank 0 takes every saved rank's sums; smoothed: every rank starts from the mean of the saved
        averages. Either way the phase's value goes on as it was."""
        first = states[0]
        if first["exact"]:
            total, samples = sum(state["average"] for state in states), sum(int(state["samples"]) for state in states)
            empty = {**first, "average": torch.zeros_like(first["average"]), "samples": 0}
            return [{**first, "average": total, "samples": samples}] + [empty] * (world_size - 1)
        zero = torch.zeros((), dtype=torch.float64)  # sum's start (its 0, as a tensor)
        mean = sum((state["average"].double() for state in states), zero) / len(states)
        return [{**first, "average": mean.to(first["average"].dtype)} for _ in range(world_size)]


class Accuracy(Metric):
    """Fraction of samples whose target is among the top ``top_k`` predictions.

    Counts correct predictions and samples over the phase, so the value is the
    exact sample mean whatever the batch sizes, without keeping outputs.
    ``output`` is ``(batch, classes)`` scores; ``target`` holds class indices.
    """

    def __init__(self, top_k: int = 1, phases: Iterable[str] | None = None, name: str | None = None) -> None:
        check_count("Accuracy: top_k", top_k)
        super().__init__(phases, name)
        self.top_k = top_k
        self.metric_name = "accuracy" if top_k == 1 else f"top{top_k}_accuracy"
        self.correct = torch.zeros((), dtype=torch.long)
        self.total = 0

    def reset(self, trainer: TrainerView) -> None:
        self.correct = torch.zeros((), dtype=torch.long, device=trainer.device)
        self.total = 0

    def update(self, trainer: TrainerView) -> None:
        output, target = trainer.output.detach(), trainer.target
        if self.top_k == 1:
            hits = output.argmax(dim=1) == target
        else:
            hits = (output.topk(self.top_k, dim=1).indices == target.unsqueeze(1)).any(dim=1)
        self.correct += hits.sum()
        self.total += target.numel()

    def compute(self) -> torch.Tensor:
        return self.correct / self.total

    def global_value(self, ranks: Ranks) -> float:
        """The fraction correct over every rank's samples."""
        if not ranks.distributed:
            return self.value()
        counts = all_reduce(torch.stack([self.correct, torch.tensor(self.total, device=self.correct.device)]), ranks)
        correct, total = counts.tolist()
        return correct / total if total else float("nan")

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "correct": self.correct, "total": self.total}

    def check_fits(self, state: dict[str, Any]) -> None:
        """Refuse a saved state without exactly this metric's keys, or whose ``correct`` is not a 0-dim tensor of
        its own dtype, ``total`` not a count, or more correct than ``total``."""
        check_keys("the saved state", state, self.state_dict())
        super().check_fits(state)
        check_tensor("correct", state["correct"], (), self.correct.dtype)
        check_integer("total", state["total"])
        if not 0 <= int(state["correct"]) <= state["total"]:
            raise CheckpointError(f"correct is {int(state['correct'])}, not a count from 0 to total={state['total']}")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.correct, self.total = state["correct"], int(state["total"])

    @classmethod
    def regroup_states(cls, states: list[dict[str, Any]], world_size: int) -> list[dict[str, Any]]:
        """Rank 0 takes every saved rank's counts and the others start from none, so the sums go on as they were."""
        correct, total = sum(state["correct"] for state in states), sum(int(state["total"]) for state in states)
        empty = {**states[0], "correct": torch.zeros_like(states[0]["correct"]), "total": 0}
        return [{**states[0], "correct": correct, "total": total}] + [empty] * (world_size - 1)


def running_metrics(trainer: TrainerView) -> dict[str, float]:
    """The current phase's metrics as they stand now (reads them back to the host)."""
    return {
        metric.key_for(trainer): metric.value()
        for metric in trainer.callbacks
        if isinstance(metric, Metric) and metric.active and metric.batches
    }
