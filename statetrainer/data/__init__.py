"""Data: batch sources that start anywhere, walking them batch by batch, moving batches to the device."""

from .cursor import END, BatchCursor, loader_length
from .resumable import SeededOrder, SeededSamples, mix_seed
from .sources import (
    BatchSource,
    EpochSource,
    PhaseSources,
    SeededLoader,
    SequenceSource,
    StatefulSource,
    batch_source,
)
from .transfer import to_device, unpack_pair

__all__ = [
    "END",
    "BatchCursor",
    "BatchSource",
    "EpochSource",
    "PhaseSources",
    "SeededLoader",
    "SeededOrder",
    "SeededSamples",
    "SequenceSource",
    "StatefulSource",
    "batch_source",
    "loader_length",
    "mix_seed",
    "to_device",
    "unpack_pair",
]
