"""Find the first bad batch of a run from its checkpoints: a binary search over them, then a replay.

Every resume is exact, so a run's checkpoints are points it can be replayed
from with the same numbers. ``bisect(folder, make_trainer)`` first finds the
newest checkpoint saved before the damage, in a binary search over the
folder's checkpoints: each probe loads one into a new trainer and asks
``healthy`` (by default: every weight and optimizer state finite), which
holds up to the damage and not after it. That takes ``ceil(log2(N + 1))``
loads for ``N`` checkpoints. It then loads that checkpoint once more and
replays, transition by transition, until ``bad`` holds (by default: a
training batch's loss, or a step's gradients, not finite), and hands back
the trainer stopped there with where it is and which samples the batch held.
Under torchrun every rank bisects: a probe is healthy when it is on every
rank, and the replay stops on every rank at the first batch that is bad on
any (its samples are in one rank's ``batch_samples``). The replay writes nothing: ``make_trainer`` must build the run's trainer
without the callbacks that write files.
"""

from __future__ import annotations

import gc
import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .callbacks.finite import first_non_finite
from .checkpoint import CheckpointError, checkpoint_files
from .distributed import agree, all_gather
from .trainer import Trainer

__all__ = ["BisectResult", "bad_batch", "bisect", "finite_state", "probes"]


@dataclass
class BisectResult:
    """The first batch where ``bad`` held, and the trainer stopped there.

    Attributes:
        trainer: Stopped at that batch (in ``batch`` after its forward, or ``backward`` after its backward), to
            inspect or step on.
        epoch, phase, batch, step: Where it is (``trainer.epoch``, its phase's name, ``batch_index``,
            ``global_step``), counted from 0 as the trainer counts them.
        batch_samples: The batch's dataset indices in this process (``trainer.batch_samples``).
        checkpoint: The checkpoint the replay started from (None: the run's beginning).
        loads: Checkpoints loaded, the replay's included.
        replayed: Batches replayed from that checkpoint, the bad one included.
    """

    trainer: Trainer
    epoch: int
    phase: str
    batch: int
    step: int
    batch_samples: list[int] | None
    checkpoint: Path | None
    loads: int
    replayed: int


def finite_state(trainer: Trainer) -> bool:
    """Whether every weight and every tensor of the optimizer's state is finite (sharded ones shard by shard)."""
    tensors: dict[str, torch.Tensor] = dict(trainer.model.named_parameters())
    if trainer.optimizer is not None:
        for number, state in enumerate(trainer.optimizer.state.values()):
            tensors.update({f"optimizer/{number}/{key}": value for key, value in state.items()
                            if isinstance(value, torch.Tensor)})  # fmt: skip
    return first_non_finite(tensors) is None


def bad_batch(trainer: Trainer) -> bool:
    """Whether the training batch just run has a loss that is not finite, or, after its backward, gradients that
    are not."""
    if trainer.phase is None or not trainer.phase.grad:
        return False
    if trainer.state == "batch" and trainer.loss is not None:
        return first_non_finite({"loss": trainer.loss.detach()}) is not None
    if trainer.state == "backward":
        grads = {name: parameter.grad for name, parameter in trainer.model.named_parameters()
                 if parameter.grad is not None}  # fmt: skip
        return first_non_finite(grads) is not None
    return False


def bisect(folder: str | os.PathLike[str], make_trainer: Callable[[], Trainer], *,
           healthy: Callable[[Trainer], bool] = finite_state,
           bad: Callable[[Trainer], bool] = bad_batch) -> BisectResult:  # fmt: skip
    """The first batch of the run saved in ``folder`` where ``bad`` holds (see the module's description).

    Args:
        folder: The run's checkpoint folder.
        make_trainer: Builds the run's trainer as the run built it (model, optimizer, data, seed, schedulers),
            without the callbacks that write files; called once per load.
        healthy: Whether a loaded checkpoint is from before the damage (it must hold up to it, and not after).
        bad: Whether the run has gone wrong at the trainer's current point (called after every transition of the
            replay).

    With the default predicates the newest checkpoint is healthy whenever the ``Checkpoint`` callback saved the
    run (it refuses to save weights that are not finite); the search narrows things where damaged checkpoints can
    exist (another saver, or a ``healthy`` of your own, such as a loss spike seen in the metrics).

    Raises:
        ValueError: ``make_trainer`` builds a trainer with callbacks that write files.
        CheckpointError: ``folder`` holds no checkpoint, or one that does not load.
        RuntimeError: The replay reached the run's end and ``bad`` never held.
    """
    checkpoints = checkpoint_files(Path(folder)) if Path(folder).is_dir() else []
    loads, first = 0, make_trainer()  # it joins the process group, over which the ranks compare their listings
    _check_same_listing(checkpoints, first)
    if not checkpoints:
        raise CheckpointError(f"{folder} holds no checkpoints to bisect: name the run's checkpoint folder")

    def loaded(checkpoint: Path | None) -> Trainer:
        nonlocal loads, first
        trainer, first = first or make_trainer(), None
        writers = [callback.key for callback in trainer.callbacks if callback.writes_records()]
        if writers:
            raise ValueError(f"bisect replays the run, and these callbacks would write into its folders or trackers: "
                             f"{', '.join(writers)}; have make_trainer build the trainer without them")  # fmt: skip
        if checkpoint is not None:
            trainer.load_checkpoint(checkpoint)
            loads += 1
        return trainer

    before, after = -1, len(checkpoints)  # the beginning is before the damage; past the newest, after it
    while after - before > 1:
        middle = (before + after) // 2
        probed = loaded(checkpoints[middle])
        if agree(healthy(probed), probed.ranks, probed.device):  # healthy on every rank
            before = middle
        else:
            after = middle
        del probed
        gc.collect()  # a trainer and its run refer to each other: free this probe's model before the next
    start = checkpoints[before] if before >= 0 else None
    trainer, replayed = loaded(start), 0

    def stop(trainer: Trainer) -> bool:
        nonlocal replayed
        if trainer.state == "batch":
            replayed += 1
        return not agree(not bad(trainer), trainer.ranks, trainer.device)  # bad on some rank: every rank stops

    try:
        trainer.run_until(when=stop)
    except RuntimeError as error:
        if not trainer.finished:  # the replay itself failed
            raise
        raise RuntimeError(f"replayed {replayed} batches from {start} to the run's end and found no bad "
                           "batch") from error  # fmt: skip
    assert trainer.phase is not None  # stopped in a training batch
    return BisectResult(trainer, trainer.epoch, trainer.phase.name, trainer.batch_index, trainer.global_step,
                        trainer.batch_samples, start, loads, replayed)  # fmt: skip


def _check_same_listing(checkpoints: list[Path], trainer: Trainer) -> None:
    """Raise on every rank unless every rank lists the same checkpoints (a shared folder another node sees late
    would have the ranks load different ones)."""
    digest = hashlib.blake2b("\n".join(path.name for path in checkpoints).encode(), digest_size=8).digest()
    mine = torch.tensor([int.from_bytes(digest, "little", signed=True)], dtype=torch.int64)
    listings = all_gather(mine, trainer.ranks, trainer.device)
    if any(not listing.equal(mine) for listing in listings):
        raise CheckpointError(f"the ranks list different checkpoints in the run's folder (this rank: "
                              f"{len(checkpoints)}); bisect once every rank sees the same files")  # fmt: skip


def probes(checkpoints: int) -> int:
    """The loads the binary search makes over ``checkpoints`` checkpoints: ``ceil(log2(checkpoints + 1))``."""
    return math.ceil(math.log2(checkpoints + 1))
