"""Per-batch time of statetrainer under torchrun against a hand-written DDP loop, and what a checkpoint costs.

For 1 and 2 processes (gloo on the CPU, one thread each; NCCL with ``--device cuda``)
it launches itself under torchrun. Each rank trains an MLP (32-256-256-10,
batch 64 per rank) on the same ``TensorDataset``, one epoch per round, with
the two loops interleaved round by round:

- hand: ``DistributedDataParallel`` and a ``DataLoader`` with a ``DistributedSampler``,
  ``zero_grad``/forward/``backward``/``step``;
- statetrainer: the same model, optimizer and a shuffled ``DataLoader`` given to a
  ``Trainer`` (which wraps the model in DDP, shards the loader, and shares stop
  signals between the ranks after every batch).

It then times ``trainer.save_checkpoint`` (every rank gathers its generators;
rank 0 writes; all wait for the write) against ``torch.save`` of the model and
optimizer on rank 0 followed by a barrier. Rank 0 prints medians; nothing is asserted.

    uv run python benchmarks/ddp.py [--rounds 5] [--samples 16384] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import statetrainer as st


def build(device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).to(device)
    return model, torch.optim.SGD(model.parameters(), lr=0.01)


def hand_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, device: torch.device,
               epoch: int) -> int:  # fmt: skip
    loader.sampler.set_epoch(epoch)
    batches = 0
    for inputs, target in loader:
        inputs, target = inputs.to(device, non_blocking=True), target.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(inputs), target).backward()
        optimizer.step()
        batches += 1
    return batches


class EpochTimer(st.Callback):
    """The wall time of each epoch, with every rank (and the GPU) caught up at both ends."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.started, self.epochs = device, 0.0, []

    def clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        return time.perf_counter()

    def on_enter_epoch(self, trainer: st.Trainer) -> None:
        self.started = self.clock()

    def on_exit_epoch(self, trainer: st.Trainer) -> None:
        self.epochs.append(self.clock() - self.started)


def worker(options: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    device = torch.device(options.device)
    generator = torch.Generator().manual_seed(1)
    dataset = TensorDataset(torch.randn(options.samples, 32, generator=generator),
                            torch.randint(0, 10, (options.samples,), generator=generator))  # fmt: skip
    trainer_model, trainer_optimizer = build(device)
    timer = EpochTimer(device)
    trainer = st.Trainer(trainer_model, trainer_optimizer, F.cross_entropy,
                         [st.Phase("train", DataLoader(dataset, batch_size=64, shuffle=True))], callbacks=[timer],
                         epochs=options.rounds + 1, device=device, seed=0)  # fmt: skip
    timer.device = trainer.device
    ranks = trainer.ranks  # the trainer joined torchrun's process group
    hand_model, hand_optimizer = build(trainer.device)
    if ranks.distributed:
        hand_model = nn.parallel.DistributedDataParallel(hand_model, device_ids=[trainer.device]
                                                         if trainer.device.type == "cuda" else None)  # fmt: skip
    sampler = DistributedSampler(dataset, num_replicas=ranks.world_size, rank=ranks.rank, shuffle=True, seed=0)
    hand_loader = DataLoader(dataset, batch_size=64, sampler=sampler)
    times: dict[str, list[float]] = {"hand": [], "statetrainer": []}

    synchronized = timer.clock
    for round_index in range(options.rounds + 1):  # the first epoch warms up
        start = synchronized()
        batches = hand_epoch(hand_model, hand_optimizer, hand_loader, trainer.device, round_index)
        if round_index:
            times["hand"].append((synchronized() - start) / batches * 1e6)
    trainer.fit()
    times["statetrainer"] = [elapsed / batches * 1e6 for elapsed in timer.epochs[1:]]
    save_times: dict[str, list[float]] = {"torch.save + barrier": [], "save_checkpoint": []}
    with tempfile.TemporaryDirectory() as folder:
        shared = Path(os.environ.get("STATETRAINER_BENCH_DIR", folder))
        for repeat in range(options.saves):
            start = synchronized()
            if ranks.is_global_zero:
                torch.save({"model": hand_model.state_dict(), "optimizer": hand_optimizer.state_dict()},
                           shared / f"hand-{repeat}.pt")  # fmt: skip
            save_times["torch.save + barrier"].append((synchronized() - start) * 1e3)
            start = synchronized()
            trainer.save_checkpoint(shared / f"run-{repeat}.safetensors")
            save_times["save_checkpoint"].append((synchronized() - start) * 1e3)
    if ranks.is_global_zero:
        print(json.dumps({"world_size": ranks.world_size, "batches_per_rank": batches,
                          "per_batch_us": {name: statistics.median(values) for name, values in times.items()},
                          "save_ms": {name: statistics.median(values) for name, values in save_times.items()}}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed epochs of each loop")
    parser.add_argument("--samples", type=int, default=16384)
    parser.add_argument("--saves", type=int, default=5, help="timed checkpoints of each kind")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        worker(options)
        return
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU(s), device {options.device}; medians of {options.rounds} "
          f"epochs of {options.samples} samples, batch 64 per rank (µs per batch) and of {options.saves} saves (ms)")  # fmt: skip
    for processes in options.processes:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   __file__, "--worker", "--rounds", str(options.rounds), "--samples", str(options.samples),
                   "--saves", str(options.saves), "--device", options.device]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        if result.returncode != 0 or not lines:
            print(result.stdout, result.stderr)
            raise SystemExit(f"the {processes}-process run failed")
        figures = json.loads(lines[-1])
        hand, ours = figures["per_batch_us"]["hand"], figures["per_batch_us"]["statetrainer"]
        print(f"{processes} process(es), {figures['batches_per_rank']} batches per rank per epoch:")
        print(f"  hand DDP loop  {hand:9.1f} µs/batch")
        print(f"  statetrainer   {ours:9.1f} µs/batch   {ours - hand:+8.1f}   ratio {ours / hand:.3f}")
        for name, value in figures["save_ms"].items():
            print(f"  {name:<21} {value:8.2f} ms")


if __name__ == "__main__":
    main()
