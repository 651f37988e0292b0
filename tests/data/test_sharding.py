"""One global order shared between ranks: every sample once, equal batch counts, resuming at any sample."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import statetrainer as st
from statetrainer import Phase
from statetrainer.data import PassStream, PhaseSources, SeededLoader, SeededOrder, batch_source

CASES = [(40, 4, 2, False), (43, 4, 2, False), (41, 4, 2, False), (41, 4, 2, True), (10, 3, 3, False), (7, 2, 4, False),
         (100, 8, 3, False), (5, 4, 1, False), (5, 4, 1, True)]  # fmt: skip


def passes(size: int, batch_size: int, world_size: int, drop_last: bool, stream: int = 3, start: int = 0,
           first_sample: int | None = None) -> list[list[list[int]]]:  # fmt: skip
    """Each rank's batches of one pass."""
    orders = [SeededOrder(size, True, batch_size, drop_last, rank, world_size) for rank in range(world_size)]
    for order in orders:
        order.position(stream, start, first_sample)
    return [[list(batch) for batch in order] for order in orders]


@pytest.mark.parametrize(("size", "batch_size", "world_size", "drop_last"), CASES)
def test_every_sample_goes_to_exactly_one_rank_and_every_rank_has_as_many_batches(size, batch_size, world_size,
                                                                                  drop_last):  # fmt: skip
    ranks = passes(size, batch_size, world_size, drop_last)
    assert len({len(batches) for batches in ranks}) == 1
    seen = Counter(index for batches in ranks for batch in batches for index in batch)
    whole = batch_size * world_size
    expected = size - size % whole if drop_last else size
    assert set(seen) <= set(range(size)) and sum(seen.values()) == expected and set(seen.values()) == {1}
    assert all(batch for batches in ranks for batch in batches)  # no rank ever gets an empty batch


@pytest.mark.parametrize(("size", "batch_size", "world_size", "drop_last"), CASES)
def test_the_ranks_batches_are_the_global_order_cut_in_global_batches(size, batch_size, world_size, drop_last):
    """Rank shares of global batch ``k`` put side by side are the one-process order's samples of that global batch."""
    ranks = passes(size, batch_size, world_size, drop_last)
    together = [index for step in zip(*ranks, strict=True) for batch in step for index in batch]
    one_process = [index for batch in passes(size, batch_size * world_size, 1, drop_last)[0] for index in batch]
    assert together == one_process[: len(together)]


def test_a_short_last_global_batch_is_shared_as_evenly_as_it_goes_and_weighed_to_its_mean():
    orders = [SeededOrder(43, True, 4, False, rank, 2) for rank in range(2)]  # 5 x 8, then 3
    last = [list(order)[-1] for order in orders]
    assert [len(batch) for batch in last] == [1, 2]
    weights = [order.share_weight(5) for order in orders]
    assert weights == [2 / 3, 4 / 3] and sum(weights) / 2 == 1.0
    assert [order.share_weight(0) for order in orders] == [1.0, 1.0]
    merged = [list(order) for order in (SeededOrder(41, True, 4, False, rank, 2) for rank in range(2))]
    assert [len(batch) for batch in merged[0]] == [4, 4, 4, 4, 4] and [len(batch) for batch in merged[1]][-1] == 5


@pytest.mark.parametrize(("saved_world", "resumed_world", "batches_done"), [(2, 1, 2), (1, 2, 3), (2, 3, 1), (3, 2, 4)])
def test_a_pass_resumed_at_its_global_sample_on_another_world_size_loads_the_rest_once(saved_world, resumed_world,
                                                                                       batches_done):  # fmt: skip
    size, batch_size = 43, 4
    before = passes(size, batch_size, saved_world, False)
    done = Counter(index for batches in before for batch in batches[:batches_done] for index in batch)
    order = SeededOrder(size, True, batch_size, False, 0, saved_world)
    order.position(3, 0)
    sample = order.samples_done(batches_done)
    assert sample == sum(done.values())
    after = passes(size, batch_size, resumed_world, False, start=batches_done, first_sample=sample)
    rest = Counter(index for batches in after for batch in batches for index in batch)
    assert done + rest == Counter(range(size))
    resumed = SeededOrder(size, True, batch_size, False, 0, resumed_world)
    resumed.position(3, batches_done, sample)
    assert resumed.pass_length == batches_done + len(after[0])


def test_a_dataset_smaller_than_the_world_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="3 samples cannot be shared between 4 processes"):
        SeededOrder(3, True, 1, False, 0, 4)


def test_a_distributed_sampler_is_recognised_and_its_shuffle_seed_and_drop_last_kept():
    dataset = TensorDataset(torch.arange(20.0))
    sampler = DistributedSampler(dataset, num_replicas=2, rank=1, shuffle=True, seed=5, drop_last=True)
    source = batch_source(DataLoader(dataset, batch_size=3, sampler=sampler), 0, rank=1, world_size=2)
    assert isinstance(source, SeededLoader) and source.resumable
    assert source.length == 3  # 20 // 6 global batches of 2 x 3, the short last one dropped
    other_seed = batch_source(DataLoader(dataset, batch_size=3, sampler=DistributedSampler(
        dataset, num_replicas=2, rank=1, seed=6, drop_last=True)), 0, rank=1, world_size=2)  # fmt: skip
    first = [batch[0].tolist() for batch in source.open(1, 0)]
    assert first != [batch[0].tolist() for batch in other_seed.open(1, 0)]  # the sampler's seed has a say
    with pytest.raises(ValueError, match="between 2 processes, but this run has 3"):
        batch_source(DataLoader(dataset, sampler=sampler), 0, rank=0, world_size=3)


def test_the_saved_data_position_is_the_global_sample_and_a_changed_world_size_resumes_from_it():
    class AtBatch:
        phase_index, batch_index = 0, 1  # two batches of the phase done

    dataset = TensorDataset(torch.arange(43.0))
    saved = PhaseSources.for_phases(
        [Phase("train", DataLoader(dataset, batch_size=4, shuffle=True))], position=AtBatch(), rank=0, world_size=2
    )
    saved.sources[0].open(1, 0, 0)
    state = saved.state_dict()
    assert state[0]["samples_done"] == 16 and state[0]["shards"] == 2 and state[0]["global_batches"] == 11
    resumed = PhaseSources.for_phases(
        [Phase("train", DataLoader(dataset, batch_size=4, shuffle=True))], position=AtBatch(), rank=0, world_size=1
    )
    resumed.check_fits(state)
    resumed.load_state_dict(state)
    rest = [int(index) for batch in resumed.sources[0].open(1, 0, 2) for index in batch[0]]
    assert len(set(rest)) == len(rest) == 43 - 16 and resumed.sources[0].pass_length == 2 + 7


def test_a_stream_resumed_on_another_number_of_processes_resumes_again_on_that_number():
    """A stream's batches counted on 1 process, resumed on 2 and saved there: its samples, not that count, say where
    it goes on, so a second resume on 2 processes takes the next global batch, none twice."""
    dataset = TensorDataset(torch.arange(40.0))

    def stream(world_size: int, rank: int = 0) -> PassStream:
        loader = DataLoader(dataset, batch_size=4, shuffle=True)  # 10 batches a pass on 1 process, 5 on 2
        return PassStream(batch_source(loader, 0, (), rank, world_size), "train")

    one = stream(1)
    taken = [batch[0] for _, batch in zip(range(7), one.batches(seed=1), strict=False)]
    two = stream(2)
    two.check_fits(one.state_dict())
    two.load_state_dict(one.state_dict())
    next(two.batches(seed=1))  # rank 0's share of the next global batch
    saved = two.state_dict()
    assert saved == {"pass": 0, "batches": 8, "samples": 36}
    again = [stream(2, rank) for rank in (0, 1)]
    for each in again:
        each.check_fits(saved)
        each.load_state_dict(saved)
    last = torch.cat([next(each.batches(seed=1))[0] for each in again])
    first_pass = [batch[0] for _, batch in zip(range(10), stream(1).batches(seed=1), strict=False)]
    assert all(torch.equal(left, right) for left, right in zip(taken, first_pass[:7], strict=False))
    # 28 samples on 1 process; on 2, a global batch of 8 (samples 28-35; rank 0 took the first 4); after the
    # second resume on 2, the last global batch: samples 36-39 of the pass's order, shared between the ranks.
    order = torch.cat(first_pass)
    assert torch.equal(torch.cat(taken), order[:28]) and torch.equal(last, order[36:])


def test_a_run_saved_between_phases_on_another_world_size_starts_the_next_pass_whole(device):
    """After a phase cut short (limit), a checkpoint between phases records the samples that phase took; a resume on
    another number of processes must not start the phase's next pass there."""

    def build() -> tuple[st.Trainer, list]:
        seen: list = []

        class Record(st.Callback):
            def on_exit_batch(self, trainer):
                seen.append((trainer.epoch, trainer.batch[0].tolist()))

        torch.manual_seed(0)
        model = nn.Linear(1, 1)
        data = TensorDataset(torch.arange(40.0).unsqueeze(1), torch.zeros(40, 1))
        phases = [st.Phase("train", DataLoader(data, batch_size=8, shuffle=True), limit=3)]
        trainer = st.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.mse_loss, phases,
                             callbacks=[Record()], epochs=3, device=device, seed=3)  # fmt: skip
        return trainer, seen

    plain, plain_seen = build()
    plain.fit()
    first, _ = build()
    first.run_until("epoch", when=lambda trainer: trainer.position.phase_index == 0)  # epoch 0, its phase done
    state = copy.deepcopy(first.state_dict())
    assert state["data"][0]["samples_done"] == 24  # the limited phase's 3 batches
    state["data"][0]["shards"] = 2  # as saved by 2 processes, whose global order is the same
    resumed, resumed_seen = build()
    resumed.load_state_dict(state)
    resumed.fit()
    assert resumed_seen == [entry for entry in plain_seen if entry[0] >= 1]
