"""A phase: one named part of every epoch (train, valid, ...): a pass over its loader, or the stream's next K batches."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from .data import loader_length
from .validation import check_count

__all__ = ["Phase"]


@dataclass(eq=False)
class Phase:
    """One pass over ``loader`` per epoch, or, with ``batches=K``, the next ``K`` batches of its stream.

    Args:
        name: Names the phase in metrics and logs (``train`` gives ``train_loss``).
        loader: Any re-iterable of batches: a ``DataLoader``, a list, ... An
            iterator or generator, which can be consumed only once, is refused.
        grad: True for a phase that trains: the model is in train mode, autograd
            records, and every batch runs ``backward`` and (at accumulation
            boundaries) ``step``. False for evaluation: eval mode, no autograd,
            forward and loss only.
        limit: Run at most this many batches of the loader per epoch (the first
            ones of its order), for a quick debugging run; None runs them all.
        batches: Each epoch takes the next ``batches`` batches of the loader's
            stream, going on where the previous epoch stopped; when a finite
            loader runs out, its next pass starts (reshuffled, for a DataLoader
            the trainer rebuilds, from the run's seed and the pass number). An
            endless loader (an ``IterableDataset`` stream) needs it. None: one
            whole pass an epoch. ``limit`` and ``batches`` do not go together.

    How a batch becomes ``(input, target)`` is the ``Trainer``'s ``unpack``, one for every phase.

    A phase compares equal to its name, so ``trainer.phase == "train"`` reads
    as it should.
    """

    name: str
    loader: Iterable[Any]
    grad: bool = True
    limit: int | None = None
    batches: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"a phase name must be a non-empty identifier like 'train', got {self.name!r}")
        if not isinstance(self.grad, bool):
            raise TypeError(f"phase {self.name!r}: grad must be True or False, got {self.grad!r}")
        check_count(f"phase {self.name!r}: limit", self.limit, optional=True)
        check_count(f"phase {self.name!r}: batches", self.batches, optional=True)
        if self.limit is not None and self.batches is not None:
            raise ValueError(f"phase {self.name!r}: give limit or batches, not both: batches={self.batches} already "
                             "says how many batches each epoch takes")  # fmt: skip
        if not isinstance(self.loader, Iterable):
            raise TypeError(f"phase {self.name!r}: loader must be iterable, got {type(self.loader).__name__}")
        if isinstance(self.loader, Iterator):
            raise TypeError(
                f"phase {self.name!r}: loader is an iterator ({type(self.loader).__name__}), which is used up "
                "after one epoch; pass a re-iterable such as a list or a DataLoader"
            )
        if loader_length(self.loader) == 0:
            raise ValueError(f"phase {self.name!r}: loader is empty (its length is 0)")

    @property
    def streams(self) -> bool:
        """Whether each epoch takes the next ``batches`` of the loader's stream (not one whole pass)."""
        return self.batches is not None

    def epoch_length(self, loader_batches: int | None) -> int | None:
        """The batches an epoch of this phase runs when its loader has ``loader_batches`` (None: unknown): the
        one place ``limit`` and ``batches`` set a phase's length."""
        if self.batches is not None:
            return self.batches
        if self.limit is None:
            return loader_batches
        return self.limit if loader_batches is None else min(loader_batches, self.limit)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            return self.name == other
        return self is other

    def __hash__(self) -> int:
        return hash(self.name)

    def __str__(self) -> str:
        return self.name
