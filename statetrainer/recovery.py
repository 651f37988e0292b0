"""Saving a run that an error stopped: the last consistent point, and what it leaves out.

An error can stop the machine anywhere: in a callback, in the model, in the
loader, or as a Ctrl-C. ``plan_recovery`` looks at where it stopped, before
the loader is let go, and decides what a checkpoint taken now holds:

- **Inside a batch**, the batch is *kept* when its work was done (the error
  came in the hooks that end it), and *discarded* otherwise: the position goes
  back to the batch before, the batch's gradients are dropped, and a resume
  runs it again. A batch that cannot be taken back (its optimizer step raised
  part-way, its gradients are mixed into an accumulation window's, or its
  loader keeps its own position and has delivered it) cannot be saved.
- **Between batches** (starting or ending an epoch or phase), the checkpoint
  records the interrupted transition and the call that raised. A resume first
  runs the rest of it from that call on, so no hook is skipped or repeated.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from .machine import Interruption, TrainingMachine, call_name
from .work import StateWork

__all__ = ["Recovery", "plan_recovery"]

_IN_BATCH_EVENTS = ("start_batch", "backward", "step", "end_batch")
_IN_BATCH_STATES = ("batch", "backward", "step")


@dataclass
class Recovery:
    """What a checkpoint taken after an error holds.

    Attributes:
        summary: Which point the checkpoint holds, in words.
        refusal: Why no consistent checkpoint can be taken; None when one can.
        state: The machine state to save in (None: as it is).
        batch_index: The batch index to save at (None: as it is).
        drop_gradients: Whether the discarded batch's gradients are dropped.
        pending: The interrupted transition a resume finishes first.
    """

    summary: str
    refusal: str | None = None
    state: str | None = None
    batch_index: int | None = None
    drop_gradients: bool = False
    pending: Interruption | None = None
    applied: bool = False

    def apply(self, machine: TrainingMachine, work: StateWork, speak: bool) -> None:
        """Put the stopped run at the recovery point (once), saying where if ``speak``; ``RuntimeError`` if there
        is none."""
        if self.refusal is not None:
            raise RuntimeError(f"no consistent checkpoint can be taken after this error: {self.refusal}; "
                               "resume from the newest checkpoint saved before it")  # fmt: skip
        if self.applied:
            return
        if self.state is not None:
            machine.restore(self.state)
        if self.batch_index is not None:  # the batch is discarded: a resume takes it from its loader again
            work.take_back_batch()
            work.position.batch_index = self.batch_index
        if self.drop_gradients:
            work.step_runner.zero_grad()
        machine.pending, self.applied = self.pending, True
        if speak:
            print(f"statetrainer: saving after the error: {self.summary}", file=sys.stderr, flush=True)


def plan_recovery(machine: TrainingMachine, work: StateWork) -> Recovery | None:
    """Decide what a checkpoint of the run, just stopped by an error, can hold; None: the run is as it is."""
    interrupted, position, phase = machine.interrupted, work.position, work.phase
    event = interrupted.event if interrupted is not None else None
    call = interrupted.call if interrupted is not None else None  # the call that raised
    cursor = work.cursor
    delivered_ahead = cursor is not None and (cursor.looked_ahead or cursor.fetched > position.batch_index + 1)
    keeps_own = position.phase_index >= 0 and work.sources[position.phase_index].keeps_own_state
    in_phase = phase is not None and machine.state not in ("idle", "epoch")
    epoch = position.epoch_for_people(machine.state)  # messages count epochs and batches from 1
    where = f"epoch {epoch}" + (f", phase {phase.name!r}" if phase is not None and in_phase else "")
    if interrupted is not None and event not in _IN_BATCH_EVENTS:
        name = _describe(call, work)
        return Recovery(f"the checkpoint holds {where} in the middle of {event!r}, where {name} raised; "
                        f"a resume first runs the rest of {event!r}, from that call on", pending=interrupted)  # fmt: skip
    if event is None and machine.state not in _IN_BATCH_STATES:
        if machine.state == "phase" and keeps_own and delivered_ahead:
            return Recovery("", refusal=f"the loader of {where} keeps its own position and had already delivered "
                                        f"the batch after batch {position.batch_index + 1}")  # fmt: skip
        return None
    batch = position.batch_index + 1  # for people
    if interrupted is not None and event == "end_batch":  # the batch's work was done: it counts
        missed = ", ".join(call_name(skipped) for skipped in interrupted.move.exit_calls[interrupted.index + 1 :])
        if keeps_own and delivered_ahead:
            return Recovery("", refusal=f"the loader of {where} keeps its own position and had already read "
                                        f"the batch after batch {batch}")  # fmt: skip
        return Recovery(f"the checkpoint holds {where} after batch {batch}, which had done its work and counts "
                        f"as done; {_describe(call, work)} raised ending it"
                        + (f", and {missed} did not run for it" if missed else ""), state="phase")  # fmt: skip
    batch_index = position.batch_index
    if event is None:  # every transition had finished: the error came after the last one
        backward_began = machine.state in ("backward", "step")
    else:  # the step move starts after a whole backward pass; the backward move's own work is the pass
        backward_began = event == "step" or (event == "backward" and call == work.run_backward)
    if event == "step" and call == work.run_step:
        refusal = (
            f"the optimizer step of batch {batch} of {where} raised part-way, so the parameters may be half-updated"
        )
    elif backward_began and phase is not None and phase.grad and batch_index % work.step_runner.accumulate:
        refusal = (f"the backward pass of batch {batch} of {where} had begun inside an accumulation window that "
                   f"started at batch {batch - batch_index % work.step_runner.accumulate}: its gradient cannot be "
                   "taken out")  # fmt: skip
    elif keeps_own:
        refusal = f"the loader of {where} keeps its own position and has already delivered batch {batch}"
    else:
        refusal = None
    before = f"after batch {batch - 1}" if batch > 1 else "before its first batch"
    raised = "an error after its last transition" if interrupted is None else _describe(call, work)
    return Recovery(f"the checkpoint holds {where} {before}: batch {batch} was discarded half-done ({raised} "
                    "raised), and a resume runs it again; hooks that had seen it see it again",
                    refusal=refusal, state="phase", batch_index=batch_index - 1, drop_gradients=backward_began)  # fmt: skip


def _describe(call: Any, work: StateWork) -> str:
    """A call of the machine in words: a callback's hook by name, the trainer's own work by what it does."""
    own_work = {work.run_batch: "the forward pass", work.run_backward: "the backward pass",
                work.run_step: "the optimizer step", work.open_new_phase: "opening the phase's loader"}  # fmt: skip
    if call is None:
        return "the transition"
    return own_work.get(call) or call_name(call)
