"""Checkpoints: all file I/O of the library. What goes in comes from ``Trainer.state_dict``."""

from .folder import (
    DEFAULT_CHECKPOINT_FOLDER,
    checkpoint_files,
    find_checkpoint,
    newest_valid,
    next_checkpoint_path,
    remove_stale_temporaries,
    save_target,
)
from .serialization import FORMAT_VERSION, CheckpointError, fsync_path, read_tree, write_tree

__all__ = [
    "DEFAULT_CHECKPOINT_FOLDER",
    "FORMAT_VERSION",
    "CheckpointError",
    "checkpoint_files",
    "find_checkpoint",
    "fsync_path",
    "newest_valid",
    "next_checkpoint_path",
    "read_tree",
    "remove_stale_temporaries",
    "save_target",
    "write_tree",
]
