"""Built-in strategies (importable as ``clbench.strategies``); importing registers them."""

from clbench.strategies import baselines, lora  # noqa: F401
