"""Resume time does not grow with the batch a run resumes at (no replay).

A shuffled DataLoader over 200,000 samples that each cost real work to load
(a 3x32x32 random image, normalised): 3,125 batches of 64. A checkpoint is
taken after batch 1 and after the second-to-last batch; for each, the time from
``load_checkpoint`` to the first resumed batch's forward pass is printed. A
loader that replayed the epoch would take seconds longer for the late one.

    uv run python benchmarks/resume.py
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import statetrainer as st


class Images(Dataset):
    def __len__(self) -> int:
        return 200_000

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = torch.randn(3, 32, 32)
        return (image - image.mean()) / image.std(), index % 10


def build() -> st.Trainer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    loader = DataLoader(Images(), batch_size=64, shuffle=True)
    return st.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), nn.functional.cross_entropy,
                      [st.Phase("train", loader)], device="cpu", seed=0)  # fmt: skip


def checkpoint_at(batch_index: int, folder: Path) -> Path:
    """A checkpoint after ``batch_index``, made without running the batches before it."""
    trainer = build()
    trainer.run_until("phase")
    position = trainer.state_dict()
    position["position"]["batch_index"] = batch_index  # the saved state of a run that got this far
    fresh = build()
    fresh.load_state_dict(position)
    return fresh.save_checkpoint(folder / f"at{batch_index}.safetensors")


def main() -> None:
    torch.set_num_threads(1)
    batches = len(build().phases[0].loader)
    with tempfile.TemporaryDirectory() as folder:
        for batch_index in (1, batches - 2):
            path = checkpoint_at(batch_index, Path(folder))
            times = []
            for _ in range(5):
                trainer = build()
                start = time.perf_counter()
                trainer.load_checkpoint(path)
                trainer.run_until("batch")
                times.append(time.perf_counter() - start)
            print(f"resume after batch {batch_index:5d} of {batches}: {statistics.median(times) * 1e3:7.1f} ms "
                  "to the first resumed forward pass")  # fmt: skip
    start = time.perf_counter()
    for _, _ in zip(range(batches - 2), iter(build().phases[0].loader), strict=False):  # the first batches - 2
        pass
    print(f"(replaying those batches instead would take {time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
