"""Checkpoints: all file I/O of the library. What goes in comes from ``Trainer.state_dict``."""

from ..errors import CheckpointError
from .atomic import atomic_copy, atomic_write, fsync_path, open_no_follow, remove_stale_temporaries, temporary_path
from .background import BackgroundWriter, StagingBuffers
from .folder import (
    BEST,
    DEFAULT_CHECKPOINT_FOLDER,
    RUN_MARKER,
    CheckpointFolder,
    best_epoch_name,
    best_files,
    checkpoint_files,
    discard_run,
    find_checkpoint,
    newest_valid,
    next_checkpoint_path,
    read_run_marker,
    save_folder,
    save_target,
    set_aside,
)
from .lock import LOCK_FILE, FolderLock
from .ownership import claim_folder, mark_folder, refuse_overwrite, run_of
from .serialization import FORMAT_VERSION, read_document, read_header, read_tree, write_tree

__all__ = [
    "BackgroundWriter",
    "StagingBuffers",
    "BEST",
    "CheckpointFolder",
    "DEFAULT_CHECKPOINT_FOLDER",
    "FORMAT_VERSION",
    "LOCK_FILE",
    "RUN_MARKER",
    "CheckpointError",
    "FolderLock",
    "atomic_copy",
    "atomic_write",
    "best_epoch_name",
    "best_files",
    "checkpoint_files",
    "claim_folder",
    "discard_run",
    "find_checkpoint",
    "fsync_path",
    "mark_folder",
    "newest_valid",
    "next_checkpoint_path",
    "open_no_follow",
    "read_document",
    "read_header",
    "read_run_marker",
    "read_tree",
    "refuse_overwrite",
    "remove_stale_temporaries",
    "run_of",
    "save_folder",
    "save_target",
    "set_aside",
    "temporary_path",
    "write_tree",
]
