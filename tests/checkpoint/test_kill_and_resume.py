"""Must show: a run SIGKILLed at any batch, or during a checkpoint write, resumes bit-identical."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from statetrainer.checkpoint import checkpoint_files, read_tree

SCRIPT = Path(__file__).with_name("resumable_run.py")


def run_script(folder: Path, out: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(folder), str(out), *options],
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def assert_same_run(expected_folder: Path, expected_out: Path, folder: Path, out: Path) -> None:
    expected, actual = read_tree(expected_out), read_tree(out)
    assert_trees_equal(expected["model"], actual["model"], "model")
    assert_trees_equal(expected["optimizer"], actual["optimizer"], "optimizer")
    assert expected["metrics"] == actual["metrics"]
    for log in ("log.csv", "log_batches.csv"):
        assert (expected_folder / log).read_text() == (folder / log).read_text(), log


def assert_trees_equal(expected, actual, path="") -> None:
    """Equal structure, equal plain values, and tensors equal bit for bit (same dtype, torch.equal)."""
    assert type(expected) is type(actual), path
    if isinstance(expected, torch.Tensor):
        assert expected.dtype == actual.dtype and torch.equal(expected, actual), path
    elif isinstance(expected, dict):
        assert expected.keys() == actual.keys(), path
        for key in expected:
            assert_trees_equal(expected[key], actual[key], f"{path}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(actual), path
        for index, (left, right) in enumerate(zip(expected, actual)):
            assert_trees_equal(left, right, f"{path}/{index}")
    else:
        assert expected == actual, path


@pytest.fixture(scope="module")
def baselines(tmp_path_factory) -> dict[int, tuple[Path, Path]]:
    """Uninterrupted runs, with and without gradient accumulation."""
    runs = {}
    for accumulate in (1, 2):
        folder = tmp_path_factory.mktemp(f"baseline{accumulate}")
        out = folder.with_suffix(".out")
        result = run_script(folder, out, "--accumulate", str(accumulate))
        assert result.returncode == 0, result.stderr
        runs[accumulate] = folder, out
    return runs


KILL_POINTS = [
    # (accumulate, epoch:phase:batch) -- 30 train batches and 3 valid batches per epoch
    (1, "0:train:7"),  # mid-epoch, between checkpoints
    (1, "1:valid:1"),  # inside the validation phase
    (1, f"{random.Random().randrange(3)}:train:{random.Random().randrange(30)}"),  # a random batch
    (2, "1:train:12"),  # first batch of an accumulation window: gradients pending
    (2, "2:train:29"),  # the last (ragged-free) window's end, just before the epoch checkpoint
]


@pytest.mark.parametrize(("accumulate", "kill_at"), KILL_POINTS)
def test_sigkill_at_a_batch_then_restart_ends_bit_identical(baselines, tmp_path, accumulate, kill_at):
    folder, out = tmp_path / "run", tmp_path / "run.out"
    killed = run_script(folder, out, "--accumulate", str(accumulate), "--kill-at", kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists()
    resumed = run_script(folder, out, "--accumulate", str(accumulate))
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.startswith("resumed from"), resumed.stdout
    assert_same_run(*baselines[accumulate], folder, out)


def kill_during_a_write(folder: Path, out: Path, writes_to_skip: int) -> bool:
    """Start the script (it resumes from ``folder``), SIGKILL it once a checkpoint is being written.

    Returns whether the kill left a temporary file behind, i.e. landed inside
    the write (rarely, the write finishes between seeing its file and the kill).
    """
    child = subprocess.Popen([sys.executable, str(SCRIPT), str(folder), str(out), "--pad-mb", "16"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip

    def writing() -> bool:
        return folder.is_dir() and any(path.name.endswith(".tmp") for path in folder.iterdir())

    writes_seen, deadline = 0, time.monotonic() + 120
    try:
        while time.monotonic() < deadline and child.poll() is None:
            if writing():
                if writes_seen == writes_to_skip:
                    child.send_signal(signal.SIGKILL)
                    break
                writes_seen += 1
                while writing():
                    time.sleep(0.0005)
            time.sleep(0.0005)
    finally:
        returncode = child.wait(timeout=60)
    assert returncode == -signal.SIGKILL, f"the run ended before a write could be caught: {child.stderr.read()}"
    return writing()


def test_sigkill_during_a_checkpoint_write_leaves_only_whole_checkpoints(baselines, tmp_path):
    folder, out = tmp_path / "run", tmp_path / "run.out"
    caught = False
    for _ in range(5):
        caught = kill_during_a_write(folder, out, writes_to_skip=random.Random().randrange(1, 5))
        for path in checkpoint_files(folder):  # every file under a checkpoint name is whole and verifies
            read_tree(path)
        if caught:
            break
    assert caught, "no kill landed inside a checkpoint write"
    resumed = run_script(folder, out, "--pad-mb", "16")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.startswith("resumed from"), resumed.stdout
    assert_same_run(*baselines[1], folder, out)
    assert not [path for path in folder.iterdir() if path.name.endswith(".tmp")]  # the leftovers were cleaned
