"""Built-in strategies (importable as ``clbench.strategies``); importing registers them."""

from clbench.strategies import (  # noqa: F401
    baselines,
    experts,
    inflora,
    lora,
    prompts,
    rank,
    tta,
)
