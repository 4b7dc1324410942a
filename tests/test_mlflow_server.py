"""A real MLflow tracking server on loopback: parallel runs log to it, a board is built
from it, and nothing is lost or mixed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from clbench.leaderboard import build_boards, publish, read_runs
from helpers import FAST, only_run_dir, results_of, run_cli


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{tmp}/backend.db",
            "--artifacts-destination",
            str(tmp / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=open(tmp / "server.log", "w"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        start_new_session=True,
        # no job runner: its Huey consumers (one process per job type, each importing MLflow)
        # serve GenAI jobs, which no test uses, and cost far more than the server itself
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(
                "mlflow server did not start:\n" + (tmp / "server.log").read_text()
            )
        time.sleep(0.1)
    yield url, tmp
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def test_parallel_runs_log_to_a_server_and_a_board_is_published(server, tmp_path):
    """One run logs to the server as it ends; four more (tracking off) are uploaded by four
    concurrent ``clbench sync`` processes; each tracked record is its own run's."""
    url, _ = server
    fast = [o for o in FAST if not o.startswith("tracking")]
    run = ["run", *fast, "strategy=linear_probe"]
    assert run_cli([*run, "seed=0", f"runs_dir={tmp_path / 's0'}", f"tracking.uri={url}"]) == 0
    for seed in range(1, 5):
        out = tmp_path / f"s{seed}"
        assert run_cli([*run, f"seed={seed}", f"runs_dir={out}", "tracking=none"]) == 0
    env = {**os.environ, "MLFLOW_TRACKING_URI": ""}
    sync = [sys.executable, "-m", "clbench.cli", "sync", "--tracking-uri", url]
    procs = [
        subprocess.Popen(
            [*sync, str(only_run_dir(tmp_path / f"s{s}"))],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for s in range(1, 5)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    records = [results_of(only_run_dir(tmp_path / f"s{s}")) for s in range(5)]
    assert all(r["tracking"]["status"] == "ok" for r in records)
    assert len({r["tracking"]["run_id"] for r in records}) == 5

    runs = read_runs(url, "clbench")
    by_id = {r.run_id: r.record for r in runs}
    for rec in records:  # each tracked record is that run's, nothing mixed
        tracked = by_id[rec["tracking"]["run_id"]]
        assert tracked["seed"] == rec["seed"]
        assert tracked["accuracy_matrix"] == rec["accuracy_matrix"]

    board = build_boards(runs)["split_digits"]
    entry = next(e for e in board["entries"] if e["strategy"] == "linear_probe")
    assert entry["n"] == 5 and entry["seeds"] == [0, 1, 2, 3, 4]
    finals = [r["metrics"]["final_accuracy"] for r in records]
    assert entry["metrics"]["final_accuracy"]["mean"] == pytest.approx(sum(finals) / 5, abs=1e-6)
    written = publish(runs, tmp_path / "boards")
    assert json.loads(Path(written[0]).read_text())["entries"]
