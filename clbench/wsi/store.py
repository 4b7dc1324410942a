"""Output files written whole or not at all, so that an interrupted run resumes.

Every output is written under a temporary name in its folder (``.<name>.<pid>.tmp``) and
renamed over its final name once closed: a final name is only ever a complete file, and
a run that was killed leaves at most a temporary file, which the next run removes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from clbench.errors import ClbenchError


def temp_path(final: Path) -> Path:
    """The temporary name ``final`` is written under by this process."""
    return final.with_name(f".{final.name}.{os.getpid()}.tmp")


def remove_stale_temps(final: Path) -> list[Path]:
    """Remove temporary files of ``final`` left by killed runs; returns what it removed."""
    removed = []
    for p in final.parent.glob(f".{final.name}.*.tmp"):
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_output(final: Path) -> Iterator[Path]:
    """Yields a temporary path to write; on success it is renamed to ``final``, on any
    failure it is removed and ``final`` is left as it was. A disk that refuses the write
    is one ClbenchError line."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final)
    try:
        yield tmp
        os.replace(tmp, final)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        from clbench.record import describe_os_error

        raise ClbenchError(f"cannot write {final}: {describe_os_error(e)}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def write_text(final: Path, text: str) -> None:
    """``text`` to ``final`` through :func:`atomic_output`."""
    with atomic_output(final) as tmp:
        tmp.write_text(text, encoding="utf-8")
