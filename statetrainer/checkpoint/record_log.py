"""Records of a LevelDB-format log file, as Weights & Biases writes a run's ``.wandb`` file offline.

The format (LevelDB's ``doc/log_format.md``): a 7-byte file header (four ident
bytes, a 16-bit magic number, a version byte), then 32 KiB blocks counted
from the file's start, each a sequence of records: a CRC-32 of the type byte
and the data, a 16-bit length, a type (a whole record, or its first, middle or
last fragment) and the data; a block's last bytes too few for a record header
are zeros. Reading stops at the first record that is cut short or fails its
check: what a killed writer left unfinished.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from ..errors import CheckpointError

__all__ = ["read_records"]

_FILE_HEADER = struct.Struct("<4sHB")
_RECORD_HEADER = struct.Struct("<IHB")
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_records(path: Path, ident: bytes, magic: int) -> list[bytes]:
    """Every whole record of the log ``path``, in order.

    Raises:
        CheckpointError: The file is not a log with ``ident`` and ``magic`` (its header says otherwise).
        OSError: It cannot be read.
    """
    data = path.read_bytes()
    if len(data) < _FILE_HEADER.size or _FILE_HEADER.unpack_from(data)[:2] != (ident, magic):
        raise CheckpointError(f"{path} is not a log of {ident!r} (its header says otherwise)")
    records, pending, offset = [], b"", _FILE_HEADER.size
    while offset + _RECORD_HEADER.size <= len(data):
        left = _BLOCK - offset % _BLOCK
        if left < _RECORD_HEADER.size:  # the block's zero trailer
            offset += left
            continue
        checksum, length, kind = _RECORD_HEADER.unpack_from(data, offset)
        start = offset + _RECORD_HEADER.size
        fragment = data[start : start + length]
        if (
            kind not in (_FULL, _FIRST, _MIDDLE, _LAST)
            or len(fragment) < length
            or checksum != (zlib.crc32(fragment, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF)
        ):
            break  # what a writer killed in the middle left
        offset = start + length
        if kind == _FULL:
            records.append(fragment)
        elif kind == _FIRST:
            pending = fragment
        else:
            pending += fragment
            if kind == _LAST:
                records.append(pending)
                pending = b""
    return records
