"""A table of numbers whose last row is updated in place while a process runs, and survives its SIGKILL.

The goodput ledger keeps its running totals here: one row per process of a
run, the last one live. The file is made atomically (``atomic_write``) with
every row, then mapped into memory; the live row's numbers are stores into
that mapping, so they cost what a store to a Python array costs, and the
kernel keeps them when the process is killed at any instant (they reach the
disk with the page cache's write-back, or at ``close()``). A power loss may
lose the live row's last seconds, never the file.

Layout: ``MAGIC``, an 8-byte little-endian header length, the header (JSON:
``kind``, ``id``, ``columns``, ``rows``; padded with spaces to 8 bytes), then
``rows × len(columns)`` little-endian float64 values, row by row.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .atomic import atomic_write, open_no_follow

__all__ = ["LiveTable", "TableContents", "read_live_table"]

MAGIC = b"STLIVE01"
_LENGTH = struct.Struct("<Q")
_MAX_HEADER = 1 << 16
_LITTLE_ENDIAN = sys.byteorder == "little"


@dataclass(frozen=True)
class TableContents:
    """What a live table file holds: its kind, the id of what it records, the column names and every row."""

    kind: str
    id: str
    columns: tuple[str, ...]
    rows: list[list[float]]


class LiveTable:
    """A live table file, open: ``row`` is the last row, as a writable ``memoryview`` of float64 values.

    Args:
        path: The file to make (replacing one that is there).
        kind: What the table is (a reader checks it).
        id: What it records (the ledger's id).
        columns: The column names.
        rows: Every row, the last one the live row's starting values.
    """

    def __init__(self, path: Path, kind: str, id: str, columns: Sequence[str], rows: Sequence[Sequence[float]]) -> None:
        if not _LITTLE_ENDIAN:  # the row's view stores native doubles; the file's are little-endian
            raise OSError("live tables are written on little-endian machines only")
        if not rows or any(len(row) != len(columns) for row in rows):
            raise ValueError(f"a live table needs at least one row of {len(columns)} values")
        header = json.dumps({"kind": kind, "id": id, "columns": list(columns), "rows": len(rows)}).encode()
        header += b" " * (-len(header) % 8)
        values = struct.pack(f"<{len(rows) * len(columns)}d", *(value for row in rows for value in row))
        with atomic_write(path) as temporary:
            temporary.write_bytes(MAGIC + _LENGTH.pack(len(header)) + header + values)
        self.path = path
        descriptor = open_no_follow(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(descriptor, 0)
        finally:
            os.close(descriptor)
        start = len(MAGIC) + _LENGTH.size + len(header) + (len(rows) - 1) * len(columns) * 8
        self.row: memoryview[float] = memoryview(self._map)[start : start + len(columns) * 8].cast("d")

    def close(self) -> list[float]:
        """Write the live row back and let the file go; return the row's last values."""
        values = list(self.row)
        self.row.release()
        self._map.flush()
        self._map.close()
        return values


def read_live_table(path: Path, kind: str) -> TableContents:
    """The table in ``path``.

    Raises:
        CheckpointError: The file is not a live table of ``kind``, or is cut short or damaged.
        OSError: It cannot be read.
    """
    data = path.read_bytes()
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + _LENGTH.size:
        raise CheckpointError(f"{path} is not a statetrainer live table (it does not start with {MAGIC!r})")
    (length,) = _LENGTH.unpack_from(data, len(MAGIC))
    start = len(MAGIC) + _LENGTH.size + length
    if length > _MAX_HEADER or length % 8 or start > len(data):
        raise CheckpointError(f"{path}: its header length {length} does not fit its {len(data)} bytes")
    try:
        header: Any = json.loads(data[len(MAGIC) + _LENGTH.size : start])
        columns, count, found_kind, found_id = header["columns"], header["rows"], header["kind"], header["id"]
    except (ValueError, KeyError, TypeError, RecursionError) as error:
        raise CheckpointError(f"{path}: its header is not the table's ({error!r})") from error
    if found_kind != kind or not isinstance(found_id, str):
        raise CheckpointError(f"{path} is a table of {found_kind!r}, not of {kind!r}")
    if not (isinstance(columns, list) and columns and all(isinstance(name, str) for name in columns)
            and isinstance(count, int) and count > 0):  # fmt: skip
        raise CheckpointError(f"{path}: its header names no columns or rows ({header!r})")
    if len(data) - start != count * len(columns) * 8:
        raise CheckpointError(f"{path}: {len(data) - start} bytes of values, not {count} rows of {len(columns)} "
                              "float64 values")  # fmt: skip
    values = struct.unpack_from(f"<{count * len(columns)}d", data, start)
    if not all(math.isfinite(value) for value in values):
        raise CheckpointError(f"{path}: it holds a value that is not a finite number")
    width = len(columns)
    rows = [list(values[index : index + width]) for index in range(0, len(values), width)]
    return TableContents(found_kind, found_id, tuple(columns), rows)
