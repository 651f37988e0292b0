"""The folders a run writes into: claimed for the run, and locked, before anything there is written.

Every callback that writes files names them (``Callback.output_files``). Before
the first hook of a run in this process (the start of ``fit``/``advance``/
``run_until``), rank 0 claims each of their folders for the run
(``statetrainer.checkpoint.claim_folder``: another run's folder, or one a
second live copy of this run holds, is refused before anything is touched),
and then each callback opens its files: a resumed run's become what the loaded
checkpoint says, a fresh run's start afresh. The locks are held until the run
finishes (or the process ends).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .callbacks.base import Callback
from .checkpoint import FolderLock, claim_folder, mark_folder
from .distributed import Ranks, on_every_rank
from .parts import RunIdentity

__all__ = ["RunOutputs"]


class RunOutputs:
    """The run's output folders and the callbacks that write in them.

    Args:
        callbacks: The callbacks that run in this process.
        run: The run's identity, whose ``marker()`` a claimed folder records.
        ranks: This process's place among the run's processes: rank 0 alone claims and writes.
        device: The run's device (for agreeing on failures between the ranks).

    Attributes:
        opened: Whether the writers' files are open (made what the loaded state says, or fresh).
        resumed: Whether the run was loaded from a checkpoint: a folder of it that has the run's files but no
            ``run.json`` (one written before folders were claimed) is then the run's.

    Raises:
        ValueError: A callback writes into the working folder or one above it, which a run would claim whole.
    """

    def __init__(self, callbacks: Sequence[Callback], run: RunIdentity, ranks: Ranks, device: torch.device) -> None:
        self.run, self.ranks, self.device = run, ranks, device
        self.writers = [callback for callback in callbacks if callback.output_files()]
        self.folders: dict[Path, list[str]] = defaultdict(list)  # each folder, and the names written there
        working = Path.cwd().resolve()
        for callback in self.writers:
            for path in map(Path, callback.output_files()):
                if path.parent.resolve() in (working, *working.parents):
                    raise ValueError(f"callback {callback.key} writes {path} into {path.parent.resolve()}, the working "
                                     "folder or one above it, which the run would claim whole (a run.json and a lock "
                                     "beside your own files): give the run a folder of its own, such as "
                                     f"runs/1/{path.name}")  # fmt: skip
                self.folders[path.parent].append(path.name)
        self.opened = self.resumed = False
        self._locks: dict[Path, FolderLock] = {}  # held until the run finishes (the OS frees them if it is killed)
        self._claimed: set[tuple[Path, str]] = set()  # (folder, run) claimed

    def lock(self) -> None:
        """Take the lock of every output folder (rank 0), so a second live copy of the run is refused before it
        reads or loads anything (a ``CheckpointError`` naming the holder, raised on every rank)."""
        with on_every_rank(self.ranks, self.device, "lock the run's folders"):
            if self.ranks.is_global_zero:
                for folder in self.folders:
                    if folder not in self._locks:
                        self._locks[folder] = FolderLock(folder)

    def claim(self, folder: Path, own_files: Sequence[str] = (), mark: bool = True) -> None:
        """Claim ``folder`` for the run (once; ``save_checkpoint`` claims where it is asked to save); rank 0 only."""
        marker = self.run.marker()
        if (folder, marker["run"]) not in self._claimed:
            self._locks[folder] = claim_folder(folder, marker, () if self.resumed else own_files, mark)
            self._claimed.add((folder, marker["run"]))

    def open(self, trainer: Any) -> None:
        """Claim every output folder for the run, then open each writer's files; once (again after a load).

        Raises:
            CheckpointError: A folder belongs to another run, or another live process holds it (on every rank).
        """
        if self.opened:
            return
        with on_every_rank(self.ranks, self.device, "claim the run's folders"):
            if self.ranks.is_global_zero:
                for folder, names in self.folders.items():  # all checked before any is marked
                    self.claim(folder, names, mark=False)
                for folder in self.folders:
                    mark_folder(folder, self.run.marker())
                for callback in self.writers:
                    callback.open_files(trainer)
        self.opened = True

    def release(self) -> None:
        """Give up the folders' locks (the run has finished); a later save or run claims them again."""
        self._locks.clear()
        self._claimed.clear()
