"""A training script that resumes itself: the subject of the kill-and-restart tests.

    python resumable_run.py FOLDER OUT [--kill-at EPOCH:PHASE:BATCH] [--signal-at EPOCH:PHASE:BATCH:SIGNAL]
                            [--accumulate N] [--pad-mb M] [--device D] [--precision P] [--deterministic]
                            [--background] [--in-write N:POINT:SIGNAL] [--ema]

It trains with everything that makes exact resume hard: a shuffled DataLoader
with two workers, random augmentation drawing from torch, NumPy and Python,
dropout, Adam with the one-cycle schedule cycling its betas, SmoothedLoss,
Accuracy, a user's own Metric with a tensor accumulator, a CSV log, and
checkpoints every 3 steps. Started again with the same FOLDER, it continues
from the newest checkpoint; at the end it writes the final model, optimizer and
metrics to OUT. ``--kill-at`` makes it SIGKILL itself after that batch;
``--signal-at`` sends SIGNAL to its whole process group (itself and its
DataLoader workers, as a scheduler or Ctrl-C does) as that batch starts;
``--pad-mb`` adds a constant buffer so each checkpoint write takes long enough
to be caught mid-write. ``--background`` writes the checkpoints in the
background; ``--in-write`` then has SIGNAL (KILL or TERM) land as the N-th
background write reaches POINT (see ``InWrite``), while training goes on. ``--ema``
adds an ``EMA`` of the weights (the validation runs on it) and writes the average to OUT.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, IterableDataset

import statetrainer as st
from statetrainer import callbacks as cb
from statetrainer.checkpoint import write_tree


class MeanConfidence(st.callbacks.Metric):
    """A metric written as the README teaches: the mean top softmax probability, accumulated on the device."""

    metric_name = "confidence"

    def __init__(self) -> None:
        super().__init__()
        self.total, self.count = torch.zeros(()), 0

    def reset(self, trainer: st.Trainer) -> None:
        self.total, self.count = torch.zeros((), device=trainer.device), 0

    def update(self, trainer: st.Trainer) -> None:
        self.total += trainer.output.detach().float().softmax(dim=1).amax(dim=1).sum()
        self.count += len(trainer.output)

    def compute(self) -> torch.Tensor:
        return self.total / self.count

    def state_dict(self) -> dict:
        return {**super().state_dict(), "total": self.total, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.total, self.count = state["total"], state["count"]


class NoisyShapeStream(IterableDataset):
    """The training shapes as a stream that keeps its own position (``state_dict``/``load_state_dict``).

    Sample i of an epoch is shape ``(epoch * 7 + i) % size`` of ``NoisyShapes``, its noise drawn from
    a generator seeded by both, so a resumed stream repeats the original exactly.
    """

    def __init__(self, size: int) -> None:
        self.shapes = NoisyShapes(size, augment=False)
        self.epoch, self.position = 0, 0

    def __iter__(self):
        while self.position < len(self.shapes):
            index, self.position = self.position, self.position + 1
            image, label = self.shapes[(self.epoch * 7 + index) % len(self.shapes)]
            generator = torch.Generator().manual_seed(self.epoch * 100_003 + index)
            yield image + 0.3 * torch.randn(image.shape, generator=generator), label
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class NoisyShapes(Dataset):
    """Class k is a bright square at one of 4 places; augmentation adds noise, flips and shifts."""

    def __init__(self, size: int, augment: bool) -> None:
        generator = torch.Generator().manual_seed(123)
        self.labels = torch.randint(4, (size,), generator=generator)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label = int(self.labels[index])
        image = torch.zeros(1, 12, 12)
        row, col = divmod(label, 2)
        image[:, row * 6 + 1 : row * 6 + 5, col * 6 + 1 : col * 6 + 5] = 1.0
        if self.augment:
            image = image + 0.3 * torch.randn_like(image)  # torch
            image = image * float(np.random.uniform(0.8, 1.2))  # NumPy
            image = image.roll(random.choice([-1, 0, 1]), dims=-1)  # Python
        return image, label


def build(folder: str, accumulate: int, pad_mb: int, extra: list[st.Callback], loader: str = "seeded",
          background: bool = False, **options) -> st.Trainer:  # fmt: skip
    torch.manual_seed(0)
    np.random.seed(0)  # a loader that augments in this process draws from NumPy's and Python's global generators
    random.seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Dropout(0.3), nn.Linear(8 * 6 * 6, 4),
    )  # fmt: skip
    if pad_mb:
        model.register_buffer("pad", torch.zeros(pad_mb * 2**18))
    if loader == "stream":  # an unsized stream, in the main process: it resumes through its own state
        train = DataLoader(NoisyShapeStream(480), batch_size=16)
    elif loader.startswith("torchdata"):  # torchdata's StatefulDataLoader: it resumes through its own state
        from torchdata.stateful_dataloader import StatefulDataLoader

        # In the main process its augmentation draws from the run's generators, which checkpoints carry; in
        # workers it would draw from the workers' generators, which its state does not hold, so none there.
        workers = 2 if loader == "torchdata" else 0
        train = StatefulDataLoader(NoisyShapes(480, augment=workers == 0), batch_size=16, shuffle=True,
                                   num_workers=workers)  # fmt: skip
    else:  # rebuilt by the trainer with a seeded order
        train = DataLoader(NoisyShapes(480, augment=True), batch_size=16, shuffle=True, num_workers=2)
    valid = DataLoader(NoisyShapes(96, augment=False), batch_size=32, num_workers=2)
    epochs = 3
    steps = epochs * -(-30 // accumulate)  # 480 samples in batches of 16
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    return st.Trainer(
        model, optimizer, F.cross_entropy,
        phases=[st.Phase("train", train), st.Phase("valid", valid, grad=False)],
        callbacks=[
            cb.OneCycle(1e-2, total_steps=steps, cycle_momentum=True),
            cb.SmoothedLoss(), cb.Accuracy(), MeanConfidence(),
            cb.CSVLogger(os.path.join(folder, "log.csv"), every_batches=5),
            cb.Checkpoint(folder, every_steps=3, every_epochs=1, keep_last=2, background=background),
            *extra,
        ],
        epochs=epochs, accumulate=accumulate, seed=7, **options,
    )  # fmt: skip


class KillAt(st.Callback):
    def __init__(self, epoch: int, phase: str, batch_index: int) -> None:
        self.where = (epoch, phase, batch_index)

    def on_exit_batch(self, trainer: st.Trainer) -> None:
        if (trainer.epoch, trainer.phase.name, trainer.batch_index) == self.where:
            os.kill(os.getpid(), signal.SIGKILL)


class SignalAt(st.Callback):
    """Has the whole process group signalled as a batch starts: the batch is in flight when it lands.

    The signal comes from another process, as a scheduler's or a terminal's
    does (PyTorch's workers treat a SIGTERM from their own parent as a
    request to shut down quietly), and has been delivered when this returns.
    Unshielded DataLoader workers would die of it, and PyTorch would raise in
    this process: this test's run would then end with status 1, not 128 + N.
    """

    def __init__(self, epoch: int, phase: str, batch_index: int, name: str) -> None:
        self.where = (epoch, phase, batch_index)
        self.signal = signal.Signals[name]
        self.sent = False

    def on_enter_batch(self, trainer: st.Trainer) -> None:
        if not self.sent and (trainer.epoch, trainer.phase.name, trainer.batch_index) == self.where:
            self.sent = True
            signal_group(self.signal)
            time.sleep(0.5)  # a long batch: a worker the signal killed would make PyTorch raise here


def signal_group(number: signal.Signals) -> None:
    """Signal this process's group from another process, as a scheduler does (see ``SignalAt``), and wait for it."""
    sender = f"import os; os.killpg({os.getpgrp()}, {int(number)})"
    subprocess.run([sys.executable, "-c", sender], check=True, start_new_session=True)


class InWrite:
    """Lands a signal as the ``count``-th background checkpoint write reaches ``point``, in the writer's thread.

    The points are the file operations of the atomic write, seen through an audit hook: ``start`` (its private
    folder is made), ``mid`` (a few milliseconds later, while safetensors writes), ``written`` (the temporary
    file is whole, not yet synced), ``renamed`` (just before the rename over the checkpoint's name) and
    ``pruned`` (the new file is durable; an old one is about to be deleted). SIGKILL kills this process there;
    SIGTERM goes to its process group, and the run goes on to the preemption save.
    """

    EVENTS = {"start": "os.mkdir", "mid": "os.mkdir", "written": "os.chmod", "renamed": "os.rename",
              "pruned": "os.remove"}  # fmt: skip

    def __init__(self, folder: str, count: int, point: str, name: str) -> None:
        self.folder, self.count, self.point = os.path.abspath(folder), count, point
        self.signal, self.seen, self.done = signal.Signals[f"SIG{name}"], 0, False
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple[Any, ...]) -> None:
        if self.done or threading.current_thread().name != "statetrainer-checkpoint-writer":
            return
        if event == "os.mkdir" and os.fsdecode(args[0]).endswith(".tmp"):
            self.seen += 1  # one private folder per write
        if event != self.EVENTS[self.point] or self.seen != self.count:
            return
        if not os.path.abspath(os.fsdecode(args[0])).startswith(self.folder):
            return
        self.done = True
        if self.point == "mid":
            threading.Timer(0.003, self._land).start()
        else:
            self._land()

    def _land(self) -> None:
        if self.signal == signal.SIGKILL:
            os.kill(os.getpid(), signal.SIGKILL)
        signal_group(self.signal)
        time.sleep(0.5)  # a slow disk: the write is still in flight when the training thread stops


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("out")
    parser.add_argument("--kill-at", default=None)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--pad-mb", type=int, default=0)
    parser.add_argument("--signal-at", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default=None)
    parser.add_argument("--deterministic", action="store_true")
    parser.add_argument("--background", action="store_true")
    parser.add_argument("--in-write", default=None)
    parser.add_argument("--ema", action="store_true", help="an EMA of the weights, which the validation runs on")
    parser.add_argument("--loader", choices=("seeded", "stream", "torchdata", "torchdata-main"), default="seeded",
                        help="the training loader: a DataLoader, a stream, a StatefulDataLoader with or without workers")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(1)

    extra: list[st.Callback] = []
    if args.kill_at:
        epoch, phase, batch = args.kill_at.split(":")
        extra.append(KillAt(int(epoch), phase, int(batch)))
    if args.signal_at:
        epoch, phase, batch, name = args.signal_at.split(":")
        extra.append(SignalAt(int(epoch), phase, int(batch), name))
    if args.background:  # the writes' log lines, on stderr
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.in_write:
        count, point, name = args.in_write.split(":")
        InWrite(args.folder, int(count), point, name)
    if args.ema:
        extra.append(cb.EMA(0.9))
    options = {"device": args.device, "precision": args.precision, "deterministic": args.deterministic}
    trainer = build(args.folder, args.accumulate, args.pad_mb, extra, loader=args.loader,
                    background=args.background, **options)  # fmt: skip
    resumed = trainer.load_checkpoint(args.folder)
    print(f"resumed from {resumed}" if resumed else "fresh start", flush=True)
    trainer.fit()
    model = {key: value for key, value in trainer.model.state_dict().items() if key != "pad"}
    ema = [callback.averaged for callback in trainer.callbacks if isinstance(callback, cb.EMA)]
    write_tree(args.out, {"model": model, "optimizer": trainer.optimizer.state_dict(), "metrics": trainer.metrics,
                          **({"ema": ema[0]} if ema else {})}, st.__version__)  # fmt: skip


if __name__ == "__main__":
    main()
