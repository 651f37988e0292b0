"""A phase's loader as one stream of passes, of which each epoch takes the next ``K`` batches."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..errors import CheckpointError
from ..saved_state import check_integer, check_keys
from .sources import BatchSource, SeededLoader

__all__ = ["PassStream"]


class PassStream:
    """The batches of a ``Phase(name, loader, batches=K)``: one pass of its loader after another.

    The stream stands at batch ``taken`` of pass ``pass_index``. Its iterator
    stays open from one epoch to the next, so a DataLoader's workers keep
    loading through the epoch's other phases. A batch is counted before it is
    yielded, so between batches the state says where the next one comes from:
    a resumed stream reopens its source there. A rebuilt DataLoader reopens at
    the sample its ranks reached, which is the same point on any number of
    processes; other sources reopen at the batch (a list), or from their own
    saved state (a loader that keeps one).

    Args:
        source: The phase's batch source.
        name: The phase's name, for messages.

    Attributes:
        pass_index: The pass the stream is in, from 0.
        taken: Batches of that pass taken so far in this process.
    """

    def __init__(self, source: BatchSource, name: str) -> None:
        self.source, self.name = source, name
        self.pass_index, self.taken = 0, 0
        self._live: Iterator[Any] | None = None
        self._resume_sample: int | None = None  # a rebuilt DataLoader's pass goes on from this sample

    @property
    def started(self) -> bool:
        """Whether any batch has been taken: the stream is no longer at its beginning."""
        return self.pass_index > 0 or self.taken > 0

    def batches(self, seed: int) -> Iterator[Any]:
        """The stream from where it stands (the same iterator from epoch to epoch, until ``close``)."""
        if self._live is None:
            self._live = self._stream(seed)
        return self._live

    def _stream(self, seed: int) -> Iterator[Any]:
        source = self.source
        while True:
            if self._resume_sample is not None:
                assert isinstance(source, SeededLoader)  # only a rebuilt DataLoader's stream keeps a sample
                source.resume_at(self._resume_sample)
                self._resume_sample = None
            for batch in source.open(seed, self.pass_index, self.taken):
                self.taken += 1
                yield batch
            if self.taken == 0:  # a whole pass without a batch: going on would loop forever
                raise ValueError(f"phase {self.name!r}: pass {self.pass_index + 1} of its loader yielded no batches")
            self.pass_index, self.taken = self.pass_index + 1, 0

    def close(self) -> None:
        """Let go of the open pass, so a DataLoader's workers shut down; the next ``batches`` reopens it."""
        if self._live is not None:
            if isinstance(self.source, SeededLoader) and self.taken:
                self._resume_sample = self._samples()
            self._live = None

    def take_back(self) -> None:
        """Put the batch taken last back into the stream (a batch discarded after an error runs again)."""
        if self.taken == 0:
            raise RuntimeError(f"phase {self.name!r}: no batch of the open pass to take back")
        self.taken -= 1
        self._live = None
        if isinstance(self.source, SeededLoader):
            self._resume_sample = self.source.samples_done(self.taken) if self.taken else None

    def _samples(self) -> int | None:
        """For a rebuilt DataLoader: the samples of the pass's order that all ranks have taken."""
        if not isinstance(self.source, SeededLoader):
            return None
        if self._resume_sample is not None:  # loaded, not reopened yet
            return self._resume_sample
        return self.source.samples_done(self.taken) if self.taken else 0

    def state_dict(self) -> dict[str, Any]:
        return {"pass": self.pass_index, "batches": self.taken, "samples": self._samples()}

    def check_fits(self, state: Any) -> None:
        """Raise ``CheckpointError`` unless ``state`` is a ``state_dict()`` this stream can go on from (a rebuilt
        DataLoader's on any number of processes: its samples say where it goes on)."""
        check_keys("its stream's position", state, ("pass", "batches", "samples"))
        check_integer("its stream's pass", state["pass"])
        check_integer("its stream's batches", state["batches"])
        samples, source = state["samples"], self.source
        if isinstance(source, SeededLoader):
            check_integer("its stream's samples", samples, maximum=source.epoch_samples)
        elif samples is not None:
            raise CheckpointError("its stream counts samples of a DataLoader the trainer rebuilds, which this is not")
        elif source.length is not None and state["batches"] > source.length:
            raise CheckpointError(f"its stream has taken {state['batches']} batches of a pass of {source.length}")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Go on from ``state`` (checked by ``check_fits``) when the stream next opens."""
        self._live = None
        self.pass_index, self.taken = state["pass"], state["batches"]
        self._resume_sample = state["samples"] if state["samples"] and isinstance(self.source, SeededLoader) else None
