"""Resuming deep into a stream: the seconds from process start to the first trained batch, against replaying.

A synthetic dataset of 1,000,000 small samples (8 numbers each, made from the
index) in a shuffled DataLoader of batch 4: 250,000 batches a pass. The run
trains ``Phase("train", loader, batches=1000)`` epochs, so stream batch
660,000 lies in the third pass. A checkpoint there is made without training
the batches before it (the saved state of a run that got that far), then a
fresh process loads it and trains its next batch; the parent times that
process from its start to the end of that batch. A loader that replayed the
batches it had seen would first iterate 660,000 of them: that cost is
measured on the same DataLoader over ``--replay`` batches and scaled.

    uv run python benchmarks/stream_resume.py [--replay 50000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import statetrainer as st

SAMPLES, BATCH_SIZE, PER_EPOCH, RESUME_AT = 1_000_000, 4, 1000, 660_000


class Numbers(Dataset):
    """Sample ``i`` is 8 numbers made from ``i``, and a target."""

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.full((8,), index / SAMPLES), torch.tensor([index % 7 / 7])


def build() -> st.Trainer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    loader = DataLoader(Numbers(), batch_size=BATCH_SIZE, shuffle=True)
    return st.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), nn.functional.mse_loss,
                      [st.Phase("train", loader, batches=PER_EPOCH)], epochs=1000, device="cpu", seed=0)  # fmt: skip


def checkpoint_at_stream_batch(path: Path) -> None:
    """The checkpoint of a run after stream batch ``RESUME_AT`` (one batch into its epoch), made without training."""
    trainer = build()
    trainer.run_until("phase", batch=0)
    state = trainer.state_dict()
    epoch, passes = divmod(RESUME_AT, PER_EPOCH)[0], divmod(RESUME_AT + 1, SAMPLES // BATCH_SIZE)
    state["position"].update(epoch=epoch, epochs_done=epoch, global_step=RESUME_AT + 1)
    state["data"][0]["stream"] = {"pass": passes[0], "batches": passes[1], "samples": passes[1] * BATCH_SIZE}
    fresh = build()
    fresh.load_state_dict(state)
    fresh.save_checkpoint(path)


def resume(path: str) -> None:
    """The child: load ``path``, train one batch, say where the stream stands and how long that took."""
    trainer = build()
    start = time.perf_counter()
    trainer.load_checkpoint(path)
    trainer.run_until("phase", batch=1)
    seconds = time.perf_counter() - start
    stream = trainer.parts["data"].streams[0]
    print(f"trained epoch {trainer.epoch} batch {trainer.batch_index}: pass {stream.pass_index + 1}, "
          f"batch {stream.taken} of it, step {trainer.global_step}; load and batch {seconds:.3f} s", flush=True)  # fmt: skip


def replay_seconds(batches: int) -> float:
    """Seconds to iterate ``batches`` batches of the DataLoader, as a replaying resume would."""
    loader = iter(DataLoader(Numbers(), batch_size=BATCH_SIZE, shuffle=True))
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replay", type=int, default=50_000, help="batches to time a replay over")
    parser.add_argument("--rounds", type=int, default=3, help="resumed processes to time")
    parser.add_argument("--resume", help=argparse.SUPPRESS)  # the child's job
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.resume:
        resume(args.resume)
        return
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "deep.safetensors"
        checkpoint_at_stream_batch(path)
        seconds, said = [], ""
        for _ in range(args.rounds):
            start = time.perf_counter()
            said = subprocess.run([sys.executable, __file__, "--resume", str(path)], check=True,
                                  capture_output=True, text=True).stdout.strip()  # fmt: skip
            seconds.append(time.perf_counter() - start)
    replay = replay_seconds(args.replay) / args.replay * RESUME_AT
    print(f"torch {torch.__version__}, 1 thread; a stream of {SAMPLES:,} samples in batches of {BATCH_SIZE}, "
          f"resumed at stream batch {RESUME_AT:,}")  # fmt: skip
    print(f"the resumed process {said}")
    print(f"process start to first trained batch: median {statistics.median(seconds):.2f} s "
          f"(min {min(seconds):.2f}, max {max(seconds):.2f}, {args.rounds} processes)")  # fmt: skip
    print(f"replaying {RESUME_AT:,} batches instead: {replay:.1f} s (timed over {args.replay:,}, scaled)")


if __name__ == "__main__":
    main()
