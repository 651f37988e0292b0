"""Keeping DataLoader workers alive through a preemption signal, until the trainer has saved.

A scheduler's SIGTERM often reaches every process of the job, and Ctrl-C sends
SIGINT to the whole foreground process group. A DataLoader worker killed by
it makes PyTorch raise in the main process, at whatever line it is running,
which can be the middle of the emergency checkpoint. Workers therefore ignore
the trainer's stop signals; the trainer, which handles them, shuts its
workers down itself when it stops.

One exception: when the main process exits, Python's ``multiprocessing``
terminates the workers that are still running (an iterator left open by a
stepped run, or persistent workers) with SIGTERM and waits for them. So the
main process raises a shared flag as it starts to exit, and from then on a
worker given one of those signals ends at once, with status 0.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

from torch.utils.data import DataLoader

__all__ = ["IgnoreSignalsInWorker", "shield_workers", "shielded_init"]

_main_exiting: Any = None  # a byte in shared memory: 1 once this (main) process has begun to exit


def _exit_flag() -> Any:
    """The shared flag, made on first use; set by an exit hook that runs before multiprocessing's."""
    global _main_exiting
    if _main_exiting is None:
        _main_exiting = multiprocessing.RawValue("b", 0)
        # Exit hooks run last-registered first; multiprocessing registered its own on import.
        atexit.register(_raise_exit_flag)
    return _main_exiting


def _raise_exit_flag() -> None:
    _main_exiting.value = 1


class IgnoreSignalsInWorker:
    """A DataLoader ``worker_init_fn``: ignore ``signals`` in the worker, then run the loader's own.

    The signals are obeyed again once the main process has begun to exit.
    """

    def __init__(self, signals: Iterable[int], then: Callable[[int], Any] | None = None) -> None:
        self.signals = tuple(int(number) for number in signals)
        self.then = then
        self.main_exiting = _exit_flag()

    def __call__(self, worker_id: int) -> None:
        for number in self.signals:
            signal.signal(number, self._handle)
        if self.then is not None:
            self.then(worker_id)

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self.main_exiting.value:
            # The main process is terminating its workers: end quietly, as PyTorch's own workers do on
            # their parent's SIGTERM (dying of the signal would make the parent report a killed worker).
            os._exit(0)


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
