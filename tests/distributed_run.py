"""A training script that runs unchanged in one process or under torchrun: the subject of the multi-process tests.

    python distributed_run.py FOLDER [options]
    torchrun --standalone --nproc_per_node=2 distributed_run.py FOLDER [options]

It trains a small classifier on a map-style dataset whose samples carry their
index, through a shuffled DataLoader (``--workers``), with optional random
augmentation and dropout; ``--records DIR`` records every batch's sample
indices per rank in ``DIR/records-rank<R>.jsonl``. Started again with the same FOLDER it
resumes from the newest checkpoint there; at the end rank 0 writes
``FOLDER/final.safetensors``. ``--kill RANK:EPOCH:BATCH`` makes that rank
SIGKILL itself after that train batch (once: a marker file remembers it);
``--save-at EPOCH:BATCH`` steps the run to the end of that train batch, saves
``FOLDER/mid.safetensors`` (with ``--background``, first ``mid-background.safetensors`` in the background) and exits; ``--resume PATH`` starts from that file,
allowing another world size. ``--train-batches K`` makes every epoch train on the next K batches of the
loader's stream; ``--limit``, ``--max-steps`` and ``--epochs none`` shape the run in steps. ``--predict`` has
the trained model predict the validation samples (rank 0 writes them, with a plain ``model(x)`` of them, to
``FOLDER/predictions.safetensors``). ``--ledger`` keeps a goodput ledger beside the checkpoints.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

import statetrainer as st
from statetrainer import callbacks as cb
from statetrainer.distributed import shard_model


class IndexedSamples(Dataset):
    """``count`` samples of a 3-class problem; each sample is ``(features, label, index)``."""

    def __init__(self, count: int, augment: bool, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.features = torch.randn(count, 8, generator=generator)
        self.labels = (self.features[:, :3].argmax(dim=1) + (self.features[:, 3] > 1).long()) % 3
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        features = self.features[index]
        if self.augment:  # draws from the torch generator of the process or worker that loads it
            features = features + 0.1 * torch.randn(8)
        return features, self.labels[index], index


def unpack(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
    return batch[0], batch[1]


class Recorder(st.Callback):
    """Appends each batch's sample indices (the ones the samples carry, and ``trainer.batch_samples``) to this
    rank's records file, flushed per batch."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.file = None

    def on_exit_batch(self, trainer: st.Trainer) -> None:
        if self.file is None:
            rank = int(os.environ.get("RANK", 0))
            self.file = open(self.folder / f"records-rank{rank}.jsonl", "a")  # noqa: SIM115 -- open for the run
        record = {"epoch": trainer.epoch, "phase": trainer.phase.name, "batch": trainer.batch_index,
                  "indices": trainer.batch[2].tolist(), "batch_samples": trainer.batch_samples}  # fmt: skip
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()


class KillAfter(st.Callback):
    """SIGKILLs this process after train batch ``batch`` of epoch ``epoch`` on rank ``rank``, once."""

    def __init__(self, rank: int, epoch: int, batch: int, marker: Path) -> None:
        self.rank, self.epoch, self.batch, self.marker = rank, epoch, batch, marker

    def on_exit_batch(self, trainer: st.Trainer) -> None:
        here = (int(os.environ.get("RANK", 0)), trainer.epoch, trainer.phase.name, trainer.batch_index)
        if here == (self.rank, self.epoch, "train", self.batch) and not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)


class TerminateLauncher(st.Callback):
    """On rank 0, after train batch ``batch`` of epoch ``epoch``: SIGTERM the launcher, as a scheduler would, once."""

    def __init__(self, epoch: int, batch: int, marker: Path) -> None:
        self.epoch, self.batch, self.marker = epoch, batch, marker

    def on_exit_batch(self, trainer: st.Trainer) -> None:
        here = (trainer.epoch, trainer.phase.name, trainer.batch_index)
        if trainer.is_global_zero and here == (self.epoch, "train", self.batch) and not self.marker.exists():
            self.marker.touch()
            os.kill(os.getppid(), signal.SIGTERM)
            time.sleep(0.5)  # a long batch: the signal is here before this batch's stop vote goes out


class SlowDisk:
    """On this rank, as its ``count``-th background checkpoint write starts (its private folder is made, seen through an
    audit hook in the writer's thread): mark ``FOLDER/writing``, then hold the write for 2 s, or fail it as a full
    disk fails it (``fail``)."""

    def __init__(self, folder: Path, count: int, fail: bool) -> None:
        self.marker, self.count, self.fail, self.seen = folder / "writing", count, fail, 0
        sys.addaudithook(self._hook)

    def _hook(self, event: str, arguments: tuple) -> None:
        if event != "os.mkdir" or threading.current_thread().name != "statetrainer-checkpoint-writer":
            return
        if not os.fsdecode(arguments[0]).endswith(".tmp"):
            return
        self.seen += 1
        if self.seen == self.count:
            self.marker.touch()
            if self.fail:
                raise OSError(errno.ENOSPC, "No space left on device")
            time.sleep(2)


class KillWhileWriting(st.Callback):
    """SIGKILLs rank 1 at its first batch boundary after rank 0 began the held write (``FOLDER/writing``), once."""

    def __init__(self, folder: Path) -> None:
        self.writing, self.marker = folder / "writing", folder / "killed"

    def on_exit_batch(self, trainer: st.Trainer) -> None:
        if trainer.ranks.rank == 1 and self.writing.exists() and not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)


def build(options: argparse.Namespace, writers: bool = True) -> st.Trainer:
    """The trainer of the run (``writers=False``: without the callbacks that write files, as a replay is built)."""
    torch.manual_seed(0)  # the same initial weights on every rank and in one process
    random.seed(0)
    np.random.seed(0)
    hidden = [
        layer for _ in range(options.blocks - 1) for layer in (nn.Linear(options.hidden, options.hidden), nn.ReLU())
    ]
    norm = [nn.BatchNorm1d(options.hidden)] if options.batchnorm else []
    model = nn.Sequential(nn.Linear(8, options.hidden), *norm, nn.ReLU(), *hidden, nn.Dropout(options.dropout),
                          nn.Linear(options.hidden, 3))  # fmt: skip
    samples = IndexedSamples(options.samples, options.augment)
    if options.plant_nan is not None:  # that sample's features are NaN: its batch's loss is NaN
        samples.features[options.plant_nan, 0] = float("nan")
    train = DataLoader(samples, batch_size=options.batch_size, shuffle=True, num_workers=options.workers)
    valid = DataLoader(IndexedSamples(options.valid_samples, False, seed=1), batch_size=options.batch_size)
    folder = Path(options.folder)
    callbacks = [
        cb.SmoothedLoss(),
        cb.Accuracy(),
        cb.CSVLogger(folder / "log.csv"),
        cb.StreamLogger(),
        cb.Checkpoint(folder / "checkpoints", every_steps=options.every_steps, keep_last=options.keep_last,
                      background=options.background),
        *([cb.GoodputLedger(folder / "checkpoints")] if options.ledger else []),
        *([cb.EMA(0.9)] if options.ema else []),
    ]  # fmt: skip
    if options.plant_nan is not None:
        callbacks.append(cb.StopOnNonFinite(every_batches=4))
    callbacks = [callback for callback in callbacks if writers or not callback.output_files()]
    if options.fsdp:  # each Linear layer sharded, then the whole
        policy = MixedPrecisionPolicy(param_dtype=getattr(torch, options.param_dtype) if options.param_dtype else None)
        shard_model(model, mp_policy=policy)
    if options.records:
        callbacks.append(Recorder(Path(options.records)))
    if options.kill:
        rank, epoch, batch = map(int, options.kill.split(":"))
        callbacks.append(KillAfter(rank, epoch, batch, folder / "killed"))
    if options.break_at:
        epoch, batch = map(int, options.break_at.split(":"))
        callbacks.append(cb.Breakpoint("batch", enter=False, when=lambda trainer: (trainer.epoch, trainer.batch_index)
                                       == (epoch, batch) and trainer.phase.name == "train"))  # fmt: skip
    if options.slow_write and int(os.environ.get("RANK", 0)) == (1 if options.slow_write.endswith("fail-rank1") else 0):
        count, what = options.slow_write.split(":")
        SlowDisk(folder, int(count), fail=what.startswith("fail"))
    if options.slow_write and options.slow_write.endswith(":kill-rank1"):
        callbacks.append(KillWhileWriting(folder))
    if options.term_at:
        epoch, batch = map(int, options.term_at.split(":"))
        callbacks.append(TerminateLauncher(epoch, batch, folder / "terminated"))
    optimizer = (torch.optim.Adam(model.parameters(), lr=0.01) if options.optimizer == "adam"
                 else torch.optim.SGD(model.parameters(), lr=0.1))  # fmt: skip
    if options.own_ddp:  # the script makes the process group and wraps the model itself
        dist.init_process_group("gloo")
        model = nn.parallel.DistributedDataParallel(model)
    phases = [st.Phase("train", train, limit=options.limit, batches=options.train_batches),
              st.Phase("valid", valid, grad=False)]  # fmt: skip
    return st.Trainer(model, optimizer, F.cross_entropy, phases, callbacks=callbacks, epochs=options.epochs,
                      max_steps=options.max_steps, accumulate=options.accumulate, unpack=unpack,
                      device=options.device, seed=options.seed, deterministic=options.deterministic,
                      compile=options.compile)  # fmt: skip


def save_full_state(trainer: st.Trainer, path: Path) -> None:
    """A sharded model's full weights and optimizer state, gathered to rank 0 by torch's own state-dict API and
    saved there (what a resharded load must reproduce exactly)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights, optimizer = get_state_dict(trainer.model, trainer.optimizer, options=options)
    if trainer.is_global_zero:
        flat = {f"model/{key}": value for key, value in weights.items()}
        for name, state in optimizer["state"].items():
            flat.update({f"optimizer/{name}/{key}": value for key, value in state.items() if torch.is_tensor(value)})
        save_file(flat, str(path))


def save_full_model(trainer: st.Trainer, path: Path) -> None:
    """A sharded model's full weights and the run's metrics, gathered to rank 0 and saved there."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(trainer.model, options=options)  # every rank takes part; rank 0 gets them
    if trainer.is_global_zero:
        metrics = {f"metrics/{name}": torch.tensor(float(value)) for name, value in trainer.metrics.items()}
        save_file({**{f"model/{key}": value for key, value in weights.items()}, **metrics}, str(path))


def count_gradient_all_reduces(trainer: st.Trainer) -> dict[str, int]:
    """Count the backward passes whose gradients DDP all-reduces (its communication hook runs once per bucket)."""
    calls = {"count": 0}
    if isinstance(trainer.model, nn.parallel.DistributedDataParallel):

        def counting(state, bucket):  # unannotated: DDP checks real annotations, and this module's are strings
            calls["count"] += 1
            return default_hooks.allreduce_hook(None, bucket)

        trainer.model.register_comm_hook(None, counting)
    return calls


def snapshot(trainer: st.Trainer) -> dict:
    """This rank's weights and optimizer state (its shards, for a sharded model), the batch's loss and output."""

    def local(value: torch.Tensor) -> torch.Tensor:
        return (value.to_local() if hasattr(value, "to_local") else value).detach().clone()

    optimizer = trainer.optimizer.state_dict()["state"]
    return {**{f"model/{key}": local(value) for key, value in trainer.model.state_dict().items()},
            **{f"optimizer/{index}/{key}": local(value) for index, state in optimizer.items()
               for key, value in state.items()},
            "loss": local(trainer.loss), "output": local(trainer.output)}  # fmt: skip


def travel(options: argparse.Namespace, folder: Path) -> None:
    """For each step of ``--travel``, a new trainer (built without the writers) travels there from the run's
    checkpoints; each rank records the steps where it differs from one uninterrupted replay stopped there."""
    steps = [int(step) for step in options.travel.split(",")]
    reference, expected = build(options, writers=False), {}
    for step in steps:
        reference.run_until(step=step)
        expected[step] = snapshot(reference)
    differing, started = [], []
    for step in steps:
        traveller = build(options, writers=False)
        checkpoint = traveller.travel_to(folder / "checkpoints", step=step)
        started.append(None if checkpoint is None else checkpoint.name)
        found = snapshot(traveller)
        if found.keys() != expected[step].keys() or not all(torch.equal(value, expected[step][key])
                                                            for key, value in found.items()):  # fmt: skip
            differing.append(step)
    (folder / f"travel-rank{os.environ.get('RANK', 0)}.json").write_text(
        json.dumps({"steps": steps, "differing": differing, "started": started})
    )


def bisect_run(options: argparse.Namespace, folder: Path) -> None:
    """Find the run's first bad batch from its checkpoints; each rank writes what it found."""
    checkpoints = folder / "checkpoints"
    if options.bisect == "rank1-sees-fewer" and os.environ.get("RANK") == "1":  # a node that sees the folder late
        view = folder / "rank1-view"
        shutil.copytree(checkpoints, view)
        max(view.glob("ckpt-*.safetensors")).unlink()
        checkpoints = view
    found = st.bisect(checkpoints, lambda: build(options, writers=False))
    (folder / f"bisect-rank{os.environ.get('RANK', 0)}.json").write_text(json.dumps({
        "epoch": found.epoch, "phase": found.phase, "batch": found.batch, "step": found.step,
        "batch_samples": found.batch_samples, "loads": found.loads, "replayed": found.replayed,
        "checkpoint": None if found.checkpoint is None else found.checkpoint.name}))  # fmt: skip


def forbid_writes_under(folder: Path) -> None:
    """Make every write, rename or removal under ``folder`` by this process raise (to show it never writes)."""
    root = str(folder.resolve())

    def refuse(event: str, arguments: tuple) -> None:
        if event == "open" and isinstance(arguments[0], str) and (arguments[1] or "r") != "r" and (
                os.path.abspath(arguments[0]).startswith(root)):  # fmt: skip
            raise PermissionError(f"rank {os.environ.get('RANK')} opened {arguments[0]} to write")
        if event in ("os.rename", "os.replace", "os.remove", "os.truncate", "os.mkdir") and (
                os.path.abspath(str(arguments[0])).startswith(root)):  # fmt: skip
            raise PermissionError(f"rank {os.environ.get('RANK')} changed {arguments[0]} ({event})")

    sys.addaudithook(refuse)


def predict(trainer: st.Trainer, options: argparse.Namespace, folder: Path) -> None:
    """Predict the validation samples on every rank; rank 0 writes the predictions beside a plain ``model(x)``."""
    samples = IndexedSamples(options.valid_samples, False, seed=1)
    predicted = trainer.predict(DataLoader(samples, batch_size=options.batch_size), inputs=lambda batch: batch[0])
    # A list the trainer does not shard: every rank predicts all of it, and rank 0 gives its own outputs.
    listed = trainer.predict([samples.features[start : start + 5] for start in range(0, len(samples), 5)])
    if not trainer.is_global_zero:
        assert predicted is None and listed is None
        return
    model = trainer.model.module if isinstance(trainer.model, nn.parallel.DistributedDataParallel) else trainer.model
    model.eval()
    with torch.no_grad():
        expected = model(samples.features.to(trainer.device))
    save_file({"predicted": torch.cat(predicted).cpu(), "expected": expected.cpu(),
               "batches": torch.tensor([len(batch) for batch in predicted]),
               "listed": torch.cat(listed).cpu(), "listed_batches": torch.tensor([len(batch) for batch in listed])},
              str(folder / "predictions.safetensors"))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--samples", type=int, default=48, help="train samples")
    parser.add_argument("--valid-samples", type=int, default=20, help="validation samples")
    parser.add_argument("--batch-size", type=int, default=4, help="batch size of each process")
    parser.add_argument("--epochs", type=lambda value: None if value == "none" else int(value), default=2)
    parser.add_argument("--train-batches", type=int, help="each epoch trains on the next this many batches")
    parser.add_argument("--limit", type=int, help="train on at most this many batches an epoch")
    parser.add_argument("--max-steps", type=int, help="end the run after this optimizer step")
    parser.add_argument("--predict", action="store_true", help="predict the validation samples after training")
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--augment", action="store_true", help="random noise on every training sample")
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="sgd")
    parser.add_argument("--every-steps", type=int, default=None, help="checkpoint every this many steps")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--keep-last", type=lambda value: None if value == "none" else int(value), default=2)
    parser.add_argument("--plant-nan", type=int, help="this train sample's features are NaN (StopOnNonFinite stops)")
    parser.add_argument("--bisect", nargs="?", const="same", choices=("same", "rank1-sees-fewer"),
                        help="find the first bad batch from FOLDER's checkpoints (rank1-sees-fewer: rank 1 lists a "
                             "copy without the newest)")  # fmt: skip
    parser.add_argument("--travel", help="S1,S2,...: travel to each of these steps from FOLDER's checkpoints")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ledger", action="store_true", help="a GoodputLedger in the checkpoints' folder")
    parser.add_argument("--compile", action="store_true", help="Trainer(compile=True): torch.compile in place")
    parser.add_argument("--ema", action="store_true", help="an EMA(0.9) of the weights, which validation runs on")
    parser.add_argument("--deterministic", action="store_true")
    parser.add_argument("--kill", help="RANK:EPOCH:BATCH: SIGKILL that rank after that train batch, once")
    parser.add_argument("--save-at", help="EPOCH:BATCH: save FOLDER/mid.safetensors after that train batch, exit")
    parser.add_argument("--resume", help="a checkpoint file to start from (another world size allowed)")
    parser.add_argument("--records", help="a folder to record each rank's batches in")
    parser.add_argument("--hidden", type=int, default=16, help="hidden units (another value: another model)")
    parser.add_argument("--own-ddp", action="store_true", help="init the process group and wrap in DDP here")
    parser.add_argument("--break-at", help="EPOCH:BATCH: a Breakpoint after that train batch (rank 0 breaks)")
    parser.add_argument("--term-at", help="EPOCH:BATCH: rank 0 sends SIGTERM to its launcher after that train batch")
    parser.add_argument("--background", action="store_true", help="the Checkpoint callback writes in the background")
    parser.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 (shard_model)")
    parser.add_argument("--blocks", type=int, default=1, help="hidden Linear layers (each sharded with --fsdp)")
    parser.add_argument("--param-dtype", help="with --fsdp: FSDP2 computes in this dtype (MixedPrecisionPolicy)")
    parser.add_argument("--batchnorm", action="store_true", help="a BatchNorm1d after the first layer")
    parser.add_argument(
        "--slow-write",
        help="N:hold|kill-rank1|fail|fail-rank1: rank 0's N-th background write is held 2 s "
        "(and rank 1 SIGKILLs itself meanwhile), or fails as a full disk (rank 1's: a sharded model's pieces)",
    )
    parser.add_argument(
        "--only-rank-zero-writes", action="store_true", help="raise if a rank other than 0 writes anything under FOLDER"
    )
    options = parser.parse_args()
    folder = Path(options.folder)
    folder.mkdir(parents=True, exist_ok=True)
    if options.only_rank_zero_writes and int(os.environ.get("RANK", 0)) != 0:
        forbid_writes_under(folder)
    if options.travel:
        travel(options, folder)
        return
    if options.bisect:
        bisect_run(options, folder)
        return
    trainer = build(options)
    if options.resume:
        trainer.load_checkpoint(options.resume, allow_changes={"world_size"})
        if options.fsdp:
            save_full_state(trainer, folder / "loaded-full.safetensors")
    else:
        trainer.load_checkpoint(folder / "checkpoints")
    if options.save_at:
        epoch, batch = map(int, options.save_at.split(":"))
        while not (trainer.state == "phase" and trainer.epoch == epoch and trainer.phase.name == "train"
                   and trainer.batch_index == batch):  # fmt: skip
            trainer.advance()
        if options.background:  # the same state saved in the background first: the same bytes
            trainer.save_checkpoint(folder / "mid-background.safetensors", background=True)
        trainer.save_checkpoint(folder / "mid.safetensors")
        if options.fsdp:
            save_full_state(trainer, folder / "saved-full.safetensors")
        return
    synced_backwards, total_steps = count_gradient_all_reduces(trainer), trainer.total_steps
    trainer.fit()
    trainer.save_checkpoint(folder / "final.safetensors")
    if options.fsdp:
        save_full_model(trainer, folder / "final-model.safetensors")
    if options.records:  # what each rank ended with
        summary = {"metrics": dict(trainer.metrics), "synced_backwards": synced_backwards["count"],
                   "global_step": trainer.global_step, "world_size": trainer.world_size,
                   "total_steps": total_steps}  # fmt: skip
        (Path(options.records) / f"summary-rank{os.environ.get('RANK', 0)}.json").write_text(json.dumps(summary))
    if options.predict:
        predict(trainer, options, folder)
    if trainer.is_global_zero:
        print(f"world_size={trainer.world_size} done", file=sys.stderr)


if __name__ == "__main__":
    main()
