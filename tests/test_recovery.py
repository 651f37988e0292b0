"""A run stopped by an error is saved at a consistent point and resumes without skipping or repeating work.

Each case makes one callback raise once in one of the twelve hooks, saves the
stopped trainer, and resumes in a new trainer whose callback no longer raises.
The resumed run must end with the same weights, optimizer state and step
count as a run that never failed, and its recorded hooks must be the
uninterrupted run's, give or take exactly what the saved point says: the
hooks of a discarded half-done batch run again, and the hooks after the one
that raised while ending a batch that counts as done do not run for it.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import statetrainer as st
from statetrainer.callbacks import Callback, SmoothedLoss
from statetrainer.machine import STATES
from statetrainer.parts import Position
from statetrainer.testing import Event, EventRecorder

from .conftest import regression_batches

EPOCHS = 3
HOOKS = [f"on_{kind}_{state}" for state in STATES for kind in ("enter", "exit")]


class SavedRecorder(EventRecorder):
    """An ``EventRecorder`` whose events survive a checkpoint, so the resumed run's list is the whole run's."""

    def state_dict(self) -> dict[str, Any]:
        return {"events": [list(event) for event in self.events]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.events = [Event(*event) for event in state["events"]]


class RaiseOnce(Callback):
    """Raises ``error`` the first time ``hook`` runs at or after (epoch, phase, batch), while armed."""

    name = "raiser"
    hook = ""

    def __init__(self, where: tuple[int, str | None, int], error: type[BaseException] = RuntimeError,
                 armed: bool = True) -> None:  # fmt: skip
        self.where, self.error, self.armed = where, error, armed

    def check(self, trainer: st.Trainer) -> None:
        epoch, phase, batch = self.where
        here = trainer.epoch >= epoch and (phase is None or trainer.phase == phase) and trainer.batch_index >= batch
        if self.armed and here:
            self.armed = False
            raise self.error(f"raised in {self.hook}")


def raiser_class(hook: str) -> type[RaiseOnce]:
    """A ``RaiseOnce`` that overrides ``hook`` only (the machine calls only the hooks a callback overrides)."""

    def method(self: RaiseOnce, trainer: st.Trainer) -> None:
        self.check(trainer)

    method.__name__ = hook
    return type(f"RaiseIn_{hook}", (RaiseOnce,), {hook: method, "hook": hook})


def build(device: torch.device, accumulate: int, callbacks: list[Callback]) -> st.Trainer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train = regression_batches(6, seed=1)
    dataset = TensorDataset(torch.cat([inputs for inputs, _ in train]), torch.cat([target for _, target in train]))
    phases = [st.Phase("train", DataLoader(dataset, batch_size=4, shuffle=True)),
              st.Phase("valid", regression_batches(3, seed=2), grad=False)]  # fmt: skip
    return st.Trainer(model, optimizer, nn.MSELoss(), phases, callbacks=callbacks, epochs=EPOCHS, device=device,
                      accumulate=accumulate, seed=11, stop_signals=())  # fmt: skip


def with_recorders(raiser: RaiseOnce) -> tuple[list[Callback], SavedRecorder, SavedRecorder]:
    """A recorder and a metric before the raiser, and a recorder after it."""
    before, after = SavedRecorder(), SavedRecorder(name="after")
    return [before, SmoothedLoss(), raiser, after], before, after


def assert_same_training(resumed: st.Trainer, reference: st.Trainer) -> None:
    assert resumed.global_step == reference.global_step
    for name, tensor in reference.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], tensor), name
    for key, state in reference.optimizer.state_dict()["state"].items():
        assert torch.equal(resumed.optimizer.state_dict()["state"][key]["momentum_buffer"], state["momentum_buffer"])


# (hook, accumulate, where it raises, what the saved point must be)
CASES = [
    ("on_exit_idle", 1, (0, None, -1), "finish the transition"),
    ("on_enter_epoch", 1, (1, None, -1), "finish the transition"),
    ("on_exit_epoch", 1, (1, None, -1), "finish the transition"),
    ("on_enter_phase", 1, (1, "valid", -1), "finish the transition"),
    ("on_exit_phase", 1, (1, "train", -1), "finish the transition"),
    ("on_enter_idle", 1, (0, None, -1), "finish the transition"),
    ("on_enter_batch", 1, (1, "train", 2), "discard the batch"),
    ("on_enter_batch", 1, (1, "valid", 1), "discard the batch"),
    ("on_exit_batch", 1, (1, "train", 2), "keep the batch"),
    ("on_exit_batch", 1, (1, "valid", 1), "keep the batch"),
    ("on_enter_backward", 1, (1, "train", 2), "discard the batch"),
    ("on_exit_backward", 1, (1, "train", 2), "discard the batch"),
    ("on_enter_step", 1, (1, "train", 2), "discard the batch"),
    ("on_exit_step", 1, (1, "train", 2), "keep the batch"),
    ("on_enter_batch", 2, (1, "train", 2), "discard the batch"),
    ("on_enter_backward", 2, (1, "train", 2), "discard the batch"),
    ("on_enter_backward", 2, (1, "train", 3), "discard the batch"),  # mid-window, before its backward pass
    ("on_exit_backward", 2, (1, "train", 2), "keep the batch"),  # batch 2 opens a window: no step after it
    ("on_exit_step", 2, (1, "train", 2), "keep the batch"),  # the first step at or after batch 2 is batch 3's
]


@pytest.mark.parametrize(("hook", "accumulate", "where", "expected"), CASES,
                         ids=[f"{hook}-accumulate{acc}-{where[1]}{where[2]}" for hook, acc, where, _ in CASES])  # fmt: skip
def test_a_run_saved_after_a_callback_raised_resumes_without_skipping_or_repeating_work(
    device: torch.device, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    hook: str, accumulate: int, where: tuple[int, str | None, int], expected: str,
) -> None:  # fmt: skip
    assert {case[0] for case in CASES} == set(HOOKS)  # every hook is covered
    raiser_type = raiser_class(hook)
    callbacks, reference_recorder, reference_after = with_recorders(raiser_type(where, armed=False))
    reference = build(device, accumulate, callbacks).fit()

    callbacks, recorder, _ = with_recorders(raiser_type(where))
    failing = build(device, accumulate, callbacks)
    with pytest.raises(RuntimeError, match=f"raised in {hook}"):
        failing.fit()
    failed_at = list(recorder.events)
    path = failing.save_checkpoint(tmp_path / "after_error.safetensors")
    said = capsys.readouterr().err

    callbacks, resumed_recorder, resumed_after = with_recorders(raiser_type(where, armed=False))
    resumed = build(device, accumulate, callbacks)
    resumed.load_checkpoint(path)
    resumed.fit()

    assert_same_training(resumed, reference)
    whole_run = resumed_recorder.events
    if expected == "finish the transition":
        assert "a resume first runs the rest of" in said and f"raiser.{hook} raised" in said
        assert whole_run == reference_recorder.events
        assert resumed_after.events == reference_after.events  # its hook after the raiser's ran once, on resume
        assert resumed.metrics == reference.metrics
    elif expected == "discard the batch":
        batch = failed_at[-1]  # the recorder runs before the raiser, so it saw the half-done batch
        assert f"batch {batch.batch_index + 1} was discarded half-done" in said  # messages count from 1
        half_done = 0
        while half_done < len(failed_at) and failed_at[-1 - half_done][1:4] == batch[1:4]:
            half_done += 1
        assert whole_run[: len(failed_at) - half_done] + whole_run[len(failed_at) :] == reference_recorder.events
        assert resumed.metrics == reference.metrics
    else:
        assert f"after batch {failed_at[-1].batch_index + 1}, which had done its work and counts as done" in said
        missed = said.split("did not run for it")[0].rsplit(", and ", 1)[-1] if "did not run" in said else ""
        skipped = missed.count("SavedRecorder.")  # the recorder's hooks after the raiser's, in the reference
        assert (
            whole_run
            == reference_recorder.events[: len(failed_at)] + reference_recorder.events[len(failed_at) + skipped :]
        )
        if "SmoothedLoss" not in missed:
            assert resumed.metrics == reference.metrics


def test_a_batch_whose_gradient_is_mixed_into_a_window_cannot_be_saved(device: torch.device, tmp_path: Path) -> None:
    raiser = raiser_class("on_enter_step")((1, "train", 2))  # batch 3 closes the window batch 2 opened
    trainer = build(device, 2, [raiser])
    with pytest.raises(RuntimeError, match="raised in on_enter_step"):
        trainer.fit()
    with pytest.raises(RuntimeError, match="no consistent checkpoint.*accumulation window that started at batch 3"):
        trainer.save_checkpoint(tmp_path / "after_error.safetensors")
    assert not list(tmp_path.iterdir())


class InterruptedLoss:
    """A loss that delivers a real SIGINT (Ctrl-C) from inside the forward pass at its ``at``-th call."""

    def __init__(self, at: int) -> None:
        self.at, self.calls, self.loss = at, 0, nn.MSELoss()

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.at:
            signal.raise_signal(signal.SIGINT)  # stop_signals=(): Python's handler raises KeyboardInterrupt here
        return self.loss(output, target)


def test_ctrl_c_in_the_forward_pass_then_save_holds_the_last_batch_boundary(
    device: torch.device, tmp_path: Path, capsys: pytest.CaptureFixture[str], python_sigint_handler: None
) -> None:  # fmt: skip
    reference = build(device, 1, []).fit()
    trainer = build(device, 1, [])
    trainer.loss_fn = InterruptedLoss(at=12)  # 9 batches an epoch: epoch 1, train batch 2
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert (trainer.state, trainer.batch_index) == ("batch", 2)
    path = trainer.save_checkpoint(tmp_path / "interrupted.safetensors")
    assert "epoch 2, phase 'train' after batch 2: batch 3 was discarded half-done (the forward pass raised)" in (
        capsys.readouterr().err
    )
    resumed = build(device, 1, [])
    resumed.load_checkpoint(path)
    assert (resumed.state, resumed.epoch, resumed.batch_index) == ("phase", 1, 1)
    assert_same_training(resumed.fit(), reference)


def test_a_transition_saved_half_done_is_refused_by_a_trainer_with_other_callbacks(
    device: torch.device, tmp_path: Path
) -> None:  # fmt: skip
    raiser_type = raiser_class("on_exit_epoch")
    trainer = build(device, 1, [SavedRecorder(), raiser_type((1, None, -1))])
    with pytest.raises(RuntimeError, match="raised in on_exit_epoch"):
        trainer.fit()
    path = trainer.save_checkpoint(tmp_path / "after_error.safetensors")
    reordered = build(device, 1, [raiser_type((1, None, -1), armed=False), SavedRecorder()])
    before = {name: tensor.clone() for name, tensor in reordered.model.state_dict().items()}
    with pytest.raises(
        st.CheckpointError, match="where raiser.on_exit_epoch raised.*same callbacks, in the same order"
    ):
        reordered.load_checkpoint(path)
    assert reordered.state == "idle" and reordered.position == Position()
    assert all(torch.equal(tensor, before[name]) for name, tensor in reordered.model.state_dict().items())
