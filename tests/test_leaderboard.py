"""Leaderboards from tracked runs, `clbench sync`, escaping and a real browser."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from clbench import tracking
from clbench.leaderboard import build_boards, md_escape, publish, read_runs
from clbench.record import RunRecord
from helpers import FAST, only_run_dir, results_of, run_cli

EVIL = "<script>alert('x')</script>"


def _run(tmp_path: Path, name: str, uri: str, *overrides: str) -> dict:
    fast = [o for o in FAST if not o.startswith("tracking")]
    out = tmp_path / "runs" / name
    assert run_cli(["run", *fast, f"runs_dir={out}", f"tracking.uri={uri}", *overrides]) == 0
    return results_of(only_run_dir(out))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite store with finetune seeds 0, 1, linear_probe seed 0 and one hostile run."""
    tmp = tmp_path_factory.mktemp("board")
    uri = f"sqlite:///{tmp}/mlflow.db"
    runs = {
        "ft0": _run(tmp, "ft0", uri, "strategy=finetune", "seed=0"),
        "ft1": _run(tmp, "ft1", uri, "strategy=finetune", "seed=1"),
        "lp0": _run(tmp, "lp0", uri, "strategy=linear_probe", "seed=0"),
    }
    # a run whose strings try to break out of HTML and Markdown
    src = only_run_dir(tmp / "runs" / "lp0")
    evil_dir = tmp / "evil"
    shutil.copytree(src, evil_dir)
    record = json.loads((evil_dir / "results.json").read_text())
    record.pop("tracking")
    record.update(run_name=EVIL, strategy="evil|<b>bold</b>*x*")
    record["tags"] = {**record["tags"], "hardware": "<img src=x onerror=alert(1)>"}
    (evil_dir / "results.json").write_text(json.dumps(record))
    tracking.log_run(RunRecord.from_dict(record, "evil"), evil_dir, uri, "clbench")
    return tmp, uri, runs


def test_publish_aggregates_ranks_and_is_byte_identical(store, tmp_path):
    _, uri, runs = store
    a, b = tmp_path / "a", tmp_path / "b"
    publish(read_runs(uri, "clbench"), a)
    publish(read_runs(uri, "clbench"), b)
    names = sorted(p.name for p in a.iterdir())
    assert names == ["index.html", "split_digits.json", "split_digits.md"]
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    board = json.loads((a / "split_digits.json").read_text())
    assert board["primary_metric"] == "final_accuracy"
    entries = {e["strategy"]: e for e in board["entries"]}
    ft = entries["finetune"]
    assert ft["n"] == 2 and ft["seeds"] == [0, 1]
    finals = [runs[k]["metrics"]["final_accuracy"] for k in ("ft0", "ft1")]
    assert ft["metrics"]["final_accuracy"]["mean"] == pytest.approx(sum(finals) / 2, abs=1e-6)
    assert len(ft["provenance"]["runs"]) == 2
    assert ft["provenance"]["git_commits"] and ft["provenance"]["hardware"]
    means = [e["metrics"]["final_accuracy"]["mean"] for e in board["entries"]]
    assert means == sorted(means, reverse=True)
    assert [e["rank"] for e in board["entries"]] == list(range(1, len(means) + 1))


def test_every_run_string_is_escaped(store, tmp_path):
    _, uri, _ = store
    publish(read_runs(uri, "clbench"), tmp_path)
    page = (tmp_path / "index.html").read_text()
    md = (tmp_path / "split_digits.md").read_text()
    for text in (page, md):
        assert "<script" not in text and "<b>" not in text and "<img" not in text
    assert "&lt;script&gt;" in page and "&lt;img" in page
    assert "&lt;script&gt;" in md
    assert "evil\\|" in md  # a pipe would split the Markdown cell
    assert md_escape("a|b*c_[d]`e`") == "a\\|b\\*c\\_\\[d\\]\\`e\\`"


def test_a_latest_run_per_seed_counts_once(store):
    _, uri, _ = store
    runs = read_runs(uri, "clbench")
    twice = runs + [r for r in runs if r.record.strategy == "finetune"]
    board = build_boards(twice)["split_digits"]
    ft = next(e for e in board["entries"] if e["strategy"] == "finetune")
    assert ft["n"] == 2


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise AssertionError("Chromium is needed for this test: apt-get install chromium")


def test_index_html_renders_in_headless_chromium(store, tmp_path):
    _, uri, _ = store
    publish(read_runs(uri, "clbench"), tmp_path)
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    page = (tmp_path / "index.html").as_uri()
    dom = subprocess.run(
        [_chromium(), *flags, "--dump-dom", page],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    board = json.loads((tmp_path / "split_digits.json").read_text())
    assert dom.count('<tr class="entry">') == len(board["entries"]) == 3
    assert '<svg class="curves"' in dom and '<svg class="bars"' in dom
    assert dom.count('<polyline class="curve"') == 3
    assert dom.count('<rect class="bar"') == 3
    assert "<script" not in dom  # the hostile run name stayed text
    shot = tmp_path / "shot.png"
    subprocess.run(
        [_chromium(), *flags, f"--screenshot={shot}", "--window-size=1200,1600", page],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert shot.stat().st_size > 10_000


def _comparable(board: dict) -> list[dict]:
    """A board without what legitimately differs between two runs: ids and timings."""
    out = []
    for e in board["entries"]:
        e = {k: v for k, v in e.items() if k != "provenance"}
        timings = ("seconds_per_step", "train_seconds")
        e["cost"] = {k: v for k, v in e["cost"].items() if k not in timings}
        out.append(e)
    return out


def test_sync_after_a_failed_upload_gives_the_same_board(tmp_path, capsys):
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "2"
    try:
        failed = _run(tmp_path, "down", "http://127.0.0.1:9", "strategy=linear_probe")
    finally:
        del os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"], os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"]
    assert failed["tracking"]["status"] == "failed"
    run_dir = only_run_dir(tmp_path / "runs" / "down")
    synced_uri = f"sqlite:///{tmp_path}/synced.db"
    assert run_cli(["sync", str(run_dir), "--tracking-uri", synced_uri]) == 0
    after = results_of(run_dir)
    assert after["tracking"]["status"] == "ok" and after["tracking"]["synced"] is True
    assert after["accuracy_matrix"] == failed["accuracy_matrix"]
    # a second sync is a no-op; a missing directory is one line and exit 1
    assert run_cli(["sync", str(run_dir), "--tracking-uri", synced_uri]) == 0
    assert "already tracked" in capsys.readouterr().out
    assert run_cli(["sync", str(tmp_path / "nope"), "--tracking-uri", synced_uri]) == 2
    assert "no results.json" in capsys.readouterr().err

    straight_uri = f"sqlite:///{tmp_path}/straight.db"
    _run(tmp_path, "up", straight_uri, "strategy=linear_probe")
    synced = build_boards(read_runs(synced_uri, "clbench"))["split_digits"]
    straight = build_boards(read_runs(straight_uri, "clbench"))["split_digits"]
    assert _comparable(synced) == _comparable(straight)


def test_leaderboard_cli(store, tmp_path, capsys):
    _, uri, _ = store
    out = tmp_path / "boards"
    assert run_cli(["leaderboard", "publish", "--tracking-uri", uri, "--out", str(out)]) == 0
    assert (out / "index.html").is_file()
    code = run_cli(["leaderboard", "publish", "--tracking-uri", uri, "--experiment", "nope"])
    assert code == 2
    assert "no MLflow experiment 'nope'" in capsys.readouterr().err
    assert run_cli(["leaderboard", "unpublish"]) == 2


def test_task_incremental_entries_are_marked(store, tmp_path):
    from clbench.leaderboard import TrackedRun, render_markdown

    _, uri, _ = store
    runs = [
        TrackedRun(r.run_id, r.start_time, dataclasses.replace(r.record, uses_task_id=True))
        if r.record.strategy == "linear_probe"
        else r
        for r in read_runs(uri, "clbench")
    ]
    board = build_boards(runs)["split_digits"]
    md = render_markdown(board)
    assert "| linear\\_probe † |" in md and "| finetune |" in md
    assert "uses the task id at test time" in md


def test_publish_from_a_missing_store_creates_nothing(tmp_path, capsys):
    db = tmp_path / "absent.db"
    code = run_cli(["leaderboard", "publish", "--tracking-uri", f"sqlite:///{db}"])
    assert code == 2 and not db.exists()
    assert "no MLflow store at" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tta_store(tmp_path_factory):
    """A SQLite store with one small continual test-time-adaptation run (tent on digits_c)."""
    tmp = tmp_path_factory.mktemp("tta_board")
    uri = f"sqlite:///{tmp}/mlflow.db"
    fast = ["backbone.pretrained=none", "progress=false", "scenario=digits_c", "strategy=tent"]
    fast += ["scenario.corruptions=[fog,snow,contrast]", "scenario.n_per_domain=64"]
    fast += ["scenario.source_epochs=1", f"runs_dir={tmp / 'runs'}", f"tracking.uri={uri}"]
    assert run_cli(["run", *fast]) == 0
    return uri


class _PlotText(HTMLParser):
    """Per board section: the text of its plot titles and axis labels."""

    def __init__(self) -> None:
        super().__init__()
        self.boards: dict[str, dict[str, list[str]]] = {}
        self.board: str | None = None
        self.want: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section" and "board" in (a.get("class") or ""):
            self.board = a["id"]
            self.boards[self.board] = {"plot-title": [], "x-label": [], "y-label": []}
        cls = a.get("class") or ""
        self.want = cls if cls in ("plot-title", "x-label", "y-label") else None

    def handle_data(self, data):
        if self.board and self.want:
            self.boards[self.board][self.want].append(data.strip())
            self.want = None


def test_each_kind_plots_with_its_own_axis_labels_and_titles(store, tta_store, tmp_path):
    _, uri, _ = store
    publish(read_runs(uri, "clbench") + read_runs(tta_store, "clbench"), tmp_path)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
    flags += ["--disable-background-networking", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(
        [_chromium(), *flags, "--dump-dom", (tmp_path / "index.html").as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    parser = _PlotText()
    parser.feed(dom)
    assert parser.boards["split_digits"] == {
        "plot-title": ["Accuracy on the seen experiences", "final accuracy (± 1 std)"],
        "x-label": ["after experience", "final accuracy (higher is better)"],
        "y-label": ["accuracy on seen classes"],
    }
    assert parser.boards["digits_c"] == {
        "plot-title": ["Online error per domain", "mean online error (± 1 std)"],
        "x-label": ["domain (stream order)", "mean online error (lower is better)"],
        "y-label": ["online error"],
    }
    board = json.loads((tmp_path / "digits_c.json").read_text())
    assert board["kind"] == "test_time" and len(board["entries"][0]["curve"]) == 3
