"""The optimizer's side of a batch: backward, the accumulation window, clipping, mixed precision, the step."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .checkpoint import CheckpointError
from .distributed import Ranks, all_gather, gathered_states
from .precision import make_autocast, make_grad_scaler
from .state import check_model_state, tensors_to, unwrap_model

__all__ = ["StepRunner", "optimizer_class_name"]


class StepRunner:
    """Turns batch losses into optimizer steps; a part of the run's state (model, optimizer, scaler, open window).

    Args:
        model: The model, already on the run's device.
        optimizer: Steps the model's parameters; None for a run that only evaluates.
        device: The run's device (autocast and the GradScaler depend on it).
        accumulate: Batches per optimizer step. The step follows the mean of the
            window's batch gradients; a shorter last window uses its own mean.
        grad_clip: Clip the gradients' total 2-norm to this before each step.
        precision: None, ``"bf16"`` or ``"fp16"`` (with a GradScaler on CUDA).
        ranks: This process's place among the run's processes. Inside an
            accumulation window each rank's gradients are its own (DDP skips
            the all-reduce until the window's last batch), so a checkpoint
            holds every rank's.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        device: torch.device,
        accumulate: int = 1,
        grad_clip: float | None = None,
        precision: str | None = None,
        ranks: Ranks = Ranks(),
    ) -> None:
        self.model, self.optimizer, self.device, self.ranks = model, optimizer, device, ranks
        self.accumulate, self.grad_clip = accumulate, grad_clip
        self.autocast = make_autocast(precision, device)
        self.scaler = make_grad_scaler(precision, device)
        self.parameters = [p for group in optimizer.param_groups for p in group["params"]] if optimizer else []

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        """Add this batch's share of the window's mean gradient to ``.grad``."""
        if self.accumulate > 1:
            loss = loss / self.accumulate
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()

    def close_window(self, batches: int) -> None:
        """Before a step after ``batches`` batches: make a ragged last window the mean of its own batches."""
        if batches != self.accumulate:
            gradients = [p.grad for p in self.parameters if p.grad is not None]
            torch._foreach_mul_(gradients, self.accumulate / batches)

    def step(self) -> None:
        """Clip, step (through the GradScaler under fp16) and zero the gradients."""
        optimizer, scaler = self.optimizer, self.scaler
        if self.grad_clip is not None:
            if scaler is not None:
                scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(self.parameters, self.grad_clip)
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": unwrap_model(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "optimizer_class": optimizer_class_name(self.optimizer),
            # Inside an accumulation window the gradients so far are part of the state: every rank's.
            "grads": self._gradients_of_every_rank(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def check_fits(self, state: dict[str, Any]) -> None:
        check_model_state(unwrap_model(self.model).state_dict(), state["model"])
        if (state["optimizer"] is None) != (self.optimizer is None):
            raise CheckpointError("the checkpoint and this trainer disagree on having an optimizer")
        if state["optimizer_class"] != optimizer_class_name(self.optimizer):
            raise CheckpointError(f"the checkpoint's optimizer is {state['optimizer_class']}, this trainer's "
                                  f"{optimizer_class_name(self.optimizer)}")  # fmt: skip
        if (state["scaler"] is None) != (self.scaler is None):
            raise CheckpointError("the checkpoint and this trainer disagree on having a GradScaler (fp16 on CUDA): "
                                  "resume with the precision and device the run was saved with")  # fmt: skip
        if self.optimizer is not None:
            saved_keys = [sorted(set(group) - {"params"}) for group in state["optimizer"]["param_groups"]]
            our_keys = [sorted(set(group) - {"params"}) for group in self.optimizer.param_groups]
            if saved_keys != our_keys:
                raise CheckpointError(f"the checkpoint's optimizer settings are {saved_keys}, this one's {our_keys}")
            saved_groups = [len(group["params"]) for group in state["optimizer"]["param_groups"]]
            our_groups = [len(group["params"]) for group in self.optimizer.param_groups]
            if saved_groups != our_groups:
                raise CheckpointError(f"the checkpoint's optimizer has param groups of sizes {saved_groups}, "
                                      f"this one {our_groups}")  # fmt: skip
        if not isinstance(state["grads"], list) or not state["grads"]:
            raise CheckpointError("the saved gradients are not a list with one entry per rank")
        for rank_grads in state["grads"]:
            for index, grad in rank_grads.items():
                parameter = self.parameters[int(index)]
                if not isinstance(grad, torch.Tensor) or grad.shape != parameter.shape:
                    raise CheckpointError(f"the saved gradient of parameter {index} does not fit its shape "
                                          f"{tuple(parameter.shape)}")  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unwrap_model(self.model).load_state_dict(state["model"])
        if self.optimizer is not None:  # kept by the optimizer: copies, not views of the checkpoint file
            self.optimizer.load_state_dict(tensors_to(state["optimizer"], torch.device("cpu")))
        for index, grad in self._own_gradients(state["grads"]).items():
            parameter = self.parameters[int(index)]
            parameter.grad = grad.to(parameter.device, parameter.dtype, copy=True)
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])


    def _gradients_of_every_rank(self) -> list[dict[str, torch.Tensor]]:
        """Each rank's gradients so far, by parameter index (empty between windows)."""
        own = {str(index): p.grad for index, p in enumerate(self.parameters) if p.grad is not None}
        if not self.ranks.distributed:
            return [own]
        has_grad = torch.tensor([p.grad is not None for p in self.parameters], dtype=torch.uint8)
        anywhere = torch.stack(all_gather(has_grad, self.ranks, self.device)).amax(0).tolist()
        indices = [index for index, present in enumerate(anywhere) if present]
        local = [self._grad_or_zeros(index) for index in indices]
        return [{str(index): grad for index, grad in zip(indices, grads)}
                for grads in gathered_states(local, self.ranks, self.device)]  # fmt: skip

    def _grad_or_zeros(self, index: int) -> torch.Tensor:
        parameter = self.parameters[index]
        return parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)

    def _own_gradients(self, saved: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """This rank's saved gradients; from another number of ranks, their mean, which the window's
        all-reduce (a mean over the ranks) would have made of them."""
        if len(saved) == self.ranks.world_size:
            return saved[self.ranks.rank]
        indices = sorted({index for rank_grads in saved for index in rank_grads}, key=int)
        return {index: sum(rank_grads[index].float() for rank_grads in saved if index in rank_grads) / len(saved)
                for index in indices}  # fmt: skip


def optimizer_class_name(optimizer: torch.optim.Optimizer | None) -> str | None:
    """The optimizer's class, as ``module.QualName`` (None for no optimizer): what checkpoints compare."""
    return None if optimizer is None else f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"
