"""SmoothedLoss and Accuracy against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import statetrainer as st
from statetrainer.callbacks import Accuracy, SmoothedLoss, running_metrics


class FixedOutputs(nn.Module):
    """A 'model' whose outputs are the inputs, so a test chooses every prediction."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, inputs):
        return inputs + 0 * self.unused


def run(batches, callbacks, device: torch.device, loss_fn=None, phases=("valid",)):
    model = FixedOutputs()
    loss_fn = loss_fn or (lambda output, target: output.float().mean())
    trainer = st.Trainer(model, None, loss_fn, [st.Phase(name, batches, grad=False) for name in phases],
                         callbacks=callbacks, device=device)  # fmt: skip
    return trainer.fit()


def test_smoothed_loss_is_the_bias_corrected_moving_average(device: torch.device):
    losses = [2.0, 1.0, 4.0, 3.0]
    batches = [(torch.tensor([loss]), torch.tensor([0])) for loss in losses]
    trainer = run(batches, [SmoothedLoss(beta=0.9)], device)
    average = 0.0
    for loss in losses:
        average = 0.9 * average + 0.1 * loss
    expected = average / (1 - 0.9 ** len(losses))
    assert trainer.metrics["valid_loss"] == pytest.approx(expected, rel=1e-6)
    # by hand for the first two: (0.1*2) / 0.1 = 2, then (0.09*2 + 0.1*1) / 0.19
    trainer = run(batches[:2], [SmoothedLoss(beta=0.9)], device)
    assert trainer.metrics["valid_loss"] == pytest.approx((0.18 + 0.1) / 0.19, rel=1e-6)


def test_smoothed_loss_resets_every_phase(device: torch.device):
    batches = [(torch.tensor([5.0]), torch.tensor([0]))]
    trainer = run(batches, [SmoothedLoss()], device, phases=("first", "second"))
    assert trainer.metrics == {"first_loss": pytest.approx(5.0), "second_loss": pytest.approx(5.0)}


def test_accuracy_is_the_exact_sample_mean_over_ragged_batches(device: torch.device):
    scores = torch.eye(3)
    batches = [  # 3 of 3 right, then 1 of 1 wrong: batch means average to 0.5, the sample mean is 0.75
        (scores, torch.tensor([0, 1, 2])),
        (scores[:1], torch.tensor([2])),
    ]
    trainer = run(batches, [Accuracy()], device)
    assert trainer.metrics["valid_accuracy"] == 0.75


def test_top_k_accuracy(device: torch.device):
    scores = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])
    targets = torch.tensor([1, 0, 2])  # second-best, worst, worst
    trainer = run([(scores, targets)], [Accuracy(), Accuracy(top_k=2, name="top2")], device)
    assert trainer.metrics == {"valid_accuracy": 0.0, "valid_top2_accuracy": pytest.approx(1 / 3)}


def test_metrics_can_be_limited_to_phases_and_read_while_running(device: torch.device):
    seen = []

    class Peek(st.Callback):
        def on_exit_batch(self, trainer):
            seen.append(running_metrics(trainer))

    batches = [(torch.eye(2), torch.tensor([0, 0]))]
    trainer = run(batches, [Accuracy(phases=["second"]), Peek()], device, phases=("first", "second"))
    assert trainer.metrics == {"second_accuracy": 0.5}
    assert seen == [{}, {"second_accuracy": 0.5}]


def test_metrics_round_trip_their_state(device: torch.device):
    metric = SmoothedLoss(beta=0.5)
    batches = [(torch.tensor([1.0]), torch.tensor([0])), (torch.tensor([3.0]), torch.tensor([0]))]
    run(batches, [metric], device)
    copy = SmoothedLoss(beta=0.5)
    copy.load_state_dict(metric.state_dict())
    assert copy.value() == metric.value() == pytest.approx((0.25 * 1 + 0.5 * 3) / 0.75)
    assert math.isnan(SmoothedLoss().value())


def test_bad_metric_arguments():
    with pytest.raises(ValueError, match="beta"):
        SmoothedLoss(beta=1.0)
    with pytest.raises(ValueError, match="top_k"):
        Accuracy(top_k=0)


def test_metric_states_saved_on_some_ranks_regroup_onto_others_keeping_the_phase_value():
    """A run saved mid-phase on 2 ranks and resumed on 1 or 3 goes on with the same global value."""
    accuracies = [{"active": True, "batches": 2, "correct": torch.tensor(3), "total": 8},
                  {"active": True, "batches": 2, "correct": torch.tensor(5), "total": 7}]  # fmt: skip
    for world_size in (1, 3):
        regrouped = Accuracy.regroup_states(accuracies, world_size)
        assert len(regrouped) == world_size
        assert sum(int(state["correct"]) for state in regrouped) == 8 and sum(s["total"] for s in regrouped) == 15
    losses = [{"active": True, "batches": 4, "average": torch.tensor(0.5)},
              {"active": True, "batches": 4, "average": torch.tensor(1.5)}]  # fmt: skip
    for world_size in (1, 3):
        regrouped = SmoothedLoss.regroup_states(losses, world_size)
        assert [float(state["average"]) for state in regrouped] == [1.0] * world_size  # the mean over the ranks
        assert all(state["batches"] == 4 for state in regrouped)
