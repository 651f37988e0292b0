"""Durable, all-or-nothing file writes: the one routine behind checkpoints, logs and plots.

``atomic_write(path)`` hands out a temporary path, in a private folder beside
``path`` (a writer such as safetensors' may make temporary files of its own
there). Whatever the caller writes there (a safetensors file, a CSV, a PNG)
becomes ``path`` only once it is on disk: the file is fsynced, renamed over
``path``, and the folder is fsynced so the rename itself survives a power
loss. A crash at any instant leaves the previous file (or none) or the
complete new one, never a partial file under that name; an error removes the
private folder, and ``remove_stale_temporaries`` removes one a killed writer left.

For a large file, ``atomic_write(path, sync_while_writing=True)`` has a
thread flush what the writer has written so far while it goes on writing (a
writer that releases the GIL, as safetensors' does), so the disk works during
the write and the final fsync has little left to do.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_copy", "atomic_write", "fsync_path", "remove_stale_temporaries", "temporary_path"]

_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")  # as temporary_path names them


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush a file's data, or a folder's entries (a rename or a new file in it), to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


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
def atomic_write(path: str | os.PathLike[str], *, sync_while_writing: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on a clean exit it becomes ``path``, durably.

    Raises:
        OSError: Writing, syncing or renaming failed (a sync during the write
            included); ``path`` is as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    workspace = temporary_path(path)
    remove_stale_temporaries(path.parent, path.name)  # what a killed writer of this name left
    workspace.mkdir(exist_ok=True)
    temporary = workspace / path.name
    syncer = _SyncWhileWriting(workspace) if sync_while_writing else None
    try:
        try:
            yield temporary
        finally:  # the thread stops in any case; its error matters only if the write itself went well
            sync_error = syncer.stop() if syncer is not None else None
        if sync_error is not None:
            raise sync_error
        fsync_path(temporary)
        os.replace(temporary, path)
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
    fsync_path(path.parent)


class _SyncWhileWriting:
    """A thread that keeps fdatasyncing the file a writer is writing in ``workspace``, until stopped.

    The writer may write under a temporary name of its own (safetensors does,
    with the whole size allocated at once), so the first file to appear is
    synced every ``interval`` seconds.
    """

    interval = 0.05

    def __init__(self, workspace: Path) -> None:
        self._workspace, self._stopping = workspace, threading.Event()
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name="statetrainer-sync", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        descriptor = None
        try:
            while not self._stopping.wait(self.interval):
                if descriptor is None:
                    names = os.listdir(self._workspace)
                    if names:
                        with contextlib.suppress(FileNotFoundError):
                            descriptor = os.open(self._workspace / names[0], os.O_RDONLY)
                    continue
                os.fdatasync(descriptor)
        except OSError as error:  # kept for stop(): a thread's exception would otherwise be lost
            self._error = error
        finally:
            if descriptor is not None:
                os.close(descriptor)

    def stop(self) -> OSError | None:
        """Wait for the thread; return the error of a sync that failed while the file was written."""
        self._stopping.set()
        self._thread.join()
        if self._error is None:
            return None
        return OSError(f"syncing a file in {self._workspace} to disk failed while it was written: {self._error}")


def atomic_copy(source: Path, target: Path) -> None:
    """Make ``target`` a durable copy of ``source`` atomically: a hard link where the filesystem allows."""
    with atomic_write(target) as temporary:
        try:
            os.link(source, temporary)
        except OSError:
            shutil.copyfile(source, temporary)
