"""BatchCursor and to_device."""

from __future__ import annotations

import dataclasses
from collections import namedtuple
from types import MappingProxyType

import torch

from statetrainer.data import END, BatchCursor, to_device


class Counting:
    """A re-iterable without a length that counts how many items were pulled from it."""

    def __init__(self, count: int):
        self.count, self.pulled = count, 0

    def __iter__(self):
        for item in range(self.count):
            self.pulled += 1
            yield item


def test_sized_loader_is_never_read_ahead():
    loader = [10, 11, 12]
    cursor = BatchCursor(loader, length=3)
    assert cursor.length == 3
    assert [cursor.next(), cursor.is_last(), cursor.next(), cursor.next(), cursor.is_last()] == [
        10,
        False,
        11,
        12,
        True,
    ]
    assert cursor.next() is END


def test_unsized_loader_looks_ahead_only_when_asked():
    loader = Counting(2)
    cursor = BatchCursor(loader)
    assert cursor.length is None
    assert cursor.next() == 0 and loader.pulled == 1
    assert not cursor.is_last() and loader.pulled == 2  # looked ahead once
    assert cursor.next() == 1 and loader.pulled == 2  # served from the look-ahead
    assert cursor.is_last()
    assert cursor.next() is END and cursor.fetched == 2


def test_to_device_moves_nested_batches_and_keeps_their_shape():
    Pair = namedtuple("Pair", "x y")
    batch = {"a": [torch.ones(1), (torch.zeros(2), "label")], "b": Pair(torch.ones(3), 4)}
    moved = to_device(batch, torch.device("meta"))
    assert moved["a"][0].device.type == "meta" and moved["a"][1][0].device.type == "meta"
    assert isinstance(moved["a"], list) and isinstance(moved["a"][1], tuple) and moved["a"][1][1] == "label"
    assert isinstance(moved["b"], Pair) and moved["b"].x.device.type == "meta" and moved["b"].y == 4


def test_to_device_walks_every_mapping_and_sequence_and_leaves_other_objects():
    """The containers a batch may come in: any Mapping becomes a dict, a list or tuple subclass keeps its type, and
    an object of any other kind (a dataclass, a set) is handed over untouched, tensors inside it and all."""

    class Tokens(list):
        pass

    @dataclasses.dataclass
    class Sample:
        x: torch.Tensor

    sample = Sample(torch.ones(1))
    batch = (MappingProxyType({"ids": torch.ones(2)}), Tokens([torch.zeros(1)]), sample, {1, 2}, None)
    moved = to_device(batch, torch.device("meta"))
    assert type(moved[0]) is dict and moved[0]["ids"].device.type == "meta"
    assert type(moved[1]) is Tokens and moved[1][0].device.type == "meta"
    assert moved[2] is sample and sample.x.device.type == "cpu"
    assert moved[3] == {1, 2} and moved[4] is None
