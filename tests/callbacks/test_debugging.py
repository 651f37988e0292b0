"""Breakpoint: the debugger at a chosen state where a condition holds, through breakpoint()."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from statetrainer.callbacks import Breakpoint

from ..test_trainer import linear_trainer

SEEN: list[dict] = []


def record() -> None:
    """A ``PYTHONBREAKPOINT`` hook: what the debugger would see in the frame that broke."""
    frame = sys._getframe(1).f_locals
    trainer = frame["trainer"]
    SEEN.append({"state": trainer.state, "epoch": trainer.epoch, "batch": trainer.batch_index,
                 "loss": float(frame["loss"].detach()), "grad": frame["model"].weight.grad.clone(),
                 "samples": frame["batch_samples"]})  # fmt: skip


def test_a_breakpoint_goes_through_pythonbreakpoint_where_its_condition_holds_and_the_run_goes_on(device, monkeypatch):
    monkeypatch.setenv("PYTHONBREAKPOINT", f"{__name__}.record")
    SEEN.clear()
    stop = Breakpoint("backward", enter=False, when=lambda trainer: trainer.batch_index == 1)
    assert set(stop.active_hooks()) == {"on_exit_backward"}  # no other state pays for it
    trainer, _ = linear_trainer(device, train_batches=3, epochs=2, callbacks=[stop])
    trainer.fit()
    plain, _ = linear_trainer(device, train_batches=3, epochs=2)
    plain.fit()
    assert [(seen["epoch"], seen["batch"], seen["state"]) for seen in SEEN] == [(0, 1, "backward"), (1, 1, "backward")]
    assert [seen["samples"] for seen in SEEN] == [[1], [1]]  # batch_samples: a list's batch 1, in each epoch
    assert all(torch.isfinite(seen["grad"]).all() and seen["grad"].abs().sum() > 0 for seen in SEEN)
    assert stop.hits == 2 and trainer.finished and torch.equal(trainer.model.weight, plain.model.weight)


def test_a_real_pdb_session_inspects_the_loss_and_continues(tmp_path, device):
    script = tmp_path / "debugged.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        import torch
        from statetrainer.callbacks import Breakpoint
        from tests.test_trainer import linear_trainer

        trainer, _ = linear_trainer(torch.device({device.type!r}), train_batches=4, epochs=1,
                                    callbacks=[Breakpoint("batch", enter=False, when=lambda trainer: trainer.batch_index == 2)])
        trainer.fit()
        print("finished", trainer.finished, trainer.global_step)
    """)
    )
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONBREAKPOINT"}
    result = subprocess.run([sys.executable, str(script)], input="p trainer.batch_index\np round(float(loss), 6) > 0\nc\n",
                            capture_output=True, text=True, timeout=120, env=environment)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "-> self.hits += 1" in result.stdout  # it stops in the Breakpoint's frame, with the trainer in reach
    assert "(Pdb) 2\n(Pdb) True\n(Pdb) finished True 4" in result.stdout


def test_bad_breakpoints_are_refused():
    with pytest.raises(ValueError, match="unknown state 'bakward'"):
        Breakpoint("bakward")
    with pytest.raises(TypeError, match="when must be a predicate"):
        Breakpoint("batch", when=3)
