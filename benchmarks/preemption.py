"""Seconds from SIGTERM to process exit for a preempted run, against a 30 s grace period.

A training process (a DataLoader with two workers, Adam, a ``Checkpoint``
callback) is started in a process group of its own, as a scheduler starts a
job. Once it has trained a few batches, SIGTERM goes to the whole group, in the
middle of a batch. The trainer finishes that batch, writes a checkpoint there,
shuts its workers down and exits with status 143. The figure is the wall time
from the signal to the process's exit, measured by the parent, for:

- a small model (MLP 32-64-1);
- a large one: MLP 9 x 4000 (128 M parameters), whose parameters plus Adam's
  two moments make about 1.5 GB of state.

Each line also gives the child's own median batch time, so the expected cost
(one batch plus one save) can be read off.

    uv run python benchmarks/preemption.py [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GRACE_SECONDS = 30.0
SIZES = {"small": (32, 64, 2), "large": (4000, 4000, 9)}  # (inputs, width, layers)


def child(size: str, folder: str, device: str) -> None:
    """The training job: prints ``ready <median batch seconds>`` once warmed up, then trains until stopped."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import statetrainer as st
    from statetrainer.callbacks import Checkpoint

    torch.manual_seed(0)
    inputs, width, layers = SIZES[size]
    model = nn.Sequential(nn.Linear(inputs, width), *[nn.Linear(width, width) for _ in range(layers - 2)],
                          nn.Linear(width, 1))  # fmt: skip
    data = TensorDataset(torch.randn(64 * 1000, inputs), torch.randn(64 * 1000, 1))

    class Ready(st.Callback):
        def __init__(self) -> None:
            self.started, self.durations = 0.0, []

        def on_enter_batch(self, trainer: st.Trainer) -> None:
            self.started = time.perf_counter()

        def on_exit_batch(self, trainer: st.Trainer) -> None:
            self.durations.append(time.perf_counter() - self.started)
            if len(self.durations) == 3:
                print(f"ready {statistics.median(self.durations):.4f}", flush=True)

    trainer = st.Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-4), nn.functional.mse_loss,
                         [st.Phase("train", DataLoader(data, batch_size=64, shuffle=True, num_workers=2))],
                         callbacks=[Ready(), Checkpoint(folder, every_epochs=None, keep_last=1)],
                         epochs=1000, device=device, seed=0)  # fmt: skip
    trainer.fit()


def measure(size: str, device: str) -> tuple[float, float, int]:
    """(seconds from SIGTERM to exit, the child's median batch seconds, checkpoint bytes)."""
    with tempfile.TemporaryDirectory() as folder:
        process = subprocess.Popen([sys.executable, __file__, "--child", size, folder, "--device", device],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)  # fmt: skip
        line = process.stdout.readline()
        if not line.startswith("ready"):
            process.kill()
            raise RuntimeError(f"the {size} run did not start: {line}{process.stderr.read()}")
        batch_seconds = float(line.split()[1])
        time.sleep(batch_seconds / 2)  # land in the middle of a batch
        signalled = time.perf_counter()
        os.killpg(process.pid, signal.SIGTERM)
        status = process.wait(timeout=600)
        elapsed = time.perf_counter() - signalled
        message = process.stderr.read()
        if status != 128 + signal.SIGTERM or "saved" not in message:
            raise RuntimeError(f"the {size} run ended with status {status}: {message}")
        saved = [path for path in Path(folder).iterdir() if path.suffix == ".safetensors"]
        return elapsed, batch_seconds, sum(path.stat().st_size for path in saved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--child", nargs=2, metavar=("SIZE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, device=args.device)
        return
    print(f"SIGTERM to exit, median of {args.repeats} runs on {args.device}; grace period {GRACE_SECONDS:.0f} s")
    print(f"{'state':<40} {'batch':>9} {'signal to exit':>15} {'margin':>9}")
    for size in args.sizes:
        runs = [measure(size, args.device) for _ in range(args.repeats)]
        elapsed = statistics.median(run[0] for run in runs)
        batch = statistics.median(run[1] for run in runs)
        megabytes = runs[0][2] / 2**20
        label = f"{size}: MLP {SIZES[size][2]}x{SIZES[size][1]}, Adam ({megabytes:,.0f} MiB)"
        print(f"{label:<40} {batch:>8.3f}s {elapsed:>14.2f}s {GRACE_SECONDS - elapsed:>8.1f}s")


if __name__ == "__main__":
    main()
