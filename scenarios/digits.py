"""split_digits: scikit-learn's bundled handwritten digits (real data, offline)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from clbench.scenarios.base import Scenario, class_incremental_from_tensors, class_split
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from clbench.checks import check_range
from clbench.lowres import CHANNELS, INPUT_SIZE, to_model_input


@dataclass
class SplitDigitsConfig:
    name: str = "split_digits"
    n_experiences: int = 5
    # PILOT's uneven split: init_cls classes first, then increment per experience
    # (clbench.scenarios.base.class_split); 0 and 0: n_experiences even experiences
    init_cls: int = 0
    increment: int = 0
    # Class order: a permutation of 0..9 drawn with this seed (PILOT shuffles with 1993).
    class_order_seed: int = 1993
    test_fraction: float = 0.3
    split_seed: int = 0  # the fixed, stratified train/test split

    def __post_init__(self) -> None:
        self.sizes()  # one ConfigError line for a split that does not fit 10 classes
        check_range("scenario.test_fraction", self.test_fraction, 0.05, 0.95)

    def sizes(self) -> list[int]:
        """Classes per experience."""
        return class_split(10, self.n_experiences, self.init_cls, self.increment)


def split_digits(cfg: SplitDigitsConfig) -> Scenario:
    """Class-incremental split of sklearn's 8x8 handwritten digits (1797 images, 10 classes)."""
    digits = load_digits()
    images = digits.images.astype(np.float32)
    labels = digits.target.astype(np.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)),
        test_size=cfg.test_fraction,
        stratify=labels,
        random_state=cfg.split_seed,
    )
    order = np.random.default_rng(cfg.class_order_seed).permutation(10).tolist()
    x = to_model_input(torch.from_numpy(images))
    y = torch.from_numpy(labels)
    benchmark = class_incremental_from_tensors(
        x[idx_train], y[idx_train], x[idx_test], y[idx_test], order, cfg.sizes()
    )
    return Scenario(
        name="split_digits",
        kind="class_incremental",
        benchmark=benchmark,
        class_names=[str(c) for c in order],
        input_shape=(CHANNELS, INPUT_SIZE, INPUT_SIZE),
    )


split_digits.Config = SplitDigitsConfig  # type: ignore[attr-defined]
