"""Helpers shared by the tests."""

from __future__ import annotations

import json
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
