"""Where two checkpoints differ, part by part: for ``python -m statetrainer diff``.

Two checkpoints that should be the same (two runs of one command, a run and
its resumed twin) are read as ``load_checkpoint`` reads them (checksums
verified, nothing unpickled) and compared leaf by leaf: numbers, strings and
settings by value, tensors bit for bit, and a tensor that differs by its
largest absolute difference and the norm of the difference relative to the
first's. A sharded checkpoint's tensors are assembled whole, one at a time,
from its pieces (each checked against its index), so it compares with a
checkpoint of the same model saved by another number of ranks, or unsharded.
The runs' ids are shown, not compared: two runs of one command differ there
and should differ nowhere else. Nor is a goodput ledger's state (its seconds
differ between any two runs): its place is listed as not compared.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .callbacks.goodput import COLUMNS as LEDGER_COLUMNS
from .checkpoint import SHARD_INDEX, ShardIndex, read_tree
from .checkpoint.sharded import SHARD
from .saved_state import describe

__all__ = ["CheckpointDiff", "Difference", "diff_checkpoints"]


@dataclass(frozen=True)
class Difference:
    """One place where two checkpoints differ.

    Attributes:
        path: Where, part first (``"step/model/0.weight"``).
        what: ``"values"`` (a tensor's or a number's), ``"shape"``, ``"dtype"``, ``"kind"`` (a tensor against
            something else, or containers of other kinds or lengths), or ``"only in first"`` / ``"only in second"``.
        first: The first checkpoint's value (a number, text, or a tensor's description).
        second: The second checkpoint's.
        max_abs: For tensors of one shape: the largest absolute difference (NaN where one holds a NaN).
        relative: For floating-point tensors of one shape: ``norm(second - first) / norm(first)`` (inf where the
            first is all zeros).
    """

    path: str
    what: str
    first: Any
    second: Any
    max_abs: float | None = None
    relative: float | None = None

    @property
    def part(self) -> str:
        """The part of the run's state it is in (``step``, ``rng``, ``position``, ...)."""
        return self.path.split("/", 1)[0]


@dataclass
class CheckpointDiff:
    """What differs between two checkpoints.

    Attributes:
        first: The first checkpoint file.
        second: The second.
        runs: Each one's run id (shown, not compared).
        tensors: How many tensors were compared, by part.
        differences: Every difference, in the first checkpoint's order.
        uncompared: The places not compared: a goodput ledger's state (``callbacks/GoodputLedger``).
    """

    first: Path
    second: Path
    runs: tuple[Any, Any]
    tensors: dict[str, int] = field(default_factory=dict)
    differences: list[Difference] = field(default_factory=list)
    uncompared: list[str] = field(default_factory=list)

    @property
    def same(self) -> bool:
        """Whether the two hold the same state, bit for bit (the runs' ids aside)."""
        return not self.differences


def diff_checkpoints(first: str | os.PathLike[str], second: str | os.PathLike[str]) -> CheckpointDiff:
    """Compare two checkpoint files part by part (see the module's description).

    Raises:
        CheckpointError: Either file is not a readable checkpoint, or a sharded one's pieces do not read.
    """
    trees, indexes = [], []
    for path in (Path(first), Path(second)):
        tree = read_tree(path)
        index = ShardIndex(tree.pop(SHARD_INDEX), path) if SHARD_INDEX in tree else None
        if index is not None:
            index.check_files()
        trees.append(tree)
        indexes.append(index)
    runs = tuple(tree.get("run", {}).get("id") if isinstance(tree.get("run"), dict) else None for tree in trees)
    result = CheckpointDiff(Path(first), Path(second), (runs[0], runs[1]))
    result.uncompared = [f"callbacks/{key}" for key in _ledger_keys(trees[0]) & _ledger_keys(trees[1])]
    skipped = tuple(f"{place}/" for place in result.uncompared)
    for path, one, two in _leaves(trees[0], trees[1], ""):
        if path == "run/id" or path.startswith(skipped):
            continue
        one, two = _whole(one, indexes[0]), _whole(two, indexes[1])
        if isinstance(one, torch.Tensor) and isinstance(two, torch.Tensor):
            part = path.split("/", 1)[0]
            result.tensors[part] = result.tensors.get(part, 0) + 1
        difference = _compare(path, one, two)
        if difference is not None:
            result.differences.append(difference)
    return result


def _ledger_keys(tree: dict[str, Any]) -> set[str]:
    """The keys of the callbacks whose saved state is a goodput ledger's."""
    callbacks = tree.get("callbacks")
    if not isinstance(callbacks, dict):
        return set()
    return {key for key, state in callbacks.items()
            if isinstance(state, dict) and state.get("columns") == list(LEDGER_COLUMNS)}  # fmt: skip


def _leaves(one: Any, two: Any, path: str) -> Iterator[tuple[str, Any, Any]]:
    """Pairs of leaves (a sharded tensor's placeholder is a leaf) at the same place; ``_MISSING`` where one tree has
    none, and both containers as leaves where their kinds or lengths differ."""
    if _is_container(one) and _is_container(two) and type(one) is type(two):
        if isinstance(one, dict):
            for key in [*one, *(key for key in two if key not in one)]:
                yield from _leaves(one.get(key, _MISSING), two.get(key, _MISSING), _join(path, key))
            return
        if len(one) == len(two):
            for position, (left, right) in enumerate(zip(one, two, strict=True)):
                yield from _leaves(left, right, _join(path, position))
            return
    yield path, one, two


def _is_container(value: Any) -> bool:
    return isinstance(value, (list, tuple)) or (isinstance(value, dict) and set(value) != {SHARD})


def _join(path: str, key: Any) -> str:
    return f"{path}/{key}" if path else str(key)


class _Missing:
    def __repr__(self) -> str:
        return "missing"


_MISSING = _Missing()


def _whole(value: Any, index: ShardIndex | None) -> Any:
    """A sharded tensor's placeholder as the whole tensor, read from its pieces; anything else as it is."""
    if index is None or not isinstance(value, dict) or set(value) != {SHARD}:
        return value
    shape = [int(size) for size in index.tensors[value[SHARD]]["shape"]] if value[SHARD] in index.tensors else None
    if shape is None:
        return value  # compared as it stands: read_tree's document is checked, the index has no such tensor
    return index.read(value[SHARD], [0] * len(shape), shape)


def _compare(path: str, one: Any, two: Any) -> Difference | None:
    if one is _MISSING or two is _MISSING:
        what = "only in second" if one is _MISSING else "only in first"
        return Difference(path, what, _shown(one), _shown(two))
    if isinstance(one, torch.Tensor) and isinstance(two, torch.Tensor):
        return _compare_tensors(path, one, two)
    if isinstance(one, torch.Tensor) or isinstance(two, torch.Tensor) or _is_container(one) or _is_container(two):
        return Difference(path, "kind", _shown(one), _shown(two))
    return None if _same_value(one, two) else Difference(path, "values", one, two)


def _same_value(one: Any, two: Any) -> bool:
    """Equal, of one type, and for floats bit for bit (NaN is NaN, -0.0 is not 0.0)."""
    if type(one) is not type(two):
        return False
    if isinstance(one, float):
        return struct.pack("<d", one) == struct.pack("<d", two) or (math.isnan(one) and math.isnan(two))
    return one == two


def _shown(value: Any) -> Any:
    return (
        value if value is _MISSING or isinstance(value, (bool, int, float, str)) or value is None else describe(value)
    )


def _compare_tensors(path: str, one: torch.Tensor, two: torch.Tensor) -> Difference | None:
    if one.dtype != two.dtype:
        return Difference(path, "dtype", describe(one), describe(two))
    if one.shape != two.shape:
        return Difference(path, "shape", describe(one), describe(two))
    if _bits(one).equal(_bits(two)):
        return None
    wide = torch.complex128 if one.is_complex() else torch.float64  # integers too: no overflow
    first, second = one.detach().to("cpu", wide), two.detach().to("cpu", wide)
    if not (one.dtype.is_floating_point or one.dtype.is_complex):
        return Difference(path, "values", describe(one), describe(two), float((second - first).abs().max()))
    # NaN where both hold NaN, and an infinity both hold, are no difference; NaN in one of them alone is
    same = (first == second) | (first.isnan() & second.isnan())
    gap = torch.where(same, 0.0, (second - first).abs())
    scale = float(torch.linalg.vector_norm(torch.nan_to_num(first, nan=0.0, posinf=0.0, neginf=0.0)))
    norm = float(torch.linalg.vector_norm(gap))
    relative = norm / scale if scale else (0.0 if norm == 0 else math.inf)
    return Difference(path, "values", describe(one), describe(two), float(gap.max()), relative)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes (so NaNs of one bit pattern are equal, and -0.0 is not 0.0)."""
    return tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
