"""Saving a run's parts to checkpoint files and finding the one to load, with every rank taking part.

What is saved is the ``StateRegistry``'s state; where it goes and how it is
written is ``statetrainer.checkpoint``'s. The ``Checkpointer`` sits between
the two: it claims the folder for the run, picks the file, has rank 0 write it
while the other ranks wait (or, for a background save, has rank 0 stage the
state and a worker thread write it while every rank trains on), and finds the
checkpoint a run resumes from. It logs to ``statetrainer.checkpoint``: each
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

from . import checkpoint
from .distributed import Ranks, agree, on_every_rank
from .outputs import RunOutputs
from .parts import RunIdentity, StateRegistry
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
        sharded: Whether the model is sharded with ``fully_shard`` (whose checkpoints are not built yet).

    Attributes:
        writer: Writes background saves, one at a time.
    """

    def __init__(self, parts: StateRegistry, run: RunIdentity, outputs: RunOutputs, ranks: Ranks,
                 device: torch.device, failed: Callable[[], None] = lambda: None, sharded: bool = False) -> None:  # fmt: skip
        self.parts, self.run, self.outputs, self.ranks, self.device = parts, run, outputs, ranks, device
        self.writer, self._staging = checkpoint.BackgroundWriter(failed), checkpoint.StagingBuffers()
        self.sharded = sharded

    def refuse_sharded(self) -> None:
        """Raise for a model sharded with ``fully_shard``: its sharded checkpoints are not built yet."""
        if self.sharded:
            raise NotImplementedError("checkpoints of a model sharded with fully_shard (FSDP2) are not built yet: "
                                      "train it without Checkpoint callbacks, save_checkpoint or load_checkpoint")  # fmt: skip

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
        self.refuse_sharded()
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
        state = take_state()  # every rank's generators, window gradients and metric accumulators, gathered
        if background:
            if ranks.is_global_zero:  # the others' parts are in rank 0's state: they go on at once
                self._write_in_background(target, state, on_written)
            return target
        with on_every_rank(ranks, self.device, f"write the checkpoint {target}"):  # all wait for rank 0's write
            if ranks.is_global_zero:
                checkpoint.write_tree(target, state, __version__)
                if on_written is not None:
                    on_written(target)
        return target

    def _write_in_background(self, target: Path, state: dict[str, Any],
                             on_written: Callable[[Path], None] | None) -> None:  # fmt: skip
        started = time.perf_counter()
        staged = self._staging.stage(state)  # the training may change the live tensors from here on
        log.debug("staged %s for %s in %.3f s; writing it in the background", _size(staged.bytes), target.name,
                  time.perf_counter() - started)  # fmt: skip

        def write() -> None:
            begun = time.perf_counter()
            staged.ready()
            checkpoint.write_tree(target, staged.tree, __version__)
            log.info("wrote %s in the background: %s in %.2f s", target, _size(staged.bytes),
                     time.perf_counter() - begun)  # fmt: skip
            if on_written is not None:
                on_written(target)

        self.writer.submit(write)

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
        """Wait for the background write in flight and raise its failure, on every rank."""
        with on_every_rank(self.ranks, self.device, "finish the background checkpoint write in flight"):
            self.writer.wait()

    def write_in_flight(self) -> bool:
        """Whether rank 0 is still writing a background checkpoint (every rank gets rank 0's answer)."""
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
        with on_every_rank(self.ranks, self.device, "finish the background checkpoint write in flight"):
            self._settle("the run's end")

    def find(self, path: str | os.PathLike[str], own_folders: Sequence[Path]) -> tuple[Path, dict[str, Any]] | None:
        """The checkpoint to resume from and its state, checked against the parts; None for a first run
        (see ``checkpoint.find_checkpoint``). Every rank finds the same one, or every rank raises."""
        self.refuse_sharded()
        self.outputs.lock()  # a second live copy of the run is refused before it reads anything
        with on_every_rank(self.ranks, self.device, f"load the checkpoint from {path}"):
            return checkpoint.find_checkpoint(path, own_folders, self.parts.check_fits, self.run.accept_marker)


def _size(count: int) -> str:
    """``count`` bytes for people: ``1.50 GB``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count} B"
