"""Hundreds of damaged or forged checkpoints: each is refused with CheckpointError or loads the original state."""

from __future__ import annotations

import io
import json
import pickle
import random
import struct
import zipfile

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import statetrainer as st
from statetrainer.callbacks import Accuracy, SmoothedLoss
from statetrainer.checkpoint import CheckpointError
from statetrainer.checkpoint import serialization

_GENERATOR = torch.Generator().manual_seed(0)
DATA = TensorDataset(torch.randn(48, 3, generator=_GENERATOR), torch.randint(2, (48,), generator=_GENERATOR))


def build(device: torch.device) -> st.Trainer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Linear(8, 2))
    callbacks = [SmoothedLoss(), Accuracy()]
    return st.Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-2), F.cross_entropy,
                      [st.Phase("train", DataLoader(DATA, batch_size=6, shuffle=True))], callbacks=callbacks,
                      device=device, seed=3, accumulate=2, deterministic=device.type == "cuda")  # fmt: skip


def fingerprint(trainer: st.Trainer) -> list:
    """Everything a load could change, as plain values."""
    state = {"model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict()["state"],
             "grads": [None if p.grad is None else p.grad.clone() for p in trainer.model.parameters()]}  # fmt: skip
    flat = []

    def walk(value):
        if isinstance(value, torch.Tensor):
            flat.append(value.clone())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                flat.append(key)
                walk(value[key])
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)
        else:
            flat.append(value)

    walk(state)
    return [*flat, trainer.state, trainer.epoch, trainer.batch_index, trainer.global_step, dict(trainer.metrics)]


def same(left: list, right: list) -> bool:
    return len(left) == len(right) and all(
        torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b for a, b in zip(left, right))


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
    document, stamp = metadata["tree"], json.loads(metadata["statetrainer"])
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
        edited["__metadata__"] = {**metadata, "statetrainer": json.dumps(value)}
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
    edited["__metadata__"] = {**header["__metadata__"], "statetrainer": json.dumps(new_stamp), "tree": document}
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
