"""Stop signals: the batch in flight finishes, a checkpoint is written exactly there, Preempted is raised."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import statetrainer as st
from statetrainer.callbacks import Accuracy, Checkpoint, SmoothedLoss
from statetrainer.checkpoint import checkpoint_files, read_tree

from .conftest import run_in_a_terminal

DATA = TensorDataset(torch.randn(48, 3, generator=torch.Generator().manual_seed(0)),
                     torch.randint(2, (48,), generator=torch.Generator().manual_seed(1)))  # fmt: skip


class SendSignal(st.Callback):
    """Sends ``signals`` to this process once, at (epoch, phase, batch), while that batch is in flight."""

    def __init__(self, where: tuple[int, str, int], *signals: signal.Signals) -> None:
        self.where, self.signals, self.sent = where, signals, False

    def _maybe_send(self, trainer: st.Trainer) -> None:
        if not self.sent and (trainer.epoch, trainer.phase.name, trainer.batch_index) == self.where:
            self.sent = True
            for number in self.signals:
                os.kill(os.getpid(), number)


class SendSignalOnBackward(SendSignal):
    def on_enter_backward(self, trainer: st.Trainer) -> None:
        self._maybe_send(trainer)


class SendSignalOnBatch(SendSignal):
    def on_enter_batch(self, trainer: st.Trainer) -> None:
        self._maybe_send(trainer)


def build(device: torch.device, callbacks=(), loader=None, **options) -> st.Trainer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.2), nn.Linear(8, 2))
    train = loader if loader is not None else DataLoader(DATA, batch_size=6, shuffle=True)
    return st.Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-2), F.cross_entropy,
                      [st.Phase("train", train), st.Phase("valid", DataLoader(DATA, batch_size=16), grad=False)],
                      callbacks=[SmoothedLoss(), Accuracy(), *callbacks], seed=3, epochs=2, device=device,
                      deterministic=device.type == "cuda", **options)  # fmt: skip


def assert_same_run(expected: st.Trainer, actual: st.Trainer) -> None:
    for (name, left), right in zip(
        expected.model.state_dict().items(), actual.model.state_dict().values(), strict=True
    ):
        assert torch.equal(left, right), name
    assert expected.metrics == actual.metrics and expected.global_step == actual.global_step


@pytest.mark.parametrize(
    ("where", "sender", "number", "accumulate"),
    [
        ((0, "train", 3), SendSignalOnBackward, signal.SIGTERM, 1),
        ((1, "train", 4), SendSignalOnBackward, signal.SIGTERM, 3),  # inside an accumulation window
        ((1, "valid", 1), SendSignalOnBatch, signal.SIGTERM, 1),
        ((0, "train", 5), SendSignalOnBatch, signal.SIGINT, 1),
    ],
    ids=["SIGTERM-in-backward", "SIGTERM-in-a-window", "SIGTERM-in-valid", "SIGINT-in-a-batch"],
)
def test_a_stop_signal_saves_after_the_batch_in_flight_and_resumes_exactly(tmp_path, device, where, sender, number, accumulate,
                                                                           python_sigint_handler):  # fmt: skip
    whole = build(device, accumulate=accumulate).fit()
    handlers_before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    folder = tmp_path / "run"
    stopped = build(
        device, [Checkpoint(folder, every_steps=2, keep_last=2), sender(where, number)], accumulate=accumulate
    )
    with pytest.raises(st.Preempted) as raised:
        stopped.fit()
    assert {sig: signal.getsignal(sig) for sig in handlers_before} == handlers_before
    preempted = raised.value
    assert preempted.code == 128 + number and preempted.signal == number
    assert preempted.checkpoint == checkpoint_files(folder)[-1]
    saved = read_tree(preempted.checkpoint)
    position = saved["position"]
    assert (saved["machine"]["state"], position["epoch"], position["batch_index"]) == ("phase", where[0], where[2])
    assert stopped.phases[position["phase_index"]].name == where[1]
    assert f"stopped by {signal.Signals(number).name}" in str(preempted)

    # The same script restarted: its sender's batch is behind it now.
    resumed = build(
        device, [Checkpoint(folder, every_steps=2, keep_last=2), sender(where, number)], accumulate=accumulate
    )
    assert resumed.load_checkpoint(folder) == preempted.checkpoint
    assert_same_run(whole, resumed.fit())


def test_without_a_checkpoint_callback_the_run_stops_and_says_nothing_was_saved(device):
    trainer = build(device, [SendSignalOnBatch((0, "train", 1), signal.SIGTERM)])
    with pytest.raises(st.Preempted, match="nothing was saved.*no Checkpoint callback") as raised:
        trainer.fit()
    assert raised.value.checkpoint is None and raised.value.code == 143
    assert trainer.batch_index == 1 and trainer.state == "phase"  # the batch in flight finished, no later one ran
    with pytest.raises(RuntimeError, match="cannot continue"):
        trainer.fit()


def test_a_phase_that_cannot_resume_mid_phase_stops_without_a_misleading_checkpoint(tmp_path, device):
    loader = DataLoader(DATA, batch_size=6, sampler=list(range(48)))  # a custom sampler: not positionable
    trainer = build(device, [Checkpoint(tmp_path, every_epochs=None), SendSignalOnBatch((0, "train", 2), signal.SIGTERM)],
                    loader=loader)  # fmt: skip
    with pytest.raises(st.Preempted) as raised:
        trainer.fit()
    assert raised.value.checkpoint is None and "cannot be resumed mid-phase" in str(raised.value)
    assert checkpoint_files(tmp_path) == []


def test_a_second_ctrl_c_aborts_at_once(tmp_path, device, python_sigint_handler):
    trainer = build(device, [Checkpoint(tmp_path, every_epochs=None),
                             SendSignalOnBackward((0, "train", 2), signal.SIGINT, signal.SIGINT)])  # fmt: skip
    before = signal.getsignal(signal.SIGINT)  # Python's handler, or SIG_IGN when pytest started under nohup
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert trainer.state == "backward"  # it did not wait for the batch to end
    assert checkpoint_files(tmp_path) == []
    assert signal.getsignal(signal.SIGINT) is before


def test_a_signal_ignored_when_the_run_starts_stays_ignored(tmp_path, device):
    """A shell starts a background job (``cmd &`` in a script) with SIGINT ignored: a Ctrl-C meant for the
    foreground program must not stop the run, as it would not stop Python itself."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        trainer = build(
            device, [Checkpoint(tmp_path, every_epochs=None), SendSignalOnBatch((0, "train", 1), signal.SIGINT)]
        )
        trainer.fit()
        assert trainer.finished and not trainer.position.stop_requested and checkpoint_files(tmp_path) == []
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_repeated_sigterm_does_not_interrupt_the_save(tmp_path, device):
    trainer = build(device, [Checkpoint(tmp_path, every_epochs=None),
                             SendSignalOnBackward((0, "train", 2), signal.SIGTERM, signal.SIGTERM)])  # fmt: skip
    with pytest.raises(st.Preempted) as raised:
        trainer.fit()
    assert raised.value.checkpoint == checkpoint_files(tmp_path)[-1]


def test_users_choose_the_signals(tmp_path, device):
    trainer = build(device, [Checkpoint(tmp_path, every_epochs=None), SendSignalOnBatch((0, "train", 1), signal.SIGUSR1)],
                    stop_signals=["SIGUSR1"])  # fmt: skip
    previous_term = signal.getsignal(signal.SIGTERM)
    with pytest.raises(st.Preempted) as raised:
        trainer.fit()
    assert raised.value.code == 128 + signal.SIGUSR1 and raised.value.checkpoint is not None
    assert signal.getsignal(signal.SIGTERM) is previous_term


@pytest.mark.parametrize("bad", ["SIGNOPE", "TERMINATE", 0, "SIGKILL", signal.SIGSTOP])
def test_unknown_or_uncatchable_signals_are_refused(bad):
    with pytest.raises(ValueError, match="stop_signals|cannot be caught"):
        build(torch.device("cpu"), stop_signals=[bad])


def test_a_signal_that_is_not_a_name_or_number_is_a_type_error():
    with pytest.raises(TypeError, match="signal names or numbers"):
        build(torch.device("cpu"), stop_signals=[1.5])


def test_signals_are_caught_only_while_driving_and_only_in_the_main_thread(device):
    seen = {}

    class Look(st.Callback):
        def on_exit_idle(self, trainer: st.Trainer) -> None:
            seen[threading.current_thread().name] = signal.getsignal(signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    build(device, [Look()]).fit()
    assert seen["MainThread"] is not before  # ours while fit() runs
    assert signal.getsignal(signal.SIGTERM) is before  # restored after

    errors = []
    worker = threading.Thread(target=lambda: _fit_collecting(build(device, [Look()]), errors), name="worker")
    worker.start()
    worker.join(timeout=60)
    assert not errors and seen["worker"] is before


def _fit_collecting(trainer: st.Trainer, errors: list) -> None:
    try:
        trainer.fit()
    except BaseException as error:  # noqa: BLE001 -- reported to the main thread
        errors.append(error)


def test_stop_signals_can_be_turned_off(device):
    before = signal.getsignal(signal.SIGINT)
    seen = []

    class Look(st.Callback):
        def on_exit_idle(self, trainer: st.Trainer) -> None:
            seen.append(signal.getsignal(signal.SIGINT))

    build(device, [Look()], stop_signals=()).fit()
    assert seen == [before]


def terminal_screen(drawn: str) -> list[str]:
    """The lines a terminal shows after ``drawn``: a carriage return goes back to the line's start, where the
    next characters overwrite the line's; escape sequences are left out (a bar at position 0 writes none)."""
    lines, row, column = [[]], 0, 0
    for character in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", drawn):
        if character == "\r":
            column = 0
        elif character == "\n":
            row, column = row + 1, 0
            lines.extend([] for _ in range(row + 1 - len(lines)))
        else:
            line = lines[row]
            line.extend(" " for _ in range(column + 1 - len(line)))
            line[column], column = character, column + 1
    return ["".join(line).rstrip() for line in lines]


@pytest.mark.slow
def test_a_stop_message_starts_on_its_own_line_under_a_progress_bar(device):
    """Ctrl-C under a pseudo-terminal: the progress bar is cleared before the message is printed."""
    script = textwrap.dedent(f"""
        import signal, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        import torch
        from statetrainer.callbacks import ProgressBar
        from tests.test_preemption import SendSignalOnBatch, build

        sender = SendSignalOnBatch((0, "train", 3), signal.SIGINT)
        build(torch.device({device.type!r}), [ProgressBar(mininterval=0), sender]).fit()
    """)
    status, drawn, _ = run_in_a_terminal([sys.executable, "-c", script])
    assert status == 128 + signal.SIGINT, drawn
    assert "epoch 1 train" in drawn and "train_loss=" in drawn  # the bar was drawn, with its metrics
    screen = terminal_screen(drawn)
    stop = [line for line in screen if "statetrainer: stopped by SIGINT" in line]
    assert stop and stop[0].startswith("statetrainer: stopped by SIGINT at epoch 1, phase 'train', after batch 4"), (
        screen
    )
    assert not [line for line in screen if "epoch 1 train" in line], screen  # and the bar was cleared


@pytest.mark.slow
def test_these_tests_pass_when_pytest_starts_with_sigint_ignored(device):
    """``nohup pytest &`` (or ``&`` in a script) starts the suite with SIGINT ignored: the tests that send
    SIGINT pass all the same (one that needs Python's SIGINT handler installs it itself)."""
    here = Path(__file__).resolve()
    ignore_sigint = "import signal, sys, pytest; signal.signal(signal.SIGINT, signal.SIG_IGN); sys.exit(pytest.main())"
    result = subprocess.run(
        [sys.executable, "-c", ignore_sigint, str(here), str(here.with_name("test_recovery.py")), "-v",
         "-p", "no:cacheprovider", "-o", "addopts=",  # the -k alone chooses: no marker filter, no xdist
         "-k", f"{device.type} and (ctrl_c or SIGINT) and not starts_with_sigint_ignored"],
        cwd=here.parents[1], capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:]
    for test in (
        "test_preemption.py::test_a_second_ctrl_c_aborts_at_once",
        "test_preemption.py::test_a_stop_signal_saves_after_the_batch_in_flight_and_resumes_exactly",
        "test_recovery.py::test_ctrl_c_in_the_forward_pass_then_save_holds_the_last_batch_boundary",
    ):
        assert re.search(rf"{re.escape(test)}\[{device.type}[^]]*\] PASSED", result.stdout), result.stdout[-4000:]
