"""What a backbone builder returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass
class Backbone:
    """A feature extractor: ``module(x)`` -> (N, feature_dim) pooled features."""

    name: str
    module: nn.Module
    feature_dim: int
    input_shape: tuple[int, ...]  # (C, H, W)
    source: str  # where the weights come from (provenance, logged with the run)
    meta: dict[str, Any] = field(default_factory=dict)
