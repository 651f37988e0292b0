"""An exponential moving average of the model's weights, on the device, in the checkpoint, and for evaluation."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..checkpoint import CheckpointError
from ..distributed import fully_sharded
from ..saved_state import REQUIRED_TO_LOAD, unwrap_model
from .base import Callback, TrainerView

__all__ = ["EMA", "AVERAGED", "RAW"]

AVERAGED = "averaged"  # the state's key of the averaged weights: the model's state_dict() keys
RAW = "raw"  # the raw weights, while an evaluation phase runs on the averaged ones (None otherwise)


class EMA(Callback):
    """Keeps ``averaged = decay * averaged + (1 - decay) * weights`` after every ``every_steps`` optimizer steps.

    Every floating-point tensor of the model's ``state_dict()`` is averaged (the weights, and buffers such as
    BatchNorm's running statistics); the others (BatchNorm's batch count) are copied. The average starts from
    the weights as the run starts, lives on the model's device, updated in place with one fused call a step
    (``torch._foreach_lerp_``), and is part of the checkpoint, so a resumed run continues it exactly.

    With ``evaluate_with``, every phase without gradients (and ``validate()``) runs on the averaged weights: they
    are copied into the model as the phase starts and the raw ones copied back as it ends (or as an error or a cut
    short ``validate()`` ends it), bit for bit; training always runs on the raw weights. ``predict()`` runs only the
    callbacks given to it: pass the EMA to predict on the average. One callback may swap weights so. A checkpoint saved in such a phase (a stop signal's) holds the
    averaged weights as the model's and the raw ones in this callback's state, and a resume puts them back as the
    phase ends. ``load_weights(model, path, averaged=True)`` and ``export --averaged`` take the averaged weights.
    Under torchrun (DDP) every rank keeps the same average; a model sharded with ``fully_shard`` is refused. The
    average of a bf16 or fp16 tensor is kept in float32 (in its dtype, an update of ``(1 - decay)`` times a small
    change would round away): the swap for evaluation and ``load_weights``/``export`` round it to the model's
    dtype (it costs 8 bytes a bf16 parameter: the average and a buffer it is widened into each update). A
    checkpoint saved during an evaluation phase holds the averaged weights as its model part: loading it without
    this callback is refused.

    Args:
        decay: The weight of the average so far, in (0, 1): 0.999 averages over about 1,000 steps.
        every_steps: Update after every this many optimizer steps.
        evaluate_with: Evaluation phases run on the averaged weights.
        name: The callback's unique name (defaults to the class name).
    """

    def __init__(self, decay: float, every_steps: int = 1, evaluate_with: bool = True, name: str | None = None) -> None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay < 1:
            raise ValueError(f"EMA: decay is a number between 0 and 1 (0.999, say), not {decay!r}")
        if isinstance(every_steps, bool) or not isinstance(every_steps, int) or every_steps < 1:
            raise ValueError(f"EMA: every_steps is a positive integer, not {every_steps!r}")
        self.decay, self.every_steps, self.evaluate_with, self.name = float(decay), every_steps, evaluate_with, name
        self.swaps_weights = evaluate_with
        self.updates = 0
        self.averaged: dict[str, torch.Tensor] | None = None
        self._raw: dict[str, torch.Tensor] | None = None
        self._live: dict[str, torch.Tensor] | None = None  # the model's own tensors, by state_dict() key
        self._plan: _UpdatePlan | None = None  # built once the average and the model's tensors are known

    def _model_tensors(self, trainer: TrainerView) -> dict[str, torch.Tensor]:
        """The model's tensors (sharing its storage), by ``state_dict()`` key; looked up once."""
        if self._live is None:
            model = unwrap_model(trainer.model)
            if fully_sharded(model):
                raise ValueError("EMA does not average a model sharded with fully_shard yet: train without EMA, or "
                                 "with DDP")  # fmt: skip
            self._live = {key: tensor.detach() for key, tensor in model.state_dict().items()}
        return self._live

    def _start(self, trainer: TrainerView) -> tuple[dict[str, torch.Tensor], _UpdatePlan]:
        live = self._model_tensors(trainer)
        if self._plan is None:
            if self.averaged is None:  # a new run: the average starts from the weights as they start
                self.averaged = {key: tensor.clone() for key, tensor in live.items()}
            self.averaged = {key: value.to(average_dtype(value.dtype)) if key in live
                             and value.dtype == live[key].dtype else value
                             for key, value in self.averaged.items()}  # fmt: skip  # a bf16/fp16 one widened
            _check_like(self.averaged, live, AVERAGED, widened=True)
            if self._raw is not None:
                _check_like(self._raw, live, RAW)
            self._plan = _UpdatePlan(self.averaged, live)
        return live, self._plan

    def on_exit_idle(self, trainer: TrainerView) -> None:
        self._start(trainer)

    def on_exit_step(self, trainer: TrainerView) -> None:
        if trainer.global_step % self.every_steps:
            return
        _, plan = self._start(trainer)
        with torch.no_grad():
            if plan.averaged:
                # the fused list op torch.optim uses: one call for every tensor
                torch._foreach_lerp_(plan.averaged, plan.weights, 1.0 - self.decay)  # pyright: ignore[reportPrivateImportUsage]
            if plan.averaged_wide:  # bf16/fp16 weights, float32 averages: widened into buffers kept for it
                torch._foreach_copy_(plan.staging, plan.weights_narrow)  # pyright: ignore[reportPrivateImportUsage]
                torch._foreach_lerp_(plan.averaged_wide, plan.staging, 1.0 - self.decay)  # pyright: ignore[reportPrivateImportUsage]
            for copy, value in zip(plan.copies, plan.copied, strict=True):  # a batch count or two
                copy.copy_(value)
        self.updates += 1

    def on_enter_phase(self, trainer: TrainerView) -> None:
        if not self.evaluate_with or trainer.phase is None or trainer.phase.grad or self._raw is not None:
            return
        live, _ = self._start(trainer)
        assert self.averaged is not None
        with torch.no_grad():
            self._raw = {key: tensor.clone() for key, tensor in live.items()}
            for key, tensor in live.items():
                tensor.copy_(self.averaged[key])

    def on_exit_phase(self, trainer: TrainerView) -> None:
        if self._raw is None:
            return
        live = self._model_tensors(trainer)
        with torch.no_grad():
            for key, tensor in live.items():
                tensor.copy_(self._raw[key])
        self._raw = None

    def state_dict(self) -> dict[str, Any]:
        required = None
        if self._raw is not None:
            required = ("it was saved during an evaluation phase run on the averaged weights, so its model part "
                        "holds them: resume it with the EMA callback, or resume an earlier checkpoint")  # fmt: skip
        return {"decay": self.decay, "updates": self.updates, AVERAGED: self.averaged, RAW: self._raw,
                REQUIRED_TO_LOAD: required}  # fmt: skip

    def check_fits(self, state: dict[str, Any]) -> None:
        decay, updates, averaged, raw = state["decay"], state["updates"], state[AVERAGED], state[RAW]
        if not isinstance(decay, float) or not math.isfinite(decay):
            raise CheckpointError(f"decay is {decay!r}, not a number")
        if decay != self.decay:
            raise CheckpointError(f"the run averaged with decay {decay}, this EMA's is {self.decay}: build it as the "
                                  "run did")  # fmt: skip
        if isinstance(updates, bool) or not isinstance(updates, int) or updates < 0:
            raise CheckpointError(f"updates is {updates!r}, not a count")
        for label, weights in ((AVERAGED, averaged), (RAW, raw)):
            if weights is None and (label == RAW or updates == 0):
                continue
            if not isinstance(weights, dict) or not all(
                isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in weights.items()
            ):
                raise CheckpointError(f"{label} is not the model's tensors by key")

    def on_exception(self, trainer: TrainerView, error: BaseException) -> None:
        self.on_exit_phase(trainer)  # an evaluation phase cut short: the model goes back to the raw weights

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._raw is not None and self._live is not None:  # an evaluation cut short (validate()'s own undo)
            with torch.no_grad():
                for key, tensor in self._live.items():
                    tensor.copy_(self._raw[key])
        self.updates = state["updates"]
        self.averaged, self._raw = state[AVERAGED], state[RAW]
        self._live, self._plan = None, None


class _UpdatePlan:
    """The tensors of one update, grouped once: averages in the weights' own dtype, float32 averages of bf16/fp16
    weights (with a float32 buffer each to widen the weights into), and non-float tensors copied."""

    def __init__(self, averaged: dict[str, torch.Tensor], live: dict[str, torch.Tensor]) -> None:
        same = [
            key for key, tensor in live.items() if tensor.is_floating_point() and averaged[key].dtype == tensor.dtype
        ]
        wide = [
            key for key, tensor in live.items() if tensor.is_floating_point() and averaged[key].dtype != tensor.dtype
        ]
        copied = [key for key, tensor in live.items() if not tensor.is_floating_point()]
        self.averaged, self.weights = [averaged[key] for key in same], [live[key] for key in same]
        self.averaged_wide, self.weights_narrow = [averaged[key] for key in wide], [live[key] for key in wide]
        self.staging = [torch.empty_like(averaged[key]) for key in wide]
        self.copies, self.copied = [averaged[key] for key in copied], [live[key] for key in copied]


def average_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the average of a tensor of ``dtype`` is kept in: float32 for bf16 and fp16, else its own."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _check_like(saved: dict[str, torch.Tensor], live: dict[str, torch.Tensor], label: str,
                widened: bool = False) -> None:  # fmt: skip
    """Raise unless ``saved`` holds a tensor of the same shape and dtype (``widened``: the average's dtype) for each
    of the model's keys (a checkpoint whose model part fits, and whose EMA state does not, is a damaged one)."""
    wrong = [key for key, tensor in live.items() if key not in saved or saved[key].shape != tensor.shape
             or saved[key].dtype != (average_dtype(tensor.dtype) if widened else tensor.dtype)]  # fmt: skip
    if wrong or len(saved) != len(live):
        raise CheckpointError(f"EMA: the saved {label} weights do not fit the model (first at "
                              f"{(wrong or sorted(set(saved) - set(live)))[0]!r})")  # fmt: skip
