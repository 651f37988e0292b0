"""Every N: one check of the ``every_<unit>`` arguments, one answer to "is this count due", one naming convention."""

from __future__ import annotations

import inspect
import io
import re

import pytest

from statetrainer import callbacks as cb
from statetrainer.callbacks.periodic import check_every, due

# Each periodic callback's every_<unit> arguments: how to build it with one, and whether None (never) is allowed.
PERIODIC = [
    (lambda n: cb.Checkpoint("x", every_steps=n), "Checkpoint: every_steps", True),
    (lambda n: cb.Checkpoint("x", every_epochs=n), "Checkpoint: every_epochs", True),
    (lambda n: cb.CSVLogger("log.csv", every_batches=n), "CSVLogger: every_batches", True),
    (lambda n: cb.StopOnNonFinite(every_batches=n), "StopOnNonFinite: every_batches", False),
    (lambda n: cb.ProgressBar(every_batches=n), "ProgressBar: every_batches", False),
    (lambda n: cb.TensorBoardLogger("tb", every_steps=n), "TensorBoardLogger: every_steps", False),
]
IDS = [named for _, named, _ in PERIODIC]


@pytest.mark.parametrize("n", [0, -3, True, False, 2.0, "5"])
def test_a_bad_n_is_refused_naming_the_argument(n):
    with pytest.raises(ValueError, match=r"^every_steps must be a positive integer, got"):
        check_every("every_steps", n)
    with pytest.raises(ValueError, match=r"^every_steps must be a positive integer or None, got"):
        check_every("every_steps", n, never=True)


def test_none_means_never_only_where_allowed():
    check_every("every_epochs", None, never=True)
    with pytest.raises(ValueError, match=r"^every_epochs must be a positive integer, got None"):
        check_every("every_epochs", None)
    assert not any(due(count, None) for count in range(10))


def test_due_at_every_multiple_and_nowhere_else():
    assert [count for count in range(1, 13) if due(count, 4)] == [4, 8, 12]
    assert all(due(count, 1) for count in range(1, 5))


@pytest.mark.parametrize(("build", "named", "never"), PERIODIC, ids=IDS)
def test_each_periodic_callback_refuses_a_bad_n_naming_its_argument(build, named, never):
    for bad in (0, True, 1.5) if never else (0, True, 1.5, None):
        with pytest.raises(ValueError, match=f"^{re.escape(named)} must be a positive integer"):
            build(bad)


def test_the_periodic_arguments_are_named_every_unit():
    """Every callback argument about a period is ``every_steps``, ``every_batches`` or ``every_epochs``; the one
    exception is ProgressBar's deprecated ``refresh_every``."""
    for name in cb.__all__:
        callback = getattr(cb, name)
        if not (isinstance(callback, type) and issubclass(callback, cb.Callback)):
            continue
        periodic = [parameter for parameter in inspect.signature(callback).parameters if "every" in parameter]
        expected = {"every_steps", "every_batches", "every_epochs"}
        assert set(periodic) - expected <= ({"refresh_every"} if callback is cb.ProgressBar else set()), name


def test_progress_bars_old_refresh_every_warns_and_sets_every_batches():
    pytest.importorskip("tqdm")
    with pytest.warns(DeprecationWarning, match="refresh_every is deprecated, pass every_batches"):
        bar = cb.ProgressBar(refresh_every=3, stream=io.StringIO())
    assert bar.every_batches == 3
    with pytest.warns(DeprecationWarning, match="read every_batches"):
        assert bar.refresh_every == 3
    with pytest.warns(DeprecationWarning, match="set every_batches"):
        bar.refresh_every = 5
    assert bar.every_batches == 5
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="^ProgressBar: every_batches must be"):
        cb.ProgressBar(refresh_every=0)
    with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match="not both"):
        cb.ProgressBar(every_batches=4, refresh_every=3)
