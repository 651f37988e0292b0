"""Data: resumable batch sources, walking them batch by batch, moving batches to the device."""

from .cursor import END, BatchCursor, loader_length
from .resumable import BatchSource, SeededOrder, SeededSamples, mix_seed
from .transfer import to_device

__all__ = ["END", "BatchCursor", "BatchSource", "SeededOrder", "SeededSamples", "loader_length", "mix_seed", "to_device"]
