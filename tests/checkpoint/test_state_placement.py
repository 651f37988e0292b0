"""Loaded state goes back to the device the run keeps it on, whatever device wrote it."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import statetrainer as st
from statetrainer.callbacks import Accuracy, SmoothedLoss
from statetrainer.checkpoint import read_tree, write_tree

from .resumable_run import MeanConfidence  # a user's metric, written as the README teaches

DATA = TensorDataset(torch.randn(48, 3, generator=torch.Generator().manual_seed(0)),
                     torch.randint(2, (48,), generator=torch.Generator().manual_seed(1)))  # fmt: skip


def build(device: torch.device | str) -> st.Trainer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.2), nn.Linear(8, 2))
    return st.Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-2), F.cross_entropy,
                      [st.Phase("train", DataLoader(DATA, batch_size=6, shuffle=True)),
                       st.Phase("valid", DataLoader(DATA, batch_size=16), grad=False)],
                      callbacks=[SmoothedLoss(), Accuracy(), MeanConfidence()], seed=3, epochs=2, device=device,
                      accumulate=2, deterministic=torch.device(device).type == "cuda")  # fmt: skip


def advance_to_mid_phase(trainer: st.Trainer, batch_index: int = 4) -> None:
    while not (trainer.state == "phase" and trainer.phase.name == "train" and trainer.batch_index == batch_index):
        trainer.advance()


def tensors_of(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [tensor for value in tree.values() for tensor in tensors_of(value)]
    if isinstance(tree, (list, tuple)):
        return [tensor for value in tree for tensor in tensors_of(value)]
    return []


def assert_state_on(trainer: st.Trainer, device: torch.device) -> None:
    """Every tensor of every callback, of the optimizer and of pending gradients lives on ``device``."""
    where = {}
    for callback in trainer.callbacks:
        where.update({f"{callback.key}[{index}]": tensor.device
                      for index, tensor in enumerate(tensors_of(callback.state_dict()))})  # fmt: skip
    where.update({f"optimizer[{index}]": tensor.device
                  for index, tensor in enumerate(tensors_of(trainer.optimizer.state_dict()["state"]))
                  if tensor.dim()})  # Adam's step counts stay on the CPU by design  # fmt: skip
    where.update(
        {f"grad[{index}]": p.grad.device for index, p in enumerate(trainer.model.parameters()) if p.grad is not None}
    )
    assert any(name.startswith("MeanConfidence") for name in where)
    wrong = {name: placed for name, placed in where.items() if placed.type != device.type}
    assert not wrong, f"not on {device}: {wrong}"


def test_a_users_metric_resumes_on_the_device_it_ran_on_and_the_run_ends_exactly(tmp_path, device):
    whole = build(device).fit()
    first = build(device)
    advance_to_mid_phase(first)
    path = first.save_checkpoint(tmp_path)
    second = build(device)
    second.load_checkpoint(path)
    assert_state_on(second, device)
    second.fit()
    assert whole.metrics == second.metrics and "train_confidence" in second.metrics
    for left, right in zip(whole.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(left, right)


def test_loaded_callback_tensors_are_the_runs_own_not_views_of_the_file(tmp_path, device):
    first = build(device)
    advance_to_mid_phase(first)
    path = first.save_checkpoint(tmp_path)
    second = build(device)
    second.load_checkpoint(path)
    loaded = second.callbacks[2].total.clone()
    path.write_bytes(b"\0" * path.stat().st_size)  # the file changes under a running job (pruned, replaced)
    assert torch.equal(second.callbacks[2].total, loaded)


def test_a_checkpoint_with_cuda_generator_states_loads_on_a_cpu_run(tmp_path):
    first = build("cpu")
    advance_to_mid_phase(first)
    tree = first.state_dict()
    tree["rng"]["ranks"][0]["cuda"] = [torch.zeros(16, dtype=torch.uint8)]  # as a CUDA run writes it
    path = write_tree(tmp_path / "from-cuda.safetensors", tree, st.__version__)
    second = build("cpu")
    second.load_checkpoint(path)
    assert_state_on(second, torch.device("cpu"))
    second.fit()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("written_on", "loaded_on"), [("cuda", "cpu"), ("cpu", "cuda")])
def test_a_checkpoint_moves_between_cpu_and_cuda(tmp_path, written_on, loaded_on):
    first = build(written_on)
    advance_to_mid_phase(first)
    path = first.save_checkpoint(tmp_path)
    assert len(read_tree(path)["rng"]["ranks"][0]["cuda"]) == (
        1 if written_on == "cuda" else 0
    )  # the generators of the run's devices
    second = build(loaded_on)
    second.load_checkpoint(path)
    assert_state_on(second, torch.device(loaded_on))
    second.fit()
    assert second.finished and set(second.metrics) == set(build(loaded_on).fit().metrics)
