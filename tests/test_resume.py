"""Resumable runs: SIGKILL a run during experience 3 of 5, resume it, and get the
uninterrupted run's accuracy matrix."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from clbench.protocols.class_incremental import CHECKPOINT
from helpers import only_run_dir, results_of, run_cli

ARGS = [
    "backbone.pretrained=none",
    "scenario.n_experiences=5",
    "strategy.epochs=2",
    "tracking=none",
    "progress=false",
]

#: a finished run for the checks on what is kept: two experiences, one epoch
SHORT = [*ARGS, "scenario.n_experiences=2", "strategy.epochs=1"]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "clbench.cli", *args]


# every strategy's state is tests/test_reliability_resume.py's; here a real SIGKILL
@pytest.mark.parametrize("strategy", ["olora"])
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, strategy):
    extra = ["strategy.experts=4", "strategy.ae_steps=30"] if strategy == "moe_adapters" else []
    run = ["run", *ARGS, f"strategy={strategy}", *extra]
    straight = tmp_path / "straight"
    assert run_cli([*run, f"runs_dir={straight}"]) == 0  # in-process: only the kill needs a child
    expected = results_of(only_run_dir(straight))

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(*run, f"runs_dir={killed}"), stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    info, found = None, []
    while time.monotonic() < deadline and proc.poll() is None:
        found = list(killed.glob("*/checkpoint.json"))
        if found:
            try:
                info = json.loads(found[0].read_text())
            except (OSError, json.JSONDecodeError):
                info = None
            if info and info["experiences_done"] >= 2:
                os.kill(proc.pid, signal.SIGKILL)  # now inside experience 3
                break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert len(found) == 1
    run_dir = found[0].parent
    assert not (run_dir / "results.json").exists()
    done = json.loads((run_dir / "checkpoint.json").read_text())["experiences_done"]
    assert done == 2

    assert run_cli(["resume", str(run_dir)]) == 0
    resumed = results_of(run_dir)
    assert resumed["resumed_after_experience"] == 2
    assert resumed["accuracy_matrix"] == expected["accuracy_matrix"]
    assert resumed["accuracy_matrix_task_aware"] == expected["accuracy_matrix_task_aware"]
    assert resumed["metrics"] == expected["metrics"]
    assert not (run_dir / CHECKPOINT).exists()  # finished: the checkpoint is gone


def test_resume_refuses_what_it_cannot_continue(tmp_path, capsys):
    assert run_cli(["resume", str(tmp_path)]) == 2
    assert "no .hydra/config.yaml" in capsys.readouterr().err
    assert run_cli(["run", *SHORT, f"runs_dir={tmp_path}"]) == 0
    run_dir = only_run_dir(tmp_path)
    assert run_cli(["resume", str(run_dir)]) == 2
    assert "has finished" in capsys.readouterr().err


def test_no_checkpoint_is_kept_after_a_finished_run_or_when_off(tmp_path):
    for flag in ("true", "false"):
        out = tmp_path / flag
        args = ["run", *SHORT, f"checkpoint={flag}", f"runs_dir={out}"]
        assert run_cli(args) == 0
        run_dir = only_run_dir(out)
        assert not (run_dir / CHECKPOINT).exists()
        assert not (run_dir / "checkpoint.json").exists()
