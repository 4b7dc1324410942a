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
