"""``st.bisect``: a run's first bad batch found from its checkpoints, in about log2(N) loads and one replay."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

import statetrainer as st
from statetrainer.bisecting import bisect, probes
from statetrainer.callbacks import Checkpoint, CSVLogger, NonFiniteError, StopOnNonFinite


class Planted(Dataset):
    """200 regression samples; the sample at ``planted`` has a NaN feature."""

    def __init__(self, planted: int | None = None) -> None:
        generator = torch.Generator().manual_seed(0)
        self.features, self.targets = torch.randn(200, 3, generator=generator), torch.randn(200, 1, generator=generator)
        if planted is not None:
            self.features[planted, 1] = float("nan")

    def __len__(self) -> int:
        return 200

    def __getitem__(self, index: int):
        return self.features[index], self.targets[index]


def make(device, planted: int | None = None, callbacks=()) -> st.Trainer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))
    return st.Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-2), F.mse_loss,
                      [st.Phase("train", DataLoader(Planted(planted), batch_size=2, shuffle=True))],
                      callbacks=list(callbacks), epochs=2, device=device, seed=11)  # fmt: skip


def sample_of_batch(device, batch: int) -> int:
    """The first sample of the first epoch's batch ``batch``, from a clean run's ``batch_samples``."""
    trainer = make(device)
    trainer.run_until("batch", epoch=0, batch=batch)
    samples = trainer.batch_samples
    assert samples is not None
    return samples[0]


@pytest.mark.parametrize("every_steps", [5, 10, 20])
def test_bisect_finds_the_batch_that_first_held_a_planted_nan_in_log2_loads(tmp_path, device, every_steps):
    """A NaN planted in the sample the shuffled order puts in batch 90 (step 91): the run, saved every
    ``every_steps`` steps with ``StopOnNonFinite(every_batches=20)``, ends with ``NonFiniteError``; the bisect
    names batch 90 and that sample, after ceil(log2(N + 1)) loads for its N checkpoints and one more for a replay
    shorter than the interval."""
    planted = sample_of_batch(device, 90)
    folder = tmp_path / "checkpoints"
    saver = Checkpoint(folder, every_steps=every_steps, every_epochs=None, keep_last=None)
    with pytest.raises(NonFiniteError):
        make(device, planted, [saver, StopOnNonFinite(every_batches=20)]).fit()
    saved = sorted(folder.glob("ckpt-*.safetensors"))
    assert len(saved) == 90 // every_steps  # up to step 90; the next save refused the damaged weights

    found = bisect(folder, lambda: make(device, planted, [StopOnNonFinite(every_batches=20)]))
    assert (found.epoch, found.phase, found.batch, found.step) == (0, "train", 90, 90)
    assert planted in found.batch_samples
    assert found.checkpoint == saved[-1]
    assert found.loads == probes(len(saved)) + 1 == {5: 6, 10: 5, 20: 4}[every_steps]
    assert found.replayed == 90 - every_steps * len(saved) + 1
    assert not torch.isfinite(found.trainer.loss).all() and found.trainer.state == "batch"


def test_bisect_never_writes_and_says_when_nothing_went_wrong(tmp_path, device):
    folder = tmp_path / "checkpoints"
    make(device, None, [Checkpoint(folder, every_steps=50, every_epochs=None, keep_last=None)]).fit()
    before = {path: path.stat().st_mtime_ns for path in folder.iterdir()}
    with pytest.raises(ValueError, match="CSVLogger"):
        bisect(folder, lambda: make(device, None, [CSVLogger(tmp_path / "logs" / "log.csv")]))
    with pytest.raises(RuntimeError, match="found no bad batch"):
        bisect(folder, lambda: make(device))
    assert {path: path.stat().st_mtime_ns for path in folder.iterdir()} == before


def test_bisect_of_a_folder_without_checkpoints_is_refused(tmp_path, device):
    with pytest.raises(st.CheckpointError, match="holds no checkpoints"):
        bisect(tmp_path / "typo", lambda: make(device))
