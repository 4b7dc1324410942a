"""Summarise run directories into a Markdown table: mean ± std over seeds per strategy.

    python benchmarks/summarize_runs.py RUNS_DIR [RUNS_DIR ...]

Reads every results.json below the given folders (one row per strategy, or per backbone
and strategy for test-time runs; a seed seen twice counts once), so it also covers runs
made with tracking=none, and it shows the cost columns of benchmarks/RESULTS.md
(inference params, passes per training sample, peak RSS; for test-time runs images/s
and adaptation memory). For boards from tracked runs use `clbench leaderboard publish`.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

COLUMNS = [
    ("final acc", "metrics", "final_accuracy"),
    ("avg incr acc", "metrics", "average_incremental_accuracy"),
    ("forgetting", "metrics", "forgetting"),
    ("TA final", "metrics", "task_aware/final_accuracy"),
    ("TA forgetting", "metrics", "task_aware/forgetting"),
]


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def _passes(eff: list[dict], key: str) -> str:
    values = [e.get(key) for e in eff]
    if any(v is None for v in values):  # a run from before the counter, or no ViT stem
        return "n/a"
    return f"{statistics.mean(values):.2f}"


def tta_table(runs: dict[tuple[str, str], dict[int, dict]]) -> None:
    """Mean online error, clean accuracy kept and the cost per (backbone, strategy)."""
    head = ["backbone", "strategy", "mean online error", "clean acc after", "images/s"]
    head += ["backward cache MiB", "state MiB", "trainable", "method stats", "n"]
    print("| " + " | ".join(head) + " |")
    print("|---" * len(head) + "|")
    for (backbone, name), by_seed in sorted(runs.items()):
        rs = list(by_seed.values())
        eff = [r["efficiency"] for r in rs]
        stats = defaultdict(list)
        for r in rs:
            for k, v in r.get("method_stats", {}).items():
                stats[k].append(v)
        cells = [
            backbone,
            name,
            mean_std([r["metrics"]["mean_online_error"] for r in rs]),
            mean_std([r["metrics"]["clean_accuracy_after"] for r in rs]),
            f"{statistics.mean(e['images_per_second'] for e in eff):.0f}",
            f"{max(e['backward_cache_mb'] for e in eff):.1f}",
            f"{max(e['state_mb'] for e in eff):.1f}",
            f"{max(e['trainable_params'] for e in eff):,}",
            ", ".join(f"{k} {statistics.mean(v):.3f}" for k, v in sorted(stats.items())) or "-",
            str(len(rs)),
        ]
        print("| " + " | ".join(cells) + " |")


def main(roots: list[str]) -> None:
    runs: dict[str, dict[int, dict]] = defaultdict(dict)
    tta: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
    for root in roots:
        for path in sorted(Path(root).rglob("results.json")):
            r = json.loads(path.read_text())
            if r.get("kind") == "test_time":
                tta[(r["backbone"], r["strategy"])][r["seed"]] = r
            else:
                runs[r["strategy"]][r["seed"]] = r
    if tta:
        tta_table(tta)
    if not runs:
        return
    head = [c[0] for c in COLUMNS]
    head += ["trainable", "inference params", "s/step", "passes/pred", "passes/train sample"]
    head += ["peak RSS MB", "n"]
    print("| strategy | " + " | ".join(head) + " |")
    print("|---" * (len(head) + 1) + "|")
    for name, by_seed in sorted(runs.items()):
        rs = list(by_seed.values())
        cells = [mean_std([r[src][key] for r in rs]) for _, src, key in COLUMNS]
        eff = [r["efficiency"] for r in rs]
        cells += [
            f"{max(e['trainable_params'] for e in eff):,}",
            f"{max(e['inference_params'] for e in eff):,}",
            f"{statistics.mean(e['seconds_per_step'] for e in eff) * 1000:.1f} ms",
            _passes(eff, "passes_per_prediction"),
            _passes(eff, "passes_per_train_sample"),
            f"{max(e['peak_rss_mb'] for e in eff):.0f}",
            str(len(rs)),
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python benchmarks/summarize_runs.py RUNS_DIR [RUNS_DIR ...]")
    main(sys.argv[1:])
