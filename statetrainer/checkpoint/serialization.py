"""A state tree (nested dicts, lists and tensors) as one safetensors file, and back.

Tensors go into the file's tensor section under path-like keys
(``model/fc.weight``); everything else (numbers, strings, tuples, dicts with
integer keys such as an optimizer's ``state``) goes into a JSON document in the
file's metadata, with each tensor replaced by a reference to its key. Nothing
is pickled, so loading a checkpoint never runs code.

A CRC-32 over every tensor's bytes and the JSON document is stored beside them
and checked on load, so a corrupted file is refused instead of silently loaded.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors import safe_open

__all__ = ["FORMAT_VERSION", "CheckpointError", "fsync_path", "read_tree", "write_tree"]

FORMAT_VERSION = 1
_METADATA_KEY = "statetrainer"
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be used; the message says why."""


class _Flattener:
    """Splits a tree into a JSON-able document and a flat dict of tensors."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._views: dict[tuple[Any, ...], str] = {}
        self._storages: set[int] = set()

    def __call__(self, tree: Any, path: str) -> Any:
        if isinstance(tree, torch.Tensor):
            return {_TENSOR: self._tensor(tree.detach(), path)}
        if isinstance(tree, dict):
            if all(isinstance(key, str) for key in tree) and not ({_TENSOR, _TUPLE, _ITEMS} & set(tree)):
                return {key: self(value, _join(path, key)) for key, value in tree.items()}
            return {_ITEMS: [[_check_key(key, path), self(value, _join(path, str(key)))] for key, value in tree.items()]}
        if isinstance(tree, tuple):
            return {_TUPLE: [self(value, _join(path, str(index))) for index, value in enumerate(tree)]}
        if isinstance(tree, list):
            return [self(value, _join(path, str(index))) for index, value in enumerate(tree)]
        if tree is None or isinstance(tree, (bool, int, float, str)):
            return tree
        raise TypeError(
            f"cannot save a {type(tree).__name__} at {path!r}: checkpoint state must be tensors, numbers, "
            "strings, None, and lists, tuples or dicts of them"
        )

    def _tensor(self, tensor: torch.Tensor, path: str) -> str:
        if not tensor.numel():
            self.tensors[path] = tensor.to("cpu").contiguous()
            return path
        storage = tensor.untyped_storage().data_ptr()
        view = (storage, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype,
                tensor.device)  # fmt: skip
        if view in self._views:  # the same tensor again (tied weights): stored once
            return self._views[view]
        stored = tensor.to("cpu").contiguous()
        if storage in self._storages:  # another view of a stored tensor: safetensors wants its own memory
            stored = stored.clone()
        self._views[view] = path
        self._storages.add(storage)
        self.tensors[path] = stored
        return path


def _join(path: str, key: str) -> str:
    return f"{path}/{key}" if path else key


def _check_key(key: Any, path: str) -> Any:
    if key is None or isinstance(key, (bool, int, float, str)):
        return key
    raise TypeError(f"cannot save a dict key of type {type(key).__name__} at {path!r}")


def _unflatten(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict):
        if _TENSOR in tree:
            return tensors[tree[_TENSOR]]
        if _TUPLE in tree:
            return tuple(_unflatten(value, tensors) for value in tree[_TUPLE])
        if _ITEMS in tree:
            return {key: _unflatten(value, tensors) for key, value in tree[_ITEMS]}
        return {key: _unflatten(value, tensors) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_unflatten(value, tensors) for value in tree]
    return tree


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


# torch dtype -> safetensors dtype name (the format's own spelling), for every dtype both know
_DTYPE_NAMES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "complex64": "C64",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
}  # fmt: skip
_DTYPES = {getattr(torch, dtype): name for dtype, name in _DTYPE_NAMES.items() if hasattr(torch, dtype)}
_PLACEHOLDER = "?" * 8


def _write_safetensors(file: Any, tensors: dict[str, torch.Tensor], header: dict[str, Any], document: str) -> None:
    """Write a safetensors file in one pass, the checksum computed while the data is written.

    ``safetensors.torch.save_file`` needs the checksum in its metadata before it
    starts, which would mean reading every tensor twice, and it cannot write to
    a file we fsync; so the (simple, documented) format is written here and read
    back by the ``safetensors`` library itself. The checksum slot is filled in
    at the end.
    """
    layout, offset = {}, 0
    keys = sorted(tensors)
    for key in keys:
        tensor = tensors[key]
        if tensor.dtype not in _DTYPES:
            raise TypeError(f"cannot save {key!r}: checkpoints hold the dtypes of safetensors, not {tensor.dtype}")
        size = tensor.numel() * tensor.element_size()
        layout[key] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    metadata = {_METADATA_KEY: json.dumps({**header, "checksum": _PLACEHOLDER}), "tree": document}
    encoded = json.dumps({"__metadata__": metadata, **layout}, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    file.write(struct.pack("<Q", len(encoded)))
    file.write(encoded)
    pieces = _pieces(tensors)
    checksum = _Checksum(document, pieces, in_background=offset >= _BACKGROUND_CHECKSUM_BYTES)
    for _, data in pieces:
        file.write(data)
    slot = encoded.index(_PLACEHOLDER.encode())
    file.seek(8 + slot)
    file.write(checksum.result().encode())


_BACKGROUND_CHECKSUM_BYTES = 64 * 2**20


def _pieces(tensors: dict[str, torch.Tensor]) -> list[tuple[bytes, Any]]:
    """(key, raw bytes) of every tensor, in the file's order: what the checksum covers."""
    return [(key.encode(), _tensor_bytes(tensors[key]) if tensors[key].numel() else b"") for key in sorted(tensors)]


class _Checksum:
    """The CRC-32 of a document and (key, data) pieces, computed in a thread for large data.

    ``zlib.crc32`` and ``file.write`` both release the GIL on large buffers, so
    on a large checkpoint the checksum costs next to nothing on top of the write.
    """

    def __init__(self, document: str, pieces: list[tuple[bytes, Any]], in_background: bool) -> None:
        self._document, self._pieces, self._value = document, pieces, ""
        self._thread = threading.Thread(target=self._run, daemon=True) if in_background else None
        if self._thread is not None:
            self._thread.start()
        else:
            self._run()

    def _run(self) -> None:
        crc = zlib.crc32(self._document.encode())
        for key, data in self._pieces:
            crc = zlib.crc32(data, zlib.crc32(key, crc))
        self._value = f"{crc:08x}"

    def result(self) -> str:
        if self._thread is not None:
            self._thread.join()
        return self._value


def write_tree(path: str | os.PathLike[str], tree: dict[str, Any], library_version: str) -> Path:
    """Write ``tree`` to ``path`` atomically: a temporary file, fsync, rename, fsync the folder.

    A crash at any instant leaves either the previous file at ``path`` (or none)
    or the complete new one, never a partial file under that name.
    """
    path = Path(path)
    flatten = _Flattener()
    document = json.dumps(flatten(tree, ""), separators=(",", ":"))
    header = {"format": FORMAT_VERSION, "library": library_version}
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            durable = _DurableWriter(file)
            _write_safetensors(durable, flatten.tensors, header, document)
            durable.finish()
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


class _DurableWriter:
    """A file whose data goes to disk while it is still being written.

    Every ``flush_every`` bytes a background ``fdatasync`` starts (it releases
    the GIL), so the disk works while the next tensors are copied; the final
    fsync in ``finish`` then has little left to do.
    """

    flush_every = 256 * 2**20

    def __init__(self, file: Any) -> None:
        self.file = file
        self._unsynced = 0
        self._syncing: threading.Thread | None = None
        self._sync_error: OSError | None = None

    def write(self, data: Any) -> None:
        self.file.write(data)
        self._unsynced += len(data) if not isinstance(data, memoryview) else data.nbytes
        if self._unsynced >= self.flush_every and (self._syncing is None or not self._syncing.is_alive()):
            self.file.flush()
            self._syncing = threading.Thread(target=self._sync_in_background, args=(self.file.fileno(),), daemon=True)
            self._syncing.start()
            self._unsynced = 0

    def seek(self, offset: int) -> None:
        self.file.seek(offset)

    def _sync_in_background(self, descriptor: int) -> None:
        try:
            os.fdatasync(descriptor)
        except OSError as error:  # kept for finish(): a thread's exception would otherwise be lost
            self._sync_error = error

    def finish(self) -> None:
        """Wait for the background sync, fsync the rest; raise ``OSError`` if either failed."""
        if self._syncing is not None:
            self._syncing.join()
        if self._sync_error is not None:
            raise OSError(f"syncing the file to disk failed while it was written: {self._sync_error}") from self._sync_error
        self.file.flush()
        os.fsync(self.file.fileno())


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries (a rename or a new file in it), to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def read_tree(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and verify a file written by ``write_tree``.

    Raises:
        CheckpointError: The file is missing, truncated, corrupted, not a
            statetrainer checkpoint, or from a newer format.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    try:
        with safe_open(path, framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupted?): {error}") from error
    if _METADATA_KEY not in metadata or "tree" not in metadata:
        raise CheckpointError(f"{path} is a safetensors file but not a statetrainer checkpoint")
    try:
        header = json.loads(metadata[_METADATA_KEY])
        document = metadata["tree"]
        tree = json.loads(document)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: its checkpoint metadata is corrupted: {error}") from error
    if not isinstance(header.get("format"), int) or header["format"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {header.get('format')!r} (statetrainer {header.get('library')}); "
            f"this statetrainer reads formats up to {FORMAT_VERSION}: upgrade statetrainer to load it"
        )
    if _Checksum(document, _pieces(tensors), in_background=False).result() != header.get("checksum"):
        raise CheckpointError(f"{path} is corrupted: its checksum does not match its contents")
    return _unflatten(tree, tensors)
