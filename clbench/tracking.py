"""MLflow tracking of a finished run record.

The run directory is the source of truth; MLflow gets the same content. A tracking
failure never loses the run: it is reported in one line and the directory stays.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clbench.record import RunRecord

MAX_PARAM_LEN = 6000


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> {"a.b.c": "value"} with lists JSON-encoded."""
    out: dict[str, str] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            text = json.dumps(v) if isinstance(v, list | tuple) else str(v)
            out[key] = text[:MAX_PARAM_LEN]
    return out


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence MLflow's and alembic's chatter (migrations, 'View run at ...')."""
    loggers = [logging.getLogger(n) for n in ("mlflow", "alembic")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, lvl in zip(loggers, levels, strict=True):
            lg.setLevel(lvl)


def prepare_local_store(uri: str | None, experiment: str) -> None:
    """Create a local (SQLite / default) store and its experiment once, before a sweep.

    Jobs starting together on a store that does not exist yet race in MLflow's schema
    migration ("table _alembic_tmp_tags already exists") and in creating the experiment;
    doing both first, in one process, leaves the jobs nothing to race for. A server
    (http/https) or a failure here is left to the jobs (which retry and keep their runs).
    """
    if uri and not uri.startswith("sqlite:"):
        return
    try:
        import mlflow

        with quiet():
            client = mlflow.MlflowClient(uri)
            if client.get_experiment_by_name(experiment) is None:
                client.create_experiment(experiment)
    except Exception:  # the jobs report tracking problems themselves, one line each
        return


#: run-directory files never uploaded: checkpoints (learner state, for resume only)
PRIVATE_PREFIXES = ("checkpoint", ".checkpoint")


def log_run(record: RunRecord, run_dir: Path, uri: str | None, experiment: str) -> str:
    """Log a run record to MLflow with the run directory's files; returns the run id.

    The results.json artifact is the record as a run logs it (without a tracking status);
    checkpoints are never uploaded.
    """
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with quiet():
        if uri:
            mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(experiment)
        with mlflow.start_run(run_name=record.run_name, tags=record.tags) as run:
            params = flatten(record.config)
            items = sorted(params.items())
            for i in range(0, len(items), 100):
                mlflow.log_params(dict(items[i : i + 100]))
            for step, values in enumerate(record.steps):
                mlflow.log_metrics(_finite(values), step=step)
            mlflow.log_metrics(_finite(record.metrics))
            mlflow.log_metrics(_finite(record.efficiency))
            for path in sorted(run_dir.iterdir()):
                if path.name == "results.json" or path.name.startswith(PRIVATE_PREFIXES):
                    continue
                if path.is_dir():
                    mlflow.log_artifacts(str(path), artifact_path=path.name)
                elif path.is_file():
                    mlflow.log_artifact(str(path))
            tracked = dataclasses.replace(record, tracking=None)
            mlflow.log_text(tracked.dumps(), "results.json")
            return run.info.run_id


def _finite(values: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in values.items():
        if isinstance(v, int | float) and v == v and abs(v) != float("inf"):
            out[k] = float(v)
    return out
