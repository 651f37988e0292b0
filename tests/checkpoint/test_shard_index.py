"""A sharded checkpoint's index, as read: a forged or damaged one is refused with ``CheckpointError``."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from statetrainer.checkpoint import CheckpointError, ShardIndex

GOOD = {
    "world_size": 2,
    "files": [{"rank": 0, "checksum": "0123abcd"}, {"rank": 1, "checksum": "89abcdef"}],
    "tensors": {"['step']['model']['0.weight']": {
        "shape": [4, 3], "dtype": "F32", "placement": "shard0",
        "pieces": [{"rank": 0, "offset": [0, 0], "size": [2, 3], "crc": "00000000"},
                   {"rank": 1, "offset": [2, 0], "size": [2, 3], "crc": "00000000"}]}},
}  # fmt: skip
KEY = "['step']['model']['0.weight']"


def forged(change) -> dict:
    index = copy.deepcopy(GOOD)
    change(index)
    return index


def test_a_good_index_reads():
    index = ShardIndex(GOOD, Path("checkpoint.safetensors"))
    assert index.world_size == 2 and index.files == {0: "0123abcd", 1: "89abcdef"} and KEY in index.tensors


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda index: index.update(world_size=0), id="no-ranks"),
        pytest.param(lambda index: index.update(world_size=True), id="world-size-a-bool"),
        pytest.param(lambda index: index["tensors"][KEY].update(shape=[-1, 3]), id="negative-shape"),
        pytest.param(lambda index: index["tensors"][KEY].update(shape=[4, "3"]), id="text-in-shape"),
        pytest.param(lambda index: index["tensors"][KEY]["pieces"][1].update(rank=2), id="rank-past-the-world"),
        pytest.param(lambda index: index["tensors"][KEY]["pieces"][1].update(offset=[3, 0]), id="piece-past-end"),
        pytest.param(lambda index: index["tensors"][KEY]["pieces"][0].update(size=[2]), id="piece-of-other-rank"),
        pytest.param(lambda index: index["files"].pop(), id="a-rank-without-a-file"),
        pytest.param(lambda index: index["files"][0].update(rank="0"), id="file-rank-as-text"),
        pytest.param(lambda index: index["files"][1].update(checksum=7), id="checksum-a-number"),
        pytest.param(lambda index: index["tensors"][KEY].update(placement="shard1"), id="other-placement"),
    ],
)
def test_a_forged_index_is_refused_naming_what(change):
    with pytest.raises(CheckpointError, match="shard index is damaged"):
        ShardIndex(forged(change), Path("checkpoint.safetensors"))


def test_an_index_from_before_file_checksums_were_recorded_reads():
    index = ShardIndex(forged(lambda index: index.pop("files")), Path("checkpoint.safetensors"))
    assert index.files == {}
