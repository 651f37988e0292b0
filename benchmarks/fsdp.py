"""A model sharded with FSDP2: per-batch time against a hand-written loop, and sharded checkpoints against DCP.

It launches itself under torchrun (gloo on the CPU, one thread a rank; NCCL with
``--device cuda``), with 1 and 2 processes, and prints rank 0's medians:

- **per batch**: an MLP (32-W-...-W-10, ``--blocks`` hidden layers of
  ``--width``, batch 64 a rank) with each layer and then the whole sharded by
  ``fully_shard``, Adam; a hand loop (``DistributedSampler``, zero_grad,
  forward, backward, step) and a ``Trainer`` on the same data, their epochs
  interleaved (as ``benchmarks/ddp.py``);
- **save**: a larger model (``--state-width``, ``--state-blocks``) trained one
  step with Adam, saved as the trainer saves it (each rank its pieces, rank 0
  the checkpoint with the index last, every file fsynced), against
  ``torch.distributed.checkpoint.save`` of ``get_state_dict``'s state (pickled
  metadata) and against DCP with ``HuggingFaceStorageWriter`` (safetensors
  files of the tensors alone, each rank its own);
- **load**: every world size loads what every world size saved, ours with
  ``load_checkpoint(allow_changes={"world_size"})`` (read, check, apply)
  against ``dcp.load`` into ``get_state_dict``'s state and ``set_state_dict``;
  loading what another world size saved is a reshard;
- **memory**: ``tests/sharded_save_memory.py`` on 2 ranks, the peak memory of a
  sharded save and of a save that gathers the model on rank 0.

Nothing is asserted.

    uv run python benchmarks/fsdp.py [--rounds 5] [--saves 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from ddp import InterleavedEpochs, hand_epoch
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.nn import functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import statetrainer as st
from statetrainer.distributed import shard_model

MEMORY_SCRIPT = Path(__file__).parents[1] / "tests" / "sharded_save_memory.py"


def mlp(width: int, blocks: int) -> nn.Sequential:
    torch.manual_seed(0)
    hidden = [layer for _ in range(blocks) for layer in (nn.Linear(width, width), nn.ReLU())]
    return nn.Sequential(nn.Linear(32, width), nn.ReLU(), *hidden, nn.Linear(width, 10))


def hand_sharded(width: int, blocks: int, device: torch.device) -> nn.Module:
    """The MLP sharded by hand as torchtitan does: each layer with weights, then the whole."""
    model = mlp(width, blocks).to(device)
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer)
    fully_shard(model)
    return model


def dataset(samples: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(samples, 32, generator=generator),
                         torch.randint(0, 10, (samples,), generator=generator))  # fmt: skip


def state_trainer(options: argparse.Namespace, fit: bool) -> st.Trainer:
    """The larger sharded model with Adam in a trainer (stepped once with ``fit``), for the checkpoint timings."""
    model = shard_model(mlp(options.state_width, options.state_blocks))
    loader = DataLoader(dataset(64 * 8), batch_size=64)
    trainer = st.Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-3), F.cross_entropy,
                         [st.Phase("train", loader, limit=1)], epochs=1, device=options.device, seed=0)  # fmt: skip
    if fit:
        trainer.fit()
    return trainer


def synchronized(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized():
        dist.barrier()
    return time.perf_counter()


def interleaved(prepared: dict[str, Callable[[], Callable[[], object]]], device: torch.device,
                repeats: int) -> dict[str, float]:  # fmt: skip
    """The median wall time, on every rank, in ms, of each action (made untimed by its ``prepared`` entry), the
    actions taking turns ``repeats`` times after a round that warms up, so the page cache's and the disk's state
    (dirty pages still being written back throttle the next writer) is shared out fairly."""
    times: dict[str, list[float]] = {name: [] for name in prepared}
    for _ in range(repeats + 1):  # the first round warms up
        for name, prepare in prepared.items():
            action = prepare()
            start = synchronized(device)
            action()
            times[name].append((synchronized(device) - start) * 1e3)
    return {name: statistics.median(values[1:]) for name, values in times.items()}


def train_worker(options: argparse.Namespace) -> dict:
    device = torch.device(options.device)
    samples = dataset(options.samples)
    hand: dict[str, object] = {}
    epochs = InterleavedEpochs(device, lambda epoch: hand_epoch(hand["model"], hand["optimizer"], hand["loader"],
                                                                 trainer.device, epoch))  # fmt: skip
    model = shard_model(mlp(options.width, options.blocks))
    trainer = st.Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-3), F.cross_entropy,
                         [st.Phase("train", DataLoader(samples, batch_size=64, shuffle=True))], callbacks=[epochs],
                         epochs=options.rounds + 1, device=device, seed=0)  # fmt: skip
    epochs.device, ranks = trainer.device, trainer.ranks
    hand_model = hand_sharded(options.width, options.blocks, trainer.device)
    sampler = DistributedSampler(samples, num_replicas=ranks.world_size, rank=ranks.rank, shuffle=True, seed=0)
    hand.update(model=hand_model, optimizer=torch.optim.Adam(hand_model.parameters(), lr=1e-3),
                loader=DataLoader(samples, batch_size=64, sampler=sampler))  # fmt: skip
    trainer.fit()  # the first epoch of each warms up
    return {"batches_per_rank": trainer.phase_batches,
            "per_batch_us": {name: statistics.median(values[1:]) for name, values in epochs.times.items()}}  # fmt: skip


def flat_tensors(model_state: dict, optimizer_state: dict) -> dict[str, torch.Tensor]:
    """The model's and Adam's tensors under flat names (all ``HuggingFaceStorageWriter`` can write)."""
    flat = {f"model.{key}": value for key, value in model_state.items()}
    for name, values in optimizer_state["state"].items():
        flat.update({f"optim.{name}.{key}": value for key, value in values.items() if value.dim()})
    return flat


def save_worker(options: argparse.Namespace, folder: Path) -> dict:
    trainer = state_trainer(options, fit=True)
    device, world = trainer.device, trainer.world_size
    target = folder / f"saved-by-{world}"
    if trainer.is_global_zero:
        shutil.rmtree(target, ignore_errors=True)
    synchronized(device)

    def ours() -> None:
        trainer.save_checkpoint(target / "statetrainer" / "checkpoint.safetensors")

    def dcp_save() -> None:
        model_state, optimizer_state = get_state_dict(trainer.model, trainer.optimizer)
        dcp.save({"model": model_state, "optim": optimizer_state}, checkpoint_id=target / "dcp")

    def dcp_huggingface() -> None:
        writer = HuggingFaceStorageWriter(str(target / "dcp-huggingface"), save_distributed=True)
        dcp.save(flat_tensors(*get_state_dict(trainer.model, trainer.optimizer)), storage_writer=writer)

    state = flat_tensors(*get_state_dict(trainer.model, trainer.optimizer))
    own = sum(value.to_local().numel() * value.element_size() for value in state.values())  # type: ignore[attr-defined]
    figures = interleaved({"statetrainer": lambda: ours, "dcp.save": lambda: dcp_save,
                           "dcp HuggingFaceStorageWriter": lambda: dcp_huggingface}, device, options.saves)  # fmt: skip
    return {"save_ms": figures, "state_bytes_per_rank": own}


def load_worker(options: argparse.Namespace, folder: Path) -> dict:
    device, figures = torch.device(options.device), {}
    for saved in sorted(folder.glob("saved-by-*")):

        def ours(saved: Path = saved) -> Callable[[], object]:
            trainer = state_trainer(options, fit=False)  # a checkpoint loads into a trainer that has not started
            return lambda: trainer.load_checkpoint(saved / "statetrainer" / "checkpoint.safetensors",
                                                   allow_changes={"world_size"})  # fmt: skip

        def dcp_load(saved: Path = saved) -> Callable[[], object]:
            trainer = state_trainer(options, fit=False)

            def load() -> None:
                model_state, optimizer_state = get_state_dict(trainer.model, trainer.optimizer)
                state = {"model": model_state, "optim": optimizer_state}
                dcp.load(state, checkpoint_id=saved / "dcp")
                set_state_dict(trainer.model, trainer.optimizer, model_state_dict=state["model"],
                               optim_state_dict=state["optim"])  # fmt: skip

            return load

        figures[saved.name.removeprefix("saved-by-")] = interleaved({"statetrainer": ours, "dcp.load": dcp_load},
                                                                    device, options.saves)  # fmt: skip
    return {"load_ms": figures}


def worker(options: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    folder = Path(options.folder)
    result = {"train": train_worker, "save": save_worker, "load": load_worker}[options.worker]
    figures = result(options) if options.worker == "train" else result(options, folder)  # type: ignore[operator]
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps(figures))


def launch(options: argparse.Namespace, processes: int, mode: str, folder: Path) -> dict:
    """Run the worker in ``mode`` on ``processes`` ranks under torchrun; rank 0's figures."""
    arguments = [f"--{name.replace('_', '-')}={value}" for name, value in vars(options).items()
                 if name not in ("processes", "worker", "folder")]  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               __file__, "--worker", mode, "--folder", str(folder), *arguments]  # fmt: skip
    environment = {**os.environ, "PYTHONWARNINGS": "ignore::UserWarning"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=3600, env=environment)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        print(result.stdout, result.stderr)
        raise SystemExit(f"the {processes}-process {mode} run failed")
    return json.loads(lines[-1])


def memory(options: argparse.Namespace, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(MEMORY_SCRIPT), str(folder), "--width", str(options.state_width), "--blocks",
               str(options.state_blocks), "--device", options.device]  # fmt: skip
    subprocess.run(command, capture_output=True, text=True, timeout=3600, check=True)
    print(f"peak memory above what the rank held, 2 ranks, {options.state_blocks} Linear({options.state_width}, "
          f"{options.state_width}) with Adam:")  # fmt: skip
    for rank in range(2):
        report = json.loads((folder / f"memory-rank{rank}.json").read_text())
        mb = 1e6
        print(f"  rank {rank}: own shard {report['own_shard'] / mb:.1f} MB, largest piece "
              f"{report['largest_piece'] / mb:.1f} MB, full state {report['full_state'] / mb:.1f} MB; "
              f"sharded save +{report['sharded_save']['host_peak'] / mb:.1f} MB, gathering save "
              f"+{report['gathered_save']['host_peak'] / mb:.1f} MB (host)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed epochs of each loop")
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--width", type=int, default=256, help="hidden width of the per-batch model")
    parser.add_argument("--blocks", type=int, default=3, help="hidden layers of the per-batch model")
    parser.add_argument("--state-width", type=int, default=1024, help="hidden width of the checkpointed model")
    parser.add_argument("--state-blocks", type=int, default=8, help="hidden layers of the checkpointed model")
    parser.add_argument("--saves", type=int, default=5, help="timed saves and loads of each kind")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--worker", choices=("train", "save", "load"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        worker(options)
        return
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU(s), device {options.device}, one thread a rank")
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(os.environ.get("STATETRAINER_BENCH_DIR", temporary))
        print(f"per batch: MLP 32-{options.width}x{options.blocks + 1}-10, Adam, batch 64 a rank, medians of "
              f"{options.rounds} epochs of {options.samples} samples")  # fmt: skip
        for processes in options.processes:
            figures = launch(options, processes, "train", folder)
            hand, ours = figures["per_batch_us"]["hand"], figures["per_batch_us"]["statetrainer"]
            print(f"  {processes} process(es), {figures['batches_per_rank']} batches a rank an epoch: hand FSDP2 "
                  f"loop {hand:8.1f} µs/batch, statetrainer {ours:8.1f} µs/batch, ratio {ours / hand:.3f}")  # fmt: skip
        print(f"checkpoints: MLP 32-{options.state_width}x{options.state_blocks + 1}-10 with Adam, medians of "
              f"{options.saves} (ms)")  # fmt: skip
        for processes in options.processes:
            figures = launch(options, processes, "save", folder)
            print(
                f"  save on {processes} process(es), {figures['state_bytes_per_rank'] / 1e6:.1f} MB a rank: "
                + ", ".join(f"{name} {value:.1f}" for name, value in figures["save_ms"].items())
            )
        for processes in options.processes:
            figures = launch(options, processes, "load", folder)
            for saved_by, times in figures["load_ms"].items():
                kind = "same size" if int(saved_by) == processes else "reshard"
                print(
                    f"  load on {processes} of what {saved_by} saved ({kind}): "
                    + ", ".join(f"{name} {value:.1f}" for name, value in times.items())
                )
        memory(options, folder / "memory")


if __name__ == "__main__":
    main()
