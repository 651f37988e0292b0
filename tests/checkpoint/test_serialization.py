"""State trees to safetensors and back: round trips, atomicity and every bad file."""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from statetrainer.checkpoint import FORMAT_VERSION, CheckpointError, atomic, read_tree, serialization, write_tree


def sample_tree():
    shared = torch.arange(6.0)
    return {
        "model": {"weight": torch.randn(3, 4), "tied": shared, "tied_again": shared, "bf16": torch.ones(2, dtype=torch.bfloat16)},
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(3)}},
                      "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0], "nesterov": False}]},
        "misc": {"nan": math.nan, "inf": -math.inf, "none": None, "text": "é", "empty": torch.zeros(0)},
        "view": shared[2:4],
    }  # fmt: skip


def test_round_trip_keeps_types_values_and_tuples(tmp_path):
    tree = sample_tree()
    loaded = read_tree(write_tree(tmp_path / "a.safetensors", tree, "test"))
    assert torch.equal(loaded["model"]["weight"], tree["model"]["weight"])
    assert loaded["model"]["bf16"].dtype == torch.bfloat16
    assert loaded["model"]["tied"] is loaded["model"]["tied_again"]  # stored once
    assert torch.equal(loaded["view"], torch.tensor([2.0, 3.0]))
    assert list(loaded["optimizer"]["state"]) == [0]  # integer keys stay integers
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert math.isnan(loaded["misc"]["nan"]) and loaded["misc"]["inf"] == -math.inf
    assert loaded["misc"]["none"] is None and loaded["misc"]["text"] == "é"
    assert loaded["misc"]["empty"].shape == (0,)


def test_unsupported_values_are_named(tmp_path):
    with pytest.raises(TypeError, match="cannot save a set at 'callbacks/x'"):
        write_tree(tmp_path / "a.safetensors", {"callbacks": {"x": {1, 2}}}, "test")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_truncated_file_is_refused(tmp_path):
    path = write_tree(tmp_path / "a.safetensors", sample_tree(), "test")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        read_tree(path)


def test_a_flipped_byte_fails_the_checksum(tmp_path):
    path = write_tree(tmp_path / "a.safetensors", sample_tree(), "test")
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # inside the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        read_tree(path)


def test_two_saves_of_one_state_are_the_same_bytes(tmp_path):
    def state():  # built afresh each time (other dicts, other tensors): the bytes depend on the state alone
        torch.manual_seed(0)
        return sample_tree()

    first = write_tree(tmp_path / "first.safetensors", state(), "test").read_bytes()
    assert all(write_tree(tmp_path / f"{index}.safetensors", state(), "test").read_bytes() == first
               for index in range(5))  # fmt: skip


def test_a_format_2_checkpoint_is_still_read_and_older_formats_are_refused(tmp_path):
    path = write_tree(tmp_path / "a.safetensors", sample_tree(), "test")
    with safe_open(path, framework="pt") as file:
        header_text, document = file.metadata()["statetrainer"].split("\n", 1)
        tensors = {key: file.get_tensor(key).clone() for key in file.keys()}  # noqa: SIM118
    old = tmp_path / "format2.safetensors"  # as statetrainer wrote format 2: the document under a key of its own
    header = {**json.loads(header_text), "format": 2}
    save_file(tensors, old, metadata={"statetrainer": json.dumps(header), "tree": document})
    assert str(read_tree(old)) == str(read_tree(path))
    save_file(tensors, old, metadata={"statetrainer": json.dumps({**header, "format": 1}), "tree": document})
    with pytest.raises(CheckpointError, match="format 1 .*no longer reads"):
        read_tree(old)
    save_file(tensors, old, metadata=serialization.pack_metadata(header, document))  # format 2 in format 3's layout
    with pytest.raises(CheckpointError, match="not laid out as its format"):
        read_tree(old)
    save_file(tensors, old, metadata={"statetrainer": json.dumps({**header, "format": 3})})  # no document
    with pytest.raises(CheckpointError, match="a header but no document"):
        read_tree(old)


def test_newer_format_and_foreign_files_are_refused(tmp_path):
    newer = tmp_path / "newer.safetensors"
    header = {"format": FORMAT_VERSION + 1, "library": "9.9", "checksum": "0"}
    save_file({"x": torch.zeros(1)}, newer, metadata=serialization.pack_metadata(header, "{}"))
    with pytest.raises(CheckpointError, match=f"format {FORMAT_VERSION + 1} .*upgrade statetrainer"):
        read_tree(newer)
    # a newer format may lay its metadata out otherwise: still refused by its number, not as a damaged file
    save_file({"x": torch.zeros(1)}, newer, metadata={"statetrainer": json.dumps(header)})
    with pytest.raises(CheckpointError, match=f"format {FORMAT_VERSION + 1} .*upgrade statetrainer"):
        read_tree(newer)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(1)}, foreign)
    with pytest.raises(CheckpointError, match="not a statetrainer checkpoint"):
        read_tree(foreign)
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        read_tree(tmp_path / "missing.safetensors")


def test_a_failed_write_leaves_the_previous_file(tmp_path, monkeypatch):
    path = write_tree(tmp_path / "a.safetensors", {"x": torch.ones(2)}, "test")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_tree(path, {"x": torch.zeros(2)}, "test")
    assert torch.equal(read_tree(path)["x"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_saving_and_loading_never_pickle(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle was used")

    for name in ("dumps", "dump", "Pickler", "loads", "load", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "save", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    path = write_tree(tmp_path / "a.safetensors", sample_tree(), "test")
    assert read_tree(path)["model"]["weight"].shape == (3, 4)


def test_the_threaded_checksum_of_large_files_matches_the_reader(tmp_path, monkeypatch):
    monkeypatch.setattr(serialization, "_PARALLEL_CHECKSUM_BYTES", 0)  # take the threaded path on a small tree
    tree = sample_tree()
    path = write_tree(tmp_path / "a.safetensors", tree, "test")
    assert torch.equal(read_tree(path)["model"]["weight"], tree["model"]["weight"])
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        read_tree(path)


@pytest.mark.parametrize(
    "make",
    [
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2),
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10),
        lambda opt: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=3),
        lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt),
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.9**step),
        lambda opt: torch.optim.lr_scheduler.SequentialLR(
            opt, [torch.optim.lr_scheduler.LinearLR(opt), torch.optim.lr_scheduler.ExponentialLR(opt, 0.9)], [2]
        ),
    ],
)
def test_torch_optimizer_and_scheduler_states_round_trip(tmp_path, make):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = make(optimizer)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    scheduler.step(1.0) if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) else scheduler.step()
    tree = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    loaded = read_tree(write_tree(tmp_path / "s.safetensors", tree, "test"))
    assert loaded["scheduler"] == tree["scheduler"]
    assert loaded["optimizer"]["param_groups"] == tree["optimizer"]["param_groups"]
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    fresh.load_state_dict(loaded["optimizer"])
    make(fresh).load_state_dict(loaded["scheduler"])


def test_only_half_written_files_of_dead_writers_are_removed(tmp_path):

    from statetrainer.checkpoint import remove_stale_temporaries

    dead = tmp_path / ".ckpt-000001-epoch0000-step000000001.safetensors.999999999.tmp"
    mine = tmp_path / f".ckpt-000002-epoch0000-step000000002.safetensors.{os.getpid()}.tmp"
    other = tmp_path / "notes.tmp"
    for path in (dead, mine, other):
        path.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == [dead]
    assert not dead.exists() and mine.exists() and other.exists()


def test_the_file_is_synced_before_its_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync_path, real_replace = atomic.fsync_path, atomic.os.replace
    monkeypatch.setattr(
        atomic, "fsync_path", lambda path: (events.append(("fsync", Path(path).name)), real_fsync_path(path))
    )
    # the file is fsynced in the writer's private folder, then renamed into place
    monkeypatch.setattr(
        atomic.os, "replace", lambda a, b: (events.append(("rename", Path(b).name)), real_replace(a, b))
    )
    write_tree(tmp_path / "a.safetensors", sample_tree(), "test")
    assert events == [("fsync", "a.safetensors"), ("rename", "a.safetensors"), ("fsync", tmp_path.name)]
    assert [path.name for path in tmp_path.iterdir()] == ["a.safetensors"]  # the private folder is gone


def test_a_failed_fsync_fails_the_save_and_keeps_the_previous_file(tmp_path, monkeypatch):
    path = write_tree(tmp_path / "a.safetensors", {"x": torch.ones(2)}, "test")

    def failing_fsync(descriptor: int) -> None:
        raise OSError(5, "Input/output error")  # what a dying disk or a full thin volume reports

    monkeypatch.setattr(atomic.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        write_tree(path, {"x": torch.zeros(2)}, "test")
    monkeypatch.undo()
    assert torch.equal(read_tree(path)["x"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # the unsynced temporary file is gone


def test_an_edited_dtype_or_shape_in_the_header_fails_the_checksum(tmp_path):
    path = write_tree(tmp_path / "a.safetensors", {"x": torch.ones(2, 3), "y": torch.ones(3, 2)}, "test")
    data = path.read_bytes()
    for old, new in ((b'"F32"', b'"I32"'), (b"[2,3]", b"[3,2]")):  # the same sizes: only the checksum can tell
        edited = tmp_path / "edited.safetensors"
        edited.write_bytes(data.replace(old, new, 1))
        with pytest.raises(CheckpointError, match="checksum"):
            read_tree(edited)


def _safetensors_dtypes() -> list[torch.dtype]:
    from safetensors.torch import _TYPES  # the library's own table: the oracle for what the format holds

    return sorted(set(_TYPES.values()), key=str)


@pytest.mark.parametrize("dtype", _safetensors_dtypes(), ids=str)
def test_every_dtype_safetensors_holds_round_trips(tmp_path, dtype):
    values = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    tensor = values.to(dtype) if dtype != torch.bool else values > 2
    path = write_tree(tmp_path / "tree.safetensors", {"tensor": tensor}, "test")
    loaded = read_tree(path)["tensor"]
    assert loaded.dtype == dtype and loaded.shape == tensor.shape
    assert torch.equal(loaded.view(torch.uint8), tensor.view(torch.uint8))  # bit for bit, for any dtype


def test_a_killed_writers_private_folder_is_removed_with_what_is_in_it(tmp_path):
    from statetrainer.checkpoint import remove_stale_temporaries

    leftover = tmp_path / ".ckpt-000003-epoch0000-step000000003.safetensors.999999999.tmp"
    leftover.mkdir()
    (leftover / ".tmpAb12Cd").write_bytes(b"half a safetensors file")  # safetensors' own temporary name
    assert remove_stale_temporaries(tmp_path) == [leftover] and not leftover.exists()


def test_writing_a_name_again_removes_what_a_killed_writer_of_it_left(tmp_path):
    dead = tmp_path / ".metrics.png.999999999.tmp"
    dead.mkdir()
    (dead / "metrics.png").write_bytes(b"half a PNG")
    other = tmp_path / ".lr.png.999999999.tmp"  # another name's leftover: not this writer's business
    other.mkdir()
    with atomic.atomic_write(tmp_path / "metrics.png") as temporary:
        temporary.write_bytes(b"a whole PNG")
    assert (tmp_path / "metrics.png").read_bytes() == b"a whole PNG"
    assert not dead.exists() and other.exists()


def test_a_checkpoint_gets_the_permissions_of_any_new_file(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what open() makes under this process's umask
    path = write_tree(tmp_path / "a.safetensors", {"x": torch.ones(2)}, "test")
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


@pytest.mark.parametrize(
    "tree",
    [
        {"a/b": torch.ones(2), "a": {"b": torch.zeros(2)}},  # the same path once flattened
        {"part": {1: torch.ones(2), "1": torch.zeros(2)}},  # an int and a str key that print alike
        {"x": [torch.ones(1), torch.zeros(0)], "x/1": torch.zeros(0, 3)},  # empty tensors too
    ],
    ids=["slash", "int-and-str", "empty"],
)
def test_keys_that_collide_once_flattened_round_trip(tmp_path, tree):
    loaded = read_tree(write_tree(tmp_path / "a.safetensors", tree, "test"))

    def same(left, right) -> bool:
        if isinstance(left, torch.Tensor):
            return isinstance(right, torch.Tensor) and left.shape == right.shape and torch.equal(left, right)
        if isinstance(left, dict):
            return list(left) == list(right) and all(same(left[key], right[key]) for key in left)
        if isinstance(left, list):
            return len(left) == len(right) and all(same(a, b) for a, b in zip(left, right, strict=True))
        return left == right

    assert same(tree, loaded)


def _forge(path, header=None, document=None) -> None:
    """Rewrite ``path`` with another header or document and a checksum that matches them (a forger's file)."""
    with safe_open(path, framework="pt") as file:
        metadata = file.metadata()
        tensors = {key: file.get_tensor(key).clone() for key in file.keys()}  # noqa: SIM118
    saved_header, saved_document = metadata["statetrainer"].split("\n", 1)
    document = saved_document if document is None else document
    if header is None:
        header = json.loads(saved_header)
        header["checksum"] = serialization._checksum(document, tensors)
    header_text = header if isinstance(header, str) else json.dumps(header)
    save_file(tensors, path, metadata={"statetrainer": f"{header_text}\n{document}"})


@pytest.mark.parametrize(
    ("header", "document", "message"),
    [
        ("[1, 2]", None, "header is a list"),
        ('{"format": 3, "checksum": "00"}', None, "checksum"),
        (None, "[" * 100_000 + "]" * 100_000, "corrupted|nests deeper"),
        (None, "[" * 70 + "]" * 70, "nests deeper than 64"),
        (None, '{"x": ' + "9" * 5000 + "}", "corrupted: a number with 5000 digits"),
        (None, '{"x": {"__tensor__": "no such tensor"}}', "does not describe a state tree"),
        (None, '{"x": {"__items__": 5}}', "does not describe a state tree"),
    ],
    ids=["header-not-object", "bad-checksum", "deep-100000", "deep-70", "huge-number", "dangling-tensor", "bad-items"],
)
def test_a_forged_document_raises_checkpoint_error(tmp_path, header, document, message):
    path = write_tree(tmp_path / "a.safetensors", {"x": torch.ones(2)}, "test")
    _forge(path, header, document)
    with pytest.raises(CheckpointError, match=message):
        read_tree(path)


@pytest.mark.parametrize(
    ("code", "advice"), [(28, "the disk is full"), (30, "the file system is read-only"), (13, "permission denied")]
)
def test_a_failed_save_names_the_file_and_what_to_do_and_keeps_the_previous_one(tmp_path, monkeypatch, code, advice):
    path = write_tree(tmp_path / "a.safetensors", {"x": torch.ones(2)}, "test")

    def failing_fsync(descriptor: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(atomic.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match=f"could not write {path}: {advice}") as raised:
        write_tree(path, {"x": torch.zeros(2)}, "test")
    assert raised.value.errno == code
    monkeypatch.undo()
    assert torch.equal(read_tree(path)["x"], torch.ones(2))


def test_an_io_error_inside_safetensors_writer_is_an_os_error_with_the_path(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(serialization, "save_file", full_disk)
    with pytest.raises(OSError, match="could not write .*b.safetensors: the disk is full") as raised:
        write_tree(tmp_path / "b.safetensors", {"x": torch.ones(2)}, "test")
    assert raised.value.errno == 28 and not list(tmp_path.iterdir())
