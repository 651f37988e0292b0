"""The data path's cost: a user's DataLoader alone against the same loader through statetrainer.

A shuffled DataLoader over an in-memory ``TensorDataset`` (8,000 samples of 32
features, batch 128), iterated for one epoch in the main process and with 2
workers: directly, and through the resumable batch source the trainer builds
from it (seeded order, seeded sample loading). The two run interleaved in one
process; each figure is the median over ``--rounds`` epochs, in microseconds
per sample, with the ratio to the user's own loader.

    uv run python benchmarks/loader.py
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator

import torch
from timing import report
from torch.utils.data import DataLoader, TensorDataset

from statetrainer.data import batch_source

SAMPLES, FEATURES, BATCH = 8_000, 32, 128


def epoch_time(open_epoch: Callable[[int], Iterator[object]], epoch: int) -> float:
    start = time.perf_counter()
    for _ in open_epoch(epoch):
        pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dataset = TensorDataset(torch.randn(SAMPLES, FEATURES), torch.randint(10, (SAMPLES,)))
    print(f"torch {torch.__version__}: {SAMPLES} samples, batch {BATCH}, median of {args.rounds} epochs, us/sample")
    for workers in (0, 2):
        options = {"persistent_workers": True} if workers else {}
        loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers, **options)
        source = batch_source(DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers, **options), 0)
        loops = {  # each binds this round's loader and source
            "DataLoader": lambda epoch, loader=loader: iter(loader),
            "statetrainer": lambda epoch, source=source: source.open(0, epoch),
        }
        times: dict[str, list[float]] = {name: [] for name in loops}
        for open_epoch in loops.values():  # warm-up (starts persistent workers)
            epoch_time(open_epoch, 0)
        for epoch in range(args.rounds):
            for name, open_epoch in loops.items():
                times[name].append(epoch_time(open_epoch, epoch) / SAMPLES * 1e6)
        print(f"  num_workers={workers}:")
        report(times, "DataLoader", "us/sample", indent="    ")


if __name__ == "__main__":
    main()
