"""StreamLogger's format, CSVLogger's rows and resume, ProgressBar and Plots."""

from __future__ import annotations

import csv
import io
import os
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import statetrainer as st
from statetrainer.callbacks import Accuracy, Checkpoint, CSVLogger, Plots, ProgressBar, SmoothedLoss, StreamLogger
from statetrainer.checkpoint import CheckpointError

from ..conftest import regression_batches, run_in_a_terminal


def classifier_batches(count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 4, generator=generator), torch.randint(3, (6,), generator=generator)) for _ in range(count)]


def classifier_trainer(callbacks, device: torch.device, epochs=2, **options) -> st.Trainer:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    phases = [st.Phase("train", classifier_batches(4, 0)), st.Phase("valid", classifier_batches(2, 1), grad=False)]
    return st.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, phases,
                      callbacks=callbacks, epochs=epochs, device=device, **options)  # fmt: skip


def test_stream_logger_prints_the_seed_format(device: torch.device):
    stream = io.StringIO()
    trainer = classifier_trainer([SmoothedLoss(), Accuracy(), StreamLogger(stream)], device).fit()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    m = trainer.metrics
    assert lines[1] == (
        f"Epoch:    2 | train_loss={m['train_loss']:.4f}, train_accuracy={m['train_accuracy']:.4f}, "
        f"valid_loss={m['valid_loss']:.4f}, valid_accuracy={m['valid_accuracy']:.4f}"
    )
    assert StreamLogger.format(1, {"train_loss": 0.89071, "valid_accuracy": 0.96954}) == (
        "Epoch:    1 | train_loss=0.8907, valid_accuracy=0.9695"
    )


def read_rows(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_csv_logger_writes_one_row_per_epoch_with_metrics_and_lr(device: torch.device, tmp_path):
    path = tmp_path / "run" / "log.csv"
    trainer = classifier_trainer([SmoothedLoss(), Accuracy(), CSVLogger(path, every_batches=2)], device, epochs=3).fit()
    rows = read_rows(path)
    assert [row["epoch"] for row in rows] == ["1", "2", "3"]
    assert [row["step"] for row in rows] == ["4", "8", "12"]
    assert list(rows[0]) == ["epoch", "step", "train_loss", "train_accuracy", "valid_loss", "valid_accuracy", "lr"]
    assert float(rows[-1]["valid_accuracy"]) == trainer.metrics["valid_accuracy"]
    assert float(rows[-1]["lr"]) == 0.1
    batch_rows = read_rows(tmp_path / "run" / "log_batches.csv")
    # every 2nd batch: train batches 2 and 4, valid batch 2, per epoch
    assert [(r["epoch"], r["phase"], r["batch"]) for r in batch_rows[:3]] == [
        ("1", "train", "2"), ("1", "train", "4"), ("1", "valid", "2")]  # fmt: skip
    assert len(batch_rows) == 9 and batch_rows[0]["train_loss"] != ""


def test_csv_logger_widens_its_header_instead_of_dropping_a_new_metric(device: torch.device, tmp_path):
    class LateMetric(st.Callback):
        def on_exit_epoch(self, trainer):
            if trainer.epoch == 1:
                trainer.metrics["late"] = 7.0

    path = tmp_path / "log.csv"
    classifier_trainer([SmoothedLoss(), LateMetric(), CSVLogger(path)], device).fit()
    rows = read_rows(path)
    assert rows[0]["late"] == "" and rows[1]["late"] == "7.0"


def test_csv_logger_resume_cuts_back_to_the_checkpoint_and_never_duplicates(device: torch.device, tmp_path):
    path = tmp_path / "log.csv"
    logger = CSVLogger(path)
    trainer = classifier_trainer([SmoothedLoss(), logger], device, epochs=1).fit()
    saved = logger.state_dict()
    complete = path.read_text()
    with open(path, "a") as file:  # a row written after the checkpoint, before a crash
        file.write("2,8,0.5,0.5,0.1\n")
    restored = CSVLogger(path)
    restored.check_fits(saved)
    restored.load_state_dict(saved)
    assert path.read_text() == complete + "2,8,0.5,0.5,0.1\n"  # a load changes no file...
    restored.open_files(trainer)  # ...the run does, once its folder is claimed
    assert path.read_text() == complete
    restored.on_exit_epoch(classifier_trainer([], device, epochs=1))
    assert len(read_rows(path)) == 2
    path.write_text("")
    with pytest.raises(CheckpointError, match="holds less than the checkpoint expects"):
        CSVLogger(path).check_fits(saved)
    path.unlink()
    with pytest.raises(CheckpointError, match="is missing but the checkpoint expects"):
        CSVLogger(path).check_fits(saved)


def test_a_fresh_run_refuses_a_log_no_run_owns_and_starts_afresh_in_its_own_folder(device: torch.device, tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("old,log\n1,2\n")  # no run.json says whose it is: perhaps the user's own
    with pytest.raises(CheckpointError, match="holds log.csv but no run.json"):
        classifier_trainer([SmoothedLoss(), CSVLogger(path)], device, epochs=1).fit()
    assert path.read_text() == "old,log\n1,2\n"
    path.unlink()
    first = classifier_trainer([SmoothedLoss(), CSVLogger(path, every_batches=1), Checkpoint(tmp_path)], device)
    first.run_until("batch", phase="valid")  # killed before its first checkpoint: its folder, a half-written log
    restarted = classifier_trainer([SmoothedLoss(), CSVLogger(path, every_batches=1), Checkpoint(tmp_path)], device)
    assert restarted.load_checkpoint(tmp_path) is None  # the same run (its run.json), from the start
    restarted.fit()
    batches = read_rows(tmp_path / "log_batches.csv")
    assert [(row["epoch"], row["phase"], row["batch"]) for row in batches][:5] == [
        ("1", "train", "1"),
        ("1", "train", "2"),
        ("1", "train", "3"),
        ("1", "train", "4"),
        ("1", "valid", "1"),
    ]
    assert [row["epoch"] for row in read_rows(path)] == ["1", "2"]


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_draws_on_a_terminal_and_stays_quiet_otherwise(device: torch.device):
    terminal, pipe = FakeTerminal(), io.StringIO()
    classifier_trainer(
        [SmoothedLoss(), ProgressBar(every_batches=2, stream=terminal, mininterval=0)], device, epochs=1
    ).fit()
    classifier_trainer([SmoothedLoss(), ProgressBar(stream=pipe)], device, epochs=1).fit()
    drawn = terminal.getvalue()
    assert "epoch 1 train" in drawn and "4/4" in drawn and "train_loss=" in drawn and "epoch 1 valid" in drawn
    assert pipe.getvalue() == ""


def test_progress_bar_shows_metrics_from_its_first_refresh(device: torch.device):
    terminal = FakeTerminal()  # every_batches=20: more than the phase's 4 batches
    classifier_trainer([SmoothedLoss(), ProgressBar(stream=terminal, mininterval=0)], device, epochs=1).fit()
    draws = [draw for draw in terminal.getvalue().split("\r") if draw.startswith("epoch 1 train")]
    after_first_batch = [draw for draw in draws if "| 1/4 " in draw]
    assert after_first_batch and "train_loss=" in after_first_batch[0], draws


class FailsMidPhase(st.Callback):
    def on_exit_batch(self, trainer: st.Trainer) -> None:
        if trainer.batch_index == 2:
            raise RuntimeError("the run crashes mid-phase")


def test_a_crash_closes_the_progress_bar(device: torch.device):
    bar = ProgressBar(stream=FakeTerminal(), mininterval=0)
    trainer = classifier_trainer([bar, FailsMidPhase()], device, epochs=1)
    with pytest.raises(RuntimeError, match="crashes mid-phase"):
        trainer.fit()
    assert bar.bar is None


def test_plots_writes_pngs_of_metrics_and_learning_rate(device: torch.device, tmp_path):
    plots = Plots(tmp_path / "plots")
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = st.callbacks.OneCycle(0.1, total_steps=8)
    st.Trainer(model, optimizer, F.mse_loss, [st.Phase("train", regression_batches(4))],
               callbacks=[SmoothedLoss(), schedule, plots], epochs=2, device=device).fit()  # fmt: skip
    for name in ("metrics.png", "lr.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plots.learning_rates == [schedule.values(step, 1)[0] for step in range(8)]
    assert [list(epoch) for epoch in plots.epochs] == [["train_loss"], ["train_loss"]]


def test_plots_leave_the_global_matplotlib_backend_alone(tmp_path):
    import matplotlib

    before = matplotlib.get_backend()
    matplotlib.use("pdf")  # a user's (or a notebook's) choice
    try:
        plots = Plots(tmp_path)
        plots.epochs, plots.learning_rates = [{"train_loss": 1.0}], [0.1, 0.2]
        plots.write()
        assert matplotlib.get_backend() == "pdf"
        assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        matplotlib.use(before)


def test_progress_bar_of_a_run_resumed_mid_phase_starts_where_it_left_off(device: torch.device, tmp_path):
    first = classifier_trainer([SmoothedLoss(), ProgressBar(stream=io.StringIO())], device, epochs=1)
    while not (first.state == "phase" and first.batch_index == 1):
        first.advance()
    path = first.save_checkpoint(tmp_path)
    terminal = FakeTerminal()
    second = classifier_trainer([SmoothedLoss(), ProgressBar(stream=terminal, mininterval=0)], device, epochs=1)
    second.load_checkpoint(path)
    second.fit()
    assert "epoch 1 train" in terminal.getvalue() and "4/4" in terminal.getvalue()
    assert "0/4" not in terminal.getvalue() and " 2/4" in terminal.getvalue()


def test_csv_logs_reach_the_disk_before_a_checkpoint_records_their_size(tmp_path, device: torch.device, monkeypatch):
    synced: list[str] = []
    fsync = os.fsync

    def recording_fsync(descriptor: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        fsync(descriptor)

    logger = CSVLogger(tmp_path / "log.csv", every_batches=1)
    trainer = classifier_trainer([SmoothedLoss(), logger], device)
    while not (trainer.state == "phase" and trainer.batch_index == 2):
        trainer.advance()
    monkeypatch.setattr(os, "fsync", recording_fsync)
    path = trainer.save_checkpoint(tmp_path / "ckpt.safetensors")
    log = str((tmp_path / "log_batches.csv").resolve())
    written = str(path.with_name(f".{path.name}.{os.getpid()}.tmp") / path.name)  # where atomic_write writes it
    assert log in synced and synced.index(log) < synced.index(written)
    synced.clear()
    trainer.save_checkpoint(tmp_path / "again.safetensors")
    assert log not in synced  # nothing new appended: no second sync


def test_the_progress_bar_on_a_real_terminal_shows_the_metrics_of_its_last_refresh(tmp_path, device):
    """Under a pseudo-terminal: the training bar's last metrics are the phase's final running values, and the
    evaluation bar shows its own."""
    script = tmp_path / "bar.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        import torch
        import statetrainer as st
        from statetrainer.callbacks import ProgressBar, SmoothedLoss, running_metrics
        from tests.callbacks.test_loggers import classifier_trainer

        class LastRefresh(st.Callback):  # notes the running values where the bar refreshes
            def on_exit_batch(self, trainer):
                if (trainer.batch_index + 1) % 3 == 0 or trainer.batch_index + 1 == trainer.phase_batches:
                    print("refreshed", trainer.phase.name, running_metrics(trainer), file=sys.stdout, flush=True)

        trainer = classifier_trainer([SmoothedLoss(), LastRefresh(), ProgressBar(every_batches=3, mininterval=0,
                                     leave=True)], torch.device({device.type!r}), epochs=1)
        trainer.fit()
    """)
    )
    returncode, screen, stdout = run_in_a_terminal([sys.executable, str(script)])
    assert returncode == 0
    refreshes = [line.split(" ", 2) for line in stdout.splitlines() if line.startswith("refreshed")]
    for phase in ("train", "valid"):
        last = eval(next(values for _, name, values in reversed(refreshes) if name == phase))  # noqa: S307
        shown = re.findall(rf"epoch 1 {phase}.*?{phase}_loss=([0-9.e+-]+)", screen)
        assert shown, f"the {phase} bar shows no metrics"
        assert float(shown[-1]) == pytest.approx(last[f"{phase}_loss"], rel=1e-2)  # tqdm prints 3 significant digits


def test_a_log_widened_after_a_checkpoint_is_restored_under_the_checkpoints_columns(device: torch.device, tmp_path):
    class LateMetric(st.Callback):
        def metric_names(self, phases):
            return {"late"}

        def on_exit_epoch(self, trainer):
            if trainer.epoch == 1:
                trainer.metrics["late"] = 7.0

    path = tmp_path / "log.csv"
    logger = CSVLogger(path)
    trainer = classifier_trainer([SmoothedLoss(), LateMetric(), logger], device, epochs=2)
    trainer.run_until("epoch", epoch=1)
    saved, at_checkpoint = logger.epochs.state_dict(), path.read_bytes()
    trainer.fit()  # epoch 2 widens the header with "late", after the checkpoint
    assert b",late" in path.read_bytes().splitlines()[0]
    for state in (saved, {key: value for key, value in saved.items() if key != "rows"}):  # also as saved before rows
        restored = CSVLogger(path)
        restored.epochs.check_fits(state)
        restored.epochs.load_state_dict(state)
        widened = path.read_bytes()
        restored.epochs.open()
        assert path.read_bytes() == at_checkpoint
        path.write_bytes(widened)
