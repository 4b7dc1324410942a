"""Published boards survive hostile run strings and malformed stored records (issue 16)."""

from __future__ import annotations

import html
import itertools
import json
import re
from html.parser import HTMLParser

import pytest
from mlflow.tracking import MlflowClient

from clbench.leaderboard import TrackedRun, one_line, publish
from clbench.record import RunRecord
from helpers import run_cli

#: every way a string has broken a board: line ends (CR, LF, VT, FF, NEL, U+2028), cell
#: pipes, code-span backticks, HTML and attribute quoting, entities, javascript: links,
#: Markdown emphasis, links, headings and backslash escapes
EVIL = (
    "a|b\r\nc\rd\ne\x0bf\x0cg\x85h\u2028i`tick` ``x`` <script>alert('x')</script> "
    '"q" \'q\' & &amp; &lt; <a href="javascript:alert(1)">link</a> '
    "[l](javascript:alert(2)) <javascript:alert(3)> *em* _u_ # ~s~ \\| \\"
)
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")


def _record(
    scenario: str, kind: str, strategy: str, seed: int, tag: str = "", **over: object
) -> RunRecord:
    """A hand-made run record of ``kind`` (class_incremental or test_time)."""
    fields: dict
    if kind == "class_incremental":
        metrics = {"final_accuracy": 0.5 + seed / 10, "average_incremental_accuracy": 0.7}
        metrics |= {"forgetting": 0.2, "task_aware/final_accuracy": 0.9}
        steps = [{"accuracy_seen": 0.9}, {"accuracy_seen": 0.5 + seed / 10}]
        efficiency = {"trainable_params": 10, "seconds_per_step": 0.01}
        efficiency |= {"passes_per_prediction": 1.0}
        fields = {k: [] for k in ("classes_per_experience", "test_sizes", "accuracy_matrix")}
        fields |= {k: [] for k in ("accuracy_matrix_task_aware", "initial_accuracy")}
        fields |= {"initial_accuracy_task_aware": []}
    else:
        metrics = {"mean_online_error": 0.3 + seed / 10, "clean_accuracy_after": 0.8}
        steps = [{"online_error": 0.3}, {"online_error": 0.4}]
        efficiency = {"trainable_params": 10, "images_per_second": 100.0, "adapt_memory_mb": 1.0}
        fields = {"mode": "continual", "domains": ["fog-5", "snow-5"], "domain_sizes": [1, 1]}
        fields |= {"online_error": [0.3, 0.4], "method_stats": {}}
    metrics[f"metric {tag}"] = 0.1  # a metric name from the run (not on the boards)
    data = {
        "clbench_version": f"0.1 {tag}",
        "run_name": f"run {tag} {seed}",
        "run_dir": f"/runs/{tag}",
        "scenario": scenario,
        "kind": kind,
        "strategy": strategy,
        "backbone": f"micro_vit {tag}",
        "seed": seed,
        "uses_task_id": False,
        "config": {"strategy": {"name": strategy, "note": tag}, "scenario": {"name": scenario}},
        "class_names": [tag, "1"],
        "tags": {
            "git_commit": f"abc {tag}",
            "clbench_version": f"0.1 {tag}",
            "hardware": f"cpu {tag}",
            "sweep_id": f"sweep {tag}",
        },
        "metrics": metrics,
        "steps": steps,
        "efficiency": efficiency,
        "fields": fields,
    }
    return RunRecord(**{**data, **over})


def _hostile_runs() -> list[TrackedRun]:
    """Two kinds of board, every run-provided string hostile, plus scenario names that
    clean to the same file name (a/b, a:b) or differ after their last dot (v.1, v.2)."""
    runs = []
    for i, (scenario, kind) in enumerate(
        [(f"ci {EVIL}", "class_incremental"), (f"tta {EVIL}", "test_time")]
    ):
        for j, strategy in enumerate((f"s1 {EVIL}", f"s2 {EVIL}")):
            for seed in (0, 1):
                rec = _record(scenario, kind, strategy, seed, tag=EVIL)
                runs.append(TrackedRun(f"id {EVIL} {i}{j}{seed}", 100 * i + 10 * j + seed, rec))
    for k, scenario in enumerate(("a/b", "a:b", "v.1", "v.2")):
        rec = _record(scenario, "class_incremental", "finetune", 0)
        runs.append(TrackedRun(f"plain{k}", 1000 + k, rec))
    return runs


def _unescaped(line: str) -> list[tuple[int, str]]:
    """The characters of a Markdown line that no backslash escapes, with their positions."""
    out, i = [], 0
    while i < len(line):
        if line[i] == "\\":
            i += 2
            continue
        out.append((i, line[i]))
        i += 1
    return out


def _md_text(cell: str) -> str:
    """What a Markdown cell shows: backslash escapes and entities undone."""
    return html.unescape(re.sub(r"\\(.)", r"\1", cell.strip()))


def _cells(row: str) -> list[str]:
    """A table row's cells, split at its unescaped pipes."""
    cuts = [i for i, c in _unescaped(row) if c == "|"]
    return [row[a + 1 : b] for a, b in itertools.pairwise(cuts)]


def _check_markdown(md: str, board: dict) -> None:
    assert "\r" not in md and md.splitlines() == md.split("\n")[:-1]  # no other line break
    lines = md.split("\n")
    table = [line for line in lines if line.startswith("|")]
    entries = board["entries"]
    assert len(table) == 2 + len(entries)  # header, rule, one line per entry
    width = len(_cells(table[0]))
    for row in table:
        assert len(_cells(row)) == width and row.endswith("|"), row
    shown = {_md_text(_cells(row)[1]) for row in table[2:]}  # the data, intact, on one line
    assert shown == {one_line(e["strategy"]).strip() for e in entries}
    assert {_md_text(_cells(row)[2]) for row in table[2:]} == {
        one_line(e["backbone"]).strip() for e in entries
    }
    assert len([line for line in lines if line.startswith("- ")]) == len(entries)
    for line in lines:
        marks = _unescaped(line)
        # no raw HTML, no link or image, no emphasis from data
        assert not any(c in "<>*_[]" for _, c in marks), line
        ticks = [i for i, c in marks if c == "`"]
        assert len(ticks) % 2 == 0, line  # code spans pair up: none is broken open
        for a, b in zip(ticks[::2], ticks[1::2], strict=True):
            code = line[a + 1 : b]  # a code span shows its text raw: only plain ids in one
            assert code == "clbench leaderboard publish" or SAFE_ID.fullmatch(code), line


class _Page(HTMLParser):
    """Every tag and attribute of a page, whether tags nest, and each table cell's text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.attrs: list[tuple[str, str | None]] = []
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.cells: list[str] = []
        self.cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.attrs += attrs
        if tag != "meta":  # the page's one void element
            self.stack.append(tag)
        if tag == "td":
            self.cell = []

    def handle_startendtag(self, tag, attrs):
        self.tags.add(tag)
        self.attrs += attrs

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)
        if tag == "td" and self.cell is not None:
            self.cells.append("".join(self.cell))
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p"}
ALLOWED_TAGS |= {"code", "section", "table", "thead", "tbody", "tr", "th", "td", "details"}
ALLOWED_TAGS |= {"summary", "ul", "li", "svg", "line", "text", "polyline", "rect"}


def _check_html(page: str, boards: list[dict]) -> None:
    assert "<script" not in page.lower()
    parser = _Page()
    parser.feed(page)
    parser.close()
    assert parser.errors == [] and parser.stack == []  # every element closed, in order
    assert parser.tags <= ALLOWED_TAGS
    names = {name for name, _ in parser.attrs}
    assert not {n for n in names if n.startswith("on") or n in ("href", "src", "style")}
    assert not [v for _, v in parser.attrs if v and "javascript:" in v.lower()]
    for b in boards:  # the data shows as text, on one line
        for e in b["entries"]:
            assert one_line(e["strategy"]) in parser.cells
            assert one_line(e["backbone"]) in parser.cells


def test_every_run_provided_string_is_escaped_in_markdown_and_html_and_exact_in_json(tmp_path):
    runs = _hostile_runs()
    written = publish(runs, tmp_path)
    boards = [json.loads(p.read_text(encoding="utf-8")) for p in written if p.suffix == ".json"]
    assert len(boards) == 6  # the two hostile scenarios; a/b, a:b, v.1, v.2 in files of their own
    for path in written:
        assert path.parent == tmp_path and re.fullmatch(r"[A-Za-z0-9._-]+", path.name)
    by_scenario = {b["scenario"]: b for b in boards}
    assert set(by_scenario) == {f"ci {EVIL}", f"tta {EVIL}", "a/b", "a:b", "v.1", "v.2"}
    assert (tmp_path / "v.1.json").is_file() and (tmp_path / "v.2.md").is_file()
    # JSON: the exact strings, CR, LF and all
    for b in (by_scenario[f"ci {EVIL}"], by_scenario[f"tta {EVIL}"]):
        assert {e["strategy"] for e in b["entries"]} == {f"s1 {EVIL}", f"s2 {EVIL}"}
        for e in b["entries"]:
            assert e["backbone"] == f"micro_vit {EVIL}" and e["n"] == 2
            p = e["provenance"]
            assert p["git_commits"] == [f"abc {EVIL}"] and p["hardware"] == [f"cpu {EVIL}"]
            assert p["clbench_versions"] == [f"0.1 {EVIL}"]
            assert [r["run_name"] for r in p["runs"]] == [f"run {EVIL} 0", f"run {EVIL} 1"]
            assert all(r["run_id"].startswith(f"id {EVIL} ") for r in p["runs"])
    for path in written:
        if path.suffix == ".md":
            board = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
            _check_markdown(path.read_text(encoding="utf-8"), board)
    _check_html((tmp_path / "index.html").read_text(encoding="utf-8"), boards)
    # publishing again gives the same bytes
    again = publish(runs, tmp_path / "again")
    for a, b in zip(written, again, strict=True):
        assert a.read_bytes() == b.read_bytes()


# ------------------------------------------------------------- malformed records
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite store: experiment ``mixed`` with good and malformed runs, ``bad`` with only a
    malformed one. Returns (uri, run id per label)."""
    tmp = tmp_path_factory.mktemp("malformed")
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(uri)
    ids: dict[str, str] = {}

    def log(experiment: str, label: str, content: str | bytes | None) -> None:
        run = client.create_run(experiment, run_name=label)
        rid = run.info.run_id
        if content is not None:
            path = tmp / label / "results.json"
            path.parent.mkdir()
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content, encoding="utf-8")
            client.log_artifact(rid, str(path))
        client.set_terminated(rid)
        ids[label] = rid

    def good(strategy: str, **over: object) -> str:
        return _record("split_digits", "class_incremental", strategy, 0, **over).dumps()

    mixed = client.create_experiment("mixed", artifact_location=(tmp / "a1").as_uri())
    log(mixed, "good", good("finetune"))
    log(mixed, "hostile", good(f"s {EVIL}", backbone=f"b {EVIL}"))
    huge = json.loads(good("huge"))
    huge["metrics"]["forgetting"] = 10**400  # valid JSON, no float: shown as n/a
    log(mixed, "huge", json.dumps(huge))
    lost = json.loads(good("lost"))
    lost["metrics"] = "lost"
    log(mixed, "lost", json.dumps(lost))
    log(mixed, "not_json", "{ nope")
    log(mixed, "not_utf8", b'{"format": 2, "run_name": "\xff"}')
    kindless = json.loads(good("kindless"))
    kindless["kind"] = "no_such_kind"
    log(mixed, "unknown_kind", json.dumps(kindless))
    fieldless = json.loads(good("fieldless"))
    del fieldless["accuracy_matrix"]
    log(mixed, "kind_field_missing", json.dumps(fieldless))
    log(mixed, "surrogate", good("surrogate").replace('"surrogate"', '"\\ud800"', 1))
    log(mixed, "no_record", None)  # not a clbench run: skipped without a word
    bad = client.create_experiment("bad", artifact_location=(tmp / "a2").as_uri())
    log(bad, "only_bad", json.dumps(lost))
    return uri, ids


SKIPPED = {
    "lost": "field 'metrics' must be a mapping of numbers, got 'lost'",
    "not_json": "not valid JSON",
    "not_utf8": "not valid JSON (not UTF-8 text: byte 27)",
    "unknown_kind": "kind 'no_such_kind'",
    "kind_field_missing": "field 'accuracy_matrix' is missing (a class_incremental record)",
    "surrogate": "not valid Unicode",
}


def test_a_malformed_record_is_skipped_with_a_warning_and_the_rest_published(
    store, tmp_path, capsys
):
    uri, ids = store
    out = tmp_path / "boards"
    args = ["leaderboard", "publish", "--tracking-uri", uri, "--experiment", "mixed"]
    assert run_cli([*args, "--out", str(out)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == len(SKIPPED)  # one line per malformed run, nothing else
    for label, reason in SKIPPED.items():
        (line,) = [x for x in err if ids[label] in x]
        assert line.startswith(f"warning: skipped MLflow run {ids[label]}: its results.json: ")
        assert reason in line, line
    board = json.loads((out / "split_digits.json").read_text(encoding="utf-8"))
    entries = {e["strategy"]: e for e in board["entries"]}
    assert set(entries) == {"finetune", "huge", f"s {EVIL}"}
    assert entries[f"s {EVIL}"]["backbone"] == f"b {EVIL}"  # exact through the store
    assert entries["huge"]["metrics"]["forgetting"] == {"mean": None, "std": None, "n": 0}
    _check_markdown((out / "split_digits.md").read_text(encoding="utf-8"), board)


def test_nothing_valid_left_is_one_error_line(store, tmp_path, capsys):
    uri, ids = store
    out = tmp_path / "boards"
    args = ["leaderboard", "publish", "--tracking-uri", uri, "--experiment", "bad"]
    assert run_cli([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith(f"warning: skipped MLflow run {ids['only_bad']}")
    assert err[1].startswith("error: no clbench runs to publish")
    assert not out.exists()


def test_markdown_code_spans_hold_only_plain_ids():
    from clbench.leaderboard import md_code, md_escape

    assert md_code("0123abcdef") == "`0123abcdef`"
    assert md_code("a`b|c") == md_escape("a`b|c") == "a\\`b\\|c"
    assert md_escape("x\r\ny\u2028z") == "x  y z"
