"""Breakpoints: the debugger at a state's entry or exit, where a condition holds."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from ..machine import STATES
from .base import Callback, TrainerView

__all__ = ["Breakpoint"]


class Breakpoint(Callback):
    """Drops into the debugger on entering (or leaving) ``state`` where ``when(trainer)`` holds.

    It calls Python's ``breakpoint()``, so ``PYTHONBREAKPOINT`` and IDE debuggers
    apply; the debugger opens in a frame holding ``trainer``, ``batch``,
    ``batch_samples`` (its dataset indices), ``output``, ``loss`` and ``model``. Gradients are there on *leaving*
    ``backward`` (``Breakpoint("backward", enter=False)``): entering it, the
    backward pass has not run. Continuing in the debugger continues the run.

    Entering ``batch``, the batch is loaded but forward has not run (``loss`` is
    None); leaving it, ``output`` and ``loss`` are there.

    Under torchrun only rank ``rank`` breaks, through ``torch.distributed.breakpoint``
    (its debugger opens one frame down: ``up`` reaches this one); the others
    wait at a barrier until it continues.

    Args:
        state: One of ``idle, epoch, phase, batch, backward, step``.
        enter: Break on entering the state; False: on leaving it.
        when: A predicate of the trainer; None breaks every time.
        rank: The rank that breaks under torchrun.
        name: The callback's unique name (defaults to the class name).
    """

    def __init__(self, state: str, enter: bool = True, when: Callable[[Any], bool] | None = None, rank: int = 0,
                 name: str | None = None) -> None:  # fmt: skip
        if state not in STATES:
            raise ValueError(f"Breakpoint: unknown state {state!r}; states are {', '.join(STATES)}")
        if when is not None and not callable(when):
            raise TypeError(f"Breakpoint: when must be a predicate of the trainer, got {type(when).__name__}")
        self.state, self.enter, self.when, self.rank, self.name = state, enter, when, rank, name
        self.hits = 0  # times it has broken

    def active_hooks(self) -> dict[str, Callable[[Any], None]]:
        """Only the one hook it breaks in: every other state costs nothing."""
        return {f"on_{'enter' if self.enter else 'exit'}_{self.state}": self.stop_here}

    def stop_here(self, trainer: TrainerView) -> None:
        if self.when is not None and not self.when(trainer):
            return
        batch, output, loss, model = trainer.batch, trainer.output, trainer.loss, trainer.model  # noqa: F841 -- for the debugger
        batch_samples = trainer.batch_samples  # noqa: F841 -- for the debugger: the batch's dataset indices
        if trainer.ranks.world_size > 1:
            dist.breakpoint(rank=self.rank)
        else:
            breakpoint()
        self.hits += 1  # the debugger stops here, the frame's names in reach; c goes on
