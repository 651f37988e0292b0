"""Epochs made of a stream's next K batches (``Phase(..., batches=K)``) and runs counted in steps (``max_steps``).

Must show: a 6-epoch run taking 4 batches an epoch of a 10-batch loader sees every sample once per pass, starts
its second pass at the right point in a new order, and ends bit-identical after a resume at any of its 24 training
batches (in process here, all of them; SIGKILLed in a subprocess at the pass boundary and either side of it in
every run, at the others under ``slow``); the same with an endless stream that keeps its own position, restarted
in an evaluation phase too; ``max_steps`` stops at exactly that step and evaluates once after it.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import statetrainer as st
from statetrainer import CheckpointError
from statetrainer.checkpoint import read_tree

from ..checkpoint.test_kill_and_resume import assert_trees_equal
from ..test_trainer import UnsizedLoader
from .stream_run import BATCH_SIZE, EPOCHS, PER_EPOCH, SAMPLES, build, outcome

SCRIPT = Path(__file__).with_name("stream_run.py")
PASS = SAMPLES // BATCH_SIZE  # batches in a pass of the seeded loader: 10
TRAIN_BATCHES = [(epoch, batch) for epoch in range(EPOCHS) for batch in range(PER_EPOCH)]


_UNINTERRUPTED: dict[tuple[str, str], dict[str, Any]] = {}


def uninterrupted(loader: str, device: torch.device) -> dict[str, Any]:
    """The outcome of the run without a stop (run once per loader and device)."""
    key = (loader, str(device))
    if key not in _UNINTERRUPTED:
        _UNINTERRUPTED[key] = outcome(build(loader, device).fit())
    return _UNINTERRUPTED[key]


def resumed_after(loader: str, device: torch.device, folder: Path, phase: str, epoch: int, batch: int) -> dict:
    """The outcome of the run saved after batch ``batch`` of ``phase`` in ``epoch`` and resumed by a new trainer."""
    first = build(loader, device)
    first.run_until("phase", epoch=epoch, phase=phase, batch=batch)
    path = first.save_checkpoint(folder / "mid.safetensors")
    second = build(loader, device)
    second.load_checkpoint(path)
    return outcome(second.fit())


def test_every_sample_is_seen_once_per_pass_and_the_next_pass_starts_where_the_epoch_stopped(device):
    everything = uninterrupted("seeded", device)["seen"]
    assert len(everything) == EPOCHS * PER_EPOCH * BATCH_SIZE  # 2.4 passes
    seen = everything[: 2 * SAMPLES].view(2, SAMPLES)  # one row a whole pass
    for row in seen:
        assert sorted(row.tolist()) == list(range(SAMPLES))
    third = everything[2 * SAMPLES :].tolist()
    assert len(set(third)) == len(third) == 16
    assert not torch.equal(seen[0], seen[1]), "the second pass is reshuffled"
    # Epoch 2 takes the last 2 batches of pass 1 and the first 2 of pass 2, as a whole-pass loader's order has them.
    trainer = build("seeded", device)
    trainer.run_until("phase", epoch=2, phase="train", batch=3)
    source = trainer.parts["data"].sources[0]
    first_pass = [index for batch in source.open(5, 0) for index in batch[2].tolist()]
    second_pass = [index for batch in source.open(5, 1) for index in batch[2].tolist()]
    assert seen[0].tolist() == first_pass and seen[1].tolist() == second_pass


@pytest.mark.parametrize(("epoch", "batch"), TRAIN_BATCHES)
def test_a_run_resumed_after_any_training_batch_of_the_stream_ends_bit_identical(tmp_path, device, epoch, batch):
    assert_trees_equal(
        uninterrupted("seeded", device), resumed_after("seeded", device, tmp_path, "train", epoch, batch)
    )


ENDLESS_POINTS = [("train", 0, 0), ("train", 1, 3), ("train", 2, 1), ("train", 4, 2), ("valid", 1, 0),
                  ("valid", 2, 2), ("valid", 5, 1)]  # fmt: skip


@pytest.mark.parametrize(("phase", "epoch", "batch"), ENDLESS_POINTS)
def test_an_endless_stream_resumed_in_training_or_evaluation_ends_bit_identical(tmp_path, device, phase, epoch, batch):
    expected = uninterrupted("endless", device)
    assert expected["seen"].tolist() == [n % SAMPLES for n in range(EPOCHS * PER_EPOCH * BATCH_SIZE)]
    assert_trees_equal(expected, resumed_after("endless", device, tmp_path, phase, epoch, batch))


class Stateless(IterableDataset):
    """An endless stream with no state of its own."""

    def __iter__(self):
        count = 0
        while True:
            count += 1
            yield torch.full((2,), float(count)), torch.zeros(())


def tiny_trainer(device: torch.device, phases: list[st.Phase], **options: Any) -> st.Trainer:
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    loss = lambda output, target: F.mse_loss(output.squeeze(1), target)  # noqa: E731
    return st.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), loss, phases, device=device, **options)


def test_a_stream_that_keeps_no_state_cannot_be_checkpointed_once_it_has_begun(tmp_path, device):
    stream = DataLoader(Stateless(), batch_size=2)
    trainer = tiny_trainer(device, [st.Phase("train", stream, batches=3)], epochs=3)
    assert trainer.can_checkpoint_here()
    trainer.run_until("epoch", epoch=1)  # an epoch boundary, which a whole-pass phase can resume from
    assert not trainer.can_checkpoint_here()
    assert "stream" in trainer.why_not_checkpoint_here()
    with pytest.raises(RuntimeError, match="IterableDataset"):
        trainer.save_checkpoint(tmp_path / "never.safetensors")
    folder = tmp_path / "checkpoints"
    trainer = tiny_trainer(device, [st.Phase("train", stream, batches=3)], epochs=3,
                           callbacks=[st.callbacks.Checkpoint(folder, every_steps=1)])  # fmt: skip
    with pytest.warns(UserWarning, match="cannot be resumed"):
        trainer.fit()
    assert trainer.global_step == 9 and not list(folder.glob("*.safetensors"))


def test_max_steps_with_accumulation_stops_at_that_step_and_evaluates_once_after_it(device):
    data = [(torch.randn(3, 2), torch.randn(3)) for _ in range(10)]
    valid = [(torch.randn(3, 2), torch.randn(3))]
    ran: list[tuple[int, str, int, int]] = []

    class Record(st.Callback):
        def on_exit_batch(self, trainer):
            ran.append((trainer.epoch, trainer.phase.name, trainer.batch_index, trainer.global_step))

    phases = [st.Phase("train", data), st.Phase("valid", valid, grad=False)]
    trainer = tiny_trainer(device, phases, epochs=None, max_steps=6, accumulate=3, callbacks=[Record()])
    assert trainer.total_steps == 6 and trainer.steps_per_epoch == 4  # windows of 3, 3, 3 and 1 batches
    trainer.fit()
    assert trainer.global_step == 6 and trainer.finished
    # Epoch 1's train phase ends with the window that makes step 6 (its sixth batch); valid runs once after it.
    assert [entry for entry in ran if entry[0] == 1] == [(1, "train", index, 4 + (index + 1) // 3)
                                                        for index in range(6)] + [(1, "valid", 0, 6)]  # fmt: skip
    assert [entry[1] for entry in ran].count("valid") == 2
    with pytest.warns(UserWarning, match="max_steps=6 taken"):
        trainer.fit()


def test_max_steps_alone_runs_as_many_epochs_as_it_takes_and_epochs_alone_defaults_to_one(device):
    data = [(torch.randn(2, 2), torch.randn(2)) for _ in range(3)]
    stepped = tiny_trainer(device, [st.Phase("train", data)], max_steps=8)
    assert stepped.total_steps == 8 and stepped.fit().global_step == 8 and stepped.epoch == 2
    assert tiny_trainer(device, [st.Phase("train", data)]).fit().global_step == 3  # one epoch


def test_max_steps_ends_a_stream_phase_and_passes_over_a_later_training_phase(device):
    stream = [(torch.randn(2, 2), torch.randn(2)) for _ in range(5)]
    phases = [st.Phase("train", stream, batches=4), st.Phase("valid", stream[:1], grad=False),
              st.Phase("tune", stream[:2])]  # fmt: skip
    names: list[tuple[int, str]] = []

    class Record(st.Callback):
        def on_enter_phase(self, trainer):
            if trainer.batch_index == -1:
                names.append((trainer.epoch, trainer.phase.name))

    trainer = tiny_trainer(device, phases, epochs=5, max_steps=9, callbacks=[Record()])
    assert trainer.total_steps == 9 and trainer.steps_per_epoch == 6
    trainer.fit()
    assert trainer.global_step == 9
    assert names == [(0, "train"), (0, "valid"), (0, "tune"), (1, "train"), (1, "valid")]


@pytest.mark.parametrize(
    ("options", "expected"),
    [({"epochs": 3}, 3 * 7), ({"epochs": 3, "accumulate": 3}, 3 * 3), ({"epochs": 2, "max_steps": 5}, 5),
     ({"epochs": 2, "max_steps": 50}, 14), ({"epochs": None, "max_steps": 11, "accumulate": 2}, 11)],
)  # fmt: skip
def test_total_steps_are_the_steps_the_run_takes(device, options, expected):
    data = [(torch.randn(2, 2), torch.randn(2)) for _ in range(6)]
    phases = [st.Phase("train", data, batches=4), st.Phase("extra", data, limit=3), st.Phase("valid", data, grad=False)]
    trainer = tiny_trainer(device, phases, **options)
    assert trainer.total_steps == expected
    assert trainer.fit().global_step == expected


def test_a_stream_phase_is_refused_what_it_cannot_take(device):
    data = [(torch.zeros(1), torch.zeros(1))]
    with pytest.raises(ValueError, match="limit or batches, not both"):
        st.Phase("train", data, limit=2, batches=3)
    with pytest.raises(ValueError, match="batches must be a positive integer"):
        st.Phase("train", data, batches=0)
    model = nn.Linear(1, 1)
    with pytest.raises(ValueError, match="no phase trains"):
        st.Trainer(model, None, F.mse_loss, [st.Phase("valid", data, grad=False)], max_steps=3, device=device)


def test_a_checkpoint_of_a_stream_is_refused_by_a_run_that_reads_whole_passes_or_other_batches(tmp_path, device):
    data = [(torch.randn(2, 2), torch.randn(2)) for _ in range(5)]
    trainer = tiny_trainer(device, [st.Phase("train", data, batches=3)], epochs=3)
    trainer.run_until("phase", epoch=1, batch=0)
    path = trainer.save_checkpoint(tmp_path / "mid.safetensors")
    whole = tiny_trainer(device, [st.Phase("train", data)], epochs=3)
    with pytest.raises(CheckpointError, match="a whole pass each epoch here"):
        whole.load_checkpoint(path)
    other = tiny_trainer(device, [st.Phase("train", data, batches=2)], epochs=3)
    with pytest.raises(CheckpointError, match=r"train\.batches=3 in the checkpoint, 2 now"):
        other.load_checkpoint(path)
    assert other.state == "idle" and other.global_step == 0 and other.batch_index == -1  # nothing loaded
    tampered = read_tree(path)
    tampered["data"][0]["stream"]["batches"] = 9
    forged = tiny_trainer(device, [st.Phase("train", data, batches=3)], epochs=3)
    with pytest.raises(CheckpointError, match="taken 9 batches of a pass of 5"):
        forged.load_state_dict(tampered)


def test_an_error_in_a_stream_batch_is_saved_before_it_and_the_resume_runs_it_again(tmp_path, device):
    failing = {"armed": True}

    class FailOnce(st.Callback):
        def on_enter_batch(self, trainer):
            if failing["armed"] and (trainer.epoch, trainer.phase.name, trainer.batch_index) == (2, "train", 2):
                failing["armed"] = False
                raise RuntimeError("boom")

    first = build("seeded", device, extra=(FailOnce(),))
    with pytest.raises(RuntimeError, match="boom"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first.fit()
    path = first.save_checkpoint(tmp_path / "after-error.safetensors")
    second = build("seeded", device)
    second.load_checkpoint(path)
    assert_trees_equal(uninterrupted("seeded", device), outcome(second.fit()))


def test_two_whole_passes_of_a_tensor_dataset_cover_it_twice_under_batches(device):
    dataset = TensorDataset(torch.arange(10.0).unsqueeze(1), torch.zeros(10))
    loader = DataLoader(dataset, batch_size=3, shuffle=True)  # 4 batches a pass, the last of 1 sample
    seen: list[int] = []

    class Record(st.Callback):
        def on_exit_batch(self, trainer):
            seen.extend(trainer.batch[0].squeeze(1).int().tolist())

    model = nn.Linear(1, 1)
    trainer = st.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), lambda out, y: F.mse_loss(out.squeeze(1), y),
                         [st.Phase("train", loader, batches=3)], epochs=4, callbacks=[Record()], device=device)  # fmt: skip
    trainer.fit()
    assert len(seen) == 30 and Counter(seen[:10]) == Counter(seen[10:20]) == Counter(seen[20:30]) == Counter(range(10))


def run_script(folder: Path, out: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(folder), str(out), *options], capture_output=True,
                          text=True, timeout=300)  # fmt: skip


_SCRIPT_BASELINES: dict[tuple[str, ...], dict] = {}


def killed_and_resumed(tmp_path: Path, kill_at: str, *options: str) -> tuple[dict, dict]:
    """The outcome of the script run through and of the script SIGKILLed at ``kill_at`` and run again."""
    if options not in _SCRIPT_BASELINES:
        result = run_script(tmp_path / "baseline", tmp_path / "baseline.out", *options)
        assert result.returncode == 0, result.stderr
        _SCRIPT_BASELINES[options] = read_tree(tmp_path / "baseline.out")
    folder, out = tmp_path / "run", tmp_path / "run.out"
    killed = run_script(folder, out, "--kill-at", kill_at, *options)
    assert killed.returncode == -9, killed.stderr
    resumed = run_script(folder, out, *options)
    assert resumed.returncode == 0, resumed.stderr
    return _SCRIPT_BASELINES[options], read_tree(out)


# The first pass ends with epoch 2's batch 1 (counting from 0) and the second begins with its batch 2. A kill
# lands as its batch ends, before that batch's checkpoint is written, so the run resumes from the batch before:
# killed after 2:2, it resumes exactly at the pass boundary: the case every run keeps (the rest run under slow).
ACROSS_THE_PASS = ["train:2:2"]
KILL_POINTS = [pytest.param(f"train:{epoch}:{batch}", marks=[] if f"train:{epoch}:{batch}" in ACROSS_THE_PASS
                            else [pytest.mark.slow]) for epoch, batch in TRAIN_BATCHES]  # fmt: skip


@pytest.mark.parametrize("kill_at", KILL_POINTS)
def test_a_stream_run_sigkilled_after_any_training_batch_resumes_bit_identical(tmp_path, device, kill_at):
    expected, actual = killed_and_resumed(tmp_path, kill_at, "--device", str(device))
    assert_trees_equal(expected, actual)


@pytest.mark.slow  # the default run's stream kill is the one above, across a pass's end
@pytest.mark.parametrize("kill_at", ["valid:2:1", "train:3:2"])
def test_an_endless_stream_run_sigkilled_resumes_bit_identical(tmp_path, device, kill_at):
    expected, actual = killed_and_resumed(tmp_path, kill_at, "--loader", "endless", "--device", str(device))
    assert_trees_equal(expected, actual)


def test_a_step_past_max_steps_never_comes_even_when_the_epochs_length_is_unknown(device):
    stream = DataLoader(Stateless(), batch_size=2)  # no length: total_steps is unknown with epochs given
    trainer = tiny_trainer(device, [st.Phase("train", stream, batches=3)], epochs=2, max_steps=4)
    assert trainer.total_steps == 4  # min(2 epochs of 3, 4)
    batches = [(torch.randn(2, 2), torch.randn(2)) for _ in range(4)]
    unsized = tiny_trainer(device, [st.Phase("train", UnsizedLoader(batches))], epochs=2, max_steps=3)
    assert unsized.total_steps is None
    with pytest.raises(ValueError, match="step=10 never comes"):
        unsized.run_until(step=10)
