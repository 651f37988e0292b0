"""``trainer.batch_samples``: the dataset indices of the current batch, worked out from the seeded order."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import statetrainer as st


class Indexed(Dataset):
    """``(features, target, index)`` samples: each carries its own index."""

    def __init__(self, size: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.features, self.targets = torch.randn(size, 3, generator=generator), torch.randint(2, (size,))

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return self.features[index], self.targets[index], index


class Seen(st.Callback):
    """Records each batch's ``batch_samples`` beside the indices its samples carry."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, list[int] | None, list[int]]] = []

    def on_exit_batch(self, trainer: st.Trainer) -> None:
        carried = trainer.batch[2].tolist() if isinstance(trainer.batch, (list, tuple)) else []
        self.seen.append((trainer.phase.name, trainer.batch_samples, carried))


class Plain:
    """An iterable the trainer uses as it is (it knows nothing of its batches)."""

    def __init__(self, batches: list) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def build(loader, device, callbacks=(), valid=None, **options) -> st.Trainer:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    phases = [st.Phase("train", loader, batches=options.pop("batches", None))]
    if valid is not None:
        phases.append(st.Phase("valid", valid, grad=False))
    return st.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, phases,
                      callbacks=list(callbacks), unpack=lambda batch: (batch[0], batch[1]), device=device, seed=5,
                      **options)  # fmt: skip


@pytest.mark.parametrize(
    "loader",
    [
        pytest.param(lambda: DataLoader(Indexed(29), batch_size=4, shuffle=True), id="shuffled"),
        pytest.param(lambda: DataLoader(Indexed(29), batch_size=4, shuffle=True, drop_last=True), id="drop-last"),
        pytest.param(lambda: DataLoader(Indexed(29), batch_size=4, num_workers=2, shuffle=True), id="workers"),
        pytest.param(
            lambda: DataLoader(
                Indexed(29), batch_size=4, sampler=DistributedSampler(Indexed(29), num_replicas=1, rank=0, seed=3)
            ),
            id="distributed-sampler",
        ),  # fmt: skip
    ],
)
def test_batch_samples_are_the_indices_each_batch_holds(device, loader):
    seen = Seen()
    build(loader(), device, [seen], valid=DataLoader(Indexed(7), batch_size=3), epochs=2).fit()
    assert len(seen.seen) >= 2 * (7 + 3)
    for phase, samples, carried in seen.seen:
        assert samples == carried, phase


def test_a_stream_of_passes_and_a_resumed_run_know_their_batches(device, tmp_path):
    """``Phase(batches=5)`` over passes of 8 batches (each epoch crosses into the next pass), and the same run
    saved mid-epoch and resumed in a new trainer."""
    whole = Seen()
    build(DataLoader(Indexed(30), batch_size=4, shuffle=True), device, [whole], epochs=4, batches=5).fit()
    assert all(samples == carried for _, samples, carried in whole.seen) and len(whole.seen) == 20
    first = build(DataLoader(Indexed(30), batch_size=4, shuffle=True), device, [Seen()], epochs=4, batches=5)
    first.run_until("phase", epoch=1, batch=2)
    saved = first.save_checkpoint(tmp_path / "mid.safetensors")
    resumed = Seen()
    second = build(DataLoader(Indexed(30), batch_size=4, shuffle=True), device, [resumed], epochs=4, batches=5)
    second.load_checkpoint(saved)
    second.fit()
    assert [samples for _, samples, _ in resumed.seen] == [samples for _, samples, _ in whole.seen[8:]]
    assert all(samples == carried for _, samples, carried in resumed.seen)


def test_a_list_gives_each_batch_its_place_and_a_plain_iterable_none(device):
    batches = [(torch.randn(2, 3), torch.randint(2, (2,)), torch.tensor([index, index])) for index in range(5)]
    listed = Seen()
    trainer = build(batches, device, [listed], epochs=1)
    assert trainer.batch_samples is None  # before any batch
    trainer.fit()
    assert [samples for _, samples, _ in listed.seen] == [[index] for index in range(5)]
    generated = Seen()
    build(Plain(batches), device, [generated], epochs=1).fit()
    assert [samples for _, samples, _ in generated.seen] == [None] * 5
