"""The library's exceptions, in one place below every other module."""

from __future__ import annotations

import signal
from pathlib import Path

from transitions import MachineError

__all__ = ["CheckpointError", "HalfLoadedError", "InvalidMove", "Preempted"]


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be used; the message says why."""


class HalfLoadedError(CheckpointError):
    """A part failed to load after every check passed: the trainer holds part of a checkpoint and cannot be used."""


class InvalidMove(MachineError):
    """An event was fired from a state that has no transition for it."""

    def __str__(self) -> str:
        return str(self.value)


class Preempted(SystemExit):
    """The run stopped on a signal, at a batch boundary, after saving its position if it could.

    A ``SystemExit``: left uncaught, it ends the process with status 128 + the
    signal's number (143 for SIGTERM, 130 for SIGINT), as if the signal had
    killed it, and code after ``fit()`` (an evaluation, an export) does not
    run on a half-trained model. Catch it to do something else.

    Attributes:
        signal: The signal that stopped the run.
        checkpoint: The checkpoint written at the stop, or None if nothing was saved.
        message: What happened, and where a restart resumes.
    """

    def __init__(self, received: signal.Signals, checkpoint: Path | None, message: str) -> None:
        super().__init__(128 + int(received))
        self.signal = received
        self.checkpoint = checkpoint
        self.message = message

    def __str__(self) -> str:
        return self.message
