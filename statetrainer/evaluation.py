"""One-off evaluation and prediction, on the same machine of states as training.

``validate()`` runs the evaluation phases once and ``predict()`` runs a loader
through the model, each as a run of its own beside the training run: the
same model, step runner and seed, its own position and machine. Only the
callbacks' phase and batch hooks run in it, and not those of the callbacks
that write files (loggers, checkpoints): it is not an epoch, so nothing is
checkpointed, scheduled, stopped early or logged, no output folder is
touched, and the training run's position is as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .callbacks.base import Callback, TrainerView
from .data import PhaseSources, batch_source
from .distributed import Ranks, all_gather
from .outputs import RunOutputs
from .parts import Metrics, Position
from .phase import Phase
from .run import Run

__all__ = ["Evaluation"]


class Evaluation:
    """A one-off run of evaluation phases (``trainer.validation()``) or of a loader (``trainer.prediction()``).

    Inside its ``with`` block the trainer shows it: ``trainer.state``,
    ``trainer.phase``, ``trainer.batch`` and ``trainer.output`` are the
    evaluation's, and ``advance``/``run_until`` step it as they step training
    (a ``Breakpoint`` callback breaks in it too). ``fit()`` runs it to the end
    and returns its result. Leaving the block puts the trainer back: the
    training run as it was, the model in the mode it was in.

    Args:
        core: The evaluation's run.
        show: ``show(run)`` makes the trainer show ``run``; ``show(None)`` puts the training run back.
        model: The model, whose train or eval mode is put back afterwards.
        result: Gives the result once the run has finished.
    """

    def __init__(self, core: Run, show: Callable[[Run | None], None], model: nn.Module,
                 result: Callable[[], Any]) -> None:  # fmt: skip
        self.core, self._show, self._model, self._result = core, show, model, result
        self._training_mode = model.training

    def __enter__(self) -> Evaluation:
        self._training_mode = self._model.training
        self._show(self.core)
        return self

    def __exit__(self, *_exception: object) -> None:
        self.core.work.release()
        self._show(None)
        self._model.train(self._training_mode)

    def advance(self, count: int = 1) -> str:
        """Make ``count`` transitions of the evaluation (fewer if it ends first); return the new state."""
        self.core.advance(count)
        return self.core.machine.state

    def run_until(self, state: str | None = None, **conditions: Any) -> str:
        """Advance the evaluation until ``state`` is entered where ``conditions`` hold (as ``Trainer.run_until``)."""
        self.core.run_until(state, **conditions)
        return self.core.machine.state

    def fit(self) -> Any:
        """Run the evaluation to its end; return its result (the metrics, or the predictions)."""
        if not self.core.position.finished:
            self.core.fit()
        return self._result()

    def run(self) -> Any:
        """Open the evaluation, run it to its end and close it: ``validate()`` and ``predict()``."""
        with self:
            return self.fit()


def evaluation_run(training: Run, target: Any, phases: Sequence[Phase], sources: PhaseSources,
                   callbacks: Sequence[Callback], forward: Callable[[Any, Any], Any],
                   unpack: Callable[[Any], tuple[Any, Any]]) -> Run:  # fmt: skip
    """A run of ``phases`` once, beside ``training``: at its epoch and step, with its parts, no stop signals, and
    none of the ``callbacks`` that write files."""
    done = training.position
    quiet = [callback for callback in callbacks if not callback.output_files()]
    outputs = RunOutputs([], training.outputs.run, training.ranks, training.outputs.device)
    position = Position(epoch=done.epochs_done, epochs_done=done.epochs_done, global_step=done.global_step)
    sources.position = position
    work = training.work
    return Run(target, phases=phases, epochs=position.epochs_done + 1, max_steps=None, sources=sources,
               step_runner=work.step_runner, generators=work.generators, position=position, forward=forward,
               unpack=unpack, callbacks=quiet, stop_signals=(), deterministic=training.deterministic,
               outputs=outputs, ranks=training.ranks, evaluation=True)  # fmt: skip


def validation(training: Run, target: Any, phase: str | None, callbacks: Sequence[Callback], metrics: Metrics,
               forward: Callable[[Any, Any], Any], show: Callable[[Run | None], None]) -> Evaluation:  # fmt: skip
    """The evaluation phases of ``training`` (or the one named ``phase``), once, with ``callbacks``; its result is
    the metrics they publish for those phases."""
    training.check_between_epochs("validate()")
    work = training.work
    evaluated = [each for each in work.phases if not each.grad and (phase is None or each.name == phase)]
    if not evaluated:
        names = ", ".join(repr(each.name) for each in work.phases if not each.grad) or "none"
        if phase is None:
            raise ValueError("validate(): this run has no evaluation phase (grad=False); it has none to run")
        raise ValueError(f"validate(): {phase!r} is not an evaluation phase (grad=False) of this run; they are {names}")
    indices = [work.phases.index(each) for each in evaluated]
    # The training run's sources, so each phase runs in the order it has in fit(); a stream phase gets a source of
    # its own, so its stream stays where training left it.
    ranks = training.ranks
    chosen = [work.sources[index] if work.sources.streams[index] is None
              else batch_source(work.phases[index].loader, index, (), ranks.rank, ranks.world_size)
              for index in indices]  # fmt: skip
    sources = PhaseSources([each.name for each in evaluated], chosen, world_size=ranks.world_size)
    run = evaluation_run(training, target, evaluated, sources, callbacks, forward, work.unpack)
    prefixes = tuple(f"{each.name}_" for each in evaluated)
    return Evaluation(run, show, work.step_runner.model,
                      lambda: {name: value for name, value in metrics.items() if name.startswith(prefixes)})  # fmt: skip


class _Outputs(Callback):
    """Keeps the model's output of every batch, in order."""

    def __init__(self) -> None:
        self.outputs: list[Any] = []

    def on_exit_batch(self, trainer: TrainerView) -> None:
        self.outputs.append(trainer.output)


def prediction(training: Run, target: Any, loader: Any, inputs: Callable[[Any], Any] | None,
               callbacks: Sequence[Callback], show: Callable[[Run | None], None]) -> Evaluation:  # fmt: skip
    """``loader`` run through the model once, with ``callbacks``: its result is the outputs, batch by batch, in the
    loader's order (under torchrun rank 0 gets every rank's share of each batch, and the others None)."""
    training.check_between_epochs("predict()")
    if inputs is not None and not callable(inputs):
        raise TypeError(f"predict(): inputs must take the model's input out of a batch, got {inputs!r}")
    phase = Phase("predict", loader, grad=False)
    ranks = training.ranks
    sources = PhaseSources.for_phases([phase], rank=ranks.rank, world_size=ranks.world_size)
    model, take = training.work.step_runner.model, inputs or _as_it_is
    collected = _Outputs()
    run = evaluation_run(training, target, [phase], sources, [*callbacks, collected],
                         lambda batch_inputs, _target: (model(batch_inputs), None),
                         lambda batch: (take(batch), None))  # fmt: skip
    device = training.work.device
    return Evaluation(run, show, model, lambda: gather_outputs(collected.outputs, ranks, device))


def _as_it_is(batch: Any) -> Any:
    return batch


def gather_outputs(outputs: list[Any], ranks: Ranks, device: torch.device) -> list[Any] | None:
    """Every rank's share of each batch's output, joined in rank order on rank 0 (None on the others).

    The shares of one batch may differ in size by a sample (a short last batch), so each tensor is padded to the
    largest share for the exchange and cut back after it.
    """
    if not ranks.distributed:
        return outputs
    joined: list[Any] = []
    for output in outputs:
        leaves, spec = tree_flatten(output)
        if not all(isinstance(leaf, torch.Tensor) and leaf.dim() > 0 for leaf in leaves):
            raise TypeError("predict() under torchrun gathers the outputs' tensors along their first dimension; "
                            "the model returned something else")  # fmt: skip
        gathered = []
        for leaf in leaves:
            sizes = [int(size) for size in all_gather(torch.tensor([len(leaf)], device=leaf.device), ranks, device)]
            padded = torch.zeros((max(sizes), *leaf.shape[1:]), dtype=leaf.dtype, device=leaf.device)
            padded[: len(leaf)] = leaf
            parts = all_gather(padded, ranks, device)
            gathered.append(torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)]))
        joined.append(tree_unflatten(gathered, spec))
    return joined if ranks.is_global_zero else None
