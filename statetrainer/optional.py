"""Optional dependencies: imported by the callbacks that use them, with an error that names the extra."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module`` for ``feature``, or raise an ``ImportError`` that says how to install it.

    Args:
        module: The module to import (``"tqdm.auto"``).
        extra: The statetrainer extra that installs it (``"progress"``).
        feature: What needs it, for the message (``"ProgressBar"``).
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = module.split(".")[0]
        raise ImportError(
            f"{feature} needs {package}, an optional dependency of statetrainer: "
            f"pip install 'statetrainer[{extra}]' (or pip install {package})"
        ) from error
