"""The state registry: every part saves, checks and loads itself; a load is all or nothing."""

from __future__ import annotations

import typing
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import statetrainer as st
from statetrainer.callbacks import (
    Accuracy,
    Callback,
    Checkpoint,
    EarlyStopping,
    OneCycle,
    SmoothedLoss,
    StopOnNonFinite,  # fmt: skip
    TorchScheduler,
    TrainerView,
)
from statetrainer.checkpoint import CheckpointError
from statetrainer.parts import CallbackStates, Position, RunSettings, StateRegistry

from .conftest import regression_batches


class StepCounter:
    """A part a user (or the multi-GPU code) adds: it counts batches and keeps a tensor on the run's device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seen = torch.zeros((), dtype=torch.int64, device=device)

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen}

    def check_fits(self, state: dict[str, Any]) -> None:
        if state["seen"].dtype != torch.int64:
            raise CheckpointError(f"seen has dtype {state['seen'].dtype}, not torch.int64")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = state["seen"].to(self.device, copy=True)


class CountBatches(Callback):
    def __init__(self, counter: StepCounter) -> None:
        self.counter = counter

    def on_exit_batch(self, trainer: TrainerView) -> None:
        self.counter.seen += 1


def build(device: torch.device) -> tuple[st.Trainer, StepCounter]:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    counter = StepCounter(device)
    trainer = st.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.mse_loss,
                         [st.Phase("train", regression_batches(6))], callbacks=[CountBatches(counter), SmoothedLoss()],
                         epochs=2, device=device, seed=1)  # fmt: skip
    trainer.parts.register("counter", counter)  # the one place a new part is added
    return trainer, counter


def test_a_new_part_registered_in_one_place_round_trips_through_a_checkpoint(device: torch.device, tmp_path):
    trainer, counter = build(device)
    while not (trainer.state == "phase" and trainer.epoch == 1 and trainer.batch_index == 2):
        trainer.advance()
    path = trainer.save_checkpoint(tmp_path / "mid.safetensors")
    assert int(counter.seen) == 9

    resumed, resumed_counter = build(device)
    resumed.load_checkpoint(path)
    assert int(resumed_counter.seen) == 9 and resumed_counter.seen.device.type == device.type
    resumed.fit()
    trainer.fit()
    assert int(resumed_counter.seen) == int(counter.seen) == 12
    assert torch.equal(resumed.model.weight, trainer.model.weight)


def test_a_checkpoint_without_the_new_part_is_refused_and_loads_nothing(device: torch.device, tmp_path):
    plain, _ = build(device)
    plain.advance()
    state = plain.state_dict()
    del state["counter"]
    fresh, _ = build(device)
    before = fresh.model.weight.detach().clone()
    with torch.no_grad():
        state["step"]["model"]["weight"] = state["step"]["model"]["weight"] + 1  # would show if it were loaded
    with pytest.raises(CheckpointError, match="no state for part.*counter"):
        fresh.load_state_dict(state)
    assert torch.equal(fresh.model.weight, before) and fresh.state == "idle" and fresh.position == Position()


def test_a_part_that_does_not_fit_is_named_and_nothing_is_loaded(device: torch.device):
    trainer, _ = build(device)
    trainer.advance()
    state = trainer.state_dict()
    state["counter"]["seen"] = torch.zeros((), dtype=torch.float32)
    state["step"]["model"]["weight"] = state["step"]["model"]["weight"] + 1
    fresh, counter = build(device)
    before = fresh.model.weight.detach().clone()
    with pytest.raises(CheckpointError, match="counter: seen has dtype torch.float32"):
        fresh.load_state_dict(state)
    assert torch.equal(fresh.model.weight, before) and counter.seen.dtype == torch.int64


@pytest.mark.parametrize(("field", "value"), [("batch_index", -5), ("epoch", -1), ("global_step", 1.5),
                                              ("finished", 1), ("epochs_done", True)])  # fmt: skip
def test_an_impossible_position_is_refused(field: str, value: Any):
    saved = Position().state_dict()
    saved[field] = value
    with pytest.raises(CheckpointError, match=field):
        StateRegistry(position=Position()).load_state_dict({"position": saved})


def test_registering_refuses_non_parts_and_duplicate_names():
    registry = StateRegistry(position=Position())
    with pytest.raises(TypeError, match="has no state_dict"):
        registry.register("text", "not a part")
    with pytest.raises(ValueError, match="'position' is registered already"):
        registry.register("position", Position())


def test_the_trainer_state_is_the_registry_state(device: torch.device):
    trainer, _ = build(device)
    assert list(trainer.state_dict()) == list(trainer.parts) == [
        "run", "position", "machine", "data", "settings", "step", "metrics", "callbacks", "rng", "counter"]  # fmt: skip


def test_hooks_have_resolvable_type_hints_against_the_narrow_trainer_view():
    for cls in (Callback, Checkpoint, SmoothedLoss, CountBatches):
        for name in ("on_enter_batch", "on_exit_step", "on_exit_batch", "on_exception"):
            hints = typing.get_type_hints(getattr(cls, name))
            assert hints["trainer"] is TrainerView


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda state: state["machine"].update(state="batch"), "saved in state 'batch', inside a batch"),
        (lambda state: state["position"].update(phase_index=3), "phase index 3 is not one of this run's 1"),
        (lambda state: state["position"].update(batch_index=6), "batch index 6 is past the 6 batches"),
        (lambda state: state["position"].update(epoch=1), "epoch 1 and epochs done 0 disagree"),
    ],
    ids=["inside-a-batch", "phase-out-of-range", "batch-past-the-end", "epochs-disagree"],
)
def test_an_impossible_saved_position_is_refused_before_anything_loads(device: torch.device, edit, message):
    trainer, _ = build(device)
    while not (trainer.state == "phase" and trainer.batch_index == 2):
        trainer.advance()
    state = trainer.state_dict()
    edit(state)
    fresh, _ = build(device)
    before = fresh.model.weight.detach().clone()
    with pytest.raises(CheckpointError, match=message):
        fresh.load_state_dict(state)
    assert torch.equal(fresh.model.weight, before) and fresh.state == "idle" and fresh.position == Position()


# ---------------------------------------------------------------- every part checks its saved state before any loads


class ShortLog(Callback):
    """A callback whose saved state can fail to load (a log file shorter than the checkpoint says), and says so in
    ``check_fits``, as ``CSVLogger`` does."""

    def __init__(self, size: int = 0) -> None:
        self.size = size

    def state_dict(self) -> dict[str, Any]:
        return {"size": self.size}

    def check_fits(self, state: dict[str, Any]) -> None:
        if state["size"] > self.size:
            raise CheckpointError(f"the log holds {self.size} bytes but the checkpoint expects {state['size']}")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["size"] > self.size:
            raise RuntimeError("a load that does not fit: check_fits should have refused it")
        self.size = state["size"]


def classifier_batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, generator=generator), torch.randint(2, (4,), generator=generator)) for _ in range(count)]


def build_with_callbacks(device: torch.device, extra: Sequence[Callback] = ()) -> st.Trainer:
    """A classifier with every built-in callback that keeps a state, saved mid-phase."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    callbacks = [SmoothedLoss(), Accuracy(), OneCycle(0.1, total_steps=12),
                 TorchScheduler(torch.optim.lr_scheduler.StepLR(optimizer, 2)), EarlyStopping("train_loss"),
                 StopOnNonFinite(), *extra]  # fmt: skip
    return st.Trainer(model, optimizer, F.cross_entropy, [st.Phase("train", classifier_batches(6))],
                      callbacks=callbacks, epochs=2, device=device, seed=1)  # fmt: skip


def saved_mid_phase(device: torch.device, extra: Sequence[Callback] = ()) -> dict[str, Any]:
    trainer = build_with_callbacks(device, extra)
    while not (trainer.state == "phase" and trainer.batch_index == 2):
        trainer.advance()
    trainer.metrics["train_loss"] = 0.5  # as a finished phase would have left it
    return trainer.state_dict()


def assert_refused_and_unchanged(trainer: st.Trainer, state: dict[str, Any], message: str) -> None:
    """Loading ``state`` raises ``CheckpointError`` matching ``message``, and the trainer is as it was built."""
    before = repr((trainer.model.state_dict(), trainer.optimizer.state_dict(),
                   {callback.key: callback.state_dict() for callback in trainer.callbacks}, dict(trainer.metrics)))  # fmt: skip
    with pytest.raises(CheckpointError, match=message):
        trainer.load_state_dict(state)
    after = repr((trainer.model.state_dict(), trainer.optimizer.state_dict(),
                  {callback.key: callback.state_dict() for callback in trainer.callbacks}, dict(trainer.metrics)))  # fmt: skip
    assert after == before and trainer.state == "idle" and trainer.position == Position()


def test_a_callback_state_that_cannot_load_is_refused_before_the_model_and_optimizer_are_touched(device: torch.device):
    """The issue's half-loaded trainer: a callback's state that cannot load (a log cut short) used to fail after the
    model, optimizer and position were loaded; its ``check_fits`` now refuses it first."""
    state = saved_mid_phase(device, [ShortLog(size=82)])
    assert_refused_and_unchanged(
        build_with_callbacks(device, [ShortLog(size=0)]),
        state,
        "^callbacks: ShortLog: the log holds 0 bytes but the checkpoint expects 82$",
    )


def test_a_callback_check_that_raises_a_plain_error_is_reported_as_a_checkpoint_error_naming_the_callback(
        device: torch.device):  # fmt: skip
    state = saved_mid_phase(device, [ShortLog(size=82)])
    del state["callbacks"]["ShortLog"]["size"]
    assert_refused_and_unchanged(
        build_with_callbacks(device, [ShortLog()]),
        state,
        r"^callbacks: ShortLog: the saved state does not fit this callback: KeyError\('size'\)$",
    )


def test_only_the_callbacks_this_process_runs_check_their_state():
    """A rank other than 0 loads no state of its ``rank_zero_only`` callbacks, so it does not judge them either."""
    log = ShortLog()
    saved = {"ShortLog": {"size": 82}}
    with pytest.raises(CheckpointError, match="ShortLog"):
        CallbackStates([log], torch.device("cpu")).check_fits(saved)
    CallbackStates([log], torch.device("cpu"), running=[]).check_fits(saved)


@pytest.mark.parametrize(("path", "value", "message"), [
    (("SmoothedLoss", "ranks", 0, "average"), torch.zeros(2), r"SmoothedLoss: rank 0: average is a float32 tensor of "
                                                               r"shape \(2,\), not a float32 tensor of shape \(\)"),
    (("SmoothedLoss", "ranks", 0, "average"), torch.zeros((), dtype=torch.float64), r"SmoothedLoss: rank 0: average is a float64"),
    (("SmoothedLoss", "ranks", 0, "samples"), -1, r"SmoothedLoss: rank 0: samples is -1, not an integer >= 0"),
    (("SmoothedLoss", "ranks", 0, "exact"), 1, r"SmoothedLoss: rank 0: exact is 1, not True or False"),
    (("SmoothedLoss", "ranks", 0, "batches"), 2.5, r"SmoothedLoss: rank 0: batches is 2.5, not an integer >= 0"),
    (("SmoothedLoss", "ranks"), [], r"SmoothedLoss: the checkpoint holds no state per rank"),
    (("Accuracy", "ranks", 0, "correct"), torch.tensor(2.0), r"Accuracy: rank 0: correct is a float32 tensor"),
    (("Accuracy", "ranks", 0, "correct"), torch.tensor(99), r"Accuracy: rank 0: correct is 99, not a count from 0 to total=12"),
    (("Accuracy", "ranks", 0, "total"), True, r"Accuracy: rank 0: total is True, not an integer >= 0"),
    (("OneCycle", "total_steps"), -1, r"OneCycle: total_steps is -1, not an integer >= 2"),
    (("OneCycle", "total_steps"), 12.0, r"OneCycle: total_steps is 12.0, not an integer >= 2"),
    (("TorchScheduler", "scheduler", "last_epoch"), -3, r"TorchScheduler: scheduler\['last_epoch'\] is -3, not an integer >= 0"),
    (("TorchScheduler", "scheduler", "_step_count"), 1.5, r"TorchScheduler: scheduler\['_step_count'\] is 1.5, not an integer"),
    (("TorchScheduler", "scheduler", "base_lrs"), [-0.1], r"TorchScheduler: scheduler\['base_lrs'\]\[0\] is -0.1, not a finite number >= 0"),
    (("TorchScheduler", "scheduler", "optimizer"), {}, r"TorchScheduler: scheduler is not laid out as this run's: unexpected scheduler\['optimizer'\]"),
    (("EarlyStopping", "bad_checks"), "0", r"EarlyStopping: bad_checks is '0' \(a str\), not an integer >= 0"),
    (("EarlyStopping", "best"), float("nan"), r"EarlyStopping: best is nan, not a number or 0-dim tensor"),
    (("EarlyStopping", "checked_this_epoch"), None, r"EarlyStopping: checked_this_epoch is None, not True or False"),
    (("StopOnNonFinite", "flag"), 1, r"StopOnNonFinite: the saved state has unexpected key\(s\) 'flag'"),
], ids=["loss-average-shape", "loss-average-dtype", "loss-samples-negative", "loss-exact-int", "loss-batches-float",
        "loss-no-ranks", "accuracy-correct-float", "accuracy-correct-past-total", "accuracy-total-bool",
        "one-cycle-negative", "one-cycle-float", "scheduler-epoch-negative", "scheduler-count-float",
        "scheduler-lr-negative", "scheduler-optimizer-key", "early-stopping-text", "early-stopping-nan",
        "early-stopping-flag-none", "stop-on-non-finite-key"])  # fmt: skip
def test_a_forged_callback_state_is_refused_naming_the_callback_and_the_key(device: torch.device, path, value, message):
    state = saved_mid_phase(device)
    node = state["callbacks"]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert_refused_and_unchanged(build_with_callbacks(device), state, f"^callbacks: {message}")


@pytest.mark.parametrize(("name", "value", "message"), [
    ("train_loss", "0.5", r"^metrics: train_loss is '0.5' \(a str\), not a number or a 0-dim tensor$"),
    ("train_loss", [0.5], r"^metrics: train_loss is a list of 1 item\(s\), not a number"),
    ("train_loss", True, r"^metrics: train_loss is True, not a number"),
    ("train_loss", torch.zeros(2), r"^metrics: train_loss is a float32 tensor of shape \(2,\), not a number"),
    (1, 0.5, r"^metrics: a metric's name is 1, not a string$"),
], ids=["text", "list", "bool", "vector", "name-not-text"])  # fmt: skip
def test_a_metric_of_the_wrong_kind_is_refused_naming_it(device: torch.device, name, value, message):
    state = saved_mid_phase(device)
    state["metrics"][name] = value
    assert_refused_and_unchanged(build_with_callbacks(device), state, message)


def test_metrics_of_every_kind_the_library_and_users_write_load(device: torch.device):
    state = saved_mid_phase(device)
    state["metrics"].update(nan_loss=float("nan"), count=3, tensor_loss=torch.tensor(0.25), steps=torch.tensor(7))
    trainer = build_with_callbacks(device)
    trainer.load_state_dict(state)
    assert trainer.metrics["count"] == 3 and torch.equal(trainer.metrics["steps"], torch.tensor(7))


def test_a_run_cannot_save_a_metric_no_run_could_load(device: torch.device):
    trainer = build_with_callbacks(device)
    trainer.metrics["best_epoch_name"] = "epoch 3"
    with pytest.raises(TypeError, match=r"trainer.metrics\['best_epoch_name'\] is 'epoch 3' \(a str\)"):
        trainer.state_dict()


@pytest.mark.parametrize(("edit", "message"), [
    (lambda rank: rank["python"].update(version=2), r"python\['version'\] is 2, not an integer from 3 to 3"),
    (lambda rank: rank["python"]["state"].__setitem__(5, 2**32), r"python\['state'\]\[5\] is 4294967296"),
    (lambda rank: rank["python"].update(gauss="x"), r"python\['gauss'\] is 'x' \(a str\)"),
    (lambda rank: rank["numpy"].update(position=700), r"numpy\['position'\] is 700, not an integer from 0 to 624"),
    (lambda rank: rank["numpy"].update(keys=rank["numpy"]["keys"][:5]), r"numpy\['keys'\] is a int64 tensor of shape \(5,\)"),
    (lambda rank: rank["numpy"].update(cached=float("nan")), r"numpy\['cached'\] is nan"),
    (lambda rank: rank.update(torch=torch.zeros_like(rank["torch"])), r"torch is not a generator state of cpu here"),
    (lambda rank: rank.update(torch=rank["torch"][:-1]), r"torch is a uint8 tensor of shape \(5055,\)"),
    (lambda rank: rank.update(cuda=["x"]), r"cuda\[0\] is 'x' \(a str\), not a uint8 tensor"),
], ids=["python-version", "python-word", "python-gauss", "numpy-position", "numpy-keys", "numpy-cached",
        "torch-invalid", "torch-size", "cuda-text"])  # fmt: skip
def test_a_generator_state_that_would_not_restore_is_refused_before_anything_loads(device: torch.device, edit, message):
    """The generators load last: a state their ``setstate`` rejects would fail after every other part was loaded."""
    state = saved_mid_phase(device)
    edit(state["rng"]["ranks"][0])
    assert_refused_and_unchanged(build_with_callbacks(device), state, f"^rng: ranks\\[0\\]: {message}")


@pytest.mark.parametrize(("value", "message"), [("", r"id is '' \(a str\), not a run id"), (7, "id is 7, not a run id"),
                                                ("\x1b]0;x\x07", r"id is '\\x1b\]0;x\\x07' \(a str\), not a run id")],
                         ids=["empty", "number", "escape-sequence"])  # fmt: skip
def test_a_run_id_that_is_not_one_is_refused(device: torch.device, value, message):
    state = saved_mid_phase(device)
    state["run"]["id"] = value
    assert_refused_and_unchanged(build_with_callbacks(device), state, f"^run: {message}$")


def test_a_setting_recorded_later_is_not_asked_of_a_checkpoint_from_before_it():
    """``sharded_precision`` (an FSDP2 model's mixed precision) is compared when the checkpoint has it, and a
    checkpoint saved before it was recorded still loads."""
    settings = RunSettings({"accumulate": 1, "sharded_precision": {"": "param_dtype=None"}})
    settings.check_fits({"accumulate": 1})
    settings.check_fits({"accumulate": 1, "sharded_precision": {"": "param_dtype=None"}})
    with pytest.raises(CheckpointError, match="sharded_precision"):
        settings.check_fits({"accumulate": 1, "sharded_precision": {"": "param_dtype=bfloat16"}})
    with pytest.raises(CheckpointError, match="accumulate"):
        settings.check_fits({"sharded_precision": {"": "param_dtype=None"}})
