"""Tracking reliability (issue 16): a dead or silent server costs seconds and one line;
concurrent runs into one fresh local SQLite store lose and mix nothing."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from clbench import tracking
from clbench.record import RunRecord
from helpers import FAST, only_run_dir, results_of, run_cli

REPO = Path(__file__).resolve().parents[1]
REFUSED = "http://127.0.0.1:1"  # nothing listens on port 1: connection refused at once


def make_record(seed: int, run_dir: Path, timeout: int = 5) -> RunRecord:
    """A finished run's record (no torch), values distinct per seed, written to run_dir."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "seed": seed,
        "strategy": {"name": "finetune", "lr": 0.01 * (seed + 1)},
        "tracking": {"enabled": False, "uri": None, "experiment": "clbench", "timeout": timeout},
    }
    record = RunRecord(
        clbench_version="test",
        run_name=f"run-{seed}",
        run_dir=str(run_dir),
        scenario="split_digits",
        kind="class_incremental",
        strategy="finetune",
        backbone="micro_vit",
        seed=seed,
        uses_task_id=False,
        config=config,
        class_names=["0", "1"],
        tags={"scenario": "split_digits", "strategy": "finetune", "seed": str(seed)},
        metrics={"final_accuracy": 0.5 + seed / 100},
        steps=[{"accuracy_seen": seed / 10}, {"accuracy_seen": seed / 10 + 0.01}],
        efficiency={"trainable_params": 1000 + seed},
        fields={"accuracy_matrix": [[seed / 10, 0.0], [seed / 10, 0.5]]},
        tracking={"status": "disabled"},
    )
    (run_dir / "config.yaml").write_text(f"seed: {seed}\n")
    record.write(run_dir / "results.json")
    return record


@pytest.fixture
def silent() -> Iterator[str]:
    """A server that accepts connections and never answers (the kernel completes the
    handshake from the listen backlog): only a read timeout ends a request."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def _cfg(uri: str, **tracking_conf: object):
    base = OmegaConf.load(REPO / "conf" / "tracking" / "mlflow.yaml")
    return OmegaConf.create({"tracking": {**base, "uri": uri, **tracking_conf}})


def test_a_run_with_a_silent_server_finishes_in_seconds_with_one_line(
    tmp_path, silent, capsys, monkeypatch
):
    """The whole run path: training, then tracking against a server that never answers."""
    from clbench import runner

    spent: list[float] = []
    real_track = runner.track

    def timed_track(*args, **kwargs):
        start = time.monotonic()
        try:
            return real_track(*args, **kwargs)
        finally:
            spent.append(time.monotonic() - start)

    monkeypatch.setattr(runner, "track", timed_track)
    for var in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    fast = [o for o in FAST if not o.startswith("tracking")]
    args = [f"runs_dir={tmp_path / 'runs'}", f"tracking.uri={silent}", "tracking.timeout=2"]
    assert run_cli(["run", *fast, *args, "tracking.retries=1"]) == 0
    # 2 attempts x (a request, closing the MLflow run) x 2 s + 1 s apart, at most
    assert len(spent) == 1 and spent[0] < 12, spent
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith(f"warning: MLflow tracking failed ({silent}: no answer within 2 s)")
    run_dir = only_run_dir(tmp_path / "runs")
    assert err[0].endswith(f"clbench sync {run_dir}")
    res = results_of(run_dir)
    assert res["tracking"]["status"] == "failed" and len(res["accuracy_matrix"]) == 2
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ  # clbench's bound is not left set


def test_a_refused_connection_costs_only_the_retry_pauses(tmp_path, capsys, monkeypatch):
    """The shipped defaults (2 retries, 1 s and 2 s apart): about 3 s, one line."""
    from clbench.runner import track

    for var in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    run_dir = tmp_path / "run"
    record = make_record(0, run_dir)
    start = time.monotonic()
    status = track(_cfg(REFUSED), record, run_dir)
    assert time.monotonic() - start < 10
    assert status["status"] == "failed" and status["error"].startswith("cannot connect")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"clbench sync {run_dir}" in err[0], err
    assert "Connection refused" in err[0] and "Retrying" not in err[0]


@pytest.mark.parametrize("server", ["refused", "silent"])
def test_sync_to_a_dead_server_fails_fast_in_one_line(tmp_path, capsys, silent, server):
    uri = REFUSED if server == "refused" else silent
    run_dir = tmp_path / "run"
    make_record(0, run_dir, timeout=2)
    before = (run_dir / "results.json").read_text()
    start = time.monotonic()
    assert run_cli(["sync", str(run_dir), "--tracking-uri", uri]) == 2
    assert time.monotonic() - start < 8  # the request, then closing the MLflow run: 2 x 2 s
    err = capsys.readouterr().err.strip().splitlines()
    why = "cannot connect: Connection refused" if server == "refused" else "no answer within 2 s"
    assert err == [f"error: sync of {run_dir} to {uri} failed: {why}"]
    assert (run_dir / "results.json").read_text() == before


def test_the_user_s_own_mlflow_http_settings_win(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "42")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    with tracking.http_limits(3):
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "42"
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "42"
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ


def test_a_zero_timeout_is_one_config_error_line(capsys):
    assert run_cli(["run", *FAST, "tracking.timeout=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: invalid value for tracking.timeout: 0; must be > 0"]


#: 8 processes log 8 finished run directories as a run (or `clbench sync`) does, started
#: together: forked from one interpreter that imported MLflow once (8 fresh interpreters
#: cost ~35 s CPU in imports alone); each makes its own store connection after the fork
LOG_CONCURRENTLY = textwrap.dedent(
    """
    import os
    import sys
    from pathlib import Path

    import mlflow.store.tracking.sqlalchemy_store  # imported once, no store opened yet

    from clbench.record import RunRecord
    from clbench.tracking import log_run

    root, uri, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    pids = []
    for seed in range(n):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                run_dir = root / f"run{seed}"
                record = RunRecord.load(run_dir / "results.json")
                print(seed, log_run(record, run_dir, uri, "concurrent"), flush=True)
            except BaseException as e:
                print(f"run{seed}: {e}", file=sys.stderr, flush=True)
                code = 1
            os._exit(code)
        pids.append(pid)
    sys.exit(sum(os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) != 0 for p in pids))
    """
)


def test_concurrent_runs_into_a_fresh_sqlite_store_lose_and_mix_nothing(tmp_path):
    """8 processes log into a store that does not exist yet, as 8 `clbench run`s would
    (without the store lock 7 of them fail: "duplicate column name" in the migration)."""
    import mlflow

    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    for seed in range(8):
        make_record(seed, tmp_path / f"run{seed}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": ""}
    done = subprocess.run(
        [sys.executable, "-c", LOG_CONCURRENTLY, str(tmp_path), uri, "8"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    run_ids = {int(seed): run_id for seed, run_id in map(str.split, done.stdout.splitlines())}
    assert sorted(run_ids) == list(range(8))
    assert (tmp_path / "store" / "mlflow.db.lock").is_file()
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("concurrent")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    assert len(runs) == 8 and {r.info.run_id for r in runs} == set(run_ids.values())
    for seed, run_id in run_ids.items():  # each run holds its own record, nothing mixed
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.info.run_name == f"run-{seed}"
        assert run.data.params["seed"] == str(seed)
        assert run.data.params["strategy.lr"] == str(0.01 * (seed + 1))
        assert run.data.tags["seed"] == str(seed)
        assert run.data.metrics["final_accuracy"] == pytest.approx(0.5 + seed / 100)
        assert run.data.metrics["trainable_params"] == 1000 + seed
        history = client.get_metric_history(run_id, "accuracy_seen")
        assert [m.value for m in history] == pytest.approx([seed / 10, seed / 10 + 0.01])
        artifacts = {a.path for a in client.list_artifacts(run_id)}
        assert {"results.json", "config.yaml"} <= artifacts


def test_sync_of_a_run_without_a_uri_goes_to_the_default_store_not_the_last_one(tmp_path):
    """MLflow's set_tracking_uri also sets MLFLOW_TRACKING_URI: after syncing one run to an
    explicit store, a run with no URI of its own must still go to MLflow's default."""
    from mlflow.tracking import MlflowClient

    from clbench.tracking import sync_run_dir

    explicit = f"sqlite:///{tmp_path}/explicit.db"
    make_record(0, tmp_path / "a")
    make_record(1, tmp_path / "b")
    sync_run_dir(tmp_path / "a", uri=explicit)
    status = sync_run_dir(tmp_path / "b")  # its config names no URI
    default = tracking.target_uri(None)
    assert default != explicit
    assert MlflowClient(default).get_run(status["run_id"]).data.tags["seed"] == "1"
    runs = MlflowClient(explicit).search_runs(
        [MlflowClient(explicit).get_experiment_by_name("clbench").experiment_id]
    )
    assert [r.data.tags["seed"] for r in runs] == ["0"]


def test_checkpoints_are_never_uploaded(tmp_path):
    """A run directory still holding its checkpoint (a killed run synced, or tracking
    before the checkpoint is dropped) uploads everything but the checkpoint files."""
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    record = make_record(0, run_dir)
    for name in ("checkpoint.safetensors", "checkpoint.json", ".checkpoint.safetensors.tmp"):
        (run_dir / name).write_bytes(b"state")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = tracking.log_run(record, run_dir, uri, "clbench")
    names = sorted(a.path for a in MlflowClient(uri).list_artifacts(run_id))
    assert names == ["config.yaml", "results.json"]
