"""``imagefolder_forget``: continual forgetting on a local image-folder dataset.

The layouts of the continual-forgetting papers, read lazily (one image at a time, so a
real ImageNet-100 never sits in memory):

- CASIA-Face-100 (GS-LoRA's face data): ``ROOT/train/<class>/<image>`` and
  ``ROOT/test/<class>/<image>``; the classes are every folder of ``train``, sorted;
- ImageNet-100: an ImageFolder tree ``ROOT/train/<wnid>/...`` and ``ROOT/val/<wnid>/...``
  (``test_dir=val``) plus a class-list file, one folder name per line, that selects the
  classes out of more folders; its line order gives the class index.

Class index c is the c-th class (sorted folder names: torchvision's ImageFolder
convention, or the class list's order); the images of a class are every file with an
image suffix under its folder (subfolders included), in sorted order. Each image is
converted to RGB, resized (``resize``: shorter side, then a centre crop to
``image_size``; 0: straight to ``image_size`` x ``image_size``), scaled to [0, 1] and
normalised with ``mean`` / ``std``. No random augmentation.

The start model (trained on every class elsewhere) is a local safetensors file of
``ClassifierModel.state_dict()`` (``start_checkpoint``), loaded by
:func:`clbench.pretrain.source.start_classifier`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from clbench.scenarios.base import Scenario
from clbench.scenarios.forgetting import ForgettingConfig, forgetting_scenario
from torch.utils.data import Dataset

from clbench.checks import check_positive
from clbench.errors import ClbenchError, ConfigError, first_line

#: what counts as an image (torchvision's ImageFolder extensions)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class ImageFolderForgetConfig(ForgettingConfig):
    name: str = "imagefolder_forget"
    per_request: int = 20  # GS-LoRA's continual setting on 100 classes: 4 requests of 20
    root: str = ""  # the dataset folder (required)
    train_dir: str = "train"  # under root: <class>/<image>
    test_dir: str = "test"  # under root (ImageNet: val)
    # a file of folder names, one a line (its order gives the class index; a relative path
    # is looked up under root, then in the working directory); "": every folder of
    # train_dir, sorted (ImageFolder's convention)
    class_list: str = ""
    image_size: int = 112  # the model input: 3 x image_size x image_size
    resize: int = 0  # > 0: shorter side to this, then a centre crop; 0: resize directly
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    # the classifier trained on every class: a safetensors file of
    # ClassifierModel.state_dict() for the run's backbone (required)
    start_checkpoint: str = ""
    # names the data in the scenario's name (boards never mix data sets); "": root's name
    dataset: str = ""
    num_workers: int = 4  # processes reading images (0: in the main process)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("scenario.image_size", self.image_size)
        check_positive("scenario.resize", self.resize, allow_zero=True)
        check_positive("scenario.num_workers", self.num_workers, allow_zero=True)
        if 0 < self.resize < self.image_size:
            raise ConfigError(
                f"invalid value for scenario.resize: {self.resize}; the centre crop of "
                f"{self.image_size} needs resize >= image_size (or 0: resize directly)"
            )
        for key in ("mean", "std"):
            values = getattr(self, key)
            if len(values) != 3:
                raise ConfigError(
                    f"invalid value for scenario.{key}: {list(values)}; give 3 values (R, G, B)"
                )
        if min(self.std) <= 0:
            raise ConfigError(f"invalid value for scenario.std: {list(self.std)}; must be > 0")
        if not self.root:
            raise ConfigError(
                "scenario imagefolder_forget needs its data: set scenario.root=DIR "
                f"({self.train_dir}/<class>/<image> and {self.test_dir}/<class>/<image>)"
            )
        if not self.start_checkpoint:
            raise ConfigError(
                "scenario imagefolder_forget needs its start model: set "
                "scenario.start_checkpoint=FILE (a safetensors file of "
                "ClassifierModel.state_dict(), trained on every class)"
            )


class FolderImages(Dataset):
    """Images read lazily from files, resized and normalised (see the module docstring)."""

    def __init__(
        self,
        paths: list[Path],
        targets: list[int],
        image_size: int,
        resize: int,
        mean: list[float],
        std: list[float],
    ) -> None:
        self.paths = paths
        self.targets = targets
        self.image_size = image_size
        self.resize = resize
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        import torchvision.transforms.v2.functional as TF
        from PIL import Image

        path, size = self.paths[i], self.image_size
        try:
            with Image.open(path) as im:
                img = TF.pil_to_tensor(im.convert("RGB"))
        except Exception as e:  # missing, truncated, not an image, a decompression bomb
            raise ClbenchError(
                f"cannot read image {path} ({type(e).__name__}: {first_line(e)}); replace or "
                "delete the file"
            ) from None
        if self.resize:
            img = TF.resize(img, [self.resize], antialias=True)
            img = TF.center_crop(img, [size, size])
        elif tuple(img.shape[-2:]) != (size, size):
            img = TF.resize(img, [size, size], antialias=True)
        return (img.float().div(255.0) - self.mean) / self.std, self.targets[i]


def _folder(path: Path, what: str, fix: str) -> Path:
    if not path.is_dir():
        raise ClbenchError(f"missing {what} {path}; {fix}")
    return path


def read_class_list(file: Path) -> list[str]:
    """The folder names of a class-list file: one a line (blank lines and ``#`` comments
    skipped), no repeats."""
    try:
        lines = file.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ClbenchError(f"cannot read class list {file} ({first_line(e)})") from None
    names: list[str] = []
    for n, line in enumerate(lines, 1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        if name in names:
            raise ClbenchError(f"class list {file} names {name!r} twice (line {n}); remove one")
        names.append(name)
    if not names:
        raise ClbenchError(f"class list {file} names no class; write one folder name per line")
    return names


def find_classes(cfg: ImageFolderForgetConfig, root: Path, train: Path) -> list[str]:
    """The class folder names in class-index order (the class list, or train's folders)."""
    if not cfg.class_list:
        names = sorted(p.name for p in train.iterdir() if p.is_dir())
        if not names:
            raise ClbenchError(f"{train} has no class folders; expected {train}/<class>/<image>")
        return names
    listed = Path(cfg.class_list).expanduser()
    file = listed if listed.is_absolute() or not (root / listed).is_file() else root / listed
    if not file.is_file():
        raise ClbenchError(
            f"class list not found: {cfg.class_list} (looked in {root} and the working "
            "directory); set scenario.class_list=FILE (one folder name per line), or "
            f"scenario.class_list='' for every folder of {train}"
        )
    names = read_class_list(file)
    for name in names:
        if not (train / name).is_dir():
            raise ClbenchError(
                f"class {name!r} of class list {file} has no folder {train / name}; fix the "
                "class list or the data"
            )
    return names


def scan_images(folder: Path, classes: list[str], what: str) -> tuple[list[Path], list[int]]:
    """(image paths, class indices) of ``folder/<class>/...`` for every class, in order."""
    paths: list[Path] = []
    targets: list[int] = []
    for index, name in enumerate(classes):
        class_dir = folder / name
        if not class_dir.is_dir():
            raise ClbenchError(
                f"class {name!r} has no {what} folder {class_dir}; every class needs {what} images"
            )
        found = [
            Path(top) / f
            for top, _, files in sorted(os.walk(class_dir, followlinks=True))
            for f in sorted(files)
            if f.lower().endswith(IMAGE_SUFFIXES)
        ]
        if not found:
            raise ClbenchError(
                f"{class_dir} has no images ({', '.join(IMAGE_SUFFIXES)}); every class needs "
                f"{what} images"
            )
        paths += found
        targets += [index] * len(found)
    return paths, targets


def dataset_label(cfg: ImageFolderForgetConfig, root: Path) -> str:
    """The data set's name in the scenario's name: ``dataset``, else root's folder name."""
    label = cfg.dataset or root.resolve().name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "data"


def imagefolder_forget(cfg: ImageFolderForgetConfig) -> Scenario:
    """Erasure requests over a local image-folder dataset (read lazily) and a start model
    from a local checkpoint."""
    root = _folder(
        Path(cfg.root).expanduser(), "dataset root", "set scenario.root=DIR (the dataset folder)"
    )
    layout = f"expected {root}/<dir>/<class>/<image>"
    train = _folder(root / cfg.train_dir, "train folder", f"{layout}; set scenario.train_dir")
    test = _folder(root / cfg.test_dir, "test folder", f"{layout}; set scenario.test_dir")
    start = Path(cfg.start_checkpoint).expanduser()
    if not start.is_file():
        raise ClbenchError(
            f"start model not found: {start}; set scenario.start_checkpoint=FILE (a "
            "safetensors file of ClassifierModel.state_dict(), trained on every class)"
        )
    classes = find_classes(cfg, root, train)

    def images(folder: Path, what: str) -> FolderImages:
        paths, targets = scan_images(folder, classes, what)
        return FolderImages(paths, targets, cfg.image_size, cfg.resize, cfg.mean, cfg.std)

    return forgetting_scenario(
        f"imagefolder_forget_{dataset_label(cfg, root)}",
        cfg,
        images(train, "training"),
        images(test, "test"),
        class_names=classes,
        input_shape=(3, cfg.image_size, cfg.image_size),
        start_checkpoint=str(start),
        num_workers=cfg.num_workers,
    )


imagefolder_forget.Config = ImageFolderForgetConfig  # type: ignore[attr-defined]
