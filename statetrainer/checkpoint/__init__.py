"""Checkpoints: all file I/O of the library. What goes in comes from ``Trainer.state_dict``."""

from .atomic import atomic_copy, atomic_write, fsync_path, remove_stale_temporaries, temporary_path
from .folder import (
    DEFAULT_CHECKPOINT_FOLDER,
    RUN_MARKER,
    checkpoint_files,
    claim_folder,
    discard_run,
    find_checkpoint,
    newest_valid,
    next_checkpoint_path,
    read_run_marker,
    save_target,
    set_aside,
)
from .serialization import FORMAT_VERSION, CheckpointError, read_header, read_tree, write_tree

__all__ = [
    "DEFAULT_CHECKPOINT_FOLDER",
    "RUN_MARKER",
    "FORMAT_VERSION",
    "CheckpointError",
    "atomic_copy",
    "atomic_write",
    "checkpoint_files",
    "claim_folder",
    "discard_run",
    "find_checkpoint",
    "fsync_path",
    "newest_valid",
    "next_checkpoint_path",
    "read_header",
    "read_run_marker",
    "read_tree",
    "remove_stale_temporaries",
    "save_target",
    "set_aside",
    "temporary_path",
    "write_tree",
]
