"""Summarise run directories into a Markdown table: mean ± std over seeds per strategy.

    python benchmarks/summarize_runs.py RUNS_DIR [RUNS_DIR ...]

Reads every results.json below the given folders (one row per strategy; a seed seen
twice counts once), so it also covers runs made with tracking=none, and it shows the
cost columns of benchmarks/RESULTS.md (inference params, passes per training sample,
peak RSS). For boards from tracked runs use `clbench leaderboard publish`.
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


def main(roots: list[str]) -> None:
    runs: dict[str, dict[int, dict]] = defaultdict(dict)
    for root in roots:
        for path in sorted(Path(root).rglob("results.json")):
            r = json.loads(path.read_text())
            runs[r["strategy"]][r["seed"]] = r
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
