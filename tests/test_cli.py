"""``python -m statetrainer``: the state diagram (Mermaid and DOT) and checkpoint inspection."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
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


def run_cli(*arguments: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m statetrainer`` with ``arguments``; ``subprocess.TimeoutExpired`` when it outlasts ``timeout``."""
    return subprocess.run([sys.executable, "-m", "statetrainer", *arguments], capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def test_the_mermaid_diagram_parses_holds_the_machines_table_and_highlights_a_state(capsys):
    edges, classes = parse_mermaid(st.diagram("mermaid", "backward"))
    assert edges == table_edges() and set(classes) == set(STATES)
    assert [state for state, style in classes.items() if style == "s_active"] == ["backward"]
    assert main(["diagram", "--state", "step"]) == 0
    assert [state for state, style in parse_mermaid(capsys.readouterr().out)[1].items() if style == "s_active"] == [
        "step"
    ]


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


def build_run(folder: Path, device: torch.device, epochs: int = 2, max_steps: int | None = None) -> st.Trainer:
    """A run of 4 train batches and 2 valid ones an epoch that checkpoints every 3 steps and every epoch into
    ``folder``."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    return st.Trainer(model, torch.optim.Adam(model.parameters()), F.mse_loss,
                      [st.Phase("train", regression_batches(4)), st.Phase("valid", regression_batches(2), grad=False)],
                      callbacks=[st.callbacks.SmoothedLoss(), st.callbacks.Checkpoint(folder, every_steps=3, keep_last=5)],
                      epochs=epochs, max_steps=max_steps, device=device, seed=3)  # fmt: skip


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
    assert f"checksum: verified (format {st.checkpoint.FORMAT_VERSION}, statetrainer" in text
    assert "position: state 'phase', epoch 2, phase 'train' after batch 2, step 6" in text  # counted from 1
    assert f"run: {trainer.run.id}, seed 3, world size 1" in text and "train_loss=" in text
    assert (
        "callbacks: SmoothedLoss [active, average, batches, exact, samples]; Checkpoint [best_epoch, best_value, ranked]"
        in text
    )
    assert main(["inspect", str(newest), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["position"] == {"state": "phase", "epoch": 1, "epochs_done": 1, "phase": "train", "batch": 1,
                                   "step": 6, "finished": False, "stop_requested": False, "pending": None}  # fmt: skip
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


def test_inspect_counts_epochs_as_the_checkpoint_names_do_and_says_a_finished_run_is_done(tmp_path, capsys, device):
    build_run(tmp_path, device, epochs=3).fit()
    files = st.checkpoint.checkpoint_files(tmp_path)
    named = {path.name: int(re.search(r"-epoch(\d+)-", path.name)[1]) for path in files}
    assert main(["inspect", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    shown = {line.split()[0]: int(re.search(r", epoch (\d+),", line)[1]) for line in lines}
    assert shown == named  # the epoch of every line, from 1, is the one in its file's name
    finished, mid_epoch = lines[0], next(line for line in lines if "phase 'train'" in line)
    steps = st.checkpoint.read_tree(files[-1])["position"]["global_step"]
    assert "state 'idle', epoch 3," in finished and f"finished (after 3 epoch(s) and {steps} step(s))" in finished
    assert "state 'phase', epoch 3, phase 'train'" in mid_epoch


def test_inspect_of_a_run_that_max_steps_ended_mid_epoch_says_how_far_it_got_not_that_its_epochs_are_done(
    tmp_path, capsys, device
):
    build_run(tmp_path, device, epochs=5, max_steps=3).fit()
    assert main(["inspect", str(tmp_path)]) == 0
    newest = capsys.readouterr().out.splitlines()[1]
    assert "finished (after 1 epoch(s) and 3 step(s))" in newest and "5 epoch" not in newest


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_inspect_refuses_a_fifo_without_opening_it(tmp_path):
    fifo = tmp_path / "stuck.safetensors"
    os.mkfifo(fifo)
    result = run_cli("inspect", str(fifo), timeout=60)  # a hang raises TimeoutExpired: the test fails
    assert result.returncode == 1, result.stderr  # as for any unusable file
    assert result.stdout.splitlines()[1].startswith("  NOT USABLE") and "not a regular file" in result.stdout


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_inspect_skips_a_fifo_named_as_a_folders_newest_checkpoint(tmp_path, device):
    saved_run(tmp_path, device)
    files = st.checkpoint.checkpoint_files(tmp_path)
    fifo = st.checkpoint.next_checkpoint_path(tmp_path, epoch=2, step=7)
    os.mkfifo(fifo)
    assert st.checkpoint.checkpoint_files(tmp_path) == [*files, fifo]  # named as the newest checkpoint
    result = run_cli("inspect", str(tmp_path), timeout=60)
    assert result.returncode == 1, result.stderr  # as for a folder with an unusable checkpoint
    lines = result.stdout.splitlines()
    assert lines[1].startswith(f"  {fifo.name}  NOT USABLE:") and "not a regular file" in lines[1]
    assert lines[2].startswith(f"  {files[-1].name}  ") and lines[2].endswith("<- load_checkpoint starts here")


@pytest.mark.parametrize("reader", ["gone before the output", "gone after one line of a long output"])
def test_inspect_into_a_closed_pipe_ends_quietly(tmp_path, device, reader):
    trainer = saved_run(tmp_path, device)
    long_output = reader.endswith("long output")
    if long_output:  # a line longer than any pipe's buffer: the command is still writing when the reader goes away
        trainer.metrics.update({f"metric_{index:05d}": float(index) for index in range(20_000)})
        trainer.save_checkpoint(tmp_path)
    assert len(st.checkpoint.checkpoint_files(tmp_path)) > 1
    buffered = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}  # as users run it
    command = subprocess.Popen([sys.executable, "-m", "statetrainer", "inspect", str(tmp_path)], env=buffered,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    first_line = command.stdout.readline().decode() if long_output else None
    command.stdout.close()  # as `head -1` does once it has its line
    status = command.wait(timeout=120)
    errors = command.stderr.read().decode()
    command.stderr.close()
    assert first_line is None or first_line.startswith(f"{tmp_path}: run ")
    assert errors == "", f"stderr: {errors!r}"  # no traceback, no BrokenPipeError, no message at all
    assert status == 141  # 128 + SIGPIPE, as a shell reports for `cat` or `grep` cut off by `head`


CONTROL_CHARACTER = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")  # C0 but the newline that ends a line, DEL, C1
SET_TITLE, CLEAR_SCREEN, SET_CLIPBOARD, C1_CSI = "\x1b]0;pwned\x07", "\x1b[2J", "\x1b]52;c;cHduZWQ=\x07", "\x9b31m\x7f"


def forged_checkpoints(folder: Path, device: torch.device) -> tuple[Path, Path]:
    """A checksum-valid checkpoint whose metric name, callback name and state key, run id and ``library`` header
    hold terminal escape sequences; and one of a newer format, whose error quotes its ``library``. With a
    ``run.json`` that holds them too."""
    tree = saved_run(folder / "source", device).state_dict()
    tree["metrics"][f"loss{SET_TITLE}"] = 1.0
    tree["callbacks"][f"Callback{CLEAR_SCREEN}"] = {f"key{C1_CSI}": 1}
    tree["run"]["id"] = f"run{SET_CLIPBOARD}"
    forged = st.checkpoint.write_tree(st.checkpoint.next_checkpoint_path(folder, 2, 6), tree, f"9{SET_TITLE}{C1_CSI}")
    (folder / "run.json").write_text(json.dumps({"run": f"run{SET_CLIPBOARD}", "seed": f"3{CLEAR_SCREEN}"}))
    with safe_open(forged, framework="pt") as file:
        metadata, tensors = file.metadata(), {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118
    header_text, document = metadata["statetrainer"].split("\n", 1)  # a checkpoint's metadata: header, document
    header = json.loads(header_text)
    header.update(format=st.checkpoint.FORMAT_VERSION + 1, library=f"10{CLEAR_SCREEN}{SET_CLIPBOARD}")
    newer = st.checkpoint.next_checkpoint_path(folder, 2, 7)
    save_file(tensors, newer, metadata={"statetrainer": f"{json.dumps(header)}\n{document}"})
    return forged, newer


def test_inspect_escapes_control_characters_read_from_files_and_its_json_keeps_them_exact(tmp_path, capsys, device):
    forged, newer = forged_checkpoints(tmp_path, device)
    for target in (tmp_path, forged, newer, tmp_path / f"missing{SET_TITLE}"):
        main(["inspect", str(target)])
        output = capsys.readouterr()
        assert not CONTROL_CHARACTER.search(output.out + output.err), (target, output)
    assert main(["inspect", str(tmp_path)]) == 1  # the newer format does not load
    text = capsys.readouterr().out
    assert r"run run\x1b]52;c;cHduZWQ=\x07, seed 3\x1b[2J" in text  # from run.json
    assert r"(statetrainer 10\x1b[2J\x1b]52;c;cHduZWQ=\x07); this statetrainer reads formats up to" in text
    assert main(["inspect", str(forged)]) == 0
    text = capsys.readouterr().out
    assert r"statetrainer 9\x1b]0;pwned\x07\x9b31m\x7f" in text and r"run: run\x1b]52;c;cHduZWQ=\x07," in text
    assert r"loss\x1b]0;pwned\x07=1.0000" in text and r"Callback\x1b[2J [key\x9b31m\x7f]" in text
    assert main(["inspect", str(forged), "--json"]) == 0
    output = capsys.readouterr().out
    summary = json.loads(output)
    assert not CONTROL_CHARACTER.search(output)  # JSON escapes them, and a JSON reader gets them back exactly
    assert summary["library"] == f"9{SET_TITLE}{C1_CSI}" and summary["run"] == f"run{SET_CLIPBOARD}"
    assert summary["metrics"][f"loss{SET_TITLE}"] == 1.0
    assert summary["callbacks"][f"Callback{CLEAR_SCREEN}"] == [f"key{C1_CSI}"]
    assert main(["inspect", str(tmp_path), "--json"]) == 1
    folder = json.loads(capsys.readouterr().out)
    assert folder["run_marker"] == {"run": f"run{SET_CLIPBOARD}", "seed": f"3{CLEAR_SCREEN}"}
    assert folder["checkpoints"][0]["library"] == f"10{CLEAR_SCREEN}{SET_CLIPBOARD}"
