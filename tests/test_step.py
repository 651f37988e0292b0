"""The optimizer's side of a run: the gradients an accumulation window holds, per rank, across a restart."""

from __future__ import annotations

import torch
from torch import nn

from statetrainer.distributed import Ranks
from statetrainer.step import StepRunner


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
        assert torch.equal(model.weight.grad, torch.full((1, 2), 2.0)) and torch.equal(model.bias.grad, torch.full((1,), 2.0))
