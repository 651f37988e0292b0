"""The live table file: rows written atomically, a last row updated in place, every damage refused on reading."""

from __future__ import annotations

import math
import os
import struct
import subprocess
import sys

import pytest

from statetrainer.checkpoint import CheckpointError, LiveTable, read_live_table

COLUMNS = ("started", "seconds")


def test_the_live_row_is_in_the_file_as_it_is_updated_and_survives_a_sigkill(tmp_path):
    """A child process makes the table, stores into its live row and SIGKILLs itself: the stores are in the file."""
    path = tmp_path / "table"
    child = (f"import os, signal; from pathlib import Path; from statetrainer.checkpoint import LiveTable; "
             f"table = LiveTable(Path({str(path)!r}), 'test', 'run-1', {COLUMNS!r}, [[1.0, 2.0], [3.0, 0.0]]); "
             "table.row[1] = 4.5; table.row[1] += 0.25; os.kill(os.getpid(), signal.SIGKILL)")  # fmt: skip
    assert subprocess.run([sys.executable, "-c", child], timeout=120).returncode == -9
    found = read_live_table(path, "test")
    assert (found.kind, found.id, found.columns, found.rows) == ("test", "run-1", COLUMNS, [[1.0, 2.0], [3.0, 4.75]])


def test_close_returns_the_last_row_and_a_new_table_replaces_the_file_whole(tmp_path):
    path = tmp_path / "table"
    table = LiveTable(path, "test", "run-1", COLUMNS, [[1.0, 2.0]])
    table.row[0] = 7.0
    assert table.close() == [7.0, 2.0]
    LiveTable(path, "test", "run-2", COLUMNS, [[7.0, 2.0], [8.0, 0.0]]).close()
    assert read_live_table(path, "test").rows == [[7.0, 2.0], [8.0, 0.0]]
    assert [entry.name for entry in tmp_path.iterdir()] == ["table"]  # no temporary left


@pytest.mark.parametrize(("damage", "message"), [
    (lambda data: b"NOTATABLE" + data[9:], "not a statetrainer live table"),
    (lambda data: data[:-4], "bytes of values"),
    (lambda data: data[:8] + (10**9).to_bytes(8, "little") + data[16:], "header length"),
    (lambda data: data.replace(b'"kind": "test"', b'"kind": "else"'), "a table of 'else'"),
    (lambda data: data.replace(b'"rows": 1', b'"rows": 2'), "bytes of values"),
    (lambda data: data[:-8] + struct.pack("<d", math.nan), "not a finite number"),
    (lambda data: data.replace(b'"columns"', b'"kolumns"'), "header is not the table's"),
])  # fmt: skip
def test_a_damaged_table_is_refused_with_what_is_wrong(tmp_path, damage, message):
    path = tmp_path / "table"
    LiveTable(path, "test", "run-1", COLUMNS, [[1.0, 2.0]]).close()
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match=message):
        read_live_table(path, "test")


def test_a_table_is_never_written_through_a_link(tmp_path):
    target = tmp_path / "users-file"
    target.write_text("keep me")
    (tmp_path / "table").symlink_to(target)
    LiveTable(tmp_path / "table", "test", "run-1", COLUMNS, [[1.0, 2.0]]).close()  # the link is replaced, atomically
    assert target.read_text() == "keep me" and not os.path.islink(tmp_path / "table")
