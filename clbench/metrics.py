"""Class-incremental metrics: pure functions of an accuracy matrix.

Definitions and the toolbox conventions they match: docs/protocols.md
("Class-incremental metrics").

``R[t][i]`` is the accuracy on test experience ``i`` after training experience ``t``
(0-based, ``T`` experiences, test experience ``i`` holds the classes of training
experience ``i``). Missing entries (a task-aware accuracy that cannot be computed, an
initial accuracy the model had no output unit for) are NaN and are skipped where a
definition allows it.

NaN is clbench's one convention for "not available": a metric that is undefined for a run
(FWT with a growing head, forgetting for a single experience) is NaN here, ``null`` in
results.json, ``n/a`` in printed summaries and on boards, and is not logged to MLflow.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Matrix = np.ndarray | Sequence[Sequence[float | None]]


def as_matrix(r: Matrix) -> np.ndarray:
    """A float (T, T) array; ``None`` becomes NaN."""
    a = np.array([[np.nan if v is None else v for v in row] for row in r], dtype=float)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be square and non-empty, got shape {a.shape}")
    return a


def _mean(values: list[float]) -> float:
    vals = [v for v in values if not np.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def seen_accuracy(r: Matrix, sizes: Sequence[int], t: int) -> float:
    """Sample-weighted accuracy over all test samples of experiences 0..t after step t."""
    a = as_matrix(r)
    n = np.asarray(sizes[: t + 1], dtype=float)
    return float((a[t, : t + 1] * n).sum() / n.sum())


def final_accuracy(r: Matrix, sizes: Sequence[int]) -> float:
    """A_last: accuracy over all seen test samples after the last experience (PILOT)."""
    a = as_matrix(r)
    return seen_accuracy(a, sizes, a.shape[0] - 1)


def final_accuracy_task_avg(r: Matrix) -> float:
    """Task-averaged final accuracy: mean of the last row (mammoth / L2P convention)."""
    a = as_matrix(r)
    return _mean(list(a[-1]))


def average_incremental_accuracy(r: Matrix, sizes: Sequence[int]) -> float:
    """A_bar: mean over t of the accuracy over all classes seen up to t (PILOT)."""
    a = as_matrix(r)
    return float(np.mean([seen_accuracy(a, sizes, t) for t in range(a.shape[0])]))


def forgetting(r: Matrix, include_final: bool = False) -> float:
    """Chaudhry forgetting: mean over i < T-1 of max_{l < T-1} R[l][i] - R[T-1][i].

    ``include_final=True`` takes the max over l <= T-1 (PILOT / mammoth variant).
    NaN for a single experience.
    """
    a = as_matrix(r)
    last = a.shape[0] - 1
    rows = a[: last + 1] if include_final else a[:last]
    drops = [float(np.nanmax(rows[:, i]) - a[last, i]) for i in range(last)]
    return _mean(drops)


def bwt(r: Matrix) -> float:
    """Backward transfer: mean over i < T-1 of R[T-1][i] - R[i][i]."""
    a = as_matrix(r)
    last = a.shape[0] - 1
    return _mean([a[last, i] - a[i, i] for i in range(last)])


def fwt(r: Matrix, initial: Sequence[float | None]) -> float:
    """Forward transfer: mean over i > 0 of R[i-1][i] - b_i (b: the initial model's accuracies).

    A term whose b_i is missing (``None`` / NaN: the initial model had no output unit for
    experience i's classes, so b_i is no measurement) is skipped; NaN (not available) when
    no term is left, which is every run with a growing head.
    """
    a = as_matrix(r)
    b = np.array([np.nan if v is None else v for v in initial], dtype=float)
    return _mean([a[i - 1, i] - b[i] for i in range(1, a.shape[0])])


def plasticity(r: Matrix) -> float:
    """Mean over i of R[i][i]: accuracy on each experience right after learning it."""
    a = as_matrix(r)
    return _mean(list(np.diag(a)))


def class_incremental_summary(
    r: Matrix, sizes: Sequence[int], initial: Sequence[float | None]
) -> dict[str, float]:
    """Every headline metric of one accuracy matrix."""
    return {
        "final_accuracy": final_accuracy(r, sizes),
        "final_accuracy_task_avg": final_accuracy_task_avg(r),
        "average_incremental_accuracy": average_incremental_accuracy(r, sizes),
        "forgetting": forgetting(r),
        "forgetting_incl_final": forgetting(r, include_final=True),
        "bwt": bwt(r),
        "fwt": fwt(r, initial),
        "plasticity": plasticity(r),
    }
