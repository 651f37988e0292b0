"""The library needs only its declared dependencies; torchvision is for the example and the tests."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys


def test_torchvision_is_not_a_dependency_of_the_library():
    required = [requirement.split(";")[0] for requirement in importlib.metadata.requires("statetrainer") or []]
    assert not [requirement for requirement in required if requirement.startswith("torchvision")]


def test_every_module_imports_without_torchvision():
    script = (
        "import sys, pkgutil, importlib\n"
        "sys.modules['torchvision'] = None  # any import of it now fails\n"
        "import statetrainer\n"
        "for module in pkgutil.walk_packages(statetrainer.__path__, 'statetrainer.'):\n"
        "    importlib.import_module(module.name)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
