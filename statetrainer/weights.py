"""A run's model weights, taken out of its checkpoints: into a plain model, or into a plain safetensors file.

A checkpoint holds the whole run; its model weights are the bare model's
``state_dict()`` (a DDP or ``torch.compile`` wrapper's own prefix is never
saved). A sharded checkpoint's weights (a model sharded with ``fully_shard``)
are assembled here, in one process with no process group, from every rank's
pieces. ``load_weights`` puts them into any module with the same keys, and
``export_weights`` writes them as a safetensors file of the model's own keys,
the format model hubs use: ``safetensors.torch.load_file`` and
``model.load_state_dict`` read it with no statetrainer installed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .callbacks.ema import AVERAGED, RAW
from .checkpoint import SHARD_INDEX, ShardIndex, atomic_write, newest_valid, read_tree, whole_tensors
from .errors import CheckpointError
from .saved_state import check_model_state, unwrap_model

__all__ = ["checkpoint_weights", "export_weights", "load_weights"]


def checkpoint_weights(path: str | os.PathLike[str], averaged: bool = False) -> tuple[Path, dict[str, torch.Tensor]]:
    """The model weights of the checkpoint ``path`` (a file, ``best.safetensors``, or a folder's newest good one)
    and the file they came from; with ``averaged``, the ``EMA`` callback's averaged weights.

    Raises:
        CheckpointError: No readable checkpoint there, or one that holds no model weights (no averaged ones).
    """
    path = Path(path)
    if path.is_dir():
        found = newest_valid(path, prepare=_assembled)  # one whose pieces do not read is passed over
        if found is None:
            raise CheckpointError(f"{path} holds no checkpoint")
        source, tree = found
    else:
        source, tree = path, _assembled(path, read_tree(path))
    step = tree.get("step")
    weights = step.get("model") if isinstance(step, dict) else None
    ema = _ema_state(tree)
    if ema is not None and ema.get(RAW) is not None:
        weights = ema[RAW]  # saved in an evaluation phase run on the averaged weights: the raw ones are the EMA's
    if averaged:
        average = ema.get(AVERAGED) if ema is not None else None
        if average is None:
            raise CheckpointError(f"{source} holds no averaged weights: the run had no EMA callback, or had taken "
                                  "no step")  # fmt: skip
        weights = _in_dtypes_of(average, weights)
    if not isinstance(weights, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in weights.items()
    ):
        raise CheckpointError(
            f"{source} holds no model weights (its step/model part): is it a statetrainer checkpoint?"
        )
    return source, weights


def _in_dtypes_of(average: Any, weights: Any) -> Any:
    """The averaged weights in the dtypes of the weights they average (a bf16 or fp16 tensor's average is kept in
    float32), where both are tensors by key; as they are otherwise (the check that follows names the fault)."""
    if not isinstance(average, dict) or not isinstance(weights, dict):
        return average
    return {key: value.to(weights[key].dtype) if isinstance(value, torch.Tensor) and isinstance(weights.get(key),
            torch.Tensor) and value.is_floating_point() else value for key, value in average.items()}  # fmt: skip


def _ema_state(tree: dict[str, Any]) -> dict[str, Any] | None:
    """The ``EMA`` callback's saved state in a checkpoint's tree (None: the run had none)."""
    callbacks = tree.get("callbacks")
    states = [state for state in (callbacks.values() if isinstance(callbacks, dict) else ())
              if isinstance(state, dict) and {"decay", "updates", AVERAGED, RAW} <= set(state)]  # fmt: skip
    return states[0] if states else None


def _assembled(path: Path, tree: dict[str, Any]) -> dict[str, Any]:
    """A sharded checkpoint's tree with its model weights assembled whole from every rank's pieces (each checked);
    any other checkpoint's as it is."""
    step = tree.get("step") if isinstance(tree, dict) else None
    if not isinstance(step, dict) or SHARD_INDEX not in tree or not isinstance(step.get("model"), dict):
        return tree
    index = ShardIndex(tree[SHARD_INDEX], path)
    index.check_files()
    return {**tree, "step": {**step, "model": whole_tensors(step["model"], index)}}


def load_weights(model: nn.Module, path: str | os.PathLike[str], *, averaged: bool = False) -> Path:
    """Load the model weights of the checkpoint ``path`` into ``model`` (bare, DDP or compiled); return the file.
    With ``averaged``, the ``EMA`` callback's averaged weights.

    Every key is checked first (missing, unexpected, shape, dtype), so a model that does not fit is left as it
    was.

    Raises:
        CheckpointError: No usable checkpoint there, or weights that do not fit ``model``; the message names the
            missing and unexpected keys.
    """
    source, weights = checkpoint_weights(path, averaged)
    bare = unwrap_model(model)
    try:
        check_model_state(bare.state_dict(), weights)
    except CheckpointError as error:
        raise CheckpointError(f"{source}: {error}") from error
    bare.load_state_dict(weights)
    return source


def export_weights(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str], *,
                   averaged: bool = False) -> Path:  # fmt: skip
    """Write the model weights of ``checkpoint`` to ``out``, a new ``.safetensors`` file of the model's own keys
    (written atomically); return the checkpoint file they came from. With ``averaged``, the ``EMA`` callback's
    averaged weights.

    Raises:
        ValueError: ``out`` does not end in ``.safetensors``, or exists already (it is never overwritten).
        CheckpointError: No usable checkpoint at ``checkpoint``.
    """
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"export to {out}: name a file ending in '.safetensors'")
    if out.exists() or out.is_symlink():
        raise ValueError(f"export to {out}: it exists already; choose another name, or remove it first")
    source, weights = checkpoint_weights(checkpoint, averaged)
    # Each tensor its own contiguous copy: safetensors refuses tensors that share memory (tied weights).
    plain = {key: tensor.detach().clone(memory_format=torch.contiguous_format) for key, tensor in weights.items()}
    with atomic_write(out) as temporary:
        save_file(plain, str(temporary), metadata={"format": "pt"})
    return source
