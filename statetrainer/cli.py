"""``python -m statetrainer``: the state diagram, and what a checkpoint holds.

    python -m statetrainer diagram [--format mermaid|dot] [--state STATE | --checkpoint FILE] [--output FILE.svg]
    python -m statetrainer inspect PATH [--json]
    python -m statetrainer diff FIRST SECOND [--json]
    python -m statetrainer report FOLDER [--json] [--plot FILE.png]

Text output escapes every control character it would print (``\\x1b``), so names read from a file cannot drive
the terminal; ``--json`` keeps them exact (JSON escapes them). Exit status: 0, 1 for a checkpoint that is not
usable or two that differ, 2 for an error, and 141 (128 + SIGPIPE, as a shell reports for ``cat`` cut off by ``head``) when the
reader of the output goes away: that ends the command quietly.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .checkpoint import read_tree
from .diffing import CheckpointDiff, diff_checkpoints
from .errors import CheckpointError
from .goodput_report import plot_goodput, read_goodput, report_lines
from .inspection import summarize_file, summarize_folder
from .machine import DIAGRAM_FORMATS, STATES, diagram, diagram_graph
from .parts import Position
from .summary import readable_size
from .weights import export_weights

__all__ = ["main"]

CLOSED_PIPE_STATUS = 141  # 128 + SIGPIPE: what a shell reports for a command whose reader went away
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1: what a terminal may act on


def main(arguments: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m statetrainer", description="statetrainer's command line")
    commands = parser.add_subparsers(dest="command", required=True)
    drawing = commands.add_parser("diagram", help="print (or render) the state diagram the machine runs")
    drawing.add_argument("--format", choices=DIAGRAM_FORMATS, default="mermaid",
                         help="Mermaid source (default) or Graphviz DOT (needs statetrainer[diagram])")  # fmt: skip
    where = drawing.add_mutually_exclusive_group()
    where.add_argument("--state", choices=STATES, default="idle", help="the state to highlight (default idle)")
    where.add_argument("--checkpoint", type=Path, help="highlight the state this checkpoint was saved in")
    drawing.add_argument("--output", type=Path,
                         help="write an .svg, .png or .pdf picture (needs statetrainer[diagram] and Graphviz's dot)")  # fmt: skip
    inspecting = commands.add_parser("inspect", help="describe a checkpoint file, or every checkpoint of a folder")
    inspecting.add_argument("path", type=Path, help="a .safetensors checkpoint or a folder of them")
    inspecting.add_argument("--json", action="store_true", help="print the summary as JSON")
    exporting = commands.add_parser("export", help="write a checkpoint's model weights as a plain safetensors file")
    exporting.add_argument(
        "checkpoint", type=Path, help="a checkpoint file, best.safetensors, or a folder (its newest)"
    )
    exporting.add_argument("out", type=Path, help="the new .safetensors file: the model's state_dict(), its own keys")
    exporting.add_argument("--averaged", action="store_true", help="the EMA callback's averaged weights")
    differing = commands.add_parser("diff", help="what differs between two checkpoints, part by part")
    differing.add_argument("first", type=Path, help="a checkpoint file")
    differing.add_argument("second", type=Path, help="another checkpoint file")
    differing.add_argument("--json", action="store_true", help="print the differences as JSON")
    reporting = commands.add_parser("report", help="where a run's wall time went: its goodput ledger, per process")
    reporting.add_argument("folder", type=Path, help="the run's checkpoint folder, where GoodputLedger wrote")
    reporting.add_argument("--json", action="store_true", help="print the ledger as JSON")
    reporting.add_argument("--plot", type=Path, help="also draw it as stacked bars in a PNG (statetrainer[plots])")
    options = parser.parse_args(arguments)
    try:
        run = {"diagram": _diagram, "inspect": _inspect, "export": _export, "diff": _diff,
               "report": _report}[options.command]  # fmt: skip
        status = run(options)
        sys.stdout.flush()  # a closed pipe shows here, not as a traceback when Python exits
        return status
    except BrokenPipeError:  # before OSError: a reader that has seen enough (`| head`) is no error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit writes nowhere
        return CLOSED_PIPE_STATUS
    except (CheckpointError, ImportError, ValueError, OSError) as error:
        print(_printable(f"error: {error}"), file=sys.stderr)
        return 2


def _printable(text: str) -> str:
    """``text`` with each control character written as its escape (``\\x1b``), so that a name read from a file
    cannot clear the terminal or set its title or clipboard."""
    return _CONTROL_CHARACTER.sub(lambda match: f"\\x{ord(match[0]):02x}", text)


def _diagram(options: argparse.Namespace) -> int:
    state = options.state
    if options.checkpoint is not None:
        state = read_tree(options.checkpoint)["machine"]["state"]
    if options.output is None:
        print(diagram(options.format, state), end="" if options.format == "dot" else "\n")
        return 0
    picture = options.output.suffix.lstrip(".")
    if picture not in ("svg", "png", "pdf"):
        raise ValueError(f"--output {options.output}: name an .svg, .png or .pdf file (or print the text without it)")
    graphviz = diagram_graph("dot", state)
    try:
        graphviz.draw(str(options.output), format=picture)
    except Exception as error:  # graphviz raises its ExecutableNotFound (a RuntimeError) without the dot program
        raise OSError(f"could not render {options.output} ({error}); rendering needs Graphviz's dot program "
                      "(apt install graphviz, brew install graphviz)") from error  # fmt: skip
    print(f"wrote {options.output}")
    return 0


def _export(options: argparse.Namespace) -> int:
    source = export_weights(options.checkpoint, options.out, averaged=options.averaged)
    which = "the averaged model weights" if options.averaged else "the model weights"
    print(_printable(f"wrote {options.out}: {which} of {source}"))
    return 0


def _inspect(options: argparse.Namespace) -> int:
    path: Path = options.path
    if path.is_dir():
        summary = summarize_folder(path)
        entries = summary["checkpoints"] + ([summary["best"]] if summary["best"] else [])
        ok = bool(summary["checkpoints"]) and all(entry["verified"] for entry in entries)
        print(json.dumps(summary, indent=1, default=str) if options.json else _text(_folder_lines(summary)))
        return 0 if ok else 1
    if not path.exists():
        raise ValueError(f"no checkpoint file or folder at {path}")
    summary = summarize_file(path)
    print(json.dumps(summary, indent=1, default=str) if options.json else _text(_file_lines(summary)))
    return 0 if summary["verified"] else 1


def _diff(options: argparse.Namespace) -> int:
    found = diff_checkpoints(options.first, options.second)
    if options.json:
        differences = [{name: _json_number(value) for name, value in vars(difference).items()}
                       for difference in found.differences]  # fmt: skip
        print(json.dumps({"first": str(found.first), "second": str(found.second), "runs": found.runs,
                          "tensors": found.tensors, "same": found.same, "uncompared": found.uncompared,
                          "differences": differences},
                         indent=1, default=str, allow_nan=False))  # fmt: skip
    else:
        print(_text(_diff_lines(found)))
    return 0 if found.same else 1


def _report(options: argparse.Namespace) -> int:
    if options.plot is not None and options.plot.suffix != ".png":
        raise ValueError(f"--plot {options.plot}: name a .png file")
    report = read_goodput(options.folder)
    print(json.dumps(report.as_json(), indent=1) if options.json else _text(report_lines(report)))
    if options.plot is not None:
        plot_goodput(report, options.plot)
        if not options.json:
            print(_printable(f"wrote {options.plot}"))
    return 0


def _json_number(value: Any) -> Any:
    """``value``, or a float that JSON has no number for (NaN, an infinity) as text: ``"nan"``, ``"inf"``."""
    return str(value) if isinstance(value, float) and not math.isfinite(value) else value


def _diff_lines(found: CheckpointDiff) -> list[str]:
    lines = [f"first:  {found.first} (run {found.runs[0]})", f"second: {found.second} (run {found.runs[1]})"]
    lines += [f"not compared: {place} (a goodput ledger's seconds)" for place in found.uncompared]
    compared = sum(found.tensors.values())
    if found.same:
        return [*lines, f"the same, bit for bit: {compared} tensors and every other value (the runs' ids aside)"]
    parts: dict[str, list[Any]] = {}
    for difference in found.differences:
        parts.setdefault(difference.part, []).append(difference)
    lines.append(f"{len(found.differences)} differences in {len(parts)} part(s); {compared} tensors compared")
    for part, differences in parts.items():
        tensors = sum(difference.max_abs is not None for difference in differences)
        counted = f", {tensors} of {found.tensors.get(part, 0)} tensors" if found.tensors.get(part) else ""
        lines.append(f"{part}: {len(differences)} differ{counted}")
        for difference in differences:
            where = difference.path.removeprefix(part).lstrip("/") or part
            if difference.max_abs is not None:
                relative = "" if difference.relative is None else f", relative {difference.relative:.3g}"
                lines.append(f"  {where}: max |difference| {difference.max_abs:.3g}{relative}")
            else:
                lines.append(f"  {where}: {difference.what}: {difference.first!r} vs {difference.second!r}")
    return lines


def _text(lines: list[str]) -> str:
    """The lines of a summary, each made printable: a newline inside a name is escaped, never a line of its own."""
    return "\n".join(map(_printable, lines))


def _position_text(position: dict[str, Any]) -> str:
    saved = Position(epochs_done=position["epochs_done"], finished=position["finished"],
                     stop_requested=position["stop_requested"])  # fmt: skip
    # From 1, as a run's messages and checkpoint names count (the JSON is the API's, from 0).
    text = f"state {position['state']!r}, epoch {saved.epoch_for_people(position['state'])}"
    if position["phase"] is not None:
        text += f", phase {position['phase']!r} after batch {position['batch'] + 1}"
    text += f", step {position['step']}"
    if position["pending"]:
        text += f" (inside the {position['pending']!r} transition, saved after an error)"
    # The file does not hold the run's epochs or max_steps: it says how far the run got, not which limit ended it.
    ended = "stopped" if saved.stop_requested else f"after {saved.epochs_done} epoch(s) and {position['step']} step(s)"
    return text + (f", finished ({ended})" if saved.finished else "")


def _metrics_text(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{name}={value:.4f}" if isinstance(value, float) else f"{name}={value}"
                     for name, value in metrics.items()) or "none yet"  # fmt: skip


def _file_lines(summary: dict[str, Any]) -> list[str]:
    lines = [summary["path"]]
    version = f"format {summary['format']}, statetrainer {summary['library']}" if summary["format"] else "no header"
    if not summary["verified"]:
        return [*lines, f"  NOT USABLE ({version}): {summary['error']}"]
    parts = "; ".join(f"{name} {totals['tensors']} tensors, {readable_size(totals['bytes'])}"
                      for name, totals in summary["parts"].items() if totals["tensors"])  # fmt: skip
    callbacks = "; ".join(f"{name} [{', '.join(keys)}]" for name, keys in summary["callbacks"].items()) or "none"
    lines += [
        f"  checksum: verified ({version})",
        f"  position: {_position_text(summary['position'])}",
        f"  run: {summary['run']}, seed {summary['seed']}, world size {summary['world_size']}",
        f"  metrics: {_metrics_text(summary['metrics'])}",
        f"  callbacks: {callbacks}",
        f"  tensors: {parts}",
    ]
    shards = summary["shards"]
    if shards:
        files = shards["files"]
        lines.append(f"  shards: {shards['tensors']} sharded tensors in {len(files)} files of pieces (saved by "
                     f"{shards['world_size']} ranks), {readable_size(sum(entry['bytes'] for entry in files))}, every piece "
                     "verified against the index")  # fmt: skip
        lines += [
            f"    {Path(entry['path']).name}: {entry['pieces']} pieces, {readable_size(entry['bytes'])}"
            for entry in files
        ]
    return lines


def _folder_lines(summary: dict[str, Any]) -> list[str]:
    marker = summary["run_marker"] or {}
    lines = [f"{summary['folder']}: run {marker.get('run', '?')}, seed {marker.get('seed', '?')}"]
    if not summary["checkpoints"]:
        lines.append("  no checkpoints")
    for entry in summary["checkpoints"] + ([summary["best"]] if summary["best"] else []):
        name = Path(entry["path"]).name
        if entry["verified"]:
            line = f"  {name}  {_position_text(entry['position'])}  {_metrics_text(entry['metrics'])}"
        else:
            line = f"  {name}  NOT USABLE: {entry['error']}"
        lines.append(line + ("   <- load_checkpoint starts here" if entry["path"] == summary["picked"] else ""))
    return lines
