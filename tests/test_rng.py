"""Every generator's state, per rank: captured, packed into tensors for a gather, restored on the right rank."""

from __future__ import annotations

import random

import numpy as np
import torch

from statetrainer.distributed import Ranks
from statetrainer.rng import Generators, _pack, _unpack, capture_rng


def draws() -> tuple[float, float, float]:
    return random.gauss(0, 1), float(np.random.randn()), float(torch.rand(()))


def test_packing_a_state_into_one_tensor_and_back_loses_nothing():
    random.gauss(0, 1)  # Python caches the second normal of a pair: the state holds it
    np.random.randn()  # and so does NumPy's legacy generator
    state = capture_rng()
    packed = _pack(state)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    unpacked = _unpack(packed, state)
    assert unpacked["python"] == state["python"] and unpacked["numpy"]["cached"] == state["numpy"]["cached"]
    expected = draws()
    Generators(0).load_state_dict({"seed": 0, "ranks": [unpacked]})
    assert draws() == expected


def test_each_rank_takes_its_own_state_and_a_rank_with_none_saved_seeds_from_the_seed_step_and_rank():
    saved = []
    for rank_seed in (10, 11):
        torch.manual_seed(rank_seed)
        random.seed(rank_seed)
        np.random.seed(rank_seed)
        saved.append(capture_rng())
    state = {"seed": 5, "ranks": saved}
    second = Generators(5, ranks=Ranks(rank=1, world_size=3))
    second.load_state_dict(state)
    from_rank_one = draws()
    torch.manual_seed(11)
    random.seed(11)
    np.random.seed(11)
    assert from_rank_one == draws()  # rank 1 took saved rank 1's generators
    third = Generators(5, ranks=Ranks(rank=2, world_size=3))
    third.global_step = lambda: 40
    third.load_state_dict(state)
    new_rank = draws()
    third.load_state_dict(state)
    assert draws() == new_rank  # seeded from (seed, step, rank): the same every time
    third.global_step = lambda: 41
    third.load_state_dict(state)
    assert draws() != new_rank and new_rank != from_rank_one


def test_seed_everything_repeats_python_numpy_and_torch():
    import statetrainer as st

    st.seed_everything(123)
    first = draws()
    st.seed_everything(123)
    assert draws() == first
    st.seed_everything(124)
    assert draws() != first
