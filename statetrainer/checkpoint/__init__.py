"""Checkpoints: all file I/O of the library. What goes in comes from ``Trainer.state_dict``."""

from .folder import checkpoint_files, newest_valid, next_checkpoint_path, remove_stale_temporaries
from .serialization import FORMAT_VERSION, CheckpointError, fsync_path, read_tree, write_tree

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "checkpoint_files",
    "fsync_path",
    "newest_valid",
    "next_checkpoint_path",
    "read_tree",
    "remove_stale_temporaries",
    "write_tree",
]
