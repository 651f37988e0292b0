"""Background checkpoints (``save_checkpoint(background=True)``): the bytes of a synchronous save (its tensors,
document and checksum), written while training changes the model; one write at a time; a failed write raised in
the training thread."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

import statetrainer as st
from statetrainer.checkpoint import StagingBuffers, read_document, read_header, read_tree, serialization

PAD = 4_000_000  # 16 MB of float32 beside the weights: a write that takes a while


def build(device: torch.device) -> st.Trainer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 1))
    model.register_buffer("pad", torch.arange(PAD, dtype=torch.float32))
    batches = [(torch.randn(6, 4), torch.randn(6, 1)) for _ in range(5)]
    return st.Trainer(model, torch.optim.Adam(model.parameters(), lr=0.05), F.mse_loss, [st.Phase("train", batches)],
                      epochs=3, device=device, seed=1)  # fmt: skip


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
    first = staging.stage(live)
    buffers = [first["a"].data_ptr(), first["b"][0].data_ptr()]
    live["a"] += 1
    assert torch.equal(first["a"], torch.ones(3)) and first["b"][1:] == [5, "x", None]
    second = staging.stage(live)
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
