"""validate() and predict(): one-off runs of the evaluation phases and of a loader, on the same machine of states.

Must show: validate()'s metrics equal the same phase's inside fit(), and a run that validates between epochs goes on
exactly as one that does not; predict()'s outputs equal a plain ``model(x)`` loop, in order; run_until and a
Breakpoint work inside both. (predict() under torchrun: tests/test_distributed.py.)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import statetrainer as st
from statetrainer import callbacks as cb

from .checkpoint.test_trainer_checkpoints import assert_same_weights

FEATURES = torch.randn(60, 5, generator=torch.Generator().manual_seed(0))
LABELS = FEATURES[:, :3].argmax(dim=1)


def classifier(device: torch.device, callbacks: tuple[st.Callback, ...] = (), epochs: int = 3) -> st.Trainer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    train = DataLoader(TensorDataset(FEATURES[:40], LABELS[:40]), batch_size=8, shuffle=True)
    valid = DataLoader(TensorDataset(FEATURES[40:], LABELS[40:]), batch_size=6)
    phases = [st.Phase("train", train, batches=3), st.Phase("valid", valid, grad=False)]
    return st.Trainer(model, torch.optim.Adam(model.parameters(), lr=0.01), F.cross_entropy, phases,
                      callbacks=[cb.SmoothedLoss(), cb.Accuracy(), *callbacks], epochs=epochs, device=device, seed=3)  # fmt: skip


def test_validate_gives_the_metrics_the_phase_has_inside_fit_and_changes_nothing(device):
    trainer = classifier(device).fit()
    inside = {name: value for name, value in trainer.metrics.items() if name.startswith("valid_")}
    assert set(inside) == {"valid_loss", "valid_accuracy"}
    state, epoch, step = trainer.state, trainer.epoch, trainer.global_step
    assert trainer.validate() == inside
    assert trainer.validate("valid") == inside
    assert (trainer.state, trainer.epoch, trainer.global_step) == (state, epoch, step)
    assert trainer.model.training is False  # as the run left it, after its evaluation phase


def test_a_run_that_validates_between_epochs_goes_on_exactly_as_one_that_does_not(device):
    plain = classifier(device).fit()
    validated = classifier(device)
    validated.validate()  # before it starts
    validated.run_until("epoch", epoch=1)
    middle = validated.validate()
    assert middle["valid_loss"] == validated.metrics["valid_loss"]
    validated.run_until("epoch", epoch=2)
    validated.validate()
    validated.fit()
    assert_same_weights(plain, validated)
    assert plain.metrics == validated.metrics


def test_validate_runs_no_epoch_hooks_so_nothing_is_checkpointed_or_logged_per_epoch(tmp_path, device):
    folder = tmp_path / "run"
    trainer = classifier(device, (cb.Checkpoint(folder, every_epochs=1), cb.CSVLogger(folder / "log.csv")))
    trainer.validate()
    log = folder / "log.csv"
    assert not list(folder.glob("*.safetensors")) and (not log.exists() or len(log.read_text().splitlines()) <= 1)
    trainer.fit()
    assert len(log.read_text().splitlines()) == 1 + 3  # a header and a row an epoch
    assert len(list(folder.glob("ckpt-*.safetensors"))) == 3


def test_predict_gives_a_plain_model_loops_outputs_in_order(device):
    trainer = classifier(device).fit()
    loader = DataLoader(TensorDataset(FEATURES), batch_size=7)
    predicted = trainer.predict(loader, inputs=lambda batch: batch[0])
    trainer.model.eval()
    with torch.no_grad():
        expected = [trainer.model(batch.to(device)) for (batch,) in loader]
    assert len(predicted) == len(expected) == 9
    for got, wanted in zip(predicted, expected, strict=True):
        assert torch.equal(got, wanted)
    batches = [FEATURES[index : index + 10] for index in range(0, 60, 10)]  # a list of inputs, as they are
    assert torch.equal(torch.cat(trainer.predict(batches)), torch.cat(expected))


BROKE: list[dict[str, Any]] = []


def record_break() -> None:
    """A ``PYTHONBREAKPOINT`` hook: where the trainer stood when the debugger came up."""
    trainer = sys._getframe(1).f_locals["trainer"]
    BROKE.append({"phase": trainer.phase.name, "batch": trainer.batch_index, "output": trainer.output})


def test_run_until_and_a_breakpoint_stop_inside_validate_and_predict(tmp_path, device, monkeypatch):
    trainer = classifier(device).fit()
    with trainer.validation() as evaluation:
        assert evaluation.run_until("batch", batch=2) == "batch"
        assert (trainer.state, trainer.phase.name, trainer.batch_index) == ("batch", "valid", 2)
        assert trainer.output.shape == (6, 3)
        with pytest.raises(RuntimeError, match="during validate"):
            trainer.save_checkpoint(tmp_path / "never.safetensors")
        metrics = evaluation.fit()
    assert metrics == trainer.validate()
    assert trainer.state == "idle" and trainer.finished
    monkeypatch.setenv("PYTHONBREAKPOINT", f"{__name__}.record_break")
    BROKE.clear()
    stop = cb.Breakpoint("batch", enter=False, when=lambda trainer: trainer.batch_index == 1)
    outputs = trainer.predict([FEATURES[:4], FEATURES[4:8], FEATURES[8:12]], callbacks=[stop])
    assert [(seen["phase"], seen["batch"]) for seen in BROKE] == [("predict", 1)]
    assert torch.equal(BROKE[0]["output"], outputs[1])


def test_evaluation_is_refused_where_it_cannot_run(device):
    trainer = classifier(device)
    with pytest.raises(ValueError, match="'train' is not an evaluation phase"):
        trainer.validate("train")
    trainer.run_until("batch", batch=1)
    with pytest.raises(RuntimeError, match="between epochs or phases"):
        trainer.validate()

    class ValidatesInside(st.Callback):
        def on_exit_batch(self, trainer):
            trainer.validate()

    inside = classifier(device, (ValidatesInside(),))
    with pytest.raises(RuntimeError, match="called from a callback"):
        inside.fit()
    with pytest.raises(TypeError, match="inputs must take"):
        classifier(device).predict([FEATURES], inputs="x")


def stateful_valid_trainer(device: torch.device, folder: Path | None = None) -> st.Trainer:
    """The classifier with a validation phase read by a torchdata StatefulDataLoader, which keeps its own position."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    train = DataLoader(TensorDataset(FEATURES[:40], LABELS[:40]), batch_size=8, shuffle=True)
    valid = StatefulDataLoader(TensorDataset(FEATURES[40:], LABELS[40:]), batch_size=6, shuffle=True)
    callbacks: list[st.Callback] = [cb.SmoothedLoss(), cb.EarlyStopping("valid_loss", patience=2)]
    if folder is not None:
        callbacks.append(cb.Checkpoint(folder, every_steps=2))
    phases = [st.Phase("train", train), st.Phase("valid", valid, grad=False)]
    return st.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), F.cross_entropy, phases,
                      callbacks=callbacks, epochs=4, device=device, seed=3)  # fmt: skip


def test_validate_puts_back_what_it_moved_so_the_run_and_its_resume_are_as_without_it(tmp_path, device):
    """A validation loader that keeps its own position, EarlyStopping on a plateau (lr=0), dropout drawing from the
    generators: validate() between epochs, and even between the last phase and the epoch's end, changes none of
    them, nor trainer.metrics, and a checkpoint taken after it resumes exactly."""
    plain = stateful_valid_trainer(device).fit()
    validated = stateful_valid_trainer(device, tmp_path / "run")
    validated.run_until("epoch", when=lambda trainer: trainer.position.phase_index == 1)  # before epoch 0 ends
    stopper = next(callback for callback in validated.callbacks if isinstance(callback, cb.EarlyStopping))
    before = (stopper.state_dict(), dict(validated.metrics), torch.get_rng_state())
    result = validated.validate()
    assert set(result) == {"valid_loss"}
    assert stopper.state_dict() == before[0] and validated.metrics == before[1]
    assert torch.equal(torch.get_rng_state(), before[2])
    validated.run_until("epoch", epoch=1)  # the start of epoch 1: its validation pass is the next to open
    validated.validate()
    validated.run_until("phase", epoch=1, phase="train", batch=3)
    path = validated.save_checkpoint(tmp_path / "mid.safetensors")
    validated.fit()
    resumed = stateful_valid_trainer(device)
    resumed.load_checkpoint(path)
    resumed.fit()
    for run in (validated, resumed):
        assert run.metrics == plain.metrics and run.epoch == plain.epoch  # EarlyStopping stopped them alike
        assert_same_weights(plain, run)


def test_an_evaluation_is_stepped_only_inside_its_with_block_and_one_at_a_time(device):
    trainer = classifier(device)
    evaluation = trainer.validation()
    with pytest.raises(RuntimeError, match="inside its with block"):
        evaluation.fit()
    with trainer.validation() as outer:
        with pytest.raises(RuntimeError, match="an evaluation is open already"):
            trainer.validate()
        with pytest.raises(RuntimeError, match="leave the evaluation first"):
            trainer.load_state_dict({})
        assert set(outer.fit()) == {"valid_loss", "valid_accuracy"}
    assert trainer.state == "idle" and trainer.global_step == 0


def test_predict_reads_an_iterator_once(device):
    trainer = classifier(device)
    expected = trainer.predict([FEATURES[:10], FEATURES[10:20]])
    outputs = trainer.predict(iter([FEATURES[:10], FEATURES[10:20]]))
    assert all(torch.equal(got, wanted) for got, wanted in zip(outputs, expected, strict=True))


def test_a_stream_evaluation_phase_validates_the_batches_its_next_epoch_reads_and_stays_where_it_was(device):
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    valid = [(FEATURES[start : start + 4], LABELS[start : start + 4]) for start in range(40, 60, 4)]  # 5 batches
    phases = [st.Phase("train", [(FEATURES[:8], LABELS[:8])]), st.Phase("valid", valid, grad=False, batches=2)]
    trainer = st.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), F.cross_entropy, phases,
                         callbacks=[cb.SmoothedLoss()], epochs=3, device=device)  # fmt: skip
    trainer.run_until("epoch", epoch=1)
    stream = trainer.parts["data"].streams[1]
    where = stream.state_dict()
    ahead = trainer.validate()["valid_loss"]  # the stream's batches 3 and 4 (epoch 0 read 1 and 2)
    assert stream.state_dict() == where
    trainer.run_until("epoch", epoch=1, when=lambda trainer: trainer.position.phase_index == 1)
    assert trainer.metrics["valid_loss"] == ahead
    assert stream.state_dict() == {"pass": 0, "batches": 4, "samples": None}


def test_an_evaluation_that_cannot_start_or_stops_early_leaves_the_training_run_as_it_was(device):
    class StateFails(st.Callback):
        failing = True

        def state_dict(self):
            if StateFails.failing:
                raise RuntimeError("no state now")
            return {}

    trainer = classifier(device, (StateFails(),))
    with pytest.raises(RuntimeError, match="no state now"):
        trainer.validate()
    StateFails.failing = False
    assert trainer.state == "idle" and trainer.total_steps == 9  # the training run, shown again
    trainer.run_until("epoch", epoch=1)

    class StopsAtOnce(st.Callback):
        def on_exit_batch(self, trainer):
            trainer.stop()

    stopping = classifier(device, (StopsAtOnce(),))
    stopping.run_until("epoch", epoch=0)
    with pytest.warns(UserWarning, match="stopped .* before its end"):
        stopping.validate()
    assert not stopping.position.stop_requested


def test_inside_an_evaluation_the_trainer_shows_the_training_runs_shape_and_refuses_a_checkpoint(device):
    trainer = classifier(device)
    trainer.run_until("epoch", epoch=1)
    with trainer.validation() as evaluation:
        evaluation.run_until("batch", batch=0)
        assert (trainer.total_steps, trainer.steps_per_epoch, trainer.global_step) == (9, 3, 3)
        assert not trainer.can_checkpoint_here() and "evaluation" in trainer.why_not_checkpoint_here()
        with pytest.raises(ValueError, match="step=4 never comes"):
            evaluation.run_until(step=4)


def test_predict_puts_back_the_metrics_its_callbacks_publish(device):
    class Publishes(st.Callback):
        def on_exit_phase(self, trainer):
            trainer.metrics["predict_batches"] = trainer.batch_index + 1

    trainer = classifier(device).fit()
    before = dict(trainer.metrics)
    trainer.predict([FEATURES[:10], FEATURES[10:20]], callbacks=[Publishes()])
    assert trainer.metrics == before
