"""The trainer driving the machine: event order, stepping, accumulation, stop and bad input."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import statetrainer as st
from statetrainer.testing import EventRecorder

from .conftest import regression_batches

TRAIN_BATCH = ["enter batch", "enter backward", "exit backward", "enter step", "exit step", "exit batch"]
ACCUMULATING_BATCH = ["enter batch", "enter backward", "exit backward", "exit batch"]
EVAL_BATCH = ["enter batch", "exit batch"]


def linear_trainer(
    device: torch.device, train_batches=2, valid_batches=1, seed=0, **options
) -> tuple[st.Trainer, EventRecorder]:
    """A linear regression trainer on ``device`` with an EventRecorder, unless ``callbacks`` are given."""
    torch.manual_seed(seed)
    model = nn.Linear(3, 1)
    recorder = EventRecorder()
    phases = [st.Phase("train", regression_batches(train_batches, seed=seed))]
    if valid_batches:
        phases.append(st.Phase("valid", regression_batches(valid_batches, seed=seed + 1), grad=False))
    options.setdefault("callbacks", [recorder])
    trainer = st.Trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), F.mse_loss, phases, device=device, **options
    )
    return trainer, recorder


def test_event_sequence_with_accumulation_matches_the_specification(device: torch.device):
    trainer, recorder = linear_trainer(device, train_batches=2, valid_batches=1, accumulate=2, epochs=1)
    trainer.fit()
    assert recorder.hooks == [
        "exit idle", "enter epoch",
        "enter phase",
        "enter batch", "enter backward", "exit backward", "exit batch",
        "enter batch", "enter backward", "exit backward", "enter step", "exit step", "exit batch",
        "exit phase",
        "enter phase",
        "enter batch", "exit batch",
        "exit phase",
        "exit epoch", "enter idle",
    ]  # fmt: skip
    assert trainer.global_step == 1
    assert trainer.state == "idle" and trainer.finished


def test_event_sequence_over_three_epochs_and_two_phases(device: torch.device):
    trainer, recorder = linear_trainer(device, train_batches=2, valid_batches=1, epochs=3)
    trainer.fit()
    epoch = ["enter phase", *TRAIN_BATCH, *TRAIN_BATCH, "exit phase", "enter phase", *EVAL_BATCH, "exit phase"]
    expected = ["exit idle", "enter epoch", *epoch, "exit epoch", "enter epoch", *epoch, "exit epoch", "enter epoch",
                *epoch, "exit epoch", "enter idle"]  # fmt: skip
    assert recorder.hooks == expected
    assert trainer.global_step == 6
    # counters as the callbacks saw them
    batches = [(e.epoch, e.phase, e.batch_index, e.global_step) for e in recorder.events if e.hook == "exit batch"]
    assert batches == [
        (0, "train", 0, 1), (0, "train", 1, 2), (0, "valid", 0, 2),
        (1, "train", 0, 3), (1, "train", 1, 4), (1, "valid", 0, 4),
        (2, "train", 0, 5), (2, "train", 1, 6), (2, "valid", 0, 6),
    ]  # fmt: skip
    assert [e.epoch for e in recorder.events if e.hook == "exit epoch"] == [0, 1, 2]


def test_the_step_state_sees_the_step_it_is_about_to_take(device: torch.device):
    trainer, recorder = linear_trainer(device, train_batches=3, valid_batches=0)
    trainer.fit()
    assert [e.global_step for e in recorder.events if e.hook == "enter step"] == [0, 1, 2]
    assert [e.global_step for e in recorder.events if e.hook == "exit step"] == [1, 2, 3]


def test_run_until_backward_exposes_loss_and_gradients(device: torch.device):
    trainer, _ = linear_trainer(device)
    assert trainer.run_until("batch") == "batch"
    assert trainer.loss is not None and trainer.model.weight.grad is None  # forward done, backward not yet
    assert trainer.run_until("backward") == "backward"
    inputs, target = trainer.batch
    reference = copy.deepcopy(trainer.model)
    F.mse_loss(reference(inputs), target).backward()
    torch.testing.assert_close(trainer.loss, F.mse_loss(reference(inputs), target))
    assert torch.equal(trainer.model.weight.grad, reference.weight.grad)
    assert trainer.run_until("step") == "step"
    assert trainer.model.weight.grad is None  # the step zeroes the gradients
    assert "state='step'" in repr(trainer) and "phase='train'" in repr(trainer)


def test_stepping_with_advance_equals_fit(device: torch.device):
    fitted, _ = linear_trainer(device, train_batches=5, valid_batches=2, epochs=2, accumulate=2)
    fitted.fit()
    stepped, recorder = linear_trainer(device, train_batches=5, valid_batches=2, epochs=2, accumulate=2)
    states = [stepped.advance()]
    while not stepped.finished:
        states.append(stepped.advance())
    assert states[0] == "epoch" and states[-1] == "idle"
    assert states.count("step") == 6 and states.count("batch") == 14  # one advance per transition
    assert fitted.model.weight.device.type == device.type and fitted.batch[0].device.type == device.type
    for name, value in fitted.model.state_dict().items():
        assert torch.equal(value, stepped.model.state_dict()[name]), name
    assert fitted.global_step == stepped.global_step == 6


def test_fit_continues_a_stepped_run(device: torch.device):
    whole, _ = linear_trainer(device, train_batches=4, epochs=2)
    whole.fit()
    stepped, recorder = linear_trainer(device, train_batches=4, epochs=2)
    stepped.run_until("backward")
    stepped.advance()
    stepped.fit()
    assert stepped.finished and recorder.hooks[-1] == "enter idle"
    assert torch.equal(whole.model.weight, stepped.model.weight)


def test_history_records_recent_transitions(device: torch.device):
    trainer, _ = linear_trainer(device)
    trainer.run_until("step")
    assert [str(move) for move in trainer.history] == [
        "start_epoch: idle -> epoch",
        "start_phase: epoch -> phase",
        "start_batch: phase -> batch",
        "backward: batch -> backward",
        "step: backward -> step",
    ]


def gradients_of(batches, accumulate: int, device: torch.device) -> list[torch.Tensor]:
    """The gradient of ``nn.Linear(3, 1)`` seen by each optimizer step."""
    seen: list[torch.Tensor] = []

    class GradientProbe(st.Callback):
        def on_enter_step(self, trainer):
            seen.append(trainer.model.weight.grad.clone())

    torch.manual_seed(0)
    model = nn.Linear(3, 1)  # lr=0 keeps the weights, so every gradient is taken at the same point
    trainer = st.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), F.mse_loss,
                         [st.Phase("train", batches)], callbacks=[GradientProbe()], accumulate=accumulate,
                         device=device)  # fmt: skip
    trainer.fit()
    assert trainer.global_step == len(seen)
    return seen


def large_batch_gradient(inputs: torch.Tensor, target: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The gradient of ``gradients_of``'s starting model over one batch, computed on ``device``."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1).to(device)
    F.mse_loss(model(inputs.to(device)), target.to(device)).backward()
    return model.weight.grad


def test_accumulated_gradient_equals_the_large_batch_gradient(device: torch.device):
    batches = regression_batches(4, size=8)
    (accumulated,) = gradients_of(batches, accumulate=4, device=device)
    inputs = torch.cat([x for x, _ in batches])
    target = torch.cat([y for _, y in batches])
    torch.testing.assert_close(accumulated, large_batch_gradient(inputs, target, device))


def test_ragged_last_window_steps_with_its_own_mean(device: torch.device):
    batches = regression_batches(5, size=8)
    grads = gradients_of(batches, accumulate=2, device=device)
    assert len(grads) == 3  # windows of 2, 2 and 1: the last batch steps
    torch.testing.assert_close(grads[-1], large_batch_gradient(*batches[-1], device))
    inputs = torch.cat([x for x, _ in batches[2:4]])
    target = torch.cat([y for _, y in batches[2:4]])
    torch.testing.assert_close(grads[1], large_batch_gradient(inputs, target, device))


class UnsizedLoader:
    """A re-iterable without a length, as a streaming dataset would be."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        yield from self.batches


def test_a_loader_without_length_still_steps_on_its_last_batch(device: torch.device):
    batches = regression_batches(5, size=8)
    grads = gradients_of(UnsizedLoader(batches), accumulate=2, device=device)
    assert len(grads) == 3
    torch.testing.assert_close(grads[-1], large_batch_gradient(*batches[-1], device))


class StopAt(st.Callback):
    def __init__(self, epoch: int, batch_index: int):
        self.epoch, self.batch_index = epoch, batch_index

    def on_exit_batch(self, trainer):
        if (trainer.epoch, trainer.batch_index) == (self.epoch, self.batch_index):
            trainer.stop()


def test_stop_ends_cleanly_at_the_next_batch_boundary(device: torch.device):
    recorder = EventRecorder()
    trainer, _ = linear_trainer(device, train_batches=4, valid_batches=1, epochs=3, callbacks=[StopAt(1, 1), recorder])
    trainer.fit()
    assert trainer.state == "idle" and trainer.finished
    assert recorder.hooks[-5:] == ["exit step", "exit batch", "exit phase", "exit epoch", "enter idle"]
    assert recorder.events[-1].epoch == 1 and trainer.global_step == 6  # 4 + 2 steps, no valid phase in epoch 1
    assert sum(1 for e in recorder.events if e.hook == "enter phase") == 3
    with pytest.warns(UserWarning, match="already finished .*stopped"):
        trainer.fit()
    with pytest.raises(RuntimeError, match="finished .*stopped"):
        trainer.advance()


def test_advance_after_the_end_is_an_error(device: torch.device):
    trainer, _ = linear_trainer(device)
    trainer.fit()
    with pytest.raises(RuntimeError, match="the run has finished"):
        trainer.advance()


def test_run_until_refuses_unknown_and_unreachable_states(device: torch.device):
    trainer, _ = linear_trainer(device)
    with pytest.raises(ValueError, match="unknown state 'bakward'.*idle, epoch, phase, batch, backward, step"):
        trainer.run_until("bakward")
    model = nn.Linear(3, 1)
    evaluator = st.Trainer(
        model, None, F.mse_loss, [st.Phase("valid", regression_batches(2), grad=False)], device=device
    )
    with pytest.raises(ValueError, match="never enters 'step'"):
        evaluator.run_until("step")
    assert evaluator.state == "idle" and not evaluator.finished


def test_run_until_raises_when_the_run_ends_first(device: torch.device):
    trainer, _ = linear_trainer(device, train_batches=1, valid_batches=1, epochs=1)
    trainer.run_until("step")
    trainer.advance()
    with pytest.raises(RuntimeError, match="finished before entering 'backward'"):
        trainer.run_until("backward")


def test_empty_loaders_are_refused(device: torch.device):
    with pytest.raises(ValueError, match="phase 'train': loader is empty"):
        st.Phase("train", [])
    trainer = st.Trainer(nn.Linear(3, 1), None, F.mse_loss, [st.Phase("valid", UnsizedLoader([]), grad=False)],
                         device=device)  # fmt: skip
    with pytest.raises(ValueError, match="phase 'valid': its loader yielded no batches"):
        trainer.fit()


def test_bad_arguments_get_clear_errors():
    model = nn.Linear(3, 1)
    batches = regression_batches(2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="phase 'train' has grad=True .* no optimizer"):
        st.Trainer(model, None, F.mse_loss, [st.Phase("train", batches)])
    with pytest.raises(TypeError, match="iterator"):
        st.Phase("train", iter(batches))
    with pytest.raises(ValueError, match="phases is empty"):
        st.Trainer(model, optimizer, F.mse_loss, [])
    with pytest.raises(ValueError, match="phase names must be unique"):
        st.Trainer(model, optimizer, F.mse_loss, [st.Phase("train", batches), st.Phase("train", batches)])
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        st.Trainer(model, optimizer, F.mse_loss, [st.Phase("train", batches)], epochs=0)
    with pytest.raises(ValueError, match="accumulate must be a positive integer"):
        st.Trainer(model, optimizer, F.mse_loss, [st.Phase("train", batches)], accumulate=1.5)
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        st.Trainer(model, optimizer, F.mse_loss, [st.Phase("train", batches)], precision="fp8")
    with pytest.raises(ValueError, match="grad_clip"):
        st.Trainer(model, optimizer, F.mse_loss, [st.Phase("train", batches)], grad_clip=0)
    with pytest.raises(ValueError, match="callback names must be unique.*'EventRecorder'"):
        st.Trainer(model, optimizer, F.mse_loss, [st.Phase("train", batches)],
                   callbacks=[EventRecorder(), EventRecorder()])  # fmt: skip
    with pytest.raises(ValueError, match="phase name"):
        st.Phase("train loss", batches)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            st.Trainer(model, optimizer, F.mse_loss, [st.Phase("train", batches)], device="cuda")


def test_a_batch_that_is_not_a_pair_names_the_unpack_hook(device: torch.device):
    trainer = st.Trainer(nn.Linear(3, 1), None, F.mse_loss, [st.Phase("valid", [torch.ones(3, 3)], grad=False)],
                         device=device)  # fmt: skip
    with pytest.raises(TypeError, match="unpack="):
        trainer.fit()


def test_a_dict_batch_without_unpack_names_its_keys_before_the_model_runs(device: torch.device):
    batches = [{"x": x, "y": y} for x, y in regression_batches(2)]
    trainer = st.Trainer(nn.Linear(3, 1), None, F.mse_loss, [st.Phase("valid", batches, grad=False)], device=device)
    with pytest.raises(TypeError, match="keys 'x', 'y'.*unpack=lambda batch"):
        trainer.fit()


def test_unpack_supports_other_batch_shapes(device: torch.device):
    batches = [{"x": x, "y": y} for x, y in regression_batches(3)]
    model = nn.Linear(3, 1)
    trainer = st.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.mse_loss,
                         [st.Phase("train", batches)], unpack=lambda batch: (batch["x"], batch["y"]), device=device)  # fmt: skip
    trainer.fit()
    assert trainer.global_step == 3 and trainer.target.device.type == device.type
    assert torch.equal(trainer.target.cpu(), batches[-1]["y"])


def test_callbacks_cannot_drive_the_machine(device: torch.device):
    class Recursive(st.Callback):
        def on_enter_batch(self, trainer):
            trainer.advance()

    trainer, _ = linear_trainer(device, callbacks=[Recursive()])
    with pytest.raises(RuntimeError, match="callbacks must not call"):
        trainer.fit()
    with pytest.raises(RuntimeError, match="cannot continue"):
        trainer.advance()


def test_hooks_nobody_overrides_are_not_dispatched(device: torch.device):
    class OnlyBatches(st.Callback):
        calls = 0

        def on_enter_batch(self, trainer):
            OnlyBatches.calls += 1

    trainer, _ = linear_trainer(device, callbacks=[OnlyBatches()])
    for event in trainer._core.machine.events.values():
        for move in event.by_source.values():
            names = [getattr(call, "__name__", "") for call in move.exit_calls + move.enter_calls]
            assert names.count("on_enter_batch") == (move.dest == "batch")
            assert not [name for name in names if name.startswith("on_") and name != "on_enter_batch"]
    trainer.fit()
    assert OnlyBatches.calls == 3


def test_grad_clip_bounds_the_update(device: torch.device):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    before = [p.detach().clone() for p in model.parameters()]
    batches = [(torch.full((4, 3), 100.0), torch.zeros(4, 1))]  # a huge gradient
    trainer = st.Trainer(model, torch.optim.SGD(model.parameters(), lr=1.0), F.mse_loss,
                         [st.Phase("train", batches)], grad_clip=0.5, device=device)  # fmt: skip
    trainer.fit()
    update = torch.cat([(p.detach().cpu() - b).flatten() for p, b in zip(model.parameters(), before, strict=True)])
    torch.testing.assert_close(update.norm(), torch.tensor(0.5))


def test_phases_set_train_and_eval_mode_and_grad_mode(device: torch.device):
    seen = []

    class ModeProbe(st.Callback):
        def on_exit_batch(self, trainer):
            seen.append((trainer.phase.name, trainer.model.training, trainer.loss.requires_grad))

    model = nn.Sequential(nn.Linear(3, 1), nn.Dropout(0.5))
    trainer = st.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.mse_loss,
                         [st.Phase("train", regression_batches(1)), st.Phase("valid", regression_batches(1), grad=False)],
                         callbacks=[ModeProbe()], device=device)  # fmt: skip
    trainer.fit()
    assert seen == [("train", True, True), ("valid", False, False)]
    assert torch.is_grad_enabled()  # nothing leaks out of the run


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_forward_under_autocast(device: torch.device, precision: str):
    dtypes = []

    class DtypeProbe(st.Callback):
        def on_exit_batch(self, trainer):
            dtypes.append(trainer.output.dtype)

    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    trainer = st.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.mse_loss,
                         [st.Phase("train", regression_batches(2))], callbacks=[DtypeProbe()],
                         precision=precision, device=device)  # fmt: skip
    trainer.fit()
    expected = torch.bfloat16 if precision == "bf16" else torch.float16
    assert dtypes == [expected, expected]
    assert (trainer.step_runner.scaler is not None) == (
        precision == "fp16" and device.type == "cuda"
    )  # fp16 on CUDA only
    assert model.weight.dtype == torch.float32 and torch.isfinite(model.weight).all()


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_cuda_fp16_uses_a_grad_scaler():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    trainer = st.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.mse_loss,
                         [st.Phase("train", regression_batches(4))], device="cuda", precision="fp16", grad_clip=1.0)  # fmt: skip
    trainer.fit()
    assert trainer.step_runner.scaler is not None and trainer.global_step == 4
    assert torch.isfinite(model.weight).all()


def test_the_transitions_logger_stays_quiet_while_training(device: torch.device, caplog: pytest.LogCaptureFixture):
    trainer, _ = linear_trainer(device, train_batches=3, epochs=2, accumulate=2)
    with caplog.at_level(logging.DEBUG, logger="transitions"):
        trainer.fit()
    assert [record for record in caplog.records if record.name.startswith("transitions")] == []


def test_a_phase_reads_as_its_name(device: torch.device):
    trainer, _ = linear_trainer(device)
    trainer.run_until("batch")
    assert trainer.phase == "train" and trainer.phase != "valid" and str(trainer.phase) == "train"
    assert trainer.phase == trainer.phases[0] and trainer.phase != trainer.phases[1]


class Fails(st.Callback):
    def on_exit_backward(self, trainer: st.Trainer) -> None:
        if trainer.batch_index == 1:
            raise RuntimeError("a callback fails")


class Watches(st.Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[str, BaseException]] = []

    def on_exception(self, trainer: st.Trainer, error: BaseException) -> None:
        self.seen.append((trainer.state, error))


class FailsToClean(st.Callback):
    def on_exception(self, trainer: st.Trainer, error: BaseException) -> None:
        raise ValueError("cleaning up failed too")


def test_callbacks_hear_of_the_exception_that_ends_the_run_and_it_still_propagates(device: torch.device):
    watches = Watches()
    trainer, _ = linear_trainer(device, callbacks=[Fails(), FailsToClean(), watches])
    with pytest.warns(UserWarning, match="FailsToClean.on_exception raised ValueError"):
        with pytest.raises(RuntimeError, match="a callback fails"):
            trainer.fit()
    assert len(watches.seen) == 1 and watches.seen[0][0] == "backward"
    assert str(watches.seen[0][1]) == "a callback fails"


def test_the_diagram_marks_where_a_stepped_run_is(device: torch.device):
    trainer, _ = linear_trainer(device)
    trainer.run_until("backward")
    assert "Class backward s_active" in trainer.diagram() and "batch --> backward: backward" in trainer.diagram()


class Closes(st.Callback):
    """Records its on_close calls, and holds an output folder so the run locks it."""

    def __init__(self, folder, fail_at_batch: int | None = None) -> None:
        self.folder, self.fail_at_batch, self.closed = folder, fail_at_batch, []

    def output_files(self):
        return [self.folder / "log.txt"]

    def on_exit_batch(self, trainer):
        if trainer.batch_index == self.fail_at_batch:
            raise ValueError("a callback failed")

    def on_close(self, trainer):
        self.closed.append((trainer.state, trainer.finished))


def held(folder) -> bool:
    """Whether this process holds ``folder``'s lock (an exclusive hold is then refused)."""
    try:
        st.checkpoint.FolderLock(folder, exclusive=True).release()
    except st.CheckpointError:
        return True
    return False


def test_on_close_runs_once_when_the_run_finishes_and_the_folders_are_let_go(device: torch.device, tmp_path):
    closes = Closes(tmp_path / "logs")
    trainer, _ = linear_trainer(device, callbacks=[closes])
    trainer.run_until("batch")
    assert closes.closed == [] and held(tmp_path / "logs")  # a stepped run is still driven
    trainer.fit()
    assert closes.closed == [("idle", True)] and not held(tmp_path / "logs")
    with pytest.warns(UserWarning, match="already finished"):
        trainer.fit()
    assert closes.closed == [("idle", True)] and not held(tmp_path / "logs")


def test_on_close_runs_once_after_an_error_and_its_own_error_is_a_warning(device: torch.device, tmp_path):
    class FailsToClose(Closes):
        def on_close(self, trainer):
            super().on_close(trainer)
            raise OSError("the writer would not close")

    closes = FailsToClose(tmp_path / "logs", fail_at_batch=1)
    trainer, _ = linear_trainer(device, callbacks=[closes])
    with pytest.raises(ValueError, match="a callback failed"), pytest.warns(UserWarning, match="would not close"):
        trainer.fit()
    # the error came exiting the step state, so the machine is still in it
    assert closes.closed == [("step", False)] and not held(tmp_path / "logs")


@pytest.mark.parametrize(("accumulate", "limit", "epochs"), [(1, None, 1), (3, None, 3), (2, 5, 2), (3, 4, 3)])
def test_total_steps_is_known_before_the_run_and_is_the_steps_it_takes(device, accumulate, limit, epochs):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    phases = [st.Phase("train", regression_batches(7), limit=limit), st.Phase("valid", regression_batches(2),
              grad=False), st.Phase("more", regression_batches(2, seed=3))]  # fmt: skip
    trainer = st.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.mse_loss, phases,
                         accumulate=accumulate, epochs=epochs, device=device)  # fmt: skip
    total, per_epoch = trainer.total_steps, trainer.steps_per_epoch
    assert total == per_epoch * epochs
    trainer.fit()
    assert trainer.global_step == total


def test_total_steps_is_none_when_a_training_phase_has_no_length(device):
    model = nn.Linear(3, 1)
    trainer = st.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.mse_loss,
                         [st.Phase("train", UnsizedLoader(regression_batches(3)))], device=device)  # fmt: skip
    assert trainer.total_steps is None and trainer.steps_per_epoch is None


def test_a_callback_with_a_folder_and_a_save_method_is_not_taken_for_a_checkpoint_saver(device, tmp_path):
    class Samples(st.Callback):  # saves pictures, not the run
        def __init__(self, folder):
            self.folder = folder

        def save(self, trainer):
            return self.folder / "samples.png"

    trainer, _ = linear_trainer(device, callbacks=[Samples(tmp_path / "samples")])
    with pytest.raises(st.CheckpointError, match="no checkpoint file or folder at"):
        trainer.load_checkpoint(tmp_path / "samples")  # not made yet, and no Checkpoint's folder: a typo
    assert st.callbacks.base.checkpoint_savers(trainer.callbacks) == []
    saver = st.callbacks.Checkpoint(tmp_path / "ckpt")
    assert st.callbacks.base.checkpoint_savers([Samples(tmp_path), saver]) == [saver]


def test_a_finished_run_loaded_and_fitted_again_closes_the_files_it_opened(device, tmp_path):
    closes = Closes(tmp_path / "logs")
    trainer, _ = linear_trainer(device, callbacks=[closes, st.callbacks.Checkpoint(tmp_path / "ckpt")])
    trainer.fit()
    again = Closes(tmp_path / "logs")
    loaded, _ = linear_trainer(device, callbacks=[again, st.callbacks.Checkpoint(tmp_path / "ckpt")])
    assert loaded.load_checkpoint(tmp_path / "ckpt") is not None and loaded.finished
    with pytest.warns(UserWarning, match="already finished"):
        loaded.fit()
    assert again.closed == [("idle", True)] and not held(tmp_path / "logs")
