"""Reporting interleaved timings: the median of each, against a baseline."""

from __future__ import annotations

import statistics


def report(timings: dict[str, list[float]], baseline: str, unit: str, indent: str = "  ") -> None:
    """Print each entry's median ``unit`` figure, its difference from ``baseline``'s and their ratio."""
    base = statistics.median(timings[baseline])
    for name, values in timings.items():
        median = statistics.median(values)
        print(f"{indent}{name:>13}: {median:7.2f} {unit}   overhead {median - base:+6.2f}   ratio {median / base:.3f}")
