"""deterministic=True: PyTorch's deterministic algorithms for the run, and the cuBLAS setting they need."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import statetrainer as st
from statetrainer.determinism import require_cublas_workspace

from .conftest import regression_batches


class RecordSettings(st.Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[bool, bool, bool]] = []

    def on_exit_batch(self, trainer: st.Trainer) -> None:
        self.seen.append(_settings())


def _settings() -> tuple[bool, bool, bool]:
    backends = torch.backends.cudnn
    return torch.are_deterministic_algorithms_enabled(), backends.deterministic, backends.benchmark


def build(device: torch.device, callbacks=(), **options) -> st.Trainer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))
    return st.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.mse_loss,
                      [st.Phase("train", regression_batches(4))], callbacks=callbacks, device=device, **options)  # fmt: skip


@pytest.fixture
def restore_global_settings():
    saved = _settings()
    yield
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1], saved[2]


def test_deterministic_mode_holds_while_the_run_drives_and_the_previous_settings_come_back(
    device, restore_global_settings
):
    torch.backends.cudnn.benchmark = True  # a user's own setting, outside the run
    recorder = RecordSettings()
    trainer = build(device, [recorder], deterministic=True)
    trainer.advance()
    assert _settings() == (False, False, True)  # between advance() calls the user's settings hold
    trainer.fit()
    assert recorder.seen and set(recorder.seen) == {(True, True, False)}
    assert _settings() == (False, False, True)


def test_a_model_compiled_while_it_drives_is_compiled_without_inductors_on_device_benchmarking(
    device, restore_global_settings
):
    """Inductor's deterministic mode (no kernel picked by timing) holds while the run drives, and its previous
    value comes back after."""
    from torch._inductor import config as inductor

    seen = []

    class RecordInductor(st.Callback):
        def on_enter_batch(self, trainer):
            seen.append(inductor.deterministic)

    before = inductor.deterministic
    build(device, [RecordInductor()], deterministic=True).fit()
    assert set(seen) == {True} and inductor.deterministic == before


def test_without_it_the_users_settings_are_left_alone(device, restore_global_settings):
    recorder = RecordSettings()
    build(device, [recorder]).fit()
    assert set(recorder.seen) == {(False, False, False)}


def test_deterministic_must_be_a_bool():
    with pytest.raises(TypeError, match="deterministic must be True or False"):
        build(torch.device("cpu"), deterministic="yes")


def test_the_cublas_workspace_is_set_while_cuda_has_not_started(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    require_cublas_workspace()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


@pytest.mark.parametrize("current", [None, ":0:0"])
def test_an_unset_cublas_workspace_after_cuda_started_is_a_clear_error(monkeypatch, current):
    if current is None:
        monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    else:
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", current)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(RuntimeError, match=r"CUBLAS_WORKSPACE_CONFIG=:4096:8 python train.py") as raised:
        require_cublas_workspace()
    assert ("is not set" if current is None else repr(current)) in str(raised.value)


@pytest.mark.parametrize("value", [":4096:8", ":16:8"])
def test_a_valid_cublas_workspace_is_accepted_at_any_time(monkeypatch, value):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", value)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    require_cublas_workspace()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == value


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_on_cuda_deterministic_after_cuda_started_without_the_setting_fails_in_the_constructor():
    script = (
        "import torch, statetrainer as st\n"
        "torch.zeros(1, device='cuda')\n"
        "model = torch.nn.Linear(2, 1)\n"
        "try:\n"
        "    st.Trainer(model, None, torch.nn.functional.mse_loss,\n"
        "               [st.Phase('valid', [(torch.ones(1, 2), torch.ones(1, 1))], grad=False)],\n"
        "               device='cuda', deterministic=True)\n"
        "except RuntimeError as error:\n"
        "    print(error)\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "CUBLAS_WORKSPACE_CONFIG"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert "CUBLAS_WORKSPACE_CONFIG=:4096:8" in result.stdout, result.stdout + result.stderr


@needs_cuda
def test_on_cuda_two_deterministic_conv_runs_are_bit_identical():
    def run() -> st.Trainer:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 7 * 7, 3))
        generator = torch.Generator().manual_seed(1)
        batches = [(torch.randn(32, 1, 16, 16, generator=generator), torch.randint(3, (32,), generator=generator))
                   for _ in range(6)]  # fmt: skip
        return st.Trainer(model, torch.optim.Adam(model.parameters()), F.cross_entropy, [st.Phase("train", batches)],
                          device="cuda", deterministic=True, epochs=2).fit()  # fmt: skip

    first, second = run(), run()
    for left, right in zip(first.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(left, right)
