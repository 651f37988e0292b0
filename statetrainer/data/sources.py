"""Batch sources: one phase's loader, opened at any batch of any epoch, one implementation per kind.

``batch_source(loader, ...)`` picks the kind:

- ``SequenceSource``: a list or tuple of batches starts at index ``k``.
- ``StatefulSource``: a loader with ``state_dict``/``load_state_dict`` of its
  own (the protocol of torchdata's ``StatefulDataLoader``), or an in-process
  ``DataLoader`` over an ``IterableDataset`` that has them, resumes through
  that state: every checkpoint carries it, and it is loaded back before the
  loader next opens.
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

import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from ..checkpoint import CheckpointError
from ..state import tensors_to
from .cursor import loader_length
from .resumable import mix_seed, rebuild, state_holder, why_not_seeded
from .workers import shield_workers, shielded_init

__all__ = ["BatchSource", "EpochSource", "PhaseSources", "SeededLoader", "SequenceSource", "StatefulSource",
           "batch_source"]  # fmt: skip


class BatchSource(ABC):
    """One phase's batches: ``open`` gives an iterator from batch ``start`` of an epoch.

    Attributes:
        length: Batches per epoch, or None when unknown.
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
        """Batches per epoch in one process: what identifies the phase whatever the number of processes."""
        return self.length

    @abstractmethod
    def open(self, seed: int, epoch: int, start: int = 0) -> Iterator[Any]:
        """The batches of epoch ``epoch`` of a run seeded ``seed``, from batch ``start``."""

    def state_dict(self) -> Any:
        """The loader's own position; None for sources whose position the trainer computes."""
        return None

    def load_state_dict(self, state: Any) -> None:
        """Hold a saved position for the next ``open``."""
        if state is not None:
            raise ValueError("the saved data position is a loader's own state, but this loader keeps none")


class SequenceSource(BatchSource):
    """A list or tuple of batches: starting at batch ``k`` is index arithmetic."""

    def open(self, seed: int, epoch: int, start: int = 0) -> Iterator[Any]:
        return islice(self.loader, start, None)


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

    def open(self, seed: int, epoch: int, start: int = 0) -> Iterator[Any]:
        first_sample, self._resume_at = self._resume_at, None
        self._order.position(mix_seed(seed, self.phase_index, epoch, *self._order_salt), start, first_sample)
        return iter(self._rebuilt)

    def samples_done(self, batches: int) -> int:
        """Samples of the open pass's order consumed by all ranks once its first ``batches`` batches are done."""
        return self._order.samples_done(batches)

    def share_weight(self, batch: int) -> float:
        """This rank's weight of batch ``batch``'s mean loss (1.0 unless the shares of that global batch differ)."""
        return self._order.share_weight(batch)

    def resume_at(self, sample: int) -> None:
        """Start the next pass at sample ``sample`` of its order: it was saved on another number of processes."""
        self._resume_at = sample


class StatefulSource(BatchSource):
    """A loader that keeps its own position (``state_dict``/``load_state_dict``), or whose dataset does."""

    keeps_own_state = True

    def __init__(self, loader: Iterable[Any], holder: Any) -> None:
        super().__init__(loader)
        self.holder = holder
        self._pending: Any = None

    def state_dict(self) -> Any:
        return self.holder.state_dict()

    def load_state_dict(self, state: Any) -> None:
        if state is None:
            raise ValueError("this loader keeps its own position, but the checkpoint holds none for it")
        self._pending = state

    def open(self, seed: int, epoch: int, start: int = 0) -> Iterator[Any]:
        if self._pending is not None:
            state, self._pending = self._pending, None
            self.holder.load_state_dict(state)
        elif start:
            raise RuntimeError(f"this loader starts at batch {start} only from its saved state")
        # A DataLoader draws a base seed from the global generator as it opens; a resumed run opens
        # it at another point of the run's stream than the original did, so opening must not draw.
        saved = torch.get_rng_state()
        try:
            return iter(self.loader)
        finally:
            torch.set_rng_state(saved)


class EpochSource(BatchSource):
    """A loader whose order is its own: it starts at batch 0 only."""

    def open(self, seed: int, epoch: int, start: int = 0) -> Iterator[Any]:
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


class PhaseSources:
    """Every phase's batch source: a part of the run's state (the phases' layout and the data position).

    The saved position of a rebuilt DataLoader is global: the samples of the
    epoch's order that all ranks together have consumed. A run resumed on
    another number of processes goes on from that sample, so no sample is
    skipped or seen twice. A loader that keeps its own state saves that.

    Args:
        names: The phases' names, in order.
        sources: Their batch sources.
        position: The run's position (which phase is open, how many of its batches are done).
        world_size: How many processes share each rebuilt DataLoader.
    """

    def __init__(self, names: Sequence[str], sources: Sequence[BatchSource], position: Any = None,
                 world_size: int = 1) -> None:  # fmt: skip
        self.names, self.sources, self.position, self.world_size = list(names), list(sources), position, world_size

    @classmethod
    def for_phases(cls, phases: Sequence[Any], worker_signals: Iterable[int] = (), position: Any = None,
                   rank: int = 0, world_size: int = 1) -> PhaseSources:  # fmt: skip
        """The batch sources of ``phases`` (``Phase`` objects), in order."""
        sources = [batch_source(phase.loader, index, worker_signals, rank, world_size)
                   for index, phase in enumerate(phases)]  # fmt: skip
        if world_size > 1 and rank == 0:
            for phase, source in zip(phases, sources):
                sampler = getattr(getattr(phase.loader, "batch_sampler", None), "sampler", None)
                if not isinstance(source, SeededLoader) and not isinstance(sampler, DistributedSampler):
                    warnings.warn(f"phase {phase.name!r}: its loader is not sharded between the {world_size} "
                                  "processes, so each one goes through all of it; give it a DistributedSampler, or "
                                  "a DataLoader over a map-style dataset, which the trainer shards", stacklevel=4)  # fmt: skip
        return cls([phase.name for phase in phases], sources, position, world_size)

    def layout(self) -> list[tuple[str, int | None]]:
        """Each phase's name and batches per epoch in this process (None: unknown)."""
        return [(name, source.length) for name, source in zip(self.names, self.sources)]

    def global_layout(self) -> list[tuple[str, int | None]]:
        """Each phase's name and batches per epoch in one process: the same whatever the number of processes."""
        return [(name, source.global_length) for name, source in zip(self.names, self.sources)]

    def __getitem__(self, position: int) -> BatchSource:
        return self.sources[position]

    def _samples_done(self, index: int, source: BatchSource) -> int | None:
        position = self.position
        if not isinstance(source, SeededLoader) or position is None or position.phase_position != index:
            return None
        return source.samples_done(position.batch_index + 1)

    def state_dict(self) -> list[dict[str, Any]]:
        return [{"phase": name, "batches": source.length, "global_batches": source.global_length,
                 "shards": self.world_size if isinstance(source, SeededLoader) else 1,
                 "samples_done": self._samples_done(index, source), "position": source.state_dict()}
                for index, (name, source) in enumerate(zip(self.names, self.sources))]  # fmt: skip

    def check_fits(self, state: list[dict[str, Any]]) -> None:
        saved = [(phase["phase"], phase["global_batches"]) for phase in state]
        ours = self.global_layout()
        if saved != ours:
            raise CheckpointError(f"the checkpoint's phases (name, batches) are {saved}, this trainer's {ours}")
        for phase, source in zip(state, self.sources):
            if phase["shards"] == (self.world_size if isinstance(source, SeededLoader) else 1):
                if phase["batches"] != source.length:
                    raise CheckpointError(f"phase {phase['phase']!r} has {phase['batches']} batches in the checkpoint, "
                                          f"{source.length} here")  # fmt: skip
            elif not isinstance(source, SeededLoader) or phase["samples_done"] is not None and (
                    isinstance(phase["samples_done"], bool) or not 0 <= phase["samples_done"] <= source.samples):  # fmt: skip
                raise CheckpointError(f"phase {phase['phase']!r} was saved with its data shared between {phase['shards']}"
                                      f" processes, which this run cannot take over")  # fmt: skip
        if [phase["position"] is None for phase in state] != [not source.keeps_own_state for source in self.sources]:
            raise CheckpointError("the checkpoint's loaders and this trainer's disagree on which keep their own state")

    def load_state_dict(self, state: list[dict[str, Any]]) -> None:
        for source, saved in zip(self.sources, state, strict=True):
            source.load_state_dict(tensors_to(saved["position"], torch.device("cpu")))  # applied when it next opens
            done = saved["samples_done"]
            if isinstance(source, SeededLoader) and saved["shards"] != self.world_size and done:
                if done < source.epoch_samples:  # saved mid-phase: go on from that sample
                    source.resume_at(done)
