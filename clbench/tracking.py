"""MLflow tracking of a finished run record.

The run directory is the source of truth; MLflow gets the same content. A tracking
failure never loses the run: it is reported in one line and the directory stays. A dead
server costs seconds (:func:`http_limits`); concurrent runs into one fresh local SQLite
store do not race in its creation (:func:`ensure_local_store`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from clbench.errors import ClbenchError, first_line
from clbench.record import RunRecord

MAX_PARAM_LEN = 6000
#: seconds one HTTP request to a tracking server may take (connect, then read)
DEFAULT_TIMEOUT = 5


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
    """Silence MLflow's, alembic's and urllib3's chatter (migrations, 'View run at ...',
    'Retrying (Retry(total=6 ...' per failed connection)."""
    loggers = [logging.getLogger(n) for n in ("mlflow", "alembic", "urllib3")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, lvl in zip(loggers, levels, strict=True):
            lg.setLevel(lvl)


@contextlib.contextmanager
def http_limits(timeout: int = DEFAULT_TIMEOUT) -> Iterator[None]:
    """Bound MLflow's HTTP client while inside: no retries of its own (the caller retries
    the whole upload) and ``timeout`` seconds per request, so a dead or silent server
    costs seconds, not MLflow's default minutes (7 retries with backoff, 120 s timeout).

    MLflow reads these variables at each request; one the user set is left as it is.
    """
    limits = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(int(timeout), 1)),
    }
    added = [k for k in limits if k not in os.environ]
    for k in added:
        os.environ[k] = limits[k]
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def describe_error(e: BaseException, timeout: int = DEFAULT_TIMEOUT) -> str:
    """One short line for a tracking failure: a dead or silent server in a few words, else
    the first line of the error."""
    import requests

    seen: BaseException | None = e
    for _ in range(10):  # the exception's cause chain
        if seen is None:
            break
        if isinstance(seen, requests.exceptions.Timeout) or (
            isinstance(seen, requests.exceptions.ConnectionError) and "timed out" in str(seen)
        ):  # urllib3 reports a read timeout with its retries spent as a ConnectionError
            waited = os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT") or timeout
            return f"no answer within {waited} s"
        if isinstance(seen, requests.exceptions.ConnectionError):
            reason = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(seen))
            return "cannot connect" + (f": {reason.group(1)}" if reason else "")
        seen = seen.__cause__ or seen.__context__
    return first_line(e)


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:`` store URI (None for anything else, or in memory)."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    try:
        db = make_url(uri).database
    except Exception:  # not a URI SQLAlchemy understands: MLflow will say so
        return None
    if not db or db == ":memory:" or db.startswith("file:"):
        return None
    return Path(db).resolve()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created if missing) for other processes, while inside."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


#: (database file, experiment) pairs this process has already made ready
_READY: set[tuple[str, str]] = set()


#: the store MLflow itself would use in this process (its environment variable or its
#: default), read before clbench sets any: ``mlflow.set_tracking_uri`` also sets
#: MLFLOW_TRACKING_URI, so later reads would return the last store logged to
_OWN_URI: list[str] = []


def target_uri(uri: str | None) -> str:
    """``uri``, or (None) the store MLflow would use had clbench set none in this process,
    so ``clbench sync a b`` never sends b (no URI of its own) to a's store."""
    if not _OWN_URI:
        import mlflow

        _OWN_URI.append(mlflow.get_tracking_uri())
    return uri or _OWN_URI[0]


def ensure_local_store(uri: str | None, experiment: str) -> None:
    """Create and migrate a local SQLite store and its experiment under a file lock.

    Processes starting together on a store that does not exist yet race in MLflow's schema
    migration ("duplicate column name: trace_name") and in creating the experiment; under
    ``<db>.lock`` one does both and the others find them done. Costs one uncontended lock
    and the store's opening (which logging does anyway) once per process; a server or any
    other store is left alone. ``uri`` None means MLflow's own resolution.
    """
    if uri and not uri.startswith("sqlite:"):
        return  # a server or another kind of store: nothing to prepare, no MLflow import
    import mlflow

    resolved = target_uri(uri)
    db = _sqlite_path(str(resolved))
    if db is None or (str(db), experiment) in _READY:
        return
    with _locked(db.with_name(db.name + ".lock")), quiet():
        client = mlflow.MlflowClient(resolved)
        if client.get_experiment_by_name(experiment) is None:
            client.create_experiment(experiment)
    _READY.add((str(db), experiment))


def prepare_local_store(uri: str | None, experiment: str) -> None:
    """:func:`ensure_local_store` once before a sweep; a failure is left to the jobs (which
    report tracking problems themselves, one line each)."""
    with contextlib.suppress(Exception):
        ensure_local_store(uri, experiment)


#: run-directory files never uploaded: checkpoints (learner state, for resume only)
PRIVATE_PREFIXES = ("checkpoint", ".checkpoint")


def log_run(
    record: RunRecord,
    run_dir: Path,
    uri: str | None,
    experiment: str,
    timeout: int = DEFAULT_TIMEOUT,
) -> str:
    """Log a run record to MLflow with the run directory's files; returns the run id.

    The results.json artifact is the record as a run logs it (without a tracking status);
    checkpoints are never uploaded. A local SQLite store is made ready first
    (:func:`ensure_local_store`); requests to a server are bounded (:func:`http_limits`).
    """
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with http_limits(timeout), quiet():
        ensure_local_store(uri, experiment)
        mlflow.set_tracking_uri(target_uri(uri))
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


def sync_run_dir(
    run_dir: Path, uri: str | None = None, experiment: str | None = None, force: bool = False
) -> dict[str, Any]:
    """Upload a finished run directory to MLflow (a run whose tracking failed or was off).

    ``uri`` / ``experiment`` default to the run's own tracking config. A run already
    tracked is left alone unless ``force``. On failure the directory is unchanged and a
    ClbenchError says why; on success results.json records the new MLflow run id.
    """
    path = run_dir / "results.json"
    if not path.is_file():
        raise ClbenchError(f"not a finished run directory (no results.json): {run_dir}")
    record = RunRecord.load(path)
    status = record.tracking or {}
    if status.get("status") == "ok" and not force:
        return {**status, "skipped": True}
    conf = record.config.get("tracking") or {}
    uri = uri or conf.get("uri") or None
    experiment = experiment or conf.get("experiment") or "clbench"
    timeout = int(conf.get("timeout") or DEFAULT_TIMEOUT)
    try:
        run_id = log_run(record, run_dir, uri, experiment, timeout)
    except Exception as e:
        where = uri or "the default store"
        why = describe_error(e, timeout)
        raise ClbenchError(f"sync of {run_dir} to {where} failed: {why}") from None
    record.tracking = {"status": "ok", "uri": uri, "run_id": run_id, "synced": True}
    record.write(path)
    return record.tracking
