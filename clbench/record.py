"""The run record: what one run measured, as written to results.json and tracked in MLflow.

One type, :class:`RunRecord`, with a ``format`` version, shared by the runner (which
writes it), tracking (which logs it), ``clbench sync`` (which uploads it later), the
leaderboard and ``benchmarks/summarize_runs.py`` (which read it). The fields every run has
are typed attributes; a scenario kind's own values (the accuracy matrix of a
class-incremental run, the online errors of a test-time run) are the record's
``fields``, stored at the top level of results.json beside the common ones.

Reading checks the format and every common field: a record of another format, or a
malformed one, is one :class:`RecordError` line naming the file and the field.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clbench.errors import ClbenchError

#: the results.json format this clbench writes and reads
FORMAT = 2


class RecordError(ClbenchError):
    """A results.json that is not a run record of this clbench's format."""


def _is_number(v: Any) -> bool:
    return v is None or (isinstance(v, int | float) and not isinstance(v, bool))


def _is_values(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and _is_number(x) for k, x in v.items())


def _is_steps(v: Any) -> bool:
    return isinstance(v, list) and all(_is_values(s) for s in v)


#: common field -> (check, what it must be)
_CHECKS: dict[str, tuple[Any, str]] = {
    "clbench_version": (lambda v: isinstance(v, str), "a string"),
    "run_name": (lambda v: isinstance(v, str), "a string"),
    "run_dir": (lambda v: isinstance(v, str), "a string"),
    "scenario": (lambda v: isinstance(v, str) and v != "", "a scenario name"),
    "kind": (lambda v: isinstance(v, str) and v != "", "a scenario kind"),
    "strategy": (lambda v: isinstance(v, str) and v != "", "a strategy name"),
    "backbone": (lambda v: isinstance(v, str) and v != "", "a backbone name"),
    "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "uses_task_id": (lambda v: isinstance(v, bool), "true or false"),
    "config": (lambda v: isinstance(v, dict), "a mapping"),
    "class_names": (lambda v: isinstance(v, list), "a list"),
    "tags": (lambda v: isinstance(v, dict), "a mapping of strings"),
    "metrics": (_is_values, "a mapping of numbers"),
    "steps": (_is_steps, "a list of mappings of numbers"),
    "efficiency": (_is_values, "a mapping of numbers"),
}
_OPTIONAL = {"tracking": (lambda v: v is None or isinstance(v, dict), "a mapping")}


@dataclass
class RunRecord:
    """One finished run (see the module docstring)."""

    clbench_version: str
    run_name: str
    run_dir: str
    scenario: str
    kind: str
    strategy: str
    backbone: str
    seed: int
    uses_task_id: bool
    config: dict[str, Any]
    class_names: list[str]
    tags: dict[str, str]
    metrics: dict[str, float | None]
    steps: list[dict[str, float | None]]
    efficiency: dict[str, float | int | None]
    #: the scenario kind's own top-level fields (its protocol's ``record_fields``)
    fields: dict[str, Any] = field(default_factory=dict)
    #: where MLflow tracking stands: {"status": "ok" | "failed" | "disabled", ...}
    tracking: dict[str, Any] | None = None
    format: int = FORMAT

    def __post_init__(self) -> None:
        common = {f.name for f in dataclasses.fields(self)}
        clash = sorted(common & set(self.fields))
        if clash:
            raise ValueError(f"a kind's record field may not be named like a common one: {clash}")

    def __getitem__(self, key: str) -> Any:
        """``record["accuracy_matrix"]``: a common field or one of the kind's fields."""
        if key in self.fields:
            return self.fields[key]
        if key in _CHECKS or key in ("format", "tracking"):
            return getattr(self, key)
        raise KeyError(key)

    # ------------------------------------------------------------------ writing
    def to_dict(self) -> dict[str, Any]:
        """The record as results.json holds it (the kind's fields at the top level)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields = data.pop("fields")
        if data["tracking"] is None:
            del data["tracking"]
        return {**data, **fields}

    def dumps(self) -> str:
        """results.json's text: sorted keys, non-finite numbers as null."""
        return json.dumps(_clean(self.to_dict()), indent=2, sort_keys=True, allow_nan=False) + "\n"

    def write(self, path: Path) -> None:
        """results.json, atomically (:func:`write_text_atomic`)."""
        write_text_atomic(path, self.dumps())

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls, data: Any, source: str) -> RunRecord:
        """A record from results.json's content; ``source`` names the file in errors."""
        if not isinstance(data, dict):
            raise RecordError(f"{source}: not a clbench run record (a JSON object is expected)")
        if "format" not in data:
            raise RecordError(
                f"{source}: field 'format' is missing: a run record from before clbench's "
                f"format {FORMAT} (clbench 0.1 before the protocol registry); rerun it"
            )
        version = data["format"]
        if version != FORMAT:
            newer = isinstance(version, int) and version > FORMAT
            hint = "upgrade clbench to read it" if newer else "rerun it with this clbench"
            raise RecordError(
                f"{source}: field 'format' is {version!r}; this clbench reads format {FORMAT} "
                f"({hint})"
            )
        for name, (check, what) in {**_CHECKS, **_OPTIONAL}.items():
            if name not in data:
                if name in _OPTIONAL:
                    continue
                raise RecordError(f"{source}: field {name!r} is missing")
            if not check(data[name]):
                value = _short(data[name])
                raise RecordError(f"{source}: field {name!r} must be {what}, got {value}")
        common = {f.name for f in dataclasses.fields(cls)} - {"fields"}
        return cls(
            **{k: data[k] for k in common if k in data},
            fields={k: v for k, v in data.items() if k not in common},
        )

    @classmethod
    def loads(cls, text: str, source: str) -> RunRecord:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecordError(f"{source}: not valid JSON ({e.msg} at line {e.lineno})") from None
        return cls.from_dict(data, source)

    @classmethod
    def load(cls, path: Path, source: str | None = None) -> RunRecord:
        """The record in ``path`` (a results.json); one RecordError line if it is not one,
        naming ``source`` (default: the path)."""
        source = source or str(path)
        try:
            text = path.read_bytes().decode("utf-8")
        except OSError as e:
            raise RecordError(f"{source}: cannot be read ({e.strerror})") from None
        except UnicodeDecodeError as e:
            raise RecordError(
                f"{source}: not valid JSON (not UTF-8 text: byte {e.start}); not a run record"
            ) from None
        return cls.loads(text, source)

    def require(self, names: tuple[str, ...], source: str) -> None:
        """One RecordError line if any of the kind's fields ``names`` is missing."""
        for name in names:
            if name not in self.fields:
                raise RecordError(f"{source}: field {name!r} is missing (a {self.kind} record)")


#: a write that failed for want of space: what to do
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it, flushed to disk and
    renamed over ``path``: readers never see half a file. A failure (a full disk) removes
    the temporary file, leaves ``path`` as it was and is one ClbenchError line."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise ClbenchError(f"cannot write {path}: {describe_os_error(e)}") from None


def describe_os_error(e: OSError) -> str:
    """``strerror`` of a failed write, with what to do when the disk is full."""
    why = e.strerror or type(e).__name__
    return f"{why} (free space on that disk and run again)" if e.errno in _DISK_FULL else why


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_clean(x) for x in v]
    return v
