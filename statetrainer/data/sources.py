"""Batch sources: one phase's loader, opened at any batch of any epoch, one implementation per kind.

``batch_source(loader, ...)`` picks the kind:

- ``SequenceSource``: a list or tuple of batches starts at index ``k``.
- ``StatefulSource``: a loader with ``state_dict``/``load_state_dict`` of its
  own (the protocol of torchdata's ``StatefulDataLoader``), or an in-process
  ``DataLoader`` over an ``IterableDataset`` that has them, resumes through
  that state: every checkpoint carries it, with the epoch of the pass it is
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

import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import islice
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, DistributedSampler

from ..errors import CheckpointError
from ..saved_state import tensors_to
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


class _Saved(NamedTuple):
    """A stateful source's saved position, held from ``load_state_dict`` until it next opens."""

    state: Any  # the loader's (or its dataset's) own state
    epoch: int | None  # the epoch of the pass that state is in; None: before the first
    generator: torch.Tensor | None  # the state of the loader's generator, or None to leave it as it is


class StatefulSource(BatchSource):
    """A loader that keeps its own position (``state_dict``/``load_state_dict``), or whose dataset does.

    A loader's own state (torchdata's ``StatefulDataLoader``'s protocol) is
    that of its latest iterator: loading it and iterating goes on with that
    pass, even when the trainer was done with it. So a checkpoint also holds
    which epoch's pass that is (``pass_state``). A resumed run that opens the
    phase in that epoch goes on with the saved pass (saved mid-phase, or after
    its last batch); one that opens it in a later epoch (saved at an epoch
    boundary, or in another phase) rebuilds the spent pass's iterator, then
    starts a new one after it, as the uninterrupted run did. The rebuilt
    iterator puts back the sampler generator that orders the new pass. The
    loader's own ``generator``, which torchdata leaves one draw short when it
    rebuilds an iterator in process, is saved and put back too. A dataset's own
    state is where its next pass starts, or goes on, so it is loaded as it is.

    Attributes:
        holder: What keeps the state: the loader, or its dataset.
        pass_epoch: The epoch whose pass the loader's state is in; None before the first.
    """

    keeps_own_state = True

    def __init__(self, loader: Iterable[Any], holder: Any) -> None:
        super().__init__(loader)
        self.holder = holder
        self.pass_epoch: int | None = None
        generator = getattr(loader, "generator", None) if holder is loader else None
        self._generator: torch.Generator | None = generator if isinstance(generator, torch.Generator) else None
        self._pending: _Saved | None = None

    def state_dict(self) -> Any:
        if self._pending is not None:  # loaded, not yet applied: it is still the run's position
            return self._pending.state
        with _global_generator_kept():  # a StatefulDataLoader not yet iterated builds its first iterator here
            return self.holder.state_dict()

    def pass_state(self) -> dict[str, Any]:
        """What a checkpoint keeps beside ``state_dict()``: the epoch of its pass, the loader generator's state."""
        if self._pending is not None:
            return {"epoch": self._pending.epoch, "generator": self._pending.generator}
        generator = None if self._generator is None else self._generator.get_state()
        return {"epoch": self.pass_epoch, "generator": generator}

    def check_pass_state(self, saved: Any) -> None:
        """Raise ``CheckpointError`` unless ``saved`` is a ``pass_state()`` this loader can take."""
        if not isinstance(saved, dict) or sorted(saved) != ["epoch", "generator"]:
            raise CheckpointError(f"its pass is {saved!r}, not a dict of its epoch and its loader's generator")
        epoch, generator = saved["epoch"], saved["generator"]
        if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0):
            raise CheckpointError(f"its pass's epoch is {epoch!r}, not None or an integer >= 0")
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
        pass_state = pass_state or {"epoch": None, "generator": None}
        self._pending = _Saved(state, pass_state["epoch"], pass_state["generator"])

    def open(self, seed: int, epoch: int, start: int = 0) -> Iterator[Any]:
        if self._pending is not None:
            batches = self._resume(self._pending, epoch, start)
        elif start:
            raise RuntimeError(f"this loader starts at batch {start} only from its saved state")
        else:
            batches = self._iterate()
        self._pending, self.pass_epoch = None, epoch
        return batches

    def _resume(self, saved: _Saved, epoch: int, start: int) -> Iterator[Any]:
        """The batches of epoch ``epoch`` from batch ``start``, the first pass after loading ``saved``."""
        ended = saved.epoch is not None and saved.epoch != epoch  # the trainer is done with the saved pass
        if ended and start:
            raise RuntimeError(f"the loader's state was saved in its pass of epoch {saved.epoch}, so it cannot "
                               f"start epoch {epoch} at batch {start}")  # fmt: skip
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
            for phase, source in zip(phases, sources, strict=True):
                sampler = getattr(getattr(phase.loader, "batch_sampler", None), "sampler", None)
                if not isinstance(source, SeededLoader) and not isinstance(sampler, DistributedSampler):
                    warnings.warn(f"phase {phase.name!r}: its loader is not sharded between the {world_size} "
                                  "processes, so each one goes through all of it; give it a DistributedSampler, or "
                                  "a DataLoader over a map-style dataset, which the trainer shards", stacklevel=4)  # fmt: skip
        return cls([phase.name for phase in phases], sources, position, world_size)

    def layout(self) -> list[tuple[str, int | None]]:
        """Each phase's name and batches per epoch in this process (None: unknown)."""
        return [(name, source.length) for name, source in zip(self.names, self.sources, strict=True)]

    def global_layout(self) -> list[tuple[str, int | None]]:
        """Each phase's name and batches per epoch in one process: the same whatever the number of processes."""
        return [(name, source.global_length) for name, source in zip(self.names, self.sources, strict=True)]

    def __getitem__(self, position: int) -> BatchSource:
        return self.sources[position]

    def _samples_done(self, index: int, source: BatchSource) -> int | None:
        position = self.position
        if not isinstance(source, SeededLoader) or position is None or position.phase_index != index:
            return None
        return source.samples_done(position.batch_index + 1)

    def state_dict(self) -> list[dict[str, Any]]:
        return [{"phase": name, "batches": source.length, "global_batches": source.global_length,
                 "shards": self.world_size if isinstance(source, SeededLoader) else 1,
                 "samples_done": self._samples_done(index, source), "position": source.state_dict(),
                 "pass": source.pass_state() if isinstance(source, StatefulSource) else None}
                for index, (name, source) in enumerate(zip(self.names, self.sources, strict=True))]  # fmt: skip

    def check_fits(self, state: list[dict[str, Any]]) -> None:
        saved = [(phase["phase"], phase["global_batches"]) for phase in state]
        ours = self.global_layout()
        if saved != ours:
            raise CheckpointError(f"the checkpoint's phases (name, batches) are {saved}, this trainer's {ours}")
        for phase, source in zip(state, self.sources, strict=True):  # as many: the layouts are equal
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
        for phase, source in zip(state, self.sources, strict=True):
            if "pass" not in phase:  # a checkpoint saved before the pass was
                continue
            if not isinstance(source, StatefulSource):
                if phase["pass"] is not None:
                    raise CheckpointError(f"phase {phase['phase']!r}: the checkpoint holds a pass of a loader "
                                          "that keeps its own state, which this one does not")  # fmt: skip
                continue
            try:
                source.check_pass_state(phase["pass"])
            except CheckpointError as error:
                raise CheckpointError(f"phase {phase['phase']!r}: {error}") from error

    def load_state_dict(self, state: list[dict[str, Any]]) -> None:
        for index, (source, saved) in enumerate(zip(self.sources, state, strict=True)):
            position = tensors_to(saved["position"], torch.device("cpu"))
            if isinstance(source, StatefulSource):  # applied when it next opens
                pass_state = saved.get("pass") or {"epoch": self._latest_pass_epoch(index), "generator": None}
                source.load_state_dict(position, tensors_to(pass_state, torch.device("cpu")))
            else:
                source.load_state_dict(position)
            done = saved["samples_done"]
            if isinstance(source, SeededLoader) and saved["shards"] != self.world_size and done:
                if done < source.epoch_samples:  # saved mid-phase: go on from that sample
                    source.resume_at(done)

    def _latest_pass_epoch(self, index: int) -> int | None:
        """The epoch of phase ``index``'s latest pass at the run's position (None: before the first).

        For a checkpoint saved before it held each loader's pass: the position is loaded before the data,
        and every phase runs once an epoch, so the phases up to the current one have run in this epoch and
        the others in the one before. (A run saved after an error as a phase started, before it opened its
        loader, is the exception that the saved pass gets right.)
        """
        position = self.position
        if position is None:
            return None
        if index <= position.phase_index:
            return position.epoch
        return position.epoch - 1 if position.epoch > 0 else None
