"""Built-in strategies (importable as ``clbench.strategies``); importing registers them."""

from clbench.strategies import baselines, experts, inflora, lora, prompts, rank  # noqa: F401
