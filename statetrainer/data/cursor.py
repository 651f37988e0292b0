"""Walking one phase's loader batch by batch."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["END", "BatchCursor", "loader_length"]

END: Any = object()
"""Returned by ``BatchCursor.next`` when the loader has no more batches."""

_NOTHING: Any = object()


def loader_length(loader: Iterable[Any]) -> int | None:
    """``len(loader)``, or None when the loader does not know its length."""
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


class BatchCursor:
    """One pass over a phase's batches that can tell whether the current batch is the last.

    With a known ``length`` the batches are trusted to number that many, so
    nothing is fetched ahead of time. Without one, ``is_last`` looks one batch
    ahead, and only when asked.

    Args:
        batches: The batches of this pass, from batch ``start`` on.
        length: Batches in a whole pass, or None when unknown.
        start: How many batches of the pass come before ``batches``.
    """

    def __init__(self, batches: Iterable[Any], length: int | None = None, start: int = 0) -> None:
        self.length = length
        self.fetched = start
        self._iterator = iter(batches)
        self._ahead = _NOTHING

    def next(self) -> Any:
        """The next batch, or ``END``."""
        if self._ahead is not _NOTHING:
            batch, self._ahead = self._ahead, _NOTHING
        elif self.length is not None and self.fetched >= self.length:
            return END
        else:
            batch = next(self._iterator, END)
        if batch is not END:
            self.fetched += 1
        return batch

    @property
    def looked_ahead(self) -> bool:
        """Whether a batch was read ahead of the current one (by ``is_last``)."""
        return self._ahead is not _NOTHING

    def close(self) -> None:
        """Let go of the loader's iterator, so a DataLoader shuts its workers down now."""
        self._iterator, self._ahead = iter(()), _NOTHING

    def is_last(self) -> bool:
        """Whether the batch most recently returned by ``next`` is the loader's last."""
        if self.length is not None:
            return self.fetched >= self.length
        if self._ahead is _NOTHING:
            self._ahead = next(self._iterator, END)
        return self._ahead is END
