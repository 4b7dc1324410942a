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
from helpers import FAST, only_run_dir, results_of


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
        time.sleep(0.5)
    yield url, tmp
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def test_parallel_runs_log_to_a_server_and_a_board_is_published(server, tmp_path):
    url, _ = server
    fast = [o for o in FAST if not o.startswith("tracking")]
    env = {**os.environ, "MLFLOW_TRACKING_URI": ""}
    procs = []
    for seed in range(4):
        out = tmp_path / f"s{seed}"
        cmd = [
            sys.executable,
            "-m",
            "clbench.cli",
            "run",
            *fast,
            "strategy=linear_probe",
            f"seed={seed}",
            f"runs_dir={out}",
            f"tracking.uri={url}",
        ]
        procs.append((out, subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)))
    records = []
    for out, p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        records.append(results_of(only_run_dir(out)))
    assert all(r["tracking"]["status"] == "ok" for r in records)
    assert len({r["tracking"]["run_id"] for r in records}) == 4

    runs = read_runs(url, "clbench")
    by_id = {r.run_id: r.record for r in runs}
    for rec in records:  # each tracked record is that run's, nothing mixed
        tracked = by_id[rec["tracking"]["run_id"]]
        assert tracked["seed"] == rec["seed"]
        assert tracked["accuracy_matrix"] == rec["accuracy_matrix"]

    board = build_boards(runs)["split_digits"]
    entry = next(e for e in board["entries"] if e["strategy"] == "linear_probe")
    assert entry["n"] == 4 and entry["seeds"] == [0, 1, 2, 3]
    finals = [r["metrics"]["final_accuracy"] for r in records]
    assert entry["metrics"]["final_accuracy"]["mean"] == pytest.approx(sum(finals) / 4, abs=1e-6)
    written = publish(runs, tmp_path / "boards")
    assert json.loads(Path(written[0]).read_text())["entries"]
