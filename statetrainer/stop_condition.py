"""Conditional stepping: where ``run_until`` stops, checked against the run's layout before it runs.

A stop condition is built once, from the state to stop at and the values the
trainer's position must have there. The loop then compares the machine's
state after each transition (one string comparison) and reads the other
conditions only when that state has just been entered, so a run that is not
yet at its stop runs as ``fit()`` does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .machine import STATES
from .work import StateWork

__all__ = ["stop_condition"]


def stop_condition(
    work: StateWork,
    epochs: int | None,
    total_steps: int | None,
    view: Any,
    state: str | None,
    *,
    epoch: int | None = None,
    phase: str | None = None,
    batch: int | None = None,
    step: int | None = None,
    when: Callable[[Any], bool] | None = None,
) -> Callable[[], bool] | None:
    """The conditions to check once ``state`` has just been entered (after any transition, for None): True
    where ``run_until`` stops; None when the state alone decides.

    Args:
        work: The run's work: its position, phases and current phase.
        epochs: The run's epochs.
        total_steps: The run's optimizer steps, None when unknown (``Run.total_steps``).
        view: What ``when`` is given (the trainer).
        state: The state whose entry stops the run; None: stop at the first transition after which the
            conditions hold.
        epoch, phase, batch, step: What ``trainer.epoch``, ``trainer.phase.name``, ``trainer.batch_index``
            and ``trainer.global_step`` must be there.
        when: Any predicate of the trainer that must also hold there.

    Raises:
        ValueError: A state or phase that does not exist, or a condition this run can never meet.
        TypeError: ``when`` is not callable, or a number is not an integer.
    """
    _check_reachable(work, epochs, total_steps, state, epoch, phase, batch, step, when)
    position = work.position
    checks: list[Callable[[], bool]] = []
    if epoch is not None:
        checks.append(lambda: position.epoch == epoch)
    if phase is not None:
        checks.append(lambda: work.phase is not None and work.phase.name == phase)
    if batch is not None:
        checks.append(lambda: work.phase is not None and position.batch_index == batch)
    if step is not None:
        checks.append(lambda: position.global_step == step)
    if when is not None:
        checks.append(lambda: bool(when(view)))
    if not checks:
        return None  # the state alone decides
    return lambda: all(check() for check in checks)


def _check_reachable(work: StateWork, epochs: int | None, total: int | None, state: str | None, epoch: int | None, phase: str | None,
                     batch: int | None, step: int | None, when: Any) -> None:  # fmt: skip
    if state is not None and state not in STATES:
        raise ValueError(f"unknown state {state!r}; states are {', '.join(STATES)}")
    if state is None and all(value is None for value in (epoch, phase, batch, step, when)):
        raise ValueError("run_until needs a state to stop at, or a condition (epoch=, phase=, batch=, step=, when=)")
    if when is not None and not callable(when):
        raise TypeError(f"when must be a predicate of the trainer, got {type(when).__name__}")
    for name, value in (("epoch", epoch), ("batch", batch), ("step", step)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"{name} must be an integer, got {value!r}")
    names = [each.name for each in work.phases]
    if phase is not None and phase not in names:
        raise ValueError(f"this run has no phase {phase!r}; its phases are {', '.join(map(repr, names))}")
    candidates = [each for each in work.phases if phase is None or each.name == phase]
    if state in ("backward", "step") and not any(each.grad for each in candidates):
        where = f"phase {phase!r} has grad=False" if phase is not None else "no phase has grad=True"
        raise ValueError(f"this run never enters {state!r}: {where}")
    position = work.position
    if epoch is not None and not (position.epoch <= epoch and (epochs is None or epoch < epochs)):
        last = "on" if epochs is None else f"to {epochs - 1}"
        raise ValueError(f"epoch={epoch} never comes: the run is at epoch {position.epoch} of epochs 0 {last}")
    lengths = [each.epoch_length(work.sources[names.index(each.name)].length) for each in candidates]
    known = [length for length in lengths if length is not None]
    if batch is not None and (batch < 0 or len(known) == len(lengths) and batch >= max(known)):
        counts = ", ".join(f"{each.name!r} {length}" for each, length in zip(candidates, lengths, strict=True))
        raise ValueError(f"batch={batch} never comes: batch indices count from 0, and the batches per phase are "
                         f"{counts}")  # fmt: skip
    if step is not None:
        total = total if total is not None else work.max_steps  # the run ends by max_steps, if not before
        if step < position.global_step or (total is not None and step > total):
            reach = f", and the run takes {total} in all" if total is not None else ""
            raise ValueError(f"step={step} never comes: {position.global_step} optimizer steps are done{reach}")
