"""The training state machine: six nested states, one table of transitions.

This is the only module that imports ``transitions``. The trainer decides *which*
transition to fire; this module decides *what firing it means*: which states are
exited and entered, in which order the callbacks run, and what is recorded.

Nesting (a state's work happens between its entry and its exit)::

    idle                      nothing running; the run starts and ends here
    epoch                     one pass over every phase
    └── phase                 train, valid, ...: sets train/eval and grad mode, opens the loader
        └── batch             moves the batch to the device, runs forward + loss
            ├── backward      runs the backward pass (training phases only)
            └── step          optimizer step + zero_grad (at an accumulation boundary)

Transitions (the table ``TRANSITIONS`` below is the whole graph)::

    start_epoch   idle     -> epoch      exit idle, enter epoch
    start_phase   epoch    -> phase      enter phase
    start_batch   phase    -> batch      enter batch
    backward      batch    -> backward   enter backward
    step          backward -> step       exit backward, enter step
    end_batch     batch    -> phase      exit batch
                  backward -> phase      exit backward, exit batch
                  step     -> phase      exit step, exit batch
    end_phase     phase    -> epoch      exit phase
    next_epoch    epoch    -> epoch      exit epoch, enter epoch
    finish        epoch    -> idle       exit epoch, enter idle

Moving to a child enters only the child; moving up to an ancestor exits every
state on the way and enters nothing; moving between siblings (or to the same
state) exits the source and enters the destination. So one training epoch with
two batches and ``accumulate=2`` followed by one validation batch reads::

    exit idle, enter epoch,
      enter phase,
        enter batch, enter backward, exit backward, exit batch,
        enter batch, enter backward, exit backward, enter step, exit step, exit batch,
      exit phase,
      enter phase,
        enter batch, exit batch,
      exit phase,
    exit epoch, enter idle

Entering a state runs, in order: the owner's *prepare* call (bookkeeping such as
the batch index, so callbacks see the new values), every ``on_enter_<state>``
callback, then the owner's *work* call. Exiting runs every ``on_exit_<state>``
callback. All of this is compiled once into a flat tuple of calls per
transition, so a hook that no callback overrides costs nothing, and firing a
transition allocates nothing.

Callbacks must not fire transitions: one driver (the trainer) advances the
machine, so the call stack stays flat.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from transitions import Machine
from transitions.extensions import GraphMachine

from .errors import CheckpointError, InvalidMove
from .optional import require

__all__ = [
    "AT_REST",
    "HISTORY_LENGTH",
    "PARENT",
    "STATES",
    "TRANSITIONS",
    "Interruption",
    "Move",
    "TrainingMachine",
    "InvalidMove",
    "DIAGRAM_FORMATS",
    "call_name",
    "diagram",
    "diagram_graph",
    "entered_and_exited",
]

STATES: tuple[str, ...] = ("idle", "epoch", "phase", "batch", "backward", "step")
AT_REST: tuple[str, ...] = ("idle", "epoch", "phase")  # between batches: where a run can be saved and resumed

PARENT: Mapping[str, str | None] = {
    "idle": None,
    "epoch": None,
    "phase": "epoch",
    "batch": "phase",
    "backward": "batch",
    "step": "batch",
}

# trigger, source state(s), destination state
TRANSITIONS: tuple[tuple[str, str | tuple[str, ...], str], ...] = (
    ("start_epoch", "idle", "epoch"),
    ("start_phase", "epoch", "phase"),
    ("start_batch", "phase", "batch"),
    ("backward", "batch", "backward"),
    ("step", "backward", "step"),
    ("end_batch", ("batch", "backward", "step"), "phase"),
    ("end_phase", "phase", "epoch"),
    ("next_epoch", "epoch", "epoch"),
    ("finish", "epoch", "idle"),
)

HISTORY_LENGTH = 64

Call = Callable[[Any], None]


class Move(NamedTuple):
    """One transition as recorded in the history."""

    event: str
    source: str
    dest: str

    def __str__(self) -> str:
        return f"{self.event}: {self.source} -> {self.dest}"


def _lineage(state: str) -> list[str]:
    """The state followed by its ancestors, innermost first."""
    chain = []
    current: str | None = state
    while current is not None:
        chain.append(current)
        current = PARENT[current]
    return chain


def entered_and_exited(source: str, dest: str) -> tuple[list[str], list[str]]:
    """The states a transition exits (innermost first) and enters (outermost first).

    Moves are *local*: moving up to an ancestor exits the states below it and
    does not re-enter it. ``transitions``' ``HierarchicalMachine`` makes such a
    move external (it exits and re-enters the ancestor), which would run
    ``on_enter_phase`` after every batch; so the nesting is computed here.
    """
    if source == dest:
        return [source], [dest]
    source_chain, dest_chain = _lineage(source), _lineage(dest)
    common = next((state for state in source_chain if state in dest_chain), None)
    exited = source_chain[: source_chain.index(common)] if common else source_chain
    entered = dest_chain[: dest_chain.index(common)] if common else dest_chain
    return exited, entered[::-1]


class _CompiledMove:
    """One transition with its calls resolved into flat tuples: firing it allocates nothing."""

    __slots__ = ("enter_calls", "exit_calls", "dest", "machine", "record")

    def __init__(self, machine: TrainingMachine, event: str, source: str, dest: str) -> None:
        self.machine, self.dest, self.record = machine, dest, Move(event, source, dest)
        self.exit_calls: tuple[Call, ...] = ()
        self.enter_calls: tuple[Call, ...] = ()

    def apply(self) -> None:
        machine = self.machine
        target = machine.target
        call = None
        try:  # costs nothing unless a call raises; then the machine records which one did
            for call in self.exit_calls:
                call(target)
        except BaseException:
            machine.interrupted = Interruption(self, "exit", _position_of(call, self.exit_calls))
            raise
        machine.state = self.dest
        machine.history.append(self.record)
        call = None
        try:
            for call in self.enter_calls:
                call(target)
        except BaseException:
            machine.interrupted = Interruption(self, "enter", _position_of(call, self.enter_calls))
            raise

    def finish(self, side: str, index: int) -> None:
        """Run this move's calls from ``side``'s call ``index`` on: the rest of a move a call interrupted."""
        machine = self.machine
        if side == "exit":
            for position, call in enumerate(self.exit_calls[index:], index):
                machine.interrupted = Interruption(self, "exit", position)
                call(machine.target)
            machine.state = self.dest
            machine.history.append(self.record)
            index = 0
        for position, call in enumerate(self.enter_calls[index:], index):
            machine.interrupted = Interruption(self, "enter", position)
            call(machine.target)
        machine.interrupted = None

    def calls(self, side: str) -> tuple[Call, ...]:
        return self.exit_calls if side == "exit" else self.enter_calls


def _position_of(call: Call | None, calls: tuple[Call, ...]) -> int:
    """Where ``call`` is in ``calls``; 0 when the error came before the first call ran."""
    return calls.index(call) if call in calls else 0


def call_name(call: Call) -> str:
    """A call's name as a checkpoint records it: the callback's key or the class, and the method."""
    owner = getattr(call, "__self__", None)
    key = getattr(owner, "key", None)
    name = getattr(call, "__name__", repr(call))
    return f"{key}.{name}" if isinstance(key, str) else getattr(call, "__qualname__", name)


@dataclass(frozen=True)
class Interruption:
    """Where a transition stopped: the move, the side (``exit`` or ``enter``) and the index of the call that raised.

    Exit calls run before the machine changes state and enter calls after, so
    an interrupted exit leaves the machine in the move's source state, and an
    interrupted entry in its destination.
    """

    move: _CompiledMove
    side: str
    index: int

    @property
    def event(self) -> str:
        return self.move.record.event

    @property
    def call(self) -> Call | None:
        calls = self.move.calls(self.side)
        return calls[self.index] if self.index < len(calls) else None

    def to_state(self) -> dict[str, Any]:
        """What a checkpoint keeps of it: enough to find the same call in another trainer."""
        call = self.call
        return {"event": self.event, "source": self.move.record.source, "side": self.side, "call": self.index,
                "name": None if call is None else call_name(call)}  # fmt: skip


class _CompiledEvent:
    """An event: the one move out of the machine's current state, looked up in a dict."""

    __slots__ = ("by_source", "machine", "name")

    def __init__(self, machine: TrainingMachine, name: str, by_source: dict[str, _CompiledMove]) -> None:
        self.machine, self.name, self.by_source = machine, name, by_source

    def fire(self) -> None:
        """Run this event's transition from the machine's current state."""
        machine = self.machine
        try:
            move = self.by_source[machine.state]
        except KeyError:
            raise InvalidMove(
                f"cannot fire {self.name!r} from state {machine.state!r}; "
                f"from {machine.state!r} the machine can fire: {', '.join(machine.triggers(machine.state))}"
            ) from None
        move.apply()


def _table() -> list[dict[str, Any]]:
    """``TRANSITIONS`` in the form ``transitions``' machines take."""
    return [
        {"trigger": trigger, "source": list(source) if isinstance(source, tuple) else source, "dest": dest}
        for trigger, source, dest in TRANSITIONS
    ]


class TrainingMachine:
    """The six-state training machine with its callbacks compiled in.

    ``definition`` is a plain ``transitions.Machine`` built from ``TRANSITIONS``:
    it validates the table and parses it into events, from which the compiled
    moves are built, and ``diagram()`` has ``transitions`` draw the same table.
    Firing does not go through ``transitions``: its per-event machinery
    (conditions, ``EventData``, queues) would cost more than the work of a
    small batch, and this machine has no conditions or before/after callbacks
    to honour.

    Args:
        target: The object every call receives (the trainer).
        prepare: Per state, a call that runs on entry before the callbacks.
        enter: Per state, the ``on_enter_<state>`` callables, in order.
        work: Per state, a call that runs on entry after the callbacks.
        exit: Per state, the ``on_exit_<state>`` callables, in order.
        history_length: How many recent moves ``history`` keeps.
    """

    def __init__(
        self,
        target: Any,
        *,
        prepare: Mapping[str, Call] | None = None,
        enter: Mapping[str, Sequence[Call]] | None = None,
        work: Mapping[str, Call] | None = None,
        exit: Mapping[str, Sequence[Call]] | None = None,
        history_length: int = HISTORY_LENGTH,
    ) -> None:
        self.target = target
        self.state = "idle"
        self.history: deque[Move] = deque(maxlen=history_length)
        self.interrupted: Interruption | None = None  # set when a call raised mid-transition
        self.pending: Interruption | None = None  # an interrupted move to finish before the next one
        self.definition = Machine(model=None, states=list(STATES), transitions=_table(), initial="idle",
                                  auto_transitions=False)  # fmt: skip
        self.events: dict[str, _CompiledEvent] = {}
        for name, event in self.definition.events.items():
            moves = {source: _CompiledMove(self, name, source, str(transitions[0].dest))
                     for source, transitions in event.transitions.items()}  # fmt: skip
            self.events[name] = _CompiledEvent(self, name, moves)
        self.compile(prepare or {}, enter or {}, work or {}, exit or {})

    def compile(
        self,
        prepare: Mapping[str, Call],
        enter: Mapping[str, Sequence[Call]],
        work: Mapping[str, Call],
        exit: Mapping[str, Sequence[Call]],
    ) -> None:
        """Resolve every transition's calls once; call again when the callbacks change."""
        unknown = (set(prepare) | set(enter) | set(work) | set(exit)) - set(STATES)
        if unknown:
            raise ValueError(f"unknown state(s) {sorted(unknown)}; states are {', '.join(STATES)}")

        def entry_calls(state: str) -> list[Call]:
            calls = [prepare[state]] if state in prepare else []
            calls.extend(enter.get(state, ()))
            if state in work:
                calls.append(work[state])
            return calls

        for event in self.events.values():
            for move in event.by_source.values():
                exited, entered = entered_and_exited(move.record.source, move.dest)
                move.exit_calls = tuple(call for state in exited for call in exit.get(state, ()))
                move.enter_calls = tuple(call for state in entered for call in entry_calls(state))

    def triggers(self, state: str) -> list[str]:
        """The events that can be fired from ``state``."""
        return self.definition.get_triggers(state)

    def restore(self, state: str) -> None:
        """Put the machine in ``state`` without running any call (resuming from a checkpoint)."""
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}; states are {', '.join(STATES)}")
        self.history.append(Move("restore", self.state, state))
        self.state = state

    def finish_pending(self) -> bool:
        """Run the rest of the move a checkpoint was saved in the middle of (see ``pending``); False if none."""
        if self.pending is None:
            return False
        pending, self.pending = self.pending, None
        pending.move.finish(pending.side, pending.index)
        return True

    def state_dict(self) -> dict[str, Any]:
        """The current state, and the move to finish on resume: a part of the run's state."""
        return {"state": self.state, "pending": None if self.pending is None else self.pending.to_state()}

    def _pending_from(self, state: dict[str, Any]) -> Interruption | None:
        saved = state.get("pending")
        if saved is None:
            return None
        event, source, side, index = saved["event"], saved["source"], saved["side"], saved["call"]
        move = self.events[event].by_source[source] if event in self.events else None
        if move is None or side not in ("exit", "enter") or not isinstance(index, int) or index < 0:
            raise ValueError(f"the transition to finish, {saved!r}, is not one of this machine's")
        calls = move.calls(side)
        here = call_name(calls[index]) if index < len(calls) else None
        if here != saved["name"]:
            raise CheckpointError(
                f"the run was saved in the middle of {event!r}, where {saved['name']} raised; this trainer's "
                f"call there is {here}: resume with the same callbacks, in the same order, so the transition "
                "can be finished from that call"
            )
        if state["state"] != (source if side == "exit" else move.dest):
            raise ValueError(f"state {state['state']!r} is not where {event!r} stops on its {side} side")
        return Interruption(move, side, index)

    def check_fits(self, state: dict[str, Any]) -> None:
        if state["state"] not in STATES:
            raise ValueError(f"unknown state {state['state']!r}; states are {', '.join(STATES)}")
        self._pending_from(state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.restore(state["state"])
        self.pending = self._pending_from(state)

    def fire(self, event: str) -> None:
        """Fire the named event from the current state; raises ``InvalidMove`` if it cannot."""
        try:
            compiled = self.events[event]
        except KeyError:
            raise InvalidMove(f"unknown event {event!r}; events are {', '.join(self.events)}") from None
        compiled.fire()

    def firer(self, event: str) -> Callable[[], None]:
        """The bound, allocation-free call that fires ``event`` (for the driver's hot loop)."""
        return self.events[event].fire

    def diagram(self, format: str = "mermaid") -> str:
        """The state diagram with this machine's current state highlighted (see ``diagram``)."""
        return diagram(format, self.state)


DIAGRAM_FORMATS = ("mermaid", "dot")


def diagram_graph(format: str = "mermaid", current: str = "idle") -> Any:
    """The graph ``transitions`` draws from ``TRANSITIONS``, ``current`` highlighted: its Mermaid graph, or for
    ``"dot"`` a ``graphviz.Digraph`` (the ``diagram`` extra installs the graphviz package).

    Raises:
        ValueError: An unknown format or state.
        ImportError: ``"dot"`` without the graphviz package, naming the extra.
    """
    if format not in DIAGRAM_FORMATS:
        raise ValueError(f"unknown diagram format {format!r}; formats are {', '.join(DIAGRAM_FORMATS)}")
    if current not in STATES:
        raise ValueError(f"unknown state {current!r}; states are {', '.join(STATES)}")
    if format == "dot":
        require("graphviz", "diagram", "a DOT diagram")
    graph = GraphMachine(states=list(STATES), transitions=_table(), initial=current, auto_transitions=False,
                         graph_engine="mermaid" if format == "mermaid" else "graphviz", title="statetrainer")  # fmt: skip
    return graph.get_graph()


def diagram(format: str = "mermaid", current: str = "idle") -> str:
    """The state diagram as text, drawn by ``transitions`` from the table the machine runs: Mermaid source
    (GitHub, GitLab and most documentation tools draw it) or Graphviz DOT; ``current`` is highlighted."""
    graph = diagram_graph(format, current)
    return graph.draw(None) if format == "mermaid" else graph.source
