"""Where checkpoints go and come from: a file or a folder of numbered ones, the newest good one found."""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .atomic import fsync_path
from .lock import LOCK_FILE, FolderLock
from .serialization import read_document, read_tree

__all__ = ["BEST", "CheckpointFolder", "renumbered", "sequence_of", "DEFAULT_CHECKPOINT_FOLDER", "EARLIER_RUNS", "RUN_MARKER", "best_epoch_name", "best_files",
           "checkpoint_files", "discard_run", "find_checkpoint", "newest_valid", "next_checkpoint_path",
           "read_run_marker", "save_folder", "save_target", "set_aside"]  # fmt: skip

DEFAULT_CHECKPOINT_FOLDER = Path("checkpoints")
RUN_MARKER = "run.json"  # which run a folder of checkpoints belongs to
BEST = "best.safetensors"  # the checkpoint of the best epoch, kept by a Checkpoint callback with best=
EARLIER_RUNS = "earlier-runs"  # where set_aside moves a folder's earlier run

_NAME = re.compile(r"^ckpt-(?P<sequence>\d{6,})-epoch(?P<epoch>\d+)-step(?P<step>\d+)\.safetensors$")


class CheckpointFolder:
    """The layout of a folder of checkpoints, all in this class::

        ckpt-000012-epoch0003-step000000450.safetensors   the numbered checkpoints (sequence, epoch, step)
        best.safetensors                                  the best epoch's (a Checkpoint callback with best=)
        best-epoch0003.safetensors                        the k best epochs' (with keep_best=k)
        run.json                                          the run the folder belongs to
        .statetrainer.lock                                held by the live process that writes here
        earlier-runs/20261201-143000-1a2b3c4d/            a run that set_aside moved out of the way

    Args:
        path: The folder (it need not exist yet).
    """

    CHECKPOINTS = "ckpt-*.safetensors"  # the names a save claims in the folder
    BEST_COPIES = "best*.safetensors"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @property
    def best(self) -> Path:
        return self.path / BEST

    @property
    def marker(self) -> Path:
        return self.path / RUN_MARKER

    def best_of_epoch(self, epoch: int) -> Path:
        """The copy of the checkpoint of ``epoch`` (from 1) kept while it ranks among the best (``keep_best``)."""
        return self.path / f"best-epoch{epoch:04d}.safetensors"

    def written(self) -> list[Path]:
        """What a ``Checkpoint`` callback writes here, as patterns: the numbered checkpoints and the best copies."""
        return [self.path / self.CHECKPOINTS, self.path / self.BEST_COPIES]

    def checkpoints(self, epoch: int | None = None) -> list[Path]:
        """The numbered checkpoints, oldest first (by their sequence number); those saved in ``epoch`` if given."""
        if not self.path.is_dir():
            return []
        found = [(int(match["sequence"]), int(match["epoch"]), path) for path in self.path.iterdir()
                 if (match := _NAME.match(path.name))]  # fmt: skip
        return [path for _, saved_in, path in sorted(found) if epoch is None or saved_in == epoch]

    def next_checkpoint(self, epoch: int, step: int) -> Path:
        """A name after every checkpoint already here."""
        files = self.checkpoints()
        match = _NAME.match(files[-1].name) if files else None
        sequence = int(match["sequence"]) + 1 if match else 0
        return self.path / f"ckpt-{sequence:06d}-epoch{epoch:04d}-step{step:09d}.safetensors"

    def ranked_copies(self) -> list[Path]:
        """The ``best-epoch*`` copies here."""
        return sorted(self.path.glob("best-epoch*.safetensors"))

    def best_copies(self) -> list[Path]:
        """Every best copy here: ``best.safetensors`` and the ``best-epoch*`` files."""
        return ([self.best] if self.best.exists() else []) + self.ranked_copies()

    def read_marker(self) -> dict[str, Any] | None:
        """The run marker, or None when the folder has none; ``CheckpointError`` for one that is not a marker."""
        if not self.marker.is_file():
            return None
        try:
            content = json.loads(self.marker.read_text())
        except (OSError, ValueError) as error:
            raise CheckpointError(
                f"{self.marker} is unreadable ({error}); it names the run this folder belongs to"
            ) from error
        if not isinstance(content, dict):
            raise CheckpointError(f"{self.marker} is not a run marker; it should name the run this folder belongs to")
        return content


def sequence_of(path: Path) -> int | None:
    """The sequence number of a numbered checkpoint's name; None for another name."""
    match = _NAME.match(path.name)
    return int(match["sequence"]) if match else None


def renumbered(path: Path, sequence: int) -> Path:
    """The numbered checkpoint ``path`` under sequence number ``sequence``."""
    return path.with_name(re.sub(r"^ckpt-\d+", f"ckpt-{sequence:06d}", path.name))


def best_epoch_name(epoch: int) -> str:
    """The name of the checkpoint of ``epoch`` (from 1) kept while it ranks among the best (``keep_best``)."""
    return CheckpointFolder("").best_of_epoch(epoch).name


def checkpoint_files(folder: Path) -> list[Path]:
    """The folder's checkpoints, oldest first (by their sequence number)."""
    return CheckpointFolder(folder).checkpoints()


def next_checkpoint_path(folder: Path, epoch: int, step: int) -> Path:
    """A name after every checkpoint already in ``folder``."""
    return CheckpointFolder(folder).next_checkpoint(epoch, step)


Prepare = Callable[[Path, dict[str, Any]], dict[str, Any]]


READ, UNREADABLE, FAILED = 0, 1, 2  # how reading a checkpoint went on a rank: ``settle`` takes the worst


def _saved_before(path: Path, before: Callable[[dict[str, Any]], bool]) -> bool:
    """Whether ``before`` accepts the checkpoint's saved position; True for one whose position does not read (the
    load then reports it and falls back past it)."""
    try:
        position = read_document(path).get("position")
        return not isinstance(position, dict) or bool(before(position))
    except (CheckpointError, KeyError, TypeError):
        return True


def newest_valid(
    folder: Path,
    check: Callable[[dict[str, Any]], None] | None = None,
    prepare: Prepare | None = None,
    settle: Callable[[int], int] | None = None,
    before: Callable[[dict[str, Any]], bool] | None = None,
) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``folder`` that reads and verifies, once ``check`` passes on it; None if there is none.
    With ``before``, the newest of those whose saved position it accepts (read from the file's metadata first).

    A newest file that does not read or verify (cut short, corrupted) is
    reported with a warning and the previous one is tried. One that reads but
    fails ``check`` (it does not fit this trainer) raises: an older checkpoint
    of the run would resume it from an earlier point without saying so.
    ``prepare(path, tree)`` finishes reading a checkpoint (a sharded one's
    pieces); ``settle(outcome)`` gives every rank the worst rank's outcome
    (``READ``, ``UNREADABLE``, ``FAILED``: under torchrun each rank reads its
    own pieces, and all fall back together, or all raise).
    """
    failures = []
    candidates = checkpoint_files(folder)
    if before is not None:
        candidates = [path for path in candidates if _saved_before(path, before)]
    for path in reversed(candidates):
        error: BaseException | None = None
        tree: dict[str, Any] = {}
        try:
            tree = read_tree(path)
            if prepare is not None:
                tree = prepare(path, tree)
        except Exception as raised:  # noqa: BLE001 -- every rank hears of it before anything is raised
            error = raised
        outcome = READ if error is None else UNREADABLE if isinstance(error, CheckpointError) else FAILED
        if settle is not None:
            outcome = settle(outcome)
        if outcome == FAILED:
            raise error or CheckpointError(f"another rank failed while reading {path}; see its error")
        if outcome == UNREADABLE:
            error = error or CheckpointError("another rank could not read its part of it")
            failures.append(f"{path.name}: {error}")
            warnings.warn(f"skipping checkpoint {path}: {error}; falling back to the previous one", stacklevel=3)
            continue
        if check is not None:
            try:
                check(tree)
            except CheckpointError as error:
                raise CheckpointError(
                    f"{path.name}, the newest checkpoint in {folder}, does not fit: {error}"
                ) from error
        return path, tree
    if failures:
        raise CheckpointError(f"no usable checkpoint in {folder}: " + "; ".join(failures))
    return None


def save_target(path: str | os.PathLike[str] | None, epoch: int, step: int) -> Path:
    """The file a save to ``path`` writes: ``path`` itself for a ``.safetensors`` name, else the folder's next
    (the caller claims the folder first: ``statetrainer.checkpoint.claim_folder``).

    Raises:
        ValueError: ``path`` names a file of another kind (``model.pt``).
    """
    target = save_folder(path)
    return target if target.suffix == ".safetensors" else next_checkpoint_path(target, epoch, step)


def save_folder(path: str | os.PathLike[str] | None) -> Path:
    """What a save to ``path`` names: a ``.safetensors`` file, or the folder of numbered checkpoints.

    Raises:
        ValueError: ``path`` names a file of another kind (``model.pt``).
    """
    target = Path(path) if path is not None else DEFAULT_CHECKPOINT_FOLDER
    if target.suffix and target.suffix != ".safetensors" and not target.is_dir():
        raise ValueError(
            f"save_checkpoint({str(target)!r}): checkpoints are safetensors files; name a file ending in "
            "'.safetensors' or a folder (a new folder whose name has a dot must exist first)"
        )
    return target


def read_run_marker(folder: Path) -> dict[str, Any] | None:
    """The run marker of ``folder``, or None when it has none."""
    return CheckpointFolder(folder).read_marker()


def best_files(folder: Path) -> list[Path]:
    """The best checkpoints a ``Checkpoint`` callback keeps in ``folder``: ``best.safetensors`` and ``best-epoch*``."""
    return CheckpointFolder(folder).best_copies()


def discard_run(folder: Path) -> list[Path]:
    """Delete the run in ``folder``: its numbered checkpoints, its best copies, then its run marker.

    For starting over in the same folder. The marker goes last, so a run
    interrupted while discarding is still refused, never half adopted.

    Raises:
        CheckpointError: A live process holds the folder (see ``FolderLock``).
    """
    lock = FolderLock(folder, exclusive=True) if folder.is_dir() else None
    layout = CheckpointFolder(folder)
    doomed = [*layout.checkpoints(), *layout.best_copies(), layout.marker]
    removed = [path for path in doomed if path.exists()]
    for path in removed:
        path.unlink()
    if removed:
        fsync_path(folder)
    if lock is not None:
        lock.release()
    return removed


def set_aside(folder: Path) -> Path | None:
    """Move everything in ``folder`` (its run: checkpoints, marker, logs, plots) into a new dated subfolder of
    ``folder/earlier-runs``, so a fresh run starts in an empty folder and nothing of the old one is lost or
    mixed in; return that subfolder, or None when there was nothing to move.

    Raises:
        CheckpointError: A live process holds the folder (see ``FolderLock``): its run is not moved under it.
    """
    if not folder.is_dir():
        return None
    lock = FolderLock(folder, exclusive=True)  # the lock file stays: a live copy starting meanwhile finds it held
    entries = [entry for entry in folder.iterdir() if entry.name not in (EARLIER_RUNS, LOCK_FILE)]
    if not entries:
        lock.release()
        return None
    marker = read_run_marker(folder) if (folder / RUN_MARKER).is_file() else None
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    destination = folder / EARLIER_RUNS / (f"{stamp}-{str(marker.get('run', ''))[:8]}" if marker else stamp)
    destination.mkdir(parents=True, exist_ok=False)
    for entry in sorted(entries, key=lambda entry: entry.name == RUN_MARKER):  # the marker last, as discard_run
        entry.rename(destination / entry.name)
    fsync_path(destination)
    fsync_path(folder)
    lock.release()
    return destination


def find_checkpoint(
    path: str | os.PathLike[str],
    own_folders: Sequence[Path],
    check: Callable[[dict[str, Any]], None] | None = None,
    accept_marker: Callable[[dict[str, Any], Path], None] | None = None,
    prepare: Prepare | None = None,
    settle: Callable[[int], int] | None = None,
    before: Callable[[dict[str, Any]], bool] | None = None,
) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume from: the file ``path``, or the newest good one in the folder ``path``.

    None for a folder that holds no checkpoint yet, and for one of
    ``own_folders`` (where the run saves) before it exists: a first run.
    ``prepare``, ``settle`` and ``before`` are ``newest_valid``'s.

    Raises:
        CheckpointError: The file is unusable, ``path`` is a folder of
            another run (``accept_marker`` says), or ``path`` does not exist
            and is none of ``own_folders`` (a typo).
    """
    path = Path(path)
    if path.is_dir() and path.suffix == ".safetensors":
        raise CheckpointError(
            f"{path} is a folder, not a checkpoint file; name a .safetensors file or a folder of them"
        )
    if path.is_dir():
        marker = read_run_marker(path)
        if marker is not None and accept_marker is not None:
            accept_marker(marker, path)  # another run's folder: refused, never adopted
        return newest_valid(path, check, prepare, settle, before)
    if path.exists() or path.suffix == ".safetensors":
        tree = read_tree(path)
        return path, prepare(path, tree) if prepare is not None else tree
    if any(path.resolve() == folder.resolve() for folder in own_folders):
        return None
    saving_to = (f"this trainer's Checkpoint callback saves to {', '.join(map(str, own_folders))}" if own_folders
                 else "this trainer has no Checkpoint callback")  # fmt: skip
    raise CheckpointError(f"no checkpoint file or folder at {path}; {saving_to}. Check the path")
