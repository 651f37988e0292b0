"""DataLoader workers ignore the trainer's stop signals, yet never keep the main process from exiting."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from statetrainer.data.workers import IgnoreSignalsInWorker, shield_workers

DATA = TensorDataset(torch.arange(40.0).reshape(20, 2))

# A stepped run left inside its phase, two workers running, when the script ends.
LEFT_OPEN = textwrap.dedent("""
    import sys, torch, statetrainer as st
    from torch.utils.data import DataLoader, TensorDataset
    model = torch.nn.Linear(3, 1)
    data = TensorDataset(torch.randn(400, 3), torch.randn(400, 1))
    if sys.argv[2] == "shuffled":  # rebuilt by the trainer
        loader = DataLoader(data, batch_size=4, num_workers=2, shuffle=True)
    elif sys.argv[2] == "persistent":  # its workers outlive every pass
        loader = DataLoader(data, batch_size=4, num_workers=2, shuffle=True, persistent_workers=True)
    else:  # a custom sampler: used as given
        loader = DataLoader(data, batch_size=4, num_workers=2, sampler=list(range(400)))
    trainer = st.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.functional.mse_loss,
                         [st.Phase("train", loader)], device=sys.argv[3])
    trainer.run_until("backward")
    if sys.argv[1] == "raise":
        raise RuntimeError("the script fails with the loader open")
""")


@pytest.mark.parametrize(("order", "ending"), [
    ("shuffled", "exit"),  # the default run's case: each case is a fresh interpreter with two workers (about 6 s)
    *(pytest.param(order, ending, marks=pytest.mark.slow) for order, ending in [
        ("shuffled", "raise"), ("persistent", "exit"), ("persistent", "raise"), ("custom-sampler", "exit"),
        ("custom-sampler", "raise")]),
])  # fmt: skip
def test_a_script_ending_with_its_loader_open_exits_instead_of_waiting_on_its_workers(device, ending, order):
    result = subprocess.run([sys.executable, "-c", LEFT_OPEN, ending, order, str(device)],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == (0 if ending == "exit" else 1), result.stderr
    assert "killed by signal" not in result.stderr, result.stderr  # the workers ended quietly


def test_shielding_wraps_the_loaders_own_worker_init_once():
    seen = []
    loader = DataLoader(DATA, batch_size=5, num_workers=2, worker_init_fn=seen.append)
    shield_workers(loader, [signal.SIGTERM])
    shield_workers(loader, [signal.SIGTERM])
    assert isinstance(loader.worker_init_fn, IgnoreSignalsInWorker) and loader.worker_init_fn.then == seen.append
    in_process = DataLoader(DATA, batch_size=5)
    shield_workers(in_process, [signal.SIGTERM])
    assert in_process.worker_init_fn is None  # no workers, nothing to shield


def test_shielded_workers_still_load_and_run_the_loaders_own_init():
    loader = DataLoader(DATA, batch_size=5, num_workers=2, worker_init_fn=_set_marker)
    shield_workers(loader, [signal.SIGTERM, signal.SIGINT])
    batches = list(loader)
    assert torch.equal(torch.cat([batch[0] for batch in batches]), DATA.tensors[0])


def _set_marker(worker_id: int) -> None:
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        raise AssertionError("the shield was not installed before the loader's own init ran")
