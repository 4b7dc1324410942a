"""Built-in scenarios (importable as ``clbench.scenarios``); importing registers them."""

from clbench.scenarios import digits, tta  # noqa: F401
