"""Built-in strategies (importable as ``clbench.strategies``); importing registers them."""

from clbench.strategies import baselines, inflora, lora, prompts, rank  # noqa: F401
