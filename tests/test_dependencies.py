"""The library needs torch, transitions, safetensors and numpy; tqdm, matplotlib, graphviz and tensorboard are
extras; torchvision is for the example and the tests."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

# The project's own declaration (read from the file, so this holds wherever the tests run, installed or not).
PROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]


def test_torchvision_is_not_a_dependency_of_the_library():
    assert not [requirement for requirement in PROJECT["dependencies"] if requirement.startswith("torchvision")]


def import_everything_without(packages: list[str], then: str = "") -> subprocess.CompletedProcess:
    """In a fresh interpreter where importing any of ``packages`` fails, import every statetrainer module, then run ``then``."""
    script = (
        "import sys, pkgutil, importlib\n"
        f"sys.modules.update(dict.fromkeys({packages!r}))  # None: any import of them now fails\n"
        "import statetrainer\n"
        "for module in pkgutil.walk_packages(statetrainer.__path__, 'statetrainer.'):\n"
        "    importlib.import_module(module.name)\n"
    ) + then
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


def test_every_module_imports_without_torchvision():
    import_everything_without(["torchvision"])


def test_without_the_optional_packages_the_library_imports_and_their_callbacks_name_the_extra():
    result = import_everything_without(["tqdm", "matplotlib", "graphviz", "tensorboard"], then=(
        "import statetrainer\n"
        "from statetrainer.callbacks import Plots, ProgressBar, TensorBoardLogger\n"
        "for make in (ProgressBar, lambda: Plots('plots'), lambda: TensorBoardLogger('tb'),\n"
        "             lambda: statetrainer.diagram('dot')):\n"
        "    try:\n"
        "        make()\n"
        "    except ImportError as error:\n"
        "        print(error)\n"
        "print(statetrainer.diagram('mermaid').splitlines()[3])\n"
    ))  # fmt: skip
    assert "ProgressBar needs tqdm" in result.stdout and "statetrainer[progress]" in result.stdout
    assert "Plots needs matplotlib" in result.stdout and "statetrainer[plots]" in result.stdout
    assert "TensorBoardLogger needs tensorboard" in result.stdout and "statetrainer[tensorboard]" in result.stdout
    assert "a DOT diagram needs graphviz" in result.stdout and "statetrainer[diagram]" in result.stdout
    assert "stateDiagram-v2" in result.stdout  # Mermaid needs nothing more


def test_the_extras_are_declared():
    extras = PROJECT["optional-dependencies"]
    assert any(requirement.startswith("tqdm") for requirement in extras["progress"])
    assert any(requirement.startswith("matplotlib") for requirement in extras["plots"])
    assert any(requirement.startswith("graphviz") for requirement in extras["diagram"])
    assert any(requirement.startswith("tensorboard") for requirement in extras["tensorboard"])
    assert not [
        requirement for requirement in PROJECT["dependencies"] if requirement.startswith(("tqdm", "matplotlib"))
    ]


def test_importing_statetrainer_loads_no_optional_package_and_the_examples_help_loads_no_torch():
    script = (
        "import sys, torch\n"
        "before = set(sys.modules)\n"
        "import statetrainer\n"
        "print(sorted({name.split('.')[0] for name in set(sys.modules) - before}))\n"
    )
    added = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120).stdout
    for optional in ("matplotlib", "tqdm", "tensorboard", "graphviz", "torchvision", "torchdata"):
        assert f"'{optional}'" not in added, added
    example = Path(__file__).resolve().parents[1] / "examples" / "mnist.py"
    helped = subprocess.run([sys.executable, "-X", "importtime", str(example), "--help"], capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert helped.returncode == 0 and "--data-root" in helped.stdout
    imported = {line.split("|")[-1].strip() for line in helped.stderr.splitlines() if line.startswith("import time")}
    assert "torch" not in imported and "torchvision" not in imported
    lines = helped.stdout.splitlines()
    options = [index for index, line in enumerate(lines) if line.startswith("  --")]
    assert len(options) >= 12
    for index in options:  # every option has a description, on its line or the next
        assert re.search(r"\S\s{2,}\S", lines[index].strip()) or lines[index + 1].startswith(" " * 10), lines[index]
