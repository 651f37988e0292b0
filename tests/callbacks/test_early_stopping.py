"""EarlyStopping stops at the right epoch."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import statetrainer as st
from statetrainer.callbacks import Accuracy, EarlyStopping, SmoothedLoss
from statetrainer.testing import EventRecorder

from ..conftest import regression_batches


class Scripted(st.Callback):
    """Publishes a scripted valid_loss, one value per epoch."""

    def __init__(self, values):
        self.values = values

    def metric_names(self, phases):
        return {"valid_loss"}

    def on_exit_phase(self, trainer):
        if trainer.phase.name == "valid":
            trainer.metrics["valid_loss"] = self.values[trainer.epoch]


def run(values, device: torch.device, **options):
    stopper = EarlyStopping(**options)
    recorder = EventRecorder()
    model = nn.Linear(3, 1)
    trainer = st.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), F.mse_loss,
                         [st.Phase("train", regression_batches(2)), st.Phase("valid", regression_batches(1), grad=False)],
                         callbacks=[Scripted(values), stopper, recorder], epochs=len(values), device=device)  # fmt: skip
    trainer.fit()
    return trainer, stopper, recorder


def test_stops_after_patience_checks_without_improvement(device: torch.device):
    trainer, stopper, recorder = run([1.0, 0.8, 0.85, 0.9, 0.7, 0.6], device, patience=2)
    assert stopper.stopped_epoch == 3 and stopper.best == 0.8  # epochs 2 and 3 (from 0) did not improve
    assert [e.epoch for e in recorder.events if e.hook == "enter epoch"] == [0, 1, 2, 3]  # no extra epoch
    assert recorder.hooks[-3:] == ["exit phase", "exit epoch", "enter idle"]


def test_min_delta_and_max_mode(device: torch.device):
    _, stopper, _ = run([1.0, 0.99, 0.98, 0.5], device, patience=2, min_delta=0.05)
    assert stopper.stopped_epoch == 2
    _, stopper, _ = run([0.1, 0.2, 0.2, 0.3], device, mode="max", patience=1, monitor="valid_loss")
    assert stopper.stopped_epoch == 2


def test_runs_to_the_end_while_improving(device: torch.device):
    trainer, stopper, _ = run([3.0, 2.0, 1.0], device, patience=1)
    assert stopper.stopped_epoch is None and trainer.epoch == 2


def test_a_missing_metric_or_a_wrong_order_is_a_clear_error(device: torch.device):
    with pytest.raises(ValueError, match="monitors 'valid_accuracy', which no callback produces"):
        run([1.0], device, monitor="valid_accuracy")
    model = nn.Linear(3, 1)
    trainer = st.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), F.mse_loss,
                         [st.Phase("train", regression_batches(2))],
                         callbacks=[EarlyStopping(monitor="train_loss"), SmoothedLoss()], device=device)  # fmt: skip
    with pytest.raises(ValueError, match="list EarlyStopping after its metric"):
        trainer.fit()
    with pytest.raises(ValueError, match="mode"):
        EarlyStopping(mode="lowest")
    with pytest.raises(TypeError, match="monitor is the name of a trainer.metrics entry.*not None"):
        EarlyStopping(monitor=None)


class RecordEpochs(st.Callback):
    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []

    def on_exit_epoch(self, trainer: st.Trainer) -> None:
        self.metrics.append(dict(trainer.metrics))


def two_valid_phases(device: torch.device, stopper: EarlyStopping, epochs: int = 3, extra=()) -> st.Trainer:
    model = nn.Linear(3, 1)
    phases = [st.Phase("train", regression_batches(2)), st.Phase("valid", regression_batches(1), grad=False),
              st.Phase("valid_hard", regression_batches(1, seed=5), grad=False)]  # fmt: skip
    return st.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), F.mse_loss, phases,
                      callbacks=[SmoothedLoss(), stopper, *extra], epochs=epochs, device=device)  # fmt: skip


def test_a_phase_whose_name_prefixes_another_is_told_apart(device: torch.device):
    stopper, record = EarlyStopping(monitor="valid_hard_loss", patience=5), RecordEpochs()
    two_valid_phases(device, stopper, extra=[record]).fit()
    hard = [epoch["valid_hard_loss"] for epoch in record.metrics]
    assert len(hard) == 3 and stopper.best == min(hard)
    assert stopper.best not in [epoch["valid_loss"] for epoch in record.metrics]


def test_a_monitor_no_callback_produces_is_refused_when_the_trainer_is_built(device: torch.device):
    with pytest.raises(
        ValueError,
        match=r"EarlyStopping monitors 'val_loss', which no callback produces for the "
        r"phases train, valid, valid_hard; did you mean 'valid_loss'\? The callbacks "
        r"produce train_loss, valid_hard_loss, valid_loss\..*metric_names\(phases\)",
    ):
        two_valid_phases(device, EarlyStopping(monitor="val_loss"))


def test_a_monitor_is_checked_against_the_phases_each_metric_measures(device: torch.device):
    def build(*callbacks):
        model = nn.Linear(3, 1)
        return st.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), F.mse_loss,
                          [st.Phase("train", regression_batches(2)), st.Phase("valid", regression_batches(1), grad=False)],
                          callbacks=callbacks, device=device)  # fmt: skip

    build(Accuracy(), EarlyStopping("valid_accuracy", mode="max"))
    with pytest.raises(ValueError, match="monitors 'valid_accuracy'.*produce train_accuracy\\."):
        build(Accuracy(phases=["train"]), EarlyStopping("valid_accuracy", mode="max"))
    with pytest.raises(ValueError, match="monitors 'test_loss'.*for the phases train, valid\\."):
        build(SmoothedLoss(), EarlyStopping("test_loss"))


class Undeclared(st.Callback):
    """Writes a metric without declaring it."""

    def on_exit_phase(self, trainer):
        trainer.metrics["valid_score"] = 1.0


class Unknowable(Undeclared):
    """Writes metrics whose names it cannot tell ahead."""

    def metric_names(self, phases):
        return None


def test_a_callback_that_writes_metrics_declares_them_or_turns_the_check_off(device: torch.device):
    with pytest.raises(ValueError, match="monitors 'valid_score'.*overriding metric_names"):
        two_valid_phases(device, EarlyStopping(monitor="valid_score"), extra=[Undeclared()])
    trainer = two_valid_phases(device, EarlyStopping(monitor="val_loss"), extra=[Unknowable()])
    with pytest.raises(KeyError, match="monitors 'val_loss', which nothing produced.*valid_loss"):
        trainer.fit()  # unchecked when built: the name is missing at the end of the first epoch
    assert trainer.epoch == 0


class NamesAsText(st.Callback):
    def metric_names(self, phases):
        return "valid_loss"  # a string, not a set of names


def test_metric_names_that_are_not_a_set_of_names_are_a_type_error(device: torch.device):
    with pytest.raises(TypeError, match=r"callback NamesAsText: metric_names\(\) must return a set of metric names"):
        two_valid_phases(device, EarlyStopping(), extra=[NamesAsText()])


def test_a_check_is_not_repeated_after_a_resume_between_the_phase_and_the_epochs_end(tmp_path, device: torch.device):
    first = two_valid_phases(device, EarlyStopping(monitor="valid_loss", patience=5))
    while not (first.state == "epoch" and first.phase is not None and first.phase.name == "valid_hard"):
        first.advance()
    path = first.save_checkpoint(tmp_path)
    stopper = EarlyStopping(monitor="valid_loss", patience=5)
    second = two_valid_phases(device, stopper)
    second.load_checkpoint(path)
    assert stopper.checked_this_epoch
    second.advance()  # exit epoch: the check of this epoch already happened
    assert stopper.bad_checks == 0
