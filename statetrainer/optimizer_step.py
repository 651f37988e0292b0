"""The optimizer's side of a batch: backward, the accumulation window, clipping, mixed precision, the step."""

from __future__ import annotations

import math
import reprlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map_only

from .distributed import Ranks, all_gather, fully_sharded, gathered_states
from .errors import CheckpointError
from .precision import make_autocast, make_grad_scaler
from .saved_state import (
    check_integer,
    check_keys,
    check_like,
    check_model_state,
    check_real,
    check_tensor,
    describe,
    is_real,
    tensors_to,
    unwrap_model,
)
from .validation import in_interval, interval_words

__all__ = ["StepRunner", "check_optimizer_state", "check_scaler_state", "optimizer_class_name"]


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
            holds every rank's. A model sharded with ``fully_shard`` reduces
            them in every batch instead: its window's gradients are one sharded
            state, as its parameters are.
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
        self.sharded = fully_sharded(model)

    def zero_grad(self) -> None:
        assert self.optimizer is not None  # only a phase with gradients, which has an optimizer, zeroes them
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
            torch._foreach_mul_(gradients, self.accumulate / batches)  # pyright: ignore[reportPrivateImportUsage]  # not re-exported by torch's stubs

    def step(self) -> None:
        """Clip, step (through the GradScaler under fp16) and zero the gradients."""
        optimizer, scaler = self.optimizer, self.scaler
        assert optimizer is not None  # a step runs in a phase with gradients, which has an optimizer
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
        """Raise ``CheckpointError`` naming the key unless every piece of ``state`` loads: the model's tensors,
        the optimizer's settings and per-parameter state (see ``check_optimizer_state``), the GradScaler's, and
        each rank's window gradients (the shape and dtype of their parameters). Nothing is changed."""
        check_keys("the step state", state, ("model", "optimizer", "optimizer_class", "grads", "scaler"))
        check_model_state(unwrap_model(self.model).state_dict(), state["model"])
        if (state["optimizer"] is None) != (self.optimizer is None):
            raise CheckpointError("the checkpoint and this trainer disagree on having an optimizer")
        saved_class = state["optimizer_class"]
        if saved_class != optimizer_class_name(self.optimizer):
            shown = saved_class if isinstance(saved_class, str) and saved_class.isprintable() else describe(saved_class)
            raise CheckpointError(f"the checkpoint's optimizer is {shown}, this trainer's "
                                  f"{optimizer_class_name(self.optimizer)}")  # fmt: skip
        if (state["scaler"] is None) != (self.scaler is None):
            raise CheckpointError("the checkpoint and this trainer disagree on having a GradScaler (fp16 on CUDA): "
                                  "resume with the precision and device the run was saved with")  # fmt: skip
        if self.optimizer is not None:
            check_optimizer_state(self.optimizer, state["optimizer"])
        if self.scaler is not None:
            check_scaler_state(self.scaler, state["scaler"])
        self._check_gradients(state["grads"])

    def _check_gradients(self, saved: Any) -> None:
        """Each saved rank's window gradients: by parameter index, each of its parameter's shape and dtype."""
        if not isinstance(saved, list) or not saved or (self.sharded and len(saved) != 1):
            raise CheckpointError(f"grads is {describe(saved)}, not a list with one entry per rank (one, sharded, for "
                                  "a model sharded with fully_shard)")  # fmt: skip
        count = len(self.parameters)
        for rank, rank_grads in enumerate(saved):
            if not isinstance(rank_grads, dict):
                raise CheckpointError(f"grads[{rank}] is {describe(rank_grads)}, not a dict of parameter indices")
            for index, grad in rank_grads.items():
                if not (isinstance(index, str) and index.isdecimal() and str(int(index)) == index
                        and int(index) < count):  # fmt: skip
                    raise CheckpointError(f"grads[{rank}] holds a gradient for {describe(index)}, which is not the "
                                          f"index of one of the optimizer's {count} parameter(s)")  # fmt: skip
                parameter = self.parameters[int(index)]
                check_tensor(f"grads[{rank}][{index!r}]", grad, parameter.shape, parameter.dtype)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unwrap_model(self.model).load_state_dict(state["model"])
        if self.optimizer is not None and self.sharded:  # its DTensors were read into new memory; its steps are not
            self.optimizer.load_state_dict(tree_map_only(torch.Tensor, _copied_unless_sharded, state["optimizer"]))
        elif self.optimizer is not None:  # kept by the optimizer: copies, not views of the checkpoint file
            self.optimizer.load_state_dict(tensors_to(state["optimizer"], torch.device("cpu")))
        for index, grad in self._own_gradients(state["grads"]).items():
            parameter = self.parameters[int(index)]
            parameter.grad = grad.to(parameter.device, parameter.dtype, copy=True)
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])

    def _gradients_of_every_rank(self) -> list[dict[str, torch.Tensor]]:
        """Each rank's gradients so far, by parameter index (empty between windows)."""
        own = {str(index): p.grad for index, p in enumerate(self.parameters) if p.grad is not None}
        if not self.ranks.distributed or self.sharded:  # sharded: the reduced gradients, each rank holding its shards
            return [own]
        has_grad = torch.tensor([p.grad is not None for p in self.parameters], dtype=torch.uint8)
        anywhere = torch.stack(all_gather(has_grad, self.ranks, self.device)).amax(0).tolist()
        indices = [index for index, present in enumerate(anywhere) if present]
        local = [self._grad_or_zeros(index) for index in indices]
        return [{str(index): grad for index, grad in zip(indices, grads, strict=True)}
                for grads in gathered_states(local, self.ranks, self.device)]  # fmt: skip

    def _grad_or_zeros(self, index: int) -> torch.Tensor:
        parameter = self.parameters[index]
        return parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)

    def _own_gradients(self, saved: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """This rank's saved gradients; from another number of ranks, their mean, which the window's
        all-reduce (a mean over the ranks) would have made of them. Sharded: the gradients, each rank's part."""
        if self.sharded:
            return saved[0]
        if len(saved) == self.ranks.world_size:
            return saved[self.ranks.rank]
        indices = sorted({index for rank_grads in saved for index in rank_grads}, key=int)
        zero = torch.zeros(())  # sum's start (its 0, as a tensor)
        return {index: sum((rank_grads[index].float() for rank_grads in saved if index in rank_grads), zero) / len(saved)
                for index in indices}  # fmt: skip


def _copied_unless_sharded(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if type(tensor).__name__ == "DTensor" else tensor.to("cpu", copy=True)


def optimizer_class_name(optimizer: torch.optim.Optimizer | None) -> str | None:
    """The optimizer's class, as ``module.QualName`` (None for no optimizer): what checkpoints compare."""
    return None if optimizer is None else f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"


# The per-parameter state of torch's own optimizers (the keys a stepped parameter holds, given its group and the
# parameter): loading drops none of them, and ``__setstate__`` reads ``step`` as it loads.
_ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")


def _adam_state(group: dict[str, Any], parameter: torch.Tensor) -> tuple[str, ...]:
    return _ADAM_STATE + (("max_exp_avg_sq",) if group.get("amsgrad") else ())


_TORCH_OPTIMIZER_STATE: dict[str, Callable[[dict[str, Any], torch.Tensor], tuple[str, ...]]] = {
    "Adam": _adam_state,
    "AdamW": _adam_state,
    "Adamax": lambda group, _: ("step", "exp_avg", "exp_inf"),
    "NAdam": lambda group, _: ("step", "mu_product", "exp_avg", "exp_avg_sq"),
    "RAdam": lambda group, _: _ADAM_STATE,
    "SparseAdam": lambda group, _: _ADAM_STATE,
    "ASGD": lambda group, _: ("step", "eta", "mu", "ax"),
    "Adadelta": lambda group, _: ("step", "square_avg", "acc_delta"),
    "Adagrad": lambda group, _: ("step", "sum"),
    "RMSprop": lambda group, _: ("step", "square_avg") + (("momentum_buffer",) if group.get("momentum") else ())
    + (("grad_avg",) if group.get("centered") else ()),
    "Rprop": lambda group, _: ("step", "prev", "step_size"),
    "SGD": lambda group, _: ("momentum_buffer",),
    "Muon": lambda group, _: ("momentum_buffer",),
    "Adafactor": lambda group, parameter: ("step", "row_var", "col_var") if parameter.dim() >= 2
    else ("step", "variance"),
}  # fmt: skip
# Per-parameter tensors of a parameter's shape and dtype, by their names in torch.optim: checked for any optimizer
_PARAMETER_SHAPED = frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"})
# ... and for torch's own, also these (other optimizers may use the names otherwise)
_TORCH_PARAMETER_SHAPED = _PARAMETER_SHAPED | {"sum", "square_avg", "grad_avg", "acc_delta", "prev", "step_size",
                                               "ax", "exp_inf", "variance"}  # fmt: skip
_SCALARS = frozenset({"step", "eta", "mu", "mu_product"})  # 0-dim tensors or numbers; ``step`` counts, from 0
_NON_NEGATIVE_SETTINGS = frozenset({"lr", "initial_lr", "weight_decay", "eps", "momentum", "dampening"})


def _torch_optimizer_state(optimizer: torch.optim.Optimizer) -> Callable[[dict[str, Any], torch.Tensor],
                                                                         tuple[str, ...]] | None:  # fmt: skip
    """The per-parameter keys of ``optimizer``'s class when it is one of torch's own (not a subclass); else None."""
    name = type(optimizer).__name__
    return _TORCH_OPTIMIZER_STATE.get(name) if getattr(torch.optim, name, None) is type(optimizer) else None


def check_optimizer_state(optimizer: torch.optim.Optimizer, saved: Any) -> None:
    """Raise ``CheckpointError`` naming the key unless ``optimizer.load_state_dict(saved)`` loads a state that
    steps as the saved run did; nothing is changed.

    ``Optimizer.load_state_dict`` checks little: it casts floating tensors to
    their parameter's dtype, keeps state of the wrong shape (the run fails at
    its next step) or for parameters it does not have, takes any settings, and
    fails half-way through ``__setstate__`` on a state without ``step``. So:

    - ``param_groups``: as many as the optimizer's, each with its keys, and
      ``params`` numbering the parameters as ``state_dict()`` does; each setting
      of the kind the optimizer's own has (``check_like``: finite where it is);
      ``lr``, ``weight_decay``, ``eps``, ``momentum``, ``dampening`` and every
      ``*_lr`` at least 0, ``betas`` in [0, 1).
    - ``state``: per-parameter states only for the parameters' indices, with
      string keys; ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` and
      ``momentum_buffer`` tensors of their parameter's shape and dtype (for
      torch's own optimizers, every state tensor that is not a 0-dim scalar, and
      every key the optimizer keeps); ``step``, ``eta``, ``mu``, ``mu_product``
      finite numbers or 0-dim tensors, ``step`` at least 0; other numbers
      finite; no strings.
    """
    ours = optimizer.state_dict()
    check_keys("optimizer", saved, ours)
    groups, our_groups = saved["param_groups"], ours["param_groups"]
    if not isinstance(groups, list) or len(groups) != len(our_groups):
        raise CheckpointError(f"optimizer: param_groups is {describe(groups)}, not a list of this optimizer's "
                              f"{len(our_groups)} param group(s)")  # fmt: skip
    owners: dict[int, tuple[dict[str, Any], torch.Tensor]] = {}  # parameter index -> its saved group, parameter
    for number, (group, our_group, live_group) in enumerate(
        zip(groups, our_groups, optimizer.param_groups, strict=True)
    ):
        where = f"optimizer: param_groups[{number}]"
        check_keys(where, group, our_group)
        params = group["params"]
        if not isinstance(params, list) or any(type(index) is not int for index in params) \
                or params != our_group["params"]:  # fmt: skip
            raise CheckpointError(f"{where}['params'] is {reprlib.repr(params)}, not this optimizer's parameter "
                                  f"indices {reprlib.repr(our_group['params'])}")  # fmt: skip
        for key in our_group:
            if key != "params":
                _check_setting(f"{where}[{key!r}]", key, group[key], our_group[key])
        owners.update(
            (index, (group, parameter)) for index, parameter in zip(params, live_group["params"], strict=True)
        )
    states = saved["state"]
    if not isinstance(states, dict):
        raise CheckpointError(f"optimizer: state is {describe(states)}, not a dict of parameter indices")
    torch_state = _torch_optimizer_state(optimizer)
    for index, state in states.items():
        if type(index) is not int or index not in owners:
            raise CheckpointError(f"optimizer: state holds an entry for {describe(index)}, which is not the index "
                                  f"of one of the optimizer's {len(owners)} parameter(s)")  # fmt: skip
        group, parameter = owners[index]
        required = torch_state(group, parameter) if torch_state is not None and state else ()
        _check_parameter_state(f"optimizer: state[{index}]", state, parameter, required, torch_state is not None)


def _check_setting(name: str, key: str, saved: Any, current: Any) -> None:
    """One param-group setting: the kind of the optimizer's own value, finite where that is, in its range."""
    check_like(name, saved, current)
    non_negative = key in _NON_NEGATIVE_SETTINGS or key.endswith("_lr")
    if key != "betas" and not non_negative:
        return
    high = 1 if key == "betas" else math.inf
    for number in tree_leaves(saved, is_leaf=lambda node: node is None):
        if isinstance(number, torch.Tensor):
            if not all(in_interval(value, 0, high, high_open=key == "betas") for value in number.flatten().tolist()):
                raise CheckpointError(f"{name} holds values out of{interval_words(0, high, high_open=key == 'betas')}")
        elif is_real(number):
            check_real(name, number, 0, high, high_open=key == "betas")


def _check_parameter_state(name: str, state: Any, parameter: torch.Tensor, required: tuple[str, ...],
                           torch_conventions: bool) -> None:  # fmt: skip
    """One parameter's optimizer state (see ``check_optimizer_state``)."""
    if not isinstance(state, dict) or not all(isinstance(key, str) for key in state):
        raise CheckpointError(f"{name} is {describe(state)}, not a dict of names to tensors and numbers")
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(f"{name} has no {', '.join(missing)}, which this optimizer keeps for every "
                              "parameter it has stepped")  # fmt: skip
    shaped = _TORCH_PARAMETER_SHAPED if torch_conventions else _PARAMETER_SHAPED
    for key, value in state.items():
        where = f"{name}[{key!r}]"
        if key in _SCALARS:
            check_real(where, value, 0 if key == "step" else -math.inf, tensor=True)
            if isinstance(value, torch.Tensor) and not value.is_floating_point() and key != "step":
                raise CheckpointError(f"{where} is {describe(value)}, not a floating-point scalar")
        elif key in shaped:
            if not (key == "momentum_buffer" and value is None):  # SGD keeps None until its first momentum step
                check_tensor(where, value, parameter.shape, parameter.dtype)
        elif torch_conventions and key in ("row_var", "col_var") and parameter.dim() >= 2:  # Adafactor's factors
            shape = (*parameter.shape[:-1], 1) if key == "row_var" else (*parameter.shape[:-2], 1, parameter.shape[-1])
            check_tensor(where, value, shape, parameter.dtype)
        elif torch_conventions and isinstance(value, torch.Tensor) and value.dim():
            check_tensor(where, value, parameter.shape, parameter.dtype)
        else:
            for leaf in tree_leaves(value, is_leaf=lambda node: node is None):
                if isinstance(leaf, str) or not (leaf is None or isinstance(leaf, (bool, torch.Tensor))
                                                 or is_real(leaf) and math.isfinite(leaf)):  # fmt: skip
                    raise CheckpointError(f"{where} holds {describe(leaf)}, not tensors, finite numbers and flags")


def check_scaler_state(scaler: torch.amp.GradScaler, saved: Any) -> None:
    """Raise ``CheckpointError`` naming the key unless ``scaler.load_state_dict(saved)`` loads a usable scale:
    the keys of torch's GradScaler, ``scale`` > 0, ``growth_factor`` > 1, ``backoff_factor`` in (0, 1), all
    finite, ``growth_interval`` >= 1 and ``_growth_tracker`` >= 0 integers."""
    check_keys("scaler", saved, scaler.state_dict())
    if not saved:  # a disabled scaler's state
        return
    check_real("scaler['scale']", saved["scale"], 0, low_open=True)
    check_real("scaler['growth_factor']", saved["growth_factor"], 1, low_open=True)
    check_real("scaler['backoff_factor']", saved["backoff_factor"], 0, 1, low_open=True, high_open=True)
    check_integer("scaler['growth_interval']", saved["growth_interval"], minimum=1)
    check_integer("scaler['_growth_tracker']", saved["_growth_tracker"])
