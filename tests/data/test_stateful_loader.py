"""Loaders that keep their own position resume exactly, wherever the run was saved.

A checkpoint holds such a loader's own state, which is that of its latest pass
(torchdata's ``StatefulDataLoader``), or its dataset's. Saved at an epoch
boundary, after a phase's last batch, while another phase runs, or mid-phase, a
resumed run must see the batches, and end with the weights, of the run that was
never stopped: the batches the stopped run saw followed by the resumed run's
are the uninterrupted run's, one for one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

import statetrainer as st
from statetrainer.callbacks import Callback, Checkpoint
from statetrainer.checkpoint import CheckpointError, read_tree
from statetrainer.parts import Position

StatefulDataLoader = pytest.importorskip("torchdata.stateful_dataloader").StatefulDataLoader

EPOCHS = 3
TRAIN_BATCHES = 5  # 23 samples in batches of 5, the last one short

# Where the first run stops and is saved: ``run_until`` arguments. Every train pass has 5 batches, every valid pass 3.
SAVE_POINTS: dict[str, dict[str, Any]] = {
    "epoch boundary": {"state": "epoch", "epoch": 1},  # Checkpoint(every_epochs=1) saves here
    "train's last batch done": {"state": "phase", "epoch": 1, "phase": "train", "batch": TRAIN_BATCHES - 1},
    "between train and valid": {"state": "epoch", "epoch": 1, "phase": "train"},
    "mid-train": {"state": "phase", "epoch": 1, "phase": "train", "batch": 2},
    "mid-valid": {"state": "phase", "epoch": 1, "phase": "valid", "batch": 0},
    "mid-train, valid not yet opened": {"state": "phase", "epoch": 0, "phase": "train", "batch": 1},
}
PASS_ENDED_POINTS = ["epoch boundary", "between train and valid"]


def numbered_sample(index: int, noisy: bool) -> tuple[torch.Tensor, int]:
    """Sample ``index``: features ``(index, noise, 1)`` and label ``index % 2``; the noise comes from torch's
    generator, or is 0.5."""
    noise = torch.rand(()).item() if noisy else 0.5
    return torch.tensor([float(index), noise, 1.0]), index % 2


class NumberedSamples(Dataset):
    """The numbered samples ``0 .. size - 1``."""

    def __init__(self, size: int = 23, noisy: bool = True) -> None:
        self.size, self.noisy = size, noisy

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return numbered_sample(index, self.noisy)


class NumberedStream(IterableDataset):
    """The numbered samples as a stream of unknown length that keeps its own position.

    Each pass goes through them in a new order, drawn from its pass number; worker ``w`` of ``n`` takes every
    ``n``-th sample of it from the ``w``-th.
    """

    def __init__(self, size: int = 23, noisy: bool = True) -> None:
        self.size, self.noisy = size, noisy
        self.passes = self.position = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        worker = get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.passes)).tolist()
        mine = order[worker_id::workers]
        while self.position < len(mine):
            index, self.position = mine[self.position], self.position + 1
            yield numbered_sample(index, self.noisy)
        self.passes, self.position = self.passes + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"passes": self.passes, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.passes, self.position = state["passes"], state["position"]


class SampleLog(Callback):
    """Records each batch the run enters: its epoch, phase, index and sample ids."""

    def __init__(self) -> None:
        self.name = "sample_log"
        self.seen: list[tuple[int, str, int, list[int]]] = []

    def on_enter_batch(self, trainer: st.Trainer) -> None:
        ids = trainer.batch[0][:, 0].long().tolist()
        self.seen.append((trainer.epoch, trainer.phase.name, trainer.batch_index, ids))


LoaderMaker = Callable[[], Any]


def build(folder: Path, make_train: LoaderMaker, make_valid: LoaderMaker, device: torch.device) -> st.Trainer:
    """A classifier trainer on ``device`` with a ``SampleLog`` and a ``Checkpoint`` in ``folder``: train, then valid."""
    torch.manual_seed(0)  # the model, and a StatefulDataLoader's own sampler generator, are made from it
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.2), nn.Linear(8, 2))
    phases = [st.Phase("train", make_train()), st.Phase("valid", make_valid(), grad=False)]
    return st.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, phases,
                      callbacks=[SampleLog(), Checkpoint(folder)], epochs=EPOCHS, device=device, seed=3,
                      deterministic=device.type == "cuda")  # fmt: skip


def sample_log(trainer: st.Trainer) -> list[tuple[int, str, int, list[int]]]:
    return next(callback for callback in trainer.callbacks if isinstance(callback, SampleLog)).seen


def assert_resumes_as_uninterrupted(tmp_path: Path, device: torch.device, make_train: LoaderMaker,
                                    make_valid: LoaderMaker, point: str,
                                    tamper: Callable[[dict[str, Any]], None] | None = None) -> None:  # fmt: skip
    """Stop a run at ``point``, save it, resume it in a new trainer: it ends as the uninterrupted run.

    The stopped run, continued, also ends so: saving it changed nothing. ``tamper`` changes the saved
    checkpoint's state before it is loaded (an older checkpoint's layout).
    """
    whole = build(tmp_path / "whole", make_train, make_valid, device).fit()
    stopped = build(tmp_path / "run", make_train, make_valid, device)
    stopped.run_until(**SAVE_POINTS[point])
    saved = stopped.save_checkpoint(tmp_path / "stopped.safetensors")
    seen_before_the_stop = list(sample_log(stopped))
    stopped.fit()
    resumed = build(tmp_path / "run", make_train, make_valid, device)
    if tamper is None:
        resumed.load_checkpoint(saved)
    else:
        state = read_tree(saved)
        tamper(state)
        resumed.load_state_dict(state)
    resumed.fit()
    for trainer in (whole, stopped, resumed):
        stop_workers(trainer)
    assert sample_log(stopped) == sample_log(whole)
    assert seen_before_the_stop + sample_log(resumed) == sample_log(whole)
    assert_same_weights(whole, resumed)


def assert_same_weights(expected: st.Trainer, actual: st.Trainer) -> None:
    """Every parameter and buffer of ``actual``'s model equals ``expected``'s, bit for bit."""
    pairs = zip(expected.model.state_dict().items(), actual.model.state_dict().values(), strict=True)
    for (name, left), right in pairs:
        assert torch.equal(left, right), name


def stop_workers(finished: st.Trainer) -> None:
    """Stop the worker processes of a finished trainer's StatefulDataLoaders now.

    Such a loader keeps its latest iterator, whose workers live on. A trainer is a reference cycle, and a
    collection that frees a loader's iterator waits seconds per worker before it ends them; freed at once, it
    does not.
    """
    for phase in finished.phases:
        if isinstance(phase.loader, StatefulDataLoader):
            phase.loader.load_state_dict({})  # it lets go of its iterator, and nothing else holds that


def shuffled_loader(workers: int, generator_seed: int | None, persistent: bool = False) -> LoaderMaker:
    """A shuffled StatefulDataLoader of ``NumberedSamples``: with its own sampler generator, or one seeded so.

    The samples are noisy in process only: torchdata restores no worker's generator, so a pass resumed in
    worker processes draws other noise.
    """

    def make() -> StatefulDataLoader:
        generator = None if generator_seed is None else torch.Generator().manual_seed(generator_seed)
        return StatefulDataLoader(NumberedSamples(noisy=workers == 0), batch_size=5, shuffle=True,
                                  num_workers=workers, persistent_workers=persistent, generator=generator)  # fmt: skip

    return make


def stateful_valid() -> StatefulDataLoader:
    return StatefulDataLoader(NumberedSamples(noisy=False), batch_size=8)


def seeded_valid() -> DataLoader:
    """A DataLoader the trainer rebuilds with a seeded order: its position is the trainer's, not its own."""
    return DataLoader(NumberedSamples(noisy=False), batch_size=8)


@pytest.mark.parametrize(
    ("workers", "generator_seed", "persistent"),
    [(0, None, False), (0, 7, False), (2, None, False), (2, 7, True)],
    ids=["in process", "in process, a generator given", "2 workers", "2 persistent workers, a generator given"],
)
@pytest.mark.parametrize("point", SAVE_POINTS)
def test_a_shuffled_stateful_dataloader_resumes_as_the_uninterrupted_run(device, tmp_path, point, workers,
                                                                        generator_seed, persistent):  # fmt: skip
    """The next epoch's order comes from the sampler generator's state, as in the uninterrupted run; the valid
    phase's StatefulDataLoader, saved after its pass ended or before its first, starts its next pass."""
    make_train = shuffled_loader(workers, generator_seed, persistent)
    assert_resumes_as_uninterrupted(tmp_path, device, make_train, stateful_valid, point)


@pytest.mark.parametrize("dataset", ["map-style", "stream"])
@pytest.mark.parametrize("point", PASS_ENDED_POINTS)
def test_a_pass_begun_after_a_resume_seeds_its_workers_as_the_uninterrupted_run(device, tmp_path, point, dataset):
    """Two workers draw the noise; a new pass draws their base seed where the uninterrupted run drew it. A
    stream's saved state says its iterator ran into its end, from which torchdata starts the next pass by itself,
    but after drawing the spent iterator's seed. (The valid phase is rebuilt and seeded by the trainer.)"""

    def make_train() -> StatefulDataLoader:
        if dataset == "stream":
            return StatefulDataLoader(NumberedStream(), batch_size=5, num_workers=2)
        return StatefulDataLoader(NumberedSamples(), batch_size=5, shuffle=True, num_workers=2)

    assert_resumes_as_uninterrupted(tmp_path, device, make_train, seeded_valid, point)


@pytest.mark.parametrize("point", ["epoch boundary", "between train and valid", "mid-train"])
def test_an_in_process_dataloader_over_a_stream_that_keeps_its_position_resumes_as_the_uninterrupted_run(
    device, tmp_path, point
):
    """The dataset's own state is where its next pass starts, or goes on (the valid phase is rebuilt and seeded)."""
    assert_resumes_as_uninterrupted(tmp_path, device, lambda: DataLoader(NumberedStream(), batch_size=5), seeded_valid,
                                    point)  # fmt: skip


def without_passes(state: dict[str, Any]) -> None:
    """The layout of a checkpoint saved before the data part held each loader's pass."""
    for phase in state["data"]:
        del phase["pass"]


@pytest.mark.parametrize("point", ["epoch boundary", "between train and valid", "mid-train"])
def test_a_checkpoint_without_the_loaders_passes_resumes_from_its_position(device, tmp_path, point):
    """Which pass each loader's state is in follows from the run's position in a checkpoint of the older layout."""
    assert_resumes_as_uninterrupted(tmp_path, device, shuffled_loader(0, None), stateful_valid, point,
                                    tamper=without_passes)  # fmt: skip


def test_a_run_saved_again_before_its_loaders_open_keeps_their_positions(device, tmp_path):
    """A checkpoint taken right after a load holds the loaded positions, not those of loaders not yet opened."""
    whole = build(tmp_path / "whole", shuffled_loader(0, None), stateful_valid, device).fit()
    stopped = build(tmp_path / "run", shuffled_loader(0, None), stateful_valid, device)
    stopped.run_until("epoch", epoch=2)  # the loaders' states are two passes on from their first
    saved = stopped.save_checkpoint(tmp_path / "stopped.safetensors")  # before another trainer reseeds torch
    loaded = build(tmp_path / "run", shuffled_loader(0, None), stateful_valid, device)
    loaded.load_checkpoint(saved)
    resaved = loaded.save_checkpoint(tmp_path / "resaved.safetensors")
    resumed = build(tmp_path / "run", shuffled_loader(0, None), stateful_valid, device)
    resumed.load_checkpoint(resaved)
    resumed.fit()
    assert sample_log(stopped) + sample_log(resumed) == sample_log(whole)
    assert_same_weights(whole, resumed)


def test_a_checkpoint_before_a_stateful_loader_first_opens_leaves_the_run_as_it_was(device, tmp_path):
    """Saving builds the valid StatefulDataLoader's first iterator, which must not draw from the run's generator."""
    unsaved = build(tmp_path / "unsaved", shuffled_loader(0, None), stateful_valid, device).fit()
    saving = build(tmp_path / "saving", shuffled_loader(0, None), stateful_valid, device)
    saving.run_until(**SAVE_POINTS["mid-train, valid not yet opened"])
    saving.save_checkpoint(tmp_path / "saved.safetensors")
    saving.fit()
    assert sample_log(saving) == sample_log(unsaved)
    assert_same_weights(unsaved, saving)


FORGED_PASSES: dict[str, tuple[int, Any, str]] = {
    # name: (phase index, its saved pass, what the refusal says)
    "not a dict": (0, [1, None], "not a dict of its number"),
    "a negative pass number": (0, {"index": -1, "generator": None}, "not None or an integer >= 0"),
    "a boolean pass number": (0, {"index": True, "generator": None}, "not None or an integer >= 0"),
    "a generator state of the wrong size": (
        0,
        {"index": 0, "generator": torch.zeros(3, dtype=torch.uint8)},
        "not a state of that generator",
    ),
    "a generator state for a loader with none": (
        1,
        {"index": 0, "generator": torch.zeros(3, dtype=torch.uint8)},
        "state of its loader.s generator, but it has none",
    ),
    "a pass for a loader that keeps no state": (1, {"index": 0, "generator": None}, "which this one does not"),
}


@pytest.mark.parametrize("forged", FORGED_PASSES)
def test_a_forged_pass_is_refused_before_anything_loads(device, tmp_path, forged):
    index, saved_pass, refusal = FORGED_PASSES[forged]
    make_valid = seeded_valid if "keeps no state" in forged else stateful_valid
    stopped = build(tmp_path / "run", shuffled_loader(0, 7), make_valid, device)
    stopped.run_until(**SAVE_POINTS["epoch boundary"])
    state = read_tree(stopped.save_checkpoint(tmp_path / "stopped.safetensors"))
    state["data"][index]["pass"] = saved_pass
    fresh = build(tmp_path / "run", shuffled_loader(0, 7), make_valid, device)
    with pytest.raises(CheckpointError, match=refusal):
        fresh.load_state_dict(state)
    assert fresh.position == Position() and fresh.state == "idle"  # nothing loaded
