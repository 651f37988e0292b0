"""Helpers for ``Trainer.state_dict``: unwrapping models, checking a saved state fits, placing it.

The ``check_*`` helpers let each part of a run check a saved state before
anything is loaded (see ``statetrainer.parts``): each raises
``CheckpointError`` naming the key and saying what it holds and what it must
hold, and none changes anything. A checkpoint's document is JSON, so a forged
file can put any number, string, list or dict where a tensor belongs; a bool
is never taken for a number.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import KeyEntry, keystr, tree_flatten_with_path, tree_map_only

from .errors import CheckpointError
from .validation import in_interval, interval_words

__all__ = ["LARGEST_COUNT", "REQUIRED_TO_LOAD", "check_flag", "check_integer", "check_keys", "check_like", "check_model_state",
           "check_real", "check_tensor", "describe", "is_real", "tensors_to", "unwrap_model"]  # fmt: skip

LARGEST_COUNT = 2**63 - 1  # counts go into int64 tensors and seeds: a larger one is not a run's
# A callback's saved state may hold this key with a reason: a trainer without that callback refuses the checkpoint
# (the rest of it is not what it seems without the callback: an EMA's average swapped into the model part, say).
REQUIRED_TO_LOAD = "required_to_load"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under DDP / DataParallel / ``torch.compile`` wrappers, whose keys are the plain ones."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def tensors_to(tree: Any, device: torch.device) -> Any:
    """A copy of ``tree`` whose tensors are new tensors on ``device``; other values are kept.

    Loaded state goes back where the run keeps it, and never aliases the file it
    was read from (a memory-mapped checkpoint that is later pruned or replaced).
    The containers walked are pytree's (dicts, lists, tuples, namedtuples,
    ``OrderedDict``...); each is rebuilt, so the copy shares no container with ``tree``.
    """
    return tree_map_only(torch.Tensor, lambda tensor: tensor.to(device, copy=True), tree)


def check_model_state(expected: Mapping[str, torch.Tensor], saved: Any) -> None:
    """Raise ``CheckpointError`` naming every missing or extra key, every value that is not a tensor, and every
    shape or dtype mismatch (``load_state_dict`` would copy another dtype over silently)."""
    if not isinstance(saved, Mapping) or not all(isinstance(key, str) for key in saved):
        raise CheckpointError(f"the saved model state is {describe(saved)}, not a dict of names to tensors")
    problems = []
    missing = [key for key in expected if key not in saved]
    extra = [key for key in saved if key not in expected]
    if missing:
        problems.append(f"missing keys {_some(missing)}")
    if extra:
        problems.append(f"unexpected keys {_some(extra)}")
    for key in [key for key in expected if key in saved]:  # in the model's order
        want, got = expected[key], saved[key]
        if not isinstance(want, torch.Tensor):  # a module's extra state: its own set_extra_state judges it
            continue
        if not isinstance(got, torch.Tensor):
            problems.append(f"{key}: {describe(got)} in the checkpoint, not a tensor")
        elif tuple(want.shape) != tuple(got.shape):
            problems.append(f"{key}: shape {tuple(got.shape)} in the checkpoint, {tuple(want.shape)} in the model")
        elif want.dtype != got.dtype:
            problems.append(f"{key}: dtype {got.dtype} in the checkpoint, {want.dtype} in the model")
    if problems:
        raise CheckpointError("the checkpoint does not fit this model: " + "; ".join(problems))


def _some(keys: list[str], shown: int = 5) -> str:
    listed = ", ".join(keys[:shown])
    return f"{listed} (+{len(keys) - shown} more)" if len(keys) > shown else listed


def describe(value: Any) -> str:
    """``value`` as a message shows it: short, with control characters escaped, tensors by dtype and shape."""
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    if isinstance(value, (bool, int, float)) or value is None:
        return reprlib.repr(value)
    if isinstance(value, (dict, list, tuple)):
        return f"a {type(value).__name__} of {len(value)} item(s)"
    return f"{reprlib.repr(value)} (a {type(value).__name__})"


def is_real(value: Any) -> bool:
    """Whether ``value`` is a real number: an int or a float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_keys(name: str, state: Any, expected: Iterable[str]) -> None:
    """Raise ``CheckpointError`` unless ``state`` is a dict with exactly the keys ``expected``."""
    expected = list(expected)
    if not isinstance(state, dict):
        raise CheckpointError(f"{name} is {describe(state)}, not a dict of {', '.join(expected) or 'nothing'}")
    missing = [key for key in expected if key not in state]
    extra = [key for key in state if key not in expected]
    if missing or extra:
        found = "; ".join(f"{what} {', '.join(map(reprlib.repr, keys[:5]))}" for what, keys in
                          (("no key", missing), ("unexpected key(s)", extra)) if keys)  # fmt: skip
        raise CheckpointError(f"{name} has {found}")


def check_flag(name: str, value: Any) -> None:
    """Raise ``CheckpointError`` unless ``value`` is True or False."""
    if not isinstance(value, bool):
        raise CheckpointError(f"{name} is {describe(value)}, not True or False")


def check_integer(name: str, value: Any, minimum: int = 0, maximum: int = LARGEST_COUNT) -> None:
    """Raise ``CheckpointError`` unless ``value`` is an integer (not a bool) from ``minimum`` to ``maximum``."""
    if not is_real(value) or not isinstance(value, int) or not minimum <= value <= maximum:
        wanted = f">= {minimum}" if maximum == LARGEST_COUNT else f"from {minimum} to {maximum}"
        too_large = isinstance(value, int) and value > maximum == LARGEST_COUNT
        beyond = " (larger than any count of a run)" if too_large else ""
        raise CheckpointError(f"{name} is {describe(value)}, not an integer {wanted}{beyond}")


def check_real(name: str, value: Any, low: float = -math.inf, high: float = math.inf, *, low_open: bool = False,
               high_open: bool = False, finite: bool = True, tensor: bool = False) -> None:  # fmt: skip
    """Raise ``CheckpointError`` unless ``value`` is a real number in the interval, never NaN.

    Args:
        name: The key, as the message names it.
        value: The saved value.
        low: The smallest value allowed (excluded with ``low_open``).
        high: The largest value allowed (excluded with ``high_open``).
        finite: Refuse infinities too.
        tensor: Also take a 0-dim tensor of a floating or integer dtype.
    """
    number = value
    if tensor and isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex() \
            and value.dtype != torch.bool:  # fmt: skip
        number = value.item()
    fits = is_real(number) and not math.isnan(number) and (math.isfinite(number) or not finite)
    if not fits or not in_interval(number, low, high, low_open, high_open):
        kind = f"{'a finite' if finite else 'a'} {'number or 0-dim tensor' if tensor else 'number'}"
        raise CheckpointError(
            f"{name} is {describe(value)}, not {kind}{interval_words(low, high, low_open, high_open)}"
        )


def check_tensor(name: str, value: Any, shape: Iterable[int], dtype: torch.dtype) -> None:
    """Raise ``CheckpointError`` unless ``value`` is a tensor of ``shape`` and ``dtype``."""
    shape = tuple(shape)
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape or value.dtype != dtype:
        wanted = f"a {str(dtype).removeprefix('torch.')} tensor of shape {shape}"
        raise CheckpointError(f"{name} is {describe(value)}, not {wanted}")


def check_like(name: str, saved: Any, current: Any) -> None:
    """Raise ``CheckpointError`` unless ``saved`` has the structure of ``current`` and each of its values the
    same kind: a bool for a bool, a string for a string, a number (finite where ``current``'s is) for a number,
    a tensor of the same shape and dtype (finite where ``current``'s is) for a tensor. Where ``current`` holds
    None (a setting left to its default), any bool, number, string or None fits.

    For a saved state that should look like a live object's own (an optimizer's
    settings, a scheduler's state), whose values may change but not their kind.
    Dicts are compared by their keys, lists and tuples by their length.
    """
    ours, theirs = _leaves(current), _leaves(saved)
    missing, extra = [path for path in ours if path not in theirs], [path for path in theirs if path not in ours]
    if missing or extra:
        found = "; ".join(f"{what} {', '.join(name + keystr(path) for path in paths[:5])}" for what, paths in
                          (("nothing at", missing), ("unexpected", extra)) if paths)  # fmt: skip
        raise CheckpointError(f"{name} is not laid out as this run's: {found}")
    for path, want in ours.items():
        _check_leaf_like(name + keystr(path), theirs[path], want)


def _leaves(tree: Any) -> dict[tuple[KeyEntry, ...], Any]:
    """The leaves of ``tree`` by path; None and empty containers are leaves. A dict subclass at the top or one
    level down (a scheduler's ``Counter`` of milestones) counts as the plain dict a checkpoint gives back."""
    tree = _plain(tree)
    if isinstance(tree, dict):
        tree = {key: _plain(value) for key, value in tree.items()}
    return dict(tree_flatten_with_path(tree, is_leaf=_is_leaf)[0])


def _is_leaf(node: Any) -> bool:
    return node is None or isinstance(node, (dict, list, tuple)) and not node


def _plain(node: Any) -> Any:
    return dict(node) if isinstance(node, dict) and type(node) is not dict else node


def _check_leaf_like(name: str, saved: Any, current: Any) -> None:
    if isinstance(current, bool):
        check_flag(name, saved)
    elif current is None:
        if not (saved is None or isinstance(saved, (bool, str)) or is_real(saved) and math.isfinite(saved)):
            raise CheckpointError(f"{name} is {describe(saved)}, not None, a bool, a finite number or a string")
    elif is_real(current):
        check_real(name, saved, finite=math.isfinite(current))
    elif isinstance(current, str):
        if not isinstance(saved, str):
            raise CheckpointError(f"{name} is {describe(saved)}, not a string")
    elif isinstance(current, torch.Tensor):
        check_tensor(name, saved, current.shape, current.dtype)
        if saved.is_floating_point() and bool(torch.isfinite(current).all()) and not bool(torch.isfinite(saved).all()):
            raise CheckpointError(f"{name} holds NaN or infinite values")
    elif type(saved) is not type(current) and not all(isinstance(value, (list, tuple)) for value in (saved, current)):
        raise CheckpointError(f"{name} is {describe(saved)}, not a {type(current).__name__}")
