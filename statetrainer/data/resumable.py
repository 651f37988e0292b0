"""How a DataLoader is made resumable: a seeded order it can start anywhere, batches loaded under seeds.

``rebuild`` gives a DataLoader of the user's class and settings whose sampler
is a ``SeededOrder``: the order of epoch ``e`` is a permutation seeded by
``(seed, phase, e)`` (and the loader's own ``generator``'s seed, when it has
one), the same in every process of a torchrun run, which each take their
share of every global batch; starting at batch ``k`` (or at a sample, for a
run resumed on another number of processes) drops the indices before it
without loading a sample. Its dataset is wrapped in ``SeededSamples``:
every batch is loaded with the torch, ``random`` and NumPy generators seeded
from ``(seed, phase, epoch, its first sample)``. A batch always goes whole to
one worker, so random augmentation gives the same result in any worker, with
any ``num_workers``, before or after a restart, for the price of one seeding
per batch.
"""

from __future__ import annotations

import hashlib
import random
import struct
from collections.abc import Iterable, Iterator, Sized
from typing import Any, cast

import numpy as np
import torch
from numpy.random import mtrand  # the global generator's bit-generator swap, which numpy.random's stubs omit
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    get_worker_info,
)

__all__ = ["SeededBatch", "SeededOrder", "SeededSamples", "mix_seed", "rebuild", "state_holder", "why_not_seeded"]


def mix_seed(*values: int) -> int:
    """A 63-bit seed that depends on every value (stable across processes and runs)."""
    packed = struct.pack(f"<{len(values)}q", *(value & 0x7FFF_FFFF_FFFF_FFFF for value in values))
    return int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), "little") >> 1


class SeededBatch(list):  # type: ignore[type-arg]
    """The sample indices of one batch, with the ``stream`` (the pass's seed) they are loaded under."""

    def __init__(self, indices: Iterable[int], stream: int) -> None:
        super().__init__(indices)
        self.stream = stream


class SeededOrder(Sampler):
    """Yields this rank's ``SeededBatch`` es of one pass, shuffled or in order, from any batch on.

    The pass's order is one permutation of the dataset, the same on every
    rank. It is cut into *global batches* of ``batch_size * world_size``
    samples, and each global batch is split between the ranks in contiguous
    shares: rank ``r`` of ``W`` takes samples ``[r * G // W, (r + 1) * G // W)``
    of a global batch of ``G``. So every sample of the pass goes to exactly one
    rank, and every rank has the same number of batches.

    The last global batch may be short. With ``drop_last`` it is dropped;
    otherwise it is split as evenly as possible (shares differ by at most one
    sample; ``share_weight`` says how to weigh each rank's mean loss so the
    step follows the global batch's mean), and one with fewer samples than
    there are ranks joins the global batch before it.

    A DataLoader with automatic batching takes it as its ``batch_sampler``;
    one without (``batch_size=None``) as its ``sampler``, with ``batch_size=1``,
    and hands each one-index batch to ``SeededSamples.__getitem__``.
    """

    def __init__(self, size: int, shuffle: bool, batch_size: int = 1, drop_last: bool = False, rank: int = 0,
                 world_size: int = 1) -> None:  # fmt: skip
        if size < world_size and not drop_last:
            raise ValueError(f"a dataset of {size} samples cannot be shared between {world_size} processes, "
                             "as each needs at least one sample per batch")  # fmt: skip
        self.size, self.shuffle, self.batch_size, self.drop_last = size, shuffle, batch_size, drop_last
        self.rank, self.world_size = rank, world_size
        self.stream, self.start, self.first_sample = 0, 0, 0
        self.global_batches = self.batch_sizes(0)

    def batch_sizes(self, first_sample: int) -> list[int]:
        """The sizes of the global batches of a pass that starts at sample ``first_sample`` of its order."""
        whole = self.batch_size * self.world_size
        remaining = self.size - first_sample
        sizes = [whole] * (remaining // whole)
        rest = remaining % whole
        if rest and not self.drop_last:
            if rest >= self.world_size or not sizes:
                sizes.append(rest)
            else:
                sizes[-1] += rest
        if sizes and sizes[-1] < self.world_size:
            raise RuntimeError(f"the last {sizes[-1]} sample(s) of the epoch cannot be shared between "
                               f"{self.world_size} processes; resume on at most {sizes[-1]}")  # fmt: skip
        return sizes

    def position(self, stream: int, start: int, first_sample: int | None = None) -> None:
        """Make the next pass the one seeded ``stream``, from its batch ``start``.

        ``first_sample`` starts the pass at that sample of the order instead,
        counting its first batch as batch ``start``: a pass resumed on another
        number of processes than it began on.
        """
        self.stream, self.start = stream, start
        if first_sample is None:
            whole_pass = self.batch_sizes(0)
            self.first_sample, self.global_batches = sum(whole_pass[:start]), whole_pass[start:]
        else:
            self.first_sample, self.global_batches = first_sample, self.batch_sizes(first_sample)

    @property
    def pass_length(self) -> int:
        """Batches in the whole pass, counting those before its start."""
        return self.start + len(self.global_batches)

    def samples_done(self, batches: int) -> int:
        """Samples of the order consumed, over all ranks, once the pass's first ``batches`` batches are done."""
        return self.first_sample + sum(self.global_batches[: batches - self.start])

    def share_weight(self, batch: int) -> float:
        """How this rank's mean loss of batch ``batch`` weighs in its global batch's mean, times ``world_size``."""
        size = self.global_batches[batch - self.start]
        share = (self.rank + 1) * size // self.world_size - self.rank * size // self.world_size
        return share * self.world_size / size

    def __len__(self) -> int:
        return len(self.global_batches)

    def batch_indices(self, batch: int) -> list[int]:
        """This rank's sample indices of the open pass's batch ``batch`` (counted from the pass's first), as
        ``__iter__`` yields them; worked out again from the pass's seed, so nothing is kept per batch."""
        if not self.start <= batch < self.pass_length:
            raise IndexError(f"batch {batch} is not in the open pass (batches {self.start} to {self.pass_length - 1})")
        offset = sum(self.global_batches[: batch - self.start])
        global_size = self.global_batches[batch - self.start]
        low = self.first_sample + offset + self.rank * global_size // self.world_size
        high = self.first_sample + offset + (self.rank + 1) * global_size // self.world_size
        if not self.shuffle:
            return list(range(low, high))
        return self._order()[low:high].tolist()

    def _order(self) -> torch.Tensor:
        """The open pass's permutation of the dataset."""
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.stream))

    def __iter__(self) -> Iterator[SeededBatch]:
        first, size, stream = self.first_sample, self.size, self.stream
        if self.shuffle:
            order = self._order()[first:].tolist()
        else:
            order = list(range(first, size))
        rank, world_size, offset = self.rank, self.world_size, 0
        for global_size in self.global_batches:
            low, high = offset + rank * global_size // world_size, offset + (rank + 1) * global_size // world_size
            offset += global_size
            yield SeededBatch(order[low:high], stream)


class SeededSamples(Dataset):
    """Loads each ``SeededBatch`` with every generator seeded from its stream and first index.

    A DataLoader hands a whole batch to ``__getitems__``, so the generators
    are seeded once per batch, and a dataset's own batched ``__getitems__`` is
    used when it has one. In the main process (``num_workers=0``) torch's
    state is put back after each batch and NumPy's global functions draw from a
    bit generator of the loader's own while it loads, so loading does not
    disturb the training run's torch and NumPy streams (dropout's, say).
    Swapping NumPy's generator costs far less than copying its state; the one
    thing it drops is the spare value legacy ``np.random.randn`` caches after
    an odd number of normal draws, which a training loop drawing those between
    in-process loads gets afresh, the same way in the uninterrupted and the
    resumed run. Python's ``random`` is left as the last batch's seeding left
    it: saving and restoring it would cost more than all the rest of a
    batch's seeding, and its state stays a function of the run's position, so
    a resumed run still repeats the uninterrupted one exactly.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self._load_many = getattr(dataset, "__getitems__", None)
        self._numpy_for_loading: np.random.MT19937 | None = None

    def __len__(self) -> int:
        return map_length(self.dataset)

    def __getitem__(self, batch: SeededBatch) -> Any:
        """One sample, for a DataLoader without automatic batching: ``batch`` holds its index alone."""
        return self.__getitems__(batch)[0]

    def __getitems__(self, batch: SeededBatch) -> list[Any]:
        if get_worker_info() is not None:  # a worker's generators are its own
            return self._load(batch)
        if self._numpy_for_loading is None:
            self._numpy_for_loading = np.random.MT19937()
        torch_state, training_numpy = torch.default_generator.get_state(), mtrand.get_bit_generator()
        mtrand.set_bit_generator(self._numpy_for_loading)
        try:
            return self._load(batch)
        finally:
            mtrand.set_bit_generator(training_numpy)
            torch.default_generator.set_state(torch_state)

    def _load(self, batch: SeededBatch) -> list[Any]:
        seed = mix_seed(batch.stream, batch[0])
        torch.default_generator.manual_seed(seed)  # the CPU generator: what a transform draws from
        random.seed(seed)
        np.random.seed(seed % 2**32)
        if self._load_many is not None:
            return self._load_many(list(batch))
        dataset = self.dataset
        return [dataset[index] for index in batch]


def map_length(dataset: Dataset) -> int:
    """The length of a map-style dataset, which a sampler needs (``Dataset`` itself declares no ``__len__``)."""
    return len(cast(Sized, dataset))


def has_state(candidate: Any) -> bool:
    return callable(getattr(candidate, "state_dict", None)) and callable(getattr(candidate, "load_state_dict", None))


def state_holder(loader: Iterable[Any]) -> tuple[Any, str | None]:
    """What holds the position of a loader that keeps its own state, or None and why not."""
    if has_state(loader):
        return loader, None
    dataset = getattr(loader, "dataset", None)
    if isinstance(loader, DataLoader) and isinstance(dataset, IterableDataset) and has_state(dataset):
        if loader.num_workers == 0:
            return dataset, None
        return None, (f"its {type(dataset).__name__} has state_dict/load_state_dict, but with num_workers > 0 the "
                      "position lives in the workers' copies; use num_workers=0 or torchdata's StatefulDataLoader")  # fmt: skip
    return None, None


def why_not_seeded(loader: Iterable[Any]) -> str | None:
    """None when the trainer can rebuild this loader with a seeded order, else the reason it cannot."""
    if not isinstance(loader, DataLoader):
        return f"a {type(loader).__name__} is neither a DataLoader nor a list, so its order is its own"
    if isinstance(loader.dataset, IterableDataset):
        return "its dataset is an IterableDataset, which has no random access"
    sampler = loader.sampler
    if type(sampler) not in (SequentialSampler, RandomSampler, DistributedSampler):
        return f"it uses a custom sampler ({type(sampler).__name__})"
    if isinstance(sampler, RandomSampler) and (
        sampler.replacement or sampler.num_samples != map_length(loader.dataset)
    ):
        return "its RandomSampler draws with replacement or a custom number of samples"
    if loader.batch_sampler is not None and type(loader.batch_sampler) is not BatchSampler:
        return f"it uses a custom batch sampler ({type(loader.batch_sampler).__name__})"
    return None


def rebuild(
    loader: DataLoader, worker_init_fn: Any, rank: int = 0, world_size: int = 1
) -> tuple[DataLoader, SeededOrder]:
    """The same DataLoader, of the same class, drawing this rank's share of a ``SeededOrder`` and seeding every batch.

    A ``DistributedSampler`` is replaced by the order, which shards the same
    way every rank (its ``shuffle`` and ``drop_last`` are kept; its seed is
    mixed into the order by the caller).

    Raises:
        TypeError: The loader's class does not take DataLoader's arguments.
        ValueError: A ``DistributedSampler`` made for another number of processes.
    """
    sampler = loader.sampler
    shuffle, drop_last = isinstance(sampler, RandomSampler), loader.drop_last
    if isinstance(sampler, DistributedSampler):
        if sampler.num_replicas != world_size:
            raise ValueError(f"the loader's DistributedSampler shares its data between {sampler.num_replicas} "
                             f"processes, but this run has {world_size}; build it in the run's process group")  # fmt: skip
        shuffle, drop_last = sampler.shuffle, drop_last or sampler.drop_last
    batched = loader.batch_size is not None  # else no automatic batching: the collate_fn sees single samples
    order = SeededOrder(map_length(loader.dataset), shuffle, loader.batch_size or 1, drop_last, rank, world_size)
    options: dict[str, Any] = {
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
        ("batch_sampler" if batched else "sampler"): order,
    }
    if not batched:
        options["batch_size"] = None
    if loader.num_workers > 0:
        options["prefetch_factor"] = loader.prefetch_factor
    if hasattr(loader, "in_order"):  # torch >= 2.6
        options["in_order"] = loader.in_order
    return type(loader)(SeededSamples(loader.dataset), **options), order
