"""Continual test-time-adaptation scenarios: a stream of corrupted domains.

- ``digits_c`` (embedded, offline): the digits test split under the 15 corruptions of
  ``scenarios/corruptions.py``, applied at the model's 16x16 input resolution; the clean
  train split is the source data the source model is trained on (see
  ``clbench.pretrain.source``), the clean test split measures what is kept of the source
  task.
- ``cifar10_c`` / ``cifar100_c``: the released .npy files (``root``), or CIFAR generated
  by our corruption library from a torchvision CIFAR root (``cifar_root``).
- ``imagenet_c``: the ImageNet-C folder layout (images read lazily, resized to 224).

The stream (docs/protocols.md, "Stream variants"): the corruptions in the standard order at
one severity; or
``gradual``, each corruption passing through ``gradual_severities``; or ``mixed``, every
domain's samples in one shuffled domain. ``mode`` is ``continual`` (reset only before the
first domain) or ``reset_each_shift``; it is part of the scenario's name, so boards never
mix the two.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from clbench.scenarios.base import Scenario, tta_benchmark
from clbench.scenarios.corrupted_data import (
    generate_cifar_c,
    imagenet_c_samples,
    load_cifar_c,
    load_cifar_test,
)
from clbench.scenarios.corruptions import CORRUPTIONS, corrupt
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset

from clbench.checks import check_choice, check_positive, check_range
from clbench.errors import ConfigError
from clbench.lowres import CHANNELS, INPUT_SIZE, to_model_input
from clbench.protocols.tta import MODES, DomainStream, SourceRecipe, TestTimeAdaptation


@dataclass
class CorruptedStreamConfig:
    """The options every corrupted-domain stream shares."""

    name: str = "???"
    mode: str = "continual"  # continual | reset_each_shift
    batch_size: int = 200  # test batch (200 for CIFAR, 64 for ImageNet in the literature)
    severity: int = 5
    corruptions: list[str] = field(default_factory=lambda: list(CORRUPTIONS))
    # gradual: each corruption passes through these severities (CoTTA's gradual setting)
    gradual: bool = False
    gradual_severities: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5, 4, 3, 2, 1])
    mixed: bool = False  # every domain's samples shuffled together into one domain
    n_per_domain: int = 0  # 0: every image; else the first n of a fixed permutation
    subset_seed: int = 0  # that permutation
    corruption_seed: int = 0  # seeds of the corruption noise (one per domain)

    def __post_init__(self) -> None:
        check_choice("scenario.mode", self.mode, MODES)
        check_positive("scenario.batch_size", self.batch_size)
        check_choice("scenario.severity", self.severity, (1, 2, 3, 4, 5))
        if not self.corruptions:
            raise ConfigError("invalid value for scenario.corruptions: []; give at least one")
        for c in self.corruptions:
            check_choice("scenario.corruptions", c, CORRUPTIONS)
        for s in self.gradual_severities:
            check_choice("scenario.gradual_severities", s, (1, 2, 3, 4, 5))
        check_positive("scenario.n_per_domain", self.n_per_domain, allow_zero=True)
        if self.gradual and self.mixed:
            raise ConfigError("scenario.gradual and scenario.mixed exclude each other; pick one")

    def plan(self) -> list[tuple[str, int]]:
        """The (corruption, severity) of each domain, in stream order."""
        if self.gradual:
            return [(c, s) for c in self.corruptions for s in self.gradual_severities]
        return [(c, self.severity) for c in self.corruptions]

    def stream_name(self, base: str) -> str:
        """The scenario's name: its base plus the stream variant and the reset mode."""
        name = base + ("_gradual" if self.gradual else "") + ("_mixed" if self.mixed else "")
        return name + ("_reset_each_shift" if self.mode == "reset_each_shift" else "")


Domain = tuple[torch.Tensor, torch.Tensor]


def _subset(n: int, cfg: CorruptedStreamConfig) -> np.ndarray:
    if not cfg.n_per_domain or cfg.n_per_domain >= n:
        return np.arange(n)
    rng = np.random.default_rng(cfg.subset_seed)
    return np.sort(rng.permutation(n)[: cfg.n_per_domain])


def _scenario(
    cfg: CorruptedStreamConfig,
    base: str,
    domains: Sequence[Domain | Dataset],
    class_names: list[str],
    input_shape: tuple[int, ...],
    value_range: tuple[float, float],
    flip_preserves_label: bool,
    source: Domain | None = None,
    clean: Domain | None = None,
    recipe: SourceRecipe | None = None,
    in_memory: bool = True,
) -> Scenario:
    plan = cfg.plan()
    names = [f"{c}-{s}" for c, s in plan]
    if cfg.mixed:
        x = torch.cat([d[0] for d in domains])
        y = torch.cat([d[1] for d in domains])
        domains, names = [(x, y)], ["mixed"]
    return Scenario(
        name=cfg.stream_name(base),
        kind=TestTimeAdaptation.kind,
        benchmark=tta_benchmark(domains, source=source, clean=clean),
        class_names=class_names,
        input_shape=input_shape,
        in_memory=in_memory,
        stream=DomainStream(
            domains=tuple(names),
            mode=cfg.mode,
            batch_size=cfg.batch_size,
            value_range=value_range,
            flip_preserves_label=flip_preserves_label,
            source=recipe,
        ),
    )


# ------------------------------------------------------------------------ digits_c
@dataclass
class DigitsCConfig(CorruptedStreamConfig):
    name: str = "digits_c"
    # 540 test images per domain: batch 200 would give 3 updates per domain
    batch_size: int = 64
    test_fraction: float = 0.3  # the split of split_digits: source = train, stream = test
    split_seed: int = 0
    # the source model: trained on the clean train split (cached, clbench.pretrain.source)
    source_epochs: int = 30
    source_lr: float = 1e-3
    source_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("scenario.test_fraction", self.test_fraction, 0.05, 0.95)
        check_positive("scenario.source_epochs", self.source_epochs)
        check_positive("scenario.source_lr", self.source_lr)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Model inputs in [-1, 1], (N, C, H, W) -> uint8 images (N, H, W, C)."""
    img = ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return img.permute(0, 2, 3, 1).contiguous().numpy()


def from_uint8(img: np.ndarray) -> torch.Tensor:
    """uint8 images (N, H, W, C) -> model inputs in [-1, 1], (N, C, H, W)."""
    return torch.from_numpy(img).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


def digits_c(cfg: DigitsCConfig) -> Scenario:
    """The digits test split under 15 corruptions (continual test-time adaptation, offline)."""
    digits = load_digits()
    labels = torch.from_numpy(digits.target.astype(np.int64))
    x = to_model_input(torch.from_numpy(digits.images.astype(np.float32)))
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)),
        test_size=cfg.test_fraction,
        stratify=labels.numpy(),
        random_state=cfg.split_seed,
    )
    keep = idx_test[_subset(len(idx_test), cfg)]
    clean_u8 = to_uint8(x[keep])
    domains = [
        (from_uint8(corrupt(clean_u8, c, s, cfg.corruption_seed * 1000 + i)), labels[keep])
        for i, (c, s) in enumerate(cfg.plan())
    ]
    return _scenario(
        cfg,
        "digits_c",
        domains,
        class_names=[str(i) for i in range(10)],
        input_shape=(CHANNELS, INPUT_SIZE, INPUT_SIZE),
        value_range=(-1.0, 1.0),
        flip_preserves_label=False,  # a mirrored 2 or 7 is not a 2 or 7
        source=(x[idx_train], labels[idx_train]),
        clean=(x[idx_test], labels[idx_test]),
        recipe=SourceRecipe(
            data_id=f"digits(test_fraction={cfg.test_fraction},split_seed={cfg.split_seed})",
            epochs=cfg.source_epochs,
            lr=cfg.source_lr,
            seed=cfg.source_seed,
        ),
    )


digits_c.Config = DigitsCConfig  # type: ignore[attr-defined]


# ------------------------------------------------------------------------ CIFAR-C
@dataclass
class CifarCConfig(CorruptedStreamConfig):
    name: str = "cifar10_c"
    # the released .npy folder (RobustBench layout); if empty, the stream is generated by
    # our corruption library from the CIFAR test set under cifar_root
    root: str = ""
    # a torchvision CIFAR root (python-pickle release): the clean test set (clean accuracy
    # after the stream; clean samples for EATA's Fisher) and the generated stream
    cifar_root: str = ""
    n_per_domain: int = 10000

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.root and not self.cifar_root:
            raise ConfigError(
                f"scenario {self.name} needs its data: set scenario.root=DIR (the released "
                ".npy files) or scenario.cifar_root=DIR (a torchvision CIFAR root)"
            )


def _to_unit(img: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, H, W) in [0, 1] (RobustBench models' input)."""
    return torch.from_numpy(np.ascontiguousarray(img)).permute(0, 3, 1, 2).float().div(255.0)


def _cifar_c(cfg: CifarCConfig, dataset: str) -> Scenario:
    n_classes = 10 if dataset == "cifar10" else 100
    domains: list[Domain] = []
    for i, (c, s) in enumerate(cfg.plan()):
        if cfg.root:
            images, labels = load_cifar_c(cfg.root, c, s)
        else:
            images, labels = generate_cifar_c(
                cfg.cifar_root, c, s, cfg.corruption_seed * 1000 + i, dataset
            )
        keep = _subset(len(labels), cfg)
        domains.append((_to_unit(images[keep]), torch.from_numpy(labels[keep]).long()))
    clean = None
    if cfg.cifar_root:
        images, labels = load_cifar_test(cfg.cifar_root, dataset)
        clean = (_to_unit(images), torch.from_numpy(labels).long())
    return _scenario(
        cfg,
        f"{dataset}_c",
        domains,
        class_names=[str(i) for i in range(n_classes)],
        input_shape=(3, 32, 32),
        value_range=(0.0, 1.0),
        flip_preserves_label=True,
        source=clean,  # clean samples for EATA's Fisher (as EATA uses clean validation data)
        clean=clean,
    )


def cifar10_c(cfg: CifarCConfig) -> Scenario:
    """CIFAR-10-C (released .npy files or generated from CIFAR-10) as a continual stream."""
    return _cifar_c(cfg, "cifar10")


@dataclass
class Cifar100CConfig(CifarCConfig):
    name: str = "cifar100_c"


def cifar100_c(cfg: Cifar100CConfig) -> Scenario:
    """CIFAR-100-C (released .npy files or generated from CIFAR-100) as a continual stream."""
    return _cifar_c(cfg, "cifar100")


cifar10_c.Config = CifarCConfig  # type: ignore[attr-defined]
cifar100_c.Config = Cifar100CConfig  # type: ignore[attr-defined]


# ------------------------------------------------------------------------ ImageNet-C
class ImageFiles(Dataset):
    """Images read lazily from files: shorter side resized, centre-cropped, in [0, 1]."""

    def __init__(self, paths: list[Path], targets: list[int], resize: int, crop: int) -> None:
        self.paths = paths
        self.targets = targets
        self.resize = resize
        self.crop = crop

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        import torchvision.transforms.v2.functional as TF
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            img = TF.pil_to_tensor(im.convert("RGB"))
        img = TF.resize(img, [self.resize], antialias=True)
        img = TF.center_crop(img, [self.crop, self.crop])
        return img.float().div(255.0), self.targets[i]


@dataclass
class ImageNetCConfig(CorruptedStreamConfig):
    name: str = "imagenet_c"
    root: str = ""  # <root>/<corruption>/<severity>/<wnid>/<image>
    batch_size: int = 64
    n_per_domain: int = 5000  # RobustBench's ImageNet-C protocol uses 5,000 per domain
    resize: int = 256
    crop: int = 224

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mixed:
            raise ConfigError("scenario.mixed is not supported for imagenet_c (lazy domains)")
        if not self.root:
            raise ConfigError(
                "scenario imagenet_c needs its data: set scenario.root=DIR "
                "(<corruption>/<severity>/<wnid>/<image>)"
            )


def imagenet_c(cfg: ImageNetCConfig) -> Scenario:
    """ImageNet-C from its folder layout, images read lazily (continual stream)."""
    datasets: list[Any] = []
    wnids: list[str] = []
    for c, s in cfg.plan():
        paths, targets, wnids = imagenet_c_samples(cfg.root, c, s)
        keep = _subset(len(paths), cfg)
        files = ImageFiles(
            [paths[i] for i in keep], [targets[i] for i in keep], cfg.resize, cfg.crop
        )
        datasets.append(files)
    return _scenario(
        cfg,
        "imagenet_c",
        datasets,
        class_names=wnids,
        input_shape=(3, cfg.crop, cfg.crop),
        value_range=(0.0, 1.0),
        flip_preserves_label=True,
        in_memory=False,
    )


imagenet_c.Config = ImageNetCConfig  # type: ignore[attr-defined]
