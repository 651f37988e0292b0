"""Saving a run's parts to checkpoint files and finding the one to load, with every rank taking part.

What is saved is the ``StateRegistry``'s state; where it goes and how it is
written is ``statetrainer.checkpoint``'s. The ``Checkpointer`` sits between
the two: it claims the folder for the run, picks the file, has rank 0 write it
while the other ranks wait (or, for a background save, stages the state and
has a worker thread write it while training goes on), and finds the
checkpoint a run resumes from.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from . import checkpoint
from .distributed import Ranks, on_every_rank
from .outputs import RunOutputs
from .parts import RunIdentity, StateRegistry
from .version import __version__

__all__ = ["Checkpointer"]


class Checkpointer:
    """Writes and finds the checkpoints of one run.

    Args:
        parts: The run's parts; their state is what a checkpoint holds.
        run: The run's identity: which folders and files are its own.
        outputs: The run's output folders (a folder saved to is claimed there).
        ranks: This process's place among the run's processes (rank 0 writes).
        device: Where the ranks exchange their results.
        failed: Called from the writer's thread when a background write fails.

    Attributes:
        writer: Writes background saves, one at a time.
    """

    def __init__(self, parts: StateRegistry, run: RunIdentity, outputs: RunOutputs, ranks: Ranks,
                 device: torch.device, failed: Callable[[], None] = lambda: None) -> None:  # fmt: skip
        self.parts, self.run, self.outputs, self.ranks, self.device = parts, run, outputs, ranks, device
        self.writer, self._staging = checkpoint.BackgroundWriter(failed), checkpoint.StagingBuffers()

    def save(self, path: str | os.PathLike[str] | None, epoch: int, step: int,
             take_state: Callable[[], dict[str, Any]], background: bool = False) -> Path:  # fmt: skip
        """Write ``take_state()`` atomically as the file ``path`` or the next checkpoint of the folder ``path``
        (named by ``epoch`` and ``step``); return the file once it is written (on every rank). With
        ``background``, return once the state is staged; the file is written while training goes on.

        Every save first waits for the background write in flight, and raises its failure."""
        if background and self.ranks.distributed:
            raise NotImplementedError("a background save under torchrun is not built yet; save without background")
        self.writer.wait()
        ranks, folder = self.ranks, checkpoint.save_folder(path)
        with on_every_rank(ranks, self.device, "claim the checkpoint folder"):
            if ranks.is_global_zero and folder.suffix != ".safetensors":
                self.outputs.claim(folder, [checkpoint.CheckpointFolder.CHECKPOINTS])
            elif ranks.is_global_zero:
                checkpoint.refuse_overwrite(folder, self.run.id)
            target = checkpoint.save_target(path, epoch, step)
        state = take_state()  # every rank's generators, window gradients and metric accumulators, gathered
        if background:
            staged = self._staging.stage(state)  # the training may change the live tensors from here on
            self.writer.submit(lambda: checkpoint.write_tree(target, staged, __version__))
            return target
        with on_every_rank(ranks, self.device, f"write the checkpoint {target}"):  # all wait for rank 0's write
            if ranks.is_global_zero:
                checkpoint.write_tree(target, state, __version__)
        return target

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
        self.writer.wait()

    def find(self, path: str | os.PathLike[str], own_folders: Sequence[Path]) -> tuple[Path, dict[str, Any]] | None:
        """The checkpoint to resume from and its state, checked against the parts; None for a first run
        (see ``checkpoint.find_checkpoint``). Every rank finds the same one, or every rank raises."""
        self.outputs.lock()  # a second live copy of the run is refused before it reads anything
        with on_every_rank(self.ranks, self.device, f"load the checkpoint from {path}"):
            return checkpoint.find_checkpoint(path, own_folders, self.parts.check_fits, self.run.accept_marker)
