"""Durable, all-or-nothing file writes: the one routine behind checkpoints, logs and plots.

``atomic_write(path)`` hands out a temporary path, in a private folder beside
``path`` (a writer such as safetensors' may make temporary files of its own
there). Whatever the caller writes there (a safetensors file, a CSV, a PNG)
becomes ``path`` only once it is on disk: the file is fsynced, renamed over
``path``, and the folder is fsynced so the rename itself survives a power
loss. A crash at any instant leaves the previous file (or none) or the
complete new one, never a partial file under that name; an error removes the
private folder, and ``remove_stale_temporaries`` removes one a killed writer left.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_copy", "atomic_write", "explained", "fsync_path", "open_no_follow", "remove_stale_temporaries",
           "temporary_path"]  # fmt: skip

_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")  # as temporary_path names them


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush a file's data, or a folder's entries (a rename or a new file in it), to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def open_no_follow(path: Path, flags: int) -> int:
    """``os.open(path, flags)`` for a file the library writes in place (a log it appends to or cuts back), never
    through a symbolic link, which could point at any file of the user's.

    Raises:
        OSError: ``path`` is a symbolic link (``ELOOP``, the message says so), or the open failed.
    """
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, f"{path} is a symbolic link, and statetrainer writes no file through a link: "
                                       "replace it with a regular file or remove it") from error  # fmt: skip
        raise


def temporary_path(path: Path) -> Path:
    """The private folder ``atomic_write`` writes ``path`` in first: a hidden name carrying the writer's
    process id, so a later run can tell a dead writer's leftover (``remove_stale_temporaries``) from a live one's."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def remove_stale_temporaries(folder: Path, name: str | None = None) -> list[Path]:
    """Delete what writers that no longer run (killed mid-write) left in ``folder``; only of ``name`` if given."""
    removed = []
    for path in folder.iterdir() if folder.is_dir() else ():
        match = _TEMPORARY.match(path.name)
        if match and (name is None or match["name"] == name) and not _running(int(match["pid"])):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _new_file_mode() -> int:
    """The mode ``open()`` gives a new file in this process: 0o666 less the umask."""
    try:
        with open("/proc/self/status") as status:  # Linux: read the umask without changing it
            umask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)  # elsewhere: the only way to read it is to set it, and put it back at once
        os.umask(umask)
    return 0o666 & ~umask


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


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write; on a clean exit it becomes ``path``, durably.

    Raises:
        OSError: Writing, syncing or renaming failed; ``path`` is as it was.
            The message names ``path`` and, for a full disk, a read-only file
            system or a permission error, what to do.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        workspace = temporary_path(path)
        remove_stale_temporaries(path.parent, path.name)  # what a killed writer of this name left
        workspace.mkdir(exist_ok=True)
        temporary = workspace / path.name
        try:
            yield temporary
            os.chmod(temporary, _new_file_mode())  # a writer's own temporary file (safetensors') is private: 0600
            fsync_path(temporary)
            os.replace(temporary, path)
        finally:
            shutil.rmtree(workspace, ignore_errors=True)
        fsync_path(path.parent)
    except OSError as error:
        raise explained(error, path) from error


_ADVICE = {
    errno.ENOSPC: "the disk is full: free some space (a smaller keep_last keeps fewer checkpoints) or save elsewhere",
    errno.EDQUOT: "the disk quota is used up: free some space or save elsewhere",
    errno.EROFS: "the file system is read-only: save to a folder on a writable one",
    errno.EACCES: "permission denied: save to a folder you can write to, or change its permissions",
    errno.EPERM: "the operation is not permitted: save to a folder you can write to",
}


def explained(error: OSError, path: Path) -> OSError:
    """``error`` as an ``OSError`` of the same errno whose message names ``path`` and what to do."""
    known = _ADVICE.get(error.errno) if error.errno is not None else None
    advice = known or error.strerror or str(error)
    return OSError(error.errno, f"could not write {path}: {advice}; the previous file there, if any, is intact")


def atomic_copy(source: Path, target: Path) -> None:
    """Make ``target`` a durable copy of ``source`` atomically: a hard link where the filesystem allows."""
    with atomic_write(target) as temporary:
        try:
            os.link(source, temporary)
        except OSError:
            shutil.copyfile(source, temporary)
