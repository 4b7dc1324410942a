"""The ``threads`` option: torch's intra- and inter-op threads, with a default that follows
the cores the process may use (or OMP_NUM_THREADS), capped."""

from __future__ import annotations

import os

import pytest
import torch

from clbench import resources
from helpers import FAST, only_run_dir, results_of, run_cli


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_default_follows_the_affinity_mask_capped(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3}, raising=False)
    assert resources.available_cores() == 2 and resources.default_threads() == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(96)), raising=False)
    assert resources.default_threads() == resources.MAX_DEFAULT_THREADS == 16


@pytest.mark.parametrize(("env", "expected"), [("3", 3), ("0", 2), ("x", 2), ("", 2)])
def test_default_takes_omp_num_threads_when_it_is_a_count(monkeypatch, env, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", env)
    assert resources.default_threads() == expected


def test_set_threads_sets_torch(monkeypatch, restore_threads):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert resources.set_threads(2) == 2 and torch.get_num_threads() == 2
    assert resources.set_threads(None) == 1 and torch.get_num_threads() == 1


def test_a_run_uses_and_records_its_threads(tmp_path, restore_threads):
    assert run_cli(["run", *FAST, "threads=2", f"runs_dir={tmp_path}"]) == 0
    record = results_of(only_run_dir(tmp_path))
    assert record["config"]["threads"] == 2
    assert record["tags"]["hardware"].endswith(" 2 threads")
    assert torch.get_num_threads() == 2


def test_openmp_busy_wait_is_shortened_unless_the_environment_says(monkeypatch):
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    resources.configure_openmp()
    assert os.environ["GOMP_SPINCOUNT"] == resources.GOMP_SPINCOUNT
    monkeypatch.setenv("GOMP_SPINCOUNT", "5")
    resources.configure_openmp()
    assert os.environ["GOMP_SPINCOUNT"] == "5"
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    resources.configure_openmp()
    assert "GOMP_SPINCOUNT" not in os.environ
