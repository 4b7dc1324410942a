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


def rng_state() -> dict:
    """Every global RNG's state (python, numpy, torch CPU and CUDA) for a checkpoint."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
