"""``st.summary``: a model's parameters by top-level module, and the bytes a checkpoint of its run holds."""

from __future__ import annotations

import struct

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import statetrainer as st


class TiedLanguageModel(nn.Module):
    """An embedding tied to the output layer, a frozen block, a BatchNorm's buffers and a parameter of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.block = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 16))
        self.frozen = nn.Linear(16, 16)
        self.frozen.requires_grad_(False)
        self.out = nn.Linear(16, 50, bias=False)
        self.out.weight = self.embed.weight
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.frozen(self.block(self.embed(tokens)))) * self.scale


def test_the_parameters_are_counted_once_each_by_top_level_module():
    model = TiedLanguageModel()
    found = st.summary(model)
    unique = {id(parameter): parameter for parameter in model.parameters()}.values()
    assert found.parameters == 50 * 16 + (16 * 32 + 32) + 2 * 32 + (32 * 16 + 16) + (16 * 16 + 16) + 1
    assert found.parameters == sum(parameter.numel() for parameter in unique)
    assert found.trainable == found.parameters - (16 * 16 + 16)
    assert found.parameter_bytes == 4 * found.parameters
    assert found.buffer_bytes == 4 * (32 + 32) + 8  # running mean and variance, and the batch count (int64)
    rows = {row.name: row for row in found.modules}
    assert list(rows) == ["", "embed", "block", "frozen", "out"]
    assert (rows[""].parameters, rows["frozen"].trainable, rows["out"].parameters) == (1, 0, 50 * 16)  # out: tied
    text = str(found)
    assert "(its own)" in text and "frozen" in text and f"parameters {found.parameters:,}" in text


def test_a_trainers_checkpoint_bytes_are_the_tensor_bytes_after_the_files_header(tmp_path, device):
    """Saved after training (Adam's moments made), the file's bytes after its header are the summary's."""
    torch.manual_seed(0)
    model = TiedLanguageModel()
    tokens = torch.randint(0, 50, (64,))
    batches = [(tokens[index : index + 8], tokens[index : index + 8]) for index in range(0, 64, 8)]
    trainer = st.Trainer(model, torch.optim.Adam(model.parameters()), F.cross_entropy, [st.Phase("train", batches)],
                         callbacks=[st.callbacks.SmoothedLoss()], epochs=1, device=device, seed=1)  # fmt: skip
    before = st.summary(trainer).checkpoint_bytes
    assert before is not None and before["optimizer"] == 0  # Adam makes its state at its first step
    trainer.fit()
    found = st.summary(trainer)
    assert found.checkpoint_bytes is not None
    path = trainer.save_checkpoint(tmp_path / "run.safetensors")
    data = path.read_bytes()
    (header_length,) = struct.unpack("<Q", data[:8])
    assert sum(found.checkpoint_bytes.values()) == len(data) - 8 - header_length
    assert found.checkpoint_bytes["model"] == found.parameter_bytes + found.buffer_bytes
    trainable = found.trainable * 4
    # Adam: two moments per trainable parameter, and a step count per parameter tensor (one float each)
    steps = sum(1 for parameter in model.parameters() if parameter.requires_grad) * 4
    assert found.checkpoint_bytes["optimizer"] == 2 * trainable + steps
    assert "a checkpoint now:" in str(found)


def test_summary_names_what_it_takes():
    with pytest.raises(TypeError, match="a torch.nn.Module or a statetrainer Trainer"):
        st.summary("model")
