"""Durable, all-or-nothing file writes: the one routine behind checkpoints, logs and plots.

``atomic_write(path)`` hands out a temporary path beside ``path``. Whatever
the caller writes there (a safetensors file, a CSV, a PNG) becomes ``path``
only once it is on disk: the file is fsynced, renamed over ``path``, and the
folder is fsynced so the rename itself survives a power loss. A crash at any
instant leaves the previous file (or none) or the complete new one, never a
partial file under that name; an error removes the temporary file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_copy", "atomic_write", "fsync_path", "temporary_path"]


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush a file's data, or a folder's entries (a rename or a new file in it), to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def temporary_path(path: Path) -> Path:
    """Where ``atomic_write`` writes ``path`` first: a hidden name carrying the writer's process id,
    so a later run can tell a dead writer's leftover (``remove_stale_temporaries``) from a live one's."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write; on a clean exit it becomes ``path``, durably.

    Raises:
        OSError: Writing, syncing or renaming failed; ``path`` is as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(path)
    try:
        yield temporary
        fsync_path(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_copy(source: Path, target: Path) -> None:
    """Make ``target`` a durable copy of ``source`` atomically: a hard link where the filesystem allows."""
    with atomic_write(target) as temporary:
        temporary.unlink(missing_ok=True)
        try:
            os.link(source, temporary)
        except OSError:
            shutil.copyfile(source, temporary)
