"""Checkpoint save and load times against torch.save / torch.load of the same state.

For a small model and for a large one (about 500 MB of float32 parameters plus
Adam's two moment buffers, so about 1.5 GB of state), it times:

- save: ``trainer.save_checkpoint`` (safetensors, checksum, temporary file,
  fsync, rename, folder fsync) against ``torch.save`` of the same model and
  optimizer state, without and with an fsync of its own;
- load: ``trainer.load_checkpoint`` into a fresh trainer (read, verify the
  checksum, load model and optimizer) against ``torch.load(weights_only=True)``
  followed by the same two ``load_state_dict`` calls.

Each figure is the median of ``--repeats`` interleaved runs, each writing a new
file after an ``os.sync()``, in a temporary folder under ``--folder`` (default:
the system's temporary folder). Reads come from the page cache for both.

``--background`` measures background saves instead, for about 1.5 GB and
about 6 GB of state (``--skip-large`` keeps the first): the time training is
blocked per save (``save_checkpoint(background=True)`` with its buffers reused,
and on CUDA until the staging copy has left the training stream) against one
in-memory copy of the state (into the same buffers) and a synchronous save;
the optimizer step's time while the write is in flight against with none; and
the write's throughput against the disk's, an fsynced sequential write of the
same size in the same folder.

    uv run python benchmarks/checkpoint.py
    uv run python benchmarks/checkpoint.py --background
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import statetrainer as st
from statetrainer.parts import Position

GB = 1e9


def make_trainer(width: int, layers: int, device: torch.device, batches: int = 1) -> st.Trainer:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, width, device=device)).sum().backward()
    optimizer.step()  # creates Adam's state
    optimizer.zero_grad(set_to_none=True)
    data = [(torch.randn(2, width), torch.randn(2, width))] * batches
    return st.Trainer(model, optimizer, nn.functional.mse_loss, [st.Phase("train", data)], device=device,
                      stop_signals=())  # fmt: skip


def interleaved(actions: dict[str, tuple[Callable[[], object], Path | None]], repeats: int) -> dict[str, float]:
    """Median seconds of each action, run in turn ``repeats`` times.

    Each action comes with the file it writes (or None): that file is deleted
    and everything synced before each run, so every save writes a new file
    onto a quiet disk.
    """
    times: dict[str, list[float]] = {name: [] for name in actions}
    for _ in range(repeats):
        for name, (action, writes) in actions.items():
            if writes is not None:
                writes.unlink(missing_ok=True)
            os.sync()
            start = time.perf_counter()
            action()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def torch_save(state: dict, path: Path, fsync: bool) -> None:
    torch.save(state, path)
    if fsync:
        with open(path, "rb") as file:
            os.fsync(file.fileno())


def measure(label: str, width: int, layers: int, folder: Path, repeats: int, device: torch.device) -> None:
    trainer = make_trainer(width, layers, device)
    fresh = make_trainer(width, layers, device)
    parameters = sum(p.numel() for p in trainer.model.parameters())
    ours, theirs = folder / f"{label}.safetensors", folder / f"{label}.pt"

    def our_load() -> None:
        fresh.position.load_state_dict(Position().state_dict())  # reuse one fresh trainer: reset what a load set
        fresh._core.machine.restore("idle")
        fresh.load_checkpoint(ours)

    def torch_load() -> None:
        state = torch.load(theirs, weights_only=True, map_location=device)
        fresh.model.load_state_dict(state["model"])
        fresh.optimizer.load_state_dict(state["optimizer"])

    state = {"model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict()}
    saves = interleaved(
        {
            "ours": (lambda: trainer.save_checkpoint(ours), ours),
            "torch": (lambda: torch_save(state, theirs, fsync=False), theirs),
            "torch+fsync": (lambda: torch_save(state, theirs, fsync=True), theirs),
        },
        repeats,
    )
    save_ours, save_torch, save_torch_fsync = saves["ours"], saves["torch"], saves["torch+fsync"]
    loads = interleaved({"ours": (our_load, None), "torch": (torch_load, None)}, repeats)
    load_ours, load_torch = loads["ours"], loads["torch"]
    size = ours.stat().st_size / 2**20
    print(f"{label}: {parameters / 1e6:.1f} M parameters, checkpoint {size:.0f} MiB")
    print(f"  save  statetrainer {save_ours * 1e3:9.1f} ms | torch.save {save_torch * 1e3:9.1f} ms "
          f"(+fsync {save_torch_fsync * 1e3:9.1f} ms) | ratio {save_ours / save_torch:.2f} "
          f"({save_ours / save_torch_fsync:.2f} vs +fsync)")  # fmt: skip
    print(f"  load  statetrainer {load_ours * 1e3:9.1f} ms | torch.load {load_torch * 1e3:9.1f} ms "
          f"| ratio {load_ours / load_torch:.2f}")  # fmt: skip


class WriteTimes(logging.Handler):
    """The durations the checkpointer logs for its background writes, in seconds."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seconds: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        found = re.search(r"in the background: .* in ([\d.]+) s$", record.getMessage())
        if found:
            self.seconds.append(float(found[1]))


def disk_write_seconds(path: Path, size: int) -> float:
    """Seconds to write ``size`` bytes sequentially in 16 MiB blocks and fsync them (as ``dd conv=fsync`` does)."""
    block = bytes(16 * 2**20)
    os.sync()
    start = time.perf_counter()
    with open(path, "wb") as file:
        for _ in range(-(-size // len(block))):
            file.write(block)
        os.fsync(file.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def python_rate_while(busy: Callable[[], bool]) -> float:
    """How fast a pure-Python loop runs while ``busy()`` holds, against the same loop after it ends."""

    def spin(seconds: float) -> int:
        count, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            count += 1
        return count

    during = [spin(0.05) for _ in iter(busy, False)]
    idle = [spin(0.05) for _ in range(max(len(during), 10))]
    return statistics.median(during) / statistics.median(idle) if during else float("nan")


def settle(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_background(label: str, width: int, layers: int, folder: Path, repeats: int, device: torch.device) -> None:
    trainer = make_trainer(width, layers, device, batches=10_000)
    checkpointer, times = trainer._checkpointer, WriteTimes()
    logging.getLogger("statetrainer.checkpoint").addHandler(times)
    logging.getLogger("statetrainer.checkpoint").setLevel(logging.INFO)
    steps_taken = 0

    def step() -> float:
        nonlocal steps_taken
        steps_taken += 1
        start = time.perf_counter()
        trainer.run_until("phase", step=steps_taken)
        settle(device)
        return time.perf_counter() - start

    for _ in range(3):
        step()  # warm
    trainer.save_checkpoint(folder / "warm.safetensors", background=True)  # allocates the staging buffers
    trainer.wait_for_checkpoints()
    size = checkpointer._staging.bytes
    blocked, blocked_host, copies, synchronous, quiet, during, written = [], [], [], [], [], [], []
    buffers = [buffer for buffer in checkpointer._staging._buffers if buffer is not None]
    for repeat in range(repeats):
        os.sync()
        quiet += [step() for _ in range(3)]
        leaves = [leaf for leaf in torch.utils._pytree.tree_leaves(trainer.state_dict()) if torch.is_tensor(leaf)]
        settle(device)
        start = time.perf_counter()  # the reference: one copy of the state into the same buffers, just before
        for buffer, leaf in zip(buffers, leaves, strict=True):
            buffer.copy_(leaf)
        settle(device)
        copies.append(time.perf_counter() - start)
        start = time.perf_counter()
        trainer.save_checkpoint(folder / f"background{repeat}.safetensors", background=True)
        blocked_host.append(time.perf_counter() - start)
        settle(device)  # on CUDA the next kernels wait for the staging copy on the training stream
        blocked.append(time.perf_counter() - start)
        while checkpointer.writer.in_flight:
            during.append(step())
        trainer.wait_for_checkpoints()
        written.append(times.seconds[-1])
        os.sync()
        start = time.perf_counter()
        trainer.save_checkpoint(folder / f"sync{repeat}.safetensors")
        synchronous.append(time.perf_counter() - start)
        for path in folder.glob("*.safetensors"):
            path.unlink()
    trainer.save_checkpoint(folder / "probe.safetensors", background=True)
    probe = python_rate_while(lambda: checkpointer.writer.in_flight)
    trainer.wait_for_checkpoints()
    disk = statistics.median(disk_write_seconds(folder / "disk.bin", size) for _ in range(3))
    median = statistics.median
    print(f"{label}: state {size / GB:.2f} GB on {device}, {repeats} saves of each kind")
    print(f"  blocked per background save {median(blocked):7.3f} s (host {median(blocked_host):.3f} s) | "
          f"one in-memory copy {median(copies):7.3f} s ({median(blocked) / median(copies):.2f}x) | "
          f"synchronous save {median(synchronous):7.3f} s ({median(blocked) / median(synchronous):.1%})")  # fmt: skip
    print(f"  step time: no write in flight {median(quiet):.3f} s, during a write {median(during):.3f} s "
          f"({median(during) / median(quiet) - 1:+.1%}, {len(during)} steps)")  # fmt: skip
    print(f"  the training thread's Python ran at {probe:.2f}x its rate with no write in flight, during a write "
          "(the writer holds the GIL that little: a thread, not a process)")  # fmt: skip
    print(f"  background write {median(written):.2f} s = {size / median(written) / GB:.2f} GB/s | disk (fsynced "
          f"sequential write) {size / disk / GB:.2f} GB/s | {disk / median(written):.0%} of the disk's")  # fmt: skip
    if device.type == "cuda":
        source, pinned = torch.empty(size // 4, device=device), torch.empty(size // 4, pin_memory=True)
        settle(device)
        start = time.perf_counter()
        pinned.copy_(source, non_blocking=True)
        settle(device)
        bandwidth = size / (time.perf_counter() - start)
        print(f"  pinned device-to-host copy {bandwidth / GB:.1f} GB/s: target blocked <= 0.1 s + "
              f"{size / bandwidth:.3f} s")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--folder", type=Path, default=None)
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--device", default="cpu", help="where the model and optimizer state live: cpu or cuda")
    parser.add_argument("--background", action="store_true", help="measure background saves (see above)")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, statetrainer {st.__version__}, {os.cpu_count()} CPUs, state on {device}")
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        if args.background:
            measure_background("about 1.5 GB (MLP 8 x 4000, Adam)", 4000, 8, Path(folder), args.repeats, device)
            if not args.skip_large:
                measure_background("about 6 GB (MLP 8 x 8000, Adam)", 8000, 8, Path(folder), args.repeats, device)
            return
        measure("small (MLP 4 x 256)", 256, 4, Path(folder), args.repeats * 5, device)
        if not args.skip_large:
            measure("large (MLP 8 x 4000, Adam)", 4000, 8, Path(folder), args.repeats, device)


if __name__ == "__main__":
    main()
