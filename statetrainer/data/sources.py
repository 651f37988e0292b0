"""Batch sources: one phase's loader, opened at any batch of any pass, one implementation per kind.

A phase that runs one whole pass an epoch opens pass ``e`` in epoch ``e``; a
phase that takes the next K batches of a stream opens its passes one after
another (``statetrainer.data.stream``).

``batch_source(loader, ...)`` picks the kind:

- ``SequenceSource``: a list or tuple of batches starts at index ``k``.
- ``StatefulSource``: a loader with ``state_dict``/``load_state_dict`` of its
  own (the protocol of torchdata's ``StatefulDataLoader``), or an in-process
  ``DataLoader`` over an ``IterableDataset`` that has them, resumes through
  that state: every checkpoint carries it, with the number of the pass it is
  in, and it is loaded back as the loader next opens, to go on with that pass
  or to start the next one.
- ``SeededLoader``: a ``DataLoader`` (or a subclass that takes DataLoader's
  arguments) over a map-style dataset, shuffled or not, any ``num_workers``,
  is rebuilt once as its own class with the same settings and a seeded order
  it can start anywhere (``statetrainer.data.resumable``).
- ``EpochSource``: anything else (a custom sampler, a stateless
  ``IterableDataset``, a generator-backed iterable) is used as it is and
  starts at batch 0 only: checkpoints inside such a phase are refused, and
  ``Checkpoint`` saves at epoch boundaries. Its ``reason`` says why.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import islice
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, DistributedSampler

from ..errors import CheckpointError
from .cursor import loader_length
from .resumable import mix_seed, rebuild, state_holder, why_not_seeded
from .workers import shield_workers, shielded_init

__all__ = ["BatchSource", "EpochSource", "SeededLoader", "SequenceSource", "StatefulSource", "batch_source"]


class BatchSource(ABC):
    """One phase's batches: ``open`` gives an iterator from batch ``start`` of a pass.

    Attributes:
        length: Batches per pass, or None when unknown.
        reason: Why ``open`` cannot start past batch 0; None when it can.
        keeps_own_state: Whether the position is the loader's own state, which
            checkpoints carry, rather than a batch index the trainer computes.
    """

    keeps_own_state = False

    def __init__(self, loader: Iterable[Any], reason: str | None = None) -> None:
        self.loader, self.length, self.reason = loader, loader_length(loader), reason

    @property
    def resumable(self) -> bool:
        return self.reason is None

    @property
    def pass_length(self) -> int | None:
        """Batches in the pass ``open`` last opened, counting those before its start (None: unknown)."""
        return self.length

    @property
    def global_length(self) -> int | None:
        """Batches per pass in one process: what identifies the phase whatever the number of processes."""
        return self.length

    @abstractmethod
    def open(self, seed: int, pass_index: int, start: int = 0) -> Iterator[Any]:
        """The batches of pass ``pass_index`` of a run seeded ``seed``, from batch ``start``."""

    def batch_samples(self, batch: int) -> list[int] | None:
        """The dataset indices of this process's batch number ``batch`` of the open pass; None where the source
        does not know them."""
        return None

    def state_dict(self) -> Any:
        """The loader's own position; None for sources whose position the trainer computes."""
        return None

    def load_state_dict(self, state: Any) -> None:
        """Hold a saved position for the next ``open``."""
        if state is not None:
            raise ValueError("the saved data position is a loader's own state, but this loader keeps none")


class SequenceSource(BatchSource):
    """A list or tuple of batches: starting at batch ``k`` is index arithmetic."""

    def open(self, seed: int, pass_index: int, start: int = 0) -> Iterator[Any]:
        return islice(self.loader, start, None)

    def batch_samples(self, batch: int) -> list[int]:
        """A batch's place in the list (each item is one batch, the same on every rank)."""
        return [batch]


class SeededLoader(BatchSource):
    """A DataLoader rebuilt as its own class with a seeded order, sharded over the ranks, and per-batch seeding.

    Args:
        loader: The user's DataLoader.
        phase_index: Its phase's index in the epoch (the order's seed depends on it).
        worker_signals: Signals its worker processes ignore.
        rank, world_size: This process's share of every global batch (see ``SeededOrder``).

    Attributes:
        uneven: Whether some batch's shares differ between the ranks (see ``share_weight``).

    Raises:
        TypeError: The loader's class does not take DataLoader's arguments.
    """

    def __init__(self, loader: DataLoader, phase_index: int, worker_signals: Iterable[int] = (), rank: int = 0,
                 world_size: int = 1) -> None:  # fmt: skip
        super().__init__(loader)
        self.phase_index, self.world_size = phase_index, world_size
        # A generator given to the loader (or a DistributedSampler's seed) keeps a say in its order.
        generator, sampler = loader.generator, loader.sampler
        self._order_salt: tuple[int, ...] = ()
        if isinstance(generator, torch.Generator):
            self._order_salt = (generator.initial_seed(),)
        elif isinstance(sampler, DistributedSampler):
            self._order_salt = (sampler.seed,)
        self._rebuilt, self._order = rebuild(loader, shielded_init(loader, worker_signals), rank, world_size)
        self.length = len(self._order)
        self.uneven = world_size > 1 and any(size % world_size for size in self._order.batch_sizes(0))
        self._resume_at: int | None = None  # the sample a pass resumed on another number of processes starts at

    @property
    def global_length(self) -> int:
        order = self._order
        return -(-order.size // order.batch_size) if not order.drop_last else order.size // order.batch_size

    @property
    def pass_length(self) -> int:
        return self._order.pass_length

    @property
    def samples(self) -> int:
        """Samples in the dataset."""
        return self._order.size

    @property
    def epoch_samples(self) -> int:
        """Samples a whole pass consumes over all ranks (fewer than ``samples`` with ``drop_last``)."""
        return sum(self._order.batch_sizes(0))

    def open(self, seed: int, pass_index: int, start: int = 0) -> Iterator[Any]:
        first_sample, self._resume_at = self._resume_at, None
        self._order.position(mix_seed(seed, self.phase_index, pass_index, *self._order_salt), start, first_sample)
        return iter(self._rebuilt)

    def samples_done(self, batches: int) -> int:
        """Samples of the open pass's order consumed by all ranks once its first ``batches`` batches are done."""
        return self._order.samples_done(batches)

    def share_weight(self, batch: int) -> float:
        """This rank's weight of batch ``batch``'s mean loss (1.0 unless the shares of that global batch differ)."""
        return self._order.share_weight(batch)

    def batch_samples(self, batch: int) -> list[int]:
        """The dataset indices in this rank's share of the open pass's batch ``batch`` (see ``SeededOrder``)."""
        return self._order.batch_indices(batch)

    def resume_at(self, sample: int) -> None:
        """Start the next pass at sample ``sample`` of its order: it was saved on another number of processes."""
        self._resume_at = sample

    def drop_resume_point(self) -> None:
        """Start the next pass at its beginning after all: the pass ``resume_at`` was given for is not reopened."""
        self._resume_at = None


class _Saved(NamedTuple):
    """A stateful source's saved position, held from ``load_state_dict`` until it next opens."""

    state: Any  # the loader's (or its dataset's) own state
    pass_index: int | None  # the pass that state is in; None: before the first
    generator: torch.Tensor | None  # the state of the loader's generator, or None to leave it as it is


class StatefulSource(BatchSource):
    """A loader that keeps its own position (``state_dict``/``load_state_dict``), or whose dataset does.

    A loader's own state (torchdata's ``StatefulDataLoader``'s protocol) is
    that of its latest iterator: loading it and iterating goes on with that
    pass, even when the trainer was done with it. So a checkpoint also holds
    which pass that is (``pass_state``). A resumed run that opens that pass
    goes on with it (saved mid-phase, or after its last batch); one that opens
    a later pass (saved at an epoch boundary, or in another phase) rebuilds the spent pass's iterator, then
    starts a new one after it, as the uninterrupted run did. The rebuilt
    iterator puts back the sampler generator that orders the new pass. The
    loader's own ``generator``, which torchdata leaves one draw short when it
    rebuilds an iterator in process, is saved and put back too. A dataset's own
    state is where its next pass starts, or goes on, so it is loaded as it is.

    Attributes:
        holder: What keeps the state: the loader, or its dataset.
        pass_index: The pass the loader's state is in; None before the first.
    """

    keeps_own_state = True

    def __init__(self, loader: Iterable[Any], holder: Any) -> None:
        super().__init__(loader)
        self.holder = holder
        self.pass_index: int | None = None
        generator = getattr(loader, "generator", None) if holder is loader else None
        self._generator: torch.Generator | None = generator if isinstance(generator, torch.Generator) else None
        self._pending: _Saved | None = None

    def state_dict(self) -> Any:
        if self._pending is not None:  # loaded, not yet applied: it is still the run's position
            return self._pending.state
        with _global_generator_kept():  # a StatefulDataLoader not yet iterated builds its first iterator here
            return self.holder.state_dict()

    def pass_state(self) -> dict[str, Any]:
        """What a checkpoint keeps beside ``state_dict()``: the number of its pass, the loader generator's state."""
        if self._pending is not None:
            return {"index": self._pending.pass_index, "generator": self._pending.generator}
        generator = None if self._generator is None else self._generator.get_state()
        return {"index": self.pass_index, "generator": generator}

    def check_pass_state(self, saved: Any) -> None:
        """Raise ``CheckpointError`` unless ``saved`` is a ``pass_state()`` this loader can take."""
        if not isinstance(saved, dict) or sorted(saved) not in (["generator", "index"], ["epoch", "generator"]):
            raise CheckpointError(f"its pass is {saved!r}, not a dict of its number and its loader's generator")
        index, generator = saved.get("index", saved.get("epoch")), saved["generator"]  # "epoch": saved before streams
        if index is not None and (isinstance(index, bool) or not isinstance(index, int) or index < 0):
            raise CheckpointError(f"its pass's number is {index!r}, not None or an integer >= 0")
        if generator is not None:
            if self._generator is None:
                raise CheckpointError("the checkpoint holds the state of its loader's generator, but it has none")
            ours = self._generator.get_state()
            same_kind = isinstance(generator, torch.Tensor) and generator.dtype == ours.dtype
            if not same_kind or generator.shape != ours.shape:
                raise CheckpointError("its loader generator's saved state is not a state of that generator")

    def load_state_dict(self, state: Any, pass_state: dict[str, Any] | None = None) -> None:
        """Hold ``state`` and its ``pass_state()`` for the next ``open`` (None: a pass not begun, generator as is)."""
        if state is None:
            raise ValueError("this loader keeps its own position, but the checkpoint holds none for it")
        pass_state = pass_state or {"index": None, "generator": None}
        index = pass_state.get("index", pass_state.get("epoch"))
        self._pending = _Saved(state, index, pass_state["generator"])

    def open(self, seed: int, pass_index: int, start: int = 0) -> Iterator[Any]:
        if self._pending is not None:
            batches = self._resume(self._pending, pass_index, start)
        elif start:
            raise RuntimeError(f"this loader starts at batch {start} only from its saved state")
        else:
            batches = self._iterate()
        self._pending, self.pass_index = None, pass_index
        return batches

    def _resume(self, saved: _Saved, pass_index: int, start: int) -> Iterator[Any]:
        """The batches of pass ``pass_index`` from batch ``start``, the first pass after loading ``saved``."""
        ended = saved.pass_index is not None and saved.pass_index != pass_index  # the trainer is done with it
        if ended and start:
            raise RuntimeError(f"the loader's state was saved in its pass {saved.pass_index}, so it cannot "
                               f"start pass {pass_index} at batch {start}")  # fmt: skip
        self.holder.load_state_dict(saved.state)
        if self.holder is not self.loader:
            return self._iterate()
        # The saved pass's iterator, rebuilt; a new pass's opens apart, so it draws its workers' base seed from
        # the global generator as it stands, as the uninterrupted run's did.
        batches = self._iterate()
        if saved.generator is not None:
            self._generator.set_state(saved.generator)  # type: ignore[union-attr]  # checked by check_pass_state
        return self._iterate() if ended else batches

    def _iterate(self) -> Iterator[Any]:
        # A DataLoader draws a base seed from the global generator as it opens; a resumed run opens
        # it at another point of the run's stream than the original did, so opening must not draw.
        with _global_generator_kept():
            return iter(self.loader)


@contextmanager
def _global_generator_kept() -> Iterator[None]:
    """Put torch's global generator back as it was once the block ends."""
    saved = torch.get_rng_state()
    try:
        yield
    finally:
        torch.set_rng_state(saved)


class EpochSource(BatchSource):
    """A loader whose order is its own: it starts at batch 0 only."""

    def open(self, seed: int, pass_index: int, start: int = 0) -> Iterator[Any]:
        if start:
            raise RuntimeError(f"this loader cannot start at batch {start}: {self.reason}")
        return iter(self.loader)


def batch_source(loader: Iterable[Any], phase_index: int, worker_signals: Iterable[int] = (), rank: int = 0,
                 world_size: int = 1) -> BatchSource:  # fmt: skip
    """The batch source for ``loader``, the ``phase_index``-th phase of an epoch.

    ``worker_signals`` are ignored by a DataLoader's worker processes, because
    the trainer handles them (see ``statetrainer.data.workers``). A DataLoader
    the trainer rebuilds gives rank ``rank`` of ``world_size`` its share.
    """
    if isinstance(loader, Sequence):
        return SequenceSource(loader)
    holder, why_not_stateful = state_holder(loader)
    reason = why_not_seeded(loader)
    if holder is None and reason is None:
        try:
            return SeededLoader(loader, phase_index, worker_signals, rank, world_size)  # type: ignore[arg-type]
        except TypeError as error:  # a subclass whose constructor takes other arguments
            reason = (f"its class {type(loader).__name__} cannot be rebuilt with the trainer's sampler "
                      f"({error}); accept DataLoader's arguments to make it resumable")  # fmt: skip
    shield_workers(loader, worker_signals)
    if holder is not None:
        return StatefulSource(loader, holder)
    return EpochSource(loader, why_not_stateful or reason)
