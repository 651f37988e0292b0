"""SmoothedLoss and Accuracy against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import statetrainer as st
from statetrainer.callbacks import Accuracy, SmoothedLoss, running_metrics
from statetrainer.checkpoint import CheckpointError


class FixedOutputs(nn.Module):
    """A 'model' whose outputs are the inputs, so a test chooses every prediction."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, inputs):
        return inputs + 0 * self.unused


def run(batches, callbacks, device: torch.device, loss_fn=None, phases=("valid",), grad=False):
    model = FixedOutputs()
    loss_fn = loss_fn or (lambda output, target: output.float().mean())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1) if grad else None
    trainer = st.Trainer(model, optimizer, loss_fn, [st.Phase(name, batches, grad=grad) for name in phases],
                         callbacks=callbacks, device=device)  # fmt: skip
    return trainer.fit()


def test_smoothed_loss_is_the_bias_corrected_moving_average(device: torch.device):
    losses = [2.0, 1.0, 4.0, 3.0]
    batches = [(torch.tensor([loss]), torch.tensor([0])) for loss in losses]
    trainer = run(batches, [SmoothedLoss(beta=0.9)], device, phases=("train",), grad=True)
    average = 0.0
    for loss in losses:
        average = 0.9 * average + 0.1 * loss
    expected = average / (1 - 0.9 ** len(losses))
    assert trainer.metrics["train_loss"] == pytest.approx(expected, rel=1e-6)
    # by hand for the first two: (0.1*2) / 0.1 = 2, then (0.09*2 + 0.1*1) / 0.19
    trainer = run(batches[:2], [SmoothedLoss(beta=0.9)], device, phases=("train",), grad=True)
    assert trainer.metrics["train_loss"] == pytest.approx((0.18 + 0.1) / 0.19, rel=1e-6)


def test_an_evaluation_phases_loss_is_the_exact_sample_weighted_mean(device: torch.device):
    batches = [(torch.full((3,), 2.0), torch.zeros(3)), (torch.full((1,), 6.0), torch.zeros(1))]  # means 2 and 6
    trainer = run(batches, [SmoothedLoss(beta=0.9)], device)
    assert trainer.metrics["valid_loss"] == pytest.approx((3 * 2.0 + 1 * 6.0) / 4)  # 3.0: not (2 + 6) / 2


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
    run(batches, [metric], device, phases=("train",), grad=True)
    copy = SmoothedLoss(beta=0.5)
    copy.load_state_dict(metric.state_dict())
    assert copy.value() == metric.value() == pytest.approx((0.25 * 1 + 0.5 * 3) / 0.75)
    assert math.isnan(SmoothedLoss().value())


def test_a_metrics_own_state_fits_it_and_one_of_another_kind_is_refused_naming_the_key(device: torch.device):
    loss, accuracy = SmoothedLoss(), Accuracy()
    batches = [(torch.tensor([[0.2, 0.8], [0.9, 0.1]]), torch.tensor([1, 1]))]
    run(batches, [loss, accuracy], device)
    for metric in (loss, accuracy, SmoothedLoss(), Accuracy()):
        metric.check_fits(metric.state_dict())
        type(metric)().check_fits(metric.state_dict())  # what a fresh run of the same metric loads
    assert accuracy.state_dict()["total"] == 2
    for metric, key, value, message in (
        (loss, "average", torch.zeros(1, device=device), r"^average is a float32 tensor of shape \(1,\)"),
        (loss, "samples", -2, r"^samples is -2, not an integer >= 0$"),
        (accuracy, "correct", torch.tensor(3, device=device), r"^correct is 3, not a count from 0 to total=2$"),
        (accuracy, "active", "yes", r"^active is 'yes' \(a str\), not True or False$"),
    ):  # fmt: skip
        with pytest.raises(CheckpointError, match=message):
            metric.check_fits({**metric.state_dict(), key: value})


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
    losses = [{"active": True, "batches": 4, "average": torch.tensor(0.5), "exact": False, "samples": 0},
              {"active": True, "batches": 4, "average": torch.tensor(1.5), "exact": False, "samples": 0}]  # fmt: skip
    for world_size in (1, 3):
        regrouped = SmoothedLoss.regroup_states(losses, world_size)
        assert [float(state["average"]) for state in regrouped] == [1.0] * world_size  # the mean over the ranks
        assert all(state["batches"] == 4 for state in regrouped)
    sums = [{"active": True, "batches": 2, "average": torch.tensor(6.0), "exact": True, "samples": 3},
            {"active": True, "batches": 2, "average": torch.tensor(2.0), "exact": True, "samples": 5}]  # fmt: skip
    regrouped = SmoothedLoss.regroup_states(sums, 1)
    assert float(regrouped[0]["average"]) / regrouped[0]["samples"] == pytest.approx(8.0 / 8)


def sorted_validation_trainer(device: torch.device) -> st.Trainer:
    """A classifier whose validation set is stored sorted by class, in ragged batches."""
    generator = torch.Generator().manual_seed(0)
    inputs, labels = torch.randn(60, 4, generator=generator), torch.arange(60) % 3
    order = labels.argsort(stable=True)  # sorted by class: a moving average would weigh the last class most
    valid = [(inputs[order][start : start + 7], labels[order][start : start + 7]) for start in range(0, 60, 7)]
    train = [(inputs[start : start + 10], labels[start : start + 10]) for start in range(0, 60, 10)]
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    return st.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.5), nn.functional.cross_entropy,
                      [st.Phase("train", train), st.Phase("valid", valid, grad=False)],
                      callbacks=[SmoothedLoss(), Accuracy()], epochs=2, device=device)  # fmt: skip


def test_valid_loss_on_a_sorted_set_is_the_exact_mean_before_and_after_a_mid_phase_resume(device, tmp_path):
    whole = sorted_validation_trainer(device).fit()
    inputs = torch.cat([batch[0] for batch in whole.phases[1].loader]).to(device)
    labels = torch.cat([batch[1] for batch in whole.phases[1].loader]).to(device)
    with torch.no_grad():
        exact = float(nn.functional.cross_entropy(whole.model(inputs), labels))  # the mean over all 60 samples
    assert whole.metrics["valid_loss"] == pytest.approx(exact, rel=1e-5)
    stopped = sorted_validation_trainer(device)
    stopped.run_until("batch", epoch=1, phase="valid", batch=4)
    stopped.advance()  # to the end of the batch, where a run is saved
    path = stopped.save_checkpoint(tmp_path / "mid-valid.safetensors")
    resumed = sorted_validation_trainer(device)
    resumed.load_checkpoint(path)
    resumed.fit()
    assert resumed.metrics["valid_loss"] == whole.metrics["valid_loss"]
