"""Checkpoints written in the background: a staged copy of the state, written by a worker thread.

Training blocks only while ``StagingBuffers.stage`` copies the state's tensors
into host buffers kept from one save to the next; ``BackgroundWriter`` then
writes that copy with the same writer and atomic protocol as a synchronous
save, so the file is the bytes a synchronous save at that point writes,
however the model changes meanwhile. One write is in flight at a time; a
failed write is raised in the training thread by ``wait``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["BackgroundWriter", "StagingBuffers"]


class StagingBuffers:
    """Host copies of a state's tensors, in buffers reused by every save whose tensors have the same shapes.

    A buffer is allocated the first time its leaf is staged (pinned when the tensor is on a GPU, so the copy
    is a DMA), and again only if that leaf's shape or dtype changes: a run's steady state allocates nothing.
    """

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor | None] = []

    def stage(self, tree: Any) -> Any:
        """``tree`` with every tensor replaced by its copy in a buffer (other leaves are numbers, strings and None,
        which do not change; the containers are new)."""
        leaves, spec = tree_flatten(tree)
        if len(self._buffers) < len(leaves):
            self._buffers.extend([None] * (len(leaves) - len(self._buffers)))
        staged = [self._copy(index, leaf) if isinstance(leaf, torch.Tensor) else leaf
                  for index, leaf in enumerate(leaves)]  # fmt: skip
        return tree_unflatten(staged, spec)

    def _copy(self, index: int, tensor: torch.Tensor) -> torch.Tensor:
        buffer = self._buffers[index]
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda)
            self._buffers[index] = buffer
        return buffer.copy_(tensor.detach())  # from a GPU: waits for the copy, so training may change the tensor

    @property
    def bytes(self) -> int:
        """The buffers' size."""
        return sum(buffer.numel() * buffer.element_size() for buffer in self._buffers if buffer is not None)


class BackgroundWriter:
    """Runs one write at a time in a thread of its own; ``wait`` joins it and raises its failure.

    The thread is not a daemon, so the interpreter's exit waits for a write in flight.

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
        try:
            write()
        except BaseException as error:  # noqa: BLE001 -- handed to the training thread, which raises it
            self._failure = error
            self._failed()

    def wait(self) -> None:
        """Block until the write in flight has ended; raise its failure (once)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure
