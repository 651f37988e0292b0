"""Who may write in a run's folder: one run, and one live process of it (``statetrainer.checkpoint.lock``).

A folder belongs to the run its ``run.json`` names; a folder with checkpoints
but no ``run.json`` belongs to the run its newest readable checkpoint holds.
``claim_folder`` takes the folder's lock, then refuses any other run before it
writes, truncates or deletes anything there.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .atomic import atomic_write
from .folder import RUN_MARKER, checkpoint_files, read_run_marker
from .lock import FolderLock
from .serialization import read_document


def run_of(path: Path) -> str | None:
    """The run id a checkpoint file holds, read from its metadata alone; None when it does not read."""
    try:
        run = read_document(path).get("run")
    except CheckpointError:
        return None
    return str(run["id"]) if isinstance(run, dict) and isinstance(run.get("id"), str) else None


def claim_folder(folder: Path, marker: dict[str, Any], own_files: Iterable[str] = (), mark: bool = True) -> FolderLock:
    """Take ``folder`` for the run ``marker`` describes, or raise ``CheckpointError`` before writing anything.

    The lock comes first, so no other live process is writing there. A folder
    with a ``run.json`` is the run's when it names this run; one without is the
    run's when its newest readable checkpoint is this run's, or when it has no
    checkpoint and none of ``own_files`` (glob patterns of what the run writes
    there: a log left by a run whose marker was deleted is not overwritten).
    The marker is then written, unless ``mark`` is False (``mark_folder`` writes it once every folder of the
    run is claimed, so a run refused at its second folder leaves no marker in its first).

    Returns:
        The lock, held while it lives.
    """
    lock = FolderLock(folder)
    existing = read_run_marker(folder)
    this_run = marker["run"]
    if existing is not None:
        if existing.get("run") != this_run:
            raise CheckpointError(
                f"{folder} holds another run's files (run {existing.get('run')}, seed {existing.get('seed')}); this "
                f"is run {this_run} (seed {marker['seed']}). Give this run a folder of its own, resume that run with "
                "trainer.load_checkpoint(folder) first, or move it aside with statetrainer.checkpoint.set_aside(folder)"
            )
        return lock
    owners = [owner for owner in map(run_of, reversed(checkpoint_files(folder))) if owner is not None]
    if owners and owners[0] != this_run:
        raise CheckpointError(
            f"{folder} has no {RUN_MARKER}, and its newest checkpoint belongs to another run ({owners[0]}); this is "
            f"run {this_run}. Give this run a folder of its own, or resume that run with trainer.load_checkpoint(folder)"
        )
    if not owners:
        found = sorted({path.name for pattern in own_files for path in folder.glob(pattern)})
        if found:
            raise CheckpointError(
                f"{folder} holds {', '.join(found)} but no {RUN_MARKER} naming the run they belong to, so this run "
                "will not overwrite them; move them away, or give this run a folder of its own"
            )
    if mark:
        mark_folder(folder, marker)
    return lock


def mark_folder(folder: Path, marker: dict[str, Any]) -> None:
    """Write ``folder``'s ``run.json`` for the run ``marker`` describes, unless it has one already."""
    if read_run_marker(folder) is None:
        with atomic_write(folder / RUN_MARKER) as temporary:
            temporary.write_text(json.dumps(marker, indent=1) + "\n")


def refuse_overwrite(path: Path, run: str) -> None:
    """Raise ``CheckpointError`` when ``path`` exists and is not a checkpoint of run ``run``: a save names its file,
    and never replaces a file of the user's or of another run."""
    if not path.exists() and not path.is_symlink():
        return
    owner = run_of(path) if path.is_file() and not path.is_symlink() else None
    if owner != run:
        what = f"a checkpoint of another run ({owner})" if owner else "not a checkpoint of this run"
        raise CheckpointError(f"{path} exists and is {what}; the save would replace it: delete or move it, or save "
                              "under another name")  # fmt: skip
