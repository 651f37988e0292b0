"""``python -m statetrainer``: the state diagram (Mermaid and DOT) and checkpoint inspection."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

import statetrainer as st
from statetrainer.cli import main
from statetrainer.machine import STATES, TRANSITIONS

from .conftest import regression_batches

MERMAID_LINE = [re.compile(pattern) for pattern in (
    r"---", r"statetrainer", r"stateDiagram-v2", r"direction (LR|RL|TB|BT)", r"classDef \w+ [\w:,#-]+(,[\w:#-]+)*",
    r'state "\w+" as \w+', r"[Cc]lass \w+ \w+", r"\[\*\] --> \w+", r"(?P<source>\w+) --> (?P<dest>\w+): (?P<event>\w+)",
)]  # fmt: skip


def parse_mermaid(text: str) -> tuple[set[tuple[str, str, str]], dict[str, str]]:
    """The edges (source, dest, event) and each state's class; ``AssertionError`` for a line the grammar lacks."""
    edges, classes = set(), {}
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    assert lines[:4] == ["---", "statetrainer", "---", "stateDiagram-v2"]
    for line in lines[4:]:
        matched = next((pattern.fullmatch(line) for pattern in MERMAID_LINE if pattern.fullmatch(line)), None)
        assert matched is not None, f"not a Mermaid state-diagram line: {line!r}"
        if matched.groupdict().get("event"):
            edges.add((matched["source"], matched["dest"], matched["event"]))
        elif line.lower().startswith("class "):
            _, state, style = line.split()
            classes[state] = style
    return edges, classes


def table_edges() -> set[tuple[str, str, str]]:
    return {(source, dest, event) for event, sources, dest in TRANSITIONS
            for source in (sources if isinstance(sources, tuple) else (sources,))}  # fmt: skip


def run_cli(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "statetrainer", *arguments], capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_the_mermaid_diagram_parses_holds_the_machines_table_and_highlights_a_state(capsys):
    edges, classes = parse_mermaid(st.diagram("mermaid", "backward"))
    assert edges == table_edges() and set(classes) == set(STATES)
    assert [state for state, style in classes.items() if style == "s_active"] == ["backward"]
    assert main(["diagram", "--state", "step"]) == 0
    assert [state for state, style in parse_mermaid(capsys.readouterr().out)[1].items() if style == "s_active"] == ["step"]


def test_the_dot_diagram_holds_the_same_edges_and_renders_where_graphviz_is_installed(tmp_path):
    pytest.importorskip("graphviz")
    dot = st.diagram("dot", "batch")
    edges = {(source, dest, event) for source, dest, event in
             re.findall(r"^\s*(\w+) -> (\w+) \[label=(\w+)", dot, flags=re.MULTILINE)}  # fmt: skip
    assert edges == table_edges()
    assert re.search(r"^\s*batch \[.*fillcolor=darksalmon", dot, flags=re.MULTILINE)
    if shutil.which("dot") is None:
        pytest.skip("Graphviz's dot program is not installed: the DOT text was checked, not rendered")
    checked = subprocess.run(["dot", "-Tsvg"], input=dot, capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0 and "<svg" in checked.stdout
    assert main(["diagram", "--output", str(tmp_path / "machine.svg")]) == 0 and (tmp_path / "machine.svg").is_file()


def test_a_diagram_picture_without_the_dot_program_says_what_to_install(tmp_path, capsys):
    pytest.importorskip("graphviz")
    if shutil.which("dot") is not None:
        pytest.skip("Graphviz's dot program is installed here")
    assert main(["diagram", "--output", str(tmp_path / "machine.svg")]) == 2
    assert "needs Graphviz's dot program" in capsys.readouterr().err


def build_run(folder: Path, device: torch.device) -> st.Trainer:
    """A run that checkpoints every 3 steps into ``folder``."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    return st.Trainer(model, torch.optim.Adam(model.parameters()), F.mse_loss,
                      [st.Phase("train", regression_batches(4)), st.Phase("valid", regression_batches(2), grad=False)],
                      callbacks=[st.callbacks.SmoothedLoss(), st.callbacks.Checkpoint(folder, every_steps=3, keep_last=5)],
                      epochs=2, device=device, seed=3)  # fmt: skip


def saved_run(folder: Path, device: torch.device) -> st.Trainer:
    """``build_run``'s run, stopped in the middle of its second epoch, just after its checkpoint at step 6."""
    trainer = build_run(folder, device)
    trainer.run_until("step", step=6)
    trainer.advance()  # the deferred save runs once the batch has ended
    return trainer


def test_inspect_describes_a_file_and_its_json_says_the_same(tmp_path, capsys, device):
    trainer = saved_run(tmp_path, device)
    newest = st.checkpoint.checkpoint_files(tmp_path)[-1]
    assert main(["inspect", str(newest)]) == 0
    text = capsys.readouterr().out
    assert "checksum: verified (format 2, statetrainer" in text
    assert "position: state 'phase', epoch 2, phase 'train' after batch 2, step 6" in text  # counted from 1
    assert f"run: {trainer.run.id}, seed 3, world size 1" in text and "train_loss=" in text
    assert "callbacks: SmoothedLoss [active, average, batches, exact, samples]; Checkpoint [best_value, ranked]" in text
    assert main(["inspect", str(newest), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["position"] == {"state": "phase", "epoch": 1, "phase": "train", "batch": 1, "step": 6,
                                   "finished": False, "pending": None}  # fmt: skip
    assert summary["metrics"] == pytest.approx(dict(trainer.metrics)) and summary["seed"] == 3
    assert summary["parts"]["step"]["tensors"] == 8  # weight and bias, and Adam's step and two moments of each
    assert summary["parts"]["step"]["bytes"] == 3 * (3 + 1) * 4 + 2 * 4  # float32: 3 + 1 values thrice, 2 steps


def test_inspect_lists_a_folder_newest_first_and_points_past_a_corrupt_newest_file(tmp_path, capsys, device):
    saved_run(tmp_path, device)
    files = st.checkpoint.checkpoint_files(tmp_path)
    newest = files[-1]
    newest.write_bytes(newest.read_bytes()[:-100])  # cut short, as by a crash of another tool
    assert main(["inspect", str(tmp_path)]) == 1  # not everything verifies
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith(f"  {newest.name}  NOT USABLE:")
    assert lines[2].startswith(f"  {files[-2].name}  ") and lines[2].endswith("<- load_checkpoint starts here")
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        assert build_run(tmp_path, device).load_checkpoint(tmp_path) == files[-2]  # where a trainer of the run starts
    assert main(["inspect", str(tmp_path), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["picked"] == str(files[-2])


@pytest.mark.parametrize("kind", ["plain-safetensors", "text"])
def test_inspect_refuses_a_foreign_file_without_unpickling_anything(tmp_path, capsys, monkeypatch, kind):
    path = tmp_path / "model.safetensors"
    if kind == "plain-safetensors":
        save_file({"weight": torch.zeros(2)}, path)
    else:
        path.write_text("not a checkpoint")

    def refuse(*arguments, **options):
        raise AssertionError("inspect unpickled something")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert main(["inspect", str(path)]) == 1
    output = capsys.readouterr().out
    assert "NOT USABLE" in output and ("not a statetrainer checkpoint" in output or "not a readable" in output)


def test_the_command_line_runs_as_a_module_and_reports_a_missing_path(tmp_path):
    result = run_cli("inspect", str(tmp_path / "missing.safetensors"))
    assert result.returncode == 2 and "no checkpoint file or folder at" in result.stderr
    assert run_cli("diagram").stdout.startswith("---\nstatetrainer\n---\nstateDiagram-v2")
