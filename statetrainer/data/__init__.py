"""Data: walking loaders batch by batch and moving batches to the device."""

from .cursor import END, BatchCursor, loader_length
from .transfer import to_device

__all__ = ["END", "BatchCursor", "loader_length", "to_device"]
