"""Plots written into every run directory."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def accuracy_heatmap(matrix: Sequence[Sequence[float]], path: Path, title: str) -> Path:
    """Heatmap of R[t][i] with the values written in the cells."""
    a = np.array(matrix, dtype=float)
    t, n = a.shape
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * n, 0.8 + 0.7 * t), dpi=100)
    im = ax.imshow(a, vmin=0.0, vmax=1.0, cmap="viridis")
    for i in range(t):
        for j in range(n):
            if not np.isnan(a[i, j]):
                color = "black" if a[i, j] > 0.6 else "white"
                ax.text(j, i, f"{a[i, j]:.2f}", ha="center", va="center", fontsize=8, color=color)
    ax.set_xticks(range(n), [str(j + 1) for j in range(n)])
    ax.set_yticks(range(t), [str(i + 1) for i in range(t)])
    ax.set_xlabel("test experience")
    ax.set_ylabel("after training experience")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return path


def accuracy_curve(values: Sequence[float], path: Path, title: str) -> Path:
    """Accuracy on all classes seen so far after each experience."""
    fig, ax = plt.subplots(figsize=(4.5, 3.0), dpi=100)
    x = np.arange(1, len(values) + 1)
    ax.plot(x, values, marker="o")
    ax.set_ylim(0.0, 1.02)
    ax.set_xticks(x)
    ax.set_xlabel("experience")
    ax.set_ylabel("accuracy on seen classes")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return path


def online_error_bars(
    domains: Sequence[str], errors: Sequence[float], path: Path, title: str
) -> Path:
    """Online error of each test-time domain, in stream order, with the mean as a line."""
    fig, ax = plt.subplots(figsize=(1.5 + 0.45 * len(domains), 3.6), dpi=100)
    ax.bar(range(len(domains)), errors, color="#4c72b0")
    ax.axhline(float(np.mean(errors)), color="#c44e52", lw=1, label=f"mean {np.mean(errors):.3f}")
    ax.set_xticks(range(len(domains)), list(domains), rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("online error")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def request_curves(series: dict[str, Sequence[float | None]], path: Path, title: str) -> Path:
    """Several accuracies after each erasure request (missing values are gaps)."""
    fig, ax = plt.subplots(figsize=(4.8, 3.2), dpi=100)
    for label, values in series.items():
        y = np.array([np.nan if v is None else v for v in values], dtype=float)
        ax.plot(np.arange(1, len(y) + 1), y, marker="o", label=label)
    n = max((len(v) for v in series.values()), default=1)
    ax.set_xticks(np.arange(1, n + 1))
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("after request")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return path


def attention_maps(examples: Sequence[dict], path: Path, title: str) -> Path:
    """Attention over each example bag's instance coordinates (one panel per bag): every
    instance fills its patch cell at its level-0 (x, y), coloured by its attention min-max
    scaled within the bag (grey: no instance); key instances (label 1) are marked red."""
    n = len(examples)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows + 0.4), dpi=100)
    flat = np.atleast_1d(axes).ravel()
    cmap = plt.get_cmap("magma").with_extremes(bad="#dddddd")
    for ax, e in zip(flat, examples, strict=False):
        xy = np.asarray(e["coords"], dtype=float)
        a = np.asarray(e["attention"], dtype=float)
        span = a.max() - a.min()
        a = (a - a.min()) / span if span > 0 else np.ones_like(a)
        step = _grid_step(xy)
        cell = np.round((xy - xy.min(0)) / step).astype(int)
        grid = np.full((cell[:, 1].max() + 1, cell[:, 0].max() + 1), np.nan)
        grid[cell[:, 1], cell[:, 0]] = a
        ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        labels = e.get("instance_labels")
        if labels is not None:
            key = np.asarray(labels, dtype=bool)
            ax.scatter(cell[key, 0], cell[key, 1], c="red", marker="x", s=14, linewidths=1.0)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{e.get('task', '')}: {e['bag']} (label {e['label']})", fontsize=7)
    for ax in flat[n:]:
        ax.axis("off")
    fig.suptitle(f"attention (x: key instances) - {title}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return path


def _grid_step(xy: np.ndarray) -> float:
    """The smallest non-zero coordinate gap (the patch step), 1 if there is none."""
    gaps = np.diff(np.unique(xy))
    gaps = gaps[gaps > 0]
    return float(gaps.min()) if len(gaps) else 1.0
