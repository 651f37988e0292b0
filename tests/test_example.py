"""The main job, examples/mnist.py: offline end to end, and its recipe on real MNIST.

Each run of the example is a fresh interpreter (3-7 s with torchvision and matplotlib on two CPU cores): the default
run keeps the end-to-end test; the fresh-start test and the real-MNIST training (15 s on two idle cores, minutes on
busy ones) are marked ``slow``."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from .conftest import MNIST_DIR

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mnist.py"


def load_example():
    spec = importlib.util.spec_from_file_location("mnist_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_offline(tmp_path: Path, out: Path, device: torch.device, *options: str) -> subprocess.CompletedProcess:
    """One short epoch of the main job on its offline default, on ``device`` (``options`` come last)."""
    return subprocess.run(
        [sys.executable, str(EXAMPLE), "--offline", "--data-root", str(tmp_path / "data"), "--epochs", "1",
         "--limit", "256", "--workers", "0", "--out", str(out), "--device", str(device), *options],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip


FLOOR = 5e-3 / 25 / 1e4  # the one-cycle's last value: the default peak over div_factor and final_div_factor


def final_learning_rate(out: Path) -> float:
    header, *rows = (out / "log.csv").read_text().splitlines()
    return float(rows[-1].split(",")[header.split(",").index("lr")])


@pytest.mark.slow
def test_under_torchrun_the_one_cycle_spans_the_runs_steps_and_ends_at_its_last_value(tmp_path: Path, device):
    if device.type != "cpu":
        pytest.skip("two processes on gloo, on the CPU")
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(EXAMPLE),
         "--offline", "--data-root", str(tmp_path / "data"), "--epochs", "2", "--limit", "256", "--workers", "0",
         "--out", str(out), "--device", str(device)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [int(row.split(",")[1]) for row in (out / "log.csv").read_text().splitlines()[1:]]
    assert steps == [2, 4]  # 256 samples, batches of 64, two ranks: 2 steps an epoch
    assert final_learning_rate(out) == pytest.approx(FLOOR)


def test_example_runs_end_to_end_offline(device: torch.device, tmp_path: Path):
    out = tmp_path / "out"
    result = run_offline(tmp_path, out, device)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("offline: MNIST is not in") and "rendered with Pillow" in lines[0]
    epoch = next(index for index, line in enumerate(lines) if line.startswith("Epoch:"))
    summary = lines[1:epoch]  # st.summary(trainer), printed once as the run starts
    assert summary[0].split() == ["module", "kind", "parameters", "trainable", "size"]
    assert any(line.startswith("a checkpoint now: ") for line in summary)
    lines = [lines[0], *lines[epoch:]]
    assert lines[1].startswith("Epoch:    1 | train_loss=") and "valid_accuracy=" in lines[1]
    assert (out / "log.csv").read_text().splitlines()[0].startswith("epoch,step,train_loss,train_accuracy")
    assert final_learning_rate(out) == pytest.approx(FLOOR)  # the one-cycle ends with the run
    for plot in ("metrics.png", "lr.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"
    assert (out / "best.safetensors").is_file()
    again = run_offline(tmp_path, out, device)  # the same command again: the run is complete
    assert again.returncode == 0 and "Warning" not in again.stderr, again.stderr
    assert again.stdout.splitlines()[1:] == [
        f"the run in {out}/ has already finished (all 1 epoch(s) done); its last epoch:",
        lines[1],  # the same line the run printed as it ended
        f"checkpoints, log and plots in {out}/ (--epochs N trains on to N epochs, --fresh starts over)",
    ]


@pytest.mark.slow  # the default run keeps the run above; this one runs the example three times more
def test_the_example_trains_on_to_more_epochs_and_refuses_fewer(device: torch.device, tmp_path: Path):
    out = tmp_path / "out"
    assert run_offline(tmp_path, out, device).returncode == 0
    longer = run_offline(tmp_path, out, device, "--epochs", "2")  # more epochs: it trains on
    assert longer.returncode == 0, longer.stderr
    assert "training on to 2 epochs: the one-cycle schedule keeps its length of 4 steps" in longer.stdout
    assert [line.split(" |")[0] for line in longer.stdout.splitlines() if line.startswith("Epoch:")] == ["Epoch:    2"]
    assert [row.split(",")[0] for row in (out / "log.csv").read_text().splitlines()[1:]] == ["1", "2"]
    fewer = run_offline(tmp_path, out, device, "--epochs", "1")
    assert fewer.returncode == 1 and "cannot resume from" in fewer.stderr and "Traceback" not in fewer.stderr


def test_rendered_digits_are_fixed_per_index_and_labelled():
    example = load_example()
    digits = example.RenderedDigits(20, seed=3, transform=example.eval_transform())
    first, label = digits[7]
    again, label_again = digits[7]
    assert torch.equal(first, again) and label == label_again
    assert first.shape == (1, 28, 28)
    assert len({digits[i][1] for i in range(20)}) > 5


@pytest.mark.slow
def test_the_example_trains_on_the_original_gz_files_and_reaches_97_percent(
    device: torch.device, mnist_test_set: tuple[torch.Tensor, torch.Tensor], tmp_path: Path, capsys
):
    """``--data-root ../shared/data/mnist``: MNIST's test set alone, as .gz files, split 8,000/2,000."""
    example = load_example()
    trainer = example.main(["--data-root", str(MNIST_DIR), "--out", str(tmp_path / "out"), "--device", str(device),
                            "--workers", "0"])  # fmt: skip
    first = capsys.readouterr().out.splitlines()[0]
    assert first == f"MNIST's test set alone from {MNIST_DIR} (10000 images), split 8000/2000 into train/valid"
    assert trainer.metrics["valid_accuracy"] >= 0.97, trainer.metrics


@pytest.mark.slow
def test_fresh_moves_the_earlier_run_aside_and_a_fresh_run_killed_early_restarts_clean(tmp_path: Path, device):
    out = tmp_path / "out"
    assert run_offline(tmp_path, out, device).returncode == 0  # a finished run
    old_log = (out / "log.csv").read_text()
    command = [sys.executable, str(EXAMPLE), "--offline", "--data-root", str(tmp_path / "data"), "--epochs", "1",
               "--limit", "256", "--workers", "0", "--out", str(out), "--device", str(device), "--fresh"]  # fmt: skip
    fresh = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    hung = threading.Timer(300, fresh.kill)  # a run that hangs before its line is killed, and the test fails
    hung.start()
    try:
        for line in fresh.stdout:  # killed as soon as the old run is set aside: before its first checkpoint
            if line.startswith("starting afresh"):
                fresh.kill()
                break
        else:
            raise AssertionError("the fresh run ended, or hung, without saying it starts afresh")
    finally:
        hung.cancel()
    fresh.wait(timeout=60)
    assert fresh.returncode == -signal.SIGKILL
    assert not list(out.glob("ckpt-*.safetensors"))  # nothing of the old run where the new one writes
    again = run_offline(tmp_path, out, device)  # the plain command again: it completes
    assert again.returncode == 0, again.stderr
    assert "has already finished" not in again.stdout and "Epoch:    1 |" in again.stdout
    (earlier,) = (out / "earlier-runs").iterdir()
    assert (earlier / "log.csv").read_text() == old_log and list(earlier.glob("ckpt-*.safetensors"))
    assert (out / "log.csv").read_text().count("\n") == 2  # the header and the new run's one epoch
    new_run = json.loads((out / "run.json").read_text())["run"]
    assert new_run != json.loads((earlier / "run.json").read_text())["run"]
