"""The classifier every supervised strategy trains: a backbone and a growing linear head."""

from __future__ import annotations

import warnings

import torch
from torch import nn


def empty_linear(in_features: int) -> nn.Linear:
    """A linear layer with no output unit yet (torch warns about initialising it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return nn.Linear(in_features, 0)


class IncrementalHead(nn.Module):
    """A linear head whose output units grow as classes arrive (old units are kept)."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.fc = empty_linear(in_features)

    @property
    def num_classes(self) -> int:
        return self.fc.out_features

    @torch.no_grad()
    def grow(self, num_classes: int) -> bool:
        """Ensure at least ``num_classes`` outputs; True if the head changed."""
        old = self.fc
        if num_classes <= old.out_features:
            return False
        new = nn.Linear(self.in_features, num_classes).to(old.weight.device, old.weight.dtype)
        new.weight[: old.out_features] = old.weight
        new.bias[: old.out_features] = old.bias
        self.fc = new
        return True

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc(feats)


class ClassifierModel(nn.Module):
    """``head(backbone(x))``; the backbone returns pooled features of size ``feature_dim``."""

    def __init__(self, backbone: nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = IncrementalHead(feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
