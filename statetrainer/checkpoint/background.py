"""Checkpoints written in the background: a staged copy of the state, written by a worker thread.

Training blocks only while ``StagingBuffers.stage`` copies the state's tensors
into host buffers kept from one save to the next; ``BackgroundWriter`` then
writes that copy with the same writer and atomic protocol as a synchronous
save, so the file is the bytes a synchronous save at that point writes,
however the model changes meanwhile. One write is in flight at a time; a
failed write is raised in the training thread by ``wait``.

From a GPU the copy is queued on the tensors' current stream, into pinned
memory, without blocking the host: whatever the training does next on that
stream (the next forward, an optimizer step, a metric reset) runs after the
copy has read the tensors, and the writer waits for the copy before it reads
the buffers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .serialization import view_key

__all__ = ["BackgroundWriter", "Staged", "StagingBuffers"]

log = logging.getLogger("statetrainer.checkpoint")


@dataclass
class Staged:
    """A state staged for writing: ``tree`` holds host copies of the tensors, complete once ``ready()`` returns.

    Attributes:
        tree: The state, every tensor replaced by its buffer.
        bytes: The staged tensors' size.
        copies: One event per GPU whose tensors are still being copied (none from the CPU).
    """

    tree: Any
    bytes: int
    copies: list[torch.cuda.Event] = field(default_factory=list)

    def ready(self) -> None:
        """Block until every copy from a GPU has landed in the buffers."""
        for copy in self.copies:
            copy.synchronize()


class StagingBuffers:
    """Host copies of a state's tensors, in buffers reused by every save whose tensors have the same shapes.

    A buffer is allocated the first time its leaf is staged (pinned when the tensor is on a GPU, so the copy
    is an asynchronous DMA), and again only if that leaf's shape or dtype changes: a run's steady state
    allocates nothing. A tensor that appears twice in the tree (tied weights) is staged once and appears
    twice in the copy, as the writer expects to store it once.
    """

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor | None] = []

    def stage(self, tree: Any) -> Staged:
        """Copy ``tree``'s tensors into the buffers (other leaves are numbers, strings and None, which do not
        change; the containers are new). Call ``ready()`` on the result before reading the copies."""
        leaves, spec = tree_flatten(tree)
        if len(self._buffers) < len(leaves):
            self._buffers.extend([None] * (len(leaves) - len(self._buffers)))
        seen: dict[tuple[Any, ...], torch.Tensor] = {}
        devices: set[torch.device] = set()
        staged: list[Any] = []
        for index, leaf in enumerate(leaves):
            if not isinstance(leaf, torch.Tensor):
                staged.append(leaf)
                continue
            view = view_key(leaf)
            if leaf.numel() and view in seen:
                staged.append(seen[view])
                continue
            seen[view] = copy = self._copy(index, leaf)
            staged.append(copy)
            if leaf.is_cuda:
                devices.add(leaf.device)
        copies = []
        for device in sorted(devices, key=str):
            landed = torch.cuda.Event()
            landed.record(torch.cuda.current_stream(device))
            copies.append(landed)
        size = sum(tensor.numel() * tensor.element_size() for tensor in seen.values())
        return Staged(tree_unflatten(staged, spec), size, copies)

    def _copy(self, index: int, tensor: torch.Tensor) -> torch.Tensor:
        buffer = self._buffers[index]
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda)
            self._buffers[index] = buffer
        return buffer.copy_(tensor.detach(), non_blocking=tensor.is_cuda)

    @property
    def bytes(self) -> int:
        """The buffers' size."""
        return sum(buffer.numel() * buffer.element_size() for buffer in self._buffers if buffer is not None)


WRITER_NICENESS = 10


def _yield_to_training() -> None:
    """Lower this thread's scheduling priority (Linux gives each thread its own nice value, and the threads it
    starts inherit it): where the cores are busy, training runs first and the write takes what is left."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICENESS)


class BackgroundWriter:
    """Runs one write at a time in a thread of its own; ``wait`` joins it and raises its failure.

    The thread is not a daemon, so the interpreter's exit waits for a write in flight. A failure is also logged
    (at ERROR, which Python prints even with no logging set up), so it is seen even if nothing waits again.

    Args:
        failed: Called from the writer's thread when a write fails (the run raises it at its next batch boundary).
    """

    def __init__(self, failed: Callable[[], None] = lambda: None) -> None:
        self._failed = failed
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    @property
    def in_flight(self) -> bool:
        """Whether a write is still running."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, write: Callable[[], Any]) -> None:
        """Start ``write()`` once the write in flight has ended (raising its failure, if it failed)."""
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(write,), name="statetrainer-checkpoint-writer")
        self._thread.start()

    def _run(self, write: Callable[[], Any]) -> None:
        _yield_to_training()
        try:
            write()
        except BaseException as error:  # noqa: BLE001 -- handed to the training thread, which raises it
            self._failure = error
            log.error("a background checkpoint write failed: %s", error)
            self._failed()

    def wait(self) -> None:
        """Block until the write in flight has ended; raise its failure (once)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure
