"""One-off evaluation and prediction, on the same machine of states as training.

``validate()`` runs the evaluation phases once and ``predict()`` runs a loader
through the model, each as a run of its own beside the training run: the
same model, step runner and seed, its own position and machine. Only the
callbacks' phase and batch hooks run in it, and not those of the callbacks
that write files (loggers, checkpoints) or that judge training
(``runs_in_evaluation = False``: ``EarlyStopping``). It is not an epoch, so
nothing is checkpointed, scheduled, stopped early or logged, and no output
folder is touched. What it changes is put back when it ends: the random
generators, ``trainer.metrics``, the callbacks' states and the positions of
loaders that keep their own, so a run that validates goes on exactly as one
that does not.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .callbacks.base import Callback, TrainerView
from .data import PassStream, PhaseSources, SeededLoader, StatefulSource, batch_source
from .distributed import Ranks, all_gather
from .outputs import RunOutputs
from .parts import Metrics, Position
from .phase import Phase
from .rng import capture_rng, restore_rng
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
        keep: ``keep()`` takes what the evaluation may change and gives the call that puts it back.
        result: Gives the result once the run has finished.
    """

    def __init__(self, core: Run, show: Callable[[Run | None], None], keep: Callable[[], Callable[[], None]],
                 result: Callable[[], Any]) -> None:  # fmt: skip
        self.core, self._show, self._keep, self._result = core, show, keep, result
        self._put_back: Callable[[], None] | None = None

    def __enter__(self) -> Evaluation:
        put_back = self._keep()
        self._show(self.core)  # refuses a second open evaluation
        self._put_back = put_back
        return self

    def __exit__(self, *_exception: object) -> None:
        put_back, self._put_back = self._put_back, None
        self.core.work.release()
        self._show(None)
        if put_back is not None:
            put_back()

    def advance(self, count: int = 1) -> str:
        """Make ``count`` transitions of the evaluation (fewer if it ends first); return the new state."""
        self._check_open("advance()")
        self.core.advance(count)
        return self.core.machine.state

    def run_until(self, state: str | None = None, **conditions: Any) -> str:
        """Advance the evaluation until ``state`` is entered where ``conditions`` hold (as ``Trainer.run_until``)."""
        self._check_open("run_until()")
        self.core.run_until(state, **conditions)
        return self.core.machine.state

    def fit(self) -> Any:
        """Run the evaluation to its end; return its result (the metrics, or the predictions)."""
        self._check_open("fit()")
        if not self.core.position.finished:
            self.core.fit()
        if self.core.position.stop_requested:
            warnings.warn("the evaluation was stopped (trainer.stop()) before its end: its result covers the batches "
                          "it ran; the training run is not stopped", stacklevel=3)  # fmt: skip
        return self._result()

    def _check_open(self, what: str) -> None:
        if self._put_back is None:
            raise RuntimeError(f"{what}: step an evaluation inside its with block: "
                               "with trainer.validation() as evaluation: evaluation.run_until(...)")  # fmt: skip

    def run(self) -> Any:
        """Open the evaluation, run it to its end and close it: ``validate()`` and ``predict()``."""
        with self:
            return self.fit()


def evaluation_run(training: Run, target: Any, phases: Sequence[Phase], sources: PhaseSources,
                   callbacks: Sequence[Callback], forward: Callable[[Any, Any], Any],
                   unpack: Callable[[Any], tuple[Any, Any]]) -> Run:  # fmt: skip
    """A run of ``phases`` once, beside ``training``: at its epoch and step, with its parts and ``callbacks`` (those
    that run in evaluations: see ``evaluated_callbacks``), and no stop signals."""
    done = training.position
    outputs = RunOutputs([], training.outputs.run, training.ranks, training.outputs.device)
    position = Position(epoch=done.epochs_done, epochs_done=done.epochs_done, global_step=done.global_step)
    sources.position = position
    work = training.work
    return Run(target, phases=phases, epochs=position.epochs_done + 1, max_steps=None, sources=sources,
               step_runner=work.step_runner, generators=work.generators, position=position, forward=forward,
               unpack=unpack, callbacks=callbacks, stop_signals=(), deterministic=training.deterministic,
               outputs=outputs, ranks=training.ranks, evaluation=True)  # fmt: skip


def evaluated_callbacks(callbacks: Iterable[Callback]) -> list[Callback]:
    """The callbacks whose hooks run in an evaluation: not those that write files, nor those that judge training."""
    return [callback for callback in callbacks if callback.runs_in_evaluation and not callback.output_files()]


def keeper(training: Run, metrics: Metrics, callbacks: Sequence[Callback],
           sources: Sequence[tuple[StatefulSource, PassStream | None]]) -> Callable[[], Callable[[], None]]:  # fmt: skip
    """``keep()`` for an evaluation beside ``training``: it takes the generators, the model's mode, ``metrics``,
    the ``callbacks``' states and the positions of ``sources`` (loaders that keep their own, each with the
    training stream that reads it, if any), and gives the call that puts them back."""
    cuda_devices, model = training.work.generators.cuda_devices, training.work.step_runner.model

    def keep() -> Callable[[], None]:
        generators, metrics_before, mode = capture_rng(cuda_devices), dict(metrics), model.training
        states = [(callback, copy.deepcopy(callback.state_dict())) for callback in callbacks]
        positions = [(source, stream, source.state_dict(), source.pass_state()) for source, stream in sources]

        def put_back() -> None:
            for source, stream, state, pass_state in positions:
                if stream is not None:
                    stream.close()  # it reopens from the loader's saved position
                source.load_state_dict(state, pass_state)
            for callback, state in states:
                callback.load_state_dict(state)
            metrics.clear()
            metrics.update(metrics_before)
            restore_rng(generators, cuda_devices)
            model.train(mode)

        return put_back

    return keep


def validation(training: Run, target: Any, phase: str | None, callbacks: Sequence[Callback], metrics: Metrics,
               forward: Callable[[Any, Any], Any], show: Callable[[Run | None], None]) -> Evaluation:  # fmt: skip
    """The evaluation phases of ``training`` (or the one named ``phase``), once, with ``callbacks``; its result is
    the metrics they publish for those phases: what they would publish in ``fit()`` at this point."""
    training.check_between_epochs("validate()")
    work = training.work
    evaluated = [each for each in work.phases if not each.grad and (phase is None or each.name == phase)]
    if not evaluated:
        names = ", ".join(repr(each.name) for each in work.phases if not each.grad) or "none"
        if phase is None:
            raise ValueError("validate(): this run has no evaluation phase (grad=False); it has none to run")
        raise ValueError(f"validate(): {phase!r} is not an evaluation phase (grad=False) of this run; they are {names}")
    indices = [work.phases.index(each) for each in evaluated]
    ranks, chosen, streams = training.ranks, [], []
    kept: list[tuple[StatefulSource, PassStream | None]] = []
    for index in indices:
        source, stream = work.sources[index], work.sources.streams[index]
        if isinstance(source, StatefulSource):
            kept.append((source, stream))
        if stream is None:  # the training run's source: the phase runs in the order it has in fit()
            chosen.append(source)
            streams.append(None)
            continue
        # A stream's next batches, read through a copy of it, so the training stream stays where it is.
        fresh = batch_source(work.phases[index].loader, index, (), ranks.rank, ranks.world_size)
        if isinstance(source, StatefulSource) and isinstance(fresh, StatefulSource):
            fresh.load_state_dict(source.state_dict(), source.pass_state())
        copied = PassStream(fresh, stream.name)
        copied.load_state_dict(stream.state_dict())
        chosen.append(fresh)
        streams.append(copied)
    sources = PhaseSources([each.name for each in evaluated], chosen, world_size=ranks.world_size, streams=streams)
    running = evaluated_callbacks(callbacks)
    run = evaluation_run(training, target, evaluated, sources, running, forward, work.unpack)
    prefixes = tuple(f"{each.name}_" for each in evaluated)
    keep = keeper(training, metrics, running, kept)
    return Evaluation(run, show, keep,
                      lambda: {name: value for name, value in metrics.items() if name.startswith(prefixes)})  # fmt: skip


class _Outputs(Callback):
    """Keeps the model's output of every batch, in order."""

    def __init__(self) -> None:
        self.outputs: list[Any] = []

    def on_exit_batch(self, trainer: TrainerView) -> None:
        self.outputs.append(trainer.output)


class _OnePass:
    """An iterator given to ``predict()``, which reads it once: the re-iterable a phase takes."""

    def __init__(self, iterator: Iterator[Any]) -> None:
        self.iterator = iterator

    def __iter__(self) -> Iterator[Any]:
        return self.iterator


def prediction(training: Run, target: Any, loader: Any, inputs: Callable[[Any], Any] | None,
               callbacks: Sequence[Callback], metrics: Metrics, show: Callable[[Run | None], None]) -> Evaluation:  # fmt: skip
    """``loader`` run through the model once, with ``callbacks``: its result is the outputs, batch by batch, in the
    loader's order. Under torchrun each rank predicts its share of a DataLoader the trainer shards, and rank 0
    gets every batch whole; a loader it does not shard runs whole on every rank, and rank 0 gives its own. The
    other ranks get None."""
    training.check_between_epochs("predict()")
    if inputs is not None and not callable(inputs):
        raise TypeError(f"predict(): inputs must take the model's input out of a batch, got {inputs!r}")
    phase = Phase("predict", _OnePass(loader) if isinstance(loader, Iterator) else loader, grad=False)
    ranks = training.ranks
    source = batch_source(phase.loader, 0, (), ranks.rank, ranks.world_size)
    sources = PhaseSources([phase.name], [source], world_size=ranks.world_size)
    model, take = training.work.step_runner.model, inputs or _as_it_is
    collected, running = _Outputs(), evaluated_callbacks(callbacks)
    run = evaluation_run(training, target, [phase], sources, [*running, collected],
                         lambda batch_inputs, _target: (model(batch_inputs), None),
                         lambda batch: (take(batch), None))  # fmt: skip
    device, sharded = training.work.device, isinstance(source, SeededLoader)
    keep = keeper(training, metrics, running, [])

    def result() -> list[Any] | None:
        if sharded:
            return gather_outputs(collected.outputs, ranks, device)
        return collected.outputs if ranks.is_global_zero else None

    return Evaluation(run, show, keep, result)


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
