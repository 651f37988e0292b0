"""The machine on its own: the table, the nesting, compiled dispatch and invalid moves."""

from __future__ import annotations

import pytest

from statetrainer.errors import InvalidMove
from statetrainer.machine import STATES, TRANSITIONS, Move, TrainingMachine, entered_and_exited


class Target:
    pass


def recording_machine() -> tuple[TrainingMachine, list[str]]:
    log: list[str] = []

    def recorder(text: str):
        return lambda target: log.append(text)

    machine = TrainingMachine(
        Target(),
        prepare={state: recorder(f"prepare {state}") for state in STATES},
        enter={state: [recorder(f"enter {state}")] for state in STATES},
        work={state: recorder(f"work {state}") for state in STATES},
        exit={state: [recorder(f"exit {state}")] for state in STATES},
    )
    return machine, log


@pytest.mark.parametrize(
    ("source", "dest", "exited", "entered"),
    [
        ("idle", "epoch", ["idle"], ["epoch"]),
        ("epoch", "phase", [], ["phase"]),
        ("phase", "batch", [], ["batch"]),
        ("batch", "backward", [], ["backward"]),
        ("backward", "step", ["backward"], ["step"]),
        ("batch", "phase", ["batch"], []),
        ("backward", "phase", ["backward", "batch"], []),
        ("step", "phase", ["step", "batch"], []),
        ("phase", "epoch", ["phase"], []),
        ("epoch", "epoch", ["epoch"], ["epoch"]),
        ("epoch", "idle", ["epoch"], ["idle"]),
    ],
)
def test_nesting_decides_what_is_exited_and_entered(source, dest, exited, entered):
    assert entered_and_exited(source, dest) == (exited, entered)


def test_table_covers_every_state():
    sources = {s for _, source, _ in TRANSITIONS for s in ((source,) if isinstance(source, str) else source)}
    dests = {dest for _, _, dest in TRANSITIONS}
    assert sources == set(STATES) == dests


def test_entering_runs_prepare_callbacks_then_work_and_records_history():
    machine, log = recording_machine()
    machine.fire("start_epoch")
    machine.fire("start_phase")
    machine.fire("start_batch")
    machine.fire("backward")
    machine.fire("step")
    machine.fire("end_batch")
    assert log == [
        "exit idle", "prepare epoch", "enter epoch", "work epoch",
        "prepare phase", "enter phase", "work phase",
        "prepare batch", "enter batch", "work batch",
        "prepare backward", "enter backward", "work backward",
        "exit backward", "prepare step", "enter step", "work step",
        "exit step", "exit batch",
    ]  # fmt: skip
    assert machine.state == "phase"
    assert machine.history[-1] == Move("end_batch", "step", "phase")
    assert str(machine.history[-2]) == "step: backward -> step"


def test_the_compiled_moves_are_the_transitions_definition_of_the_table():
    machine, _ = recording_machine()
    for state in STATES:
        compiled = sorted(name for name, event in machine.events.items() if state in event.by_source)
        assert compiled == sorted(machine.triggers(state)) == sorted(machine.definition.get_triggers(state))
        for name in compiled:
            assert (
                machine.events[name].by_source[state].dest == machine.definition.events[name].transitions[state][0].dest
            )


def test_the_diagram_is_drawn_by_transitions_from_the_same_table_with_the_current_state_marked():
    machine, _ = recording_machine()
    machine.fire("start_epoch")
    machine.fire("start_phase")
    text = machine.diagram()
    assert text.count("-->") == sum(1 if isinstance(source, str) else len(source) for _, source, _ in TRANSITIONS) + 1
    for trigger, source, dest in TRANSITIONS:
        for start in (source,) if isinstance(source, str) else source:
            assert f"{start} --> {dest}: {trigger}" in text
    assert "Class phase s_active" in text  # where the machine is now


def test_an_invalid_move_names_the_state_and_the_possible_events():
    machine, _ = recording_machine()
    with pytest.raises(InvalidMove, match=r"cannot fire 'step' from state 'idle'.*start_epoch"):
        machine.fire("step")
    with pytest.raises(InvalidMove, match="unknown event 'jump'"):
        machine.fire("jump")
    assert machine.state == "idle"


def test_unknown_state_in_callbacks_is_refused():
    with pytest.raises(ValueError, match="unknown state"):
        TrainingMachine(Target(), enter={"batches": []})


def test_history_is_bounded():
    machine = TrainingMachine(Target(), history_length=3)
    machine.fire("start_epoch")
    for _ in range(5):
        machine.fire("next_epoch")
    assert list(machine.history) == [Move("next_epoch", "epoch", "epoch")] * 3
