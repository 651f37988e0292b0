"""What a checkpoint holds, summarised without a trainer: for ``python -m statetrainer inspect``.

The file is read as ``load_checkpoint`` reads it (safetensors tensors and a
JSON document, checksum verified; no pickle, nothing executed), and only
described: where the run was, its seed and id, metrics, callbacks and their
state keys, and the tensors and bytes of each part. A sharded checkpoint's
pieces' files are each read whole and every piece checked against the index.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from .checkpoint import SHARD_INDEX, CheckpointFolder, ShardIndex, read_header, read_tree, shapes_only
from .errors import CheckpointError

__all__ = ["summarize_file", "summarize_folder"]


def summarize_file(path: Path) -> dict[str, Any]:
    """A checkpoint file's summary; ``verified`` is False (with the ``error``) for a file that does not load. A
    sharded checkpoint's summary lists its pieces' files (``shards``), each read and checked against the index,
    and counts each sharded tensor whole."""
    summary: dict[str, Any] = {"path": str(path), "verified": False, "error": None, "format": None, "library": None,
                               "shards": None}  # fmt: skip
    try:
        header = read_header(path)
        summary["format"], summary["library"] = header.get("format"), header.get("library")
        tree = read_tree(path)
        if isinstance(tree, dict) and SHARD_INDEX in tree:
            tree = dict(tree)
            index = ShardIndex(tree.pop(SHARD_INDEX), path)
            summary["shards"] = {"world_size": index.world_size, "tensors": len(index.tensors),
                                 "files": index.verify()}  # fmt: skip
            tree = shapes_only(tree, index)
    except CheckpointError as error:
        summary["error"] = str(error)
        return summary
    summary["verified"] = True
    try:
        summary.update(_describe(tree))
    except (KeyError, TypeError, IndexError, AttributeError) as error:
        summary["verified"], summary["error"] = False, f"it verifies but does not hold a statetrainer run: {error!r}"
    return summary


def summarize_folder(folder: Path) -> dict[str, Any]:
    """Every checkpoint of a folder, newest first, and the one ``load_checkpoint`` starts from (the newest that
    verifies; a trainer also checks that it fits)."""
    layout = CheckpointFolder(folder)
    files = [summarize_file(path) for path in reversed(layout.checkpoints())]
    picked = next((entry["path"] for entry in files if entry["verified"]), None)
    best = layout.best
    try:
        marker = layout.read_marker()
    except CheckpointError as error:
        marker = {"error": str(error)}
    return {"folder": str(folder), "run_marker": marker, "checkpoints": files, "picked": picked,
            "best": summarize_file(best) if best.is_file() else None}  # fmt: skip


def _describe(tree: dict[str, Any]) -> dict[str, Any]:
    position, machine, data = tree["position"], tree["machine"], tree["data"]
    phase_index = position.get("phase_index", position.get("phase_position", -1))
    phase = data[phase_index]["phase"] if 0 <= phase_index < len(data) and machine["state"] == "phase" else None
    return {
        "position": {
            "state": machine["state"],
            "epoch": position["epoch"],
            "epochs_done": position["epochs_done"],
            "phase": phase,
            "batch": position["batch_index"] if phase is not None else None,
            "step": position["global_step"],
            "finished": position["finished"],
            "stop_requested": position["stop_requested"],
            "pending": (machine.get("pending") or {}).get("event"),
        },  # fmt: skip
        "seed": tree["rng"]["seed"],
        "run": tree["run"]["id"],
        "world_size": tree["settings"].get("world_size", 1),
        "metrics": {name: _number(value) for name, value in tree["metrics"].items()},
        "callbacks": {name: _state_keys(state) for name, state in tree["callbacks"].items()},
        "parts": {name: _tensor_totals(part) for name, part in tree.items()},
    }


def _number(value: Any) -> Any:
    return value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value


def _state_keys(state: Any) -> list[str]:
    """A callback state's keys (a per-rank state's, from its first rank)."""
    if isinstance(state, dict) and list(state) == ["ranks"] and isinstance(state["ranks"], list) and state["ranks"]:
        state = state["ranks"][0]
    return sorted(map(str, state)) if isinstance(state, dict) else []


def _tensor_totals(tree: Any) -> dict[str, int]:
    tensors = [leaf for leaf in tree_leaves(tree) if isinstance(leaf, torch.Tensor)]
    return {"tensors": len(tensors), "bytes": sum(tensor.numel() * tensor.element_size() for tensor in tensors)}
