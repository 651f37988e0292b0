"""One live process per run folder: an OS lock that a killed process cannot leave behind.

``FolderLock(folder)`` takes an exclusive ``flock`` on ``folder/.statetrainer.lock``
and records the holder's host, process id and start time in it. The operating
system releases the lock when the process exits or is killed, so a second live
copy of a run (a requeued job whose first copy still runs) is refused at once,
naming the holder, and a killed run leaves no stale lock. Trainers of one
process share its hold on a folder (a run resumed in the same test or
notebook); the lock goes with the last of them.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import warnings
import weakref
from datetime import datetime
from pathlib import Path
from typing import ClassVar

from ..errors import CheckpointError

try:
    import fcntl
except ImportError:  # Windows: folders are still claimed, but a second live copy is not detected
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_FILE", "FolderLock"]

LOCK_FILE = ".statetrainer.lock"


class FolderLock:
    """This process's hold on ``folder``'s lock; it lasts while this object (or another of this process on the
    same folder) lives, and at most as long as the process (a forked child holds none).

    Args:
        folder: The folder; made if missing.
        exclusive: Refuse a folder this process holds already (what moves or deletes a run's files asks for).

    Raises:
        CheckpointError: Another live process holds the folder; the message names its host and process id.
    """

    _held: ClassVar[dict[str, list[int]]] = {}  # resolved folder -> [descriptor, holders in this process]

    def __init__(self, folder: Path, exclusive: bool = False) -> None:
        self.folder = folder
        key = str(folder.resolve())
        held = self._held.get(key)
        if held is not None and exclusive:
            raise CheckpointError(f"{folder} is held by a trainer of this process; let its run finish (or drop the "
                                  "trainer) before moving or deleting its files")  # fmt: skip
        if held is None:
            held = self._held[key] = [_lock(folder), 0]
        held[1] += 1
        self._finalizer = weakref.finalize(self, FolderLock._drop, key)

    def release(self) -> None:
        """Give up this hold now (the lock itself goes with the process's last hold)."""
        self._finalizer()

    @classmethod
    def _drop(cls, key: str) -> None:
        held = cls._held.get(key)
        if held is None:  # a forked child, which holds no lock
            return
        held[1] -= 1
        if held[1] == 0:
            del cls._held[key]
            os.close(held[0])

    @classmethod
    def _forget_in_child(cls) -> None:
        """In a forked child (a DataLoader worker): close the inherited descriptors, so the lock goes with the
        process that took it, not with the last of its children."""
        for descriptor, _ in cls._held.values():
            os.close(descriptor)
        cls._held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=FolderLock._forget_in_child)


def _lock(folder: Path) -> int:
    """Open and lock ``folder``'s lock file (made if missing, never through a link), recording this process in
    it; return the open descriptor, which holds the lock."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise CheckpointError(f"{path} is a symbolic link; statetrainer writes no file through a link: "
                                  "remove it") from error  # fmt: skip
        raise CheckpointError(f"cannot open the lock file {path}: {error.strerror}") from error
    if fcntl is None:
        return descriptor
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(descriptor)
        os.close(descriptor)
        raise CheckpointError(
            f"{folder} is in use by another live process ({holder}): one copy of a run writes into its folder at "
            "a time. Wait for that process to end or stop it, or give this run a folder of its own"
        ) from None
    except OSError as error:  # a file system without locks (some network mounts)
        warnings.warn(f"{folder}: the file system cannot lock ({error.strerror}), so a second live copy of this "
                      "run would not be detected", stacklevel=4)  # fmt: skip
        return descriptor
    record = {"host": socket.gethostname(), "pid": os.getpid(), "since": datetime.now().isoformat(timespec="seconds")}
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, (json.dumps(record) + "\n").encode(), 0)
    return descriptor


def _read_holder(descriptor: int) -> str:
    """The holder a lock file records, in words."""
    try:
        record = json.loads(os.pread(descriptor, 4096, 0) or b"{}")
        return f"host {record['host']}, pid {record['pid']}, since {record['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not recorded itself yet"
