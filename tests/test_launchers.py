"""Sweeps on existing engines: Hydra's joblib, submitit (local) and Ray launchers; one
sweep id tag ties a sweep's tracked runs together; the SLURM config composes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from helpers import FAST, run_cli

SWEEP = [o for o in FAST if not o.startswith("tracking")] + ["strategy=linear_probe", "seed=0,1"]


def _sweep(tmp_path: Path, *launcher: str, in_process: bool = True) -> list[dict]:
    """Run a 2-job sweep through ``launcher``; returns the MLflow tags of its runs. The
    launching ``clbench run -m`` runs in this process unless ``in_process`` is False (the
    jobs run wherever the launcher puts them: worker or job processes)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["run", "-m", *launcher, *SWEEP, f"runs_dir={tmp_path / 'runs'}", f"tracking.uri={uri}"]
    if in_process:
        assert run_cli(args) == 0
    else:
        cmd = [sys.executable, "-m", "clbench.cli", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("clbench")
    runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'")
    return [r.data.tags for r in runs]


def _one_sweep(tags: list[dict]) -> None:
    assert sorted(t["seed"] for t in tags) == ["0", "1"]  # each job its own run
    ids = {t.get("sweep_id") for t in tags}
    assert len(ids) == 1 and None not in ids and next(iter(ids))


def test_joblib_launcher(tmp_path):
    _one_sweep(_sweep(tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"))


def test_submitit_local_launcher(tmp_path):
    _one_sweep(_sweep(tmp_path, "hydra/launcher=submitit_local"))


@pytest.fixture
def ray_cluster(tmp_path):
    """A local Ray head node (``ray start --head --block``) in a session and a temporary
    directory of its own: the cluster's processes are ended by that session's id, its files
    removed with the directory (``ray stop`` would end every Ray process on the machine,
    and waits seconds for them)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # short: Ray's Unix sockets live under it (a socket path has at most 107 characters)
    temp = tempfile.mkdtemp(prefix="ray-")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    start = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block"]
    start += [f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2"]
    start += ["--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"]
    log = tmp_path / "ray-start.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            start, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 180
        # printed once the node is up and its address written, before it blocks
        while "block forever" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("ray start failed:\n" + log.read_text())
            time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # what ray stop --force sends, to our session only
        proc.wait(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_launcher_against_a_cluster(tmp_path, ray_cluster):
    launcher = ["hydra/launcher=ray_cluster", f"hydra.launcher.ray.init.address={ray_cluster}"]
    _one_sweep(_sweep(tmp_path, *launcher, in_process=False))  # Ray's driver stays out of pytest


def test_slurm_launcher_config_composes(capsys):
    assert (
        run_cli(["run", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra"])
        == 0
    )
    text = capsys.readouterr().out
    assert "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher" in text
    assert "partition: gpu" in text and "gpus_per_node: 1" in text
    assert "timeout_min: 240" in text
