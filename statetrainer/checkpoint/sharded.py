"""Sharded checkpoints of a model sharded with FSDP2: each rank writes its own pieces; no rank gathers the model.

A sharded checkpoint is the checkpoint file a run writes anyway (rank 0's:
the position, settings, generators of every rank, metrics and callbacks), in
which every sharded tensor (a DTensor: the model's parameters, the
optimizer's state, an open window's gradients) stands as ``{"__shard__":
key}``, plus one file per rank beside it, ``<checkpoint>.rank00001``, that
holds that rank's pieces of them and the run's id, written by the same writer
with a checksum of its own. The checkpoint's document carries the index under
``"__shards__"``, covered by its checksum: every sharded tensor's global
shape and dtype, for each rank's piece its offset, size and CRC-32, and each
rank's file's checksum (so another run's file is refused, whatever it holds). The
ranks write their files first; rank 0 writes the checkpoint file last, so a
checkpoint counts only once all of it is durable.

Loading reads, for each sharded tensor, the box this rank now owns (its
``Shard(0)`` rows, or all of a replicated tensor) from the pieces that hold
it, whichever files they are in, checking each piece it reads against the
index: the same number of ranks reads its own file, another number the
pieces its box overlaps. Nothing is unpickled, and no tensor is gathered.
"""

from __future__ import annotations

import glob
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch.utils._pytree import keystr, tree_map_with_path

from ..errors import CheckpointError
from .atomic import atomic_copy
from .serialization import dtype_from_name, dtype_name, read_document, read_header, read_tree, tensor_crc, write_tree

__all__ = ["INDEX", "SHARD", "ShardIndex", "copy_with_pieces", "is_dtensor", "owned_box", "remove_orphan_pieces",
           "remove_shard_files", "shapes_only", "shard_file", "shard_files", "split_shards", "whole_tensors",
           "write_pieces"]  # fmt: skip

SHARD = "__shard__"  # a sharded tensor's place in the checkpoint's document
INDEX = "__shards__"  # the index's key in the checkpoint's document


def shard_file(checkpoint: Path, rank: int) -> Path:
    """The file beside ``checkpoint`` that holds ``rank``'s pieces."""
    return checkpoint.with_name(f"{checkpoint.name}.rank{rank:05d}")


def shard_files(checkpoint: Path) -> list[Path]:
    """The pieces' files beside ``checkpoint`` (with any a killed save left)."""
    return sorted(checkpoint.parent.glob(f"{glob.escape(checkpoint.name)}.rank[0-9]*"))


def remove_shard_files(checkpoint: Path) -> None:
    """Delete the pieces' files of ``checkpoint`` (once it is deleted, or was never written)."""
    for path in shard_files(checkpoint):
        path.unlink(missing_ok=True)


def remove_orphan_pieces(folder: Path) -> None:
    """Delete the pieces' files in ``folder`` whose checkpoint is not there (a save killed before its last file)."""
    for path in folder.glob("*.safetensors.rank[0-9]*") if folder.is_dir() else ():
        if not path.with_name(path.name.rsplit(".", 1)[0]).exists():
            path.unlink(missing_ok=True)


def copy_with_pieces(source: Path, target: Path) -> None:
    """Make ``target`` a durable copy of the checkpoint ``source`` and its pieces' files, the checkpoint last (an older
    ``target`` is deleted first, so it never stands with another checkpoint's pieces)."""
    pieces = shard_files(source)
    if pieces:
        target.unlink(missing_ok=True)
    for piece in pieces:
        atomic_copy(piece, target.with_name(target.name + piece.name.removeprefix(source.name)))
    atomic_copy(source, target)
    kept = {target.name + piece.name.removeprefix(source.name) for piece in pieces}
    for stale in shard_files(target):
        if stale.name not in kept:
            stale.unlink(missing_ok=True)


def is_dtensor(leaf: Any) -> bool:
    """Whether ``leaf`` is a DTensor (without importing torch.distributed where no leaf is one)."""
    return isinstance(leaf, torch.Tensor) and type(leaf).__name__ == "DTensor"


def owned_box(shape: tuple[int, ...], mesh: Any, placements: Any) -> tuple[list[int], list[int]]:
    """The offset and size of the part of a tensor of ``shape`` that this rank holds under ``placements``.

    Raises:
        NotImplementedError: Placements other than sharded on dim 0 or replicated, on a 1-D mesh.
    """
    from torch.distributed.tensor import Replicate, Shard  # noqa: PLC0415 -- for sharded models only
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset  # noqa: PLC0415

    if mesh.ndim != 1 or not all(isinstance(placement, Replicate) or placement == Shard(0)
                                 for placement in placements):  # fmt: skip
        raise NotImplementedError(f"sharded checkpoints hold tensors sharded on dim 0 or replicated on a 1-D mesh "
                                  f"(fully_shard's default), not {placements} on a {mesh.ndim}-D mesh")  # fmt: skip
    size, offset = compute_local_shape_and_global_offset(shape, mesh, placements)
    return list(offset), list(size)


def split_shards(tree: Any) -> tuple[Any, dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """``tree`` with each DTensor replaced by ``{"__shard__": key}``; this rank's pieces by key; and each piece's
    tensor's global shape and dtype and the piece's offset and size in it."""
    pieces: dict[str, torch.Tensor] = {}
    boxes: dict[str, dict[str, Any]] = {}

    def split(path: Any, leaf: Any) -> Any:
        if not is_dtensor(leaf):
            return leaf
        key = keystr(path)
        offset, size = owned_box(tuple(leaf.shape), leaf.device_mesh, leaf.placements)
        pieces[key] = leaf.to_local().detach()
        placement = "replicate" if all(placement.is_replicate() for placement in leaf.placements) else "shard0"
        boxes[key] = {"shape": list(leaf.shape), "dtype": dtype_name(leaf.dtype), "placement": placement,
                      "offset": offset, "size": size}  # fmt: skip
        return {SHARD: key}

    return tree_map_with_path(split, tree), pieces, boxes


def piece_crc(piece: torch.Tensor) -> str:
    """The CRC-32 of a piece's bytes (on any device), as 8 hex digits."""
    return f"{tensor_crc(piece.detach().to('cpu').contiguous()):08x}"


def write_pieces(checkpoint: Path, rank: int, pieces: dict[str, torch.Tensor], library_version: str,
                 run_id: str) -> tuple[dict[str, str], str]:  # fmt: skip
    """Write this rank's pieces of the run ``run_id`` beside ``checkpoint``, atomically and durably; each piece's
    CRC-32 (``piece_crc``), and the file's checksum (which the run's id makes another run's file differ in)."""
    crcs: dict[str, int] = {}
    path = write_tree(shard_file(checkpoint, rank), {"run": run_id, "pieces": pieces}, library_version, crcs)
    return {key: f"{crcs[f'pieces/{key}']:08x}" for key in pieces}, str(read_header(path)["checksum"])


class ShardIndex:
    """A sharded checkpoint's index: each sharded tensor's pieces, and the reading of any box of it.

    Args:
        index: The document's ``"__shards__"`` entry.
        checkpoint: The checkpoint file (the pieces' files are beside it).

    Raises:
        CheckpointError: The index is not one.
    """

    def __init__(self, index: Any, checkpoint: Path) -> None:
        self.checkpoint = checkpoint
        try:
            self.world_size = index["world_size"]
            if not _count(self.world_size) or self.world_size < 1:
                raise ValueError(f"world_size {self.world_size!r}")
            self.tensors: dict[str, dict[str, Any]] = dict(index["tensors"])
            self.files = self._files(index.get("files"))
            for entry in self.tensors.values():
                shape = entry["shape"]
                if dtype_from_name(entry["dtype"]) is None or not _counts(shape) or entry.get(
                        "placement") not in ("shard0", "replicate"):  # fmt: skip
                    raise ValueError(f"dtype {entry['dtype']!r}, shape {shape!r}, placement {entry.get('placement')!r}")
                for piece in entry["pieces"]:
                    offset, size = piece["offset"], piece["size"]
                    if not (_count(piece["rank"]) and piece["rank"] < self.world_size and _counts(offset)
                            and _counts(size) and len(offset) == len(size) == len(shape)
                            and all(low + length <= whole for low, length, whole in zip(offset, size, shape, strict=True))
                            and isinstance(piece["crc"], str)):  # fmt: skip
                        raise ValueError(f"piece {piece!r} of a tensor of shape {shape}")
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{checkpoint}: its shard index is damaged ({error!r})") from error
        self._names: dict[int, dict[str, str]] = {}

    def _files(self, files: Any) -> dict[int, str]:
        """Each rank's file's checksum (an index from before they were recorded has none)."""
        if files is None:
            return {}
        ranks = [entry["rank"] for entry in files]
        if ranks != list(range(self.world_size)) or not all(
                isinstance(entry["checksum"], str) and len(entry["checksum"]) == 8 for entry in files):  # fmt: skip
            raise ValueError(f"files {files!r} for {self.world_size} ranks")
        return {entry["rank"]: entry["checksum"] for entry in files}

    @staticmethod
    def build(
        boxes: list[dict[str, dict[str, Any]]], crcs: list[dict[str, str]], checksums: list[str]
    ) -> dict[str, Any]:
        """The index of every rank's pieces (``split_shards``'s boxes and ``piece_crc``s, and each rank's file's
        checksum, in rank order)."""
        tensors: dict[str, dict[str, Any]] = {}
        for rank, (rank_boxes, rank_crcs) in enumerate(zip(boxes, crcs, strict=True)):
            for key, box in rank_boxes.items():
                entry = tensors.setdefault(key, {"shape": box["shape"], "dtype": box["dtype"],
                                                 "placement": box["placement"], "pieces": []})  # fmt: skip
                entry["pieces"].append({"rank": rank, "offset": box["offset"], "size": box["size"],
                                        "crc": rank_crcs[key]})  # fmt: skip
        files = [{"rank": rank, "checksum": checksum} for rank, checksum in enumerate(checksums)]
        return {"world_size": len(boxes), "files": files, "tensors": tensors}

    def check_files(self) -> None:
        """Raise ``CheckpointError`` unless every rank's file is there, the one the index names (its checksum:
        not another save's or another run's), with a piece for each index entry."""
        for rank in range(self.world_size):
            path = shard_file(self.checkpoint, rank)
            if rank in self.files and read_header(path).get("checksum") != self.files[rank]:
                raise CheckpointError(f"{path} is not the file of pieces this checkpoint's index names (another "
                                      "save's or another run's, or damaged)")  # fmt: skip
            names = self._names_in(rank)
            for key, entry in self.tensors.items():
                if any(int(piece["rank"]) == rank for piece in entry["pieces"]) and key not in names:
                    raise CheckpointError(f"{shard_file(self.checkpoint, rank)} holds no piece of {key!r}")

    def verify(self) -> list[dict[str, Any]]:
        """Read every rank's file and check each of its pieces against the index; each file's path, bytes and
        pieces.

        Raises:
            CheckpointError: A file is missing, unreadable or damaged, or holds a piece the index does not name.
        """
        self.check_files()
        files = []
        for rank in range(self.world_size):
            path = shard_file(self.checkpoint, rank)
            read_tree(path)  # the file's own checksum: its document and every byte of its tensors
            count = 0
            for key, entry in self.tensors.items():
                dtype = dtype_from_name(entry["dtype"])
                assert dtype is not None  # checked when the index was read
                for piece in entry["pieces"]:
                    if int(piece["rank"]) == rank:
                        self._piece(key, piece, dtype)
                        count += 1
            files.append({"path": str(path), "bytes": path.stat().st_size, "pieces": count})
        return files

    def read(self, key: str, offset: list[int], size: list[int]) -> torch.Tensor:
        """The box at ``offset`` of ``size`` of the sharded tensor ``key``, from the pieces that hold it."""
        entry = self.tensors.get(key)
        if entry is None:
            raise CheckpointError(f"{self.checkpoint}: its shard index has no tensor {key!r}")
        dtype = dtype_from_name(entry["dtype"])
        assert dtype is not None  # checked when the index was read
        try:
            box = torch.empty(size, dtype=dtype)
        except (RuntimeError, MemoryError) as error:  # a size no memory holds: the index is not a real one
            raise CheckpointError(
                f"{self.checkpoint}: {key!r} of size {size} cannot be read into memory: {error}"
            ) from error
        filled = 0
        for piece in entry["pieces"]:
            lows = [max(mine, theirs) for mine, theirs in zip(offset, piece["offset"], strict=True)]
            highs = [min(mine + mine_size, theirs + their_size) for mine, mine_size, theirs, their_size
                     in zip(offset, size, piece["offset"], piece["size"], strict=True)]  # fmt: skip
            if any(low >= high for low, high in zip(lows, highs, strict=True)):
                continue
            data = self._piece(key, piece, dtype)
            source = tuple(slice(low - start, high - start) for low, high, start in zip(lows, highs, piece["offset"], strict=True))  # fmt: skip
            target = tuple(slice(low - start, high - start) for low, high, start in zip(lows, highs, offset, strict=True))  # fmt: skip
            box[target] = data[source]
            filled += _volume(lows, highs)
            if filled >= box.numel():  # done (a replicated tensor's first piece holds it all)
                break
        if filled < box.numel():
            raise CheckpointError(f"{self.checkpoint}: the pieces of {key!r} do not cover this rank's part of it")
        return box

    def _piece(self, key: str, piece: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
        rank = int(piece["rank"])
        path = shard_file(self.checkpoint, rank)
        name = self._names_in(rank).get(key)
        if name is None:
            raise CheckpointError(f"{path} holds no piece of {key!r}")
        try:
            with safe_open(path, framework="pt") as file:
                data = file.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"{path} is not a readable piece file (truncated?): {error}") from error
        if data.dtype != dtype or list(data.shape) != list(piece["size"]) or piece_crc(data) != piece["crc"]:
            raise CheckpointError(f"{path}: its piece of {key!r} is not the one the checkpoint's index names "
                                  "(another save's file, or corrupted)")  # fmt: skip
        return data

    def _names_in(self, rank: int) -> dict[str, str]:
        """The tensor names of rank ``rank``'s pieces in its file, by key (its document, read once)."""
        if rank not in self._names:
            pieces = read_document(shard_file(self.checkpoint, rank)).get("pieces")
            if not isinstance(pieces, dict):
                raise CheckpointError(f"{shard_file(self.checkpoint, rank)} is not a file of pieces")
            self._names[rank] = {key: value["__tensor__"] for key, value in pieces.items()
                                 if isinstance(value, dict) and isinstance(value.get("__tensor__"), str)}  # fmt: skip
        return self._names[rank]


def _count(value: Any) -> bool:
    """Whether ``value`` is a whole number of at least 0 (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _counts(values: Any) -> bool:
    return isinstance(values, list) and all(map(_count, values))


def _volume(lows: list[int], highs: list[int]) -> int:
    volume = 1
    for low, high in zip(lows, highs, strict=True):
        volume *= high - low
    return volume


def resolve_shards(tree: Any, index: ShardIndex, mesh: Any) -> Any:
    """``tree`` with each ``{"__shard__": key}`` replaced by a DTensor of this rank's part on ``mesh``, placed as it
    was saved (sharded on dim 0, or replicated), read from the pieces."""
    from torch.distributed.tensor import DTensor, Replicate, Shard  # noqa: PLC0415 -- for sharded models only

    def read(key: str, shape: list[int]) -> torch.Tensor:
        replicated = index.tensors[key]["placement"] == "replicate" or not shape
        placements = (Replicate(),) if replicated else (Shard(0),)
        offset, size = owned_box(tuple(shape), mesh, placements)
        local = index.read(key, offset, size).to(mesh.device_type)
        return DTensor.from_local(local, mesh, placements, run_check=False, shape=torch.Size(shape),
                                  stride=_contiguous_strides(shape))  # fmt: skip

    return _replace_shards(tree, index, read)


def whole_tensors(tree: Any, index: ShardIndex) -> Any:
    """``tree`` with each ``{"__shard__": key}`` replaced by the whole tensor, assembled from every rank's pieces in
    this process (no process group): a sharded checkpoint's weights, for a plain model or a file."""
    return _replace_shards(tree, index, lambda key, shape: index.read(key, [0] * len(shape), shape))


def shapes_only(tree: Any, index: ShardIndex) -> Any:
    """``tree`` with each ``{"__shard__": key}`` replaced by a tensor on the meta device of the sharded tensor's
    global shape and dtype (for counting its elements and bytes without reading them)."""

    def meta(key: str, shape: list[int]) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype_from_name(index.tensors[key]["dtype"]), device="meta")

    return _replace_shards(tree, index, meta)


def _replace_shards(tree: Any, index: ShardIndex, read: Callable[[str, list[int]], torch.Tensor]) -> Any:
    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if set(node) == {SHARD}:
                key = node[SHARD]
                entry = index.tensors.get(key) if isinstance(key, str) else None
                if entry is None:
                    raise CheckpointError(f"{index.checkpoint}: its shard index has no tensor {key!r}")
                return read(key, [int(size) for size in entry["shape"]])
            return {name: walk(value) for name, value in node.items()}
        if isinstance(node, list):
            return [walk(value) for value in node]
        if isinstance(node, tuple):
            return tuple(walk(value) for value in node)
        return node

    return walk(tree)


def _contiguous_strides(shape: list[int]) -> tuple[int, ...]:
    strides, running = [], 1
    for size in reversed(shape):
        strides.append(running)
        running *= max(size, 1)
    return tuple(reversed(strides))
