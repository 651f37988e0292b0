"""Callbacks: every feature of a run (metrics, schedulers, loggers, checkpoints) is one."""

from .base import HOOK_NAMES, Callback, overridden_hooks

__all__ = ["HOOK_NAMES", "Callback", "overridden_hooks"]
