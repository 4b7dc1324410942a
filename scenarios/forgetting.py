"""Continual-forgetting scenarios (kind ``forgetting``): erasure requests over a classifier
trained on every class.

- ``glyph_forget`` (embedded, offline): the 58-class glyph task the micro ViT is
  pretrained on. Glyphs are font renderings (matplotlib's 16 bundled fonts, randomly
  warped): the pretrained micro ViT with its glyph head is exactly a model trained on all
  classes. Train and test samples are fresh renderings from their own seeds.
- ``digits_forget`` (embedded, real data): scikit-learn's handwritten digits; the start
  model is the digits source model of ``digits_c`` (trained on the train split, cached).
- ``imagefolder_forget``: a local ImageFolder dataset (CASIA-Face-100 style ``train/``
  and ``test/``; ImageNet-100 as ImageFolder plus a class list) and a start model from a
  local checkpoint (:mod:`clbench.scenarios.imagefolder`).

Requests follow GS-LoRA's split (:func:`clbench.protocols.forgetting.gs_lora_split`);
each request's training data is a ``data_ratio`` fraction of the retained and of the
forgotten training samples (GS-LoRA's default 0.1), or ``shots`` per class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from avalanche.benchmarks.utils.classification_dataset import (
    _as_taskaware_supervised_classification_dataset,
)
from clbench.scenarios.base import Scenario, _dataset
from clbench.strategies.erasure import ErasureRequest
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset

from clbench.checks import check_positive, check_range
from clbench.errors import ConfigError
from clbench.lowres import CHANNELS, INPUT_SIZE, to_model_input
from clbench.pretrain.source import SourceRecipe
from clbench.protocols.forgetting import GS_LORA_ORDER_SEED, ErasureStream, gs_lora_split


@dataclass
class ForgettingConfig:
    """The split and the training data of the requests (shared by every forgetting scenario)."""

    name: str = "???"
    n_requests: int = 4
    per_request: int = 12  # classes forgotten per request (P)
    order_seed: int = GS_LORA_ORDER_SEED  # the class order: range(C) shuffled with this seed
    data_ratio: float = 0.1  # fraction of the retained and forgotten training data used
    shots: int = 0  # > 0: this many training samples per class instead of data_ratio
    n_missing: int = 0  # GS-LoRA++: retained classes with no training data, per request
    data_seed: int = 1337  # draws each request's training subset

    def __post_init__(self) -> None:
        check_positive("scenario.n_requests", self.n_requests)
        check_positive("scenario.per_request", self.per_request)
        check_positive("scenario.data_ratio", self.data_ratio)
        check_range("scenario.data_ratio", self.data_ratio, 0.0, 1.0)
        check_positive("scenario.shots", self.shots, allow_zero=True)
        check_positive("scenario.n_missing", self.n_missing, allow_zero=True)

    def requests(self, num_classes: int) -> tuple[list[int], list[ErasureRequest]]:
        """The class order and the requests (one ConfigError line if they do not fit)."""
        first = num_classes - self.per_request
        try:
            return gs_lora_split(
                num_classes, first, self.per_request, self.n_requests, self.order_seed,
                self.n_missing,
            )  # fmt: skip
        except ValueError as e:
            raise ConfigError(
                f"scenario {self.name}: {e} (scenario.n_requests, scenario.per_request, "
                "scenario.n_missing)"
            ) from None


def request_subsets(
    y: torch.Tensor | Sequence[int], requests: Sequence[ErasureRequest], cfg: ForgettingConfig
) -> list[torch.Tensor]:
    """Indices into the training set (whose labels are ``y``: the tensor, or a lazy
    dataset's ``targets``) of each request's training data.

    As GS-LoRA's code: per request, a random ``data_ratio`` fraction of the forget
    samples, then of the retained samples (``torch.randperm`` from one generator seeded
    with ``data_seed``, advancing request by request); with ``shots``, that many random
    samples of each class instead. Missing classes contribute nothing.
    """
    y = torch.as_tensor(y, dtype=torch.long)
    g = torch.Generator().manual_seed(cfg.data_seed)
    out = []
    for req in requests:
        with_data = [c for c in req.remain if c not in set(req.missing)]
        parts = []
        for classes in (req.forget, with_data):
            idx = torch.nonzero(torch.isin(y, torch.tensor(classes, dtype=y.dtype))).flatten()
            if cfg.shots:
                for c in classes:
                    mine = idx[y[idx] == c]
                    parts.append(mine[torch.randperm(len(mine), generator=g)[: cfg.shots]])
            else:
                keep = int(len(idx) * cfg.data_ratio)
                parts.append(idx[torch.randperm(len(idx), generator=g)[:keep]])
        out.append(torch.cat(parts).sort().values)
    return out


Samples = tuple[torch.Tensor, torch.Tensor] | Dataset


def forgetting_scenario(
    name: str,
    cfg: ForgettingConfig,
    train: Samples,
    test: Samples,
    class_names: list[str],
    input_shape: tuple[int, ...],
    source: SourceRecipe | None = None,
    start_checkpoint: str | None = None,
    num_workers: int = 0,
) -> Scenario:
    """A forgetting scenario: one training experience per request, the whole test set as
    one test experience, all training data as the source stream.

    ``train`` / ``test``: in-memory ``(x, y)`` tensors, or datasets with ``targets`` read
    lazily (then the scenario is not ``in_memory`` and ``num_workers`` processes read
    them). ``start_checkpoint``: the start model's file (else trained with ``source``).
    """
    order, requests = cfg.requests(len(class_names))
    lazy = [isinstance(d, Dataset) for d in (train, test)]
    y = train.targets if lazy[0] else train[1]
    subsets = request_subsets(y, requests, cfg)
    empty = [t + 1 for t, s in enumerate(subsets) if len(s) == 0]
    if empty:
        raise ConfigError(
            f"scenario {name}: request {empty[0]} has no training sample; raise "
            f"scenario.data_ratio (now {cfg.data_ratio}) or set scenario.shots"
        )
    if lazy[0]:
        whole = _as_taskaware_supervised_classification_dataset(train)
        experiences = [whole.subset(s.tolist()) for s in subsets]
    else:
        x, y = train
        whole = _dataset(x, y)
        experiences = [_dataset(x[s], y[s]) for s in subsets]
    benchmark = benchmark_from_datasets(
        train=experiences,
        test=[
            _as_taskaware_supervised_classification_dataset(test) if lazy[1] else _dataset(*test)
        ],
        source=[whole],
    )
    return Scenario(
        name=name,
        kind="forgetting",
        benchmark=benchmark,
        class_names=class_names,
        input_shape=input_shape,
        in_memory=not any(lazy),
        stream=ErasureStream(
            requests=tuple(requests),
            class_order=tuple(order),
            source=source,
            start_checkpoint=start_checkpoint,
            loader_workers=num_workers,
        ),
    )


# ----------------------------------------------------------------------- glyphs
@dataclass
class GlyphForgetConfig(ForgettingConfig):
    name: str = "glyph_forget"
    train_per_class: int = 200  # rendered training samples per class (58 classes)
    test_per_class: int = 50
    render_seed: int = 0  # train renderings use it, test renderings render_seed + 1
    # without a pretrained glyph head (backbone.pretrained=none): the start model is trained
    # on all the training renderings with this recipe (cached)
    source_epochs: int = 30
    source_lr: float = 1.0e-3
    source_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("scenario.train_per_class", self.train_per_class)
        check_positive("scenario.test_per_class", self.test_per_class)


def _balanced_glyphs(source, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` renderings of every glyph class (font, warp and threshold drawn with
    generator ``seed``), sorted by class."""
    classes = torch.arange(source.num_classes).repeat_interleave(per_class)
    return source.sample(len(classes), torch.Generator().manual_seed(seed), classes)


def glyph_forget(cfg: GlyphForgetConfig) -> Scenario:
    """Erase glyph classes from the micro ViT's pretrained glyph classifier (offline)."""
    from clbench.pretrain.glyphs import CHARACTERS, GlyphSource
    from clbench.pretrain.train import GLYPH_TASK

    source = GlyphSource()
    train = _balanced_glyphs(source, cfg.train_per_class, cfg.render_seed)
    test = _balanced_glyphs(source, cfg.test_per_class, cfg.render_seed + 1)
    return forgetting_scenario(
        "glyph_forget",
        cfg,
        train,
        test,
        class_names=list(CHARACTERS),
        input_shape=(CHANNELS, INPUT_SIZE, INPUT_SIZE),
        source=SourceRecipe(
            data_id=GLYPH_TASK, epochs=cfg.source_epochs, lr=cfg.source_lr, seed=cfg.source_seed
        ),
    )


glyph_forget.Config = GlyphForgetConfig  # type: ignore[attr-defined]


# ----------------------------------------------------------------------- digits
@dataclass
class DigitsForgetConfig(ForgettingConfig):
    name: str = "digits_forget"
    per_request: int = 2
    test_fraction: float = 0.3  # digits_c's split: its cached source model is the start model
    split_seed: int = 0
    source_epochs: int = 30
    source_lr: float = 1.0e-3
    source_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("scenario.test_fraction", self.test_fraction, 0.05, 0.95)


def digits_forget(cfg: DigitsForgetConfig) -> Scenario:
    """Erase digit classes from a classifier trained on all 10 digits (offline, real data)."""
    digits = load_digits()
    labels = torch.from_numpy(digits.target.astype(np.int64))
    x = to_model_input(torch.from_numpy(digits.images.astype(np.float32)))
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)),
        test_size=cfg.test_fraction,
        stratify=labels.numpy(),
        random_state=cfg.split_seed,
    )
    return forgetting_scenario(
        "digits_forget",
        cfg,
        (x[idx_train], labels[idx_train]),
        (x[idx_test], labels[idx_test]),
        class_names=[str(i) for i in range(10)],
        input_shape=(CHANNELS, INPUT_SIZE, INPUT_SIZE),
        source=SourceRecipe(  # the same data id and recipe as digits_c: one cached model
            data_id=f"digits(test_fraction={cfg.test_fraction},split_seed={cfg.split_seed})",
            epochs=cfg.source_epochs,
            lr=cfg.source_lr,
            seed=cfg.source_seed,
        ),
    )


digits_forget.Config = DigitsForgetConfig  # type: ignore[attr-defined]
