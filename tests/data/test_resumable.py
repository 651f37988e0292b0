"""Resumable batch sources: seeded order, seeded augmentation, starting mid-epoch without loading the past."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, SubsetRandomSampler, TensorDataset

from statetrainer.data import (
    BatchSource,
    EpochSource,
    SeededLoader,
    SequenceSource,
    StatefulSource,
    batch_source,
    mix_seed,
)


class Augmented(Dataset):
    """Sample i is i plus noise from torch, NumPy and Python; counts the samples it loads."""

    def __init__(self, size: int = 40) -> None:
        self.size, self.loads = size, 0

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> torch.Tensor:
        self.loads += 1
        noise = torch.rand(()).item() + float(np.random.rand()) + random.random()
        return torch.tensor([float(index), noise])


def batches(source: BatchSource, seed=1, epoch=0, start=0) -> list[torch.Tensor]:
    return list(source.open(seed, epoch, start))


def test_shuffled_order_depends_on_seed_and_epoch_only():
    source = batch_source(DataLoader(Augmented(), batch_size=8, shuffle=True), phase_index=0)
    first, again = batches(source), batches(source)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    order = torch.cat(first)[:, 0]
    assert sorted(order.tolist()) == list(range(40)) and order.tolist() != list(range(40))
    assert not torch.equal(torch.cat(batches(source, epoch=1))[:, 0], order)
    assert not torch.equal(torch.cat(batches(source, seed=2))[:, 0], order)


def test_augmentation_is_the_same_with_any_number_of_workers():
    dataset = Augmented()
    in_process = batches(batch_source(DataLoader(dataset, batch_size=8, shuffle=True), 0))
    with_workers = batches(batch_source(DataLoader(dataset, batch_size=8, shuffle=True, num_workers=2), 0))
    assert all(torch.equal(a, b) for a, b in zip(in_process, with_workers, strict=True))


def test_loading_in_process_leaves_torch_and_numpy_alone_and_python_random_a_function_of_the_position():
    torch.manual_seed(5)
    np.random.seed(5)
    expected = torch.rand(()), np.random.rand()
    after_loading = []
    for training_seed in (5, 6):  # whatever the run drew before, Python's random ends where the data left it
        torch.manual_seed(5)
        np.random.seed(5)
        random.seed(training_seed)
        batches(batch_source(DataLoader(Augmented(), batch_size=8, shuffle=True), 0))
        assert (torch.rand(()), np.random.rand()) == expected
        after_loading.append(random.random())
    assert after_loading[0] == after_loading[1]


def test_starting_at_batch_k_loads_only_what_follows():
    dataset = Augmented(400)
    source = batch_source(DataLoader(dataset, batch_size=10, shuffle=True), 0)
    whole = batches(source)
    dataset.loads = 0
    tail = batches(source, start=37)
    assert dataset.loads == 30  # the last 3 batches, nothing before them
    assert all(torch.equal(a, b) for a, b in zip(whole[37:], tail, strict=True))
    dataset.loads = 0
    batches(source, start=1)
    assert dataset.loads == 390


def test_lists_start_at_an_index():
    source = batch_source([1, 2, 3, 4], 0)
    assert isinstance(source, SequenceSource) and source.resumable and batches(source, start=2) == [3, 4]


class EveryOther(Sampler):
    def __init__(self, size):
        self.size = size

    def __iter__(self):
        return iter(range(0, self.size, 2))

    def __len__(self):
        return self.size // 2


class Stream(IterableDataset):
    def __iter__(self):
        return iter(range(5))


@pytest.mark.parametrize(
    ("loader", "reason"),
    [
        (DataLoader(Augmented(), sampler=EveryOther(40)), "custom sampler"),
        (DataLoader(Augmented(), sampler=SubsetRandomSampler(range(10))), "custom sampler"),
        (DataLoader(Stream()), "IterableDataset"),
        (range(3), None),  # a range is a Sequence
    ],
)
def test_what_cannot_be_controlled_says_why(loader, reason):
    source = batch_source(loader, 0)
    if reason is None:
        assert source.resumable
        return
    assert isinstance(source, EpochSource) and not source.resumable and reason in source.reason
    assert len(batches(source)) > 0
    with pytest.raises(RuntimeError, match="cannot start at batch 2"):
        source.open(0, 0, 2)


def test_mix_seed_is_stable_and_spreads():
    assert mix_seed(1, 2, 3) == mix_seed(1, 2, 3)
    assert len({mix_seed(1, 0, epoch) for epoch in range(100)}) == 100
    assert 0 <= mix_seed(-5, 2**70) < 2**63


class GaussAugmented(Augmented):
    """Draws from NumPy's cached-pair normal generator too, whose hidden state a restore could miss."""

    def __getitem__(self, index: int) -> torch.Tensor:
        self.loads += 1
        return torch.tensor(
            [float(index), float(np.random.randn()), float(np.random.randn()), float(np.random.randn())]
        )


def test_gaussian_numpy_augmentation_is_the_same_in_process_and_in_workers():
    dataset = GaussAugmented()
    in_process = batches(batch_source(DataLoader(dataset, batch_size=7, shuffle=True), 0))
    with_workers = batches(batch_source(DataLoader(dataset, batch_size=7, shuffle=True, num_workers=2), 0))
    assert all(torch.equal(a, b) for a, b in zip(in_process, with_workers, strict=True))


class BatchedReads(Augmented):
    """A dataset that reads a whole batch at once, and counts how often it does."""

    def __init__(self, size: int = 40) -> None:
        super().__init__(size)
        self.batched_reads = 0

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        self.batched_reads += 1
        return [self[index] for index in indices]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_datasets_batched_getitems_is_used_and_its_batches_are_seeded_as_a_whole(workers):
    dataset = BatchedReads()
    loaded = batches(batch_source(DataLoader(dataset, batch_size=8, shuffle=True, num_workers=workers), 0))
    if workers == 0:
        assert dataset.batched_reads == 5  # in workers, the copies count
    reference = batches(batch_source(DataLoader(Augmented(), batch_size=8, shuffle=True), 0))
    assert all(torch.equal(a, b) for a, b in zip(loaded, reference, strict=True))


class Doubling(DataLoader):
    """A DataLoader subclass with behaviour of its own: every batch comes out doubled."""

    def __iter__(self):
        return (batch * 2 for batch in super().__iter__())


class NeedsAName(DataLoader):
    def __init__(self, name: str, dataset, **options) -> None:
        super().__init__(dataset, **options)
        self.name = name


def test_a_dataloader_subclass_is_rebuilt_as_itself():
    plain = batches(batch_source(DataLoader(Augmented(), batch_size=8, shuffle=True), 0))
    source = batch_source(Doubling(Augmented(), batch_size=8, shuffle=True), 0)
    assert isinstance(source, SeededLoader) and source.resumable
    doubled = batches(source)
    assert all(torch.equal(a * 2, b) for a, b in zip(plain, doubled, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(doubled[3:], batches(source, start=3), strict=True))


def test_a_subclass_that_cannot_be_rebuilt_is_used_as_given_and_says_why():
    source = batch_source(NeedsAName("mine", Augmented(), batch_size=8, shuffle=True), 0)
    assert isinstance(source, EpochSource) and not source.resumable and "NeedsAName cannot be rebuilt" in source.reason
    assert len(batches(source)) == 5


def test_the_loaders_own_generator_keeps_a_say_in_the_order():
    def order(generator_seed: int | None) -> list[float]:
        generator = None if generator_seed is None else torch.Generator().manual_seed(generator_seed)
        source = batch_source(DataLoader(Augmented(), batch_size=8, shuffle=True, generator=generator), 0)
        assert source.resumable
        return torch.cat(batches(source))[:, 0].tolist()

    assert order(1) == order(1)
    assert order(1) != order(2) and order(1) != order(None)


class CountingStream(IterableDataset):
    """A stream that keeps its own position: sample i is i plus noise drawn from a generator seeded by i."""

    def __init__(self, size: int = 30) -> None:
        self.size, self.position = size, 0

    def __iter__(self):
        while self.position < self.size:
            index, self.position = self.position, self.position + 1
            noise = torch.rand((), generator=torch.Generator().manual_seed(index))
            yield torch.tensor([float(index), float(noise)])
        self.position = 0  # the next pass starts over

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


def test_a_stream_with_its_own_state_resumes_from_it():
    whole = batches(batch_source(DataLoader(CountingStream(), batch_size=4), 0))
    stream = CountingStream()
    source = batch_source(DataLoader(stream, batch_size=4), 0)
    assert isinstance(source, StatefulSource) and source.resumable
    iterator = source.open(1, 0)
    first = [next(iterator) for _ in range(3)]
    saved = source.state_dict()
    assert saved == {"position": 12}
    restarted = batch_source(DataLoader(CountingStream(), batch_size=4), 0)
    restarted.load_state_dict(saved)
    rest = list(restarted.open(1, 0, start=3))
    assert all(torch.equal(a, b) for a, b in zip(whole, first + rest, strict=True))
    with pytest.raises(RuntimeError, match="only from its saved state"):
        restarted.open(1, 1, start=2)


def test_a_stream_with_state_in_worker_processes_says_why_it_cannot_resume():
    source = batch_source(DataLoader(CountingStream(), batch_size=4, num_workers=2), 0)
    assert (
        isinstance(source, EpochSource)
        and not source.resumable
        and "num_workers=0 or torchdata's StatefulDataLoader" in source.reason
    )


def test_torchdatas_stateful_dataloader_resumes_through_its_own_state():
    stateful_dataloader = pytest.importorskip("torchdata.stateful_dataloader")
    make = lambda: stateful_dataloader.StatefulDataLoader(list(range(40)), batch_size=4, shuffle=True)  # noqa: E731
    source = batch_source(make(), 0)
    assert isinstance(source, StatefulSource) and source.resumable and source.keeps_own_state
    iterator = source.open(seed=1, pass_index=0)
    seen = [next(iterator) for _ in range(3)]
    saved = source.state_dict()
    rest = [batch.tolist() for batch in iterator]
    restarted = batch_source(make(), 0)
    restarted.load_state_dict(saved)
    assert [batch.tolist() for batch in restarted.open(seed=1, pass_index=0, start=3)] == rest
    assert sorted(value for batch in seen + [torch.tensor(b) for b in rest] for value in batch.tolist()) == list(
        range(40)
    )


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize(("batch_size", "drop_last"), [(8, False), (6, False), (6, True), (None, False)])
def test_the_rebuilt_loader_keeps_batching_and_drop_last_and_starts_anywhere(batch_size, drop_last, workers):
    dataset = TensorDataset(torch.arange(40.0))
    original = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=drop_last)
    source = batch_source(DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=drop_last,
                                     num_workers=workers), 0)  # fmt: skip
    assert isinstance(source, SeededLoader) and source.length == len(original)
    whole = batches(source)
    assert [tuple(batch[0].shape) for batch in whole] == [tuple(batch[0].shape) for batch in original]
    seen = [value for batch in whole for value in batch[0].reshape(-1).tolist()]
    assert len(set(seen)) == len(seen) == (36 if drop_last else 40)  # each sample once; a short last batch dropped
    assert [batch[0].tolist() for batch in batches(source, start=3)] == [batch[0].tolist() for batch in whole[3:]]
