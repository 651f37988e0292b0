"""Shared fixtures: tiny deterministic problems and the real MNIST test set when present."""

from __future__ import annotations

import gzip
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path


def _cache_bytecode_outside_the_sources() -> None:
    """Where the environment says not to write bytecode (``PYTHONDONTWRITEBYTECODE``), have it written under the
    temporary folder instead (``PYTHONPYCACHEPREFIX``), for this process and every interpreter the tests start.

    Otherwise each of the suite's hundred-odd subprocesses compiles torch (and torchvision, matplotlib...) from
    source again: 3-4 s of each one's 5-7 s on two CPU cores. Nothing is written next to the sources either way;
    a cached file is used only while its source is unchanged.
    """
    if not os.environ.get("PYTHONDONTWRITEBYTECODE") or os.environ.get("PYTHONPYCACHEPREFIX"):
        return
    user = os.getuid() if hasattr(os, "getuid") else os.getlogin()
    prefix = str(Path(tempfile.gettempdir()) / f"statetrainer-tests-pycache-{user}")
    del os.environ["PYTHONDONTWRITEBYTECODE"]
    os.environ["PYTHONPYCACHEPREFIX"] = prefix
    sys.pycache_prefix, sys.dont_write_bytecode = prefix, False


_cache_bytecode_outside_the_sources()

import pytest  # noqa: E402 -- after the bytecode cache is chosen, so torch's modules use it too
import torch  # noqa: E402

# Tests build deterministic CUDA trainers after CUDA has started in this process, which
# needs cuBLAS's deterministic workspace chosen before it starts (see statetrainer.determinism).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
]

MNIST_DIR = Path(os.environ.get("STATETRAINER_MNIST", Path(__file__).resolve().parents[2] / "shared/data/mnist"))
MNIST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def regression_batches(
    count: int, size: int = 4, features: int = 3, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` (input, target) batches of a noisy linear problem."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(features, 1, generator=generator)
    batches = []
    for _ in range(count):
        inputs = torch.randn(size, features, generator=generator)
        batches.append((inputs, inputs @ weight + 0.1 * torch.randn(size, 1, generator=generator)))
    return batches


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Each device a trainer can run on here: the CPU, and CUDA when there is one (else that case skips)."""
    return torch.device(request.param)


@pytest.fixture(scope="session")
def mnist_test_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.Tensor, torch.Tensor]:
    """The 10,000 real MNIST test images (uint8, N x 28 x 28) and labels; skips when absent."""
    if not all((MNIST_DIR / f"{name}.gz").is_file() for name in MNIST_FILES):
        pytest.skip(f"the real MNIST test set is not at {MNIST_DIR}")
    from torchvision.datasets.mnist import read_image_file, read_label_file

    folder = tmp_path_factory.mktemp("mnist")
    for name in MNIST_FILES:
        with gzip.open(MNIST_DIR / f"{name}.gz", "rb") as source, open(folder / name, "wb") as target:
            shutil.copyfileobj(source, target)
    return read_image_file(str(folder / MNIST_FILES[0])), read_label_file(str(folder / MNIST_FILES[1]))


@pytest.fixture
def python_sigint_handler() -> Iterator[None]:
    """Python's own SIGINT handler (it raises ``KeyboardInterrupt``) during the test, the previous one after.

    A test suite started with SIGINT ignored (``nohup pytest &``, or ``&`` in a
    script) would otherwise have Ctrl-C do nothing at all, and the trainer leaves
    a signal ignored on entry ignored.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)


def default_sigint() -> None:
    """For ``preexec_fn``: the child starts with SIGINT at its default, as a program run from a terminal or by a
    scheduler does, even when the test suite runs with it ignored (``nohup pytest &``), which a child inherits."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_in_a_terminal(command: list[str]) -> tuple[int, str, str]:
    """Run ``command`` with its stdin and stderr on a pseudo-terminal 160 columns wide (stdout a pipe): its status,
    what it drew on the terminal, and its stdout. Skips where there are no pseudo-terminals."""
    pty = pytest.importorskip("pty")
    fcntl, termios = pytest.importorskip("fcntl"), pytest.importorskip("termios")
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    process = subprocess.Popen(command, stdin=follower, stdout=subprocess.PIPE, stderr=follower, text=True,
                               preexec_fn=default_sigint)  # fmt: skip
    os.close(follower)
    hung = threading.Timer(120, process.kill)  # a command that hangs is killed: its status then fails the test
    hung.start()
    drawn = b""
    try:
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed with the process
                break
            if not chunk:
                break
            drawn += chunk
        stdout, _ = process.communicate(timeout=120)
    finally:
        hung.cancel()
        os.close(leader)
    return process.returncode, drawn.decode(errors="replace"), stdout
