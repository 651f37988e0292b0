"""Parameter schedulers: set an optimizer hyper-parameter before every step.

A schedule is a pure function of ``trainer.global_step`` (the index of the step
about to be taken), applied on ``enter step``, so a resumed run picks up the
exact value without replaying anything. Any hyper-parameter of a param group can
be scheduled by name: ``lr``, ``momentum``, ``weight_decay``, or one element of a
tuple such as ``betas[0]``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch

from ..saved_state import check_integer, check_keys, check_like, check_real
from ..validation import check_count, check_number
from .base import Callback, TrainerView

__all__ = ["CosineWarmRestarts", "OneCycle", "ParamScheduler", "TorchScheduler", "anneal"]

_PARAM = re.compile(r"^(?P<key>[A-Za-z_]\w*)(?:\[(?P<index>\d+)\])?$")


def anneal(start: float, end: float, fraction: float, how: str = "cos") -> float:
    """Go from ``start`` (fraction 0) to ``end`` (fraction 1) along a half cosine or a line."""
    if how == "cos":
        return end + (start - end) / 2 * (math.cos(math.pi * fraction) + 1)
    return start + (end - start) * fraction


def _check_anneal(how: str) -> str:
    if how not in ("cos", "linear"):
        raise ValueError(f"unknown annealing {how!r}; use 'cos' or 'linear'")
    return how


class ParamScheduler(Callback):
    """Sets hyper-parameter ``param`` of each param group to ``values(step)`` before each step.

    Args:
        param: ``lr``, ``momentum``, ``weight_decay``, ``betas[0]``, ...
        groups: Indices of the param groups to set; None sets all.
        name: The callback's unique name (defaults to the class name).
    """

    def __init__(self, param: str = "lr", groups: Sequence[int] | None = None, name: str | None = None) -> None:
        match = _PARAM.match(param)
        if match is None:
            raise ValueError(f"cannot schedule {param!r}: give a param-group key like 'lr' or 'betas[0]'")
        self.param = param
        self._key, index = match["key"], match["index"]
        self._index = None if index is None else int(index)
        self.groups = None if groups is None else list(groups)
        self.name = name

    def values(self, step: int, group_count: int) -> list[float]:
        """The value for each scheduled group at ``step``."""
        raise NotImplementedError

    def on_enter_step(self, trainer: TrainerView) -> None:
        assert trainer.optimizer is not None  # a step: a phase with gradients, which has an optimizer
        param_groups = trainer.optimizer.param_groups
        indices = range(len(param_groups)) if self.groups is None else self.groups
        for group_index, value in zip(indices, self.values(trainer.global_step, len(indices)), strict=True):
            _set_param(param_groups[group_index], self._key, self._index, value, type(self).__name__)


def _set_param(group: dict[str, Any], key: str, index: int | None, value: float, owner: str) -> None:
    """Set ``group[key]`` (or element ``index`` of a tuple there, as in ``betas[0]``) to ``value``."""
    if key not in group:
        raise KeyError(f"{owner}: the optimizer's param groups have no {key!r} (they have {', '.join(sorted(group))})")
    if index is None:
        current = group[key]
        if isinstance(current, torch.Tensor):  # e.g. a capturable Adam's lr
            current.fill_(value)
        else:
            group[key] = value
    else:
        items = list(group[key])
        items[index] = value
        group[key] = tuple(items)


def _per_group(value: float | Sequence[float], count: int, what: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * count
    values = [float(item) for item in value]
    if len(values) != count:
        raise ValueError(f"{what}: got {len(values)} values for {count} param groups")
    return values


class CosineWarmRestarts(ParamScheduler):
    """Cosine annealing with warm restarts (SGDR).

    Each cycle is a half cosine from the peak down to ``min_value``; the first
    lasts ``period`` steps and each next one ``t_mult`` times the last. At every
    restart the peak is multiplied by ``decay``. With ``decay=1`` and an integer
    ``t_mult`` this is torch's ``CosineAnnealingWarmRestarts(T_0=period,
    T_mult=t_mult, eta_min=min_value)`` with initial lr ``max_value``.

    Without ``period`` there is one cycle, the whole run: ``trainer.total_steps``,
    taken at the first step (so ``max_steps``, ``batches``, ``accumulate`` and
    the number of processes all count), and kept in the checkpoint.

    Args:
        max_value: The peak, one for all groups or one per group.
        period: Steps in the first cycle; None: the run's ``total_steps``.
        min_value: The floor at the end of each cycle.
        t_mult: How much longer each cycle is than the one before (>= 1).
        decay: Factor on the peak at each restart (0 < decay <= 1).
    """

    def __init__(
        self,
        max_value: float | Sequence[float],
        period: int | None = None,
        min_value: float | Sequence[float] = 0.0,
        t_mult: float = 1.0,
        decay: float = 1.0,
        param: str = "lr",
        groups: Sequence[int] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(param, groups, name)
        check_count("CosineWarmRestarts: period", period, optional=True)
        check_number("CosineWarmRestarts: t_mult", t_mult, 1)
        check_number("CosineWarmRestarts: decay", decay, 0, 1, low_open=True)
        self.max_value, self.min_value = max_value, min_value
        self.period, self.t_mult, self.decay = period, t_mult, decay
        self._period_given = period is not None

    def state_dict(self) -> dict[str, Any]:
        """The period taken from the run (a period given to the callback is its own: ``{}``)."""
        return {} if self._period_given or self.period is None else {"period": self.period}

    def check_fits(self, state: dict[str, Any]) -> None:
        """Refuse a saved state other than ``{"period": n}`` with an integer n >= 1 (or ``{}``: a given period, or
        none taken yet)."""
        check_keys("the saved state", state, ("period",) if not isinstance(state, dict) or state else ())
        if state:
            check_integer("period", state["period"], minimum=1)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self._period_given:
            self.period = state.get("period")

    def on_enter_step(self, trainer: TrainerView) -> None:
        if self.period is None:  # one cycle: the whole run
            if trainer.total_steps is None:
                raise ValueError("CosineWarmRestarts: the run's total_steps is unknown (a training phase has no "
                                 "length); give CosineWarmRestarts(period=...)")  # fmt: skip
            self.period = trainer.total_steps
        super().on_enter_step(trainer)

    def cycle_position(self, step: int) -> tuple[int, float, float]:
        """(cycle index, steps into the cycle, cycle length) at ``step``."""
        assert self.period is not None  # taken from the run at its first step
        cycle, start, length = 0, 0.0, float(self.period)
        while step >= start + length:
            start += length
            length *= self.t_mult
            cycle += 1
        return cycle, step - start, length

    def values(self, step: int, group_count: int) -> list[float]:
        cycle, position, length = self.cycle_position(step)
        peaks = _per_group(self.max_value, group_count, "CosineWarmRestarts max_value")
        floors = _per_group(self.min_value, group_count, "CosineWarmRestarts min_value")
        return [
            anneal(peak * self.decay**cycle, floor, position / length)
            for peak, floor in zip(peaks, floors, strict=True)
        ]


class OneCycle(ParamScheduler):
    """The one-cycle policy: warm up to the peak, then anneal to the floor.

    Starts at ``max_value / div_factor``, rises over the first ``pct_start`` of
    ``total_steps`` to ``max_value`` (linearly by default), then falls to
    ``max_value / div_factor / final_div_factor`` (along a cosine by default);
    after ``total_steps`` it stays at the floor. With ``cycle_momentum`` it also
    moves the momentum (``betas[0]`` for Adam-like optimizers) the opposite way,
    between ``max_momentum`` and ``base_momentum``. With ``warmup="cos"`` the
    values are those of torch's ``OneCycleLR``; with both set to ``"linear"``,
    those of ``OneCycleLR(anneal_strategy="linear")``.

    Without ``total_steps`` the cycle is the whole run: ``trainer.total_steps``,
    read at the first step (the steps of every epoch, counting ``accumulate``,
    ``limit`` and the world size).

    The cycle's length is part of the run: a checkpoint keeps ``total_steps``,
    and a run resumed with more epochs goes on along the cycle it began (at the
    floor once it is over) rather than jumping onto a longer one; ``resized``
    then holds the ``total_steps`` it was built with.
    """

    def __init__(
        self,
        max_value: float | Sequence[float],
        total_steps: int | None = None,
        pct_start: float = 0.25,
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
        warmup: str = "linear",
        anneal: str = "cos",
        cycle_momentum: bool = False,
        base_momentum: float = 0.85,
        max_momentum: float = 0.95,
        param: str = "lr",
        groups: Sequence[int] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(param, groups, name)
        check_count("OneCycle: total_steps", total_steps, minimum=2, optional=True)
        check_number("OneCycle: pct_start", pct_start, 0, 1, low_open=True, high_open=True)
        self.max_value, self.total_steps, self.pct_start = max_value, total_steps, pct_start
        self.div_factor, self.final_div_factor = div_factor, final_div_factor
        self.warmup, self.anneal = _check_anneal(warmup), _check_anneal(anneal)
        self.cycle_momentum, self.base_momentum, self.max_momentum = cycle_momentum, base_momentum, max_momentum
        self.resized: int | None = None

    def state_dict(self) -> dict[str, Any]:
        return {} if self.total_steps is None else {"total_steps": self.total_steps}

    def check_fits(self, state: dict[str, Any]) -> None:
        """Refuse a saved state other than ``{"total_steps": n}`` with an integer n >= 2 (or ``{}``: a checkpoint
        from before the cycle's length was saved, which keeps this one's)."""
        check_keys("the saved state", state, ("total_steps",) if not isinstance(state, dict) or state else ())
        if state:
            check_integer("total_steps", state["total_steps"], minimum=2)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("total_steps", self.total_steps)
        if saved is not None and saved != self.total_steps:
            self.resized, self.total_steps = self.total_steps, int(saved)

    def _take_length(self, trainer: TrainerView) -> None:
        """At the first step of a cycle given no length: the run's, which must be known."""
        if trainer.total_steps is None:
            raise ValueError("OneCycle: the run's total_steps is unknown (a training phase has no length); "
                             "give OneCycle(total_steps=...)")  # fmt: skip
        if trainer.total_steps < 2:
            raise ValueError(f"OneCycle: the run takes {trainer.total_steps} step(s); a cycle needs at least 2")
        self.total_steps = trainer.total_steps

    def _shape(self, step: int, start: float, peak: float, end: float) -> float:
        """torch's OneCycleLR phases: the peak is reached at step ``pct_start * total - 1``."""
        total = self.total_steps
        assert total is not None  # taken from the run at its first step
        peak_step = self.pct_start * total - 1
        last_step = total - 1
        step = min(step, last_step)
        if step <= peak_step:  # (a warm-up shorter than one step starts at the peak)
            return anneal(start, peak, step / peak_step if peak_step > 0 else 1.0, self.warmup)
        return anneal(peak, end, (step - peak_step) / (last_step - peak_step), self.anneal)

    def values(self, step: int, group_count: int) -> list[float]:
        peaks = _per_group(self.max_value, group_count, "OneCycle max_value")
        return [
            self._shape(step, peak / self.div_factor, peak, peak / self.div_factor / self.final_div_factor)
            for peak in peaks
        ]

    def momentum(self, step: int) -> float:
        return self._shape(step, self.max_momentum, self.base_momentum, self.max_momentum)

    def on_enter_step(self, trainer: TrainerView) -> None:
        if self.total_steps is None:
            self._take_length(trainer)
        super().on_enter_step(trainer)
        if self.cycle_momentum:
            assert trainer.optimizer is not None  # a step: a phase with gradients, which has an optimizer
            param_groups = trainer.optimizer.param_groups
            momentum = self.momentum(trainer.global_step)
            for index in range(len(param_groups)) if self.groups is None else self.groups:
                group = param_groups[index]
                if "betas" in group:  # Adam-like: the momentum is betas[0]
                    _set_param(group, "betas", 0, momentum, "OneCycle")
                elif "momentum" in group:
                    _set_param(group, "momentum", None, momentum, "OneCycle")
                else:
                    raise KeyError("OneCycle(cycle_momentum=True): the optimizer has neither 'betas' nor 'momentum'")


class TorchScheduler(Callback):
    """Any ``torch.optim.lr_scheduler`` scheduler as a callback, its state saved.

    Args:
        scheduler: The scheduler, built on the trainer's optimizer.
        interval: ``"step"`` calls ``scheduler.step()`` after every optimizer
            step; ``"epoch"`` after every epoch.
        monitor: For ``ReduceLROnPlateau``: the ``trainer.metrics`` entry it
            watches (stepped once per epoch).
        name: The callback's unique name (defaults to the class name).
    """

    def __init__(
        self, scheduler: Any, interval: str = "step", monitor: str | None = None, name: str | None = None
    ) -> None:
        if interval not in ("step", "epoch"):
            raise ValueError(f"TorchScheduler: interval must be 'step' or 'epoch', got {interval!r}")
        plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        if plateau and monitor is None:
            raise ValueError("TorchScheduler: ReduceLROnPlateau needs monitor='<metric name>'")
        self.scheduler, self.monitor, self.name = scheduler, monitor, name
        self.interval = "epoch" if plateau else interval

    def monitored_metrics(self) -> set[str]:
        return set() if self.monitor is None else {self.monitor}

    def on_exit_step(self, trainer: TrainerView) -> None:
        if self.interval == "step":
            self.scheduler.step()

    def on_exit_epoch(self, trainer: TrainerView) -> None:
        if self.interval != "epoch":
            return
        if self.monitor is None:
            self.scheduler.step()
            return
        if self.monitor not in trainer.metrics:
            raise KeyError(
                f"TorchScheduler monitors {self.monitor!r} but trainer.metrics has "
                f"{', '.join(trainer.metrics) or 'nothing'}"
            )
        self.scheduler.step(trainer.metrics[self.monitor])

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict()}

    def check_fits(self, state: dict[str, Any]) -> None:
        """Refuse a saved state unless it is laid out as this scheduler's own, each value of its kind (see
        ``statetrainer.saved_state.check_like``), with its counts (``last_epoch``...) integers >= 0 and its learning
        rates (``base_lrs``...) finite and >= 0.

        torch's schedulers load any dict into their attributes unchecked (a key
        ``optimizer`` would replace theirs), so the keys must be the scheduler's own.
        """
        check_keys("the saved state", state, ("scheduler",))
        check_like("scheduler", state["scheduler"], self.scheduler.state_dict())
        for key, value in state["scheduler"].items():
            if key in _SCHEDULER_COUNTS:
                check_integer(f"scheduler[{key!r}]", value)
            elif key in _SCHEDULER_RATES and isinstance(value, list):
                for index, rate in enumerate(value):
                    check_real(f"scheduler[{key!r}][{index}]", rate, 0)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])


# In torch's schedulers' states: counts of steps and epochs, and learning rates per param group.
_SCHEDULER_COUNTS = frozenset({"last_epoch", "_step_count", "num_bad_epochs", "cooldown_counter"})
_SCHEDULER_RATES = frozenset({"base_lrs", "_last_lr", "min_lrs", "max_lrs"})
