"""Data: batch sources that start anywhere, walking them batch by batch, moving batches to the device."""

from .cursor import END, BatchCursor, loader_length
from .phases import PhaseSources
from .resumable import SeededOrder, SeededSamples, mix_seed
from .sources import (
    BatchSource,
    EpochSource,
    SeededLoader,
    SequenceSource,
    StatefulSource,
    batch_source,
)
from .stream import PassStream
from .transfer import to_device, unpack_pair

__all__ = [
    "END",
    "BatchCursor",
    "BatchSource",
    "EpochSource",
    "PassStream",
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
