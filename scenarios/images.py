"""The class-incremental image benchmarks of the pre-trained-model papers, from local data:
``split_cifar100``, ``imagenet_r``, ``cub200`` and ``domainnet``.

The readers (:mod:`clbench.scenarios.imagesets`) take each data set's released layout;
images are decoded one at a time when a batch is read (DataLoader workers, ``num_workers``)
and reach the model through the backbone's own transforms (:class:`ImagePipeline`, set
from its ``data_config`` by ``Scenario.configure_inputs``), as PILOT's ``build_transform``
(LAMDA-PILOT utils/data.py) makes them:

- train (``augment: true``): ``RandomResizedCrop(size, scale=crop_scale, ratio=(3/4, 4/3))``
  and a horizontal flip with probability 0.5;
- eval: the shorter side resized to ``size / crop_pct`` (PILOT: 256 for 224), then a centre
  crop of ``size``;

then scaled to [0, 1] and normalised with the backbone's mean / std (PILOT feeds [0, 1]
to its IN21K ViTs; timm's weights expect their own normalisation, which is applied here).
The interpolation is the backbone's (timm's ViTs: bicubic, as PILOT's eval resize).
Before a backbone configures it (no ``data_config``): 224 x 224, bicubic, mean = std =
0.5 (inputs in [-1, 1], clbench's convention for backbones that adapt inputs themselves).

Class order: PILOT's ``np.random.seed(1993); np.random.permutation(n)`` (``shuffle``,
``class_order_seed``), labels relabelled to positions in it; classes per experience by
PILOT's ``init_cls`` / ``increment`` rule (:func:`clbench.scenarios.base.class_split`).
Each sample's random crop and flip are drawn from a seed the training loader derives from
the run's seed (``clbench.data.LazyBatches``): the same run gives the same batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from clbench.scenarios.base import Scenario, class_incremental_from_datasets, class_split
from clbench.scenarios.imagesets import (
    CIFAR_LAYOUT,
    DOMAINS,
    ImageSet,
    read_cifar100,
    read_cub200,
    read_domainnet,
    read_imagenet_r,
)
from torch.utils.data import Dataset

from clbench.checks import check_choice, check_positive, check_range, check_seed
from clbench.errors import ClbenchError, ConfigError, first_line

#: before a backbone sets them (``configure``): the model input and its normalisation
DEFAULT_SIZE = 224
DEFAULT_MEAN = (0.5, 0.5, 0.5)  # maps [0, 1] to [-1, 1]
DEFAULT_STD = (0.5, 0.5, 0.5)
DEFAULT_INTERPOLATION = "bicubic"
#: PILOT's eval resize: int(256 / 224 * size), then a centre crop of size
PILOT_CROP_PCT = 224 / 256
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # PILOT's RandomResizedCrop ratio (torchvision's default)
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")
ORDERINGS = ("by_class", "by_domain")


# ------------------------------------------------------------------------ transforms
class ImagePipeline:
    """The train / eval transforms of an image scenario (an ``InputPipeline``): uint8
    (3, H, W) images in, normalised float model inputs out. ``configure`` adopts the
    backbone's data config; the transforms read this object when called, so a change made
    after the benchmark was built applies to every sample."""

    def __init__(self, augment: bool, crop_scale: tuple[float, float], crop_pct: float) -> None:
        self.augment = augment
        self.crop_scale = crop_scale
        self.fixed_crop_pct = crop_pct  # 0: the backbone's crop_pct
        self.size = (DEFAULT_SIZE, DEFAULT_SIZE)
        self.interpolation = DEFAULT_INTERPOLATION
        self.crop_pct = crop_pct or PILOT_CROP_PCT
        self.mean = torch.tensor(DEFAULT_MEAN).view(3, 1, 1)
        self.std = torch.tensor(DEFAULT_STD).view(3, 1, 1)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, *self.size)

    def configure(self, data_config: dict[str, Any]) -> tuple[int, ...]:
        """Adopt timm's data config (``input_size`` (C, H, W), ``mean``, ``std``,
        ``interpolation``, ``crop_pct``); keys it lacks keep their values."""
        size = data_config.get("input_size", self.input_shape)
        if isinstance(size, int):
            size = (3, size, size)
        if len(size) != 3 or int(size[0]) != 3 or min(int(s) for s in size) < 1:
            raise ClbenchError(
                f"the backbone's data config asks for input_size {tuple(size)}; image "
                "scenarios give RGB images (3, H, W)"
            )
        self.size = (int(size[1]), int(size[2]))
        for key in ("mean", "std"):
            values = data_config.get(key)
            if values is None:
                continue
            values = [float(v) for v in (values if len(values) == 3 else list(values) * 3)][:3]
            if key == "std" and min(values) <= 0:
                raise ClbenchError(f"the backbone's data config has std {values}; must be > 0")
            setattr(self, key, torch.tensor(values, dtype=torch.float32).view(3, 1, 1))
        interpolation = str(data_config.get("interpolation", self.interpolation))
        if interpolation not in INTERPOLATIONS:
            raise ClbenchError(
                f"the backbone's data config asks for interpolation {interpolation!r}; "
                f"valid: {', '.join(INTERPOLATIONS)}"
            )
        self.interpolation = interpolation
        if not self.fixed_crop_pct and data_config.get("crop_pct"):
            self.crop_pct = float(data_config["crop_pct"])
        return self.input_shape

    def transform_groups(self) -> dict[str, tuple[Any, None]]:
        """Avalanche's transform groups: ``dataset.train()`` augments, ``.eval()`` does not."""
        return {"train": (TrainTransform(self), None), "eval": (EvalTransform(self), None)}

    def _mode(self) -> Any:
        from torchvision.transforms import InterpolationMode

        return InterpolationMode(self.interpolation)

    def normalise(self, img: torch.Tensor) -> torch.Tensor:
        return (img.float().div(255.0) - self.mean) / self.std

    def eval_view(self, img: torch.Tensor) -> torch.Tensor:
        """Shorter side to size / crop_pct, then the centre crop of ``size``."""
        import torchvision.transforms.v2.functional as TF

        h, w = self.size
        if h == w:
            img = TF.resize(img, [math.floor(h / self.crop_pct)], self._mode(), antialias=True)
        else:
            scaled = [math.floor(h / self.crop_pct), math.floor(w / self.crop_pct)]
            img = TF.resize(img, scaled, self._mode(), antialias=True)
        return self.normalise(TF.center_crop(img, [h, w]))

    def train_view(self, img: torch.Tensor) -> torch.Tensor:
        """A random resized crop and a horizontal flip (torch's RNG), or the eval view."""
        import torchvision.transforms.v2.functional as TF
        from torchvision.transforms import RandomResizedCrop

        if not self.augment:
            return self.eval_view(img)
        top, left, h, w = RandomResizedCrop.get_params(img, list(self.crop_scale), CROP_RATIO)
        img = TF.resized_crop(img, top, left, h, w, list(self.size), self._mode(), antialias=True)
        if torch.rand(1).item() < 0.5:
            img = TF.horizontal_flip(img)
        return self.normalise(img)


class TrainTransform:
    """The training view of :class:`ImagePipeline` (an Avalanche transform)."""

    def __init__(self, pipeline: ImagePipeline) -> None:
        self.pipeline = pipeline

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return self.pipeline.train_view(img)


class EvalTransform:
    """The evaluation view of :class:`ImagePipeline` (an Avalanche transform)."""

    def __init__(self, pipeline: ImagePipeline) -> None:
        self.pipeline = pipeline

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return self.pipeline.eval_view(img)


# ------------------------------------------------------------------------ datasets
class ImageFiles(Dataset):
    """Images read lazily: ``(uint8 (3, H, W) tensor, label)``, converted to RGB."""

    def __init__(self, paths: list[Path], targets: list[int]) -> None:
        self.paths = paths
        self.targets = list(targets)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        import torchvision.transforms.v2.functional as TF
        from PIL import Image

        path = self.paths[i]
        try:
            with Image.open(path) as im:
                img = TF.pil_to_tensor(im.convert("RGB"))
        except Exception as e:  # missing, truncated, not an image, a decompression bomb
            raise ClbenchError(
                f"cannot read image {path} ({type(e).__name__}: {first_line(e)}); replace or "
                "delete the file"
            ) from None
        return img, self.targets[i]


class ImageArrays(Dataset):
    """Images held in memory as uint8 (N, H, W, 3): ``(uint8 (3, H, W) tensor, label)``."""

    def __init__(self, images: np.ndarray, targets: list[int]) -> None:
        self.images = images
        self.targets = list(targets)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1), (
            self.targets[i]
        )


def as_dataset(part: tuple[Any, list[int]]) -> Dataset:
    images, labels = part
    if isinstance(images, np.ndarray):
        return ImageArrays(images, labels)
    return ImageFiles(list(images), labels)


# ------------------------------------------------------------------------ configs
@dataclass
class ImageScenarioConfig:
    """Options every class-incremental image scenario shares (conf/scenario/NAME.yaml)."""

    name: str = "???"
    root: str = ""  # the data set's folder (required)
    n_experiences: int = 10
    init_cls: int = 0  # classes of the first experience (0: even split); PILOT's init_cls
    increment: int = 0  # classes of each later experience (0: from n_experiences)
    shuffle: bool = True  # PILOT's "shuffle": permute the classes with class_order_seed
    class_order_seed: int = 1993
    augment: bool = True  # PILOT's training crop and flip; false: the eval view
    crop_scale: list[float] = field(default_factory=lambda: [0.05, 1.0])
    crop_pct: float = PILOT_CROP_PCT  # eval: resize to size / crop_pct, centre crop; 0: backbone's
    num_workers: int = 4  # processes reading images (0: in the main process)

    #: the layout expected under root (for the error when root is missing)
    LAYOUT: ClassVar[str] = "the data set's folder"

    def __post_init__(self) -> None:
        for key in ("n_experiences", "init_cls", "increment", "num_workers"):
            check_positive(f"scenario.{key}", getattr(self, key), allow_zero=True)
        check_seed("scenario.class_order_seed", self.class_order_seed)
        scale = list(self.crop_scale)
        if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ConfigError(
                f"invalid value for scenario.crop_scale: {scale}; give [lo, hi] with "
                "0 < lo <= hi <= 1 (PILOT: [0.05, 1.0]; torchvision's default: [0.08, 1.0])"
            )
        check_range("scenario.crop_pct", self.crop_pct, 0.0, 1.0)
        if not self.root:
            raise ConfigError(
                f"scenario {self.name} needs its data: set scenario.root=DIR ({self.LAYOUT})"
            )

    def pipeline(self) -> ImagePipeline:
        return ImagePipeline(self.augment, (self.crop_scale[0], self.crop_scale[1]), self.crop_pct)


def pilot_class_order(n_classes: int, shuffle: bool = True, seed: int = 1993) -> list[int]:
    """PILOT's class order (utils/data_manager.py): ``np.random.seed(seed);
    np.random.permutation(n)`` (the legacy global RNG, here a RandomState of the same seed,
    which gives the same permutation without touching numpy's global state), or 0..n-1."""
    if not shuffle:
        return list(range(n_classes))
    return np.random.RandomState(seed).permutation(n_classes).tolist()


def set_loader_workers(benchmark: Any, num_workers: int) -> None:
    """Tell the strategies' lazy loaders how many processes read images: every experience
    carries ``loader_workers`` (``CLStrategy.make_train_dataloader`` reads it)."""
    for stream in benchmark.streams.values():
        for exp in stream:
            exp.loader_workers = num_workers


def _check_classes(data: ImageSet, name: str) -> None:
    n = len(data.class_names)
    for (_, labels), what in ((data.train, "training"), (data.test, "test")):
        missing = sorted(set(range(n)) - set(labels))
        if missing:
            shown = ", ".join(data.class_names[c] for c in missing[:3])
            raise ConfigError(
                f"scenario {name}: {len(missing)} class(es) have no {what} image ({shown}"
                f"{'...' if len(missing) > 3 else ''}); every class needs {what} images"
            )


def class_incremental_images(name: str, cfg: ImageScenarioConfig, data: ImageSet) -> Scenario:
    """A class-incremental scenario over ``data``: PILOT's class order and split."""
    n = len(data.class_names)
    _check_classes(data, name)
    sizes = class_split(n, cfg.n_experiences, cfg.init_cls, cfg.increment)
    order = pilot_class_order(n, cfg.shuffle, cfg.class_order_seed)
    pipeline = cfg.pipeline()
    benchmark = class_incremental_from_datasets(
        {"train": as_dataset(data.train), "test": as_dataset(data.test)},
        order,
        sizes,
        transform_groups=pipeline.transform_groups(),
    )
    set_loader_workers(benchmark, cfg.num_workers)
    return Scenario(
        name=name,
        kind="class_incremental",
        benchmark=benchmark,
        class_names=[data.class_names[c] for c in order],
        input_shape=pipeline.input_shape,
        in_memory=False,
        inputs=pipeline,
    )


# ------------------------------------------------------------------------ split_cifar100
@dataclass
class SplitCifar100Config(ImageScenarioConfig):
    name: str = "split_cifar100"
    # fetch and verify torchvision's CIFAR-100 archive into root first (a connected machine)
    download: bool = False

    LAYOUT: ClassVar[str] = CIFAR_LAYOUT


def download_cifar100(root: str) -> None:
    """Fetch torchvision's CIFAR-100 archive into ``root`` unless its files are there and
    pass their MD5 checks (torchvision's URL and checksums; nothing is unpickled here)."""
    from torchvision.datasets import CIFAR100
    from torchvision.datasets.utils import check_integrity, download_and_extract_archive

    folder = Path(root).expanduser() / CIFAR100.base_folder
    meta = [CIFAR100.meta["filename"], CIFAR100.meta["md5"]]
    files = [*CIFAR100.train_list, *CIFAR100.test_list, meta]
    if all(check_integrity(str(folder / f), md5) for f, md5 in files):
        return
    try:
        download_and_extract_archive(
            CIFAR100.url,
            str(Path(root).expanduser()),
            filename=CIFAR100.filename,
            md5=CIFAR100.tgz_md5,
        )
    except Exception as e:  # offline, refused, a bad checksum
        raise ClbenchError(
            f"cannot download CIFAR-100 into {root} ({type(e).__name__}: {first_line(e)}); "
            "download it on a connected machine, or set scenario.download=false and "
            f"scenario.root to a folder holding {CIFAR_LAYOUT}"
        ) from None


def split_cifar100(cfg: SplitCifar100Config) -> Scenario:
    """Split CIFAR-100 (50,000 / 10,000 32x32 images, 100 classes) resized to the
    backbone's input: 10 x 10 by default."""
    if cfg.download:
        download_cifar100(cfg.root)
    return class_incremental_images("split_cifar100", cfg, read_cifar100(cfg.root))


split_cifar100.Config = SplitCifar100Config  # type: ignore[attr-defined]


# ------------------------------------------------------------------------ imagenet_r
@dataclass
class ImageNetRConfig(ImageScenarioConfig):
    name: str = "imagenet_r"
    # without train/ and test/ folders: each class's images split with this seed
    test_fraction: float = 0.2
    split_seed: int = 1993

    LAYOUT: ClassVar[str] = (
        "ROOT/imagenet-r/<wnid>/<image>, or pre-split ROOT/imagenet-r/{train,test}/<wnid>/<image>"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("scenario.test_fraction", self.test_fraction, 0.05, 0.95)
        check_seed("scenario.split_seed", self.split_seed)


def imagenet_r(cfg: ImageNetRConfig) -> Scenario:
    """ImageNet-R (30,000 renditions of 200 ImageNet classes): 80/20 train/test, 10 x 20."""
    data = read_imagenet_r(cfg.root, cfg.test_fraction, cfg.split_seed)
    return class_incremental_images("imagenet_r", cfg, data)


imagenet_r.Config = ImageNetRConfig  # type: ignore[attr-defined]


# ------------------------------------------------------------------------ cub200
@dataclass
class Cub200Config(ImageScenarioConfig):
    name: str = "cub200"

    LAYOUT: ClassVar[str] = (
        "ROOT/CUB_200_2011/{images/<class>/<image>, images.txt, image_class_labels.txt, "
        "train_test_split.txt, classes.txt}"
    )


def cub200(cfg: Cub200Config) -> Scenario:
    """CUB-200-2011 (11,788 bird images, 200 species) with its official train/test split."""
    return class_incremental_images("cub200", cfg, read_cub200(cfg.root))


cub200.Config = Cub200Config  # type: ignore[attr-defined]


# ------------------------------------------------------------------------ domainnet
@dataclass
class DomainNetConfig(ImageScenarioConfig):
    name: str = "domainnet"
    n_experiences: int = 5  # by_class: 345 classes in 5 x 69 (CODA-Prompt, InfLoRA)
    domains: list[str] = field(default_factory=lambda: list(DOMAINS))
    ordering: str = "by_class"

    LAYOUT: ClassVar[str] = (
        "ROOT/<domain>/<class>/<image> and ROOT/<domain>_train.txt, ROOT/<domain>_test.txt"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("scenario.ordering", self.ordering, ORDERINGS)
        domains = list(self.domains)
        for d in domains:
            check_choice("scenario.domains", d, DOMAINS)
        if not domains or len(set(domains)) != len(domains):
            raise ConfigError(
                f"invalid value for scenario.domains: {domains}; name each domain once, "
                f"from {', '.join(DOMAINS)}"
            )
        if self.ordering == "by_domain" and (self.init_cls or self.increment):
            raise ConfigError(
                "scenario.init_cls / scenario.increment split classes: with "
                "scenario.ordering=by_domain each experience is one domain with every "
                "class; set them to 0"
            )


def domainnet(cfg: DomainNetConfig) -> Scenario:
    """DomainNet (six domains, 345 classes): the chosen domains pooled and split by class
    (``by_class``, class-incremental), or one experience per domain with every class
    (``by_domain``, domain-incremental: the head has every class from the first experience)."""
    domains = list(cfg.domains)
    sets, class_names = read_domainnet(cfg.root, domains)
    name = "domainnet" if set(domains) == set(DOMAINS) else "domainnet_" + "_".join(domains)
    if cfg.ordering == "by_class":
        pooled = ImageSet(
            train=_pool([s.train for s in sets.values()]),
            test=_pool([s.test for s in sets.values()]),
            class_names=class_names,
        )
        return class_incremental_images(name, cfg, pooled)
    return _domain_incremental(name, cfg, sets, class_names)


def _pool(parts: list[tuple[Any, list[int]]]) -> tuple[list[Path], list[int]]:
    return [p for images, _ in parts for p in images], [y for _, labels in parts for y in labels]


def _domain_incremental(
    name: str, cfg: DomainNetConfig, sets: dict[str, ImageSet], class_names: list[str]
) -> Scenario:
    """One experience per domain (in ``cfg.domains`` order), labels = the split files'."""
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
    from avalanche.benchmarks.utils.classification_dataset import (
        _as_taskaware_supervised_classification_dataset as wrap,
    )

    pipeline = cfg.pipeline()
    groups = pipeline.transform_groups()
    benchmark = with_classes_timeline(
        benchmark_from_datasets(
            train=[wrap(as_dataset(s.train), transform_groups=groups) for s in sets.values()],
            test=[wrap(as_dataset(s.test), transform_groups=groups) for s in sets.values()],
        )
    )
    set_loader_workers(benchmark, cfg.num_workers)
    return Scenario(
        name=name,
        kind="class_incremental",
        benchmark=benchmark,
        class_names=class_names,
        input_shape=pipeline.input_shape,
        in_memory=False,
        inputs=pipeline,
    )


domainnet.Config = DomainNetConfig  # type: ignore[attr-defined]
