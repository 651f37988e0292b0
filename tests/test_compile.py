"""``Trainer(compile=True)``: the model compiled in place; exact resumes on the CPU, and checkpoints that move
between compiled and eager trainers. Compiling takes tens of seconds on two cores, so these are ``slow``."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import statetrainer as st

from .test_distributed import KILLED, launch, same_run


def build(folder, device, compile: bool | dict, epochs: int = 1) -> st.Trainer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
    generator = torch.Generator().manual_seed(1)
    inputs, labels = torch.randn(64, 6, generator=generator), torch.randint(0, 3, (64,), generator=generator)
    batches = [(inputs[index : index + 8], labels[index : index + 8]) for index in range(0, 64, 8)]
    return st.Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-2), F.cross_entropy,
                      [st.Phase("train", batches), st.Phase("valid", batches[:2], grad=False)],
                      callbacks=[st.callbacks.Checkpoint(folder, every_steps=3)], epochs=epochs, device=device,
                      seed=4, compile=compile)  # fmt: skip


def test_a_bad_compile_setting_is_refused_before_anything_compiles(tmp_path, device):
    with pytest.raises(TypeError, match="compile must be True, False or a dict of torch.compile's options"):
        build(tmp_path, device, compile="max-autotune")  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.parametrize(("saved_by", "loaded_by"), [(True, False), (False, {"dynamic": False})],
                         ids=["compiled-to-eager", "eager-to-compiled"])  # fmt: skip
def test_a_checkpoint_moves_between_compiled_and_eager_trainers(tmp_path, device, saved_by, loaded_by):
    """Compiled in place, the model keeps its own keys: a compiled run's checkpoint loads into an eager trainer
    and an eager run's into a compiled one (torch.compile's options given as a dict), with the weights saved, and
    trains on."""
    saved = build(tmp_path, device, compile=saved_by).fit()
    assert (saved.model._compiled_call_impl is not None) == saved_by  # compiled in place, or not
    assert all(not key.startswith("_orig_mod") for key in saved.model.state_dict())
    weights = {key: value.clone() for key, value in saved.model.state_dict().items()}
    loaded = build(tmp_path, device, compile=loaded_by, epochs=2)
    assert (loaded.model._compiled_call_impl is not None) == (loaded_by is not False)
    loaded.load_checkpoint(tmp_path)
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    loaded.fit()
    assert loaded.global_step == 16 and loaded.finished


@pytest.mark.slow
def test_a_compiled_run_sigkilled_resumes_bit_identical_on_the_cpu(tmp_path, device):
    """``--compile`` (Trainer(compile=True)), dropout, augmentation, Adam, windows of 2, one process: SIGKILLed in
    epoch 2, the same command resumes and ends as the uninterrupted compiled run, bit for bit."""
    if device.type != "cpu":
        pytest.skip("the CPU is what this test is about")
    options = (*KILLED, "--compile")
    launch(tmp_path / "whole", *options, processes=1)
    folder = tmp_path / "run"
    killed = launch(folder, *options, "--kill", "0:1:2", processes=1, check=False)
    assert killed.returncode != 0 and (folder / "killed").exists()
    launch(folder, *options, "--kill", "0:1:2", processes=1)
    same_run(folder, tmp_path / "whole")


@pytest.mark.slow
def test_a_compiled_ddp_run_with_rank_1_sigkilled_resumes_bit_identical_on_the_cpu(tmp_path, device):
    """``--compile`` under torchrun, 2 ranks, DDP over the compiled module (gloo): rank 1 SIGKILLed in epoch 2, the
    same command resumes and ends as the uninterrupted compiled run on both ranks, bit for bit."""
    if device.type != "cpu":
        pytest.skip("the CPU is what this test is about")
    options = (*KILLED, "--compile")
    launch(tmp_path / "whole", *options)
    folder = tmp_path / "run"
    killed = launch(folder, *options, "--kill", "1:1:2", check=False)
    assert killed.returncode != 0 and (folder / "killed").exists()
    launch(folder, *options, "--kill", "1:1:2")
    same_run(folder, tmp_path / "whole")
