"""Every N steps, batches or epochs: the one check behind the callbacks' ``every_<unit>`` arguments.

A callback that acts periodically takes ``every_<unit>=N``, named after what
it counts (``every_steps``, ``every_batches``, ``every_epochs``), checks it
once with ``check_every`` and asks ``due`` at each count: a hook that fires per
batch does one comparison with None, one modulo and one comparison, and
allocates nothing.
"""

from __future__ import annotations

from typing import Any

from ..validation import check_count

__all__ = ["check_every", "due"]


def check_every(name: str, n: Any, *, never: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``n`` is a positive integer (not a bool), or None where
    ``never`` allows a callback never to act on that count (see ``statetrainer.validation.check_count``)."""
    check_count(name, n, optional=never)


def due(count: int, n: int | None) -> bool:
    """Whether ``count`` is a multiple of ``n`` (the ``count``-th step, batch or epoch is one of every ``n``-th);
    never when ``n`` is None."""
    return n is not None and count % n == 0
