"""A kill before any file operation of a run, then a resume, leaves the folder as the uninterrupted run leaves it.

Each file-changing operation a run makes in its folder (a file opened for
writing, a rename, a link, a removal) is a kill point. The run is stopped just
before the n-th one, for every n: an audit hook raises ``Killed`` (a
``BaseException``, which nothing in the library catches) and the trainer is
dropped, as a killed process's memory is. A new trainer resumes from the
folder. Its logs must equal the uninterrupted run's byte for byte (a CSV that
gained a column after the checkpoint included), and its best copies must be
the checkpoints of the epochs the uninterrupted run keeps.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import statetrainer as st
from statetrainer.callbacks import Checkpoint, CSVLogger, SmoothedLoss
from statetrainer.checkpoint import checkpoint_files, read_tree

_WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class Killed(BaseException):
    """The process died here."""


class KillPoints:
    """Counts the file-changing operations under ``folder``, raising ``Killed`` just before the ``kill_at``-th."""

    active: KillPoints | None = None
    _installed = False

    def __init__(self, folder: Path, kill_at: int | None = None) -> None:
        self.folder, self.kill_at, self.seen = str(folder), kill_at, 0

    def __enter__(self) -> KillPoints:
        if not KillPoints._installed:
            sys.addaudithook(KillPoints._hook)
            KillPoints._installed = True
        KillPoints.active = self
        return self

    def __exit__(self, *exc: object) -> None:
        KillPoints.active = None

    @staticmethod
    def _hook(event: str, args: tuple[Any, ...]) -> None:
        points = KillPoints.active
        if points is None:
            return
        if event == "open":
            path, flags = args[0], args[2]
            changes = isinstance(path, (str, bytes, os.PathLike)) and bool(flags & _WRITING)
        elif event in ("os.rename", "os.link"):
            path, changes = args[1], True
        elif event == "os.remove":
            path, changes = args[0], True
        else:
            return
        if changes and str(os.fsdecode(path)).startswith(points.folder):
            points.seen += 1
            if points.seen == points.kill_at:
                KillPoints.active = None
                raise Killed(f"killed before {event} {path}")


def batches(count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 4, generator=generator), torch.randint(0, 3, (4,), generator=generator))
            for _ in range(count)]  # fmt: skip


def build(folder: Path, device: torch.device, kept: str) -> st.Trainer:
    """A run that keeps its logs (``kept="logs"``: the batch log widens at the first validation row) or its best
    checkpoints (``kept="best"``)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    phases = [st.Phase("train", batches(3, 0)), st.Phase("valid", batches(2, 1), grad=False)]
    if kept == "logs":
        callbacks = [SmoothedLoss(), CSVLogger(folder / "log.csv", every_batches=1), Checkpoint(folder, every_steps=2)]
    else:
        callbacks = [SmoothedLoss(), Checkpoint(folder, every_steps=2, keep_last=2, best="valid_loss", keep_best=2)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    return st.Trainer(model, optimizer, F.cross_entropy, phases, callbacks=callbacks, epochs=4, device=device, seed=0)


def outcome(folder: Path) -> dict[str, Any]:
    """What the folder holds, comparable between runs (run ids differ): logs, and each best copy's epoch and weights."""
    best = {}
    for path in sorted(folder.glob("best*.safetensors")):
        tree = read_tree(path)
        best[path.name] = (tree["position"]["epochs_done"], tree["machine"]["state"],
                           [value.clone() for value in tree["step"]["model"].values()])  # fmt: skip
    logs = {name: (folder / name).read_bytes() for name in ("log.csv", "log_batches.csv") if (folder / name).exists()}
    return {**logs, "checkpoints": [path.name for path in checkpoint_files(folder)], "best": best}


def same(left: dict[str, Any], right: dict[str, Any]) -> bool:
    if {key: value for key, value in left.items() if key != "best"} != {
            key: value for key, value in right.items() if key != "best"}:  # fmt: skip
        return False
    if left["best"].keys() != right["best"].keys():
        return False
    return all(left["best"][name][:2] == right["best"][name][:2]
               and all(torch.equal(a, b) for a, b in zip(left["best"][name][2], right["best"][name][2], strict=True))
               for name in left["best"])  # fmt: skip


def resume(folder: Path, device: torch.device, kept: str) -> None:
    trainer = build(folder, device, kept)
    trainer.load_checkpoint(folder)
    if trainer.finished:
        with pytest.warns(UserWarning, match="already finished"):
            trainer.fit()
    else:
        trainer.fit()


@pytest.fixture
def fast_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder in memory where there is one (fsync is then nearly free: the test makes thousands), else ``tmp_path``."""
    if not Path("/dev/shm").is_dir():
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(dir="/dev/shm") as folder:
        yield Path(folder)


@pytest.mark.slow
@pytest.mark.parametrize("kept", ["logs", "best"])
def test_a_kill_before_any_file_operation_then_a_resume_leaves_what_the_uninterrupted_run_leaves(
        device, fast_folder, kept):  # fmt: skip
    reference_folder = fast_folder / "reference"
    with KillPoints(reference_folder) as counted:
        build(reference_folder, device, kept).fit()
    reference = outcome(reference_folder)
    if kept == "logs":
        assert b",valid_loss" in reference["log_batches.csv"].splitlines()[0]  # the batch log gained a column
    else:
        assert len(reference["best"]) == 3  # best.safetensors and two best-epoch files, after others dropped out
    failures = []
    for kill_at in range(1, counted.seen + 1):
        folder = fast_folder / f"kill{kill_at:03d}"
        with pytest.raises(Killed), KillPoints(folder, kill_at):
            build(folder, device, kept).fit()
        try:
            resume(folder, device, kept)
        except Exception as error:  # noqa: BLE001 -- reported with the kill point
            failures.append(f"{kill_at}: {error!r}"[:200])
            continue
        if not same(outcome(folder), reference):
            failures.append(f"{kill_at}: another outcome")
    assert not failures, f"of {counted.seen} kill points, these resumed wrongly: {failures}"
