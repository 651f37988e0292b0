"""Trainer.save_checkpoint / load_checkpoint and the Checkpoint callback, in process."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import statetrainer as st
from statetrainer.callbacks import Accuracy, Checkpoint, SmoothedLoss
from statetrainer.checkpoint import CheckpointError, checkpoint_files, write_tree
from statetrainer.testing import EventRecorder
from statetrainer.version import __version__

from ..data.test_resumable import Augmented
from ..test_trainer import UnsizedLoader

_GENERATOR = torch.Generator().manual_seed(0)
DATA = TensorDataset(torch.randn(48, 3, generator=_GENERATOR), torch.randint(2, (48,), generator=_GENERATOR))


def build(callbacks=(), model=None, loader=None, *, device: torch.device | str, **options) -> st.Trainer:
    """A small classifier trainer on ``device``: Adam, dropout, a shuffled train phase and a valid phase."""
    torch.manual_seed(0)
    model = model or nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.2), nn.Linear(8, 2))
    options.setdefault("epochs", 2)
    options.setdefault("deterministic", torch.device(device).type == "cuda")  # bit-exact comparisons on CUDA
    train = loader if loader is not None else DataLoader(DATA, batch_size=6, shuffle=True)
    return st.Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-2), F.cross_entropy,
                      [st.Phase("train", train), st.Phase("valid", DataLoader(DATA, batch_size=16), grad=False)],
                      callbacks=[SmoothedLoss(), Accuracy(), *callbacks], device=device, **{"seed": 3, **options})  # fmt: skip


def advance_to(trainer: st.Trainer, epoch: int, phase: str, batch_index: int) -> None:
    while not (
        trainer.state == "phase"
        and (trainer.epoch, trainer.phase.name, trainer.batch_index) == (epoch, phase, batch_index)
    ):
        trainer.advance()


def assert_same_weights(left: st.Trainer, right: st.Trainer) -> None:
    for (name, a), b in zip(left.model.state_dict().items(), right.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("where", [(0, "train", 0), (0, "train", 4), (1, "valid", 1), (1, "train", 7)])
def test_resume_in_process_equals_the_uninterrupted_run(device: torch.device, tmp_path, where):
    whole = build(accumulate=3, device=device).fit()
    first = build(accumulate=3, device=device)
    advance_to(first, *where)
    path = first.save_checkpoint(tmp_path)
    second = build(accumulate=3, device=device)
    assert second.load_checkpoint(path) == path
    assert second.state == "phase" and second.batch_index == where[2]
    second.fit()
    assert_same_weights(whole, second)
    assert whole.metrics == second.metrics and whole.global_step == second.global_step


def test_resume_mid_phase_does_not_fire_entry_callbacks_again(device: torch.device, tmp_path):
    first = build([EventRecorder()], device=device)
    advance_to(first, 0, "train", 2)
    path = first.save_checkpoint(tmp_path / "mid.safetensors")
    recorder = EventRecorder()
    second = build([recorder], device=device)
    second.load_checkpoint(path)
    second.advance()
    assert recorder.hooks == ["enter batch"]
    assert (recorder.events[0].epoch, recorder.events[0].phase, recorder.events[0].batch_index) == (0, "train", 3)
    assert second.history[0] == st.Move("restore", "idle", "phase")


def test_resume_loads_no_sample_it_already_saw(device: torch.device, tmp_path):
    dataset = Augmented(600)
    loader = DataLoader(dataset, batch_size=10, shuffle=True)

    def regression():
        torch.manual_seed(0)
        net = nn.Linear(2, 1)
        return st.Trainer(net, torch.optim.SGD(net.parameters(), lr=0.01), lambda out, target: out.mean(),
                          [st.Phase("train", loader)], unpack=lambda batch: (batch, None), seed=1, device=device)  # fmt: skip

    for resume_at in (0, 58):
        first = regression()
        advance_to(first, 0, "train", resume_at)
        path = first.save_checkpoint(tmp_path / f"at{resume_at}.safetensors")
        second = regression()
        dataset.loads = 0
        second.load_checkpoint(path)
        second.fit()
        assert dataset.loads == (60 - resume_at - 1) * 10  # only the batches after the checkpoint


def test_auto_resume_recipe_with_the_checkpoint_callback(device: torch.device, tmp_path):
    folder = tmp_path / "run"
    whole = build(epochs=3, device=device).fit()
    assert (
        build([Checkpoint(folder)], device=device).load_checkpoint(folder) is None
    )  # nothing there yet: a fresh start
    first = build([Checkpoint(folder, every_steps=4, keep_last=2)], epochs=3, device=device)
    advance_to(first, 1, "train", 5)  # "killed" here
    kept = checkpoint_files(folder)
    assert len(kept) == 2 and "step000000012" in kept[-1].name  # every 4 steps, 8 per epoch, pruned to 2
    second = build([Checkpoint(folder, every_steps=4, keep_last=2)], epochs=3, device=device)
    assert second.load_checkpoint(folder) == kept[-1]
    second.fit()
    assert_same_weights(whole, second)
    third = build([Checkpoint(folder, every_steps=4, keep_last=2)], epochs=3, device=device)
    third.load_checkpoint(folder)  # the final checkpoint: the run is over
    assert third.finished
    with pytest.warns(UserWarning, match="already finished"):
        third.fit()


def test_best_checkpoint_is_kept_apart(device: torch.device, tmp_path):
    trainer = build(
        [Checkpoint(tmp_path, every_epochs=None, keep_last=1, best="valid_accuracy")], epochs=3, device=device
    ).fit()
    best = build([Checkpoint(tmp_path, every_epochs=None, keep_last=1, best="valid_accuracy")], epochs=3, device=device)
    best.load_checkpoint(tmp_path / "best.safetensors")
    callback = trainer.callbacks[-1]
    assert best.metrics["valid_accuracy"] == callback.best_value == max(
        callback.best_value, trainer.metrics["valid_accuracy"])  # fmt: skip
    assert len(checkpoint_files(tmp_path)) == 1


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(device: torch.device, tmp_path):
    first = build([Checkpoint(tmp_path, every_steps=2, keep_last=None)], device=device)
    advance_to(first, 0, "train", 5)
    older, newest = checkpoint_files(tmp_path)[-2:]
    newest.write_bytes(newest.read_bytes()[:100])
    second = build([Checkpoint(tmp_path)], device=device)
    with pytest.warns(UserWarning, match=f"skipping checkpoint .*{newest.name}.*falling back"):
        assert second.load_checkpoint(tmp_path) == older
    assert second.global_step == 4  # steps 2, 4 and 6 were saved; 6 is broken


def test_a_checkpoint_of_another_model_is_refused_with_the_reason(device: torch.device, tmp_path):
    path = build(device=device).save_checkpoint(tmp_path / "a.safetensors")
    cases = {
        "unexpected keys 2.weight, 2.bias": nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.2)),
        "missing keys 3.weight": nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.2), nn.Linear(8, 2), nn.Linear(2, 2)),
        r"0.weight: shape \(8, 3\) in the checkpoint, \(9, 3\)": nn.Sequential(nn.Linear(3, 9), nn.Dropout(0.2), nn.Linear(9, 2)),
        "dtype torch.float32 in the checkpoint, torch.float64": nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.2), nn.Linear(8, 2)).double(),
    }  # fmt: skip
    for message, model in cases.items():
        with pytest.raises(CheckpointError, match=message):
            build(model=model, device=device).load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no state for callback"):
        build([EventRecorder()], device=device).load_checkpoint(path)
    with pytest.raises(CheckpointError, match="phases"):
        build(loader=DataLoader(DATA, batch_size=4), device=device).load_checkpoint(path)


def test_checkpoints_are_taken_between_batches_only(device: torch.device, tmp_path):
    trainer = build(device=device)
    trainer.run_until("backward")
    with pytest.raises(RuntimeError, match="between batches .* it is in 'backward'"):
        trainer.save_checkpoint(tmp_path)

    class SaveInHook(st.Callback):
        def on_exit_batch(self, trainer):
            trainer.save_checkpoint(tmp_path)

    with pytest.raises(RuntimeError, match="from a callback, in the middle of a transition"):
        build([SaveInHook()], device=device).fit()
    path = build(device=device).save_checkpoint(tmp_path / "x.safetensors")
    started = build(device=device)
    started.advance()
    with pytest.raises(RuntimeError, match="has not started"):
        started.load_checkpoint(path)


def test_a_loader_the_trainer_cannot_control_checkpoints_at_epoch_boundaries(device: torch.device, tmp_path):
    batches = [(x, y) for x, y in DataLoader(DATA, batch_size=6)]
    trainer = build([Checkpoint(tmp_path, every_steps=1, keep_last=None)], loader=UnsizedLoader(batches), device=device)
    with pytest.warns(UserWarning, match="cannot be resumed from inside phase .train. .*UnsizedLoader.*skipped"):
        trainer.fit()
    names = [path.name for path in checkpoint_files(tmp_path)]
    assert names == ["ckpt-000000-epoch0001-step000000008.safetensors",
                     "ckpt-000001-epoch0002-step000000016.safetensors"]  # epochs counted from 1  # fmt: skip
    stepped = build(loader=UnsizedLoader(batches), device=device)
    advance_to(stepped, 0, "train", 1)
    with pytest.raises(RuntimeError, match="cannot be resumed mid-phase .*UnsizedLoader"):
        stepped.save_checkpoint(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build(loader=UnsizedLoader(batches), device=device).fit()  # no checkpoints asked for: no warning


def test_wrapped_models_are_saved_under_their_plain_keys(device: torch.device, tmp_path):
    plain = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.2), nn.Linear(8, 2))
    compiled = build(model=torch.compile(plain), device=device)  # compiled lazily: never run here
    path = compiled.save_checkpoint(tmp_path / "c.safetensors")
    from statetrainer.checkpoint import read_tree

    assert sorted(read_tree(path)["step"]["model"]) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    build(device=device).load_checkpoint(path)  # loads into an unwrapped model of the same shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", [None, "fp16", "bf16"])
def test_resume_on_cuda_is_exact_with_mixed_precision(tmp_path, precision):
    options = {"device": "cuda", "precision": precision, "accumulate": 2, "deterministic": True}
    whole = build(**options).fit()
    first = build(**options)
    advance_to(first, 1, "train", 2)  # inside an accumulation window
    path = first.save_checkpoint(tmp_path)
    second = build(**options)
    second.load_checkpoint(path)
    second.fit()
    assert_same_weights(whole, second)
    assert whole.metrics == second.metrics
    if precision == "fp16":
        assert (
            second.step_runner.scaler is not None
            and second.step_runner.scaler.get_scale() == whole.step_runner.scaler.get_scale()
        )


def test_a_checkpoint_path_of_another_kind_is_refused_not_made_a_folder(tmp_path, device):
    trainer = build(device=device)
    with pytest.raises(ValueError, match=r"model\.pt.*'\.safetensors'"):
        trainer.save_checkpoint(tmp_path / "model.pt")
    assert not (tmp_path / "model.pt").exists()
    (tmp_path / "run.v2").mkdir()  # an existing folder with a dot in its name is still a folder
    assert trainer.save_checkpoint(tmp_path / "run.v2").parent == tmp_path / "run.v2"


def test_a_mistyped_checkpoint_path_is_an_error_not_a_fresh_start(tmp_path, device):
    trainer = build([Checkpoint(tmp_path / "checkpoints" / "run1")], device=device)
    with pytest.raises(CheckpointError, match=r"no checkpoint file or folder at .*chekpoints.*saves to .*checkpoints"):
        trainer.load_checkpoint(tmp_path / "chekpoints" / "run1")
    assert trainer.load_checkpoint(tmp_path / "checkpoints" / "run1") is None  # its own folder, not made yet


@pytest.mark.parametrize("damage", ["truncate", "replace"])
def test_a_loaded_run_owns_its_state_when_the_file_is_truncated_or_replaced(device: torch.device, tmp_path, damage):
    first = build(accumulate=2, device=device)
    advance_to(first, 0, "train", 4)  # mid-window: Adam's moments, pending gradients and metric sums are all saved
    path = first.save_checkpoint(tmp_path / "mid.safetensors")
    untouched = tmp_path / "copy.safetensors"
    untouched.write_bytes(path.read_bytes())
    damaged = build(accumulate=2, device=device)
    damaged.load_checkpoint(path)
    if damage == "truncate":
        with open(path, "r+b") as file:  # in place, as a pruning or a full disk would leave it
            file.truncate(0)
    else:
        with open(path, "r+b") as file:  # in place, as `cp other.safetensors same-name` does
            file.write(bytes(range(256)) * (path.stat().st_size // 256))
    damaged.fit()
    reference = build(accumulate=2, device=device)
    reference.load_checkpoint(untouched)
    reference.fit()
    assert_same_weights(reference, damaged)
    assert reference.metrics == damaged.metrics


@pytest.mark.parametrize(("saved_with", "loaded_into"), [(torch.optim.SGD, torch.optim.Adam), (torch.optim.Adam, torch.optim.SGD),
                                                         (torch.optim.Adam, torch.optim.AdamW)])  # fmt: skip
def test_a_checkpoint_of_another_optimizer_is_refused_and_nothing_is_loaded(device: torch.device, tmp_path, saved_with,
                                                                             loaded_into):  # fmt: skip
    def trainer_with(optimizer_class) -> st.Trainer:
        torch.manual_seed(0)
        model = nn.Linear(3, 2)
        return st.Trainer(model, optimizer_class(model.parameters(), lr=0.1), F.cross_entropy,
                          [st.Phase("train", DataLoader(DATA, batch_size=6))], device=device, seed=1)  # fmt: skip

    saved = trainer_with(saved_with)
    advance_to(saved, 0, "train", 3)
    path = saved.save_checkpoint(tmp_path / "a.safetensors")
    fresh = trainer_with(loaded_into)
    before = fresh.model.weight.detach().clone()
    with pytest.raises(CheckpointError, match="optimizer is torch.optim"):
        fresh.load_checkpoint(path)
    assert torch.equal(fresh.model.weight, before) and fresh.state == "idle"


def test_a_finished_run_given_more_epochs_trains_them_as_one_longer_run_would(device: torch.device, tmp_path):
    short = build(device=device, epochs=2).fit()
    path = short.save_checkpoint(tmp_path / "done.safetensors")
    extended = build(device=device, epochs=4)
    extended.load_checkpoint(path)
    extended.fit()
    longer = build(device=device, epochs=4).fit()
    assert extended.global_step == longer.global_step == 2 * short.global_step
    assert_same_weights(longer, extended)


def test_a_finished_run_says_truly_how_many_epochs_it_ran(device: torch.device, tmp_path):
    path = build(device=device, epochs=2).fit().save_checkpoint(tmp_path / "done.safetensors")
    again = build(device=device, epochs=2)
    again.load_checkpoint(path)
    with pytest.warns(UserWarning, match=r"already finished \(all 2 epoch\(s\) done\)"):
        again.fit()


@pytest.mark.parametrize(("saved_epochs", "where", "resumed_epochs"), [(3, "finished", 2), (3, (2, "train", 1), 2)])
def test_a_checkpoint_from_further_than_the_run_goes_is_refused(device: torch.device, tmp_path, saved_epochs, where,
                                                                resumed_epochs):  # fmt: skip
    saved = build(device=device, epochs=saved_epochs)
    saved.fit() if where == "finished" else advance_to(saved, *where)
    path = saved.save_checkpoint(tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError, match="more than epochs=2.*resume with at least epochs=3"):
        build(device=device, epochs=resumed_epochs).load_checkpoint(path)


def test_a_folder_named_like_a_checkpoint_file_is_refused(device: torch.device, tmp_path):
    (tmp_path / "x.safetensors").mkdir()
    with pytest.raises(CheckpointError, match="is a folder, not a checkpoint file"):
        build(device=device).load_checkpoint(tmp_path / "x.safetensors")


def test_a_checkpoint_of_a_run_with_another_seed_is_refused_unless_the_seed_is_left_open(
    device: torch.device, tmp_path
):
    saved = build(device=device)
    advance_to(saved, 0, "train", 2)
    path = saved.save_checkpoint(tmp_path / "seed3.safetensors")
    with pytest.raises(CheckpointError, match="seed=3, this trainer has seed=4: it is another run"):
        build(device=device, seed=4).load_checkpoint(path)
    open_seed = build(device=device, seed=None)
    open_seed.load_checkpoint(path)  # a script that leaves the seed open continues the checkpoint's run
    assert open_seed.seed == 3


def test_two_runs_given_one_folder_neither_deletes_the_others_files_nor_adopts_its_run(device: torch.device, tmp_path):
    folder = tmp_path / "shared"
    first = build([Checkpoint(folder, every_steps=2, keep_last=1)], device=device, seed=7).fit()
    kept = sorted(path.name for path in folder.iterdir())
    assert "run.json" in kept and len(checkpoint_files(folder)) == 1

    second = build([Checkpoint(folder, every_steps=2, keep_last=1)], device=device, seed=8)
    with pytest.raises(CheckpointError, match="holds another run.*seed 7, this trainer's is 8"):
        second.load_checkpoint(folder)
    with pytest.raises(CheckpointError, match="holds another run.s files"):
        second.fit()  # without loading: its first save is refused, before it writes or prunes anything
    assert sorted(path.name for path in folder.iterdir()) == kept

    other_model = build([Checkpoint(folder)], model=nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), device=device,
                        seed=7)  # fmt: skip
    with pytest.raises(CheckpointError, match="holds another run.*other phases, model or optimizer"):
        other_model.load_checkpoint(folder)

    again = build([Checkpoint(folder, every_steps=2, keep_last=1)], device=device, seed=7, epochs=3)
    assert again.load_checkpoint(folder) == checkpoint_files(folder)[-1]  # the run's own restart continues it
    again.fit()
    assert again.run.id == first.run.id and again.global_step == first.global_step * 3 // 2


def test_a_run_restarted_before_its_first_checkpoint_keeps_its_folder(device: torch.device, tmp_path):
    folder = tmp_path / "run"
    started = build([Checkpoint(folder, every_epochs=1)], device=device)
    started.save_checkpoint(folder)  # the marker and one file, as a killed run may leave them ...
    for path in checkpoint_files(folder):
        path.unlink()  # ... or the marker alone
    restarted = build([Checkpoint(folder, every_epochs=1)], device=device)
    assert restarted.load_checkpoint(folder) is None
    restarted.fit()  # its saves go into the folder it had claimed
    assert restarted.run.id == started.run.id and checkpoint_files(folder)


def test_discard_run_lets_a_fresh_run_start_in_the_folder(device: torch.device, tmp_path):
    from statetrainer.checkpoint import discard_run

    folder = tmp_path / "run"
    build([Checkpoint(folder, every_epochs=1, best="valid_accuracy", keep_best=2)], device=device, seed=7).fit()
    assert (folder / "best.safetensors").exists() and list(folder.glob("best-epoch*.safetensors"))
    discard_run(folder)
    assert sorted(path.name for path in folder.iterdir()) == [".statetrainer.lock"]  # the best copies went too
    build([Checkpoint(folder, every_epochs=1)], device=device, seed=8).fit()
    assert len(checkpoint_files(folder)) == 2


@pytest.mark.parametrize(
    ("saved_with", "resumed_with", "named"),
    [
        ({"loader": DataLoader(DATA, batch_size=12, shuffle=True)}, {"loader": DataLoader(DATA, batch_size=13, shuffle=True)},
         "train.batch_size=12 in the checkpoint, 13 now"),  # 4 batches either way
        ({}, {"loader": DataLoader(TensorDataset(*DATA[:46]), batch_size=6, shuffle=True)},
         "train.samples=48 in the checkpoint, 46 now"),
        ({"accumulate": 2}, {"accumulate": 4}, "accumulate=2 in the checkpoint, 4 now"),
        ({}, {"precision": "bf16"}, "precision=None in the checkpoint, 'bf16' now"),
    ],
    ids=["batch-size-same-count", "fewer-samples-same-count", "accumulate", "precision"],
)  # fmt: skip
def test_a_resume_with_other_settings_is_refused_unless_allowed(device: torch.device, tmp_path, saved_with,
                                                                 resumed_with, named):  # fmt: skip
    saved = build(device=device, **saved_with)
    advance_to(saved, 0, "train", 2)
    path = saved.save_checkpoint(tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError, match=f"other settings: {re.escape(named)}.*allow_changes="):
        build(device=device, **{**saved_with, **resumed_with}).load_checkpoint(path)
    setting = named.split("=")[0]
    allowed = build(device=device, **{**saved_with, **resumed_with})
    assert allowed.load_checkpoint(path, allow_changes={setting}) == path  # the user says the change is meant
    allowed.fit()


def test_a_checkpoint_of_another_number_of_processes_is_refused_unless_allowed(device: torch.device, tmp_path):
    saved = build(device=device)
    advance_to(saved, 0, "train", 2)
    state = saved.state_dict()
    assert state["settings"]["world_size"] == 1  # one process: no process group
    state["settings"]["world_size"] = 2  # as a run under torchrun --nproc_per_node=2 records it
    path = write_tree(tmp_path / "two_processes.safetensors", state, __version__)
    with pytest.raises(CheckpointError, match=r"world_size=2 in the checkpoint, 1 now.*allow_changes=\['world_size'\]"):
        build(device=device).load_checkpoint(path)
    assert build(device=device).load_checkpoint(path, allow_changes={"world_size"}) == path


class LoadsBadly(st.Callback):
    """A user's callback whose ``load_state_dict`` fails on what its (absent) check let through."""

    def state_dict(self):
        return {"count": 3}

    def load_state_dict(self, state):
        raise ValueError("cannot take this state")


def test_a_part_that_fails_to_load_after_the_checks_leaves_a_trainer_that_refuses_to_go_on(
    device: torch.device, tmp_path
):
    build([LoadsBadly(), Checkpoint(tmp_path, every_epochs=1)], device=device).fit()
    resumed = build([LoadsBadly(), Checkpoint(tmp_path, every_epochs=1)], device=device, epochs=3)
    with pytest.raises(CheckpointError, match="callbacks: loading raised ValueError.*build a new one"):
        resumed.load_checkpoint(tmp_path)
    with pytest.raises(RuntimeError, match="build a new Trainer"):
        resumed.fit()
    with pytest.raises(RuntimeError, match="holds part of a checkpoint"):
        resumed.save_checkpoint(tmp_path / "half.safetensors")
    assert not (tmp_path / "half.safetensors").exists()
