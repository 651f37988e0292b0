"""TensorBoardLogger: scalars per step and per epoch, read back with TensorBoard's own reader, across a resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import statetrainer as st
from statetrainer.callbacks import Checkpoint, SmoothedLoss, TensorBoardLogger, TensorBoardTracker, TrackerLogger
from statetrainer.checkpoint import CheckpointError

from ..conftest import regression_batches

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def build(folder: Path, device: torch.device, logger: st.Callback | None = None, every_steps: int = 3,
          every_epochs: int | None = 1, epochs: int = 3) -> st.Trainer:  # fmt: skip
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    phases = [st.Phase("train", regression_batches(5)), st.Phase("valid", regression_batches(2, seed=1), grad=False)]
    callbacks = [
        SmoothedLoss(),
        logger or TensorBoardLogger(folder / "tb", every_steps=2),
        Checkpoint(folder / "ckpt", every_steps=every_steps, every_epochs=every_epochs),
    ]
    return st.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.05), F.mse_loss, phases, callbacks=callbacks,
                      epochs=epochs, device=device)  # fmt: skip


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every tag's (step, value) points, as TensorBoard shows them (purges applied)."""
    reader = event_accumulator.EventAccumulator(str(log_dir), size_guidance={event_accumulator.SCALARS: 0})
    reader.Reload()
    return {tag: [(event.step, event.value) for event in reader.Scalars(tag)] for tag in reader.Tags()["scalars"]}


def test_steps_and_epochs_are_written_for_tensorboard(tmp_path, device):
    build(tmp_path, device).fit()
    points = scalars(tmp_path / "tb")
    assert [step for step, _ in points["step/lr"]] == [2, 4, 6, 8, 10, 12, 14]
    assert [step for step, _ in points["step/train_loss"]] == [2, 4, 6, 8, 10, 12, 14]
    assert [step for step, _ in points["epoch/valid_loss"]] == [5, 10, 15]
    assert points["step/lr"][0][1] == pytest.approx(0.05)


@pytest.mark.parametrize("stop_after_step", [7, 10, 13])
def test_a_killed_and_resumed_run_leaves_one_point_per_step_and_none_missing(tmp_path, device, stop_after_step):
    whole = tmp_path / "whole"
    build(whole, device).fit()
    expected = scalars(whole / "tb")
    run = tmp_path / "run"
    killed = build(run, device)
    killed.run_until("step", step=stop_after_step)
    killed.advance(8)  # on past the newest checkpoint (every 3 steps), writing points a resume must drop
    killed.callbacks[1].tracker.flush()  # they reach the file, then the process dies
    resumed = build(run, device)
    assert resumed.load_checkpoint(run / "ckpt") is not None
    resumed.fit()
    assert scalars(run / "tb") == expected  # the same points: no step twice, no step missing, same values


def test_the_tracker_alone_claims_its_folder_so_a_folder_of_other_events_is_refused(tmp_path, device):
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "tb")) as older:  # events another program left there
        older.add_scalar("epoch/valid_loss", 100.0, 1)
    before = {path.name: path.read_bytes() for path in (tmp_path / "tb").iterdir()}
    with pytest.raises(CheckpointError, match="but no run.json naming the run they belong to"):
        build(tmp_path, device, TrackerLogger(TensorBoardTracker(tmp_path / "tb"), every_steps=2)).fit()
    after = {path.name: path.read_bytes() for path in (tmp_path / "tb").iterdir() if path.name != ".statetrainer.lock"}
    assert after == before  # the lock aside: nothing written, nothing purged


def test_a_run_started_again_before_its_first_checkpoint_shows_the_new_processs_points(tmp_path, device):
    """Killed in step 3, before any checkpoint, having logged step 2; started again (the same run, no checkpoint to
    load) with another learning rate: every point is the new process's, each step once."""
    run = tmp_path / "run"
    killed = build(run, device)
    killed.run_until("step", step=3)
    killed.callbacks[1].tracker.flush()
    again = build(run, device)
    assert again.load_checkpoint(run / "ckpt") is None and again.run_id == killed.run_id
    again.optimizer.param_groups[0]["lr"] = 0.01
    again.fit()
    points = scalars(run / "tb")
    assert points["step/lr"] == [(step, pytest.approx(0.01)) for step in range(2, 15, 2)]
    assert [step for step, _ in points["epoch/valid_loss"]] == [5, 10, 15]


def test_two_kills_resumed_from_a_checkpoint_taken_before_its_steps_epoch_points_leave_them_once(tmp_path, device):
    """A checkpoint every 10 steps (4 epochs of 5), saved before epoch 2's points are logged at the same step 10.
    Killed at step 17 (epoch 3's points logged), resumed from 10 and killed at 12 (its purge from 11 on written),
    resumed from 10 again: epoch 2's point at 10 is the first process's, once, and no point is missing."""

    def run_in(folder: Path) -> st.Trainer:
        return build(folder, device, every_steps=10, every_epochs=None, epochs=4)

    run_in(tmp_path / "whole").fit()
    run = tmp_path / "run"
    for stop in (17, 12):
        killed = run_in(run)
        if stop == 12:
            assert killed.load_checkpoint(run / "ckpt") is not None and killed.global_step == 10
        killed.run_until("step", step=stop)
        killed.callbacks[1].tracker.flush()
    resumed = run_in(run)
    resumed.load_checkpoint(run / "ckpt")
    assert resumed.global_step == 10
    resumed.fit()
    assert scalars(run / "tb") == scalars(tmp_path / "whole" / "tb")


def test_a_resume_that_is_not_bit_for_bit_shows_its_own_points_after_the_checkpoint(tmp_path, device):
    """Killed at step 15 (checkpoint at 12), resumed with another learning rate: the points after step 12 are the
    resumed run's (the killed one's are purged), those up to 12 the killed run's, each step once."""
    build(tmp_path / "whole", device).fit()
    run = tmp_path / "run"
    killed = build(run, device)
    killed.run_until("step", step=15)
    killed.callbacks[1].tracker.flush()
    resumed = build(run, device)
    resumed.load_checkpoint(run / "ckpt")
    assert resumed.global_step == 12
    resumed.optimizer.param_groups[0]["lr"] = 0.01
    resumed.fit()
    points, whole = scalars(run / "tb"), scalars(tmp_path / "whole" / "tb")
    assert [step for step, _ in points["step/lr"]] == [step for step, _ in whole["step/lr"]] == [2, 4, 6, 8, 10, 12, 14]
    assert points["step/lr"] == [(step, pytest.approx(0.05 if step <= 12 else 0.01)) for step in range(2, 15, 2)]
    assert points["epoch/valid_loss"][:2] == whole["epoch/valid_loss"][:2]
    assert points["epoch/valid_loss"][2][0] == 15 and points["epoch/valid_loss"][2] != whole["epoch/valid_loss"][2]


def test_files_of_the_older_logger_with_its_checkpoint_resume_as_it_did(tmp_path, device):
    """Before the logger named its files for the run, a checkpoint held the newest step and its points, and the
    files had no run id: such a run resumes with its files taken as its own, cut at the checkpoint."""
    from statetrainer.checkpoint import read_tree, write_tree

    build(tmp_path / "whole", device).fit()
    whole = scalars(tmp_path / "whole" / "tb")
    run = tmp_path / "run"
    killed = build(run, device)
    killed.run_until("step", step=7)
    killed.advance(8)  # on past the checkpoint at step 6
    killed.callbacks[1].tracker.flush()
    for path in (run / "tb").glob("events.out.tfevents.*"):  # named as the older logger named them
        path.rename(path.with_name(path.name.removesuffix(f".{killed.run_id}")))
    saved = sorted((run / "ckpt").glob("ckpt-*.safetensors"))[-1]
    state = read_tree(saved)
    assert state["position"]["global_step"] == 6
    state["callbacks"]["TensorBoardLogger"] = {"step": 6, "written": {"step/lr": 0.05,
                                                                      "step/train_loss": whole["step/train_loss"][2][1]}}  # fmt: skip
    write_tree(saved, state, st.__version__)
    resumed = build(run, device)
    assert resumed.load_checkpoint(run / "ckpt") == saved
    resumed.fit()
    assert scalars(run / "tb") == whole


def test_a_checkpoint_whose_logger_state_has_no_step_resumes_without_purging(tmp_path, device):
    """A TrackerLogger's state from before it saved its step: nothing to rewind to, so nothing is purged and the
    restart logs past each tag's newest step (the run's points, each once)."""
    from statetrainer.checkpoint import read_tree, write_tree

    build(tmp_path / "whole", device).fit()
    run = tmp_path / "run"
    killed = build(run, device)
    killed.run_until("step", step=14)
    killed.callbacks[1].tracker.flush()
    saved = sorted((run / "ckpt").glob("ckpt-*.safetensors"))[-1]
    state = read_tree(saved)
    del state["callbacks"]["TensorBoardLogger"]["step"]
    write_tree(saved, state, st.__version__)
    resumed = build(run, device)
    assert resumed.load_checkpoint(run / "ckpt") == saved and resumed.global_step == 12
    resumed.fit()
    assert scalars(run / "tb") == scalars(tmp_path / "whole" / "tb")
