"""Many processes: the same script under torchrun (gloo on the CPU, NCCL on CUDA), sharded data, exact resume.

Each test launches ``tests/distributed_run.py`` with ``torchrun`` (or plainly, for
one process) under a timeout, so a hang fails the test. Each runs on the CPU
(gloo) and, where there is one, on CUDA: NCCL with a GPU per rank, gloo when
the two ranks share one GPU. ``--standalone`` has each launch's rendezvous on a
free port, so launches may run side by side (pytest-xdist).

A launch takes 5-15 s on two CPU cores, so the default run keeps one case of
each kind: the sharding check (one launch, which inspect's test of a sharded
checkpoint reuses), one rank killed inside an accumulation window (three),
an FSDP2 model trained (two) and killed (three), and predict on 2 ranks
(one); every other case (a stream resumed from 2 ranks on 1, total_steps on 2
ranks, ...) is marked ``slow`` (``pytest -m slow``).
Runs with the same options are launched once per device and shared between
the tests that read them.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils._pytree import tree_leaves

import statetrainer as st
from statetrainer import cli, distributed
from statetrainer.callbacks.goodput import LEDGER_FILE
from statetrainer.checkpoint import CheckpointError, read_tree, shard_files
from statetrainer.diffing import diff_checkpoints
from statetrainer.goodput_report import read_goodput

SCRIPT = Path(__file__).with_name("distributed_run.py")
TIMEOUT = 180


def launch(folder: Path, *options: str, processes: int = 2, device: str = "cpu", check: bool = True,
           logs: Path | None = None, stdin: str | None = None, torchrun: bool = False,
           script: Path = SCRIPT) -> subprocess.CompletedProcess:  # fmt: skip
    """Run ``script`` (the training script) on ``processes`` ranks (torchrun) or in one plain process (unless ``torchrun``: a sharded
    model needs a process group, of one); each rank's output goes to ``logs``."""
    arguments = [str(script), str(folder), "--device", device, *options]
    if processes > 1 or torchrun:
        logs = logs or folder.parent / f"{folder.name}-logs"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   "--log-dir", str(logs), "--redirects", "3", *arguments]  # fmt: skip
    else:
        command = [sys.executable, *arguments]
    environment = {**os.environ, "PYTHONWARNINGS": "ignore::UserWarning"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=environment, input=stdin)
    if check and result.returncode != 0:
        raise AssertionError(f"{command} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}\n"
                             f"{rank_output(logs) if logs else ''}")  # fmt: skip
    return result


def rank_output(logs: Path, rank: int | None = None, stream: str = "stderr") -> str:
    """What ``rank`` (every rank for None) wrote to ``stream`` in the newest launch logged under ``logs``."""
    files = sorted(logs.glob(f"*/attempt_*/{'*' if rank is None else rank}/{stream}.log"), key=os.path.getmtime)
    return "\n".join(path.read_text() for path in files[-(1 if rank is not None else 2) :])


def records(folder: Path) -> list[dict]:
    """Every batch every rank recorded, with its rank; each one's ``trainer.batch_samples`` were the indices its
    samples carry."""
    found = []
    for path in sorted(folder.glob("records-rank*.jsonl")):
        rank = int(path.stem.removeprefix("records-rank"))
        found += [{**json.loads(line), "rank": rank} for line in path.read_text().splitlines()]
    for record in found:
        assert record["batch_samples"] == record["indices"], record
    return found


def samples_of(found: list[dict], epoch: int, phase: str = "train") -> Counter:
    return Counter(index for record in found if (record["epoch"], record["phase"]) == (epoch, phase)
                   for index in record["indices"])  # fmt: skip


def final_state(folder: Path) -> dict:
    return read_tree(folder / "final.safetensors")


def assert_trees_equal(first, second, path: str = "") -> None:
    """Bit for bit: every tensor ``torch.equal``, every other value ``==``."""
    if isinstance(first, torch.Tensor):
        assert isinstance(second, torch.Tensor) and torch.equal(first, second), f"{path} differs"
    elif isinstance(first, dict):
        assert first.keys() == second.keys(), f"{path}: keys {sorted(first)} != {sorted(second)}"
        for key in first:
            assert_trees_equal(first[key], second[key], f"{path}/{key}")
    elif isinstance(first, (list, tuple)):
        assert len(first) == len(second), f"{path}: lengths differ"
        for index, (left, right) in enumerate(zip(first, second, strict=True)):
            assert_trees_equal(left, right, f"{path}/{index}")
    else:
        assert first == second, f"{path}: {first!r} != {second!r}"


KILLERS = ("KillAfter", "TerminateLauncher", "KillWhileWriting")  # the script's callbacks that end a run on purpose


def same_run(first: Path, second: Path) -> None:
    """The two runs ended the same, bit for bit: weights, optimizer, every rank's generators, metrics, CSV log; and
    ``diff`` of their final checkpoints finds nothing but the test's own killers' callbacks."""
    one, two = final_state(first), final_state(second)
    for part in ("step", "metrics", "rng", "position"):
        assert_trees_equal(one[part], two[part], part)
    for callback in ("SmoothedLoss", "Accuracy", "CSVLogger", "Checkpoint"):  # not the test's own killers
        assert_trees_equal(one["callbacks"][callback], two["callbacks"][callback], callback)
    assert (first / "log.csv").read_bytes() == (second / "log.csv").read_bytes()
    found = diff_checkpoints(first / "final.safetensors", second / "final.safetensors")  # the debugging tool agrees
    assert found.tensors["step"] > 0
    assert all(difference.path.startswith(tuple(f"callbacks/{killer}" for killer in KILLERS))
               for difference in found.differences), found.differences  # fmt: skip


SHARDED = ("--samples", "43", "--batch-size", "4", "--workers", "2", "--epochs", "2")
_LAUNCHED: dict[tuple, Path] = {}


def launched_once(tmp_path_factory: pytest.TempPathFactory, *options: str, processes: int = 2,
                  device: str = "cpu") -> Path:  # fmt: skip
    """The folder ``run`` of a run with ``options``, launched once per device (the tests that share it only read
    it); ``{records}`` in ``options`` stands for the folder's sibling ``records``, and each rank's output is in
    the sibling ``logs``."""
    key = (options, processes, device)
    if key not in _LAUNCHED:
        base = tmp_path_factory.mktemp(f"shared-{device}")
        options = tuple(option.format(records=base / "records") for option in options)
        launch(base / "run", *options, processes=processes, device=device, logs=base / "logs")
        _LAUNCHED[key] = base / "run"
    return _LAUNCHED[key]


@pytest.fixture
def sharded(tmp_path_factory, device) -> Path:
    """SHARDED on two ranks, every rank's batches recorded (outside its folder), a checkpoint every 3 steps and
    rank 1 forbidden to write under its folder: the sharding, own-process-group and rank-zero tests read it."""
    return launched_once(tmp_path_factory, *SHARDED, "--every-steps", "3", "--only-rank-zero-writes",
                         "--records", "{records}", device=device.type)  # fmt: skip


def test_two_ranks_see_every_sample_of_every_epoch_exactly_once(sharded):
    found = records(sharded.parent / "records")
    assert {record["rank"] for record in found} == {0, 1}
    for epoch in (0, 1):
        assert samples_of(found, epoch) == Counter(range(43)), f"epoch {epoch}"
        assert samples_of(found, epoch, "valid") == Counter(range(20))
        per_rank = [[r["batch"] for r in found if (r["epoch"], r["phase"], r["rank"]) == (epoch, "train", rank)]
                    for rank in (0, 1)]  # fmt: skip
        assert per_rank[0] == per_rank[1] == list(range(6))  # 43 = 5 global batches of 8 and one of 3
    last = [r["indices"] for r in found if (r["epoch"], r["phase"], r["batch"]) == (0, "train", 5)]
    assert sorted(map(len, last)) == [1, 2]  # the short global batch, split as evenly as it goes
    orders = [[r["indices"] for r in found if (r["epoch"], r["phase"]) == (epoch, "train")] for epoch in (0, 1)]
    assert orders[0] != orders[1]  # shuffled anew each epoch


@pytest.mark.slow
def test_metrics_are_the_same_on_every_rank_and_gradients_sync_once_per_accumulation_window(tmp_path, device):
    records = tmp_path / "records"
    launch(tmp_path / "run", *SHARDED, "--accumulate", "2", "--records", str(records), device=device.type)
    summaries = [json.loads((records / f"summary-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert summaries[0]["metrics"] == summaries[1]["metrics"] and summaries[0]["world_size"] == 2
    assert summaries[0]["global_step"] == 6  # 6 batches per epoch in windows of 2, for 2 epochs
    assert summaries[0]["synced_backwards"] == summaries[1]["synced_backwards"] == 6  # of 12 backward passes


@pytest.mark.slow
def test_a_model_and_process_group_the_script_made_are_used_as_they_are(tmp_path, device, request):
    if device.type == "cuda":
        pytest.skip("the script's own process group is gloo on the CPU")
    ours = request.getfixturevalue("sharded")  # the same run, its process group and DDP made by the trainer
    launch(tmp_path / "own", *SHARDED, "--every-steps", "3", "--own-ddp")
    assert_trees_equal(final_state(tmp_path / "own")["step"], final_state(ours)["step"])


@pytest.mark.slow
def test_two_ranks_train_as_one_process_with_the_same_global_batch(tmp_path, device):
    """Same data, same global batch (2 x 4 against 1 x 8, the last one short and split 1/2): the same run."""
    common = ("--samples", "43", "--epochs", "2", "--optimizer", "adam")
    launch(tmp_path / "two", *common, "--batch-size", "4", device=device.type)
    launch(tmp_path / "one", *common, "--batch-size", "8", processes=1, device=device.type)
    two, one = final_state(tmp_path / "two"), final_state(tmp_path / "one")
    for key, weight in one["step"]["model"].items():
        torch.testing.assert_close(two["step"]["model"][key], weight, rtol=1e-5, atol=1e-6)
    assert two["metrics"].keys() == one["metrics"].keys()
    for name, value in one["metrics"].items():
        assert two["metrics"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


def refused(*args, **kwargs):
    raise AssertionError("a checkpoint was unpickled")


def assert_no_pickle(path: Path) -> None:
    """``path`` is a folder, a text file (JSON, CSV, the lock), or a safetensors file whose header is JSON and whose
    tensors fill the rest exactly: no byte of it is left for a pickle (nor a torch.save zip)."""
    if path.is_dir():
        return
    data = path.read_bytes()
    if path.suffix in (".json", ".csv", ".lock") or path.name.endswith(".jsonl"):
        data.decode("utf-8")
        return
    assert not data.startswith((b"\x80", b"PK")), f"{path} is a pickle or a zip"
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    assert 8 + length + max(ends, default=0) == len(data), f"{path} holds bytes that are no tensor's"


@pytest.mark.slow  # the default run's FSDP2 case is the sharded kill-and-resume below, which trains it too
def test_a_model_sharded_with_fully_shard_trains_on_two_ranks_as_one_process_with_the_same_global_batch(
        tmp_path, device, monkeypatch):  # fmt: skip
    """FSDP2 (``shard_model``: each Linear, then the whole) on 2 ranks with windows of 2 batches, against one plain
    process with the global batch: the same weights and metrics, to float rounding (the gradients are reduced
    and summed in another order)."""
    common = ("--samples", "43", "--epochs", "2", "--optimizer", "adam", "--accumulate", "2", "--blocks", "3")
    launch(tmp_path / "two", *common, "--batch-size", "4", "--fsdp", device=device.type)
    launch(tmp_path / "one", *common, "--batch-size", "8", processes=1, device=device.type)
    two, one = load_file(tmp_path / "two" / "final-model.safetensors"), final_state(tmp_path / "one")
    assert {key.removeprefix("model/") for key in two if key.startswith("model/")} == set(one["step"]["model"])
    for key, weight in one["step"]["model"].items():
        torch.testing.assert_close(two[f"model/{key}"], weight.cpu(), rtol=1e-5, atol=1e-6)
    for name, value in one["metrics"].items():
        assert float(two[f"metrics/{name}"]) == pytest.approx(value, rel=1e-5, abs=1e-6), name
    for path in (tmp_path / "two").rglob("*"):  # every file it wrote is safetensors, JSON or CSV: no pickle
        assert_no_pickle(path)
    # Its sharded checkpoint, assembled in this process (no process group, no unpickling): torch's gathered weights.
    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(module, name, refused)
    exported = st.export_weights(tmp_path / "two" / "final.safetensors", tmp_path / "weights.safetensors")
    assert exported == tmp_path / "two" / "final.safetensors"
    plain = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Dropout(0.0), nn.Linear(16, 3))  # fmt: skip
    st.load_weights(plain, tmp_path / "two" / "final.safetensors")
    for key, value in load_file(tmp_path / "weights.safetensors").items():
        assert torch.equal(value, two[f"model/{key}"]) and torch.equal(plain.state_dict()[key], value), key


@pytest.mark.slow
def test_only_rank_zero_writes_files_and_the_other_ranks_print_nothing(sharded):
    logs = sharded.parent / "logs"  # rank 1 ran with every write under the run's folder refused
    assert rank_output(logs, 1, "stdout") == "" and rank_output(logs, 1, "stderr") == ""
    assert "Epoch:    2 |" in rank_output(logs, 0, "stdout")
    assert sorted(path.name for path in sharded.iterdir()) == [  # the log's folder is claimed by rank 0
        ".statetrainer.lock",
        "checkpoints",
        "final.safetensors",
        "log.csv",
        "run.json",
    ]


KILLED = ("--samples", "40", "--batch-size", "4", "--workers", "2", "--epochs", "2", "--augment", "--dropout", "0.2",
          "--optimizer", "adam", "--accumulate", "2", "--every-steps", "2", "--deterministic")  # fmt: skip


@pytest.fixture
def uninterrupted(tmp_path_factory, device) -> Path:
    """The run the killed and stopped ones must end as, on ``device`` (made once per device)."""
    return launched_once(tmp_path_factory, *KILLED, device=device.type)


@pytest.mark.parametrize("kill", [
    pytest.param("1:0:2", id="rank1-inside-a-window"),  # the default run's torchrun kill
    pytest.param("0:0:3", id="rank0-after-a-step", marks=pytest.mark.slow),
    pytest.param("1:1:4", id="rank1-epoch2", marks=pytest.mark.slow),
])  # fmt: skip
def test_a_rank_killed_anywhere_resumes_bit_identical_with_the_same_torchrun_command(tmp_path, uninterrupted, kill,
                                                                                    device):  # fmt: skip
    folder = tmp_path / "run"
    killed = launch(folder, *KILLED, "--kill", kill, check=False, device=device.type)
    assert killed.returncode != 0 and (folder / "killed").exists()
    launch(folder, *KILLED, "--kill", kill, device=device.type)  # the same command again: it resumes
    same_run(folder, uninterrupted)


@pytest.mark.slow
def test_an_ema_under_torchrun_killed_on_rank_1_resumes_bit_identical_with_its_average(tmp_path, device):
    """EMA(0.9) on 2 ranks with DDP, validation on the average: rank 1 SIGKILLed in epoch 2, the same command
    resumes and ends as the uninterrupted run, the average included (``diff`` of the final checkpoints compares
    every callback's state but the killers')."""
    options = (*KILLED, "--ema")
    launch(tmp_path / "whole", *options, device=device.type)
    folder = tmp_path / "run"
    killed = launch(folder, *options, "--kill", "1:1:2", check=False, device=device.type)
    assert killed.returncode != 0 and (folder / "killed").exists()
    launch(folder, *options, "--kill", "1:1:2", device=device.type)
    same_run(folder, tmp_path / "whole")
    assert read_tree(folder / "final.safetensors")["callbacks"]["EMA"]["updates"] > 0


@pytest.mark.slow
def test_rank1_killed_while_rank0_writes_in_the_background_resumes_bit_identical(tmp_path, uninterrupted, device):
    """Rank 0 writes its checkpoints in the background; its second write is held 2 s, and rank 1 SIGKILLs itself
    meanwhile. Every checkpoint left verifies, and the same command resumes to the end of the synchronous run."""
    folder, options = tmp_path / "run", (*KILLED, "--background", "--slow-write", "2:kill-rank1")
    killed = launch(folder, *options, check=False, device=device.type)
    assert killed.returncode != 0 and (folder / "killed").exists()
    for path in (folder / "checkpoints").glob("ckpt-*.safetensors"):
        read_tree(path)
    launch(folder, *options, device=device.type)
    same_run(folder, uninterrupted)


@pytest.mark.slow
def test_a_sigterm_to_torchrun_with_background_saves_stops_every_rank_and_the_rerun_is_exact(tmp_path, uninterrupted,
                                                                                            device):  # fmt: skip
    """Rank 0's second write is held 2 s, and the SIGTERM comes during it: the stop's save follows the write."""
    folder, logs = tmp_path / "run", tmp_path / "logs"
    options = (*KILLED, "--background", "--slow-write", "2:hold", "--term-at", "0:3")
    stopped = launch(folder, *options, check=False, logs=logs, device=device.type)
    assert stopped.returncode != 0 and (folder / "terminated").exists()
    assert re.search(r"stopped by SIGTERM at epoch \d, phase '\w+', after batch \d+ .*: saved ", rank_output(logs, 0))
    launch(folder, *options, device=device.type)
    same_run(folder, uninterrupted)


@pytest.mark.slow
def test_a_failed_background_write_under_torchrun_ends_every_rank_and_names_the_file(tmp_path, device):
    folder, logs = tmp_path / "run", tmp_path / "logs"
    failed = launch(folder, *KILLED, "--background", "--slow-write", "2:fail", check=False, logs=logs,
                    device=device.type)  # fmt: skip
    assert failed.returncode != 0 and (folder / "writing").exists()
    assert re.search(r"could not write \S+ckpt-000001-\S+\.safetensors: the disk is full", rank_output(logs, 0))
    # rank 1 raised too, at the boundary where the ranks heard of it, or at the next save: not stopped by torchrun
    assert re.search(r"CheckpointError: (another rank's background checkpoint write failed|another rank could not finish "
                     r"the background checkpoint write in flight)", rank_output(logs, 1))  # fmt: skip
    kept = sorted((folder / "checkpoints").glob("ckpt-*.safetensors"))
    assert [read_tree(path)["position"]["global_step"] for path in kept] == [2]  # the first write's, whole


# KILLED's run, sharded, with its loader in the main process (fewer processes to start)
SHARDED_KILLED = ("--samples", "40", "--batch-size", "4", "--epochs", "2", "--augment", "--dropout", "0.2",
                  "--optimizer", "adam", "--accumulate", "2", "--every-steps", "2", "--deterministic", "--fsdp",
                  "--blocks", "3")  # fmt: skip


@pytest.fixture
def uninterrupted_sharded(tmp_path_factory, device) -> Path:
    """The sharded run the killed ones must end as, on ``device`` (made once per device)."""
    return launched_once(tmp_path_factory, *SHARDED_KILLED, device=device.type)


def same_sharded_run(first: Path, second: Path) -> None:
    """``same_run`` for a model sharded with fully_shard: the checkpoint's own parts, and every rank's pieces."""
    same_run(first, second)
    pieces = sorted(path.name for path in first.glob("final.safetensors.rank*"))
    assert pieces == sorted(path.name for path in second.glob("final.safetensors.rank*")) and pieces
    for name in pieces:
        assert_trees_equal(load_file(first / name), load_file(second / name), name)


@pytest.mark.parametrize("kill", [
    pytest.param("1:1:2", id="rank1-epoch2-inside-a-window"),
    pytest.param("0:0:4", id="rank0-in-the-ragged-window", marks=pytest.mark.slow),
])  # fmt: skip
def test_a_sharded_model_killed_anywhere_resumes_bit_identical_from_its_sharded_checkpoint(
        tmp_path, uninterrupted_sharded, device, kill):  # fmt: skip
    """fully_shard on 3 blocks with Adam, windows of 2, 2 ranks: a rank SIGKILLed mid-epoch, then the same command
    resumes from the sharded checkpoint (each rank reading its own pieces) and ends bit-identical: every rank's
    pieces of the weights, Adam's state, generators, metrics and the log."""
    folder = tmp_path / "run"
    killed = launch(folder, *SHARDED_KILLED, "--kill", kill, check=False, device=device.type)
    assert killed.returncode != 0 and (folder / "killed").exists()
    assert list((folder / "checkpoints").glob("ckpt-*.safetensors.rank00001"))  # it resumes from pieces
    launch(folder, *SHARDED_KILLED, "--kill", kill, device=device.type)
    same_sharded_run(folder, uninterrupted_sharded)


@pytest.mark.slow
def test_a_sharded_model_whose_buffers_differ_between_ranks_is_not_saved_as_if_they_were_alike(tmp_path, device):
    """Under FSDP2 each rank's BatchNorm keeps its own running statistics; one copy would resume them all as rank
    0's, so the save is refused on every rank, naming the buffers."""
    folder, logs = tmp_path / "run", tmp_path / "logs"
    failed = launch(folder, *SHARDED_KILLED, "--batchnorm", check=False, logs=logs, device=device.type)
    assert failed.returncode != 0
    for rank in (0, 1):
        assert re.search(r"NotImplementedError: the model's buffers 1\.running_mean, 1\.running_var differ between "
                         r"the ranks", rank_output(logs, rank)), rank_output(logs, rank)  # fmt: skip
    assert not list((folder / "checkpoints").glob("ckpt-*"))


@pytest.mark.slow
def test_a_sigterm_to_a_sharded_run_saves_its_pieces_inside_a_window_and_the_rerun_is_exact(
        tmp_path, uninterrupted_sharded, device):  # fmt: skip
    """The SIGTERM lands in batch 1, so the ranks stop after batch 2, inside the window of batches 2 and 3 (each
    batch's gradients are reduced and sharded): the window's sharded gradients are saved as pieces too, and the
    rerun ends bit-identical."""
    folder, logs = tmp_path / "run", tmp_path / "logs"
    stopped = launch(folder, *SHARDED_KILLED, "--term-at", "0:1", check=False, logs=logs, device=device.type)
    assert stopped.returncode != 0 and (folder / "terminated").exists()
    assert re.search(r"stopped by SIGTERM at epoch \d, phase 'train', after batch \d+ .*: saved ", rank_output(logs, 0))
    newest = sorted((folder / "checkpoints").glob("ckpt-*.safetensors"))[-1]
    saved = read_tree(newest)
    launch(folder, *SHARDED_KILLED, "--term-at", "0:1", device=device.type)
    same_sharded_run(folder, uninterrupted_sharded)
    assert saved["step"]["grads"] != [{}], "the stop came between windows: no gradients were saved"


def without_run_ids(tree: dict) -> dict:
    """A sharded checkpoint's file without what differs between two runs of one command: the run's id, and in the
    index each rank's file's checksum (which covers the run's id in that file)."""
    tree = {**tree, "run": None}
    if "__shards__" in tree:
        tree["__shards__"] = {**tree["__shards__"], "files": None}
    return tree


@pytest.mark.slow
def test_background_saves_of_a_sharded_model_write_the_synchronous_bytes_and_a_killed_run_resumes_exactly(
        tmp_path, uninterrupted_sharded, device):  # fmt: skip
    """The sharded run with ``Checkpoint(background=True)``: each rank stages its pieces and writes them in its
    writer's thread, rank 0 the checkpoint last. Every checkpoint's files hold what the synchronous run's hold (the
    run's id aside), and in one run a background save's files are the bytes of a synchronous save of that state;
    rank 1 SIGKILLed mid-epoch, the same command resumes bit-identical."""
    folder = tmp_path / "background"
    launch(folder, *SHARDED_KILLED, "--background", device=device.type)
    names = sorted(path.name for path in (folder / "checkpoints").glob("ckpt-*"))
    assert names == sorted(path.name for path in (uninterrupted_sharded / "checkpoints").glob("ckpt-*"))
    assert any(".rank" in name for name in names)
    for name in names:
        background, synchronous = folder / "checkpoints" / name, uninterrupted_sharded / "checkpoints" / name
        assert_trees_equal(*(without_run_ids(read_tree(path)) for path in (background, synchronous)), name)
    saved = tmp_path / "one-state"
    launch(saved, *SHARDED_KILLED, "--background", "--save-at", "1:2", device=device.type)  # one run, one state
    for name in ("", ".rank00000", ".rank00001"):
        background = (saved / f"mid-background.safetensors{name}").read_bytes()
        assert background == (saved / f"mid.safetensors{name}").read_bytes(), name
    killed = tmp_path / "killed"
    assert launch(killed, *SHARDED_KILLED, "--background", "--kill", "1:1:2", check=False,
                  device=device.type).returncode != 0  # fmt: skip
    launch(killed, *SHARDED_KILLED, "--background", "--kill", "1:1:2", device=device.type)
    same_sharded_run(killed, uninterrupted_sharded)


@pytest.mark.slow
def test_a_ranks_failed_background_write_of_its_pieces_ends_every_rank_and_no_checkpoint_stands_without_them(
        tmp_path, device):  # fmt: skip
    """Rank 1's second background write of its pieces fails as a full disk: rank 1 raises the OSError, rank 0
    (whose own pieces were written) names rank 1 and writes no checkpoint file, and every checkpoint left in the
    folder verifies with all its pieces."""
    folder, logs = tmp_path / "run", tmp_path / "logs"
    failed = launch(folder, *SHARDED_KILLED, "--background", "--slow-write", "2:fail-rank1", check=False, logs=logs,
                    device=device.type)  # fmt: skip
    assert failed.returncode != 0 and (folder / "writing").exists()
    assert "No space left on device" in rank_output(logs, 1)
    assert re.search(r"CheckpointError: (rank\(s\) 1 could not write their pieces|another rank could not finish)",
                     rank_output(logs, 0))  # fmt: skip
    left = sorted((folder / "checkpoints").glob("ckpt-*.safetensors"))
    assert len(left) == 1  # the first; the second has no checkpoint file
    assert cli.main(["inspect", str(left[0])]) == 0


TRAVELLED = ("--samples", "80", "--batch-size", "4", "--epochs", "3", "--augment", "--dropout", "0.2",
             "--optimizer", "adam", "--every-steps", "4", "--keep-last", "none", "--deterministic")  # fmt: skip
TRAVEL_STEPS = "1,2,3,5,6,7,9,10,12,13,15,16,18,19,21,23,24,26,28,30"  # 20 of the 3 epochs' 30 steps


@pytest.mark.slow
@pytest.mark.parametrize("options", [KILLED, SHARDED_KILLED], ids=["ddp", "fsdp2-sharded"])
def test_report_reads_the_goodput_ledger_of_a_torchrun_run_killed_and_resumed(tmp_path, device, options):
    """Rank 0 SIGKILLed after batch 2 of epoch 2, a checkpoint taken after batch 1: the same command resumes, and
    ``report`` on the checkpoints' folder shows two processes, the second having lost the one batch; without the
    ledger's file it reads the newest checkpoint's ledger (rank 0's file of a sharded checkpoint)."""
    folder = tmp_path / "run"
    killed = launch(folder, *options, "--ledger", "--kill", "0:1:2", check=False, device=device.type)
    assert killed.returncode != 0 and (folder / "killed").exists()
    launch(folder, *options, "--ledger", "--kill", "0:1:2", device=device.type)
    checkpoints = folder / "checkpoints"
    shown = subprocess.run([sys.executable, "-m", "statetrainer", "report", str(checkpoints), "--json"],
                           capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    found = json.loads(shown.stdout)
    per_epoch = 5 + 3  # rank 0's share: 20 of the 40 samples in batches of 4, then 3 validation batches
    assert [(run["batches"], run["lost_batches"]) for run in found["processes"]] == [(per_epoch + 3, 0),
                                                                                     (2 * per_epoch, 1)]  # fmt: skip
    assert found["total"] == pytest.approx(sum(found["seconds"].values()))
    (checkpoints / LEDGER_FILE).unlink()
    report = read_goodput(checkpoints)
    assert report.source.suffix == ".safetensors" and [row.lost_batches for row in report.rows] == [0, 1]
    if "--fsdp" in options:
        assert shard_files(report.source)  # read from rank 0's file of a sharded checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("sharding", [pytest.param((), id="ddp"), pytest.param(("--fsdp", "--blocks", "3"), id="fsdp")])
def test_travel_to_twenty_steps_under_torchrun_equals_the_run_there_on_every_rank(tmp_path, device, sharding):
    """A 3-epoch run on 2 ranks (30 steps, augmentation and dropout, Adam), saved every 4 steps; a new trainer on
    each rank travels to each of 20 steps and equals one uninterrupted replay stopped there: this rank's weights
    (its shards under FSDP2), Adam's state, the batch's loss and output, bit for bit."""
    folder = tmp_path / "run"
    launch(folder, *TRAVELLED, *sharding, device=device.type)
    assert len(list((folder / "checkpoints").glob("ckpt-*.safetensors"))) >= 7
    launch(folder, *TRAVELLED, *sharding, "--travel", TRAVEL_STEPS, device=device.type)
    for rank in range(2):
        found = json.loads((folder / f"travel-rank{rank}.json").read_text())
        assert len(found["steps"]) == 20 and found["differing"] == [], found
        assert sum(name is not None for name in found["started"]) >= 15  # from a checkpoint after step 4


@pytest.mark.slow
@pytest.mark.parametrize("sharding", [pytest.param((), id="ddp"), pytest.param(("--fsdp", "--blocks", "3"), id="fsdp")])
def test_bisect_under_torchrun_finds_the_batch_of_a_planted_nan_on_every_rank(tmp_path, device, sharding):
    """A NaN planted in sample 29 of 80 on 2 ranks (StopOnNonFinite, a checkpoint every 2 steps): the run stops;
    then every rank bisects its checkpoints (sharded ones under FSDP2) and stops at the same batch, the first whose
    global batch held sample 29, which one rank's ``batch_samples`` hold."""
    folder = tmp_path / "run"
    options = ("--samples", "80", "--batch-size", "4", "--epochs", "3", "--augment", "--dropout", "0.2",
               "--optimizer", "adam", "--every-steps", "2", "--keep-last", "none", "--deterministic",
               "--plant-nan", "29", "--records", str(tmp_path / "records"), *sharding)  # fmt: skip
    stopped = launch(folder, *options, check=False, logs=tmp_path / "logs", device=device.type)
    assert stopped.returncode != 0 and "NonFiniteError" in rank_output(tmp_path / "logs")
    first = min(
        (record["epoch"], record["batch"]) for record in records(tmp_path / "records") if 29 in record["indices"]
    )
    launch(folder, *options, "--bisect", device=device.type)
    found = [json.loads((folder / f"bisect-rank{rank}.json").read_text()) for rank in range(2)]
    assert all((entry["epoch"], entry["phase"], entry["batch"]) == (*first[:1], "train", first[1]) for entry in found)
    assert sum(29 in entry["batch_samples"] for entry in found) == 1
    assert all(entry["checkpoint"] is not None and entry["loads"] >= 2 for entry in found)
    listed_apart = launch(folder, *options, "--bisect", "rank1-sees-fewer", check=False, logs=tmp_path / "apart",
                          device=device.type)  # fmt: skip
    assert listed_apart.returncode != 0  # every rank refuses (none waits in a collective for a probe never made)
    for rank in range(2):
        assert "the ranks list different checkpoints" in rank_output(tmp_path / "apart", rank)


def test_inspect_verifies_every_piece_of_a_sharded_checkpoint_and_counts_its_tensors_whole(
        tmp_path, uninterrupted_sharded, capsys):  # fmt: skip
    """``inspect`` of a sharded checkpoint reads both ranks' files, checks each piece against the index, and counts
    each sharded tensor at its global size; rank 0's file in rank 1's place (whole and self-consistent, but not the
    pieces the index names) makes it unusable, naming the file."""
    for path in uninterrupted_sharded.glob("final.safetensors*"):
        shutil.copy(path, tmp_path / path.name)
    checkpoint = tmp_path / "final.safetensors"
    assert cli.main(["inspect", str(checkpoint), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["verified"] and summary["shards"]["world_size"] == 2
    assert [Path(entry["path"]).name for entry in summary["shards"]["files"]] == [
        "final.safetensors.rank00000", "final.safetensors.rank00001"]  # fmt: skip
    index = read_tree(checkpoint)["__shards__"]
    assert all(entry["pieces"] == len(index["tensors"]) for entry in summary["shards"]["files"])
    whole = sum(math.prod(entry["shape"]) * 4 for entry in index["tensors"].values())  # every sharded tensor is F32
    plain = sum(value.numel() * value.element_size() for value in tree_leaves(read_tree(checkpoint)["step"])
                if isinstance(value, torch.Tensor))  # fmt: skip
    assert summary["parts"]["step"]["bytes"] == whole + plain
    shutil.copy(tmp_path / "final.safetensors.rank00000", tmp_path / "final.safetensors.rank00001")
    assert cli.main(["inspect", str(checkpoint)]) == 1
    assert re.search(r"NOT USABLE .*final\.safetensors\.rank00001", capsys.readouterr().out)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(damage, marks=pytest.mark.slow)
        for damage in ("truncated", "another-saves-piece", "another-runs-piece", "no-checkpoint-file")
    ],
)
def test_a_damaged_sharded_checkpoint_is_refused_and_the_folder_falls_back_to_the_previous_whole_one(
        tmp_path, uninterrupted_sharded, device, damage):  # fmt: skip
    """The newest checkpoint of a killed sharded run loses a piece file's end, has another save's piece or a twin
    run's (the same tensors, another run's file), or lost its checkpoint file (its pieces stay): every rank falls
    back to the previous checkpoint, and the run still ends bit-identical."""
    folder, logs = tmp_path / "run", tmp_path / "logs"
    launch(folder, *SHARDED_KILLED, "--kill", "1:1:2", check=False, device=device.type)
    older, newest = sorted((folder / "checkpoints").glob("ckpt-*.safetensors"))[-2:]
    piece = newest.with_name(newest.name + ".rank00001")
    if damage == "truncated":
        piece.write_bytes(piece.read_bytes()[: piece.stat().st_size // 2])
    elif damage == "another-saves-piece":
        piece.write_bytes(older.with_name(older.name + ".rank00001").read_bytes())
    elif damage == "another-runs-piece":  # a twin run's piece of the same checkpoint: the same tensors, not its own
        twin = tmp_path / "twin"
        launch(twin, *SHARDED_KILLED, "--kill", "1:1:2", check=False, device=device.type)
        twins_piece = twin / "checkpoints" / piece.name
        assert_trees_equal(load_file(twins_piece), load_file(piece))
        piece.write_bytes(twins_piece.read_bytes())
    else:
        newest.unlink()
    with pytest.raises(CheckpointError, match="rank00001|no checkpoint file"):  # each piece is checked as read
        st.export_weights(newest, tmp_path / "weights.safetensors")
    launch(folder, *SHARDED_KILLED, "--kill", "1:1:2", logs=logs, device=device.type)
    if damage == "no-checkpoint-file":  # the pieces it left were removed
        assert not list((folder / "checkpoints").glob(f"{newest.name}.rank*"))
    same_sharded_run(folder, uninterrupted_sharded)  # resumed from the previous one: had it loaded the damaged
    # checkpoint, it would have failed, or ended otherwise


@pytest.mark.slow
def test_fsdp2_mixed_precision_is_recorded_in_the_settings_and_a_resume_with_another_is_refused(tmp_path, device):
    """shard_model with a MixedPrecisionPolicy computing in bfloat16: the run trains, its checkpoint's settings name
    the policy of the root and of each block, and loading it into a run sharded without it is refused, naming it."""
    common = ("--samples", "24", "--epochs", "1", "--optimizer", "adam", "--fsdp", "--blocks", "2")
    launch(tmp_path / "bf16", *common, "--param-dtype", "bfloat16", device=device.type)
    recorded = read_tree(tmp_path / "bf16" / "final.safetensors")["settings"]["sharded_precision"]
    assert set(recorded) == {"", "0", "2", "5"}
    assert all(policy.startswith("param_dtype=bfloat16, reduce_dtype=None") for policy in recorded.values())
    refused = launch(tmp_path / "plain", *common, "--resume", str(tmp_path / "bf16" / "final.safetensors"),
                     check=False, logs=tmp_path / "logs", device=device.type)  # fmt: skip
    assert refused.returncode != 0
    assert re.search(
        r"CheckpointError: .*sharded_precision=\{.*bfloat16.* in the checkpoint", rank_output(tmp_path / "logs")
    )


SAVE_MEMORY_MARGIN = 4 * 2**20  # Python objects, the file's JSON header and document, the writer's threads


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures peak memory through Linux's /proc")
def test_no_rank_holds_more_than_its_own_shard_and_one_piece_while_it_saves(tmp_path, device):
    """4 sharded Linear(1024, 1024) blocks with Adam (50 MB in all, 25 MB a rank) on 2 ranks: while the trainer
    saves, no rank's peak memory rises above what it held by more than its largest piece (2 MB) and a 4 MiB margin;
    a save that gathers the model on rank 0 (torch's full state dict) rises by the whole state there, so the bound
    cannot pass a gathering save."""
    folder = tmp_path / "memory"
    folder.mkdir()
    launch(folder, script=SCRIPT.with_name("sharded_save_memory.py"), device=device.type)
    reports = [json.loads((folder / f"memory-rank{rank}.json").read_text()) for rank in range(2)]
    for report in reports:
        bound = report["largest_piece"] + SAVE_MEMORY_MARGIN
        assert bound < report["full_state"] - report["own_shard"]  # what rank 0 would gather does not fit in it
        if device.type == "cuda":  # the pieces are staged on the host: the GPU holds nothing more
            assert report["sharded_save"]["cuda_peak"] <= bound, report
            assert report["sharded_save"]["host_peak"] <= report["own_shard"] + SAVE_MEMORY_MARGIN, report
        else:
            assert report["sharded_save"]["host_peak"] <= bound, report
    assert reports[0]["gathered_save"]["host_peak"] > reports[0]["full_state"] - reports[0]["own_shard"], reports[0]
    assert len(list(folder.glob("sharded.safetensors.rank*"))) == 2


@pytest.mark.slow
@pytest.mark.parametrize(("saved_on", "resumed_on"), [(2, 3), (3, 2), (2, 1), (1, 2)])
def test_a_sharded_checkpoint_loads_on_another_number_of_ranks_exactly(tmp_path, device, saved_on, resumed_on):
    """Saved by 3 sharded blocks with Adam on ``saved_on`` ranks, loaded on ``resumed_on`` (each rank reading its
    new rows from the pieces that hold them): the weights and Adam's state, gathered whole by torch, equal the
    saved ones exactly, and the epoch goes on with each sample once."""
    common = ("--samples", "43", "--batch-size", "4", "--epochs", "2", "--accumulate", "2", "--optimizer", "adam",
              "--fsdp", "--blocks", "3")  # fmt: skip
    first, second = tmp_path / "first", tmp_path / "second"
    launch(first, *common, "--save-at", "0:3", "--records", str(first / "records"), processes=saved_on,
           torchrun=True, device=device.type)  # fmt: skip
    assert len(list(first.glob("mid.safetensors.rank*"))) == saved_on
    launch(second, *common, "--resume", str(first / "mid.safetensors"), "--records", str(second / "records"),
           processes=resumed_on, torchrun=True, device=device.type)  # fmt: skip
    saved, loaded = load_file(first / "saved-full.safetensors"), load_file(second / "loaded-full.safetensors")
    assert saved.keys() == loaded.keys() and any(key.endswith("exp_avg_sq") for key in saved)
    for key, value in saved.items():
        assert torch.equal(value, loaded[key]), key
    assert samples_of(records(first / "records"), 0) + samples_of(records(second / "records"), 0) == Counter(range(43))
    assert final_state(second)["position"]["finished"]


@pytest.mark.slow
def test_a_sigterm_to_torchrun_stops_every_rank_at_one_batch_and_the_rerun_is_exact(tmp_path, uninterrupted, device):
    folder, logs = tmp_path / "run", tmp_path / "logs"
    stopped = launch(folder, *KILLED, "--term-at", "0:3", check=False, logs=logs, device=device.type)
    assert stopped.returncode != 0 and (folder / "terminated").exists()
    assert re.search(r"stopped by SIGTERM at epoch \d, phase '\w+', after batch \d+ .*: saved ", rank_output(logs, 0))
    assert "stopped by" not in rank_output(logs, 1)  # it stopped at the same batch, silently
    launch(folder, *KILLED, "--term-at", "0:3", device=device.type)
    same_run(folder, uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("saved_on", "resumed_on", "save_at"), [(2, 1, "0:2"), (1, 2, "0:3"), (1, 2, "0:6"), (3, 2, "0:3")]
)  # the last: after the epoch's last batch
def test_a_checkpoint_resumes_on_another_number_of_ranks_without_skipping_or_repeating_a_sample(
        tmp_path, tmp_path_factory, saved_on, resumed_on, save_at, device):  # fmt: skip
    """Saved inside an accumulation window (accumulate=2) and resumed on another world size: the remaining samples
    of the epoch are each loaded once, and later epochs keep the seeded order."""
    common = ("--samples", "43", "--batch-size", "4", "--epochs", "2", "--accumulate", "2")
    first, second = tmp_path / "first", tmp_path / "second"
    launch(first, *common, "--save-at", save_at, "--records", str(first / "records"), processes=saved_on,
           device=device.type)  # fmt: skip
    launch(second, *common, "--resume", str(first / "mid.safetensors"), "--records", str(second / "records"),
           processes=resumed_on, device=device.type)  # fmt: skip
    before, after = records(first / "records"), records(second / "records")
    assert samples_of(before, 0) + samples_of(after, 0) == Counter(range(43))
    # An uninterrupted run on the resumed world size (the two cases resumed on 2 ranks share it).
    reference = launched_once(tmp_path_factory, *common, "--records", "{records}", processes=resumed_on,
                              device=device.type)  # fmt: skip
    later = [(r["rank"], r["batch"], r["indices"]) for r in after if r["epoch"] == 1]
    assert later == [(r["rank"], r["batch"], r["indices"]) for r in records(reference.parent / "records")
                     if r["epoch"] == 1]  # fmt: skip
    assert final_state(second)["position"]["finished"]


def stream_order(found: list[dict]) -> list[int]:
    """The training samples in the order the run took them: batch by batch, each global batch rank by rank."""
    train = sorted((r for r in found if r["phase"] == "train"), key=lambda r: (r["epoch"], r["batch"], r["rank"]))
    return [index for record in train for index in record["indices"]]


@pytest.mark.slow
def test_a_stream_saved_on_two_ranks_and_resumed_on_one_sees_each_sample_once_per_pass(tmp_path, device):
    """Epochs of the next 4 batches of a 48-sample loader: 6 global batches a pass on 2 ranks, 12 on 1. Saved on 2
    ranks after epoch 1's first batch (40 samples of pass 1 done) and resumed on 1 process, the run takes pass 1's
    last 8 samples, then goes on into pass 2 within the same epoch."""
    common = ("--samples", "48", "--batch-size", "4", "--epochs", "3", "--train-batches", "4")
    run, before, after = tmp_path / "run", tmp_path / "before", tmp_path / "after"  # one folder: its CSV log goes on
    launch(run, *common, "--save-at", "1:0", "--records", str(before), device=device.type)
    launch(run, *common, "--resume", str(run / "mid.safetensors"), "--records", str(after), processes=1,
           device=device.type)  # fmt: skip
    taken = stream_order(records(before)) + stream_order(records(after))
    assert len(taken) == 5 * 8 + 7 * 4  # 5 global batches of 8 on 2 ranks, then 7 batches of 4
    assert sorted(taken[:48]) == list(range(48))  # the first pass: each sample once
    assert len(set(taken[48:])) == len(taken[48:]) == 20  # the second pass: 5 batches of it, none twice
    assert taken[48:] != taken[:20]  # in a new order
    assert final_state(run)["position"]["global_step"] == 12


@pytest.mark.parametrize(
    "shape",
    [pytest.param(("--train-batches", "5", "--accumulate", "2"), marks=pytest.mark.slow),
     pytest.param(("--limit", "5", "--accumulate", "3"), marks=pytest.mark.slow),
     pytest.param(("--epochs", "none", "--max-steps", "7", "--train-batches", "4"), marks=pytest.mark.slow)],
)  # fmt: skip
def test_total_steps_on_two_ranks_are_the_steps_each_rank_takes(tmp_path, device, shape):
    records_folder = tmp_path / "records"
    launch(tmp_path / "run", "--samples", "43", "--batch-size", "4", *shape, "--records", str(records_folder),
           device=device.type)  # fmt: skip
    summaries = [json.loads((records_folder / f"summary-rank{rank}.json").read_text()) for rank in (0, 1)]
    for summary in summaries:
        assert summary["total_steps"] == summary["global_step"] > 0, summary
    assert summaries[0]["global_step"] == summaries[1]["global_step"]


@pytest.mark.slow  # the default run keeps the DDP kill-and-resume and the sample-once checks as torchrun smoke
def test_predict_on_two_ranks_gives_rank_zero_every_batch_whole_in_the_loaders_order(tmp_path, device):
    """20 validation samples in batches of 4 a rank: global batches of 8, 8 and 4, each rank predicting its share;
    and the same samples as a list of 4 batches, which every rank predicts whole."""
    launch(tmp_path / "run", "--epochs", "1", "--predict", device=device.type)
    found = load_file(str(tmp_path / "run" / "predictions.safetensors"))
    assert found["batches"].tolist() == [8, 8, 4]
    assert found["predicted"].shape == found["expected"].shape == (20, 3)
    # Batches of another size may round differently in the last bit of a matrix product.
    assert torch.allclose(found["predicted"], found["expected"], rtol=0, atol=1e-6)
    assert found["listed_batches"].tolist() == [5, 5, 5, 5]  # a list, not sharded: each batch once, whole
    assert torch.allclose(found["listed"], found["expected"], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_a_checkpoint_of_another_model_is_refused_on_every_rank_without_a_hang(tmp_path, device):
    first, logs = tmp_path / "first", tmp_path / "logs"
    launch(first, "--save-at", "0:1", device=device.type)
    refused = launch(tmp_path / "second", "--hidden", "32", "--resume", str(first / "mid.safetensors"), check=False,
                     logs=logs, device=device.type)  # fmt: skip
    assert refused.returncode != 0
    for rank in (0, 1):
        assert "CheckpointError: the checkpoint does not fit this model" in rank_output(logs, rank)


@pytest.mark.slow
def test_a_breakpoint_under_torchrun_breaks_on_rank_zero_while_the_others_wait(tmp_path, device):
    logs = tmp_path / "logs"
    launch(tmp_path / "run", "--break-at", "0:2", logs=logs, device=device.type,
           stdin="up\np trainer.batch_index\np trainer.world_size\nc\n")  # fmt: skip
    assert "(Pdb) 2\n(Pdb) 2\n" in rank_output(logs, 0, "stdout")  # in the Breakpoint's frame: batch 2, 2 ranks
    assert "Pdb" not in rank_output(logs, 1, "stdout") and (tmp_path / "run" / "final.safetensors").is_file()


def test_gather_tree_gives_each_ranks_tensors_and_numbers_in_the_trees_own_shape(monkeypatch):
    """Without a launch: rank r's leaves are this rank's plus r, as ``gathered_states`` would bring them."""
    monkeypatch.setattr(distributed, "gathered_states", lambda local, ranks, device: [
        [tensor + rank for tensor in local] for rank in range(ranks.world_size)])  # fmt: skip
    tree = {"average": torch.tensor(0.5), "batches": 3, "exact": False, "rate": 0.25, "name": "loss", "none": None,
            "pairs": [(torch.ones(2), 1)], "empty": {}}  # fmt: skip
    assert distributed.gather_tree(tree, distributed.Ranks(), torch.device("cpu"))[0] is tree  # one process
    first, second = distributed.gather_tree(tree, distributed.Ranks(world_size=2), torch.device("cpu"))
    assert_trees_equal(first, tree)
    assert_trees_equal(second, {"average": torch.tensor(1.5), "batches": 4, "exact": True, "rate": 1.25,
                                "name": "loss", "none": None, "pairs": [(torch.full((2,), 2.0), 2)], "empty": {}})  # fmt: skip
    assert type(second["batches"]) is int and type(second["exact"]) is bool and type(second["pairs"][0]) is tuple
