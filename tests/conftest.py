"""Shared fixtures. The suite is offline: no download, no write outside tmp dirs."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# One private cache for the whole session (and its subprocesses): never the user's.
_CACHE = tempfile.mkdtemp(prefix="clbench-test-cache-")
os.environ["CLBENCH_CACHE_DIR"] = _CACHE
os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{_CACHE}/guard-mlflow.db")
# MLflow puts a SQLite store's artifacts under ./mlruns of the working directory, and a run
# without runs_dir writes ./runs: the session works in a directory of its own.
os.chdir(tempfile.mkdtemp(prefix="clbench-test-cwd-"))


@pytest.fixture(scope="session")
def pretrained() -> Path:
    """The embedded source checkpoint, made once per session in the private cache."""
    from clbench.pretrain.train import ensure_pretrained

    return ensure_pretrained(progress=False)
