"""Argument checks shared by the trainer and the callbacks, so every bad value gets the same clear error.

``True`` is an ``int`` to Python; a count given as a bool is almost always a
mistake (``every_batches=True``), so counts refuse bools.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any, TypeGuard

__all__ = ["check_count", "check_number", "in_interval", "interval_words"]


def check_count(name: str, value: Any, *, minimum: int = 1, optional: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is an integer (not a bool) of at least ``minimum``, or None if ``optional``."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        wanted = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {wanted}{' or None' if optional else ''}, got {value!r}")


def check_number(
    name: str,
    value: Any,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
) -> None:
    """Raise ``ValueError`` unless ``value`` is a real number (not a bool) in the interval, or None if ``optional``."""
    if optional and value is None:
        return
    fits = _is_real(value) and not math.isnan(value)
    if not fits or not in_interval(value, low, high, low_open, high_open):
        wanted = interval_words(low, high, low_open, high_open)
        raise ValueError(f"{name} must be a number{wanted}{' or None' if optional else ''}, got {value!r}")


def _is_real(value: Any) -> TypeGuard[float]:
    """Whether ``value`` is a ``numbers.Real`` (NumPy's numbers too) but not a bool; typed as ``float``, the
    static type of a real number (typeshed's ``Real`` does not compare with floats)."""
    return isinstance(value, Real) and not isinstance(value, bool)


def in_interval(value: float, low: float, high: float, low_open: bool = False, high_open: bool = False) -> bool:
    """Whether ``value`` lies between ``low`` and ``high`` (each excluded when open)."""
    return (low < value if low_open else low <= value) and (value < high if high_open else value <= high)


def interval_words(low: float, high: float, low_open: bool = False, high_open: bool = False) -> str:
    """The interval as a message says it, with a leading space: `` >= 0``, `` in [0, 1)``; empty for every number."""
    if high == math.inf:
        return "" if low == -math.inf else f" {'>' if low_open else '>='} {low:g}"
    return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
