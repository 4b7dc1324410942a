"""Small validators used by config dataclasses' ``__post_init__``."""

from __future__ import annotations

from collections.abc import Iterable

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
