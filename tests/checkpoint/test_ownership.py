"""One run per folder, one live process per run: nothing of a run's is touched by another run or a second copy."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import statetrainer as st
from statetrainer.callbacks import Checkpoint, CSVLogger, SmoothedLoss, TensorBoardLogger
from statetrainer.checkpoint import CheckpointError, FolderLock, checkpoint_files, run_of, set_aside

REPOSITORY = Path(__file__).resolve().parents[2]


def batches(count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 4, generator=generator), torch.randint(0, 3, (4,), generator=generator))
            for _ in range(count)]  # fmt: skip


def build(callbacks: list[st.Callback], device: torch.device, seed: int = 0, epochs: int = 2,
          train: object = None) -> st.Trainer:  # fmt: skip
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    phases = [
        st.Phase("train", batches(4, 0) if train is None else train),
        st.Phase("valid", batches(2, 1), grad=False),
    ]
    return st.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, phases,
                      callbacks=callbacks, epochs=epochs, device=device, seed=seed)  # fmt: skip


def logged_run(folder: Path, device: torch.device, seed: int = 0, extra: tuple[st.Callback, ...] = (),
               **checkpoint: object) -> st.Trainer:  # fmt: skip
    return build([SmoothedLoss(), CSVLogger(folder / "log.csv", every_batches=1),
                  TensorBoardLogger(folder / "tb", every_steps=1), Checkpoint(folder, **checkpoint), *extra],
                 device, seed)  # fmt: skip


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (but the lock, whose holder changes) and its bytes."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file() and path.name != ".statetrainer.lock"}  # fmt: skip


def test_a_second_run_in_a_finished_runs_folder_is_refused_before_it_touches_a_file(device, tmp_path):
    folder = tmp_path / "out"
    logged_run(folder, device).fit()
    before = snapshot(folder)
    assert {"log.csv", "log_batches.csv", "run.json"} <= set(before) and any(name.startswith("tb/") for name in before)
    with pytest.raises(CheckpointError, match="holds another run's files"):
        logged_run(folder, device).fit()  # the same script without load_checkpoint (a reused --out)
    assert snapshot(folder) == before  # no log emptied, no TensorBoard point purged
    again = logged_run(folder, device)
    assert again.load_checkpoint(folder) is not None  # the first run still resumes
    with pytest.warns(UserWarning, match="already finished"):
        again.fit()
    assert snapshot(folder) == before


def test_a_folder_without_its_run_json_belongs_to_the_run_of_its_newest_checkpoint(device, tmp_path):
    folder = tmp_path / "out"
    build([Checkpoint(folder, every_steps=1, keep_last=3)], device, seed=1).fit()
    (folder / "run.json").unlink()
    before = snapshot(folder)
    with pytest.raises(CheckpointError, match="newest checkpoint belongs to another run"):
        build([Checkpoint(folder, every_steps=1, keep_last=1)], device, seed=2).fit()
    assert snapshot(folder) == before  # nothing pruned, no marker written
    resumed = build([Checkpoint(folder, every_steps=1, keep_last=3)], device, seed=1, epochs=3)
    resumed.load_checkpoint(folder)
    resumed.fit()  # its own run: it claims the folder again and goes on
    assert (folder / "run.json").is_file()


def test_pruning_deletes_only_the_runs_own_checkpoints(device, tmp_path):
    other = build([Checkpoint(tmp_path / "other", every_epochs=1)], device, seed=5, epochs=1).fit()
    stranger = checkpoint_files(tmp_path / "other")[0]
    folder = tmp_path / "out"
    trainer = build([Checkpoint(folder, every_steps=1, keep_last=1)], device, seed=1, epochs=1)
    trainer.advance()  # the run has claimed its folder, and saved nothing yet
    assert (folder / "run.json").is_file() and not checkpoint_files(folder)
    planted = folder / "ckpt-000000-epoch0001-step000000004.safetensors"  # another run's, older than any of ours
    planted.parent.mkdir(exist_ok=True)
    planted.write_bytes(stranger.read_bytes())
    trainer.fit()
    assert planted.exists() and run_of(planted) == other.run.id
    ours = [path for path in checkpoint_files(folder) if path != planted]
    assert len(ours) == 1 and run_of(ours[0]) == trainer.run.id


def test_a_symlink_planted_for_a_log_is_refused_and_its_target_untouched(device, tmp_path):
    folder = tmp_path / "out"
    first = build([SmoothedLoss(), CSVLogger(folder / "log.csv", every_batches=1), Checkpoint(folder, every_steps=2)],
                  device)  # fmt: skip
    first.run_until("phase", phase="train", batch=2)
    first.save_checkpoint(folder)
    first.advance(6)  # more rows, after the checkpoint
    victim = tmp_path / "precious.txt"
    victim.write_text("the user's own file\n" * 50)
    (folder / "log_batches.csv").unlink()
    (folder / "log_batches.csv").symlink_to(victim)
    resumed = build([SmoothedLoss(), CSVLogger(folder / "log.csv", every_batches=1), Checkpoint(folder, every_steps=2)],
                    device)  # fmt: skip
    model_before = [parameter.detach().clone() for parameter in resumed.model.parameters()]
    with pytest.raises(CheckpointError, match="log_batches.csv is not a regular file"):
        resumed.load_checkpoint(folder)
    assert victim.read_text() == "the user's own file\n" * 50
    assert resumed.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(model_before, resumed.model.parameters(), strict=True))


def test_a_log_replaced_by_a_symlink_during_a_run_is_not_written_through(device, tmp_path):
    class PlantLink(st.Callback):
        def on_exit_epoch(self, trainer):
            if trainer.epoch == 1:  # the log has its header and first row: the next row is appended
                (tmp_path / "out" / "log.csv").unlink()
                (tmp_path / "out" / "log.csv").symlink_to(victim)

    victim = tmp_path / "precious.txt"
    victim.write_text("keep me\n")
    trainer = build([SmoothedLoss(), PlantLink(), CSVLogger(tmp_path / "out" / "log.csv")], device)
    with pytest.raises(OSError, match="is a symbolic link"):
        trainer.fit()
    assert victim.read_text() == "keep me\n"


def wait_for(path: Path, process: subprocess.Popen, never: str) -> None:
    """Wait until ``process`` (still running, its output piped) makes ``path``; fail with ``never`` after 120 s."""
    deadline = time.monotonic() + 120
    while not path.exists():
        assert process.poll() is None, process.stdout.read().decode()
        assert time.monotonic() < deadline, never
        time.sleep(0.1)


SECOND_COPY = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    sys.path.insert(0, {tests!r})
    from checkpoint.test_ownership import logged_run
    import statetrainer as st

    folder, device = Path(sys.argv[1]), torch.device(sys.argv[2])

    class Hold(st.Callback):
        def on_exit_batch(self, trainer):
            if trainer.global_step == 2:
                (folder.parent / "ready").write_text("ready")
                time.sleep(120)  # the first copy, still running when the job is requeued

    trainer = logged_run(folder, device, extra=(Hold(),), every_steps=1)
    trainer.load_checkpoint(folder)
    trainer.fit()
""")


@pytest.mark.slow
def test_a_second_live_copy_is_refused_naming_the_holder_and_a_killed_one_leaves_no_lock(device, tmp_path):
    folder = tmp_path / "out"
    script = tmp_path / "first_copy.py"
    script.write_text(SECOND_COPY.format(tests=str(REPOSITORY / "tests")))
    first = subprocess.Popen([sys.executable, str(script), str(folder), str(device)], cwd=REPOSITORY,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_for(tmp_path / "ready", first, "the first copy never reached its second step")
        before = snapshot(folder)
        second = logged_run(folder, device, every_steps=1)
        with pytest.raises(CheckpointError, match=rf"in use by another live process \(host {socket.gethostname()}, "
                                                  rf"pid {first.pid},"):  # fmt: skip
            second.load_checkpoint(folder)
        with pytest.raises(CheckpointError, match=f"pid {first.pid}"):
            second.fit()
        assert snapshot(folder) == before
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    resumed = logged_run(folder, device, every_steps=1)  # the OS released the killed copy's lock
    assert resumed.load_checkpoint(folder) is not None
    resumed.fit()
    rows = (folder / "log_batches.csv").read_text().splitlines()[1:]
    assert len(rows) == len(set(rows)) == 2 * (4 + 2)  # every batch logged once


def test_set_aside_is_refused_while_a_live_process_holds_the_folder(tmp_path):
    folder = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from statetrainer.checkpoint import FolderLock
        lock = FolderLock(Path({str(folder)!r}))
        print("locked", flush=True)
        time.sleep(120)
    """)], stdout=subprocess.PIPE, cwd=REPOSITORY)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == b"locked"
        (folder / "notes.txt").write_text("a run's file")
        with pytest.raises(CheckpointError, match=f"pid {holder.pid}"):
            set_aside(folder)
        assert (folder / "notes.txt").exists()
    finally:
        holder.kill()
        holder.wait(timeout=60)
    moved = set_aside(folder)
    assert moved is not None and (moved / "notes.txt").exists()
    assert sorted(os.listdir(folder)) == [".statetrainer.lock", "earlier-runs"]  # the lock stays where copies look


KILLED_WITH_WORKERS = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    from torch.utils.data import DataLoader, Dataset
    sys.path.insert(0, {tests!r})
    from checkpoint.test_ownership import build
    from statetrainer.callbacks import Checkpoint

    folder = Path(sys.argv[1])

    class Slow(Dataset):
        def __len__(self):
            return 64
        def __getitem__(self, index):
            if index >= 8:  # a worker busy loading when the main process is killed
                (folder.parent / "loading").write_text("loading")
                time.sleep(60)
            return torch.zeros(4), 0

    build([Checkpoint(folder)], torch.device("cpu"), train=DataLoader(Slow(), batch_size=4, num_workers=2)).fit()
""")


@pytest.mark.slow
def test_a_killed_run_leaves_no_lock_though_its_dataloader_workers_still_run(tmp_path):
    folder = tmp_path / "out"
    script = tmp_path / "killed.py"
    script.write_text(KILLED_WITH_WORKERS.format(tests=str(REPOSITORY / "tests")))
    run = subprocess.Popen([sys.executable, str(script), str(folder)], cwd=REPOSITORY, start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_for(tmp_path / "loading", run, "the workers never started loading")
        run.send_signal(signal.SIGKILL)  # the main process alone: its workers sleep on in their batch
        run.wait(timeout=60)
        lock = FolderLock(folder)  # at once: the lock went with the process that took it
        lock.release()
    finally:
        os.killpg(run.pid, signal.SIGKILL)  # the orphaned workers


def test_a_finished_run_releases_its_folders_and_a_live_trainer_keeps_its_own(device, tmp_path):
    folder = tmp_path / "out"
    trainer = build([SmoothedLoss(), CSVLogger(folder / "log.csv"), Checkpoint(folder)], device)
    trainer.advance()
    with pytest.raises(CheckpointError, match="held by a trainer of this process"):
        set_aside(folder)  # the running trainer would go on writing into a moved folder
    trainer.fit()
    holder = subprocess.run([sys.executable, "-c", f"from pathlib import Path; from statetrainer.checkpoint import "
                             f"FolderLock; FolderLock(Path({str(folder)!r}))"], cwd=REPOSITORY, timeout=120)  # fmt: skip
    assert holder.returncode == 0  # another process may take the folder once the run has finished
    assert set_aside(folder) is not None


def test_writing_into_the_working_folder_is_refused_when_the_trainer_is_built(device, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for callbacks in ([CSVLogger("log.csv")], [Checkpoint(".")], [CSVLogger(tmp_path.parent / "log.csv")]):
        with pytest.raises(ValueError, match="the working folder or one above it"):
            build(callbacks, device)
    assert os.listdir(tmp_path) == []


def test_a_run_begun_before_folders_were_claimed_resumes_with_its_logs_in_another_folder(device, tmp_path):
    folder, logs = tmp_path / "out", tmp_path / "logs"
    first = build([SmoothedLoss(), CSVLogger(logs / "log.csv"), Checkpoint(folder)], device)
    first.fit()
    (logs / "run.json").unlink()  # as a run of the version before left its log folder
    resumed = build([SmoothedLoss(), CSVLogger(logs / "log.csv"), Checkpoint(folder)], device, epochs=3)
    resumed.load_checkpoint(folder)
    resumed.fit()
    assert [line.split(",")[0] for line in (logs / "log.csv").read_text().splitlines()] == ["epoch", "1", "2", "3"]
    with pytest.raises(CheckpointError, match="holds log.csv but no run.json"):  # a fresh run is still refused
        (logs / "run.json").unlink()
        build([SmoothedLoss(), CSVLogger(logs / "log.csv"), Checkpoint(tmp_path / "other")], device).fit()


def test_exporting_an_older_checkpoint_leaves_the_runs_files_as_they_are(device, tmp_path):
    folder = tmp_path / "out"
    build([SmoothedLoss(), CSVLogger(folder / "log.csv"), Checkpoint(folder, keep_last=None)], device, epochs=3).fit()
    before = snapshot(folder)
    older = build([SmoothedLoss(), CSVLogger(folder / "log.csv"), Checkpoint(folder, keep_last=None)], device, epochs=3)
    older.load_checkpoint(checkpoint_files(folder)[0])
    exported = older.save_checkpoint(tmp_path / "export.safetensors")
    assert exported.is_file() and snapshot(folder) == before
    with pytest.raises(CheckpointError, match="exists and is not a checkpoint of this run"):
        (tmp_path / "weights.safetensors").write_bytes(b"the user's own model")
        older.save_checkpoint(tmp_path / "weights.safetensors")
    assert (tmp_path / "weights.safetensors").read_bytes() == b"the user's own model"
    assert older.save_checkpoint(exported) == exported  # its own checkpoint may be written again


@pytest.mark.parametrize(("callback", "key", "value", "named"), [
    ("Checkpoint", "best_value", "0.5", "best_value"), ("Checkpoint", "best_value", float("nan"), "best_value"),
    ("Checkpoint", "best_epoch", 0, "best_epoch"), ("Checkpoint", "best_epoch", 1.5, "best_epoch"),
    ("Checkpoint", "ranked", [[0.5, -1]], "ranked"), ("Checkpoint", "ranked", [["x", 1]], "ranked"),
    ("CSVLogger", "epochs", {"columns": "epoch", "size": 0, "rows": 0}, "columns"),
    ("CSVLogger", "epochs", {"columns": [], "size": -1, "rows": 0}, "size"),
    ("CSVLogger", "batches", {"columns": [], "size": 10**6, "rows": 3}, "holds less than the checkpoint expects"),
    ("TensorBoardLogger", "unconfirmed", {"step/lr": [[1, 2]]}, "unconfirmed"),
    ("TensorBoardLogger", "unconfirmed", {"epoch/x": "1"}, "unconfirmed"),
])  # fmt: skip
def test_a_forged_state_of_a_file_writing_callback_is_refused_before_anything_loads(device, tmp_path, callback, key,
                                                                                    value, named):  # fmt: skip
    from statetrainer.checkpoint import read_tree, write_tree

    folder = tmp_path / "out"
    made = build([SmoothedLoss(), CSVLogger(folder / "log.csv", every_batches=1), TensorBoardLogger(folder / "tb"),
                  Checkpoint(folder, best="train_loss")], device).fit()  # fmt: skip
    state = read_tree(checkpoint_files(folder)[-1])
    state["callbacks"][callback][key] = value
    forged = write_tree(tmp_path / "forged.safetensors", state, st.__version__)  # a valid checksum
    resumed = build([SmoothedLoss(), CSVLogger(folder / "log.csv", every_batches=1), TensorBoardLogger(folder / "tb"),
                     Checkpoint(folder, best="train_loss")], device, epochs=3)  # fmt: skip
    weights = [parameter.detach().clone() for parameter in resumed.model.parameters()]
    before = snapshot(folder)
    with pytest.raises(CheckpointError, match=rf"^callbacks: {callback}: .*{named}"):
        resumed.load_checkpoint(forged)
    assert resumed.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(weights, resumed.model.parameters(), strict=True))
    assert snapshot(folder) == before and made.finished
