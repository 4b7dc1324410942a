"""The typed, versioned run record: one type for writing and every reader."""

from __future__ import annotations

import dataclasses
import json
import runpy
import sys
from pathlib import Path

import pytest

from clbench import tracking
from clbench.record import FORMAT, RecordError, RunRecord
from helpers import FAST, only_run_dir, run_cli


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished class-incremental run directory (no tracking)."""
    out = tmp_path_factory.mktemp("record") / "runs"
    assert run_cli(["run", *FAST, f"runs_dir={out}"]) == 0
    return only_run_dir(out)


def test_a_record_round_trips_and_keeps_the_kind_fields_at_the_top(finished):
    text = (finished / "results.json").read_text()
    record = RunRecord.loads(text, "results.json")
    assert record.format == FORMAT and record.kind == "class_incremental"
    assert record["accuracy_matrix"] == json.loads(text)["accuracy_matrix"]
    assert "accuracy_matrix" in record.fields and record.seed == 0
    assert record.dumps() == text  # written once, from this type, byte for byte


def _broken(finished: Path, tmp: Path, **changes: object) -> Path:
    data = json.loads((finished / "results.json").read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    path = tmp / "results.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"format": None}, "field 'format' is missing"),
        ({"format": 1}, "field 'format' is 1; this clbench reads format 2 (rerun it"),
        ({"format": 3}, "field 'format' is 3; this clbench reads format 2 (upgrade clbench"),
        ({"seed": "abc"}, "field 'seed' must be an integer, got 'abc'"),
        ({"metrics": {"final_accuracy": "high"}}, "field 'metrics' must be a mapping of numbers"),
        ({"strategy": None}, "field 'strategy' is missing"),
    ],
)
def test_an_old_new_or_malformed_record_is_one_line_naming_file_and_field(
    finished, tmp_path, changes, expected
):
    path = _broken(finished, tmp_path, **changes)
    with pytest.raises(RecordError) as e:
        RunRecord.load(path)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message


def summarize(root: Path) -> str:
    """benchmarks/summarize_runs.py ROOT run in-process as a script; returns what it exits
    with (a string: printed to stderr, exit status 1)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "summarize_runs.py"
    argv = sys.argv
    sys.argv = [str(script), str(root)]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        return str(e.code)
    finally:
        sys.argv = argv
    return ""


def test_sync_and_summarize_reject_a_malformed_record_in_one_line(finished, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _broken(finished, run_dir, seed="abc")
    assert run_cli(["sync", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {run_dir / 'results.json'}: field 'seed' must be an integer, got 'abc'"]
    assert summarize(run_dir) == (
        f"error: {run_dir / 'results.json'}: field 'seed' must be an integer, got 'abc'"
    )


def test_publish_skips_a_malformed_tracked_record_with_one_warning_line(finished, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    record = RunRecord.load(finished / "results.json")
    run_id = tracking.log_run(record, finished, uri, "clbench")
    tracking.log_run(dataclasses.replace(record, seed=1), finished, uri, "clbench")
    # a record altered in the store: the warning says which run and which field, and the
    # other run is published
    import mlflow

    with mlflow.start_run(run_id=run_id):
        data = record.to_dict()
        data["metrics"] = "lost"
        mlflow.log_text(json.dumps(data), "results.json")
    code = run_cli(["leaderboard", "publish", "--tracking-uri", uri, "--out", str(tmp_path / "b")])
    assert code == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"warning: skipped MLflow run {run_id}: its results.json: field 'metrics' must be a "
        "mapping of numbers, got 'lost'"
    ]
    board = json.loads((tmp_path / "b" / "split_digits.json").read_text())
    assert [e["seeds"] for e in board["entries"]] == [[1]]


def test_a_record_missing_a_field_of_its_kind_is_one_line(finished, tmp_path):
    path = _broken(finished, tmp_path, accuracy_matrix=None)
    record = RunRecord.load(path)  # the common fields are fine
    assert record.kind == "class_incremental"
    assert summarize(tmp_path) == (
        f"error: {path}: field 'accuracy_matrix' is missing (a class_incremental record)"
    )
