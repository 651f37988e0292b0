"""The state registry: every part saves, checks and loads itself; a load is all or nothing."""

from __future__ import annotations

import typing
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import statetrainer as st
from statetrainer.callbacks import Callback, Checkpoint, SmoothedLoss, TrainerView
from statetrainer.checkpoint import CheckpointError
from statetrainer.stateful import Position, StateRegistry

from .conftest import regression_batches


class StepCounter:
    """A part a user (or the multi-GPU code) adds: it counts batches and keeps a tensor on the run's device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seen = torch.zeros((), dtype=torch.int64, device=device)

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen}

    def check_fits(self, state: dict[str, Any]) -> None:
        if state["seen"].dtype != torch.int64:
            raise CheckpointError(f"seen has dtype {state['seen'].dtype}, not torch.int64")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = state["seen"].to(self.device, copy=True)


class CountBatches(Callback):
    def __init__(self, counter: StepCounter) -> None:
        self.counter = counter

    def on_exit_batch(self, trainer: TrainerView) -> None:
        self.counter.seen += 1


def build(device: torch.device) -> tuple[st.Trainer, StepCounter]:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    counter = StepCounter(device)
    trainer = st.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.mse_loss,
                         [st.Phase("train", regression_batches(6))], callbacks=[CountBatches(counter), SmoothedLoss()],
                         epochs=2, device=device, seed=1)  # fmt: skip
    trainer.parts.register("counter", counter)  # the one place a new part is added
    return trainer, counter


def test_a_new_part_registered_in_one_place_round_trips_through_a_checkpoint(device: torch.device, tmp_path):
    trainer, counter = build(device)
    while not (trainer.state == "phase" and trainer.epoch == 1 and trainer.batch_index == 2):
        trainer.advance()
    path = trainer.save_checkpoint(tmp_path / "mid.safetensors")
    assert int(counter.seen) == 9

    resumed, resumed_counter = build(device)
    resumed.load_checkpoint(path)
    assert int(resumed_counter.seen) == 9 and resumed_counter.seen.device.type == device.type
    resumed.fit()
    trainer.fit()
    assert int(resumed_counter.seen) == int(counter.seen) == 12
    assert torch.equal(resumed.model.weight, trainer.model.weight)


def test_a_checkpoint_without_the_new_part_is_refused_and_loads_nothing(device: torch.device, tmp_path):
    plain, _ = build(device)
    plain.advance()
    state = plain.state_dict()
    del state["counter"]
    fresh, _ = build(device)
    before = fresh.model.weight.detach().clone()
    with torch.no_grad():
        state["step"]["model"]["weight"] = state["step"]["model"]["weight"] + 1  # would show if it were loaded
    with pytest.raises(CheckpointError, match="no state for part.*counter"):
        fresh.load_state_dict(state)
    assert torch.equal(fresh.model.weight, before) and fresh.state == "idle" and fresh.position == Position()


def test_a_part_that_does_not_fit_is_named_and_nothing_is_loaded(device: torch.device):
    trainer, _ = build(device)
    trainer.advance()
    state = trainer.state_dict()
    state["counter"]["seen"] = torch.zeros((), dtype=torch.float32)
    state["step"]["model"]["weight"] = state["step"]["model"]["weight"] + 1
    fresh, counter = build(device)
    before = fresh.model.weight.detach().clone()
    with pytest.raises(CheckpointError, match="counter: seen has dtype torch.float32"):
        fresh.load_state_dict(state)
    assert torch.equal(fresh.model.weight, before) and counter.seen.dtype == torch.int64


@pytest.mark.parametrize(("field", "value"), [("batch_index", -5), ("epoch", -1), ("global_step", 1.5),
                                              ("finished", 1), ("epochs_done", True)])  # fmt: skip
def test_an_impossible_position_is_refused(field: str, value: Any):
    saved = Position().state_dict()
    saved[field] = value
    with pytest.raises(CheckpointError, match=field):
        StateRegistry(position=Position()).load_state_dict({"position": saved})


def test_registering_refuses_non_parts_and_duplicate_names():
    registry = StateRegistry(position=Position())
    with pytest.raises(TypeError, match="has no state_dict"):
        registry.register("text", "not a part")
    with pytest.raises(ValueError, match="'position' is registered already"):
        registry.register("position", Position())


def test_the_trainer_state_is_the_registry_state(device: torch.device):
    trainer, _ = build(device)
    assert list(trainer.state_dict()) == list(trainer.parts) == [
        "run", "position", "machine", "data", "settings", "step", "metrics", "callbacks", "rng", "counter"]  # fmt: skip


def test_hooks_have_resolvable_type_hints_against_the_narrow_trainer_view():
    for cls in (Callback, Checkpoint, SmoothedLoss, CountBatches):
        for name in ("on_enter_batch", "on_exit_step", "on_exit_batch", "on_exception"):
            hints = typing.get_type_hints(getattr(cls, name))
            assert hints["trainer"] is TrainerView


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda state: state["machine"].update(state="batch"), "saved in state 'batch', inside a batch"),
        (lambda state: state["position"].update(phase_position=3), "phase index 3 is not one of this run's 1"),
        (lambda state: state["position"].update(batch_index=6), "batch index 6 is past the 6 batches"),
        (lambda state: state["position"].update(epoch=1), "epoch 1 and epochs done 0 disagree"),
    ],
    ids=["inside-a-batch", "phase-out-of-range", "batch-past-the-end", "epochs-disagree"],
)
def test_an_impossible_saved_position_is_refused_before_anything_loads(device: torch.device, edit, message):
    trainer, _ = build(device)
    while not (trainer.state == "phase" and trainer.batch_index == 2):
        trainer.advance()
    state = trainer.state_dict()
    edit(state)
    fresh, _ = build(device)
    before = fresh.model.weight.detach().clone()
    with pytest.raises(CheckpointError, match=message):
        fresh.load_state_dict(state)
    assert torch.equal(fresh.model.weight, before) and fresh.state == "idle" and fresh.position == Position()
