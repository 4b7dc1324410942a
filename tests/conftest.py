"""Shared fixtures. The suite is offline: no download, no write outside tmp dirs."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# pytest-xdist workers (pyproject's addopts run two): one torch / OpenMP thread each, set
# before anything imports torch, so that two workers do not oversubscribe two cores
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = "1"

# One private cache for the whole session (its workers and their subprocesses): never the
# user's. Workers of one run share it (xdist's run id), so the checkpoint is made once.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID")
if _RUN:
    _CACHE = os.path.join(tempfile.gettempdir(), f"clbench-test-cache-{_RUN}")
    os.makedirs(_CACHE, exist_ok=True)
else:
    _CACHE = tempfile.mkdtemp(prefix="clbench-test-cache-")
os.environ["CLBENCH_CACHE_DIR"] = _CACHE
os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{_CACHE}/guard-mlflow.db")


@pytest.fixture(scope="session", autouse=True)
def _private_cwd() -> None:
    """MLflow puts a SQLite store's artifacts under ./mlruns of the working directory, and a
    run without runs_dir writes ./runs: the session works in a directory of its own (set
    after collection, which resolves the test paths from the invocation directory)."""
    os.chdir(tempfile.mkdtemp(prefix="clbench-test-cwd-"))


@pytest.fixture(scope="session")
def pretrained() -> Path:
    """The embedded source checkpoint, made once per session in the private cache (one
    worker makes it while the other waits on a lock file, then finds it made)."""
    import fcntl

    from clbench.pretrain.train import ensure_pretrained

    with open(os.path.join(_CACHE, "pretrain.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return ensure_pretrained(progress=False)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
