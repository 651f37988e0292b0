"""Must show: a run SIGKILLed or preempted (SIGTERM, SIGINT) at any batch, or during a checkpoint write,
resumes bit-identical. On CUDA the runs use ``deterministic=True`` and each precision.

Each case runs the script two or three times (3-7 s each on two CPU cores), so the default run keeps one SIGKILL
and one SIGTERM case and one SIGKILL during a background write (they share one uninterrupted run); every other kill point, signal and loader is marked
``slow`` (``pytest -m slow``)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from statetrainer.checkpoint import checkpoint_files, read_tree

from ..conftest import default_sigint

SCRIPT = Path(__file__).with_name("resumable_run.py")


def run_script(folder: Path, out: Path, *options: str) -> subprocess.CompletedProcess:
    """Run the script in a process group of its own, as a job under a scheduler runs."""
    return subprocess.run([sys.executable, str(SCRIPT), str(folder), str(out), *options], capture_output=True,
                          text=True, timeout=300, start_new_session=True, preexec_fn=default_sigint)  # fmt: skip


def device_options(device: torch.device, precision: str | None = None) -> tuple[str, ...]:
    """The script's options for ``device``: CUDA runs are deterministic, so they can repeat bit for bit."""
    options = ("--device", str(device))
    if device.type == "cuda":
        options += ("--deterministic",)
    return options + (("--precision", precision) if precision else ())


def assert_same_run(expected_folder: Path, expected_out: Path, folder: Path, out: Path) -> None:
    expected, actual = read_tree(expected_out), read_tree(out)
    assert_trees_equal(expected["model"], actual["model"], "model")
    assert_trees_equal(expected["optimizer"], actual["optimizer"], "optimizer")
    assert expected["metrics"] == actual["metrics"]
    assert expected.keys() == actual.keys()
    if "ema" in expected:  # the averaged weights too
        assert_trees_equal(expected["ema"], actual["ema"], "ema")
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
        for index, (left, right) in enumerate(zip(expected, actual, strict=True)):
            assert_trees_equal(left, right, f"{path}/{index}")
    else:
        assert expected == actual, path


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Callable[..., tuple[Path, Path]]:
    """``baseline(*options)``: the folder and output of an uninterrupted run with those options, run once."""
    runs: dict[tuple[str, ...], tuple[Path, Path]] = {}

    def run(*options: str) -> tuple[Path, Path]:
        if options not in runs:
            folder = tmp_path_factory.mktemp("baseline")
            out = folder.with_suffix(".out")
            result = run_script(folder, out, *options)
            assert result.returncode == 0, result.stderr
            runs[options] = folder, out
        return runs[options]

    return run


_CHOOSE = random.Random(20261127)  # a fixed seed: the same "random" batches in every collection
slow = pytest.mark.slow
KILL_POINTS = [
    # (accumulate, epoch:phase:batch) -- 30 train batches and 3 valid batches per epoch
    (1, "0:train:7"),  # mid-epoch, between checkpoints (the default run's SIGKILL case)
    pytest.param(1, "1:valid:1", marks=slow),  # inside the validation phase
    pytest.param(1, f"{_CHOOSE.randrange(3)}:train:{_CHOOSE.randrange(30)}", marks=slow),  # an arbitrary batch
    pytest.param(2, "1:train:12", marks=slow),  # first batch of an accumulation window: gradients pending
    pytest.param(2, "2:train:29", marks=slow),  # the last (ragged-free) window's end, before the epoch checkpoint
]


@pytest.mark.parametrize(("accumulate", "kill_at"), KILL_POINTS)
def test_sigkill_at_a_batch_then_restart_ends_bit_identical(baseline, tmp_path, device, accumulate, kill_at):
    options = ("--accumulate", str(accumulate), *device_options(device))
    folder, out = tmp_path / "run", tmp_path / "run.out"
    killed = run_script(folder, out, *options, "--kill-at", kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists()
    resumed = run_script(folder, out, *options)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.startswith("resumed from"), resumed.stdout
    assert_same_run(*baseline(*options), folder, out)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("loader", "accumulate", "kill_at"),
    [("stream", 1, "0:train:7"), ("stream", 2, "1:train:20"), ("stream", 2, "2:train:13"),
     ("torchdata", 1, "0:train:7"), ("torchdata", 2, "1:train:20"), ("torchdata-main", 2, "2:train:13")],
)  # fmt: skip
def test_a_loader_that_keeps_its_own_position_resumes_mid_epoch_bit_identical(baseline, tmp_path, device, loader,
                                                                               accumulate, kill_at):  # fmt: skip
    """A stateful IterableDataset in the main process; torchdata's StatefulDataLoader with 2 workers, and in
    the main process with random augmentation."""
    if loader.startswith("torchdata"):
        pytest.importorskip("torchdata.stateful_dataloader")
    options = ("--accumulate", str(accumulate), "--loader", loader, *device_options(device))
    folder, out = tmp_path / "run", tmp_path / "run.out"
    killed = run_script(folder, out, *options, "--kill-at", kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    state, epoch, phase, batch = newest_position(folder)
    assert state == "phase" and phase == "train" and (epoch, batch) > (0, 0)  # a mid-epoch checkpoint of the loader
    resumed = run_script(folder, out, *options)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.startswith("resumed from"), resumed.stdout
    assert_same_run(*baseline(*options), folder, out)


SIGNAL_POINTS = [
    # (accumulate, epoch:phase:batch, signal) -- checkpoints come every 3 steps and at each epoch's end
    (1, "0:train:7", "SIGTERM"),  # between two step checkpoints (the default run's SIGTERM case)
    pytest.param(2, "1:train:12", "SIGTERM", marks=slow),  # first batch of an accumulation window: gradients saved
    pytest.param(1, "1:valid:1", "SIGTERM", marks=slow),  # inside the validation phase
    pytest.param(1, f"{_CHOOSE.randrange(3)}:train:{_CHOOSE.randrange(30)}", "SIGTERM", marks=slow),  # arbitrary
    pytest.param(1, "2:train:16", "SIGINT", marks=slow),  # Ctrl-C: reaches the DataLoader workers too
    pytest.param(2, "0:train:3", "SIGINT", marks=slow),
]


@pytest.mark.slow
@pytest.mark.parametrize(("how", "where"), [("kill", "1:train:5"), ("SIGTERM", "1:valid:1")],
                         ids=["sigkill-in-training", "sigterm-in-validation-on-the-averaged-weights"])  # fmt: skip
def test_a_run_with_an_ema_killed_or_stopped_resumes_bit_identical_with_its_average(baseline, tmp_path, device, how,
                                                                                    where):  # fmt: skip
    """EMA(0.9), the validation run on the averaged weights: SIGKILLed in training, or stopped by SIGTERM in the
    validation (the checkpoint then holds the averaged weights as the model's and the raw ones in the EMA's
    state), the restart ends with the weights, Adam, metrics, log and the average of the run never stopped."""
    options = ("--ema", *device_options(device))
    folder, out = tmp_path / "run", tmp_path / "run.out"
    interrupt = ("--kill-at", where) if how == "kill" else ("--signal-at", f"{where}:{how}")
    stopped = run_script(folder, out, *options, *interrupt)
    assert stopped.returncode == (-signal.SIGKILL if how == "kill" else 128 + signal.SIGTERM), stopped.stderr
    if how != "kill":
        epoch, phase, batch = where.split(":")
        assert newest_position(folder) == ("phase", int(epoch), phase, int(batch))
    resumed = run_script(folder, out, *options)
    assert resumed.returncode == 0 and resumed.stdout.startswith("resumed from"), resumed.stderr
    assert_same_run(*baseline(*options), folder, out)


def newest_position(folder: Path) -> tuple[str, int, str, int]:
    saved = read_tree(checkpoint_files(folder)[-1])
    position = saved["position"]
    phase = ("train", "valid")[position["phase_index"]]
    return saved["machine"]["state"], position["epoch"], phase, position["batch_index"]


@pytest.mark.parametrize(("accumulate", "signal_at", "name"), SIGNAL_POINTS)
def test_a_stop_signal_checkpoints_the_batch_in_flight_and_the_restart_ends_bit_identical(
    baseline, tmp_path, device, accumulate, signal_at, name
):
    options = ("--accumulate", str(accumulate), *device_options(device))
    folder, out = tmp_path / "run", tmp_path / "run.out"
    stopped = run_script(folder, out, *options, "--signal-at", f"{signal_at}:{name}")
    assert stopped.returncode == 128 + signal.Signals[name], stopped.stderr
    assert f"stopped by {name}" in stopped.stderr and "saved" in stopped.stderr, stopped.stderr
    assert not out.exists()
    epoch, phase, batch = signal_at.split(":")
    assert newest_position(folder) == ("phase", int(epoch), phase, int(batch))  # that batch, not an older one
    resumed = run_script(folder, out, *options)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.startswith("resumed from"), resumed.stdout
    assert_same_run(*baseline(*options), folder, out)


def signal_during_a_write(folder: Path, out: Path, options: tuple[str, ...], writes_to_skip: int,
                          number: signal.Signals) -> tuple[int, bool]:  # fmt: skip
    """Start the script (it resumes from ``folder``), send ``number`` to its process group during a checkpoint write.

    Returns its exit status and whether the signal landed inside the write
    (rarely, the write finishes between seeing its file and the signal).
    """
    child = subprocess.Popen([sys.executable, str(SCRIPT), str(folder), str(out), *options, "--pad-mb", "16"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                             preexec_fn=default_sigint)  # fmt: skip

    def writing() -> bool:
        return folder.is_dir() and any(path.name.endswith(".tmp") for path in folder.iterdir())

    writes_seen, deadline, caught = 0, time.monotonic() + 120, False
    try:
        while time.monotonic() < deadline and child.poll() is None:
            if writing():
                if writes_seen == writes_to_skip:
                    os.killpg(child.pid, number)
                    caught = writing()
                    break
                writes_seen += 1
                while writing():
                    time.sleep(0.0005)
            time.sleep(0.0005)
    finally:
        returncode = child.wait(timeout=60)
    expected = -number if number == signal.SIGKILL else 128 + number
    assert returncode == expected, (
        f"the run ended before a write could be caught, or not by the signal: {child.stderr.read()}"
    )
    return returncode, caught and (number != signal.SIGKILL or writing())


@pytest.mark.slow
@pytest.mark.parametrize("number", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_a_checkpoint_write_leaves_only_whole_checkpoints(baseline, tmp_path, device, number):
    options = ("--accumulate", "1", *device_options(device))
    folder, out = tmp_path / "run", tmp_path / "run.out"
    choose, caught = random.Random(int(number)), False
    for _ in range(5):
        _, caught = signal_during_a_write(folder, out, options, choose.randrange(1, 5), number)
        for path in checkpoint_files(folder):  # every file under a checkpoint name is whole and verifies
            read_tree(path)
        if caught:
            break
    assert caught, "no signal landed inside a checkpoint write"
    resumed = run_script(folder, out, *options, "--pad-mb", "16")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.startswith("resumed from"), resumed.stdout
    assert_same_run(*baseline(*options), folder, out)  # the padding buffer is left out of the output
    assert not [path for path in folder.iterdir() if path.name.endswith(".tmp")]  # the leftovers were cleaned


BACKGROUND_POINTS = [
    # (point, signal) in the third background write (of step 9's checkpoint): see resumable_run.InWrite
    ("written", "KILL"),  # the temporary file whole, not yet synced or renamed (the default run's case)
    pytest.param("start", "TERM", marks=slow),  # the write has begun: it ends, then the preemption save
    pytest.param("start", "KILL", marks=slow),
    pytest.param("mid", "KILL", marks=slow),  # while safetensors writes
    pytest.param("renamed", "KILL", marks=slow),  # synced, just before the rename
    pytest.param("pruned", "KILL", marks=slow),  # durable under its name; the oldest not yet pruned
    pytest.param("written", "TERM", marks=slow),
]


@pytest.mark.parametrize(("point", "name"), BACKGROUND_POINTS)
def test_a_signal_during_a_background_write_keeps_the_previous_checkpoints_and_the_restart_ends_bit_identical(
    baseline, tmp_path, device, point, name
):
    """The run writes its checkpoints in the background, with a 16 MB buffer, and is stopped as its third write
    reaches ``point`` while training goes on; the restart, in the background too, ends as the uninterrupted run
    with synchronous saves ends."""
    options = ("--accumulate", "1", *device_options(device))
    folder, out = tmp_path / "run", tmp_path / "run.out"
    background = ("--pad-mb", "16", "--background")
    stopped = run_script(folder, out, *options, *background, "--in-write", f"3:{point}:{name}")
    steps = [read_tree(path)["position"]["global_step"] for path in checkpoint_files(folder)]  # each one verifies
    if name == "KILL":
        assert stopped.returncode == -signal.SIGKILL, stopped.stderr
        # step 9's only once it is durable (which a write of a few milliseconds may be by "mid")
        assert steps in {"pruned": [[3, 6, 9]], "mid": [[3, 6], [3, 6, 9]]}.get(point, [[3, 6]]), steps
    else:
        assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
        assert "waited" in stopped.stderr and "before the save at step" in stopped.stderr, stopped.stderr
        assert "stopped by SIGTERM" in stopped.stderr and "saved" in stopped.stderr, stopped.stderr
        assert steps[0] == 9 and steps[1] > 9  # the write in flight ended, then the preemption save
    assert not out.exists()
    resumed = run_script(folder, out, *options, *background)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.startswith("resumed from"), resumed.stdout
    assert_same_run(*baseline(*options), folder, out)
    assert not [path for path in folder.iterdir() if path.name.endswith(".tmp")]  # the leftovers were cleaned


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", [None, "bf16", "fp16"])
def test_cuda_deterministic_runs_resume_bit_identical_in_every_precision(baseline, tmp_path, precision):
    options = ("--accumulate", "2", *device_options(torch.device("cuda"), precision))
    for stop in (("--kill-at", "1:train:13"), ("--signal-at", "0:train:20:SIGTERM")):
        folder, out = tmp_path / stop[0].strip("-"), tmp_path / f"{stop[0].strip('-')}.out"
        assert run_script(folder, out, *options, *stop).returncode in (-signal.SIGKILL, 128 + signal.SIGTERM)
        resumed = run_script(folder, out, *options)
        assert resumed.returncode == 0 and resumed.stdout.startswith("resumed from"), resumed.stderr
        assert_same_run(*baseline(*options), folder, out)
