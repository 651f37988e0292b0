"""Non-finite losses and gradients stop the run, naming the batch; no checkpoint saves a NaN run."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import statetrainer as st
from statetrainer.callbacks import Checkpoint, NonFiniteError, StopOnNonFinite
from statetrainer.checkpoint import checkpoint_files, read_tree

from ..conftest import regression_batches


def poisoned_batches(count: int, poisoned_at: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches = regression_batches(count)
    inputs, target = batches[poisoned_at]
    batches[poisoned_at] = (inputs, torch.full_like(target, math.nan))  # its loss is NaN, and so is every weight after
    return batches


def trainer_for(batches, callbacks, device: torch.device, **options) -> st.Trainer:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    return st.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), F.mse_loss, [st.Phase("train", batches)],
                      callbacks=callbacks, device=device, seed=0, **options)  # fmt: skip


@pytest.mark.parametrize("every_batches", [1, 4])
def test_a_nan_loss_stops_the_run_naming_its_batch(device: torch.device, every_batches: int):
    trainer = trainer_for(poisoned_batches(20, poisoned_at=10), [StopOnNonFinite(every_batches=every_batches)], device)
    with pytest.raises(NonFiniteError, match=r"epoch 1, phase 'train', batch 11 \(step"):  # counted from 1
        trainer.fit()
    assert trainer.batch_index == 10 + (-11 % every_batches)  # read at the first multiple of every_batches
    assert trainer.batch_index < 19


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_run_resumed_mid_phase_still_stops_on_a_nan_naming_its_batch(device: torch.device, tmp_path, accumulate):
    """Resumed after batch 3 (inside a window of 2 with ``accumulate=2``), no phase is entered in the new process:
    the callback still counts, and stops at the poisoned batch 11."""
    first = trainer_for(poisoned_batches(20, poisoned_at=10), [StopOnNonFinite(every_batches=4)], device,
                        accumulate=accumulate)  # fmt: skip
    first.run_until("phase", batch=2)
    saved = first.save_checkpoint(tmp_path / "mid.safetensors")
    second = trainer_for(poisoned_batches(20, poisoned_at=10), [StopOnNonFinite(every_batches=4)], device,
                         accumulate=accumulate)  # fmt: skip
    second.load_checkpoint(saved)
    with pytest.raises(NonFiniteError, match=r"epoch 1, phase 'train', batch 11 \(step"):
        second.fit()


def test_a_non_finite_gradient_with_a_finite_loss_stops_the_run(device: torch.device):
    trainer = trainer_for(regression_batches(12), [StopOnNonFinite(every_batches=3)], device)
    trainer.model.weight.register_hook(lambda grad: grad * math.inf if trainer.batch_index == 5 else grad)
    with pytest.raises(NonFiniteError, match="batch 6 "):  # the sixth, counted from 1
        trainer.fit()


def test_a_checkpoint_is_never_written_from_nan_weights_and_the_finite_ones_are_kept(device: torch.device, tmp_path):
    folder = tmp_path / "run"
    trainer = trainer_for(poisoned_batches(20, poisoned_at=10), [Checkpoint(folder, every_steps=3, keep_last=3)],
                          device)  # fmt: skip
    with pytest.raises(NonFiniteError, match="is not finite, so the run is not saved; the last checkpoint"):
        trainer.fit()
    kept = checkpoint_files(folder)
    assert len(kept) == 3 and "step000000009" in kept[-1].name  # the last save before the NaN batch (10)
    for path in kept:
        weights = read_tree(path)["step"]["model"]
        assert all(bool(torch.isfinite(value).all()) for value in weights.values()), path.name
