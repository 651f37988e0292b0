"""``trainer.travel_to(folder, step=s)``: back to any optimizer step of a run, as it was there, bit for bit."""

from __future__ import annotations

import pytest
import torch

from statetrainer.callbacks import Checkpoint, CSVLogger
from statetrainer.checkpoint import CheckpointError

from .checkpoint.test_trainer_checkpoints import build


def snapshot(trainer) -> dict:
    """What travel must reproduce: weights, the optimizer's state, the last batch's loss and output."""
    optimizer = trainer.optimizer.state_dict()["state"]
    return {"model": {key: value.clone() for key, value in trainer.model.state_dict().items()},
            "optimizer": {(index, key): value.clone() for index, state in optimizer.items()
                          for key, value in state.items()},
            "loss": trainer.loss.detach().clone(), "output": trainer.output.detach().clone(),
            "where": (trainer.state, trainer.epoch, trainer.phase.name, trainer.batch_index, trainer.global_step)}  # fmt: skip


def assert_same(first: dict, second: dict) -> None:
    assert first["where"] == second["where"]
    for part in ("model", "optimizer"):
        assert first[part].keys() == second[part].keys()
        for key, value in first[part].items():
            assert torch.equal(value, second[part][key]), (part, key)
    assert torch.equal(first["loss"], second["loss"]) and torch.equal(first["output"], second["output"])


STEPS = [1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 15, 16, 17, 19, 20, 21, 23, 24]  # 20 of the 3 epochs' 24 steps


def test_travel_to_twenty_steps_of_a_three_epoch_run_equals_the_run_there_bit_for_bit(tmp_path, device):
    """A 3-epoch run (dropout, Adam, shuffled data: 24 steps) saved every 5 steps; for 20 steps s, a new trainer
    travels to s (the newest checkpoint before s, then a replay) and equals the uninterrupted run at s: weights,
    Adam's state, the batch's loss and output, and where it stands."""
    folder = tmp_path / "checkpoints"
    build([Checkpoint(folder, every_steps=5, every_epochs=None, keep_last=None)], epochs=3, device=device).fit()
    reference = build(epochs=3, device=device)
    expected = {}
    for step in STEPS:
        reference.run_until(step=step)
        expected[step] = snapshot(reference)
    assert reference.global_step == 24
    started_from = {}
    for step in STEPS:
        traveller = build(epochs=3, device=device)
        started = traveller.travel_to(folder, step=step)
        started_from[step] = None if started is None else int(started.name.rsplit("step", 1)[1].split(".")[0])
        assert_same(snapshot(traveller), expected[step])
    # the newest checkpoint saved before each step: none before step 6, so steps 1-5 replay from the start
    assert started_from == {step: (step - 1) // 5 * 5 or None for step in STEPS}


def test_travel_refuses_a_trainer_that_would_write_into_the_runs_folders(tmp_path, device):
    folder = tmp_path / "checkpoints"
    build([Checkpoint(folder, every_steps=5, every_epochs=None)], epochs=1, device=device).fit()
    before = sorted(path.name for path in folder.iterdir())
    with pytest.raises(ValueError, match="Checkpoint.*CSVLogger|CSVLogger.*Checkpoint"):
        build([Checkpoint(folder), CSVLogger(tmp_path / "logs" / "log.csv")], epochs=1,
              device=device).travel_to(folder, step=3)  # fmt: skip
    with pytest.raises(ValueError, match="count from 1"):
        build(epochs=1, device=device).travel_to(folder, step=0)
    assert sorted(path.name for path in folder.iterdir()) == before


def test_a_checkpoint_file_saved_at_or_after_the_step_is_refused(tmp_path, device):
    trainer = build(epochs=1, device=device)
    trainer.run_until("phase", step=4)
    saved = trainer.save_checkpoint(tmp_path / "at-4.safetensors")
    with pytest.raises(CheckpointError, match="saved at or after step 4, not before it"):
        build(epochs=1, device=device).travel_to(saved, step=4)
    traveller = build(epochs=1, device=device)
    assert traveller.travel_to(saved, step=5) == saved and traveller.global_step == 5


@pytest.mark.parametrize("before_step", [0, True, "5", 2.0])
def test_before_step_that_is_not_a_step_is_refused(tmp_path, device, before_step):
    with pytest.raises(ValueError, match="count from 1"):
        build(epochs=1, device=device).load_checkpoint(tmp_path, before_step=before_step)


def test_a_step_past_the_runs_end_is_refused_before_anything_loads(tmp_path, device):
    folder = tmp_path / "checkpoints"
    build([Checkpoint(folder, every_steps=5, every_epochs=None)], epochs=1, device=device).fit()
    traveller = build(epochs=1, device=device)
    with pytest.raises(ValueError, match="the run takes 8 steps"):
        traveller.travel_to(folder, step=9)
    assert traveller.global_step == 0 and traveller.state == "idle"


BATCHES = [(0, "train", 0), (0, "train", 3), (0, "train", 7), (0, "valid", 0), (0, "valid", 2), (1, "train", 0),
           (1, "train", 1), (1, "train", 4), (1, "train", 5), (1, "train", 6), (1, "valid", 1), (2, "train", 0),
           (2, "train", 2), (2, "train", 3), (2, "train", 5), (2, "train", 7), (2, "valid", 0), (2, "valid", 1),
           (2, "valid", 2), (1, "valid", 2)]  # fmt: skip


def test_travel_to_twenty_batches_of_a_three_epoch_run_equals_the_run_there_bit_for_bit(tmp_path, device):
    """The same run, saved every 3 steps and at every epoch's end: for 20 batches (training and validation) a new
    trainer travels to that batch's forward, from the newest checkpoint saved before it, and equals the run there."""
    folder = tmp_path / "checkpoints"
    build([Checkpoint(folder, every_steps=3, keep_last=None)], epochs=3, device=device).fit()
    points = sorted(BATCHES, key=lambda point: (point[0], point[1] == "valid", point[2]))
    reference, expected = build(epochs=3, device=device), {}
    for epoch, phase, batch in points:
        reference.run_until("batch", epoch=epoch, phase=phase, batch=batch)
        expected[epoch, phase, batch] = snapshot(reference)
    started = set()
    for epoch, phase, batch in points:
        traveller = build(epochs=3, device=device)
        checkpoint = traveller.travel_to(folder, epoch=epoch, phase=phase, batch=batch)
        started.add(None if checkpoint is None else checkpoint.name)
        found = snapshot(traveller)
        assert found["where"] == ("batch", epoch, phase, batch, found["where"][4])
        assert_same(found, expected[epoch, phase, batch])
    assert len(started) >= 6  # from many checkpoints, and from the beginning


@pytest.mark.parametrize(
    ("point", "message"),
    [
        ({}, "name one point"),
        ({"step": 3, "epoch": 0, "phase": "train", "batch": 1}, "name one point"),
        ({"epoch": 0, "phase": "train"}, "needs epoch=, phase= and batch="),
        ({"epoch": 0, "phase": "test", "batch": 1}, "no phase 'test'"),
        ({"epoch": -1, "phase": "train", "batch": 1}, "whole numbers from 0"),
    ],
)
def test_a_point_that_is_not_one_is_refused_before_anything_loads(tmp_path, device, point, message):
    traveller = build(epochs=1, device=device)
    with pytest.raises(ValueError, match=message):
        traveller.travel_to(tmp_path, **point)
    assert traveller.global_step == 0 and traveller.state == "idle"
