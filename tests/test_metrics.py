"""Metrics on hand-computed matrices (docs/protocols.md definitions)."""

import math

import pytest

from clbench import metrics

# 3 experiences; test sizes 10, 20, 30.
R = [
    [0.9, 0.0, 0.0],
    [0.6, 0.8, 0.0],
    [0.5, 0.4, 0.7],
]
SIZES = [10, 20, 30]


def test_final_accuracy_is_sample_weighted():
    # (0.5*10 + 0.4*20 + 0.7*30) / 60 = (5 + 8 + 21) / 60
    assert metrics.final_accuracy(R, SIZES) == pytest.approx(34 / 60)


def test_final_accuracy_task_averaged():
    assert metrics.final_accuracy_task_avg(R) == pytest.approx((0.5 + 0.4 + 0.7) / 3)


def test_average_incremental_accuracy():
    a0 = 0.9
    a1 = (0.6 * 10 + 0.8 * 20) / 30
    a2 = 34 / 60
    assert metrics.average_incremental_accuracy(R, SIZES) == pytest.approx((a0 + a1 + a2) / 3)


def test_forgetting_excludes_final_row_by_default():
    # i=0: max(0.9, 0.6) - 0.5 = 0.4 ; i=1: max(0.0, 0.8) - 0.4 = 0.4
    assert metrics.forgetting(R) == pytest.approx(0.4)


def test_forgetting_variant_including_final_row():
    r = [[0.5, 0.0], [0.9, 0.8]]  # accuracy on exp 0 went *up* after exp 1
    assert metrics.forgetting(r) == pytest.approx(0.5 - 0.9)
    assert metrics.forgetting(r, include_final=True) == pytest.approx(0.0)


def test_bwt():
    # i=0: 0.5-0.9 ; i=1: 0.4-0.8
    assert metrics.bwt(R) == pytest.approx(((0.5 - 0.9) + (0.4 - 0.8)) / 2)


def test_fwt_against_initial_model():
    r = [[0.9, 0.3, 0.2], [0.6, 0.8, 0.5], [0.5, 0.4, 0.7]]
    b = [0.1, 0.1, 0.25]
    # i=1: 0.3-0.1 ; i=2: 0.5-0.25
    assert metrics.fwt(r, b) == pytest.approx((0.2 + 0.25) / 2)


def test_plasticity():
    assert metrics.plasticity(R) == pytest.approx((0.9 + 0.8 + 0.7) / 3)


def test_missing_entries_are_skipped():
    r = [[0.9, None], [0.7, 0.8]]
    assert math.isnan(metrics.fwt(r, [0.0, None]))
    assert metrics.plasticity(r) == pytest.approx(0.85)


def test_single_experience_has_no_forgetting_value():
    assert math.isnan(metrics.forgetting([[0.9]]))
    assert metrics.final_accuracy([[0.9]], [5]) == pytest.approx(0.9)


def test_rejects_non_square():
    with pytest.raises(ValueError, match="square"):
        metrics.as_matrix([[0.1, 0.2]])
