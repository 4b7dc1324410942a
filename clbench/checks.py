"""Small validators: config dataclasses' ``__post_init__``, config validation and the CLI's
checks before a job starts. Each raises one :class:`~clbench.errors.ConfigError` line."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from clbench.errors import ConfigError


def check_choice(key: str, value: object, choices: Iterable[object]) -> None:
    choices = list(choices)
    if value not in choices:
        raise ConfigError(
            f"invalid value for {key}: {value!r}; valid choices: {', '.join(map(str, choices))}"
        )


def check_positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"invalid value for {key}: {value!r}; must be {bound}")


def check_range(key: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise ConfigError(f"invalid value for {key}: {value!r}; must be in [{lo}, {hi}]")


#: seeds every RNG clbench seeds takes as they are: numpy's legacy ``np.random.seed`` and
#: scikit-learn's ``random_state`` accept [0, 2**32 - 1]; ``np.random.default_rng`` and
#: ``torch.manual_seed`` accept more, but not negative seeds (numpy)
SEED_MAX = 2**32 - 1


def check_seed(key: str, value: int) -> None:
    if not 0 <= value <= SEED_MAX:
        raise ConfigError(
            f"invalid value for {key}: {value!r}; a seed must be in [0, {SEED_MAX}] (2**32 - 1, "
            "what numpy and scikit-learn accept)"
        )


def check_probability(key: str, value: float) -> None:
    """A dropout-like probability: in [0, 1)."""
    if not 0 <= value < 1:
        raise ConfigError(f"invalid value for {key}: {value!r}; must be in [0, 1)")


#: MLflow's built-in tracking-store schemes (mlflow.tracking._tracking_service.utils)
MLFLOW_SCHEMES = ("file", "sqlite", "postgresql", "mysql", "mssql", "http", "https")
MLFLOW_NAMED_STORES = ("databricks", "databricks-uc", "uc")
_DB_SCHEMES = ("postgresql", "mysql", "sqlite", "mssql")


def check_tracking_uri(key: str, uri: str | None) -> None:
    """An MLflow tracking URI whose scheme MLflow (or an installed store plugin) handles.

    Mirrors MLflow's own choice of store (``get_uri_scheme``): no scheme (or a Windows
    drive letter) is a local path, ``postgresql+psycopg2:`` is the ``postgresql`` store.
    Read without importing MLflow.
    """
    if not uri:
        return
    from urllib.parse import urlparse

    if uri in MLFLOW_NAMED_STORES:
        return
    scheme = urlparse(uri).scheme.lower()
    if not scheme or (len(scheme) == 1 and scheme.isalpha()):
        return  # a local path
    base = scheme.split("+")[0] if scheme.count("+") == 1 else scheme
    if base in _DB_SCHEMES or scheme in (*MLFLOW_SCHEMES, *MLFLOW_NAMED_STORES):
        return
    plugins = _plugin_schemes()
    if scheme in plugins:
        return
    valid = ["a local path", *(f"{s}:" for s in (*MLFLOW_SCHEMES, *plugins))]
    valid += MLFLOW_NAMED_STORES
    raise ConfigError(
        f"invalid value for {key}: {uri!r}; MLflow has no tracking store for scheme "
        f"{scheme!r}: valid are {', '.join(valid)} (e.g. sqlite:///PATH/mlflow.db, "
        "http://HOST:5000)"
    )


def _plugin_schemes() -> list[str]:
    """Schemes of installed MLflow tracking-store plugins (entry points)."""
    from importlib.metadata import entry_points

    return sorted({e.name for e in entry_points(group="mlflow.tracking_store")})


#: the least free space a run directory's disk must have for a run to start
MIN_FREE_BYTES = 1 << 20


def check_writable_dir(key: str, path: str | Path) -> None:
    """``path`` is, or can be made as, a directory this process may write in.

    Makes nothing: the nearest existing ancestor must be a directory with write access, on
    a disk with at least ``MIN_FREE_BYTES`` free.
    """
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ConfigError(
            f"invalid value for {key}: {str(path)!r} is a file, not a directory; give "
            f"{key}=DIR (a directory, made if missing)"
        )
    existing = next((a for a in (p, *p.parents) if a.exists()), Path.cwd())
    if not existing.is_dir():
        raise ConfigError(
            f"invalid value for {key}: {str(path)!r}; {str(existing)!r} is a file, so no "
            f"directory can be made under it; give {key}=DIR"
        )
    where = "" if existing == p else f" ({str(existing)!r}, where it would be made)"
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"invalid value for {key}: {str(path)!r} is not writable{where}; give {key}=DIR "
            "on a writable disk"
        )
    free = shutil.disk_usage(existing).free
    if free < MIN_FREE_BYTES:
        raise ConfigError(
            f"invalid value for {key}: the disk of {str(path)!r}{where} is full ({free} bytes "
            f"free); free space or give {key}=DIR on another disk"
        )


def tcp_unreachable(host: str, port: int, timeout: float = 3.0) -> str | None:
    """Why nothing accepts a TCP connection at ``host:port`` within ``timeout``; None if
    something does."""
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except TimeoutError:
        return f"no answer in {timeout:g} s"
    except OSError as e:
        return e.strerror or str(e) or type(e).__name__
