"""Leaderboards from tracked runs: ``clbench leaderboard publish`` and ``render``.

Reads every finished run of an MLflow experiment (its ``results.json`` artifact, the same
record as the run directory's), groups the runs by scenario, strategy, backbone and the
rest of the resolved configuration (everything but the :data:`BOOKKEEPING_KEYS`), keeps
one run per seed (the latest) in each group, aggregates over seeds (mean, sample std, n),
ranks each scenario's groups by the scenario kind's primary metric, and writes

- ``<out>/<scenario>.json``: the board as data, with provenance (run ids and names, git
  commits, clbench versions, hardware);
- ``<out>/<scenario>.md``: the same as a Markdown table and a provenance list;
- ``<out>/index.html``: every board of ``<out>`` (the ones just written and the others
  already there) with two inline SVG plots (the kind's per-step curve, per strategy; the
  primary metric with error bars).

``publish(..., merge=True)`` (``--merge``) adds new runs to a board already in ``<out>``
without its old runs: the old entries whose (strategy, backbone) has no new run are kept
as they are (a board whose store is gone still grows), the rest is rebuilt, and all are
ranked again (:func:`merge_board`). ``render`` (``clbench leaderboard render``) writes every
``.md`` and the index again from the board JSONs alone, e.g. after the board format changed.
Everything is read and checked before anything is written: an error leaves ``<out>`` as it
was.

Two groups of one strategy and backbone that differ in configuration are separate entries,
each labelled with the values that tell it from the others (``lora (strategy.lr=0.01)``).

What a board ranks by, its columns and its curve come from the scenario kind's
:class:`~clbench.protocols.base.BoardSpec` (its protocol's ``board``); this module
knows no kind.

The output is a pure function of the runs and the boards already in ``<out>`` (sorted keys,
fixed float formatting, no timestamps), so publishing the same runs twice gives
byte-identical files. Every string
that comes from a run is escaped for HTML and for Markdown (line breaks and other control
characters become spaces there); the JSON keeps it exactly. A run whose record is malformed
is skipped with a one-line warning naming it: one bad run does not stop the others' boards.
"""

from __future__ import annotations

import copy
import hashlib
import html
import json
import math
import os
import re
import statistics
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clbench.errors import ClbenchError
from clbench.protocols.base import BoardSpec, Column, protocol_for
from clbench.record import RunRecord, write_text_atomic


def board_spec(kind: str) -> BoardSpec:
    """The board specification of scenario kind ``kind`` (from its protocol)."""
    return protocol_for(kind).board


# ------------------------------------------------------------------------ reading
@dataclass(frozen=True)
class TrackedRun:
    """One finished tracked run: its MLflow identity and its run record."""

    run_id: str
    start_time: int
    record: RunRecord


def read_runs(uri: str | None, experiment: str) -> list[TrackedRun]:
    """Every finished run of ``experiment`` in the MLflow store at ``uri``."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from clbench.tracking import quiet

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = uri or mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise ClbenchError(  # opening it would create an empty store
            f"no MLflow store at {uri}; pass the store your runs logged to (--tracking-uri)"
        )
    with quiet():
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise ClbenchError(
                f"no MLflow experiment {experiment!r} at {client.tracking_uri}; "
                "run something with tracking on first, or pass --experiment"
            )
        runs, token = [], None
        while True:
            page = client.search_runs(
                [exp.experiment_id],
                filter_string="attributes.status = 'FINISHED'",
                max_results=1000,
                page_token=token,
            )
            runs.extend(page)
            token = page.token
            if not token:
                break
        out = []
        with tempfile.TemporaryDirectory() as tmp:
            for run in runs:
                rid = run.info.run_id
                try:
                    path = client.download_artifacts(rid, "results.json", f"{tmp}/{rid}")
                except Exception:  # a run not made by clbench (no record): not a board entry
                    continue
                source = f"results.json of MLflow run {rid}"
                try:
                    record = _read_record(Path(path), source)
                except ClbenchError as e:
                    reason = str(e).removeprefix(f"{source}: ")
                    warn(f"skipped MLflow run {rid}: its results.json: {reason}")
                    continue
                out.append(TrackedRun(rid, int(run.info.start_time or 0), record))
    return out


def _read_record(path: Path, source: str) -> RunRecord:
    """The run record in ``path``, checked for everything a board needs."""
    record = RunRecord.load(path, source)
    record.require(protocol_for(record.kind, record.scenario).record_fields, source)
    try:  # a JSON escape can make a lone surrogate, which no board file can hold
        json.dumps(record.to_dict(), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ClbenchError(f"{source}: a string is not valid Unicode (a lone surrogate)") from None
    return record


def warn(message: str) -> None:
    """One ``warning:`` line on stderr (line breaks in ``message`` become spaces)."""
    print(f"warning: {one_line(message)}", file=sys.stderr)


# -------------------------------------------------------------------- aggregating
def _finite(v: Any) -> bool:
    """Whether ``v`` is a finite number (an int too large for a float is not)."""
    try:
        return v is not None and math.isfinite(v)
    except (OverflowError, TypeError):
        return False


def _mean_std(values: Sequence[float]) -> dict[str, float | int | None]:
    vals = [float(v) for v in values if _finite(v)]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return {"mean": _r(statistics.mean(vals)), "std": _r(std), "n": len(vals)}


def _r(v: float) -> float:
    return float(f"{v:.6g}")


#: top-level keys of a run's resolved configuration that are bookkeeping, not part of what
#: was run: runs that differ only in these share a board entry (``tracking`` and ``hydra``
#: with everything under them). Every other key, nested ones as dotted paths
#: (``strategy.lr``, ``scenario.n_experiences``, ``backbone.checkpoint``), tells entries apart.
BOOKKEEPING_KEYS: tuple[str, ...] = (
    "seed",
    "runs_dir",
    "progress",
    "device",
    "checkpoint",
    "threads",
    "tracking",
    "hydra",
)

#: nested keys that are bookkeeping too: how data is read or fetched, never what is learned
#: (the same batches come with any number of reading processes)
BOOKKEEPING_PATHS: tuple[str, ...] = ("scenario.num_workers", "scenario.download")

#: top-level keys added to the run configuration after runs were published, with the value
#: a run without the key ran with: a record that lacks one counts as having that value, so
#: older runs share a board entry with new ones run alike
LATER_KEYS: dict[str, Any] = {"precision": "fp32", "deterministic": True}

#: a board group: (scenario, strategy, backbone, configuration fingerprint)
GroupKey = tuple[str, str, str, str]


def run_configuration(config: Mapping[str, Any]) -> dict[str, Any]:
    """What defines a run's board entry besides its names: its resolved configuration
    without the :data:`BOOKKEEPING_KEYS`, flattened to dotted keys."""
    out: dict[str, Any] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, Mapping) and v:
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v

    walk({**LATER_KEYS, **{k: v for k, v in config.items() if k not in BOOKKEEPING_KEYS}}, "")
    return {k: v for k, v in out.items() if k not in BOOKKEEPING_PATHS}


def _fingerprint(configuration: Mapping[str, Any]) -> str:
    """A short, stable id of a flattened configuration."""
    text = json.dumps(configuration, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def latest_per_seed(runs: Iterable[TrackedRun]) -> dict[GroupKey, list[TrackedRun]]:
    """Runs grouped by (scenario, strategy, backbone, configuration fingerprint); per seed
    the latest run only."""
    groups: dict[GroupKey, dict[int, TrackedRun]] = defaultdict(dict)
    for run in sorted(runs, key=lambda r: (r.start_time, r.run_id)):
        rec = run.record
        config_id = _fingerprint(run_configuration(rec.config))
        groups[(rec.scenario, rec.strategy, rec.backbone, config_id)][rec.seed] = run
    return {k: [v[s] for s in sorted(v)] for k, v in groups.items()}


def _show_value(v: Any) -> str:
    """A configuration value as a Hydra override writes it (``0.01``, ``true``, ``[a,b]``)."""
    if isinstance(v, str):
        return v
    if isinstance(v, list | tuple):
        return "[" + ",".join(_show_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ",".join(f"{k}:{_show_value(x)}" for k, x in sorted(v.items())) + "}"
    return json.dumps(v)


def config_labels(configurations: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """config id -> label: the dotted keys whose values differ between the configurations
    (of one strategy and backbone on one board), as ``key=value`` (``key unset`` where a
    configuration lacks the key); empty when there is only one configuration."""
    if len(configurations) < 2:
        return {cid: "" for cid in configurations}

    def canon(c: Mapping[str, Any], k: str) -> str | None:
        return json.dumps(c[k], sort_keys=True, default=str) if k in c else None

    keys = sorted({k for c in configurations.values() for k in c})
    differ = [k for k in keys if len({canon(c, k) for c in configurations.values()}) > 1]
    labels = {
        cid: ", ".join(f"{k}={_show_value(c[k])}" if k in c else f"{k} unset" for k in differ)
        for cid, c in configurations.items()
    }
    if len(set(labels.values())) < len(labels):  # values that print alike ("1" and 1)
        labels = {cid: f"{label}, config {cid}" for cid, label in labels.items()}
    return labels


def _curve(runs: Sequence[TrackedRun], key: str) -> list[float | None]:
    steps = [[s.get(key) for s in r.record.steps] for r in runs]
    length = min((len(s) for s in steps), default=0)
    return [_mean_std([s[i] for s in steps])["mean"] for i in range(length)]


def build_boards(runs: Iterable[TrackedRun]) -> dict[str, dict[str, Any]]:
    """scenario -> board (kind, primary metric, ranked entries with provenance)."""
    by_scenario: dict[str, list[dict[str, Any]]] = defaultdict(list)
    kinds: dict[str, str] = {}
    specs: dict[str, BoardSpec] = {}
    grouped = latest_per_seed(runs)
    configurations: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = defaultdict(dict)
    for (scenario, strategy, backbone, config_id), group in grouped.items():
        configuration = run_configuration(group[0].record.config)
        configurations[(scenario, strategy, backbone)][config_id] = configuration
    labels = {name: config_labels(confs) for name, confs in configurations.items()}
    for (scenario, strategy, backbone, config_id), group in grouped.items():
        kind = group[0].record.kind
        if kinds.setdefault(scenario, kind) != kind:
            raise ClbenchError(
                f"scenario {scenario!r} has runs of two kinds ({kinds[scenario]!r}, {kind!r}); "
                "publish them from separate experiments"
            )
        if kind not in specs:
            specs[kind] = board_spec(kind)
        spec = specs[kind]
        keys = [spec.primary.key] + [c.key for c in spec.secondary]
        metrics = {k: _mean_std([r.record.metrics.get(k) for r in group]) for k in keys}
        cost = {
            c.key: _aggregate(c, [r.record.efficiency.get(c.key) for r in group])
            for c in spec.costs
        }
        tags = [r.record.tags for r in group]
        by_scenario[scenario].append(
            {
                "strategy": strategy,
                "backbone": backbone,
                "config_id": config_id,
                "config_label": labels[(scenario, strategy, backbone)][config_id],
                "n": len(group),
                "seeds": [r.record.seed for r in group],
                "uses_task_id": any(r.record.uses_task_id for r in group),
                "metrics": metrics,
                "cost": cost,
                "curve": _curve(group, spec.curve),
                "provenance": {
                    "runs": [{"run_id": r.run_id, "run_name": r.record.run_name} for r in group],
                    "git_commits": sorted({str(t.get("git_commit", "")) for t in tags}),
                    "clbench_versions": sorted({str(t.get("clbench_version", "")) for t in tags}),
                    "hardware": sorted({str(t.get("hardware", "")) for t in tags}),
                },
            }
        )
    boards = {}
    for scenario, entries in by_scenario.items():
        kind = kinds[scenario]
        spec = specs[kind]
        primary, higher = spec.primary.key, spec.higher_is_better
        boards[scenario] = {
            "scenario": scenario,
            "kind": kind,
            "primary_metric": primary,
            "primary_label": spec.primary.label,
            "higher_is_better": higher,
            "secondary_metrics": [c.key for c in spec.secondary],
            "entries": rank_entries(entries, primary, higher),
        }
    return boards


def rank_entries(
    entries: Iterable[dict[str, Any]], primary: str, higher_is_better: bool
) -> list[dict[str, Any]]:
    """``entries`` best first by the mean of ``primary`` (entries without one last; ties by
    strategy, backbone, configuration label), each given its ``rank`` (1 is best). One rule
    for fresh and merged boards, so a merged board ranks as a fresh one of its entries."""

    def order(e: Mapping[str, Any]) -> tuple:
        m = e["metrics"][primary]["mean"]
        missing = m is None
        value = 0.0 if missing else (-m if higher_is_better else m)
        return (missing, value, e["strategy"], e["backbone"], e.get("config_label") or "")

    ranked = sorted(entries, key=order)
    for i, e in enumerate(ranked, 1):
        e["rank"] = i
    return ranked


def _aggregate(column: Column, values: Sequence[Any]) -> float | None:
    """A cost over seeds: the max or the mean of the finite values."""
    finite = [float(v) for v in values if _finite(v)]
    if column.aggregate == "max":
        return _r(max(finite)) if finite else None
    return _mean_std(finite)["mean"]


# ------------------------------------------------------------------------ writing
#: characters that end a line for some reader (CR, LF, VT, FF, NEL, U+2028/9, ...) or are
#: otherwise control characters: shown as a space in Markdown and HTML
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
#: a run id shown as a Markdown code span as it is (anything else is escaped text)
_PLAIN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")


def one_line(text: Any) -> str:
    """``text`` as one line: every control character (CR and LF too) becomes a space."""
    return _CONTROL.sub(" ", str(text))


def md_escape(text: Any) -> str:
    """``text`` safe inside a Markdown table cell: one line, no HTML, no emphasis, no links,
    no cell breaks."""
    s = html.escape(one_line(text), quote=False)
    for ch in "\\`*_{}[]()#+!|~":
        s = s.replace(ch, "\\" + ch)
    return s


def md_code(text: Any) -> str:
    """``text`` as a Markdown code span if it is a plain id, else as escaped text (inside a
    code span no escape works, so a backtick or pipe could not be neutralised there)."""
    s = str(text)
    return f"`{s}`" if _PLAIN_ID.fullmatch(s) else md_escape(s)


def _fmt(stat: Mapping[str, Any] | None) -> str:
    if not stat or stat.get("mean") is None:
        return "n/a"
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def _labels(board: Mapping[str, Any]) -> list[str]:
    """The metric columns' headers, for the metrics the board holds (a board published by
    an earlier clbench may hold fewer)."""
    spec = board_spec(board["kind"])
    known = {c.key: c.label for c in (spec.primary, *spec.secondary)}
    return [spec.primary.label] + [known.get(k, k) for k in board["secondary_metrics"]]


def _cells(board: Mapping[str, Any], e: Mapping[str, Any]) -> list[str]:
    spec = board_spec(board["kind"])
    keys = [board["primary_metric"], *board["secondary_metrics"]]
    cells = [_fmt(e["metrics"].get(k)) for k in keys]
    cells += [c.show(e["cost"].get(c.key)) for c in spec.costs]
    return cells


TASK_ID_NOTE = (
    "† uses the task id at test time (task-incremental): not comparable with the "
    "task-agnostic entries."
)


def _entry_name(e: Mapping[str, Any]) -> str:
    """The entry's strategy name with its configuration label, if it has one."""
    label = e.get("config_label")
    return f"{e['strategy']} ({label})" if label else str(e["strategy"])


def _name(e: Mapping[str, Any]) -> str:
    """The entry's name (:func:`_entry_name`), marked † when it uses the task id."""
    return _entry_name(e) + (" †" if e.get("uses_task_id") else "")


def _has_task_id(board: Mapping[str, Any]) -> bool:
    return any(e.get("uses_task_id") for e in board["entries"])


def _provenance(e: Mapping[str, Any], esc: Callable[[Any], str], code: Callable[[Any], str]) -> str:
    """One entry's provenance line; ``esc`` escapes text for the format, ``code`` escapes
    and marks up a run id."""
    p = e["provenance"]
    runs = ", ".join(f"{esc(r['run_name'])} ({code(r['run_id'])})" for r in p["runs"])
    joined = {
        k: ", ".join(esc(v) for v in p[k]) for k in ("git_commits", "clbench_versions", "hardware")
    }
    return (
        f"{esc(_entry_name(e))} / {esc(e['backbone'])}: seeds "
        f"{', '.join(map(str, e['seeds']))}; runs {runs}; git {joined['git_commits']}; "
        f"clbench {joined['clbench_versions']}; hardware {joined['hardware']}"
    )


def render_markdown(board: Mapping[str, Any]) -> str:
    arrow = "higher is better" if board["higher_is_better"] else "lower is better"
    costs = board_spec(board["kind"]).costs
    head = ["rank", "strategy", "backbone", *_labels(board), *(c.label for c in costs), "n"]
    lines = [
        f"# Leaderboard: {md_escape(board['scenario'])}",
        "",
        f"Scenario kind: {md_escape(board['kind'])}. Ranked by {md_escape(board['primary_label'])}"
        f" ({arrow}); mean ± sample std over seeds, one run per seed (the latest).",
        "Made by `clbench leaderboard publish` from tracked runs.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for e in board["entries"]:
        row = [str(e["rank"]), md_escape(_name(e)), md_escape(e["backbone"]), *_cells(board, e)]
        lines.append("| " + " | ".join([*row, str(e["n"])]) + " |")
    if _has_task_id(board):
        lines += ["", TASK_ID_NOTE]
    lines += ["", "## Provenance", ""]
    lines += [f"- {_provenance(e, md_escape, md_code)}" for e in board["entries"]]
    return "\n".join(lines) + "\n"


def esc_any(value: Any) -> str:
    """``value`` as HTML-escaped text on one line (quotes escaped: safe in attributes)."""
    return html.escape(one_line(value))


def html_code(value: Any) -> str:
    """``value`` as HTML-escaped text in ``<code>``."""
    return f"<code>{esc_any(value)}</code>"


PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2"]
PALETTE += ["#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39"]


def _svg_curves(board: Mapping[str, Any]) -> str:
    """The kind's per-step curve (e.g. accuracy on the seen classes after each experience,
    online error per domain), one line per entry, axes labelled by the kind's BoardSpec."""
    spec = board_spec(board["kind"])
    w, h, left, bottom, top, right = 560, 300, 56, 40, 20, 170
    entries = [e for e in board["entries"] if any(v is not None for v in e["curve"])]
    steps = max((len(e["curve"]) for e in entries), default=0)
    if steps == 0:
        return ""
    pw, ph = w - left - right, h - top - bottom

    def x(i: int) -> float:
        return left + (pw * i / (steps - 1) if steps > 1 else pw / 2)

    def y(v: float) -> float:
        return top + ph * (1 - v)

    parts = [
        f'<svg class="curves" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        f'role="img" aria-label="{html.escape(spec.curve_title.lower())}">',
        f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#333"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="#333"/>',
    ]
    for v in (0.0, 0.5, 1.0):
        parts.append(
            f'<text x="{left - 6}" y="{y(v) + 4:.1f}" font-size="11" text-anchor="end">'
            f"{v:.1f}</text>"
        )
    for i in range(steps):
        parts.append(
            f'<text x="{x(i):.1f}" y="{top + ph + 16}" font-size="11" text-anchor="middle">'
            f"{i + 1}</text>"
        )
    parts.append(
        f'<text class="x-label" x="{left + pw / 2:.1f}" y="{h - 6}" font-size="12" '
        f'text-anchor="middle">{html.escape(spec.curve_x)}</text>'
    )
    parts.append(
        f'<text class="y-label" transform="translate(14,{top + ph / 2:.1f}) rotate(-90)" '
        f'font-size="12" text-anchor="middle">{html.escape(spec.curve_y)}</text>'
    )
    for k, e in enumerate(entries):
        color = PALETTE[k % len(PALETTE)]
        pts = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(e["curve"]) if v is not None)
        name = esc_any(f"{_entry_name(e)} ({e['backbone']})")
        parts.append(
            f'<polyline class="curve" fill="none" stroke="{color}" stroke-width="2" '
            f'points="{pts}"><title>{name}</title></polyline>'
        )
        ly = top + 14 * k + 8
        parts.append(
            f'<line x1="{left + pw + 10}" y1="{ly}" x2="{left + pw + 24}" y2="{ly}" '
            f'stroke="{color}" stroke-width="2"/>'
            f'<text x="{left + pw + 28}" y="{ly + 4}" font-size="11">'
            f"{esc_any(_entry_name(e))}</text>"
        )
    parts.append("</svg>")
    return "\n".join(parts)


def _svg_bars(board: Mapping[str, Any]) -> str:
    """The primary metric per entry with ±1 std error bars."""
    primary = board["primary_metric"]
    entries = [e for e in board["entries"] if e["metrics"][primary]["mean"] is not None]
    if not entries:
        return ""
    left, right, top, bottom, bar = 150, 30, 20, 44, 18
    w = 560
    h = top + bottom + (bar + 8) * len(entries)
    pw = w - left - right
    hi = max(
        1.0, max(e["metrics"][primary]["mean"] + e["metrics"][primary]["std"] for e in entries)
    )

    def x(v: float) -> float:
        return left + pw * max(v, 0.0) / hi

    parts = [
        f'<svg class="bars" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        f'role="img" aria-label="{html.escape(board["primary_label"])} per strategy">',
    ]
    for k, e in enumerate(entries):
        m = e["metrics"][primary]
        yy = top + k * (bar + 8)
        name = esc_any(f"{_entry_name(e)} ({e['backbone']})")
        parts.append(
            f'<text x="{left - 6}" y="{yy + bar - 5}" font-size="11" text-anchor="end">'
            f"{esc_any(_entry_name(e))}</text>"
        )
        parts.append(
            f'<rect class="bar" x="{left}" y="{yy}" width="{x(m["mean"]) - left:.1f}" '
            f'height="{bar}" fill="{PALETTE[k % len(PALETTE)]}"><title>{name}: '
            f"{m['mean']:.3f} ± {m['std']:.3f} (n={m['n']})</title></rect>"
        )
        lo, up, mid = x(m["mean"] - m["std"]), x(m["mean"] + m["std"]), yy + bar / 2
        parts.append(
            f'<line class="errorbar" x1="{lo:.1f}" y1="{mid}" x2="{up:.1f}" y2="{mid}" '
            'stroke="#000" stroke-width="1.5"/>'
            f'<line x1="{lo:.1f}" y1="{mid - 5}" x2="{lo:.1f}" y2="{mid + 5}" stroke="#000"/>'
            f'<line x1="{up:.1f}" y1="{mid - 5}" x2="{up:.1f}" y2="{mid + 5}" stroke="#000"/>'
        )
    axis = top + len(entries) * (bar + 8)
    parts.append(f'<line x1="{left}" y1="{axis}" x2="{left + pw}" y2="{axis}" stroke="#333"/>')
    for v in (0.0, hi / 2, hi):
        parts.append(
            f'<text x="{x(v):.1f}" y="{axis + 14}" font-size="11" text-anchor="middle">'
            f"{v:.2f}</text>"
        )
    arrow = "higher is better" if board["higher_is_better"] else "lower is better"
    parts.append(
        f'<text class="x-label" x="{left + pw / 2:.1f}" y="{axis + 32}" font-size="12" '
        f'text-anchor="middle">{html.escape(board["primary_label"])} ({arrow})</text>'
    )
    parts.append("</svg>")
    return "\n".join(parts)


def render_html(boards: Mapping[str, Mapping[str, Any]]) -> str:
    esc = esc_any
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>clbench leaderboards</title>',
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
        "padding:3px 8px;text-align:right;white-space:nowrap}td.s,th.s{text-align:left}"
        "details{margin:1em 0;font-size:90%}</style></head><body>",
        "<h1>clbench leaderboards</h1>",
        "<p>Made by <code>clbench leaderboard publish</code> from tracked runs; mean ± sample "
        "std over seeds, one run per seed (the latest).</p>",
    ]
    for scenario in sorted(boards):
        b = boards[scenario]
        arrow = "higher is better" if b["higher_is_better"] else "lower is better"
        out.append(f'<section class="board" id="{esc(safe_filename(scenario))}">')
        out.append(f"<h2>{esc(scenario)}</h2>")
        out.append(f"<p>Kind: {esc(b['kind'])}. Ranked by {esc(b['primary_label'])} ({arrow}).</p>")
        costs = board_spec(b["kind"]).costs
        head = ["rank", "strategy", "backbone", *_labels(b), *(c.label for c in costs), "n"]
        out.append("<table><thead><tr>")
        out.append(
            "".join(
                f'<th class="{"s" if i in (1, 2) else ""}">{esc(c)}</th>'
                for i, c in enumerate(head)
            )
        )
        out.append("</tr></thead><tbody>")
        for e in b["entries"]:
            cells = [str(e["rank"]), _name(e), str(e["backbone"]), *_cells(b, e)]
            cells.append(str(e["n"]))
            out.append(
                '<tr class="entry">'
                + "".join(
                    f'<td class="{"s" if i in (1, 2) else ""}">{esc(c)}</td>'
                    for i, c in enumerate(cells)
                )
                + "</tr>"
            )
        out.append("</tbody></table>")
        if _has_task_id(b):
            out.append(f"<p>{esc(TASK_ID_NOTE)}</p>")
        spec = board_spec(b["kind"])
        out.append(f'<h3 class="plot-title">{esc(spec.curve_title)}</h3>')
        out.append(_svg_curves(b))
        out.append(f'<h3 class="plot-title">{esc(b["primary_label"])} (± 1 std)</h3>')
        out.append(_svg_bars(b))
        out.append("<details><summary>Provenance</summary><ul>")
        out += [f"<li>{_provenance(e, esc_any, html_code)}</li>" for e in b["entries"]]
        out.append("</ul></details></section>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def safe_filename(scenario: str) -> str:
    """A scenario name usable as a file name: itself if it is one (ASCII letters, digits,
    ``-_.``), else with anything odd as '_' and a hash of the name, so that two scenarios
    never share a file."""
    name = "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "_" for c in scenario)
    name = name.strip(".")
    if name == scenario:
        return name
    digest = hashlib.sha256(scenario.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{name or '_'}-{digest}"


# ------------------------------------------------------------- board folders
#: what every board JSON holds at the top level, and in each entry (what rendering and
#: merging read)
BOARD_KEYS = (
    "scenario",
    "kind",
    "primary_metric",
    "primary_label",
    "higher_is_better",
    "secondary_metrics",
    "entries",
)
ENTRY_KEYS = (
    "strategy",
    "backbone",
    "rank",
    "n",
    "seeds",
    "metrics",
    "cost",
    "curve",
    "provenance",
)


def board_files(out: Path) -> list[Path]:
    """The board JSONs of the leaderboard folder ``out``: every ``*.json`` in it but hidden
    files, sorted by name."""
    return sorted(p for p in out.glob("*.json") if not p.name.startswith("."))


def read_board(path: Path) -> dict[str, Any]:
    """The board in ``path``, checked to be one that renders and merges (one ClbenchError
    line naming the file otherwise): a leaderboard folder holds boards only, each in the
    file its scenario's name gives (:func:`safe_filename`), so no scenario shows twice."""

    def bad(why: str) -> ClbenchError:
        return ClbenchError(one_line(f"{path}: {why}"))

    try:
        board = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise bad("not a board JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise bad(f"not a board JSON (invalid JSON: {e.msg} at line {e.lineno})") from None
    except OSError as e:
        raise bad(f"cannot read it ({e.strerror or type(e).__name__})") from None
    hint = "; every *.json of a leaderboard folder must be a board: move it elsewhere"
    if not isinstance(board, dict):
        raise bad(f"not a board JSON (a JSON object is expected){hint}")
    missing = [k for k in BOARD_KEYS if k not in board]
    if missing:
        raise bad(f"not a board JSON (no {', '.join(map(repr, missing))}){hint}")
    scenario, kind, entries = board["scenario"], board["kind"], board["entries"]
    if not isinstance(scenario, str):
        raise bad(f"'scenario' must be a string, got {scenario!r}")
    if safe_filename(scenario) != path.stem:
        raise bad(
            f"holds the board of scenario {scenario!r}, whose file is "
            f"{safe_filename(scenario)}.json: rename it (or remove the copy)"
        )
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise bad("'entries' must be a list of JSON objects")
    for i, e in enumerate(entries, 1):
        missing = [k for k in ENTRY_KEYS if k not in e]
        if missing:
            raise bad(f"entry {i} has no {', '.join(map(repr, missing))}")
        if not isinstance(e["strategy"], str) or not isinstance(e["backbone"], str):
            raise bad(f"entry {i}: 'strategy' and 'backbone' must be strings")
    from clbench.registry import PROTOCOLS

    if not isinstance(kind, str) or kind not in PROTOCOLS.names():
        raise bad(f"kind {kind!r} has no installed protocol; installed kinds: {PROTOCOLS.names()}")
    try:  # what renders is a board; anything else is named here, not halfway through writing
        render_markdown(board)
        render_html({scenario: board})
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise bad(f"not a board clbench can render ({type(e).__name__}: {e})") from None
    return board


def merge_board(old: Mapping[str, Any], new: dict[str, Any], source: Path) -> dict[str, Any]:
    """``new`` (a board built from runs) with the entries of ``old`` (the board read from
    ``source``) whose (strategy, backbone) has no entry in ``new``, kept as they are (metrics,
    costs, curve, provenance, configuration label), all ranked again by
    :func:`rank_entries`. An entry of ``new`` replaces every old entry of its strategy and
    backbone, whatever their configurations. A kept entry must be of ``new``'s kind and
    primary metric (one ClbenchError line otherwise)."""
    fresh = {(e["strategy"], e["backbone"]) for e in new["entries"]}
    kept = [copy.deepcopy(e) for e in old["entries"] if (e["strategy"], e["backbone"]) not in fresh]
    if kept:
        first = f"{kept[0]['strategy']!r} on {kept[0]['backbone']!r}"
        which = f"its {len(kept)} entries without new runs (e.g. {first})"
        fix = "publish without --merge to replace the board, or with the old runs too"
        if old["kind"] != new["kind"]:
            raise ClbenchError(
                one_line(
                    f"{source}: cannot merge: {which} are of kind {old['kind']!r}, the new runs "
                    f"of scenario {new['scenario']!r} of kind {new['kind']!r}; {fix}"
                )
            )
        if old["primary_metric"] != new["primary_metric"]:
            raise ClbenchError(
                one_line(
                    f"{source}: cannot merge: {which} are ranked by {old['primary_metric']!r}, "
                    f"the new board by {new['primary_metric']!r}; {fix}"
                )
            )
    entries = rank_entries([*kept, *new["entries"]], new["primary_metric"], new["higher_is_better"])
    return {**new, "entries": entries}


def _board_json(board: Mapping[str, Any]) -> str:
    return json.dumps(board, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _write_all(texts: Mapping[Path, str]) -> list[Path]:
    """Write each file atomically (readers never see half a file); the paths, in order."""
    for path, text in texts.items():
        write_text_atomic(path, text)
    return list(texts)


def publish(runs: Iterable[TrackedRun], out: Path, merge: bool = False) -> list[Path]:
    """Write every scenario's .json and .md into ``out`` and the index.html of every board
    in ``out``; with ``merge``, a board already there keeps its entries that have no new
    run (:func:`merge_board`). Without ``merge`` a scenario's old board is replaced."""
    boards = build_boards(runs)
    if not boards:
        raise ClbenchError(
            "no clbench runs to publish (no finished run has a valid results.json; "
            "any skipped one is named in a warning above)"
        )
    if out.exists() and not out.is_dir():
        raise ClbenchError(one_line(f"{out} is not a folder; pass a folder for the boards (--out)"))
    scenario_of = {safe_filename(s): s for s in boards}
    others: dict[str, dict[str, Any]] = {}
    for path in board_files(out) if out.is_dir() else []:
        scenario = scenario_of.get(path.stem)
        if scenario is not None and not merge:
            continue  # replaced by the new board
        board = read_board(path)
        if scenario is None:
            others[board["scenario"]] = board
        else:
            boards[scenario] = merge_board(board, boards[scenario], path)
    texts: dict[Path, str] = {}
    for scenario, board in sorted(boards.items()):
        stem = safe_filename(scenario)  # with_suffix would cut a name at its last dot
        texts[out / f"{stem}.json"] = _board_json(board)
        texts[out / f"{stem}.md"] = render_markdown(board)
    texts[out / "index.html"] = render_html({**others, **boards})
    out.mkdir(parents=True, exist_ok=True)
    return _write_all(texts)


def render(out: Path) -> list[Path]:
    """Write every board's .md and the index.html of the leaderboard folder ``out`` again
    from its board JSONs (no store needed: e.g. after the board format changed)."""
    if not out.is_dir():
        raise ClbenchError(
            one_line(f"no leaderboard folder {out}; pass the folder of the board JSONs (--out)")
        )
    boards = {path: read_board(path) for path in board_files(out)}
    if not boards:
        raise ClbenchError(
            one_line(f"no board JSON in {out}; make boards with `clbench leaderboard publish`")
        )
    texts = {out / f"{path.stem}.md": render_markdown(b) for path, b in boards.items()}
    texts[out / "index.html"] = render_html({b["scenario"]: b for b in boards.values()})
    return _write_all(texts)
