"""Loaders the trainer can start at any batch of any epoch, without loading what came before.

A phase's loader becomes a *batch source* with ``open(seed, epoch, start)``:

- A ``DataLoader`` (or a subclass that takes DataLoader's arguments) over a
  map-style dataset (shuffled or not, any ``num_workers``) is rebuilt once,
  as its own class with the same settings, but with a sampler the trainer
  controls: the order of epoch ``e`` is a permutation seeded by ``(seed,
  phase, e)`` (and the loader's own ``generator``'s seed, when it has one),
  and starting at batch ``k`` drops the first ``k * batch_size`` indices
  before any sample is loaded. Every batch is loaded with
  the torch, ``random`` and NumPy generators seeded from ``(seed, phase, epoch,
  its first sample)``: a batch always goes whole to one worker, so random
  augmentation gives the same result in any worker, with any ``num_workers``,
  before or after a restart, for the price of one seeding per batch.
- A list or tuple of batches starts at index ``k``.
- A loader with ``state_dict``/``load_state_dict`` of its own (the protocol
  of torchdata's ``StatefulDataLoader``), or an in-process ``DataLoader``
  over an ``IterableDataset`` that has them, resumes through that state:
  every checkpoint carries it, and it is loaded back before the loader next
  opens.
- Anything else (a custom sampler, a stateless ``IterableDataset``, a
  generator-backed iterable) is used as it is and can only be started at batch 0: checkpoints
  inside such a phase are refused, and ``Checkpoint`` saves at epoch boundaries.
"""

from __future__ import annotations

import hashlib
import random
import struct
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler, Sampler
from torch.utils.data import SequentialSampler, get_worker_info

from .cursor import loader_length
from .workers import shield_workers, shielded_init

__all__ = ["BatchSource", "SeededOrder", "SeededSamples", "mix_seed"]


def mix_seed(*values: int) -> int:
    """A 63-bit seed that depends on every value (stable across processes and runs)."""
    packed = struct.pack(f"<{len(values)}q", *(value & 0x7FFF_FFFF_FFFF_FFFF for value in values))
    return int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), "little") >> 1


class SeededOrder(Sampler):
    """Yields ``(stream, index)`` keys for one pass: shuffled or in order, from any start.

    ``stream`` is the seed of this pass; ``SeededSamples`` turns each key into
    the sample ``index`` loaded under a seed derived from both.
    """

    def __init__(self, size: int, shuffle: bool) -> None:
        self.size, self.shuffle = size, shuffle
        self.stream, self.start = 0, 0

    def position(self, stream: int, start: int) -> None:
        self.stream, self.start = stream, start

    def __len__(self) -> int:
        return max(self.size - self.start, 0)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.stream)
            order = torch.randperm(self.size, generator=generator)[self.start :].tolist()
        else:
            order = range(self.start, self.size)
        stream = self.stream
        return ((stream, index) for index in order)


class SeededSamples(Dataset):
    """Loads the samples of keys ``(stream, index)`` with every generator seeded by the first key.

    A DataLoader hands a whole batch's keys to ``__getitems__``, so the
    generators are seeded once per batch, and a dataset's own batched
    ``__getitems__`` is used when it has one. In the main process
    (``num_workers=0``) the torch and ``random`` states are put back after
    each batch, and NumPy's global functions draw from a bit generator of the
    loader's own while it loads, so loading never disturbs the training run's
    own stream (swapping NumPy's generator costs far less than copying its
    state). The one thing the swap drops is the spare value legacy
    ``np.random.randn`` caches after an odd number of normal draws: a
    training loop drawing those between in-process batch loads gets a fresh
    pair, the same way in the uninterrupted and in the resumed run.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self._load_many = getattr(dataset, "__getitems__", None)
        self._numpy_for_loading: np.random.MT19937 | None = None

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[Any]:
        if get_worker_info() is not None:  # a worker's generators are its own
            return self._load(keys)
        if self._numpy_for_loading is None:
            self._numpy_for_loading = np.random.MT19937()
        torch_state, python_state = torch.default_generator.get_state(), random.getstate()
        training_numpy = np.random.get_bit_generator()
        np.random.set_bit_generator(self._numpy_for_loading)
        try:
            return self._load(keys)
        finally:
            np.random.set_bit_generator(training_numpy)
            random.setstate(python_state)
            torch.default_generator.set_state(torch_state)

    def _load(self, keys: list[tuple[int, int]]) -> list[Any]:
        stream, first = keys[0]
        seed = mix_seed(stream, first)
        torch.default_generator.manual_seed(seed)  # the CPU generator: what a transform draws from
        random.seed(seed)
        np.random.seed(seed % 2**32)
        indices = [index for _, index in keys]
        if self._load_many is not None:
            return self._load_many(indices)
        dataset = self.dataset
        return [dataset[index] for index in indices]


class BatchSource:
    """One phase's batches: ``open`` gives an iterator from batch ``start`` of an epoch.

    Attributes:
        length: Batches per epoch, or None when unknown.
        resumable: Whether ``open`` can start past batch 0.
        reason: Why not, when it cannot.

    Args:
        loader: The phase's loader.
        phase_index: The phase's position in the epoch (part of every seed).
        worker_signals: Signals a DataLoader's worker processes ignore, because
            the trainer handles them (see ``statetrainer.data.workers``).
    """

    def __init__(self, loader: Iterable[Any], phase_index: int, worker_signals: Iterable[int] = ()) -> None:
        self.phase_index = phase_index
        self.length = loader_length(loader)
        self.reason = _why_not_resumable(loader)
        self._order: SeededOrder | None = None
        self._iterable: Iterable[Any] = loader
        # A generator given to the loader keeps a say in its order: its seed is mixed into every epoch's.
        generator = getattr(loader, "generator", None)
        self._order_salt = (generator.initial_seed(),) if isinstance(generator, torch.Generator) else ()
        if self.reason is None and isinstance(loader, DataLoader):
            try:
                self._iterable, self._order = _rebuild(loader, shielded_init(loader, worker_signals))
            except TypeError as error:  # a subclass whose constructor takes other arguments
                self.reason = (f"its class {type(loader).__name__} cannot be rebuilt with the trainer's sampler "
                               f"({error}); accept DataLoader's arguments to make it resumable")  # fmt: skip
        self._stateful: Any = None  # what holds the position of a loader that keeps its own state
        self._pending_state: Any = None
        if self._order is None and not isinstance(loader, Sequence):
            self._stateful, why_not = _state_holder(loader)
            self.reason = None if self._stateful is not None else why_not or self.reason
        if self._order is None:
            shield_workers(loader, worker_signals)

    @property
    def resumable(self) -> bool:
        return self.reason is None

    @property
    def keeps_own_state(self) -> bool:
        """Whether the loader's position is its own state (not an index the trainer can compute)."""
        return self._stateful is not None

    def state_dict(self) -> Any:
        """The position of a loader that keeps its own state; None for the others (theirs is computed)."""
        return None if self._stateful is None else self._stateful.state_dict()

    def load_state_dict(self, state: Any) -> None:
        """Hold ``state`` for the next ``open``, which starts the loader from there."""
        if (state is None) != (self._stateful is None):
            raise ValueError("the saved data position does not fit this loader (one keeps its own state, the other not)")
        self._pending_state = state

    def open(self, seed: int, epoch: int, start: int = 0) -> Iterator[Any]:
        if start and not self.resumable:
            raise RuntimeError(f"this loader cannot start at batch {start}: {self.reason}")
        if self._stateful is not None:
            if self._pending_state is not None:
                state, self._pending_state = self._pending_state, None
                self._stateful.load_state_dict(state)
            elif start:
                raise RuntimeError(f"this loader starts at batch {start} only from its saved state")
            # A DataLoader draws a base seed from the global generator as it opens; a resumed run opens
            # it at another point of the run's stream than the original did, so opening must not draw.
            saved = torch.get_rng_state()
            try:
                return iter(self._iterable)
            finally:
                torch.set_rng_state(saved)
        if self._order is not None:
            batch_size = getattr(self._iterable, "batch_size", None) or 1
            self._order.position(mix_seed(seed, self.phase_index, epoch, *self._order_salt), start * batch_size)
            return iter(self._iterable)
        if start:
            return islice(self._iterable, start, None)  # a list: skipping is index arithmetic
        return iter(self._iterable)


def _has_state(candidate: Any) -> bool:
    return callable(getattr(candidate, "state_dict", None)) and callable(getattr(candidate, "load_state_dict", None))


def _state_holder(loader: Iterable[Any]) -> tuple[Any, str | None]:
    """What holds the position of a loader that keeps its own state, or None and why not."""
    if _has_state(loader):
        return loader, None
    dataset = getattr(loader, "dataset", None)
    if isinstance(loader, DataLoader) and isinstance(dataset, IterableDataset) and _has_state(dataset):
        if loader.num_workers == 0:
            return dataset, None
        return None, (f"its {type(dataset).__name__} has state_dict/load_state_dict, but with num_workers > 0 the "
                      "position lives in the workers' copies; use num_workers=0 or torchdata's StatefulDataLoader")  # fmt: skip
    return None, None


def _why_not_resumable(loader: Iterable[Any]) -> str | None:
    """None when the trainer can control this loader's order, else the reason it cannot."""
    if isinstance(loader, Sequence):
        return None
    if not isinstance(loader, DataLoader):
        return f"a {type(loader).__name__} is neither a DataLoader nor a list, so its order is its own"
    if isinstance(loader.dataset, IterableDataset):
        return "its dataset is an IterableDataset, which has no random access"
    sampler = loader.sampler
    if type(sampler) not in (SequentialSampler, RandomSampler):
        return f"it uses a custom sampler ({type(sampler).__name__})"
    if isinstance(sampler, RandomSampler) and (sampler.replacement or sampler.num_samples != len(loader.dataset)):
        return "its RandomSampler draws with replacement or a custom number of samples"
    if loader.batch_sampler is not None and type(loader.batch_sampler) is not BatchSampler:
        return f"it uses a custom batch sampler ({type(loader.batch_sampler).__name__})"
    return None


def _rebuild(loader: DataLoader, worker_init_fn: Any) -> tuple[DataLoader, SeededOrder]:
    """The same DataLoader, of the same class, drawing its order from a ``SeededOrder`` and seeding every batch.

    Raises:
        TypeError: The loader's class does not take DataLoader's arguments.
    """
    order = SeededOrder(len(loader.dataset), shuffle=isinstance(loader.sampler, RandomSampler))
    options: dict[str, Any] = {
        "batch_size": loader.batch_size,
        "drop_last": loader.drop_last,
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        "persistent_workers": loader.persistent_workers,
        "pin_memory_device": loader.pin_memory_device,
        # Its own generator: opening an iterator must not draw from the global stream.
        "generator": torch.Generator().manual_seed(0),
    }
    if loader.num_workers > 0:
        options["prefetch_factor"] = loader.prefetch_factor
    if hasattr(loader, "in_order"):  # torch >= 2.6
        options["in_order"] = loader.in_order
    if loader.batch_size is None:  # no automatic batching: the collate_fn sees single samples
        options.pop("drop_last")
    return type(loader)(SeededSamples(loader.dataset), sampler=order, **options), order
