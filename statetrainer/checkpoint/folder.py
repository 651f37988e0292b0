"""Where checkpoints go and come from: a file or a folder of numbered ones, the newest good one found."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .serialization import CheckpointError, read_tree

__all__ = ["DEFAULT_CHECKPOINT_FOLDER", "checkpoint_files", "find_checkpoint", "newest_valid", "next_checkpoint_path",
           "save_target"]  # fmt: skip

DEFAULT_CHECKPOINT_FOLDER = Path("checkpoints")

_NAME = re.compile(r"^ckpt-(?P<sequence>\d{6,})-epoch(?P<epoch>\d+)-step(?P<step>\d+)\.safetensors$")


def checkpoint_files(folder: Path) -> list[Path]:
    """The folder's checkpoints, oldest first (by their sequence number)."""
    if not folder.is_dir():
        return []
    found = [(int(match["sequence"]), path) for path in folder.iterdir() if (match := _NAME.match(path.name))]
    return [path for _, path in sorted(found)]


def next_checkpoint_path(folder: Path, epoch: int, step: int) -> Path:
    """A name after every checkpoint already in ``folder``."""
    files = checkpoint_files(folder)
    sequence = int(_NAME.match(files[-1].name)["sequence"]) + 1 if files else 0
    return folder / f"ckpt-{sequence:06d}-epoch{epoch:04d}-step{step:09d}.safetensors"


def newest_valid(folder: Path, check: Callable[[dict[str, Any]], None] | None = None) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``folder`` that reads, verifies and passes ``check``; None if there is none.

    A newest file that fails is reported with a warning and the previous one is tried.
    """
    failures = []
    for path in reversed(checkpoint_files(folder)):
        try:
            tree = read_tree(path)
            if check is not None:
                check(tree)
        except CheckpointError as error:
            failures.append(f"{path.name}: {error}")
            warnings.warn(f"skipping checkpoint {path}: {error}; falling back to the previous one", stacklevel=3)
            continue
        return path, tree
    if failures:
        raise CheckpointError(f"no usable checkpoint in {folder}: " + "; ".join(failures))
    return None


def save_target(path: str | os.PathLike[str] | None, epoch: int, step: int) -> Path:
    """The file a save to ``path`` writes: ``path`` itself for a ``.safetensors`` name, else the folder's next.

    Raises:
        ValueError: ``path`` names a file of another kind (``model.pt``).
    """
    target = Path(path) if path is not None else DEFAULT_CHECKPOINT_FOLDER
    if target.suffix == ".safetensors":
        return target
    if target.suffix and not target.is_dir():
        raise ValueError(
            f"save_checkpoint({str(target)!r}): checkpoints are safetensors files; name a file ending in "
            "'.safetensors' or a folder (a new folder whose name has a dot must exist first)"
        )
    return next_checkpoint_path(target, epoch, step)


def find_checkpoint(
    path: str | os.PathLike[str],
    own_folders: Sequence[Path],
    check: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume from: the file ``path``, or the newest good one in the folder ``path``.

    None for a folder that holds no checkpoint yet, and for one of
    ``own_folders`` (where the run saves) before it exists: a first run.

    Raises:
        CheckpointError: The file is unusable, or ``path`` does not exist and
            is none of ``own_folders`` (a typo).
    """
    path = Path(path)
    if path.is_dir() and path.suffix == ".safetensors":
        raise CheckpointError(f"{path} is a folder, not a checkpoint file; name a .safetensors file or a folder of them")
    if path.is_dir():
        return newest_valid(path, check)
    if path.exists() or path.suffix == ".safetensors":
        return path, read_tree(path)
    if any(path.resolve() == folder.resolve() for folder in own_folders):
        return None
    saving_to = (f"this trainer's Checkpoint callback saves to {', '.join(map(str, own_folders))}" if own_folders
                 else "this trainer has no Checkpoint callback")  # fmt: skip
    raise CheckpointError(f"no checkpoint file or folder at {path}; {saving_to}. Check the path")
