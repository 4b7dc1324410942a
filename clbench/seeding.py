"""Seeding: the same config and seed give the same run."""

from __future__ import annotations

import random
from typing import Any

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


def rng_state() -> dict[str, Any]:
    """Every global RNG's state (python, numpy, torch CPU and CUDA) as data: JSON values
    and tensors (:mod:`clbench.statefile`), never pickled objects."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["state"]), py["gauss"]))
    n = state["numpy"]
    keys = np.asarray(n["keys"].cpu().numpy(), dtype=np.uint32)
    np.random.set_state(
        (str(n["kind"]), keys, int(n["pos"]), int(n["has_gauss"]), float(n["cached_gaussian"]))
    )
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu().to(torch.uint8) for t in state["cuda"]])
