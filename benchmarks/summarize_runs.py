"""Summarise run directories into Markdown tables: mean ± std over seeds.

    python benchmarks/summarize_runs.py RUNS_DIR [RUNS_DIR ...] [--papers [FILE]]

Reads every results.json below the given folders (``clbench.record.RunRecord``: a
malformed or old record is one line naming the file), so it also covers runs made with
``tracking=none``. One table per scenario kind, one row per (scenario, backbone,
strategy), a seed seen twice counting once; the columns are the kind's board columns
(its protocol's ``BoardSpec``: primary and secondary metrics, costs) plus its
``details`` (e.g. inference params, passes per training sample, peak RSS; backward
cache and state for test-time runs) and, where a run reports them, its method
statistics. For boards from tracked runs use ``clbench leaderboard publish``.

``--papers`` adds, for the class-incremental runs, a table of our final accuracy (A_last)
and average incremental accuracy (A_bar), in percent, beside the published numbers of
``benchmarks/paper_numbers.json`` (or FILE): one row per (scenario, backbone, strategy)
that has a published number, each published number with its difference to ours and its
source (the paper, or the official repository's log).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from clbench.errors import ClbenchError
from clbench.protocols.base import Column, protocol_for
from clbench.record import RunRecord

#: the published numbers --papers reads by default
PAPER_NUMBERS = Path(__file__).resolve().parent / "paper_numbers.json"
#: run metric -> the key of a published number
PAPER_METRICS = {"final_accuracy": "A_last", "average_incremental_accuracy": "A_bar"}


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


def load_papers(path: Path) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """The published numbers: {scenario: {strategy: [reference, ...]}}."""
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ClbenchError(f"cannot read the published numbers {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ClbenchError(f"{path}: not JSON ({e.msg}, line {e.lineno})") from None
    shape = "{scenario: {strategy: [{kind, A_last, A_bar, source}, ...]}}"
    if not isinstance(data, dict):
        raise ClbenchError(f"{path}: expected {shape}")
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for scenario, table in data.items():
        if not isinstance(table, dict):  # the "about" note
            continue
        for strategy, refs in table.items():
            if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
                raise ClbenchError(f"{path}: {scenario}.{strategy}: expected {shape}")
            for ref in refs:
                bad = [k for k in ("kind", "A_last", "A_bar", "source") if k not in ref]
                bad += [
                    f"{k} (a number or null)"
                    for k in ("A_last", "A_bar")
                    if k in ref and not isinstance(ref[k], int | float | None)
                ]
                if bad:
                    raise ClbenchError(
                        f"{path}: {scenario}.{strategy}: a reference lacks {', '.join(bad)}"
                    )
            out.setdefault(scenario, {})[strategy] = refs
    return out


def percent(values: list[float | None]) -> float | None:
    vals = [100 * v for v in values if v is not None]
    return statistics.mean(vals) if vals else None


def papers_table(
    runs: dict[tuple[str, str, str], dict[int, RunRecord]],
    papers: dict[str, dict[str, list[dict[str, Any]]]],
) -> None:
    """Our A_last / A_bar (%, mean ± std over seeds) beside the published ones."""
    head = ["scenario", "backbone", "strategy", "n", "A_last", "A_bar"]
    head += ["published A_last (Δ)", "published A_bar (Δ)", "kind", "source"]
    rows, missing = [], []
    for (scenario, backbone, name), by_seed in sorted(runs.items()):
        refs = papers.get(scenario, {}).get(name)
        if not refs:
            missing.append(f"{scenario}/{name}")
            continue
        rs = list(by_seed.values())
        ours = {m: [r.metrics.get(m) for r in rs] for m in PAPER_METRICS}
        mine = {m: percent(v) for m, v in ours.items()}
        cells = [scenario, backbone, name, str(len(rs))]
        cells += [mean_std([None if v is None else 100 * v for v in ours[m]]) for m in ours]
        for i, ref in enumerate(refs):
            published = []
            for metric, key in PAPER_METRICS.items():
                value = ref[key]
                if value is None:
                    published.append("-")
                elif mine[metric] is None:
                    published.append(f"{value:.2f}")
                else:
                    published.append(f"{value:.2f} ({mine[metric] - value:+.2f})")
            lead = cells if i == 0 else [""] * len(cells)
            rows.append([*lead, *published, ref["kind"], ref["source"]])
    if not rows and not missing:
        return
    print("\nclass_incremental beside the published numbers (%; Δ = ours - published)\n")
    if rows:
        print("| " + " | ".join(head) + " |")
        print("|---" * len(head) + "|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
    if missing:
        print(f"\nno published number for: {', '.join(missing)}")


def main(roots: list[str], papers: Path | None = None) -> None:
    kinds: dict[str, dict[tuple[str, str, str], dict[int, RunRecord]]] = defaultdict(
        lambda: defaultdict(dict)
    )
    published = load_papers(papers) if papers is not None else None  # a bad file: fail first
    for root in roots:
        for path in sorted(Path(root).rglob("results.json")):
            r = RunRecord.load(path)
            r.require(protocol_for(r.kind, r.scenario).record_fields, str(path))
            kinds[r.kind][(r.scenario, r.backbone, r.strategy)][r.seed] = r
    for kind in sorted(kinds):
        table(kind, kinds[kind])
    if published is not None:
        papers_table(kinds.get("class_incremental", {}), published)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python benchmarks/summarize_runs.py",
        description="Markdown tables (mean ± std over seeds) of the run directories below "
        "RUNS_DIR; --papers adds the class-incremental results beside the published ones",
    )
    p.add_argument("roots", nargs="+", metavar="RUNS_DIR")
    p.add_argument(
        "--papers",
        nargs="?",
        const=PAPER_NUMBERS,
        default=None,
        type=Path,
        metavar="FILE",
        help=f"published numbers (default: {PAPER_NUMBERS.name} beside this script)",
    )
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse_args(sys.argv[1:])
    try:
        main(args.roots, args.papers)
    except ClbenchError as e:
        sys.exit(f"error: {e}")
