"""The goodput ledger: every second of a process in one bucket, across crashes and restarts, and its report."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import statetrainer as st
from statetrainer.callbacks import Checkpoint, GoodputLedger
from statetrainer.callbacks.goodput import BUCKETS, LEDGER_FILE
from statetrainer.checkpoint import CheckpointError, read_live_table, read_tree
from statetrainer.cli import main
from statetrainer.goodput_report import read_goodput, report_lines

TRAIN_BATCHES, VALID_BATCHES, EPOCHS = 12, 3, 2
SUBPROCESS_TIMEOUT = 300  # seconds: a hang is a failure


class SleepInBatch(st.Callback):
    """Sleeps as a training batch starts (those that take the steps ``steps``, or every one): a known time in the
    ``callbacks`` bucket, or ``redone``."""

    def __init__(self, seconds: float, steps: set[int] | None = None) -> None:
        self.seconds, self.steps = seconds, steps

    def on_enter_batch(self, trainer: st.Trainer) -> None:
        if trainer.phase.grad and (self.steps is None or trainer.global_step + 1 in self.steps):
            time.sleep(self.seconds)


class SleepAtEpochEnd(st.Callback):
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_exit_epoch(self, trainer: st.Trainer) -> None:
        time.sleep(self.seconds)


class CrashAtStep(st.Callback):
    """Raises as the batch that took ``step`` ends: the process goes on, the run cannot."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_exit_batch(self, trainer: st.Trainer) -> None:
        if trainer.phase.grad and trainer.global_step == self.step:
            raise RuntimeError(f"crash at step {self.step}")


def build(folder, *callbacks: st.Callback, device, ledger: GoodputLedger | bool = True,
          background: bool = False) -> st.Trainer:  # fmt: skip
    """A small classifier: 12 training and 3 validation batches per epoch, 2 epochs, a checkpoint every 5 steps
    and at each epoch's end."""
    torch.manual_seed(0)
    inputs, labels = torch.randn(TRAIN_BATCHES * 4, 5), torch.randint(0, 2, (TRAIN_BATCHES * 4,))
    train = [(inputs[index : index + 4], labels[index : index + 4]) for index in range(0, len(inputs), 4)]
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 2))
    return st.Trainer(model, torch.optim.Adam(model.parameters()), F.cross_entropy,
                      phases=[st.Phase("train", train), st.Phase("valid", train[:VALID_BATCHES], grad=False)],
                      callbacks=[*_ledger(ledger, folder), Checkpoint(folder, every_steps=5, background=background),
                                 *callbacks],
                      epochs=EPOCHS, device=device, seed=3)  # fmt: skip


def _ledger(ledger: GoodputLedger | bool, folder) -> list[st.Callback]:
    if isinstance(ledger, GoodputLedger):
        return [ledger]
    return [GoodputLedger(folder)] if ledger else []


def assert_partition(row) -> None:
    """No bucket below zero, and the process's seconds from its start to its last mark are its buckets'."""
    assert all(seconds >= 0 for seconds in row.seconds.values()), row.seconds
    assert math.isclose(row.ran + row.seconds["downtime"], sum(row.seconds.values()))


ALL_BATCHES = EPOCHS * (TRAIN_BATCHES + VALID_BATCHES)


@pytest.mark.parametrize("background", [False, True], ids=["synchronous", "background-saves"])
def test_a_runs_buckets_add_up_to_its_time_and_checkpoint_io_is_its_own(tmp_path, device, background):
    """From the start to the run's end every second is in one bucket: the row's seconds are the time from its
    start to the end of ``fit()`` (a background write still in flight waited for before the ledger's last mark),
    and the saves' and the load's seconds are the checkpointer's own, moved out of the buckets they happened in."""
    folder = tmp_path / "run"
    build(folder, SleepInBatch(0.002), device=device).fit()  # a first run, for a checkpoint to load
    ledger = GoodputLedger(tmp_path / "second")
    trainer = build(tmp_path / "second", SleepInBatch(0.002), device=device, ledger=ledger, background=background)
    trainer.load_checkpoint(sorted(folder.glob("*.safetensors"))[0])  # step 15 (epoch 2's start): on from there
    trainer.fit()
    ended = time.time()
    saved, row = ledger.rows  # the loaded checkpoint's history: the first run's process, as it was at step 15
    assert saved.batches == 18 and row.lost_batches == -1  # another folder: no file of the run's to learn from
    assert row.seconds["downtime"] == pytest.approx(row.started - saved.ended)  # the first run went on meanwhile
    assert_partition(row)
    assert row.ended == pytest.approx(ended, abs=0.1)
    # fit()'s own last check that no write is in flight comes after the ledger's last mark: a few microseconds
    assert 0 <= trainer.checkpoint_time.saving.seconds - row.seconds["checkpoint_save"] < 1e-3
    assert row.seconds["checkpoint_load"] == pytest.approx(trainer.checkpoint_time.loading.seconds, abs=1e-9)
    assert trainer.checkpoint_time.saving.seconds > 0 and trainer.checkpoint_time.loading.seconds > 0
    assert row.seconds["callbacks"] >= 0.002 * (EPOCHS * TRAIN_BATCHES - 15)  # the sleeps of the batches it ran
    for name in ("data", "forward", "backward", "step", "evaluation", "other"):
        assert row.seconds[name] > 0, name
    assert row.seconds["redone"] == 0
    assert row.batches == ALL_BATCHES  # loaded at 18 batches, and on to the end
    written = read_live_table(tmp_path / "second" / LEDGER_FILE, "goodput").rows
    assert len(written) == 2 and written[1] == pytest.approx([row.started, row.batches, row.lost_batches,
                                                              *row.seconds.values()])  # fmt: skip


def test_epoch_hooks_after_an_evaluation_phase_are_callbacks_not_evaluation(tmp_path, device):
    ledger = GoodputLedger(tmp_path)
    build(tmp_path, SleepAtEpochEnd(0.1), device=device, ledger=ledger).fit()
    [row] = ledger.rows
    assert row.seconds["callbacks"] >= 2 * 0.1 > row.seconds["evaluation"]
    assert_partition(row)


def test_with_synchronize_every_mark_waits_for_the_device_and_the_buckets_still_add_up(tmp_path, device):
    """``synchronize=True`` (on CUDA it waits for the device at every mark; elsewhere there is nothing to wait for)
    keeps the partition: the row's seconds are its time since the process started."""
    ledger = GoodputLedger(tmp_path, synchronize=True)
    build(tmp_path, device=device, ledger=ledger).fit()
    [row] = ledger.rows
    assert row.ended == pytest.approx(time.time(), abs=0.1) and row.batches == ALL_BATCHES
    assert all(row.seconds[name] > 0 for name in ("forward", "backward", "step", "evaluation"))
    assert_partition(row)


def test_after_a_crash_the_restart_counts_the_lost_batches_and_times_them_again_as_redone(tmp_path, device):
    """Saved at step 5, crashed at step 8: the restart loads step 5, learns from the ledger's file that 3
    batches were lost, and counts the time it spends running them again as ``redone``, and no more: batches 6 to
    9 sleep, 6 to 8 are redone, 9 is not."""
    folder, pause, sleepy = tmp_path / "run", 0.15, {6, 7, 8, 9}
    first = build(folder, SleepInBatch(pause, sleepy), CrashAtStep(8), device=device)
    with pytest.raises(RuntimeError, match="crash at step 8"):
        first.fit()
    ledger = GoodputLedger(folder)
    second = build(folder, SleepInBatch(pause, sleepy), device=device, ledger=ledger)
    second.load_checkpoint(folder)
    second.fit()
    before, after = ledger.rows
    assert (before.batches, before.lost_batches) == (8, 0)
    assert (after.batches, after.lost_batches) == (ALL_BATCHES, 3)
    assert 3 * pause <= after.seconds["redone"] < 4 * pause  # the three batches' sleeps, not the fourth's
    assert after.started == pytest.approx(before.ended)  # the same process: no downtime, no startup twice
    assert after.seconds["downtime"] == 0
    assert_partition(before)
    assert_partition(after)
    report = read_goodput(folder)
    assert report.source == folder / LEDGER_FILE and report.total == pytest.approx(before.ran + after.ran)
    assert "batches done again after each restart (done before a kill, after the last save): 3" in report_lines(report)


def test_after_two_crashes_the_restart_redoes_up_to_the_furthest_any_process_got(tmp_path, device):
    """Saved at step 5; crashed at step 9; resumed from step 5 and crashed at step 7; resumed from step 5 again:
    the third process does again the 4 batches the first had done (not only the second's 2)."""
    folder = tmp_path / "run"
    for crash in (9, 7):
        trainer = build(folder, CrashAtStep(crash), device=device)
        trainer.load_checkpoint(folder)
        with pytest.raises(RuntimeError, match=f"crash at step {crash}"):
            trainer.fit()
    ledger = GoodputLedger(folder)
    last = build(folder, CrashAtStep(100), device=device, ledger=ledger)
    last.load_checkpoint(folder)
    last.fit()
    assert [(row.batches, row.lost_batches) for row in ledger.rows] == [(9, 0), (7, 4), (ALL_BATCHES, 4)]


def test_a_run_started_again_before_its_first_checkpoint_keeps_the_first_attempts_row(tmp_path, device):
    folder = tmp_path / "run"
    first = build(folder, CrashAtStep(3), device=device)
    first.load_checkpoint(folder)  # nothing there yet: a first run
    with pytest.raises(RuntimeError, match="crash at step 3"):
        first.fit()
    ledger = GoodputLedger(folder)
    again = build(folder, CrashAtStep(100), device=device, ledger=ledger)
    assert again.load_checkpoint(folder) is None  # no checkpoint yet: the same run (run.json), from its start
    again.fit()
    before, after = ledger.rows
    assert (before.batches, after.lost_batches, after.batches) == (3, 3, ALL_BATCHES)
    assert after.seconds["redone"] > 0


def test_a_save_before_the_run_is_driven_keeps_every_process_row(tmp_path, device):
    folder = tmp_path / "run"
    with pytest.raises(RuntimeError):
        build(folder, CrashAtStep(8), device=device).fit()
    trainer = build(folder, CrashAtStep(100), device=device)
    trainer.load_checkpoint(folder)
    copy = trainer.save_checkpoint(tmp_path / "copy.safetensors")
    rows = read_tree(copy)["callbacks"]["GoodputLedger"]["rows"]
    assert rows.shape[0] == 2 and rows[0, 1] == 5  # the first process as the checkpoint has it, and this one


def test_a_ledger_records_one_trainers_run(tmp_path, device):
    ledger = GoodputLedger(tmp_path / "run")
    build(tmp_path / "run", device=device, ledger=ledger).fit()
    again = build(tmp_path / "run", device=device, ledger=ledger)
    again.load_checkpoint(tmp_path / "run")
    with pytest.raises(ValueError, match="give each trainer a GoodputLedger of its own"):
        again.fit()  # a finished run: fit() opens its files, then says there is nothing to do


def test_without_its_file_the_ledger_goes_on_from_the_checkpoints_rows_and_says_the_lost_batches_are_unknown(
    tmp_path, device
):
    folder = tmp_path / "run"
    with pytest.raises(RuntimeError):
        build(folder, CrashAtStep(8), device=device).fit()
    (folder / LEDGER_FILE).write_bytes(b"not a ledger")
    ledger = GoodputLedger(folder)
    trainer = build(folder, device=device, ledger=ledger)
    trainer.load_checkpoint(folder)
    with pytest.warns(UserWarning, match="not a statetrainer live table"):
        trainer.fit()
    before, after = ledger.rows
    assert before.batches == 5 and after.lost_batches == -1  # the checkpoint's row ends at its save
    assert "batches done again after each restart (done before a kill, after the last save): not known" in (
        report_lines(read_goodput(folder))
    )
    (folder / LEDGER_FILE).unlink()
    report = read_goodput(folder)  # the newest checkpoint's ledger, which ends at its save
    assert report.source.suffix == ".safetensors" and "missing" in (report.warning or "")
    assert [row.batches for row in report.rows] == [5, ALL_BATCHES]


def test_a_saved_ledger_that_does_not_fit_is_refused_before_anything_loads(tmp_path, device):
    folder = tmp_path / "run"
    saved = build(folder, device=device)
    saved.run_until("phase", step=3)
    state = saved.state_dict()
    for damage, message in [
        (lambda ledger: ledger.update(columns=["started", "seconds"]), "columns"),
        (lambda ledger: ledger.update(rows=ledger["rows"].float()), "float64 rows"),
        (lambda ledger: ledger["rows"].__setitem__((0, 4), math.nan), "not finite"),
        (lambda ledger: ledger.update(batches=-1), "batch count"),
    ]:
        broken = {**state, "callbacks": {**state["callbacks"]}}
        ledger = broken["callbacks"]["GoodputLedger"] = dict(state["callbacks"]["GoodputLedger"])
        ledger["rows"] = ledger["rows"].clone()
        damage(ledger)
        fresh = build(tmp_path / "fresh", device=device)
        with pytest.raises(CheckpointError, match=message):
            fresh.load_state_dict(broken)
        assert fresh.global_step == 0  # nothing loaded


def test_report_prints_the_ledger_as_a_table_as_json_and_as_a_picture(tmp_path, device, capsys):
    folder = tmp_path / "run"
    build(folder, device=device).fit()
    assert main(["report", str(folder), "--plot", str(tmp_path / "goodput.png")]) == 0
    text = capsys.readouterr().out
    assert "1 process(es), 0 restart(s), 30 batches done" in text
    for name in BUCKETS:
        assert name.replace("_", " ") in text
    assert (tmp_path / "goodput.png").read_bytes().startswith(b"\x89PNG")
    assert main(["report", str(folder), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["processes"][0]["batches"] == 30 and set(found["seconds"]) == set(BUCKETS)
    assert found["total"] == pytest.approx(sum(found["seconds"].values()))


def test_report_names_what_is_wrong_with_its_folder(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "no goodput ledger" in capsys.readouterr().err
    assert main(["report", str(tmp_path), "--plot", str(tmp_path / "goodput.svg")]) == 2
    assert "name a .png file" in capsys.readouterr().err


def test_one_callback_times_the_hooks(tmp_path, device):
    with pytest.raises(ValueError, match="each time the run's hooks; keep one"):
        build(tmp_path, GoodputLedger(tmp_path, name="second"), device=device)


def test_a_ledger_adds_no_warning_and_leaves_the_run_as_it_was(tmp_path, device):
    """The ledger only reads clocks: a run with it ends with the weights of a run without it."""
    with_ledger = build(tmp_path / "with", device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with_ledger.fit()
    without = build(tmp_path / "without", device=device, ledger=False).fit()
    for (name, value), other in zip(with_ledger.model.state_dict().items(), without.model.state_dict().values(),
                                    strict=True):  # fmt: skip
        assert torch.equal(value, other), name


def _batches_at(step: int) -> int:
    """The batches ``small_run.py`` has done once step ``step`` is taken: 32 training and 8 validation batches
    an epoch."""
    return step + 8 * ((step - 1) // 32)


def _saved_before(step: int) -> int:
    """The step of its newest checkpoint by step ``step``: every 10 steps and at each epoch's end (32 steps)."""
    return max(step // 10 * 10, step // 32 * 32)


@pytest.mark.slow
def test_a_run_killed_twice_accounts_for_the_wall_time_of_its_three_processes(tmp_path, device):
    """SIGKILLed at step 23 and at step 47, then run to its end: the ledger's buckets add up to the three
    processes' wall time (measured here, from each start to each exit) within 2%, and each restart counts as
    lost exactly the batches done between the last save and the kill."""
    folder, script = tmp_path / "run", Path(__file__).with_name("small_run.py")
    walls, kills = [], [23, 47]
    for kill in [*kills, None]:
        started = time.time()
        finished = subprocess.run([sys.executable, str(script), str(folder), "--device", str(device),
                                   *([] if kill is None else ["--kill-at-step", str(kill)])],
                                  capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)  # fmt: skip
        walls.append(time.time() - started)
        assert finished.returncode == (-9 if kill is not None else 0), finished.stderr
    report = read_goodput(folder)
    assert len(report.rows) == 3
    assert report.total == pytest.approx(sum(walls), rel=0.02), (report.total, walls)
    expected = [_batches_at(kill) - _batches_at(_saved_before(kill)) for kill in kills]
    assert expected == [3, 7]
    assert [row.lost_batches for row in report.rows] == [0, *expected]
    assert [row.batches for row in report.rows[:2]] == [_batches_at(kill) for kill in kills]
    for row in report.rows[1:]:
        assert row.seconds["redone"] > 0 and row.seconds["downtime"] > 0 and row.seconds["checkpoint_load"] > 0
    shown = subprocess.run([sys.executable, "-m", "statetrainer", "report", str(folder)], capture_output=True,
                           text=True, timeout=SUBPROCESS_TIMEOUT)  # fmt: skip
    assert shown.returncode == 0 and "(done before a kill, after the last save): 3, 7" in shown.stdout
