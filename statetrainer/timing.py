"""Clocks for the goodput ledger: how long a process has run, and how long it was blocked in checkpoint I/O.

``Stopwatch`` sums the seconds spent inside its ``measuring()`` blocks and can
read the block in progress, so a reader in the middle of a save (the ledger's
``state_dict``, taken while the checkpoint is written) splits the time exactly.
``process_started()`` is when the operating system started this process, so
the interpreter's and the imports' seconds are counted too.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = ["CheckpointTime", "Stopwatch", "process_started"]


class Stopwatch:
    """Seconds spent inside ``measuring()`` blocks (not nested), by ``time.perf_counter``."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._since: float | None = None

    @contextlib.contextmanager
    def measuring(self) -> Iterator[None]:
        """Count the ``with`` block's seconds (a block inside another is counted once, by the outer)."""
        if self._since is not None:
            yield
            return
        self._since = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - self._since
            self._since = None

    def until(self, now: float) -> float:
        """The seconds counted up to ``now`` (a ``perf_counter`` reading), the block in progress included."""
        return self.seconds + (now - self._since if self._since is not None else 0.0)


@dataclass(frozen=True)
class CheckpointTime:
    """The seconds this process's training has been blocked saving checkpoints (staging and waiting for a write
    in flight included; a background write itself is not) and loading them."""

    saving: Stopwatch = field(default_factory=Stopwatch)
    loading: Stopwatch = field(default_factory=Stopwatch)


def process_started() -> float:
    """When this process started, as a ``time.time()`` reading: from ``/proc`` on Linux (to 1/100 s), else the
    time this module was imported."""
    try:
        with open("/proc/self/stat", "rb") as stat, open("/proc/uptime", "rb") as uptime:
            ticks_after_boot = int(stat.read().rsplit(b")", 1)[1].split()[19])
            seconds_since_boot = float(uptime.read().split()[0])
        age = seconds_since_boot - ticks_after_boot / os.sysconf("SC_CLK_TCK")
        return time.time() - max(age, 0.0)
    except (OSError, ValueError, IndexError):
        return _IMPORTED


_IMPORTED = time.time()
