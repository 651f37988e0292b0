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
optimizer on rank 0 followed by a barrier. The epochs of the two loops
alternate (the hand loop's runs inside the trainer's ``on_exit_epoch``). With
2 processes it also runs the trainer with ``stop_signals=()``, which shows
what sharing stop signals after every batch costs. Rank 0 prints medians;
nothing is asserted.

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
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import statetrainer as st
from statetrainer.preemption import DEFAULT_STOP_SIGNALS


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


class InterleavedEpochs(st.Callback):
    """Times each of the trainer's epochs, then runs and times one epoch of the hand loop, so the two alternate.

    Every rank (and the GPU) is caught up at both ends of each timing.
    """

    def __init__(self, device: torch.device, hand_epoch: Callable[[int], int]) -> None:
        self.device, self.hand_epoch, self.started = device, hand_epoch, 0.0
        self.times: dict[str, list[float]] = {"hand": [], "statetrainer": []}

    def clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        return time.perf_counter()

    def on_enter_epoch(self, trainer: st.Trainer) -> None:
        self.started = self.clock()

    def on_exit_epoch(self, trainer: st.Trainer) -> None:
        batches = trainer.phase_batches
        self.times["statetrainer"].append((self.clock() - self.started) / batches * 1e6)
        start = self.clock()
        hand_batches = self.hand_epoch(trainer.epoch)
        self.times["hand"].append((self.clock() - start) / hand_batches * 1e6)


def worker(options: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    device = torch.device(options.device)
    generator = torch.Generator().manual_seed(1)
    dataset = TensorDataset(torch.randn(options.samples, 32, generator=generator),
                            torch.randint(0, 10, (options.samples,), generator=generator))  # fmt: skip
    hand: dict[str, object] = {}
    epochs = InterleavedEpochs(device, lambda epoch: hand_epoch(hand["model"], hand["optimizer"], hand["loader"],
                                                                 trainer.device, epoch))  # fmt: skip
    trainer_model, trainer_optimizer = build(device)
    trainer = st.Trainer(trainer_model, trainer_optimizer, F.cross_entropy,
                         [st.Phase("train", DataLoader(dataset, batch_size=64, shuffle=True))], callbacks=[epochs],
                         epochs=options.rounds + 1, device=device, seed=0,
                         stop_signals=() if options.no_stop_vote else DEFAULT_STOP_SIGNALS)  # fmt: skip
    epochs.device = trainer.device
    ranks = trainer.ranks  # the trainer joined torchrun's process group
    hand_model, hand["optimizer"] = build(trainer.device)
    if ranks.distributed:
        hand_model = nn.parallel.DistributedDataParallel(hand_model, device_ids=[trainer.device]
                                                         if trainer.device.type == "cuda" else None)  # fmt: skip
    sampler = DistributedSampler(dataset, num_replicas=ranks.world_size, rank=ranks.rank, shuffle=True, seed=0)
    hand["model"], hand["loader"] = hand_model, DataLoader(dataset, batch_size=64, sampler=sampler)
    trainer.fit()  # the first epoch of each warms up
    times = {name: values[1:] for name, values in epochs.times.items()}
    batches = trainer.phase_batches
    synchronized = epochs.clock
    hand_optimizer = hand["optimizer"]
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
    parser.add_argument("--no-stop-vote", action="store_true", help="stop_signals=(): no stop signal vote per batch")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        worker(options)
        return
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU(s), device {options.device}; medians of {options.rounds} "
          f"epochs of {options.samples} samples, batch 64 per rank (µs per batch) and of {options.saves} saves (ms)")  # fmt: skip
    for processes in options.processes:
        for vote in (True, False) if processes > 1 else (True,):
            figures = launch(options, processes, vote)
            hand, ours = figures["per_batch_us"]["hand"], figures["per_batch_us"]["statetrainer"]
            print(f"{processes} process(es){'' if vote else ', stop_signals=() (no stop vote)'}, "
                  f"{figures['batches_per_rank']} batches per rank per epoch:")  # fmt: skip
            print(f"  hand DDP loop  {hand:9.1f} µs/batch")
            print(f"  statetrainer   {ours:9.1f} µs/batch   {ours - hand:+8.1f}   ratio {ours / hand:.3f}")
            for name, value in figures["save_ms"].items():
                print(f"  {name:<21} {value:8.2f} ms")


def launch(options: argparse.Namespace, processes: int, vote: bool) -> dict:
    """Run the worker on ``processes`` ranks under torchrun; rank 0's figures."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               __file__, "--worker", "--rounds", str(options.rounds), "--samples", str(options.samples),
               "--saves", str(options.saves), "--device", options.device, *(() if vote else ("--no-stop-vote",))]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        print(result.stdout, result.stderr)
        raise SystemExit(f"the {processes}-process run failed")
    return json.loads(lines[-1])


if __name__ == "__main__":
    main()
