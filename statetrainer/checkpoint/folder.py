"""A folder of numbered checkpoints: naming the next one, finding the newest good one."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .serialization import CheckpointError, read_tree

__all__ = ["checkpoint_files", "newest_valid", "next_checkpoint_path", "remove_stale_temporaries"]

_NAME = re.compile(r"^ckpt-(?P<sequence>\d{6,})-epoch(?P<epoch>\d+)-step(?P<step>\d+)\.safetensors$")
_TEMPORARY = re.compile(r"^\..+\.(?P<pid>\d+)\.tmp$")  # as serialization.write_tree names them


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete half-written files left in ``folder`` by writers that no longer run (killed mid-write)."""
    removed = []
    for path in folder.iterdir() if folder.is_dir() else ():
        match = _TEMPORARY.match(path.name)
        if match and not _running(int(match["pid"])):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


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
