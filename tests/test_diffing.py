"""``python -m statetrainer diff``: what differs between two checkpoints, part by part."""

from __future__ import annotations

import json
import math

import pytest
import torch

from statetrainer import cli
from statetrainer.callbacks import GoodputLedger
from statetrainer.checkpoint import CheckpointError, read_tree, write_tree
from statetrainer.diffing import diff_checkpoints
from statetrainer.version import __version__

from .checkpoint.test_trainer_checkpoints import advance_to, build


def finished(tmp_path, name: str, device: torch.device, **options):
    """A whole run's final checkpoint."""
    return build(device=device, **options).fit().save_checkpoint(tmp_path / f"{name}.safetensors")


def test_two_runs_of_one_command_differ_only_in_their_ids(tmp_path, device, capsys):
    first, second = finished(tmp_path, "first", device), finished(tmp_path, "second", device)
    assert read_tree(first)["run"]["id"] != read_tree(second)["run"]["id"]
    found = diff_checkpoints(first, second)
    assert found.same and found.differences == []
    assert found.tensors["step"] == 4 + 2 * 4 + 4  # the weights, Adam's two moments, and its step counts
    assert cli.main(["diff", str(first), str(second)]) == 0
    assert "the same, bit for bit" in capsys.readouterr().out


def test_a_run_and_its_resumed_twin_differ_nowhere(tmp_path, device):
    whole = finished(tmp_path, "whole", device)
    interrupted = build(device=device)
    advance_to(interrupted, 1, "train", 3)
    saved = interrupted.save_checkpoint(tmp_path / "mid.safetensors")
    resumed = build(device=device)
    resumed.load_checkpoint(saved)
    twin = resumed.fit().save_checkpoint(tmp_path / "twin.safetensors")
    assert diff_checkpoints(whole, twin).same


def test_a_goodput_ledgers_seconds_are_listed_as_not_compared_and_nothing_else_is_skipped(tmp_path, device, capsys):
    """Two runs of one command with a GoodputLedger: their seconds differ, and diff says it did not compare them;
    the rest compares as without it, so another seed still differs in every weight."""

    def with_ledger(name: str, **options):
        folder = tmp_path / name
        trainer = build([GoodputLedger(folder)], device=device, **options).fit()
        return trainer.save_checkpoint(folder / "final.safetensors")

    first, second = with_ledger("first"), with_ledger("second")
    assert not read_tree(first)["callbacks"]["GoodputLedger"]["rows"].equal(
        read_tree(second)["callbacks"]["GoodputLedger"]["rows"])  # fmt: skip
    found = diff_checkpoints(first, second)
    assert found.same and found.uncompared == ["callbacks/GoodputLedger"]
    assert cli.main(["diff", str(first), str(second)]) == 0
    assert "not compared: callbacks/GoodputLedger (a goodput ledger's seconds)" in capsys.readouterr().out
    other = diff_checkpoints(first, with_ledger("other", seed=4))
    assert {difference.path for difference in other.differences} >= {"step/model/0.weight", "step/model/2.weight"}


def test_runs_with_other_seeds_differ_in_every_weight_and_moment(tmp_path, device, capsys):
    first, second = finished(tmp_path, "seed3", device), finished(tmp_path, "seed4", device, seed=4)
    found = diff_checkpoints(first, second)
    differing = {difference.path for difference in found.differences if difference.max_abs is not None}
    weights = {f"step/model/{key}" for key in ("0.weight", "0.bias", "2.weight", "2.bias")}
    moments = {f"step/optimizer/state/{index}/{moment}" for index in range(4) for moment in ("exp_avg", "exp_avg_sq")}
    assert weights | moments <= differing
    by_path = {difference.path: difference for difference in found.differences}
    assert all(0 < by_path[path].relative < float("inf") for path in weights)
    assert by_path["rng/seed"].first == 3 and by_path["rng/seed"].second == 4
    for path in weights:  # the figures are the tensors' own
        one, two = read_tree(first)["step"]["model"], read_tree(second)["step"]["model"]
        key = path.rsplit("/", 1)[1]
        expected = (two[key].double() - one[key].double()).abs().max().item()
        assert by_path[path].max_abs == pytest.approx(expected)
    assert cli.main(["diff", str(first), str(second), "--json"]) == 1
    printed = json.loads(capsys.readouterr().out)
    assert not printed["same"] and {entry["path"] for entry in printed["differences"]} >= weights | moments


def test_a_changed_setting_and_a_missing_part_are_named(tmp_path, device, capsys):
    first = finished(tmp_path, "first", device)
    tree = read_tree(first)
    tree["settings"] = {**tree["settings"], "accumulate": 2}
    del tree["metrics"]
    tree["step"]["model"]["0.weight"] = tree["step"]["model"]["0.weight"].double()
    edited = write_tree(tmp_path / "edited.safetensors", tree, __version__)
    found = {difference.path: difference for difference in diff_checkpoints(first, edited).differences}
    assert (found["settings/accumulate"].what, found["settings/accumulate"].first) == ("values", 1)
    assert found["metrics"].what == "only in first"
    assert found["step/model/0.weight"].what == "dtype"
    assert cli.main(["diff", str(first), str(edited)]) == 1
    out = capsys.readouterr().out
    assert "settings: 1 differ" in out and "accumulate: values: 1 vs 2" in out


def test_a_file_that_is_not_a_checkpoint_is_an_error(tmp_path, device, capsys):
    first = finished(tmp_path, "first", device)
    (tmp_path / "broken.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        diff_checkpoints(first, tmp_path / "broken.safetensors")
    assert cli.main(["diff", str(first), str(tmp_path / "broken.safetensors")]) == 2
    assert "error:" in capsys.readouterr().err


def test_values_are_compared_bit_for_bit_and_tensors_past_their_nans(tmp_path):
    """A NaN both files hold hides no other difference; integers too large for their difference still compare;
    ``True`` is not ``1``, ``1`` is not ``1.0`` and ``-0.0`` is not ``0.0``."""
    nan = float("nan")
    first = {"t": torch.tensor([nan, 1.0, 2.0]), "big": torch.tensor([-(2**63)]), "flag": True, "count": 1,
             "zero": 0.0, "same_nan": nan, "ints": torch.tensor([1, 2], dtype=torch.int32)}  # fmt: skip
    second = {"t": torch.tensor([nan, 1.0, 5.0]), "big": torch.tensor([2**63 - 1]), "flag": 1, "count": 1.0,
              "zero": -0.0, "same_nan": nan, "ints": torch.tensor([1, 2], dtype=torch.int32)}  # fmt: skip
    paths = [write_tree(tmp_path / f"{name}.safetensors", tree, __version__)
             for name, tree in (("first", first), ("second", second))]  # fmt: skip
    found = {difference.path: difference for difference in diff_checkpoints(*paths).differences}
    assert found["t"].max_abs == 3.0 and found["t"].relative == pytest.approx(3 / 5**0.5)
    assert found["big"].max_abs == pytest.approx(2.0**64)
    assert {"flag", "count", "zero"} <= found.keys() and "same_nan" not in found and "ints" not in found
    one_sided = write_tree(tmp_path / "third.safetensors", {**first, "t": torch.tensor([0.0, 1.0, 2.0])}, __version__)
    assert math.isnan({d.path: d for d in diff_checkpoints(paths[0], one_sided).differences}["t"].max_abs)
