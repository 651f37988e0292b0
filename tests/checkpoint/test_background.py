"""Background checkpoints (``save_checkpoint(background=True)``): the bytes of a synchronous save (its tensors,
document and checksum), written while training changes the model; one write at a time; a failed write raised in
the training thread."""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

import statetrainer as st
from statetrainer.checkpoint import StagingBuffers, read_document, read_header, read_tree, serialization

PAD = 4_000_000  # 16 MB of float32 beside the weights: a write that takes a while


def build(device: torch.device, callbacks=()) -> st.Trainer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 1))
    model.register_buffer("pad", torch.arange(PAD, dtype=torch.float32))
    batches = [(torch.randn(6, 4), torch.randn(6, 1)) for _ in range(5)]
    return st.Trainer(model, torch.optim.Adam(model.parameters(), lr=0.05), F.mse_loss, [st.Phase("train", batches)],
                      epochs=3, device=device, seed=1, callbacks=callbacks)  # fmt: skip


def contents(path) -> tuple[str, dict, dict[str, bytes]]:
    """A checkpoint's checksum, document and every tensor's bytes: what a difference in its bytes is in."""
    tensors = {key: (str(tensor.dtype), tuple(tensor.shape), tensor.numpy().tobytes())
               for key, tensor in load_file(str(path)).items()}  # fmt: skip
    return read_header(path)["checksum"], read_document(path), tensors


def test_a_background_save_holds_what_the_synchronous_save_holds_while_the_model_changes(tmp_path, device):
    background = build(device)
    background.run_until("phase", step=4)
    synchronous = background.save_checkpoint(tmp_path / "sync.safetensors")  # the same run, the same point
    expected = contents(synchronous)
    path = background.save_checkpoint(tmp_path / "background.safetensors", background=True)
    with torch.no_grad():  # under the writer: every tensor it holds changes at once, the big one first
        background.model.pad.fill_(-1.0)
    background.run_until("phase", step=9)  # and training goes on, stepping the weights and Adam's moments
    background.wait_for_checkpoints()
    assert contents(path) == expected  # says where they differ, if they do
    assert path.read_bytes() == synchronous.read_bytes()
    background.fit()  # waits for nothing; the run goes on as usual
    assert background.finished and background.global_step == 15


def test_staging_reuses_its_buffers_from_one_save_to_the_next():
    staging = StagingBuffers()
    live = {"a": torch.ones(3), "b": [torch.zeros(2, 2), 5, "x", None]}
    first = staging.stage(live).tree
    buffers = [first["a"].data_ptr(), first["b"][0].data_ptr()]
    live["a"] += 1
    assert torch.equal(first["a"], torch.ones(3)) and first["b"][1:] == [5, "x", None]
    second = staging.stage(live).tree
    assert [second["a"].data_ptr(), second["b"][0].data_ptr()] == buffers  # the same memory, no allocation
    assert torch.equal(second["a"], torch.full((3,), 2.0)) and staging.bytes == 3 * 4 + 4 * 4


def test_a_failed_background_write_raises_at_the_next_batch_boundary_and_keeps_the_previous_file(
        tmp_path, device, monkeypatch):  # fmt: skip
    from safetensors import SafetensorError

    trainer = build(device)
    trainer.run_until("phase", step=2)
    kept = trainer.save_checkpoint(tmp_path / "checkpoints", background=True)
    trainer.run_until("phase", step=3)  # a second save waits for the first, which has written
    trainer.wait_for_checkpoints()

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(serialization, "save_file", full_disk)
    failing = trainer.save_checkpoint(tmp_path / "checkpoints", background=True)
    deadline = time.monotonic() + 30
    while trainer._checkpointer.writer.in_flight and time.monotonic() < deadline:  # it fails at once
        time.sleep(0.01)
    with pytest.raises(OSError, match=f"could not write .*{failing.name}: the disk is full"):
        trainer.fit()
    assert trainer.global_step == 4  # raised at the first boundary after the write failed
    assert not failing.exists() and torch.equal(read_tree(kept)["step"]["model"]["pad"], torch.arange(PAD) * 1.0)


def test_wait_for_checkpoints_raises_a_failed_write_once(tmp_path, device, monkeypatch):
    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(serialization, "save_file", refused)
    trainer = build(device)
    trainer.run_until("phase", step=1)
    trainer.save_checkpoint(tmp_path / "one.safetensors", background=True)
    with pytest.raises(PermissionError):
        trainer.wait_for_checkpoints()
    trainer.wait_for_checkpoints()  # reported: nothing left to raise


def test_tied_weights_are_staged_once_and_written_as_a_synchronous_save_writes_them(tmp_path, device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 10, bias=False))
    model[1].weight = model[0].weight  # one tensor under two names
    batches = [(torch.randint(0, 10, (4,)), torch.randint(0, 10, (4,))) for _ in range(3)]
    trainer = st.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy,
                         [st.Phase("train", batches)], device=device, seed=0)  # fmt: skip
    trainer.run_until("phase", step=2)
    synchronous = trainer.save_checkpoint(tmp_path / "sync.safetensors")
    background = trainer.save_checkpoint(tmp_path / "background.safetensors", background=True)
    trainer.wait_for_checkpoints()
    assert background.read_bytes() == synchronous.read_bytes()
    assert len(load_file(str(background))) == len(load_file(str(synchronous)))  # the tied weight stored once


@contextmanager
def held_writes(monkeypatch):
    """Every checkpoint write blocks until the event is set: a disk as slow as the test needs."""
    release, real_save_file = threading.Event(), serialization.save_file

    def held(*args, **kwargs):
        assert release.wait(60), "the test never released the write"
        return real_save_file(*args, **kwargs)

    monkeypatch.setattr(serialization, "save_file", held)
    try:
        yield release
    finally:
        release.set()


def files(folder) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.suffix == ".safetensors"}


def test_a_run_with_background_checkpoints_leaves_the_files_of_a_synchronous_run(tmp_path, device):
    """Every file the same bytes, pruned and the best copies kept alike: all of it done after each write."""
    written, run_id = {}, None
    for kind in ("sync", "background"):
        saver = st.callbacks.Checkpoint(tmp_path / kind, every_steps=2, keep_last=2, best="train_loss", keep_best=2,
                                        background=kind == "background")  # fmt: skip
        trainer = build(device, [st.callbacks.SmoothedLoss(), saver])
        trainer.run.id = run_id = run_id or trainer.run.id  # one run's id for both: the files name it
        trainer.fit()
        assert not trainer._checkpointer.writer.in_flight  # fit() waited for the last write
        written[kind] = files(tmp_path / kind)
    assert list(written["background"]) == list(written["sync"])
    assert len([name for name in written["sync"] if name.startswith("ckpt")]) == 2  # pruned to keep_last
    assert {name for name in written["sync"] if name.startswith("best")} == {"best.safetensors",
                                                                           "best-epoch0002.safetensors",
                                                                           "best-epoch0003.safetensors"}  # fmt: skip
    for name, data in written["sync"].items():
        assert written["background"][name] == data, name


class ReleaseAfter(st.callbacks.Callback):
    """Releases the held writes 0.3 s after step ``step`` ends (before the saves due there are made)."""

    def __init__(self, release: threading.Event, step: int) -> None:
        self.release, self.step = release, step

    def on_exit_step(self, trainer):
        if trainer.global_step == self.step:
            threading.Timer(0.3, self.release.set).start()


def test_a_save_due_during_a_write_waits_for_it_and_the_log_says_so(tmp_path, device, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="statetrainer.checkpoint")
    with held_writes(monkeypatch) as release:
        saver = st.callbacks.Checkpoint(tmp_path, every_steps=1, every_epochs=None, keep_last=None, background=True)
        trainer = build(device, [ReleaseAfter(release, step=2), saver])
        trainer.run_until("phase", step=2)  # step 1's write is held until 0.3 s after step 2: its save waits
    trainer.wait_for_checkpoints()
    assert [read_document(path)["position"]["global_step"] for path in sorted(tmp_path.glob("ckpt-*"))] == [1, 2]
    waited = [record.getMessage() for record in caplog.records if "waited" in record.getMessage()]
    assert len(waited) == 1 and float(waited[0].split()[1]) >= 0.2 and waited[0].endswith("the save at step 2")
    assert sum(" in the background: 16.01 MB in " in record.getMessage() for record in caplog.records) == 2


def test_with_when_busy_skip_a_save_due_during_a_write_is_skipped_and_the_log_says_so(
        tmp_path, device, monkeypatch, caplog):  # fmt: skip
    caplog.set_level(logging.INFO, logger="statetrainer.checkpoint")
    saver = st.callbacks.Checkpoint(tmp_path, every_steps=1, every_epochs=None, keep_last=None, background=True,
                                    when_busy="skip")  # fmt: skip
    trainer = build(device, [saver])
    with held_writes(monkeypatch) as release:
        trainer.run_until("phase", step=3)  # step 1's write is held; steps 2 and 3 are skipped
        release.set()
        trainer.wait_for_checkpoints()
    trainer.run_until("phase", step=4)
    trainer.wait_for_checkpoints()
    assert [read_document(path)["position"]["global_step"] for path in sorted(tmp_path.glob("ckpt-*"))] == [1, 4]
    skipped = [record.getMessage() for record in caplog.records if "skipped" in record.getMessage()]
    assert [message.split("step ")[1].split(":")[0] for message in skipped] == ["2", "3"]


def test_a_failed_background_write_prunes_nothing_and_the_run_stops_with_its_error(tmp_path, device, monkeypatch):
    saver = st.callbacks.Checkpoint(tmp_path, every_steps=1, every_epochs=None, keep_last=1, background=True)
    trainer = build(device, [saver])
    trainer.run_until("phase", step=2)
    trainer.wait_for_checkpoints()
    kept = sorted(tmp_path.glob("ckpt-*"))
    assert len(kept) == 1  # step 1's pruned once step 2's was durable

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(serialization, "save_file", refused)
    with pytest.raises(PermissionError, match="could not write .*step000000003.safetensors: permission denied"):
        trainer.fit()
    assert trainer.global_step in (3, 4)  # raised at the boundary after step 3's write failed, or at step 4's save
    assert sorted(tmp_path.glob("ckpt-*")) == kept and read_document(kept[0])["position"]["global_step"] == 2


def test_a_run_that_raises_waits_for_the_write_in_flight(tmp_path, device, monkeypatch):
    with held_writes(monkeypatch) as release:

        class Fails(st.callbacks.Callback):
            def on_exit_step(self, trainer):
                if trainer.global_step == 3:
                    threading.Timer(0.3, release.set).start()  # step 2's write ends 0.3 s after the error
                    raise RuntimeError("the user's callback failed")

        saver = st.callbacks.Checkpoint(tmp_path, every_steps=2, every_epochs=None, background=True)
        trainer = build(device, [saver, Fails()])
        with pytest.raises(RuntimeError, match="the user's callback failed"):
            trainer.fit()
        # the error came out only once step 2's file was written
        assert [read_document(path)["position"]["global_step"] for path in tmp_path.glob("ckpt-*")] == [2]


def test_with_when_busy_skip_the_best_epochs_saves_are_never_skipped(tmp_path, device, monkeypatch, recwarn):
    real_save_file = serialization.save_file

    def slow(*args, **kwargs):  # a slow disk: the step saves due during a write are skipped
        time.sleep(0.15)
        return real_save_file(*args, **kwargs)

    monkeypatch.setattr(serialization, "save_file", slow)
    saver = st.callbacks.Checkpoint(tmp_path, every_steps=1, every_epochs=None, keep_last=None, best="train_loss",
                                    keep_best=2, background=True, when_busy="skip")  # fmt: skip
    trainer = build(device, [st.callbacks.SmoothedLoss(), saver]).fit()
    assert len(list(tmp_path.glob("ckpt-*"))) < trainer.global_step  # some were skipped
    for path, epoch in [(saver.best_path, saver.best_epoch)] + [(saver.best_epoch_path(e), e) for _, e in saver.ranked]:
        document = read_document(path)
        assert document["position"]["epochs_done"] == epoch and document["machine"]["state"] in ("epoch", "idle"), path
    assert not [warning for warning in recwarn if "cannot be made" in str(warning.message)]
