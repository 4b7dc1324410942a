"""Seeding: the same config and seed give the same run."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derived_generator(*parts: int) -> torch.Generator:
    """A torch generator seeded from a tuple of ints (seed, experience, ...)."""
    g = torch.Generator()
    g.manual_seed(hash(tuple(parts)) % 2**63)
    return g
