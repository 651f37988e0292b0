"""The optimizer's side of a run: the gradients an accumulation window holds, per rank, across a restart, and
the checks a saved optimizer, model, GradScaler and gradient state passes before any of it loads."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from statetrainer.checkpoint import CheckpointError, read_tree, write_tree
from statetrainer.distributed import Ranks
from statetrainer.optimizer_step import StepRunner, check_optimizer_state
from statetrainer.parts import StateRegistry


def runner_on(ranks: Ranks) -> tuple[nn.Linear, StepRunner]:
    model = nn.Linear(2, 1)
    return model, StepRunner(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.device("cpu"), 2, ranks=ranks)


def window_state(*scales: float) -> dict:
    """A saved state whose window gradients are all ``scale`` on each saved rank."""
    state = runner_on(Ranks())[1].state_dict()
    state["grads"] = [{"0": torch.full((1, 2), scale), "1": torch.full((1,), scale)} for scale in scales]
    return state


def test_one_process_saves_its_window_gradients_as_the_only_rank():
    model, runner = runner_on(Ranks())
    model(torch.ones(1, 2)).sum().backward()
    saved = runner.state_dict()["grads"]
    assert len(saved) == 1 and torch.equal(saved[0]["0"], model.weight.grad)


def test_each_rank_takes_back_its_own_window_gradients():
    model, runner = runner_on(Ranks(rank=1, world_size=2))
    state = window_state(1.0, 3.0)
    runner.check_fits(state)
    runner.load_state_dict(state)
    assert torch.equal(model.weight.grad, torch.full((1, 2), 3.0))


def test_window_gradients_of_another_number_of_ranks_become_their_mean_on_every_rank():
    """The window's all-reduce takes the mean over the ranks, so each new rank starting from it keeps the step."""
    for ranks in (Ranks(), Ranks(rank=2, world_size=3)):
        model, runner = runner_on(ranks)
        runner.load_state_dict(window_state(1.0, 3.0))
        assert torch.equal(model.weight.grad, torch.full((1, 2), 2.0)) and torch.equal(
            model.bias.grad, torch.full((1,), 2.0)
        )


# ---------------------------------------------------------------- a saved optimizer state checked against its parameters


def adam_runner() -> tuple[nn.Module, StepRunner]:
    """An Adam run one step in, its window gradients pending: every piece of the step state is filled."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    runner = StepRunner(model, torch.optim.Adam(model.parameters(), lr=0.01), torch.device("cpu"), accumulate=2)
    for _ in range(2):
        model(torch.ones(2, 3)).sum().backward()
    runner.step()
    model(torch.ones(2, 3)).sum().backward()
    return model, runner


def refused_and_unchanged(runner: StepRunner, model: nn.Module, state: dict, message: str) -> None:
    """Loading ``state`` through a registry raises ``CheckpointError`` matching ``message``; nothing changed."""
    before = copy.deepcopy((model.state_dict(), runner.optimizer.state_dict(), [p.grad for p in model.parameters()]))
    with pytest.raises(CheckpointError, match=message):
        StateRegistry(step=runner).load_state_dict({"step": state})
    after = (model.state_dict(), runner.optimizer.state_dict(), [p.grad for p in model.parameters()])
    assert repr(after) == repr(before)


def _edit(path: tuple, value: object) -> Callable[[dict], None]:
    def edit(state: dict) -> None:
        node = state
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return edit


OPTIMIZER, GROUP = ("optimizer",), ("optimizer", "param_groups", 0)


@pytest.mark.parametrize(("edit", "message"), [
    (_edit((*OPTIMIZER, "state", 0, "exp_avg"), torch.zeros(3, 4)),
     r"^step: optimizer: state\[0\]\['exp_avg'\] is a float32 tensor of shape \(3, 4\), not a float32 tensor of shape \(4, 3\)$"),
    (_edit((*OPTIMIZER, "state", 1, "exp_avg_sq"), torch.zeros(4, dtype=torch.float64)),
     r"^step: optimizer: state\[1\]\['exp_avg_sq'\] is a float64 tensor of shape \(4,\), not a float32 tensor"),
    (_edit((*OPTIMIZER, "state", 2, "exp_avg"), 0.5), r"^step: optimizer: state\[2\]\['exp_avg'\] is 0.5, not a float32"),
    (lambda state: state["optimizer"]["state"][3].pop("step"), r"^step: optimizer: state\[3\] has no step"),
    (_edit((*OPTIMIZER, "state", 0, "step"), torch.tensor(-1.0)), r"state\[0\]\['step'\] is a float32 tensor .*>= 0"),
    (_edit((*OPTIMIZER, "state", 0, "step"), float("nan")), r"state\[0\]\['step'\] is nan, not a finite number"),
    (_edit((*OPTIMIZER, "state", 9), {}), r"^step: optimizer: state holds an entry for 9, which is not the index"),
    (_edit((*GROUP, "lr"), -math.inf), r"^step: optimizer: param_groups\[0\]\['lr'\] is -inf, not a finite number$"),
    (_edit((*GROUP, "lr"), -1.0), r"param_groups\[0\]\['lr'\] is -1.0, not a finite number >= 0"),
    (_edit((*GROUP, "lr"), "0.1"), r"param_groups\[0\]\['lr'\] is '0.1' \(a str\), not a finite number"),
    (_edit((*GROUP, "lr"), True), r"param_groups\[0\]\['lr'\] is True, not a finite number"),
    (_edit((*GROUP, "betas"), (1.0, 0.999)), r"param_groups\[0\]\['betas'\] is 1.0, not a finite number in \[0, 1\)"),
    (_edit((*GROUP, "amsgrad"), 1), r"param_groups\[0\]\['amsgrad'\] is 1, not True or False"),
    (_edit((*GROUP, "params"), [0, 0, 2, 3]), r"param_groups\[0\]\['params'\] is \[0, 0, 2, 3\], not this optimizer's"),
    (_edit((*GROUP, "params"), [0, 1, 2]), r"param_groups\[0\]\['params'\] is \[0, 1, 2\], not this optimizer's"),
    (_edit((*GROUP, "params"), [0, 1, 2, 7]), r"param_groups\[0\]\['params'\] is \[0, 1, 2, 7\], not this optimizer's"),
    (_edit(("model", "0.weight"), torch.zeros(4, 3, dtype=torch.float64)), r"0.weight: dtype torch.float64 in the checkpoint"),
    (_edit(("model", "0.bias"), [0.0] * 4), r"0.bias: a list of 4 item\(s\) in the checkpoint, not a tensor"),
    (_edit(("grads", 0, "1"), torch.zeros(4, dtype=torch.float64)), r"grads\[0\]\['1'\] is a float64 tensor of shape \(4,\)"),
    (_edit(("grads", 0, "-1"), torch.zeros(1)), r"grads\[0\] holds a gradient for '-1' \(a str\), which is not the index"),
], ids=["exp_avg-shape", "exp_avg_sq-dtype", "exp_avg-number", "no-step", "negative-step", "nan-step", "foreign-param",
        "lr-inf", "lr-negative", "lr-text", "lr-bool", "betas-range", "amsgrad-int", "params-twice", "params-missing",
        "params-out-of-range", "model-dtype", "model-list", "grad-dtype", "grad-index"])  # fmt: skip
def test_a_forged_optimizer_model_or_gradient_state_is_refused_naming_the_key_and_nothing_loads(edit, message):
    model, runner = adam_runner()
    state = copy.deepcopy(runner.state_dict())
    edit(state)
    refused_and_unchanged(runner, model, state, message)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("scale", 0.0, r"^step: scaler\['scale'\] is 0.0, not a finite number > 0$"),
    ("scale", float("inf"), r"scaler\['scale'\] is inf"),
    ("growth_factor", 0.5, r"scaler\['growth_factor'\] is 0.5, not a finite number > 1"),
    ("backoff_factor", 1.0, r"scaler\['backoff_factor'\] is 1.0, not a finite number in \(0, 1\)"),
    ("growth_interval", 0, r"scaler\['growth_interval'\] is 0, not an integer >= 1"),
    ("_growth_tracker", 1.5, r"scaler\['_growth_tracker'\] is 1.5, not an integer >= 0"),
    ("scaling", 1.0, r"scaler has unexpected key\(s\) 'scaling'"),
], ids=["scale-zero", "scale-inf", "growth-below-one", "backoff-one", "interval-zero", "tracker-float", "extra-key"])  # fmt: skip
def test_a_forged_grad_scaler_state_is_refused_naming_the_key(key: str, value: object, message: str):
    model, runner = adam_runner()
    runner.scaler = torch.amp.GradScaler("cpu")  # fp16's scaler, as a CUDA run has one
    state = copy.deepcopy(runner.state_dict())
    state["scaler"][key] = value
    refused_and_unchanged(runner, model, state, message)


def test_a_grad_scaler_state_without_its_keys_is_refused():
    model, runner = adam_runner()
    runner.scaler = torch.amp.GradScaler("cpu")
    state = copy.deepcopy(runner.state_dict())
    state["scaler"] = {}  # what a disabled scaler saves: torch's load raises on it
    refused_and_unchanged(runner, model, state, r"scaler has no key 'scale'")


OPTIMIZERS = {
    "SGD": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True),
    "SGD without momentum": lambda params: torch.optim.SGD(params, lr=0.1),
    "Adam amsgrad": lambda params: torch.optim.Adam(params, amsgrad=True),
    "AdamW": torch.optim.AdamW, "Adamax": torch.optim.Adamax, "NAdam": torch.optim.NAdam, "RAdam": torch.optim.RAdam,
    "ASGD": torch.optim.ASGD, "Adadelta": torch.optim.Adadelta, "Adagrad": torch.optim.Adagrad,
    "RMSprop centred": lambda params: torch.optim.RMSprop(params, momentum=0.9, centered=True),
    "Rprop": torch.optim.Rprop, "Adafactor": torch.optim.Adafactor,
    "Adam with a tensor lr": lambda params: torch.optim.Adam(params, lr=torch.tensor(0.01)),
    "Adam, two groups": lambda params: torch.optim.Adam([{"params": params[:1], "lr": 0.1}, {"params": params[1:]}]),
    "SGD, named parameters": lambda params: torch.optim.SGD(list(zip("abc", params, strict=True)), lr=0.1, momentum=0.5),
}  # fmt: skip


@pytest.mark.parametrize("make", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_every_torch_optimizers_own_state_passes_the_checks_after_a_round_trip_through_a_file(make, tmp_path):
    """No false refusals: each of torch's optimizers, with 2-d, 1-d and 0-dim parameters and a scheduler's
    ``initial_lr``, saved through a checkpoint file, fits a fresh copy of itself."""

    def stepped() -> tuple[torch.optim.Optimizer, list[nn.Parameter]]:
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(2, 3)), nn.Parameter(torch.randn(3)), nn.Parameter(torch.tensor(1.0))]
        optimizer = make(params)
        torch.optim.lr_scheduler.StepLR(optimizer, 1)
        return optimizer, params

    optimizer, params = stepped()
    for _ in range(2):
        sum(param.sum() * (index + 1) for index, param in enumerate(params)).backward()
        optimizer.step()
        optimizer.zero_grad()
    path = write_tree(tmp_path / "optimizer.safetensors", {"optimizer": optimizer.state_dict()}, "test")
    saved = read_tree(path)["optimizer"]
    fresh, _ = stepped()
    check_optimizer_state(fresh, saved)
    fresh.load_state_dict(saved)
    assert repr(fresh.state_dict()) == repr(optimizer.state_dict())
