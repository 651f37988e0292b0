"""Conditional stepping: ``run_until`` with conditions, ``advance(n)``, and conditions that can never hold."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import statetrainer as st

from .conftest import regression_batches
from .test_trainer import linear_trainer


def test_run_until_the_backward_of_a_given_batch_has_its_gradients(device: torch.device):
    trainer, _ = linear_trainer(device, train_batches=4, valid_batches=1, epochs=3)
    assert trainer.run_until("backward", epoch=1, phase="train", batch=2) == "backward"
    assert (trainer.epoch, trainer.phase.name, trainer.batch_index, trainer.global_step) == (1, "train", 2, 6)
    inputs, target = trainer.batch
    by_hand = copy.deepcopy(trainer.model)
    by_hand.zero_grad()
    F.mse_loss(by_hand(inputs), target).backward()  # the model has not stepped on this batch yet
    assert torch.equal(trainer.model.weight.grad, by_hand.weight.grad)
    assert torch.equal(trainer.model.bias.grad, by_hand.bias.grad)


@pytest.mark.parametrize(("state", "conditions", "expected"), [
    ("batch", {"batch": 1}, (0, "train", 1, 1)),  # the next time batch 1 starts, in any phase
    ("batch", {"phase": "valid"}, (0, "valid", 0, 4)),
    ("phase", {"epoch": 2}, (2, "train", -1, 8)),
    ("step", {"step": 5}, (1, "train", 0, 5)),  # the fifth step, just taken
    (None, {"epoch": 1}, (1, None, 1, 4)),  # as soon as epoch 1 begins (after the 2 valid batches)
    (None, {"step": 3}, (0, "train", 2, 3)),
], ids=["batch", "phase-name", "epoch", "step", "epoch-alone", "step-alone"])  # fmt: skip
def test_each_condition_stops_at_its_first_transition(device: torch.device, state, conditions, expected):
    trainer, _ = linear_trainer(device, train_batches=4, valid_batches=2, epochs=3)
    trainer.run_until(state, **conditions)
    phase = trainer.phase.name if trainer.phase is not None else None
    assert (trainer.epoch, phase, trainer.batch_index, trainer.global_step) == expected
    if state is not None:
        assert trainer.state == state


def test_run_until_a_predicate_stops_at_the_batch_whose_loss_is_not_finite(device: torch.device):
    batches = regression_batches(6)
    batches[3] = (batches[3][0].clone(), torch.full_like(batches[3][1], math.nan))
    model = nn.Linear(3, 1)
    trainer = st.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.mse_loss, [st.Phase("train", batches)],
                         device=device)  # fmt: skip
    trainer.run_until(when=lambda trainer: trainer.loss is not None and not torch.isfinite(trainer.loss))
    assert trainer.state == "batch" and trainer.batch_index == 3 and trainer.global_step == 3  # before its backward


def test_advance_n_makes_n_transitions_and_stops_at_the_end_of_the_run(device: torch.device):
    one_by_one, _ = linear_trainer(device, train_batches=3, epochs=2)
    for _ in range(7):
        one_by_one.advance()
    at_once, _ = linear_trainer(device, train_batches=3, epochs=2)
    assert at_once.advance(7) == one_by_one.state
    assert [str(move) for move in at_once.history] == [str(move) for move in one_by_one.history]
    assert at_once.advance(10**6) == "idle" and at_once.finished
    with pytest.raises(ValueError, match="advance: n must be"):
        one_by_one.advance(0)


def test_a_run_stopped_by_run_until_then_fitted_equals_an_uninterrupted_fit(device: torch.device):
    whole, whole_events = linear_trainer(device, train_batches=5, valid_batches=2, epochs=3, accumulate=2)
    whole.fit()
    stepped, stepped_events = linear_trainer(device, train_batches=5, valid_batches=2, epochs=3, accumulate=2)
    stepped.run_until("backward", epoch=1, batch=2)
    stepped.run_until(when=lambda trainer: trainer.global_step == 7)
    stepped.fit()
    assert stepped_events.hooks == whole_events.hooks
    for name, value in whole.model.state_dict().items():
        assert torch.equal(value, stepped.model.state_dict()[name]), name
    assert whole.global_step == stepped.global_step == 9


@pytest.mark.parametrize(("arguments", "error", "message"), [
    ({"state": "batch", "batch": 10**9}, ValueError, r"batch=1000000000 never comes.*'train' 4, 'valid' 2"),
    ({"state": "batch", "phase": "test"}, ValueError, r"no phase 'test'; its phases are 'train', 'valid'"),
    ({"state": "backward", "phase": "valid"}, ValueError, r"never enters 'backward': phase 'valid' has grad=False"),
    ({"state": "epoch", "epoch": 3}, ValueError, r"epoch=3 never comes: .* epochs 0 to 2"),
    ({"step": 13}, ValueError, r"step=13 never comes: 0 optimizer steps are done, and the run takes 12 in all"),
    ({"state": "batch", "batch": -1}, ValueError, r"batch=-1 never comes"),
    ({}, ValueError, r"needs a state to stop at, or a condition"),
    ({"when": "loss > 1"}, TypeError, r"when must be a predicate"),
    ({"state": "step", "step": 2.5}, TypeError, r"step must be an integer"),
], ids=["batch-too-big", "no-such-phase", "eval-backward", "epoch-too-big", "step-too-big", "negative-batch",
        "nothing", "when-not-callable", "step-not-int"])  # fmt: skip
def test_a_condition_that_can_never_hold_is_refused_before_the_run(device: torch.device, arguments, error, message):
    trainer, recorder = linear_trainer(device, train_batches=4, valid_batches=2, epochs=3)
    with pytest.raises(error, match=message):
        trainer.run_until(**arguments)
    assert trainer.state == "idle" and not recorder.hooks  # nothing ran


def test_a_step_already_passed_is_refused_and_a_run_that_ends_first_says_what_it_waited_for(device: torch.device):
    trainer, _ = linear_trainer(device, train_batches=4, valid_batches=1, epochs=2)
    trainer.run_until("step", step=3)
    with pytest.raises(ValueError, match="step=2 never comes: 3 optimizer steps are done"):
        trainer.run_until("step", step=2)
    with pytest.raises(RuntimeError, match=r"finished before entering 'batch' \(epoch=0, phase='train', batch=1\)"):
        trainer.run_until("batch", epoch=0, phase="train", batch=1)  # passed already, which is not checked ahead
    assert trainer.finished


def test_a_batch_past_a_phases_limit_is_refused_before_anything_runs(device):
    model = torch.nn.Linear(3, 1)
    trainer = st.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.functional.mse_loss,
                         [st.Phase("train", regression_batches(8), limit=3)], epochs=2, device=device)  # fmt: skip
    with pytest.raises(ValueError, match="batch=5 never comes.*'train' 3"):
        trainer.run_until("batch", batch=5)
    assert trainer.state == "idle" and trainer.global_step == 0
    with pytest.raises(ValueError, match="step=7 never comes.*takes 6 in all"):
        trainer.run_until(step=7)
    assert trainer.run_until("batch", batch=2, epoch=1) == "batch" and trainer.global_step == 5  # its step is next
