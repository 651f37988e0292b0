"""Keeping DataLoader workers alive through a preemption signal, until the trainer has saved.

A scheduler's SIGTERM often reaches every process of the job, and Ctrl-C sends
SIGINT to the whole foreground process group. A DataLoader worker killed by
it makes PyTorch raise in the main process, at whatever line it is running,
which can be the middle of the emergency checkpoint. Workers therefore ignore
the trainer's stop signals; the trainer, which handles them, shuts its
workers down itself when it stops.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable
from typing import Any

from torch.utils.data import DataLoader

__all__ = ["IgnoreSignalsInWorker", "shield_workers", "shielded_init"]


class IgnoreSignalsInWorker:
    """A DataLoader ``worker_init_fn``: ignore ``signals`` in the worker, then run the loader's own."""

    def __init__(self, signals: Iterable[int], then: Callable[[int], Any] | None = None) -> None:
        self.signals = tuple(int(number) for number in signals)
        self.then = then

    def __call__(self, worker_id: int) -> None:
        for number in self.signals:
            signal.signal(number, signal.SIG_IGN)
        if self.then is not None:
            self.then(worker_id)


def shielded_init(loader: DataLoader, signals: Iterable[int]) -> Callable[[int], Any] | None:
    """The ``worker_init_fn`` that ``loader`` should have to ignore ``signals`` (its own one, wrapped)."""
    signals = tuple(signals)
    own = loader.worker_init_fn
    if not signals or loader.num_workers == 0 or isinstance(own, IgnoreSignalsInWorker):
        return own
    return IgnoreSignalsInWorker(signals, own)


def shield_workers(loader: Any, signals: Iterable[int]) -> None:
    """Make a DataLoader's future workers ignore ``signals``; other loaders are left alone."""
    if isinstance(loader, DataLoader):
        loader.worker_init_fn = shielded_init(loader, signals)
