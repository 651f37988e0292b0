"""Bad numbers get one clear ValueError everywhere, and a count given as a bool is refused."""

from __future__ import annotations

import math

import pytest

from statetrainer import callbacks as cb
from statetrainer.validation import check_count, check_number

REFUSED = [
    (lambda: cb.CSVLogger("log.csv", every_batches=True), "CSVLogger: every_batches"),
    (lambda: cb.ProgressBar(every_batches=True), "ProgressBar: every_batches"),
    (lambda: cb.EarlyStopping(patience=True), "EarlyStopping: patience"),
    (lambda: cb.EarlyStopping(patience=2.5), "EarlyStopping: patience"),
    (lambda: cb.Checkpoint("x", keep_last=False), "Checkpoint: keep_last"),
    (lambda: cb.Accuracy(top_k=True), "Accuracy: top_k"),
    (lambda: cb.SmoothedLoss(beta=1.0), "SmoothedLoss: beta"),
    (lambda: cb.SmoothedLoss(beta="0.9"), "SmoothedLoss: beta"),
    (lambda: cb.CosineWarmRestarts(0.1, period=True), "CosineWarmRestarts: period"),
    (lambda: cb.CosineWarmRestarts(0.1, period=3, decay=0), "CosineWarmRestarts: decay"),
    (lambda: cb.OneCycle(0.1, total_steps=1), "OneCycle: total_steps"),
    (lambda: cb.OneCycle(0.1, total_steps=10, pct_start=1.0), "OneCycle: pct_start"),
]


@pytest.mark.parametrize(("build", "named"), REFUSED, ids=[named for _, named in REFUSED])
def test_callbacks_refuse_bad_numbers_naming_the_argument(build, named):
    with pytest.raises(ValueError, match=f"^{named} must be"):
        build()


@pytest.mark.parametrize("value", [0, -1, True, 1.0, "3", None])
def test_a_count_must_be_a_positive_integer(value):
    with pytest.raises(ValueError, match=r"^n must be a positive integer, got"):
        check_count("n", value)


def test_optional_counts_and_minimums():
    check_count("n", None, optional=True)
    check_count("n", 2, minimum=2)
    with pytest.raises(ValueError, match=r"an integer >= 2 or None"):
        check_count("n", 1, minimum=2, optional=True)


@pytest.mark.parametrize("value", [0.0, 1.0, math.nan, False, "0.5"])
def test_a_number_in_an_open_interval(value):
    with pytest.raises(ValueError, match=r"^p must be a number in \(0, 1\), got"):
        check_number("p", value, 0, 1, low_open=True, high_open=True)


def test_numbers_that_fit_pass():
    check_number("p", 0.5, 0, 1, low_open=True, high_open=True)
    check_number("clip", 3, 0, low_open=True)
    check_number("clip", None, 0, low_open=True, optional=True)
