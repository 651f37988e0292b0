"""Hundreds of damaged or forged checkpoints: each is refused with CheckpointError or loads the original state.

Damaged files (cut, bit-flipped, edited headers) fail their checksum or their
format. Forged ones carry a valid checksum, so only the parts' own checks stand
between them and the trainer: states whose optimizer, settings, metrics,
callbacks or generators are of the wrong kind, shape, dtype or range, each
refused with a ``CheckpointError`` that names the part and the key, before
anything is loaded.
"""

from __future__ import annotations

import copy
import io
import json
import math
import pickle
import random
import struct
import zipfile
from collections.abc import Callable
from typing import Any

import pytest
import torch
from safetensors.torch import save as save_safetensors
from torch import nn
from torch.nn import functional as F
from torch.utils._pytree import keystr, tree_flatten_with_path
from torch.utils.data import DataLoader, TensorDataset

import statetrainer as st
from statetrainer.callbacks import Accuracy, EarlyStopping, OneCycle, SmoothedLoss, StopOnNonFinite, TorchScheduler
from statetrainer.checkpoint import CheckpointError, read_tree, serialization
from statetrainer.parts import Position
from statetrainer.rng import capture_rng

_GENERATOR = torch.Generator().manual_seed(0)
DATA = TensorDataset(torch.randn(48, 3, generator=_GENERATOR), torch.randint(2, (48,), generator=_GENERATOR))


def build(device: torch.device) -> st.Trainer:
    """A run with a state in every part: Adam's, metrics' accumulators per rank, two schedulers, early stopping."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Linear(8, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    callbacks = [SmoothedLoss(), Accuracy(), OneCycle(1e-2, total_steps=20),
                 TorchScheduler(torch.optim.lr_scheduler.StepLR(optimizer, 2), interval="epoch"),
                 EarlyStopping("train_loss"), StopOnNonFinite()]  # fmt: skip
    return st.Trainer(model, optimizer, F.cross_entropy,
                      [st.Phase("train", DataLoader(DATA, batch_size=6, shuffle=True))], callbacks=callbacks,
                      device=device, seed=3, accumulate=2, deterministic=device.type == "cuda")  # fmt: skip


def fingerprint(trainer: st.Trainer) -> list:
    """Everything a load could change, as plain values: weights, optimizer state and settings, window gradients,
    callback states, metrics and position."""
    state = {"model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
             "grads": [None if p.grad is None else p.grad.clone() for p in trainer.model.parameters()],
             "callbacks": {callback.key: callback.state_dict() for callback in trainer.callbacks},
             "metrics": dict(trainer.metrics), "position": trainer.position.state_dict()}  # fmt: skip
    leaves, _ = tree_flatten_with_path(state, is_leaf=lambda node: node is None)
    flat = [(keystr(path), value.clone() if isinstance(value, torch.Tensor) else value) for path, value in leaves]
    return [*flat, trainer.state, trainer.seed]


def same(left: list, right: list) -> bool:
    return len(left) == len(right) and all(_same(a, b) for a, b in zip(left, right, strict=True))


def _same(left: Any, right: Any) -> bool:
    if isinstance(left, tuple) and isinstance(right, tuple):
        return len(left) == len(right) and all(_same(a, b) for a, b in zip(left, right, strict=True))
    if isinstance(left, torch.Tensor) or isinstance(right, torch.Tensor):
        return isinstance(left, torch.Tensor) and isinstance(right, torch.Tensor) and left.dtype == right.dtype \
            and torch.equal(left, right)  # fmt: skip
    return left == right or (
        isinstance(left, float) and isinstance(right, float) and math.isnan(left) and math.isnan(right)
    )


def mutants(data: bytes, seed: int) -> list[tuple[str, bytes]]:
    """At least 300 damaged or forged versions of a checkpoint file's bytes."""
    choose = random.Random(seed)
    header_length = struct.unpack("<Q", data[:8])[0]
    header_end = 8 + header_length
    out: list[tuple[str, bytes]] = []
    for cut in sorted({0, 1, 7, 8, 9, header_end - 1, header_end, header_end + 1, len(data) - 1,
                       *(choose.randrange(len(data)) for _ in range(60))}):  # fmt: skip
        out.append((f"truncated at {cut}", data[:cut]))
    for region, low, high in (("length", 0, 8), ("header", 8, header_end), ("data", header_end, len(data))):
        for _ in range(80 if region != "length" else 16):
            position, bit = choose.randrange(low, high), choose.randrange(8)
            flipped = bytearray(data)
            flipped[position] ^= 1 << bit
            out.append((f"bit {bit} of byte {position} ({region}) flipped", bytes(flipped)))
    for value in (0, 1, header_length - 1, header_length + 1, len(data), 2**40, 2**64 - 1):
        out.append((f"header length {value}", struct.pack("<Q", value) + data[8:]))
    header = json.loads(data[8:header_end])
    tensor_keys = [key for key in header if key != "__metadata__"]
    for key in tensor_keys[:12]:
        for field, new in (("dtype", "I32"), ("dtype", "F16"), ("shape", [1]), ("data_offsets", [0, 4])):
            edited = dict(header)
            edited[key] = {**header[key], field: new}
            out.append((f"{key}: {field} = {new}", _with_header(edited, data[header_end:])))
    metadata = header["__metadata__"]
    stamp_text, document = metadata["statetrainer"].split("\n", 1)
    stamp = json.loads(stamp_text)
    forged_documents = {
        "deep nesting": "[" * 50_000 + "]" * 50_000,
        "huge number": '{"position": ' + "9" * 5000 + "}",
        "not an object": "[1, 2, 3]",
        "negative batch": document.replace('"batch_index":', '"batch_index":-5,"x":', 1),
        "string epoch": document.replace('"epoch":', '"epoch":"two","y":', 1),
        "empty": "",
        "null": "null",
    }
    for name, forged in forged_documents.items():
        for recompute in (False, True):
            out.append((f"document {name}{' (checksum forged)' if recompute else ''}",
                        _forge(header, data[header_end:], stamp, forged, recompute)))  # fmt: skip
    for name, value in (("format 99", {**stamp, "format": 99}), ("format 1", {**stamp, "format": 1}),
                        ("stamp list", [1]), ("no checksum", {k: v for k, v in stamp.items() if k != "checksum"})):  # fmt: skip
        edited = dict(header)
        edited["__metadata__"] = {"statetrainer": f"{json.dumps(value)}\n{document}"}
        out.append((f"stamp {name}", _with_header(edited, data[header_end:])))
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"model": 1}))
    out += [("a pickle", pickle.dumps({"model": [1, 2]})), ("a torch.save zip", zipped.getvalue()),
            ("empty", b""), ("text", b"hello world\n" * 10)]  # fmt: skip
    return out


def _with_header(header: dict, payload: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + payload


def _forge(header: dict, payload: bytes, stamp: dict, document: str, recompute: bool) -> bytes:
    edited = dict(header)
    new_stamp = dict(stamp)
    if recompute:
        tensors = {}
        for key, spec in header.items():
            if key == "__metadata__":
                continue
            start, end = spec["data_offsets"]
            dtype = {name: dtype for dtype, name in serialization._DTYPES.items()}[spec["dtype"]]
            tensors[key] = torch.frombuffer(bytearray(payload[start:end]) or bytearray(1), dtype=torch.uint8)[
                : end - start].view(dtype).reshape(spec["shape"]) if end > start else torch.empty(spec["shape"], dtype=dtype)  # fmt: skip
        new_stamp["checksum"] = serialization._checksum(document, tensors)
    edited["__metadata__"] = serialization.pack_metadata(new_stamp, document)
    return _with_header(edited, payload)


@pytest.fixture
def original(device: torch.device, tmp_path_factory):
    trainer = build(device)
    while not (trainer.state == "phase" and trainer.batch_index == 4):
        trainer.advance()
    path = trainer.save_checkpoint(tmp_path_factory.mktemp("original") / "ckpt.safetensors")
    loaded = build(device)
    loaded.load_checkpoint(path)
    return path.read_bytes(), fingerprint(loaded)


def test_every_mutant_is_refused_or_loads_the_original_state(original, device: torch.device, tmp_path):
    data, expected = original
    cases = mutants(data, seed=20261127)
    assert len(cases) >= 300
    fresh_fingerprint = fingerprint(build(device))
    outcomes = {"refused": 0, "loaded": 0}
    path = tmp_path / "mutant.safetensors"
    for name, content in cases:
        path.write_bytes(content)
        trainer = build(device)
        try:
            trainer.load_checkpoint(path)
        except CheckpointError:
            outcomes["refused"] += 1
            assert same(fingerprint(trainer), fresh_fingerprint), f"{name}: a refused load changed the trainer"
            continue
        outcomes["loaded"] += 1
        assert same(fingerprint(trainer), expected), f"{name}: loaded, but not the original state"
    assert outcomes["refused"] > 250, outcomes


def test_a_folder_falls_back_past_the_nastiest_mutants_to_the_last_good_checkpoint(original, device: torch.device,
                                                                                  tmp_path):  # fmt: skip
    data, expected = original
    folder = tmp_path / "run"
    folder.mkdir()
    good = folder / "ckpt-000000-epoch0000-step000000002.safetensors"
    good.write_bytes(data)
    nasty = [content for name, content in mutants(data, seed=7)
             if name.startswith(("document deep", "document huge", "header length 2", "a pickle", "a torch.save"))]  # fmt: skip
    for index, content in enumerate(nasty, start=1):
        (folder / f"ckpt-{index:06d}-epoch0000-step000000002.safetensors").write_bytes(content)
    trainer = build(device)
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        assert trainer.load_checkpoint(folder) == good
    assert same(fingerprint(trainer), expected)


# ---------------------------------------------------------------- forged states with a valid checksum

Forgery = tuple[str, str, str, dict]  # what was forged, the part and the key the refusal names, the forged state
NAN, INF = float("nan"), float("inf")


def forged_states(tree: dict, seed: int) -> list[Forgery]:
    """States that read as checkpoints but must not load: each value of the wrong kind, shape, dtype or range.

    Which parameter, rank, shape and dtype each forgery hits is drawn from ``seed``.
    """
    choose = random.Random(seed)
    out: list[Forgery] = []

    def forge(what: str, part: str, key: str, edit: Callable[[dict], dict]) -> None:
        out.append((what, part, key, edit(tree)))

    def put(path: tuple, value: Any) -> Callable[[dict], dict]:
        return lambda state: _edited(state, path, value)

    def drop(path: tuple) -> Callable[[dict], dict]:
        return lambda state: _edited(state, path, _DROPPED)

    optimizer = ("step", "optimizer")
    parameters = sorted(tree["step"]["optimizer"]["state"])

    def some_moment() -> tuple[int, str]:
        return choose.choice(parameters), choose.choice(["exp_avg", "exp_avg_sq"])

    for _ in range(8):  # optimizer state of another shape than its parameter's
        index, key = some_moment()
        shape = tuple(tree["step"]["optimizer"]["state"][index][key].shape)
        wrong = choose.choice([(*shape, 1), (shape[0] + choose.randint(1, 3), *shape[1:]), (), shape[::-1] + (2,)])
        forge(
            f"state[{index}][{key!r}] of shape {wrong}",
            "step",
            f"state[{index}]['{key}']",
            put((*optimizer, "state", index, key), torch.randn(wrong)),
        )
    for _ in range(8):  # ... of another dtype
        index, key = some_moment()
        dtype = choose.choice([torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8,
                               torch.bool])  # fmt: skip
        moment = tree["step"]["optimizer"]["state"][index][key]
        forge(
            f"state[{index}][{key!r}] as {dtype}",
            "step",
            f"state[{index}]['{key}']",
            put((*optimizer, "state", index, key), moment.to(dtype)),
        )
    for value in (0.0, 1, "exp_avg", None, [0.1, 0.2], {"a": 1.0}, True):  # ... not a tensor at all
        index, key = some_moment()
        forge(
            f"state[{index}][{key!r}] = {value!r}",
            "step",
            f"state[{index}]['{key}']",
            put((*optimizer, "state", index, key), value),
        )
    for key in ("step", "exp_avg", "exp_avg_sq"):
        index = choose.choice(parameters)
        forge(
            f"state[{index}] without {key!r}",
            "step",
            f"state[{index}] has no {key}",
            drop((*optimizer, "state", index, key)),
        )
    for value in (torch.tensor(-1.0), torch.tensor(NAN), torch.tensor(INF), -3, "3", True, torch.ones(2),
                  torch.tensor(True), NAN, None):  # fmt: skip
        index = choose.choice(parameters)
        forge(
            f"state[{index}]['step'] = {value!r}",
            "step",
            f"state[{index}]['step']",
            put((*optimizer, "state", index, "step"), value),
        )
    for index in (len(parameters), 99, -1, "0", 2.5):  # state of a parameter the optimizer does not have
        forge(
            f"state for parameter {index!r}",
            "step",
            "optimizer: state holds an entry for",
            put((*optimizer, "state", index), copy.deepcopy(tree["step"]["optimizer"]["state"][parameters[0]])),
        )
    for index in (True, 1.0):  # parameter 1's state under a key that only compares equal to 1
        forge(
            f"state of parameter 1 under {index!r}",
            "step",
            "optimizer: state holds an entry for",
            put(
                (*optimizer, "state"),
                {
                    index if number == 1 else number: value
                    for number, value in tree["step"]["optimizer"]["state"].items()
                },
            ),
        )
    for value in ("bar", NAN, INF):
        index = choose.choice(parameters)
        forge(
            f"state[{index}]['foo'] = {value!r}",
            "step",
            f"state[{index}]['foo']",
            put((*optimizer, "state", index, "foo"), value),
        )

    group = (*optimizer, "param_groups", 0)
    for key, values in (("lr", (-INF, NAN, -1, "0.1", True, None, [0.1], INF)),
                        ("betas", ((1.0, 0.999), (-0.1, 0.9), (0.9,), (NAN, 0.9), "0.9", (0.9, 0.999, 0.5),
                                   (True, 0.999), (0.9, 1.5))),
                        ("eps", (-1e-8, NAN, "1e-8")), ("weight_decay", (-0.01, INF)), ("initial_lr", (-0.01,)),
                        ("amsgrad", (1, "yes", None)), ("foreach", ([1], NAN))):  # fmt: skip
        for value in values:
            forge(
                f"param_groups[0][{key!r}] = {value!r}", "step", f"param_groups[0]['{key}']", put((*group, key), value)
            )
    forge("a setting Adam does not have", "step", "unexpected key(s) 'momentum'", put((*group, "momentum"), 0.9))
    forge("no lr", "step", "no key 'lr'", drop((*group, "lr")))
    count = len(parameters)
    for params in ([0, 0, *range(2, count)], [*range(count - 1), 9], list(range(count - 1)), [-1, *range(1, count)],
                   [0.0, *range(1, count)], [False, True, *range(2, count)], [1, 0, *range(2, count)],
                   "".join(map(str, range(count)))):  # fmt: skip
        forge(
            f"param_groups[0]['params'] = {params!r}",
            "step",
            "param_groups[0]['params']",
            put((*group, "params"), params),
        )
    only = tree["step"]["optimizer"]["param_groups"][0]
    for groups in ([], [only, only], ["x"]):
        forge(
            f"param_groups = {len(groups)} group(s)", "step", "param_groups", put((*optimizer, "param_groups"), groups)
        )

    model = tree["step"]["model"]
    name = choose.choice(sorted(model))
    for value in (0.5, "w", None, model[name].double(), torch.zeros(model[name].shape[::-1] + (1,))):
        forge(f"model[{name!r}] = {type(value).__name__}", "step", name, put(("step", "model", name), value))
    grads = tree["step"]["grads"][0]
    name = choose.choice(sorted(grads))
    for value in (grads[name].double(), 0.0, torch.zeros(grads[name].numel() + 1)):
        forge(
            f"grads[0][{name!r}] = {type(value).__name__}",
            "step",
            f"grads[0]['{name}']",
            put(("step", "grads", 0, name), value),
        )
    for index in (str(len(parameters)), "-1", "01", " 1", "x"):
        forge(
            f"a gradient for {index!r}",
            "step",
            "grads[0] holds a gradient for",
            put(("step", "grads", 0, index), grads[name]),
        )

    for value in ("0.5", [0.5], True, None, {"a": 1.0}, torch.zeros(2), torch.tensor(True)):
        forge(f"metrics['train_loss'] = {value!r}", "metrics", "train_loss", put(("metrics", "train_loss"), value))
    forge("a metric named 1", "metrics", "a metric's name is 1", put(("metrics", 1), 0.5))
    forge("metrics as a list", "metrics", "the saved metrics", put(("metrics",), [0.5]))

    callbacks = ("callbacks",)
    loss = (*callbacks, "SmoothedLoss", "ranks", 0)
    for key, values in (("average", (torch.zeros(2), torch.zeros((), dtype=torch.float64),
                                     torch.zeros((), dtype=torch.int64), 0.5, "0.5")),
                        ("exact", (1, "yes", None)), ("samples", (-1, 1.5, True, "3", 2**70)),
                        ("batches", (-3, "4", 2.5)), ("active", (1, None))):  # fmt: skip
        for value in values:
            forge(
                f"SmoothedLoss[{key!r}] = {value!r}",
                "callbacks",
                f"SmoothedLoss: rank 0: {key}",
                put((*loss, key), value),
            )
    forge(
        "SmoothedLoss without its average",
        "callbacks",
        "SmoothedLoss: rank 0: the saved state has no key 'average'",
        drop((*loss, "average")),
    )
    forge(
        "SmoothedLoss with a key of its own",
        "callbacks",
        "SmoothedLoss: rank 0: the saved state has unexpected",
        put((*loss, "extra"), 1),
    )
    forge("SmoothedLoss with no ranks", "callbacks", "SmoothedLoss", put((*callbacks, "SmoothedLoss", "ranks"), []))
    saved_rank = tree["callbacks"]["SmoothedLoss"]["ranks"][0]
    forge(
        "a second rank of SmoothedLoss forged",
        "callbacks",
        "SmoothedLoss: rank 1: samples",
        put((*callbacks, "SmoothedLoss", "ranks"), [saved_rank, {**saved_rank, "samples": -2}]),
    )
    accuracy = (*callbacks, "Accuracy", "ranks", 0)
    total = tree["callbacks"]["Accuracy"]["ranks"][0]["total"]
    for key, value in (("correct", torch.tensor(3.0)), ("correct", torch.zeros(1, dtype=torch.int64)),
                       ("correct", torch.tensor(total + 1)), ("correct", torch.tensor(-1)), ("total", -1),
                       ("total", 2.5), ("total", True)):  # fmt: skip
        forge(f"Accuracy[{key!r}] = {value!r}", "callbacks", f"Accuracy: rank 0: {key}", put((*accuracy, key), value))
    for value in (-1, 1, 2.5, True, "20", None):
        forge(
            f"OneCycle total_steps = {value!r}",
            "callbacks",
            "OneCycle: total_steps",
            put((*callbacks, "OneCycle", "total_steps"), value),
        )
    forge(
        "OneCycle with a key of its own",
        "callbacks",
        "OneCycle: the saved state has unexpected",
        put((*callbacks, "OneCycle", "cycle"), 2),
    )
    scheduler = (*callbacks, "TorchScheduler", "scheduler")
    for key, values in (("last_epoch", (-3, 2.5, True, "0")), ("_step_count", (-1, 1.5)),
                        ("base_lrs", ([-0.1], [NAN], ["x"], [], [0.01, 0.01])), ("gamma", ("0.1", INF)),
                        ("_is_initial", (1,))):  # fmt: skip
        for value in values:
            forge(f"StepLR[{key!r}] = {value!r}", "callbacks", "TorchScheduler: ", put((*scheduler, key), value))
    forge(
        "StepLR given an optimizer",
        "callbacks",
        "TorchScheduler: scheduler is not laid out",
        put((*scheduler, "optimizer"), {}),
    )
    forge(
        "StepLR without step_size",
        "callbacks",
        "TorchScheduler: scheduler is not laid out",
        drop((*scheduler, "step_size")),
    )
    stopping = (*callbacks, "EarlyStopping")
    for key, values in (("best", (NAN, "inf", True, None, [1.0])), ("bad_checks", (-1, 1.5, True, "0")),
                        ("checked_this_epoch", (0, "no", None))):  # fmt: skip
        for value in values:
            forge(
                f"EarlyStopping[{key!r}] = {value!r}",
                "callbacks",
                f"EarlyStopping: {key}",
                put((*stopping, key), value),
            )
    forge(
        "EarlyStopping without best",
        "callbacks",
        "EarlyStopping: the saved state has no key 'best'",
        drop((*stopping, "best")),
    )
    forge(
        "StopOnNonFinite with a state",
        "callbacks",
        "StopOnNonFinite: the saved state has unexpected",
        put((*callbacks, "StopOnNonFinite", "x"), 1),
    )

    rank = ("rng", "ranks", 0)
    words = len(tree["rng"]["ranks"][0]["python"]["state"])
    word = choose.randrange(words - 1)
    keys = tree["rng"]["ranks"][0]["numpy"]["keys"]
    generator = tree["rng"]["ranks"][0]["torch"]
    for path, value, key in (
        (("python", "version"), 2, "python['version']"),
        (("python", "state", word), 2**32, f"python['state'][{word}]"),
        (("python", "state", words - 1), words, f"python['state'][{words - 1}]"),
        (("python", "state"), [0] * (words - 1), "python['state']"),
        (("python", "gauss"), "x", "python['gauss']"),
        (("numpy", "kind"), "PCG64", "numpy['kind']"),
        (("numpy", "keys"), keys[:5], "numpy['keys']"),
        (("numpy", "keys"), keys.to(torch.int32), "numpy['keys']"),
        (("numpy", "keys"), keys.clone().index_fill_(0, torch.tensor([choose.randrange(len(keys))]), -1), "numpy['keys']"),
        (("numpy", "position"), 700, "numpy['position']"),
        (("numpy", "has_gauss"), 2, "numpy['has_gauss']"),
        (("numpy", "cached"), NAN, "numpy['cached']"),
        (("torch",), generator[:-1], "torch"),
        (("torch",), torch.zeros_like(generator), "torch"),
        (("torch",), generator.to(torch.int32), "torch"),
        (("cuda",), ["x"], "cuda[0]"),
    ):  # fmt: skip
        forge(f"rng {key} = {type(value).__name__}", "rng", f"ranks[0]: {key}", put((*rank, *path), value))
    for value in ("3", True, 2**70):
        forge(f"seed = {value!r}", "rng", "seed", put(("rng", "seed"), value))
    for value in ("", 5, "\x1b[2Jrun"):
        forge(f"run id {value!r}", "run", "id", put(("run", "id"), value))
    forge("a position past any count", "position", "global_step", put(("position", "global_step"), 2**70))
    return out


_DROPPED = object()


def _edited(tree: Any, path: tuple, value: Any) -> Any:
    """A copy of ``tree`` with ``value`` at ``path`` (the key deleted for ``_DROPPED``), sharing all it does not
    change with ``tree``: the dicts and lists along the path are new."""
    if not path:
        return value
    changed = copy.copy(tree)
    if len(path) == 1 and value is _DROPPED:
        del changed[path[0]]
    else:
        changed[path[0]] = _edited(tree[path[0]] if len(path) > 1 else None, path[1:], value)
    return changed


def forged_file(tree: dict) -> bytes:
    """``tree`` as ``write_tree`` writes it, checksum and all, but as bytes (no fsync: hundreds are written)."""
    flatten = serialization._Flattener()
    document = json.dumps(flatten(tree, ""), separators=(",", ":"))
    header = {"format": serialization.FORMAT_VERSION, "library": st.__version__,
              "checksum": serialization._checksum(document, flatten.tensors)}  # fmt: skip
    return save_safetensors(flatten.tensors, metadata=serialization.pack_metadata(header, document))


def generator_states() -> tuple:
    """This process's Python, NumPy and torch generator states."""
    state = capture_rng()
    return state["python"], tuple(state["numpy"].values()), state["torch"]


def same_generator_states(left: tuple, right: tuple) -> bool:
    return left[0] == right[0] and left[1][0] == right[1][0] and torch.equal(left[1][1], right[1][1]) \
        and left[1][2:] == right[1][2:] and torch.equal(left[2], right[2])  # fmt: skip


def test_every_forged_state_with_a_valid_checksum_is_refused_naming_its_part_and_key_and_changes_nothing(
        original, device: torch.device, tmp_path):  # fmt: skip
    data, _ = original
    source = tmp_path / "original.safetensors"
    source.write_bytes(data)
    cases = forged_states(read_tree(source), seed=20261203)
    assert len(cases) >= 150
    path = tmp_path / "forged.safetensors"
    path.write_bytes(forged_file(read_tree(source)))
    build(device).load_checkpoint(path)  # the forger's own writing, unforged, loads
    problems = []
    trainer = build(device)  # refused loads change nothing, so one trainer takes them all
    before, generators_before = fingerprint(trainer), generator_states()
    for what, part, key, forged in cases:
        path.write_bytes(forged_file(forged))
        try:
            trainer.load_checkpoint(path)
        except CheckpointError as error:
            message = str(error)
            if not message.startswith(f"{part}: ") or key not in message:
                problems.append(f"{what}: refused, but the message does not name {part!r} and {key!r}: {message}")
        except Exception as error:  # noqa: BLE001 -- what a forged file raises is the finding
            problems.append(f"{what}: raised {type(error).__name__}: {error}")
        else:
            problems.append(f"{what}: loaded")
            trainer = build(device)
            continue
        if not same(fingerprint(trainer), before) or not same_generator_states(generator_states(), generators_before):
            problems.append(f"{what}: refused after changing the trainer")
        if trainer.position != Position() or not same(fingerprint(trainer), before):
            trainer = build(device)  # loaded, or half-loaded: the next forgery gets a new trainer
            before, generators_before = fingerprint(trainer), generator_states()
    assert not problems, f"{len(problems)} of {len(cases)} forged states:\n" + "\n".join(problems)
