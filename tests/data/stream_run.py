"""A run counted in stream batches: the subject of the stream tests, in process and killed in a subprocess.

    python stream_run.py FOLDER OUT [--loader seeded|endless] [--kill-at PHASE:EPOCH:BATCH] [--device D]

Every epoch trains on the next 4 batches of a stream (``Phase("train", loader, batches=4)``), then validates on a
whole small loader, for 6 epochs. The ``seeded`` stream is a shuffled DataLoader of 40 indexed samples in
batches of 4, with one worker in the script (10 batches a pass, so epoch 2 crosses from pass 1 to pass 2); the ``endless`` one is
an ``IterableDataset`` that never ends and keeps its own position. ``Seen`` records every training batch's sample
indices in its state, so a resumed run's record is the uninterrupted one's. Started again with the same FOLDER
the run resumes from its newest checkpoint (one every step); at the end it writes the model, the optimizer, the
record and the metrics to OUT. ``--kill-at`` SIGKILLs the run after that batch.
"""

from __future__ import annotations

import argparse
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, IterableDataset

import statetrainer as st
from statetrainer import callbacks as cb
from statetrainer.checkpoint import write_tree

SAMPLES, BATCH_SIZE, PER_EPOCH, EPOCHS = 40, 4, 4, 6


class IndexedSamples(Dataset):
    """``count`` samples of a 3-class problem; each is ``(features, label, index)``."""

    def __init__(self, count: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.features = torch.randn(count, 6, generator=generator)
        self.labels = self.features[:, :3].argmax(dim=1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.features[index] + 0.1 * torch.randn(6), self.labels[index], index  # augmented


class EndlessSamples(IterableDataset):
    """An endless stream of ``IndexedSamples``, sample ``n`` being sample ``n % count`` with noise seeded by ``n``;
    it keeps its own position."""

    def __init__(self, count: int) -> None:
        self.samples, self.position = IndexedSamples(count), 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        while True:
            index, self.position = self.position % len(self.samples), self.position + 1
            noise = torch.randn(6, generator=torch.Generator().manual_seed(self.position))
            yield self.samples.features[index] + 0.1 * noise, self.samples.labels[index], index

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])


class Seen(st.Callback):
    """The sample indices of every training batch, in order, kept in the run's state."""

    def __init__(self) -> None:
        self.indices: list[int] = []

    def on_exit_batch(self, trainer: st.Trainer) -> None:
        if trainer.phase == "train":
            self.indices += trainer.batch[2].tolist()

    def state_dict(self) -> dict[str, Any]:
        return {"indices": torch.tensor(self.indices, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.indices = state["indices"].tolist()


class KillAt(st.Callback):
    """SIGKILLs this process after batch ``batch_index`` of phase ``phase`` in epoch ``epoch``."""

    def __init__(self, phase: str, epoch: int, batch_index: int) -> None:
        self.where = (phase, epoch, batch_index)

    def on_exit_batch(self, trainer: st.Trainer) -> None:
        if (trainer.phase.name, trainer.epoch, trainer.batch_index) == self.where:
            os.kill(os.getpid(), signal.SIGKILL)


def unpack(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
    return batch[0], batch[1]


def build(loader: str, device: str | torch.device, folder: Path | None = None, extra: tuple[st.Callback, ...] = (),
          workers: int = 0, **options: Any) -> st.Trainer:  # fmt: skip
    """The run: checkpoints every step into ``folder`` (None: none), the seeded stream loaded by ``workers``
    worker processes; ``options`` go to the ``Trainer``.

    The tests in process use none: a trainer dropped mid-run leaves its stream's workers to the garbage
    collector, and new workers forked meanwhile can deadlock on the old ones' locks.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
    if loader == "seeded":
        train = DataLoader(IndexedSamples(SAMPLES), batch_size=BATCH_SIZE, shuffle=True, num_workers=workers)
    else:
        train = DataLoader(EndlessSamples(SAMPLES), batch_size=BATCH_SIZE)
    valid = DataLoader(IndexedSamples(12, seed=1), batch_size=BATCH_SIZE)
    callbacks: list[st.Callback] = [Seen(), cb.SmoothedLoss(), cb.Accuracy(), *extra]
    if folder is not None:
        callbacks.append(cb.Checkpoint(folder, every_steps=1, keep_last=2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    settings: dict[str, Any] = {"epochs": EPOCHS, "seed": 5, "device": device, "unpack": unpack, **options}
    phases = [st.Phase("train", train, batches=PER_EPOCH), st.Phase("valid", valid, grad=False)]
    return st.Trainer(model, optimizer, F.cross_entropy, phases, callbacks=callbacks, **settings)


def outcome(trainer: st.Trainer) -> dict[str, Any]:
    """What a finished run ends with: the weights, the optimizer, the samples seen, the metrics."""
    seen = next(callback for callback in trainer.callbacks if isinstance(callback, Seen))
    return {"model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
            "seen": torch.tensor(seen.indices), "metrics": dict(trainer.metrics)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("out")
    parser.add_argument("--loader", choices=("seeded", "endless"), default="seeded")
    parser.add_argument("--kill-at", help="PHASE:EPOCH:BATCH: SIGKILL after that batch")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    extra: tuple[st.Callback, ...] = ()
    if args.kill_at:
        phase, epoch, batch = args.kill_at.split(":")
        extra = (KillAt(phase, int(epoch), int(batch)),)
    trainer = build(args.loader, args.device, args.folder, extra, workers=1)
    trainer.load_checkpoint(args.folder)
    trainer.fit()
    write_tree(args.out, outcome(trainer), st.__version__)


if __name__ == "__main__":
    main()
