"""Helpers shared by the tests."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: a seconds-long job: random-init backbone, 2 experiences, 1 epoch, no tracking
FAST = [
    "backbone.pretrained=none",
    "scenario.n_experiences=2",
    "strategy.epochs=1",
    "tracking=none",
    "progress=false",
]


def run_cli(args: list[str]) -> int:
    """``clbench ARGS`` in-process; returns the exit code."""
    from clbench.cli import main

    try:
        return main(args)
    except SystemExit as e:  # hydra jobs exit through SystemExit
        return int(e.code or 0)


def results_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def only_run_dir(root: Path) -> Path:
    found = sorted(p.parent for p in root.rglob("results.json"))
    assert len(found) == 1, found
    return found[0]


def clbench_with(args: list[str], pythonpath: Path, cwd: Path):
    """``clbench ARGS`` in a fresh interpreter with ``pythonpath`` on its path (where a test
    put a fake installed distribution); returns the CompletedProcess."""
    import os
    import subprocess
    import sys

    code = "import sys; from clbench.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(pythonpath)},
        timeout=300,
    )


@contextmanager
def snapshot_after(experiences: int, dest: Path) -> Iterator[None]:
    """Within the block, a class-incremental run's directory is copied to ``dest`` right
    after its checkpoint of ``experiences`` experiences (what a SIGKILL at that moment would
    leave), and the run goes on."""
    from clbench.protocols import class_incremental as ci

    save = ci.save_checkpoint

    def save_and_snapshot(ctx, learner, result):
        save(ctx, learner, result)
        if len(result.accuracy_matrix) == experiences:
            shutil.copytree(ctx.run_dir, dest)

    ci.save_checkpoint = save_and_snapshot
    try:
        yield
    finally:
        ci.save_checkpoint = save
