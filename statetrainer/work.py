"""What each state does on entry, around its callbacks: the run's bookkeeping, the data, the step.

The machine calls a state's *prepare* before its ``on_enter`` callbacks (so
they see the new batch index) and its *work* after them. Each call receives
the trainer, whose position and current batch it updates; the optimizer's
side is the ``StepRunner``'s.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from itertools import islice
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.parallel import DistributedDataParallel

from .data import BatchCursor, PhaseSources, to_device
from .optimizer_step import StepRunner

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["StateWork"]

_NO_CONTEXT = contextlib.nullcontext()


class StateWork:
    """The states' work for one trainer, and the open phase's batches.

    Attributes:
        cursor: The open phase's batches; None between phases.
        incoming: The batch the next ``start_batch`` makes current.
    """

    def __init__(self, sources: PhaseSources, step_runner: StepRunner, device: torch.device) -> None:
        self.sources, self.step_runner, self.device = sources, step_runner, device
        self.cursor: BatchCursor | None = None
        self.incoming: Any = None
        self._move_batches = device.type != "cpu"
        self._contexts: tuple[Any, Any] | None = None
        model, accumulate = step_runner.model, step_runner.accumulate
        # Under DDP, a batch that does not end its accumulation window skips the gradient all-reduce.
        self._no_sync = model.no_sync if isinstance(model, DistributedDataParallel) and accumulate > 1 else None
        self._weighs_shares = False  # the open phase's ranks hold shares of different sizes in some batch

    def prepare_calls(self) -> dict[str, Callable[[Trainer], None]]:
        return {"idle": self.prepare_idle, "epoch": self.prepare_epoch, "phase": self.prepare_phase,
                "batch": self.prepare_batch, "step": self.prepare_step}  # fmt: skip

    def work_calls(self) -> dict[str, Callable[[Trainer], None]]:
        return {"phase": self.open_new_phase, "batch": self.run_batch, "backward": self.run_backward,
                "step": self.run_step}  # fmt: skip

    def release(self) -> None:
        """Let go of the open phase's loader, so a DataLoader's workers shut down now."""
        if self.cursor is not None:
            self.cursor.close()
            self.cursor = None

    def why_not_resumable(self, phase_index: int) -> str | None:
        """Why the open phase cannot be resumed after its current batch; None when it can."""
        source = self.sources[phase_index]
        if not source.resumable:
            return source.reason
        if source.keeps_own_state and self.cursor is not None and self.cursor.looked_ahead:
            return ("the trainer has read its next batch already, to see whether the phase ends, "
                    "so the loader's saved position would skip that batch")  # fmt: skip
        return None

    def prepare_idle(self, trainer: Trainer) -> None:
        trainer.position.finished = True

    def prepare_epoch(self, trainer: Trainer) -> None:
        trainer.position.epoch, trainer.position.phase_index = trainer.position.epochs_done, -1
        trainer.phase = None  # as a run resumed at this point has it

    def prepare_phase(self, trainer: Trainer) -> None:
        trainer.position.phase_index += 1
        trainer.phase = trainer.phases[trainer.position.phase_index]
        trainer.position.batch_index = -1

    def open_new_phase(self, trainer: Trainer) -> None:
        if trainer.phase.grad:
            self.step_runner.zero_grad()
        self.open_phase(trainer, start=0)

    def open_phase(self, trainer: Trainer, start: int) -> None:
        """Set train/eval and grad mode and open the phase's batches at batch ``start``."""
        grad, autocast = trainer.phase.grad, self.step_runner.autocast
        trainer.model.train(grad)
        grad_context = (None if torch.is_grad_enabled() else torch.enable_grad()) if grad else torch.no_grad()
        no_contexts = grad_context is None and autocast is None
        self._contexts = None if no_contexts else (grad_context or _NO_CONTEXT, autocast or _NO_CONTEXT)
        source = self.sources[trainer.position.phase_index]
        batches, limit = source.open(trainer.seed, trainer.epoch, start), trainer.phase.limit
        if limit is not None:  # the first ``limit`` batches of the loader's order
            batches = islice(batches, max(limit - start, 0))
        length = trainer.phase.batches(source.pass_length)
        self.cursor = BatchCursor(batches, length, start)
        self._weighs_shares = getattr(source, "uneven", False)
        trainer.loss_weight = 1.0

    def prepare_batch(self, trainer: Trainer) -> None:
        trainer.position.batch_index += 1
        trainer.batch, self.incoming = self.incoming, None
        trainer.target = trainer.output = trainer.loss = None

    def run_batch(self, trainer: Trainer) -> None:
        if self._move_batches:
            trainer.batch = to_device(trainer.batch, self.device, non_blocking=True)
        inputs, target = trainer.unpack(trainer.batch)
        trainer.target = target
        contexts = self._contexts
        if self._no_sync is not None and trainer.phase.grad and not self.ends_window(trainer):
            contexts = (self._no_sync(), *(contexts or (_NO_CONTEXT, _NO_CONTEXT)))
        if contexts is None:
            trainer.output, trainer.loss = trainer.forward(inputs, target)
        else:
            with contexts[0], contexts[1], contexts[2] if len(contexts) > 2 else _NO_CONTEXT:
                trainer.output, trainer.loss = trainer.forward(inputs, target)
        if self._weighs_shares:  # this rank's share of a global batch the ranks share unevenly
            position = trainer.position
            trainer.loss_weight = self.sources[position.phase_index].share_weight(position.batch_index)

    def ends_window(self, trainer: Trainer) -> bool:
        """Whether the current batch is the last of its accumulation window (a step follows it)."""
        return (trainer.position.batch_index + 1) % self.step_runner.accumulate == 0 or self.cursor.is_last()

    def run_backward(self, trainer: Trainer) -> None:
        weight = trainer.loss_weight  # so the step follows the mean of a global batch shared unevenly
        self.step_runner.backward(trainer.loss if weight == 1.0 else trainer.loss * weight)

    def prepare_step(self, trainer: Trainer) -> None:
        self.step_runner.close_window(trainer.position.batch_index % self.step_runner.accumulate + 1)

    def run_step(self, trainer: Trainer) -> None:
        self.step_runner.step()
        trainer.position.global_step += 1
