"""Errors that reach the user as one clear line (see clbench.cli)."""

from __future__ import annotations

from collections.abc import Iterable


class ClbenchError(Exception):
    """A problem the user can fix: printed as one line, exit code 2."""

    exit_code = 2


class ConfigError(ClbenchError):
    """A bad override, an unknown name or an invalid value."""


def unknown_choice(kind: str, value: object, choices: Iterable[str]) -> ConfigError:
    """The standard message for a name that is not one of the valid choices."""
    valid = ", ".join(sorted(choices)) or "(none registered)"
    return ConfigError(f"unknown {kind} {value!r}; valid choices: {valid}")


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
