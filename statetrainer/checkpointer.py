"""Saving a run's parts to checkpoint files and finding the one to load, with every rank taking part.

What is saved is the ``StateRegistry``'s state; where it goes and how it is
written is ``statetrainer.checkpoint``'s. The ``Checkpointer`` sits between
the two: it claims the folder for the run, picks the file, has rank 0 write it
while the other ranks wait (or, for a background save, has rank 0 stage the
state and a worker thread write it while every rank trains on; for a model
sharded with ``fully_shard`` every rank writes its own pieces, in the
background from its own writer thread, and rank 0 the checkpoint file last),
and finds the checkpoint a run resumes from. It logs to ``statetrainer.checkpoint``: each
background write's end (its size and time) at INFO, its start at DEBUG, and a
save that waited for the write in flight at INFO.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import checkpoint
from .distributed import Ranks, agree, all_gather, all_reduce, on_every_rank
from .errors import CheckpointError
from .outputs import RunOutputs
from .parts import RunIdentity, StateRegistry
from .timing import CheckpointTime
from .version import __version__

__all__ = ["Checkpointer"]

log = logging.getLogger("statetrainer.checkpoint")


class Checkpointer:
    """Writes and finds the checkpoints of one run.

    Args:
        parts: The run's parts; their state is what a checkpoint holds.
        run: The run's identity: which folders and files are its own.
        outputs: The run's output folders (a folder saved to is claimed there).
        ranks: This process's place among the run's processes (rank 0 writes).
        device: Where the ranks exchange their results.
        failed: Called from the writer's thread when a background write fails.
        mesh: The device mesh of a model sharded with ``fully_shard`` (its checkpoints are sharded); None.

    Attributes:
        writer: Writes background saves, one at a time.
        time: The seconds this process has been blocked in ``save`` and in loads (``Trainer._load`` measures those).
    """

    def __init__(self, parts: StateRegistry, run: RunIdentity, outputs: RunOutputs, ranks: Ranks,
                 device: torch.device, failed: Callable[[], None] = lambda: None, mesh: Any = None) -> None:  # fmt: skip
        self.parts, self.run, self.outputs, self.ranks, self.device = parts, run, outputs, ranks, device
        self.writer, self._staging = checkpoint.BackgroundWriter(failed), checkpoint.StagingBuffers()
        self._mesh, self._writers = mesh, None
        self.time = CheckpointTime()

    def save(self, path: str | os.PathLike[str] | None, epoch: int, step: int,
             take_state: Callable[[], dict[str, Any]], background: bool = False, when_busy: str = "wait",
             on_written: Callable[[Path], None] | None = None) -> Path | None:  # fmt: skip
        """Write ``take_state()`` atomically as the file ``path`` or the next checkpoint of the folder ``path``
        (named by ``epoch`` and ``step``); return the file once it is written (on every rank). With
        ``background``, return once the state is staged; rank 0's worker thread writes the file while training
        goes on. ``on_written(file)`` runs in the process that wrote the file, once it is durable (for a
        background save, in the writer's thread).

        Every save first waits for the background write in flight, and raises its failure on every rank; with
        ``when_busy="skip"`` a save due while one is in flight is skipped instead, and returns None."""
        with self.time.saving.measuring():
            return self._save(path, epoch, step, take_state, background, when_busy, on_written)

    def _save(self, path: str | os.PathLike[str] | None, epoch: int, step: int,
              take_state: Callable[[], dict[str, Any]], background: bool, when_busy: str,
              on_written: Callable[[Path], None] | None) -> Path | None:  # fmt: skip
        ranks, folder = self.ranks, checkpoint.save_folder(path)
        if when_busy == "skip" and self.write_in_flight():
            log.info("skipped the checkpoint at step %d: the background write in flight has not ended", step)
            return None
        with on_every_rank(ranks, self.device, "finish the background checkpoint write in flight"):
            self._settle(f"the save at step {step}")
        with on_every_rank(ranks, self.device, "claim the checkpoint folder"):
            if ranks.is_global_zero and folder.suffix != ".safetensors":
                self.outputs.claim(folder, [checkpoint.CheckpointFolder.CHECKPOINTS])
            elif ranks.is_global_zero:
                checkpoint.refuse_overwrite(folder, self.run.id)
            target = checkpoint.save_target(path, epoch, step)
            if self.sharded and ranks.is_global_zero and target.exists():
                target.unlink()  # replaced: the old checkpoint stops counting before its pieces are overwritten
        if self.sharded:
            target = self._rank_zeros_name(target)  # every rank writes its pieces under it
        state = take_state()  # every rank's generators, window gradients and metric accumulators, gathered
        if self.sharded:
            return self._save_sharded(target, state, background, on_written)
        if background:
            if ranks.is_global_zero:  # the others' parts are in rank 0's state: they go on at once

                def write(staged: dict[str, Any]) -> None:
                    checkpoint.write_tree(target, staged, __version__)
                    if on_written is not None:
                        on_written(target)

                self._write_in_background(target, state, write)
            return target
        with on_every_rank(ranks, self.device, f"write the checkpoint {target}"):  # all wait for rank 0's write
            if ranks.is_global_zero:
                checkpoint.write_tree(target, state, __version__)
                if on_written is not None:
                    on_written(target)
        return target

    @property
    def sharded(self) -> bool:
        """Whether the model is sharded with ``fully_shard``, so its checkpoints are sharded."""
        return self._mesh is not None

    def _save_sharded(self, target: Path, state: dict[str, Any], background: bool,
                      on_written: Callable[[Path], None] | None) -> Path:  # fmt: skip
        """Every rank writes its pieces beside ``target`` (with ``background``, from a staged copy in its writer's
        thread); then rank 0 writes ``target`` with the index, last."""
        self._refuse_differing_buffers(state["step"]["model"])
        tree, pieces, boxes = checkpoint.split_shards(state)
        if background:
            group = self._writers_group()
            own = {"tree": tree if self.ranks.is_global_zero else None, "pieces": pieces}
            with on_every_rank(self.ranks, self.device, f"stage its pieces of the checkpoint {target}"):
                self._write_in_background(target, own, lambda staged: self._write_sharded(
                    target, staged["tree"], staged["pieces"], boxes, on_written, group))  # fmt: skip
            return target
        with on_every_rank(self.ranks, self.device, f"write the checkpoint {target}"):
            self._write_sharded(target, tree, pieces, boxes, on_written)
        return target

    def _write_sharded(self, target: Path, tree: Any, pieces: dict[str, torch.Tensor],
                       boxes: dict[str, dict[str, Any]], on_written: Callable[[Path], None] | None,
                       group: Any = None) -> None:  # fmt: skip
        """Write this rank's pieces; once every rank has written its own, rank 0 writes ``target`` and the index.
        Every rank raises if any rank's pieces failed (that rank its own error)."""
        failure, written = None, None
        try:
            written = checkpoint.write_pieces(target, self.ranks.rank, pieces, __version__, self.run.id)
        except Exception as error:  # noqa: BLE001 -- raised below, once the other ranks have heard of it
            failure = error
        every_box, every_written = self._gather_boxes(boxes, written, group)
        if failure is not None:
            raise failure
        failed = [rank for rank, rank_written in enumerate(every_written) if rank_written is None]
        if failed:
            raise CheckpointError(f"rank(s) {', '.join(map(str, failed))} could not write their pieces of {target} "
                                  "(their logs say why), so the checkpoint was not written")  # fmt: skip
        if self.ranks.is_global_zero:
            crcs, checksums = zip(*every_written, strict=True)  # every rank wrote its pieces
            index = checkpoint.ShardIndex.build(every_box, list(crcs), list(checksums))
            checkpoint.write_tree(target, {**tree, checkpoint.SHARD_INDEX: index}, __version__)
            if on_written is not None:
                on_written(target)

    def _writers_group(self) -> Any:
        """A gloo group of every rank for the background writers' exchange (the run's own group is the training
        thread's); made at the first background save of a sharded model, which every rank reaches together."""
        if self._writers is None and self.ranks.distributed:
            self._writers = dist.new_group(backend="gloo")
        return self._writers

    def _refuse_differing_buffers(self, model_state: dict[str, Any]) -> None:
        """Raise on every rank if a tensor of the model that is not sharded (a buffer) differs between the ranks:
        FSDP2 does not keep buffers in step as DDP does, and the checkpoint holds rank 0's."""
        plain = {key: value for key, value in model_state.items()
                 if isinstance(value, torch.Tensor) and not checkpoint.is_dtensor(value)}  # fmt: skip
        if not self.ranks.distributed or not plain:
            return
        crcs = torch.tensor([checkpoint.tensor_crc(value.detach().cpu().contiguous()) for value in plain.values()],
                            dtype=torch.int64)  # fmt: skip
        every = all_gather(crcs, self.ranks, self.device)
        differing = [key for index, key in enumerate(plain) if any(int(rank[index]) != int(every[0][index])
                                                                   for rank in every)]  # fmt: skip
        if differing:
            raise NotImplementedError(
                f"the model's buffers {', '.join(differing)} differ between the ranks (FSDP2 does not keep buffers "
                "alike), and a sharded checkpoint holds one copy of a buffer: it would resume every rank with rank "
                "0's. Keep them the same on every rank (BatchNorm's running statistics are not), or train the model "
                "with DDP"
            )

    def _rank_zeros_name(self, target: Path) -> Path:
        """``target`` numbered as rank 0 numbered it (another rank's listing of the folder may lag behind)."""
        sequence = checkpoint.sequence_of(target)
        if not self.ranks.distributed or sequence is None:
            return target
        numbers = all_gather(torch.tensor([sequence], dtype=torch.int64), self.ranks, self.device)
        return checkpoint.renumbered(target, int(numbers[0].item()))

    def _gather_boxes(self, boxes: dict[str, dict[str, Any]], written: tuple[dict[str, str], str] | None,
                      group: Any = None) -> tuple[list[dict[str, dict[str, Any]]], list[tuple[dict[str, str], str] | None]]:  # fmt: skip
        """Every rank's boxes, and its pieces' CRCs and file checksum as ``write_pieces`` gave them (None for a rank
        that wrote no pieces); the same keys, in the same order, on every rank; in one all-gather over ``group``."""
        if not self.ranks.distributed:
            return [boxes], [written]
        keys = list(boxes)
        crcs, checksum = written if written is not None else ({key: "0" for key in keys}, "0")
        packed = torch.tensor([int(written is not None), int(checksum, 16)] + [
            number for key in keys for number in (*boxes[key]["offset"], *boxes[key]["size"], int(crcs[key], 16))],
            dtype=torch.int64)  # fmt: skip
        every_box: list[dict[str, dict[str, Any]]] = []
        every_written: list[tuple[dict[str, str], str] | None] = []
        for received in all_gather(packed, self.ranks, self.device, group):
            numbers, rank_boxes, rank_crcs = iter(received.tolist()), {}, {}
            wrote, rank_checksum = bool(next(numbers)), f"{next(numbers):08x}"
            for key in keys:
                rank_ndim = len(boxes[key]["shape"])
                offset = [next(numbers) for _ in range(rank_ndim)]
                size = [next(numbers) for _ in range(rank_ndim)]
                rank_boxes[key] = {**boxes[key], "offset": offset, "size": size}
                rank_crcs[key] = f"{next(numbers):08x}"
            every_box.append(rank_boxes)
            every_written.append((rank_crcs, rank_checksum) if wrote else None)
        return every_box, every_written

    def _prepare(self, path: Path, tree: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint's state with its sharded tensors read (this rank's parts); a sharded checkpoint only for a
        sharded model, and the other way round."""
        if not isinstance(tree, dict):
            return tree  # the parts' check refuses it, naming what it is
        if (checkpoint.SHARD_INDEX in tree) != self.sharded:
            raise CheckpointError(
                f"{path} is {'a sharded' if not self.sharded else 'not a sharded'} checkpoint, and this model is "
                f"{'not ' if not self.sharded else ''}sharded with fully_shard: resume it as it was saved"
            )
        if not self.sharded:
            return tree
        tree = dict(tree)
        index = checkpoint.ShardIndex(tree.pop(checkpoint.SHARD_INDEX), path)
        index.check_files()
        return checkpoint.resolve_shards(tree, index, self._mesh)

    def _write_in_background(self, target: Path, state: Any, write: Callable[[Any], None]) -> None:
        """Stage ``state`` and have the writer's thread ``write`` the staged copy."""
        started = time.perf_counter()
        staged = self._staging.stage(state)  # the training may change the live tensors from here on
        log.debug("staged %s for %s in %.3f s; writing it in the background", _size(staged.bytes), target.name,
                  time.perf_counter() - started)  # fmt: skip

        def run() -> None:
            begun = time.perf_counter()
            staged.ready()
            write(staged.tree)
            log.info("wrote %s in the background: %s in %.2f s", target, _size(staged.bytes),
                     time.perf_counter() - begun)  # fmt: skip

        self.writer.submit(run)

    def _settle(self, why: str) -> None:
        """Wait for the background write in flight, saying so, and raise its failure."""
        if not self.writer.in_flight:
            self.writer.wait()  # a failure not raised yet
            return
        started = time.perf_counter()
        self.writer.wait()
        log.info("waited %.2f s for the background checkpoint write in flight before %s", time.perf_counter() - started,
                 why)  # fmt: skip

    def wait(self) -> None:
        """Wait for the background write in flight and raise its failure, on every rank (time blocked saving)."""
        with self.time.saving.measuring(), on_every_rank(self.ranks, self.device, "finish the background checkpoint "
                                                                                   "write in flight"):  # fmt: skip
            self.writer.wait()

    def write_in_flight(self) -> bool:
        """Whether a rank is still writing a background checkpoint (every rank gets the same answer)."""
        return not agree(not self.writer.in_flight, self.ranks, self.device)

    @contextlib.contextmanager
    def writes_settled(self) -> Iterator[None]:
        """When the block ends, wait for the background write in flight: its failure raises, unless the block
        raised (then the failure is warned about, and the block's error propagates)."""
        try:
            yield
        except BaseException as error:
            try:
                self.writer.wait()
            except BaseException as failure:  # noqa: BLE001 -- the run's own error propagates
                warnings.warn(f"a background checkpoint write failed as {error!r} ended the run: {failure!r}",
                              stacklevel=3)  # fmt: skip
            raise
        self.finish_writes()

    def finish_writes(self) -> None:
        """As the run ends: wait for the background write in flight, saying so (time blocked saving), and raise its
        failure on every rank."""
        with self.time.saving.measuring(), on_every_rank(self.ranks, self.device, "finish the background checkpoint "
                                                                                   "write in flight"):  # fmt: skip
            self._settle("the run's end")

    def find(self, path: str | os.PathLike[str], own_folders: Sequence[Path],
             before: Callable[[dict[str, Any]], bool] | None = None) -> tuple[Path, dict[str, Any]] | None:  # fmt: skip
        """The checkpoint to resume from and its state, checked against the parts; None for a first run
        (see ``checkpoint.find_checkpoint``; ``before``: from a folder, the newest whose saved position it accepts).
        Every rank finds the same one, or every rank raises."""
        self.outputs.lock()  # a second live copy of the run is refused before it reads anything
        with on_every_rank(self.ranks, self.device, f"load the checkpoint from {path}"):
            return checkpoint.find_checkpoint(path, own_folders, self.parts.check_fits, self.run.accept_marker,
                                              self._prepare, self._worst_outcome, before)  # fmt: skip

    def _worst_outcome(self, outcome: int) -> int:
        """The worst of every rank's outcome of reading a checkpoint (see ``checkpoint.newest_valid``)."""
        if not self.ranks.distributed:
            return outcome
        return int(all_reduce(torch.tensor([outcome], dtype=torch.int32), self.ranks, dist.ReduceOp.MAX).item())


def _size(count: int) -> str:
    """``count`` bytes for people: ``1.50 GB``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count} B"
