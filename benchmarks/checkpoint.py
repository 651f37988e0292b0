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

    uv run python benchmarks/checkpoint.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import statetrainer as st
from statetrainer.parts import Position


def make_trainer(width: int, layers: int, device: torch.device) -> st.Trainer:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, width, device=device)).sum().backward()
    optimizer.step()  # creates Adam's state
    optimizer.zero_grad(set_to_none=True)
    batches = [(torch.randn(2, width), torch.randn(2, width))]
    return st.Trainer(model, optimizer, nn.functional.mse_loss, [st.Phase("train", batches)], device=device)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--folder", type=Path, default=None)
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--device", default="cpu", help="where the model and optimizer state live: cpu or cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, statetrainer {st.__version__}, {os.cpu_count()} CPUs, state on {device}")
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        measure("small (MLP 4 x 256)", 256, 4, Path(folder), args.repeats * 5, device)
        if not args.skip_large:
            measure("large (MLP 8 x 4000, Adam)", 4000, 8, Path(folder), args.repeats, device)


if __name__ == "__main__":
    main()
