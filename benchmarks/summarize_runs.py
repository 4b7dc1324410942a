"""Summarise run directories into Markdown tables: mean ± std over seeds.

    python benchmarks/summarize_runs.py RUNS_DIR [RUNS_DIR ...]

Reads every results.json below the given folders (``clbench.record.RunRecord``: a
malformed or old record is one line naming the file), so it also covers runs made with
``tracking=none``. One table per scenario kind, one row per (scenario, backbone,
strategy), a seed seen twice counting once; the columns are the kind's board columns
(its protocol's ``BoardSpec``: primary and secondary metrics, costs) plus its
``details`` (e.g. inference params, passes per training sample, peak RSS; backward
cache and state for test-time runs) and, where a run reports them, its method
statistics. For boards from tracked runs use ``clbench leaderboard publish``.
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict
from pathlib import Path

from clbench.errors import ClbenchError
from clbench.protocols.base import Column, protocol_for
from clbench.record import RunRecord


def mean_std(values: list[float]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.3f} ± {std:.3f}"


def cost(column: Column, values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if len(vals) < len(values) or not vals:  # a run from before the counter, or not counted
        return "n/a"
    return column.show(max(vals) if column.aggregate == "max" else statistics.mean(vals))


def table(kind: str, runs: dict[tuple[str, str, str], dict[int, RunRecord]]) -> None:
    spec = protocol_for(kind).board
    metric_cols = [spec.primary, *spec.secondary]
    metric_cols += [c for c in spec.details if c.source == "metrics"]
    cost_cols = [*spec.costs, *(c for c in spec.details if c.source == "efficiency")]
    stats_shown = any(r.fields.get("method_stats") for g in runs.values() for r in g.values())
    head = ["scenario", "backbone", "strategy", *(c.label for c in metric_cols)]
    head += [c.label for c in cost_cols] + (["method stats"] if stats_shown else []) + ["n"]
    print(f"\n{kind}\n")
    print("| " + " | ".join(head) + " |")
    print("|---" * len(head) + "|")
    for (scenario, backbone, name), by_seed in sorted(runs.items()):
        rs = list(by_seed.values())
        cells = [scenario, backbone, name + (" †" if any(r.uses_task_id for r in rs) else "")]
        cells += [mean_std([r.metrics.get(c.key) for r in rs]) for c in metric_cols]
        cells += [cost(c, [r.efficiency.get(c.key) for r in rs]) for c in cost_cols]
        if stats_shown:
            stats = defaultdict(list)
            for r in rs:
                for k, v in (r.fields.get("method_stats") or {}).items():
                    stats[k].append(v)
            cells.append(
                ", ".join(f"{k} {statistics.mean(v):.3f}" for k, v in sorted(stats.items())) or "-"
            )
        print("| " + " | ".join([*cells, str(len(rs))]) + " |")


def main(roots: list[str]) -> None:
    kinds: dict[str, dict[tuple[str, str, str], dict[int, RunRecord]]] = defaultdict(
        lambda: defaultdict(dict)
    )
    for root in roots:
        for path in sorted(Path(root).rglob("results.json")):
            r = RunRecord.load(path)
            r.require(protocol_for(r.kind, r.scenario).record_fields, str(path))
            kinds[r.kind][(r.scenario, r.backbone, r.strategy)][r.seed] = r
    for kind in sorted(kinds):
        table(kind, kinds[kind])


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python benchmarks/summarize_runs.py RUNS_DIR [RUNS_DIR ...]")
    try:
        main(sys.argv[1:])
    except ClbenchError as e:
        sys.exit(f"error: {e}")
