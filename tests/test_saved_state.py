"""Placing saved state: ``tensors_to`` copies every tensor of a nested state and keeps everything else."""

from __future__ import annotations

from collections import OrderedDict

import torch

from statetrainer.saved_state import tensors_to


def test_tensors_to_copies_every_tensor_and_rebuilds_every_container():
    weight, step = torch.ones(2, 2), torch.tensor(3)
    state = {"model": OrderedDict(weight=weight), "optimizer": {"state": {0: {"step": step, "betas": (0.9, 0.99)}},
             "param_groups": [{"params": [0], "lr": 0.1, "name": None}]}, "tag": "run"}  # fmt: skip
    moved = tensors_to(state, torch.device("meta"))
    assert moved["model"]["weight"].device.type == "meta"
    assert moved["optimizer"]["state"][0]["step"].device.type == "meta"
    assert moved["optimizer"]["state"][0]["betas"] == (0.9, 0.99) and moved["tag"] == "run"
    assert moved["optimizer"]["param_groups"] == [{"params": [0], "lr": 0.1, "name": None}]
    assert isinstance(moved["model"], OrderedDict)

    copied = tensors_to(state, torch.device("cpu"))  # on the same device: still a copy, never a view
    assert torch.equal(copied["model"]["weight"], weight)
    assert copied["model"]["weight"].data_ptr() != weight.data_ptr()
    assert copied["optimizer"]["state"][0]["step"].data_ptr() != step.data_ptr()
    copied["optimizer"]["param_groups"][0]["lr"] = 1.0  # the containers are new: the state is left as it was
    assert state["optimizer"]["param_groups"][0]["lr"] == 0.1
