"""digit_bags: continual MIL on bags of real handwritten digits, with known key instances.

Ilse et al.'s MNIST-bags made continual, on scikit-learn's bundled digits (1797 real 8x8
scans, offline). An instance is one digit, its feature the 64 grey values scaled to
[0, 1] (the frozen "encoder" is the identity: the aggregator's first layer learns the
digit detectors). A bag holds `bag_size_min`..`bag_size_max` instances, most of them
*filler* digits and `keys_min`..`keys_max` *key* digits, which decide the bag's label and
are its instance labels (like tumour patches in a slide). The digits are split by a
seeded permutation (`digit_order_seed`): the first ones are keys, the last
`n_fillers` are fillers.

- ``new_classes`` (ConSlide's shape: 4 tasks x 2 classes): class c's bags contain
  key digit ``keys[c]``; task t brings classes 2t and 2t+1, so within a task a bag is
  told apart by which key digit it holds, and one growing head covers every task.
- ``binary`` (CoMEL's shape: negative / positive over a sequence of "organs"): in task t
  a negative bag holds fillers only, a positive bag also holds key digit ``keys[t]``.

Instances are placed on a square grid (coords = column, row x 8 px, the 8x8 digit), so a
bag is a small "slide" whose attention can be drawn over its coordinates. Train and
test bags draw their digits from disjoint images (a stratified split).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from clbench.scenarios.bags import (
    NEW_CLASSES,
    SETTINGS,
    Bags,
    MILStream,
    mil_scenario,
    task_class_ids,
)
from clbench.scenarios.base import Scenario
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from clbench.checks import check_choice, check_positive, check_range
from clbench.errors import ConfigError

PIXELS = 64  # 8 x 8 grey values
CELL = 8  # px per instance on the bag's grid


@dataclass
class DigitBagsConfig:
    name: str = "digit_bags"
    setting: str = "new_classes"  # new_classes (tasks x 2 classes) | binary
    n_tasks: int = 4
    n_fillers: int = 2  # digits that are never keys (the "background" instances)
    feature_dim: int = PIXELS  # fixed: the 8x8 scans' grey values
    train_bags_per_class: int = 50
    test_bags_per_class: int = 25
    bag_size_min: int = 8
    bag_size_max: int = 24
    keys_min: int = 1
    keys_max: int = 4
    digit_order_seed: int = 1993
    bag_seed: int = 0
    test_fraction: float = 0.3  # of the digit images, stratified
    split_seed: int = 0

    def __post_init__(self) -> None:
        check_choice("scenario.setting", self.setting, SETTINGS)
        check_positive("scenario.n_tasks", self.n_tasks)
        check_positive("scenario.n_fillers", self.n_fillers)
        if self.feature_dim != PIXELS:
            raise ConfigError(
                f"invalid value for scenario.feature_dim: {self.feature_dim}; digit_bags' "
                f"instances are 8x8 scans: {PIXELS}"
            )
        keys = 2 * self.n_tasks if self.setting == NEW_CLASSES else self.n_tasks
        if keys + self.n_fillers > 10:
            raise ConfigError(
                f"scenario.n_tasks={self.n_tasks} needs {keys} key digits besides "
                f"{self.n_fillers} filler digits, out of 10; lower scenario.n_tasks or "
                "scenario.n_fillers"
            )
        for key in ("train_bags_per_class", "test_bags_per_class", "bag_size_min", "keys_min"):
            check_positive(f"scenario.{key}", getattr(self, key))
        if self.bag_size_max < self.bag_size_min or self.keys_max < self.keys_min:
            raise ConfigError(
                "scenario.bag_size_max / keys_max must not be below bag_size_min / keys_min "
                f"(got {self.bag_size_min}..{self.bag_size_max}, {self.keys_min}..{self.keys_max})"
            )
        if self.keys_max >= self.bag_size_min:
            raise ConfigError(
                f"scenario.keys_max ({self.keys_max}) must be below scenario.bag_size_min "
                f"({self.bag_size_min}): every bag keeps at least one filler"
            )
        check_range("scenario.test_fraction", self.test_fraction, 0.05, 0.95)


def grid_coords(n: int) -> torch.Tensor:
    """Top-left (x, y) of ``n`` instances laid row by row on a square grid of CELL px."""
    side = math.ceil(math.sqrt(n))
    i = torch.arange(n)
    return torch.stack([(i % side) * CELL, (i // side) * CELL], dim=1)


def make_bags(
    pool: dict[int, np.ndarray],
    fillers: list[int],
    kinds: list[tuple[int, int | None]],
    cfg: DigitBagsConfig,
    rng: np.random.Generator,
    prefix: str,
) -> Bags:
    """One task's bags: ``kinds`` lists (label, key digit or None) per bag; ``pool``
    maps a digit to its images' features (n, 64)."""
    feats, labels, inst, coords, names = [], [], [], [], []
    for i, (label, key) in enumerate(kinds):
        n = int(rng.integers(cfg.bag_size_min, cfg.bag_size_max + 1))
        k = int(rng.integers(cfg.keys_min, cfg.keys_max + 1)) if key is not None else 0
        digits = [int(d) for d in rng.choice(fillers, size=n - k)] + [key] * k  # type: ignore[list-item]
        is_key = np.array([0] * (n - k) + [1] * k)
        order = rng.permutation(n)
        rows = [pool[digits[j]][rng.integers(len(pool[digits[j]]))] for j in order]
        feats.append(torch.from_numpy(np.stack(rows)).float())
        inst.append(torch.from_numpy(is_key[order]).long())
        coords.append(grid_coords(n))
        labels.append(label)
        names.append(f"{prefix}{i:03d}")
    return Bags(feats, labels, names=names, instance_labels=inst, coords=coords)


def digit_bags(cfg: DigitBagsConfig) -> Scenario:
    """Continual MIL over bags of real digits (see the module docstring)."""
    digits = load_digits()
    x = (digits.images.reshape(-1, PIXELS) / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(y)), test_size=cfg.test_fraction, stratify=y, random_state=cfg.split_seed
    )
    order = np.random.default_rng(cfg.digit_order_seed).permutation(10).tolist()
    fillers = order[10 - cfg.n_fillers :]
    keys = order[: 10 - cfg.n_fillers]
    rng = np.random.default_rng(cfg.bag_seed)
    pools = {
        split: {d: x[idx][y[idx] == d] for d in range(10)}
        for split, idx in (("train", train_idx), ("test", test_idx))
    }
    train, test, task_classes, task_names = [], [], [], []
    for t in range(cfg.n_tasks):
        classes = task_class_ids(cfg.setting, 2 * t, 2)
        if cfg.setting == NEW_CLASSES:
            bag_keys: tuple[int | None, ...] = (keys[2 * t], keys[2 * t + 1])
            task_names.append(f"{keys[2 * t]} vs {keys[2 * t + 1]}")
        else:
            bag_keys = (None, keys[t])
            task_names.append(f"contains {keys[t]}")
        for split, per_class, out in (
            ("train", cfg.train_bags_per_class, train),
            ("test", cfg.test_bags_per_class, test),
        ):
            kinds = [
                (c, k) for c, k in zip(classes, bag_keys, strict=True) for _ in range(per_class)
            ]
            out.append(make_bags(pools[split], fillers, kinds, cfg, rng, f"t{t}_{split}_"))
        task_classes.append(classes)
    if cfg.setting == NEW_CLASSES:
        class_names = [f"has {keys[c]}" for c in range(2 * cfg.n_tasks)]
    else:
        class_names = ["negative", "positive"]
    stream = MILStream(
        setting=cfg.setting,
        task_names=tuple(task_names),
        task_classes=tuple(task_classes),
        train=tuple(train),
        test=tuple(test),
    )
    # the setting is part of the name, so boards never mix the two
    name = "digit_bags" if cfg.setting == NEW_CLASSES else "digit_bags_binary"
    return mil_scenario(name, stream, class_names, PIXELS)


digit_bags.Config = DigitBagsConfig  # type: ignore[attr-defined]
