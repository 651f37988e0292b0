"""A state tree (nested dicts, lists and tensors) as one safetensors file, and back.

Tensors go into the file's tensor section under path-like keys
(``model/fc.weight``); everything else (numbers, strings, tuples, dicts with
integer keys such as an optimizer's ``state``) goes into a JSON document in the
file's metadata, with each tensor replaced by a reference to its key. Nothing
is pickled, so loading a checkpoint never runs code.

The tensors are written by safetensors' own writer. The metadata has one
entry: a one-line JSON header (format, library version, checksum), a newline,
then the document; one entry because safetensors writes its metadata map in no
fixed order, and one entry makes a state's file the same bytes every time. The
checksum, a CRC-32 over the JSON document and every tensor's name, dtype, shape
and bytes, is checked on load, so a corrupted file is refused instead of
silently loaded.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError
from .atomic import atomic_write

__all__ = ["dtype_from_name", "dtype_name", "pack_metadata", "read_document", "read_header", "read_tree",
           "tensor_bytes", "tensor_crc", "view_key", "write_tree"]  # fmt: skip

# 2: the run's state as registry parts, the checksum covering dtypes and shapes, the document under a key "tree";
# 3: header and document under the one key, so the file's bytes are a function of the state
FORMAT_VERSION = 3
_READABLE_FORMATS = (2, 3)
_METADATA_KEY = "statetrainer"
_FORMAT_2_DOCUMENT_KEY = "tree"
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"


class _Flattener:
    """Splits a tree into a JSON-able document and a flat dict of tensors."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.places: dict[str, str] = {}  # each tensor's place in the tree -> its key in ``tensors``
        self._views: dict[tuple[Any, ...], str] = {}
        self._storages: set[int] = set()

    def __call__(self, tree: Any, path: str) -> Any:
        if isinstance(tree, torch.Tensor):
            self.places[path] = self._tensor(tree.detach(), path)
            return {_TENSOR: self.places[path]}
        if isinstance(tree, dict):
            if all(isinstance(key, str) for key in tree) and not ({_TENSOR, _TUPLE, _ITEMS} & set(tree)):
                return {key: self(value, _join(path, key)) for key, value in tree.items()}
            return {
                _ITEMS: [[_check_key(key, path), self(value, _join(path, str(key)))] for key, value in tree.items()]
            }
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

    def _unique(self, path: str) -> str:
        """``path``, or a numbered variant when another tensor has it (``{"a/b": x, "a": {"b": y}}``, ``1`` and ``"1"``).

        The document refers to every tensor by this key, so any key round-trips.
        """
        unique, number = path, 1
        while unique in self.tensors:
            unique, number = f"{path}#{number}", number + 1
        return unique

    def _tensor(self, tensor: torch.Tensor, path: str) -> str:
        if not tensor.numel():
            path = self._unique(path)
            self.tensors[path] = tensor.to("cpu").contiguous()
            return path
        storage, view = tensor.untyped_storage().data_ptr(), view_key(tensor)
        if view in self._views:  # the same tensor again (tied weights): stored once
            return self._views[view]
        stored = tensor.to("cpu").contiguous()
        if storage in self._storages:  # another view of a stored tensor: safetensors wants its own memory
            stored = stored.clone()
        path = self._unique(path)
        self._views[view] = path
        self._storages.add(storage)
        self.tensors[path] = stored
        return path


def view_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    """What makes two tensors one to a checkpoint (tied weights): storage, offset, shape, strides, dtype, device."""
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()),
            tensor.dtype, tensor.device)  # fmt: skip


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


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes, without a copy."""
    return tensor.reshape(-1).view(torch.uint8).numpy().data


def tensor_crc(tensor: torch.Tensor) -> int:
    """The CRC-32 of a contiguous CPU tensor's bytes."""
    return zlib.crc32(tensor_bytes(tensor)) if tensor.numel() else 0


# torch dtype -> safetensors dtype name (the format's own spelling), for every dtype both know
_DTYPE_NAMES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "complex64": "C64",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
}  # fmt: skip
_DTYPES = {getattr(torch, dtype): name for dtype, name in _DTYPE_NAMES.items() if hasattr(torch, dtype)}
_PARALLEL_CHECKSUM_BYTES = 16 * 2**20


def dtype_name(dtype: torch.dtype) -> str:
    """``dtype`` as safetensors spells it (``F32``)."""
    return _DTYPES[dtype]


def dtype_from_name(name: str) -> torch.dtype | None:
    """The torch dtype safetensors spells ``name``; None for none."""
    return next((dtype for dtype, spelled in _DTYPES.items() if spelled == name), None)


def _tensor_crcs(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """Each tensor's CRC-32, computed in threads for large states (``zlib.crc32`` releases the GIL)."""
    keys = list(tensors)
    total = sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
    if total >= _PARALLEL_CHECKSUM_BYTES:
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            return dict(zip(keys, pool.map(tensor_crc, tensors.values()), strict=True))
    return {key: tensor_crc(tensor) for key, tensor in tensors.items()}


def _checksum(document: str, tensors: dict[str, torch.Tensor], crcs: dict[str, int] | None = None) -> str:
    """The CRC-32 of the document and of every tensor's key, dtype, shape and bytes, as 8 hex digits.

    It covers each tensor's own CRC (``crcs``, computed when not given).
    """
    crcs = _tensor_crcs(tensors) if crcs is None else crcs
    crc = zlib.crc32(document.encode())
    for key in sorted(tensors):
        tensor = tensors[key]
        described = f"{key}\0{_DTYPES.get(tensor.dtype, tensor.dtype)}\0{list(tensor.shape)}\0{crcs[key]:08x}\0"
        crc = zlib.crc32(described.encode(), crc)
    return f"{crc:08x}"


def write_tree(path: str | os.PathLike[str], tree: dict[str, Any], library_version: str,
               crcs: dict[str, int] | None = None) -> Path:  # fmt: skip
    """Write ``tree`` to ``path`` with safetensors' writer, atomically and durably (see ``atomic_write``).

    Args:
        path: The file.
        tree: The state tree.
        library_version: The statetrainer version the header names.
        crcs: Filled with the CRC-32 of each tensor's bytes by its place in ``tree`` (``"model/fc.weight"``),
            as the checksum computed them.
    """
    path = Path(path)
    flatten = _Flattener()
    document = json.dumps(flatten(tree, ""), separators=(",", ":"))
    tensors = flatten.tensors
    for key, tensor in tensors.items():
        if tensor.dtype not in _DTYPES:
            raise TypeError(f"cannot save {key!r}: checkpoints hold the dtypes of safetensors, not {tensor.dtype}")
    tensor_crcs = _tensor_crcs(tensors)
    if crcs is not None:
        crcs.update({place: tensor_crcs[key] for place, key in flatten.places.items()})
    header = {"format": FORMAT_VERSION, "library": library_version,
              "checksum": _checksum(document, tensors, tensor_crcs)}  # fmt: skip
    with atomic_write(path) as temporary:
        try:
            save_file(tensors, temporary, metadata=pack_metadata(header, document))
        except SafetensorError as error:  # safetensors reports the system's I/O errors as its own
            code = re.search(r"os error (\d+)", str(error))
            raise OSError(int(code[1]) if code else errno.EIO, str(error)) from error
    return path


def pack_metadata(header: dict[str, Any], document: str) -> dict[str, str]:
    """The safetensors metadata of a checkpoint with ``header`` and the JSON ``document``: one entry."""
    return {_METADATA_KEY: json.dumps(header) + "\n" + document}


def _unpack_metadata(metadata: dict[str, str], path: Path) -> tuple[dict[str, Any], str]:
    """A checkpoint's header, parsed, and its document's JSON text (either format's layout); not verified. A newer
    format's metadata may be laid out otherwise: its header is returned for ``read_tree`` to refuse by number."""
    if _METADATA_KEY not in metadata:
        raise CheckpointError(f"{path} is a safetensors file but not a statetrainer checkpoint")
    if _FORMAT_2_DOCUMENT_KEY in metadata:
        header_text, newline, document = metadata[_METADATA_KEY], "\n", metadata[_FORMAT_2_DOCUMENT_KEY]
    else:
        header_text, newline, document = metadata[_METADATA_KEY].partition("\n")
    header = _parse(header_text, path, "header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: its checkpoint header is a {type(header).__name__}, not an object")
    newer = isinstance(header.get("format"), int) and header["format"] > FORMAT_VERSION
    if not newline and not newer:
        raise CheckpointError(f"{path}: its checkpoint metadata holds a header but no document")
    return header, document


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The header a checkpoint's metadata holds (``format``, ``library``, ``checksum``), read without its tensors
    and not verified.

    Raises:
        CheckpointError: The file is not a readable statetrainer checkpoint.
    """
    path = _regular_file(path)
    return _unpack_metadata(_metadata(path), path)[0]


def read_document(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A checkpoint's state tree without its tensors (each stands as ``{"__tensor__": key}``), read from the
    metadata alone and not verified: what a folder's bookkeeping reads (whose run, which position) cheaply.

    Raises:
        CheckpointError: The file is not a readable statetrainer checkpoint, or its document is not an object.
    """
    path = _regular_file(path)
    document = _parse(_unpack_metadata(_metadata(path), path)[1], path, "document")
    if not isinstance(document, dict):
        raise CheckpointError(f"{path}: its checkpoint document is a {type(document).__name__}, not an object")
    return document


def _metadata(path: Path) -> dict[str, str]:
    """The safetensors metadata of ``path``, read without its tensors."""
    try:
        with safe_open(path, framework="pt") as file:
            return file.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as error:
        raise CheckpointError(
            f"{path} is not a readable safetensors file (truncated or corrupted?): {error}"
        ) from error


def _regular_file(path: str | os.PathLike[str]) -> Path:
    """``path``, once a ``stat`` (which never blocks) shows a regular file there: opening a FIFO would wait forever."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError:
        raise CheckpointError(f"no checkpoint file at {path}") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path} is not a regular file (a folder, FIFO or device); a checkpoint is a file")
    return path


def read_tree(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and verify a file written by ``write_tree``.

    The tensors are views of the memory-mapped file, so reading costs no copy;
    copy (``statetrainer.saved_state.tensors_to``) what must outlive a change to the file.

    Raises:
        CheckpointError: The file is missing, truncated, corrupted, not a
            statetrainer checkpoint, or from a newer format.
    """
    path = _regular_file(path)
    try:
        with safe_open(path, framework="pt") as file:
            metadata = file.metadata() or {}
            # Views of the mapped file: whatever keeps one past the load copies it (the trainer's parts do).
            tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as error:
        raise CheckpointError(
            f"{path} is not a readable safetensors file (truncated or corrupted?): {error}"
        ) from error
    header, document = _unpack_metadata(metadata, path)
    if not isinstance(header.get("format"), int) or header["format"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {header.get('format')!r} (statetrainer {header.get('library')}); "
            f"this statetrainer reads formats up to {FORMAT_VERSION}: upgrade statetrainer to load it"
        )
    if header["format"] not in _READABLE_FORMATS:
        raise CheckpointError(
            f"{path} has checkpoint format {header['format']} (statetrainer {header.get('library')}), which this "
            f"statetrainer no longer reads (it reads formats {', '.join(map(str, _READABLE_FORMATS))}); finish that "
            "run with the version that wrote it, or start afresh"
        )
    if (header["format"] == 2) != (_FORMAT_2_DOCUMENT_KEY in metadata):
        raise CheckpointError(f"{path}: its metadata is not laid out as its format, {header['format']}, lays it out")
    if _checksum(document, tensors) != header.get("checksum"):
        raise CheckpointError(f"{path} is corrupted: its checksum does not match its contents")
    tree = _parse(document, path, "document")
    try:
        return _unflatten(tree, tensors)
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: its document does not describe a state tree: {error!r}") from error


_MAX_DEPTH = 64  # a run's state nests a handful of levels; a forged document may nest 100,000
_MAX_DIGITS = 40


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_DIGITS:
        raise ValueError(f"a number with {len(text)} digits")
    return int(text)


def _parse(text: str, path: Path, what: str) -> Any:
    """JSON ``text`` with bounded number sizes and nesting; ``CheckpointError`` for anything else."""
    try:
        value = json.loads(text, parse_int=_parse_int)
    except (ValueError, RecursionError) as error:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: its checkpoint {what} is corrupted: {error}") from error
    level, depth = [value], 0
    while level:
        depth += 1
        if depth > _MAX_DEPTH:
            raise CheckpointError(f"{path}: its checkpoint {what} nests deeper than {_MAX_DEPTH} levels")
        level = [child for node in level if isinstance(node, (dict, list))
                 for child in (node.values() if isinstance(node, dict) else node)]  # fmt: skip
    return value
