"""The same config and seed give the same accuracy matrix."""

from __future__ import annotations

from helpers import FAST, only_run_dir, results_of, run_cli


def _matrix(tmp_path, *extra):
    assert run_cli(["run", *FAST, f"runs_dir={tmp_path}", *extra]) == 0
    return results_of(only_run_dir(tmp_path))


def test_same_seed_same_matrix(tmp_path):
    a = _matrix(tmp_path / "a", "strategy=finetune", "seed=7")
    b = _matrix(tmp_path / "b", "strategy=finetune", "seed=7")
    assert a["accuracy_matrix"] == b["accuracy_matrix"]
    assert a["metrics"] == b["metrics"]


def test_different_seed_changes_the_run(tmp_path):
    a = _matrix(tmp_path / "a", "strategy=finetune", "seed=7", "strategy.epochs=2")
    b = _matrix(tmp_path / "b", "strategy=finetune", "seed=8", "strategy.epochs=2")
    assert a["accuracy_matrix"] != b["accuracy_matrix"]
