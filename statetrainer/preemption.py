"""Stopping on a scheduler's signal: finish the batch in flight, save exactly there, exit.

Schedulers warn before they kill: SLURM, Kubernetes, torchrun and spot VMs
send SIGTERM (SLURM's ``--signal`` can send SIGUSR1 ahead of the time limit),
then SIGKILL after a grace period. While ``fit()`` or ``advance()`` runs, the
trainer catches its stop signals; the first one asks for a stop at the next
batch boundary, where the trainer saves and raises ``Preempted``. A second
Ctrl-C aborts at once.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

__all__ = ["DEFAULT_STOP_SIGNALS", "SignalCatcher", "resolve_signals"]

DEFAULT_STOP_SIGNALS: tuple[str, ...] = ("SIGTERM", "SIGINT")
_UNCATCHABLE = {signal.SIGKILL, signal.SIGSTOP}


def resolve_signals(signals: Iterable[str | int | signal.Signals] | None) -> tuple[signal.Signals, ...]:
    """Signals from names (``"SIGTERM"``, ``"TERM"``), numbers or ``signal.Signals``.

    Raises:
        ValueError: A name or number is not a signal here, or the signal cannot be caught.
        TypeError: An entry is neither a name nor a number.
    """
    if signals is None:
        return ()
    if isinstance(signals, (str, int)):
        signals = (signals,)
    resolved: list[signal.Signals] = []
    for entry in signals:
        if isinstance(entry, str):
            name = entry.upper() if entry.upper().startswith("SIG") else f"SIG{entry.upper()}"
            try:
                number = signal.Signals[name]
            except KeyError:
                raise ValueError(
                    f"unknown signal {entry!r} in stop_signals; use names such as 'SIGTERM', 'SIGINT' or 'SIGUSR1' "
                    f"(this platform has {', '.join(sorted(s.name for s in signal.valid_signals() if isinstance(s, signal.Signals)))})"
                ) from None
        elif isinstance(entry, int) and not isinstance(entry, bool):
            try:
                number = signal.Signals(entry)
            except ValueError:
                raise ValueError(f"{entry} in stop_signals is not a signal number on this platform") from None
        else:
            raise TypeError(f"stop_signals holds signal names or numbers, got {type(entry).__name__} {entry!r}")
        if number in _UNCATCHABLE:
            raise ValueError(f"{number.name} in stop_signals cannot be caught by any process; use SIGTERM or SIGUSR1")
        if number not in resolved:
            resolved.append(number)
    return tuple(resolved)


class SignalCatcher:
    """Handles ``signals`` while entered, in the main thread only, and puts the previous handlers back after.

    A signal ignored when it is entered stays ignored, as Python itself leaves
    an ignored SIGINT: a shell ignores SIGINT for a job it starts in the
    background (``cmd &`` in a script), so a Ctrl-C meant for another program
    does not stop the run.

    The first signal calls ``on_signal(signal)`` and is remembered in
    ``received``. A second SIGINT means the user does not want to wait: it
    raises ``KeyboardInterrupt`` at once. Other repeats change nothing (a
    launcher and a scheduler may both forward one SIGTERM).
    """

    def __init__(self, signals: tuple[signal.Signals, ...], on_signal: Callable[[signal.Signals], None]) -> None:
        self.signals = signals
        self.received: signal.Signals | None = None
        self._on_signal = on_signal
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> SignalCatcher:
        if self.signals and threading.current_thread() is threading.main_thread():
            for number in self.signals:
                if signal.getsignal(number) is not signal.SIG_IGN:  # ignored on entry (a background job's SIGINT)
                    self._previous[number] = signal.signal(number, self._handle)  # stays ignored, as in Python
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._restore()

    def _restore(self) -> None:
        previous, self._previous = self._previous, {}
        for number, handler in previous.items():
            # None: a handler installed outside Python, which cannot be put back; the default is the closest.
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)

    def _handle(self, number: int, frame: FrameType | None) -> None:
        received = signal.Signals(number)
        if self.received is None:
            self.received = received
            self._on_signal(received)
        elif received == signal.SIGINT:
            self._restore()
            raise KeyboardInterrupt
