"""What each state does on entry, around its callbacks: the run's bookkeeping, the data, the step.

The machine calls a state's *prepare* before its ``on_enter`` callbacks (so
they see the new batch index) and its *work* after them. Every call receives
the machine's target (the trainer, for the callbacks) and ignores it: the work
updates the run's ``Position`` and its own current phase and batch; the
optimizer's side is the ``StepRunner``'s.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from functools import partial
from itertools import islice
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from .data import BatchCursor, PassStream, PhaseSources, SeededLoader, to_device
from .optimizer_step import StepRunner
from .parts import Position
from .phase import Phase
from .rng import Generators

__all__ = ["StateWork"]

_NO_CONTEXT = contextlib.nullcontext()


class StateWork:
    """The states' work for one run: the current phase and batch, and the open phase's batches.

    Args:
        phases: The run's phases, in order.
        sources: Their batch sources.
        step_runner: Runs backward and the optimizer step.
        generators: The run's generators (their seed orders the loaders).
        position: The run's position, which the work advances.
        forward: ``forward(inputs, target)`` gives ``(output, loss)`` (the trainer's, which a subclass overrides).
        unpack: Turns a batch into ``(inputs, target)``.
        max_steps: The run ends after this optimizer step: a training phase ends there and later ones are
            passed over. None: no limit.

    Attributes:
        phase, batch, target, output, loss: The current phase, batch (on the device) and its results.
        loss_weight: How much this rank's loss weighs in its global batch's mean, times the world size.
        cursor: The open phase's batches; None between phases.
        incoming: The batch the next ``start_batch`` makes current.
    """

    def __init__(
        self,
        phases: Sequence[Phase],
        sources: PhaseSources,
        step_runner: StepRunner,
        generators: Generators,
        position: Position,
        forward: Callable[[Any, Any], tuple[Any, torch.Tensor]],
        unpack: Callable[[Any], tuple[Any, Any]],
        max_steps: int | None = None,
    ) -> None:
        self.phases, self.sources, self.step_runner, self.generators = phases, sources, step_runner, generators
        self.position, self.forward, self.unpack, self.max_steps = position, forward, unpack, max_steps
        self.device = step_runner.device
        self.phase: Phase | None = None
        self.grad = False  # whether the current phase trains (read per batch)
        self.batch: Any = None
        self.target: Any = None
        self.output: Any = None
        self.loss: torch.Tensor | None = None
        self.loss_weight = 1.0
        self.cursor: BatchCursor | None = None
        self.incoming: Any = None
        self._move_batches = self.device.type != "cpu"
        self._contexts: tuple[Any, Any] | None = None
        model, accumulate = step_runner.model, step_runner.accumulate
        # Under DDP, a batch that does not end its accumulation window skips the gradient all-reduce.
        self._no_sync = model.no_sync if isinstance(model, DistributedDataParallel) and accumulate > 1 else None
        # The open phase's ranks hold shares of different sizes in some batch: this rank's share's weight.
        self._share_weight: Callable[[int], float] | None = None

    def prepare_calls(self) -> dict[str, Callable[[Any], None]]:
        return {"idle": self.prepare_idle, "epoch": self.prepare_epoch, "phase": self.prepare_phase,
                "batch": self.prepare_batch, "step": self.prepare_step}  # fmt: skip

    def work_calls(self) -> dict[str, Callable[[Any], None]]:
        return {"phase": self.open_new_phase, "batch": self.run_batch, "backward": self.run_backward,
                "step": self.run_step}  # fmt: skip

    @property
    def batch_samples(self) -> list[int] | None:
        """The dataset indices of the current batch in this process (see ``BatchSource.batch_samples``): a
        rebuilt DataLoader's (a ``DistributedSampler``'s too), this rank's share; a list's, the batch's place in
        it. None before a phase's first batch and for a loader the trainer uses as it is."""
        if self.phase is None or self.batch is None or self.position.batch_index < 0:
            return None
        index = self.position.phase_index
        stream = self.sources.streams[index]
        number = self.position.batch_index if stream is None else stream.taken - 1  # the batch's number in its pass
        return self.sources[index].batch_samples(number)

    @property
    def phase_batches(self) -> int | None:
        """The current phase's batches per epoch in this process (its share under torchrun); None: unknown."""
        if self.phase is None:
            return None
        return self.phase.epoch_length(self.sources[self.position.phase_index].length)

    @property
    def steps_per_epoch(self) -> int | None:
        """The optimizer steps of an epoch in this process (every rank takes as many), counting each training
        phase's ``limit`` or ``batches`` and ``accumulate``; None when a training phase's length is unknown."""
        steps = 0
        for index, phase in enumerate(self.phases):
            if phase.grad:
                length = phase.epoch_length(self.sources[index].length)
                if length is None:
                    return None
                steps += math.ceil(length / self.step_runner.accumulate)
        return steps

    @property
    def steps_done(self) -> bool:
        """Whether the run has taken its ``max_steps``."""
        return self.position.took(self.max_steps)

    def next_phase_index(self) -> int:
        """The index of the epoch's next phase to run (the phase count: none); training phases are passed over
        once ``max_steps`` are taken."""
        index = self.position.phase_index + 1
        if self.steps_done:
            while index < len(self.phases) and self.phases[index].grad:
                index += 1
        return index

    def release(self) -> None:
        """Let go of the open phase's loader and the streams, so DataLoaders' workers shut down now."""
        if self.cursor is not None:
            self.cursor.close()
            self.cursor = None
        self.sources.close_streams()

    def take_back_batch(self) -> None:
        """Put the current batch back into its phase's stream (an error discarded it; a resume runs it again)."""
        stream = self.sources.streams[self.position.phase_index]
        if stream is not None:
            stream.take_back()

    def why_not_resumable(self) -> str | None:
        """Why the open phase cannot be resumed after its current batch; None when it can."""
        source = self.sources[self.position.phase_index]
        if not source.resumable:
            return source.reason
        if source.keeps_own_state and self.cursor is not None and self.cursor.looked_ahead:
            return ("the trainer has read its next batch already, to see whether the phase ends, "
                    "so the loader's saved position would skip that batch")  # fmt: skip
        return None

    def prepare_idle(self, _target: Any) -> None:
        self.position.finished = True
        self.sources.close_streams()

    def prepare_epoch(self, _target: Any) -> None:
        position = self.position
        position.epoch, position.phase_index = position.epochs_done, -1
        self.phase, self.grad = None, False  # as a run resumed at this point has it

    def prepare_phase(self, _target: Any) -> None:
        self.position.phase_index = self.next_phase_index()
        self.phase = self.phases[self.position.phase_index]
        self.grad = self.phase.grad
        self.position.batch_index = -1

    def open_new_phase(self, _target: Any) -> None:
        assert self.phase is not None
        if self.phase.grad:
            self.step_runner.zero_grad()
        self.open_phase(start=0)

    def resume_phase(self) -> None:
        """After a load: the current phase as the position says (the run core reopens its batches mid-phase)."""
        index = self.position.phase_index
        self.phase = self.phases[index] if index >= 0 else None
        self.grad = self.phase is not None and self.phase.grad

    def open_phase(self, start: int) -> None:
        """Set train/eval and grad mode and open the phase's batches at batch ``start``."""
        phase, autocast = self.phase, self.step_runner.autocast
        assert phase is not None
        self.step_runner.model.train(phase.grad)
        grad_context = (None if torch.is_grad_enabled() else torch.enable_grad()) if phase.grad else torch.no_grad()
        no_contexts = grad_context is None and autocast is None
        self._contexts = None if no_contexts else (grad_context or _NO_CONTEXT, autocast or _NO_CONTEXT)
        index = self.position.phase_index
        source, stream = self.sources[index], self.sources.streams[index]
        if stream is not None:  # the stream goes on where it stands: its next ``phase.batches``
            batches, length = stream.batches(self.generators.seed), phase.batches
        else:  # pass ``epoch``, from batch ``start``
            batches = source.open(self.generators.seed, self.position.epoch, start)
            if phase.limit is not None:  # the first ``limit`` batches of the loader's order
                batches = islice(batches, max(phase.limit - start, 0))
            length = phase.epoch_length(source.pass_length)
        stop = self._last_step_batch(start) if phase.grad else None
        if stop is not None:  # max_steps ends the phase at the end of a window
            if length is None:
                batches = islice(batches, max(stop - start, 0))
            else:
                length = min(length, stop)
        self.cursor = BatchCursor(batches, length, start)
        self._share_weight = None
        if isinstance(source, SeededLoader) and source.uneven:
            self._share_weight = source.share_weight if stream is None else partial(_stream_share_weight, stream)
        self.loss_weight = 1.0

    def _last_step_batch(self, start: int) -> int | None:
        """The batch count after which the run's ``max_steps``-th step is taken, in a training phase opened at
        batch ``start``; None without ``max_steps``."""
        if self.max_steps is None:
            return None
        accumulate = self.step_runner.accumulate
        return accumulate * (start // accumulate + self.max_steps - self.position.global_step)

    def prepare_batch(self, _target: Any) -> None:
        self.position.batch_index += 1
        self.batch, self.incoming = self.incoming, None
        self.target = self.output = self.loss = None

    def run_batch(self, _target: Any) -> None:
        if self._move_batches:
            self.batch = to_device(self.batch, self.device, non_blocking=True)
        inputs, target = self.unpack(self.batch)
        self.target = target
        contexts = self._contexts
        if self._no_sync is not None and self.grad and not self.ends_window():
            contexts = (self._no_sync(), *(contexts or (_NO_CONTEXT, _NO_CONTEXT)))
        if contexts is None:
            self.output, self.loss = self.forward(inputs, target)
        else:
            with contexts[0], contexts[1], contexts[2] if len(contexts) > 2 else _NO_CONTEXT:
                self.output, self.loss = self.forward(inputs, target)
        if self._share_weight is not None:  # this rank's share of a global batch the ranks share unevenly
            self.loss_weight = self._share_weight(self.position.batch_index)

    def ends_phase(self) -> bool:
        """Whether the current batch is the open phase's last."""
        return self.cursor is not None and self.cursor.is_last()

    def ends_window(self) -> bool:
        """Whether the current batch is the last of its accumulation window (a step follows it)."""
        return (self.position.batch_index + 1) % self.step_runner.accumulate == 0 or self.ends_phase()

    def run_backward(self, _target: Any) -> None:
        weight, loss = self.loss_weight, self.loss  # so the step follows the mean of a global batch shared unevenly
        assert loss is not None
        self.step_runner.backward(loss if weight == 1.0 else loss * weight)

    def prepare_step(self, _target: Any) -> None:
        self.step_runner.close_window(self.position.batch_index % self.step_runner.accumulate + 1)

    def run_step(self, _target: Any) -> None:
        self.step_runner.step()
        self.position.global_step += 1


def _stream_share_weight(stream: PassStream, _batch_index: int) -> float:
    """This rank's weight of the stream's current batch, whose index in its pass is the stream's own count."""
    source = stream.source
    assert isinstance(source, SeededLoader)
    return source.share_weight(stream.taken - 1)
