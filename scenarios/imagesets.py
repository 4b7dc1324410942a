"""Readers of the class-incremental image benchmarks in their released on-disk layouts.

Each reader returns an :class:`ImageSet` (train and test samples, class names by class id)
and nothing here downloads, decodes an image or unpickles anything but CIFAR's arrays: a
missing or malformed root is one :class:`~clbench.errors.ConfigError` line naming the path
and the layout expected there. The layouts (docs: "Class-incremental image benchmarks"):

- CIFAR-100: torchvision's root, ``ROOT/cifar-100-python/{train,test,meta}`` (the python
  release: pickled dicts), read with an allow-listed unpickler (:class:`CifarUnpickler`);
- ImageNet-R: ``ROOT[/imagenet-r]/<wnid>/<image>`` split 80/20 from a seed, or pre-split
  ``ROOT[/imagenet-r]/{train,test}/<wnid>/<image>`` (the folders PILOT and InfLoRA read);
- CUB-200-2011: ``ROOT[/CUB_200_2011]/{images/<class>/<image>, images.txt,
  image_class_labels.txt, train_test_split.txt, classes.txt}``;
- DomainNet: ``ROOT/<domain>/<class>/<image>`` with the split files
  ``ROOT/<domain>_{train,test}.txt`` (lines ``<domain>/<class>/<image> <label>``).
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clbench.errors import ConfigError, first_line

#: what counts as an image file (torchvision's ImageFolder extensions)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")


@dataclass
class ImageSet:
    """The samples of one benchmark: ``train`` / ``test`` are ``(images, labels)`` where
    images is a list of file paths or a uint8 array (N, H, W, 3); labels are class ids
    (0-based, indices into ``class_names``)."""

    train: tuple[list[Path] | np.ndarray, list[int]]
    test: tuple[list[Path] | np.ndarray, list[int]]
    class_names: list[str]


def readable(name: str) -> str:
    """A class name as words: CUB's ``001.`` prefix dropped, underscores as spaces."""
    return re.sub(r"^\d+\.", "", name).replace("_", " ").strip()


def _layout_error(path: Path, what: str, layout: str) -> ConfigError:
    return ConfigError(f"{what} {path}; expected {layout} (set scenario.root=DIR)")


def _root(root: str, layout: str) -> Path:
    path = Path(root).expanduser()
    if not path.is_dir():
        raise _layout_error(path, "dataset root not found:", layout)
    return path


# ---------------------------------------------------------------------- CIFAR-100
CIFAR_LAYOUT = "ROOT/cifar-100-python/{train,test,meta} (torchvision's CIFAR-100 root)"


class CifarUnpickler(pickle.Unpickler):
    """Unpickles CIFAR's python-release files and nothing else.

    A file is a dict of bytes keys to lists, bytes and a uint8 numpy array, so the only
    callables it names are numpy's array rebuilders (and ``_codecs.encode(text, "latin1")``,
    how a protocol-2 pickle written by Python 3 stores bytes). Any other global
    (``os.system``, ``builtins.eval``...) is refused before it is looked up: nothing in the
    data is ever run.
    """

    ALLOWED: frozenset[tuple[str, str]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),  # the release (Python 2, numpy 1)
            ("numpy._core.multiarray", "_reconstruct"),  # pickled by numpy 2
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.numeric", "_frombuffer"),  # pickle protocol 5
            ("numpy._core.numeric", "_frombuffer"),
        }
    )

    def find_class(self, module: str, name: str) -> object:
        if (module, name) == ("_codecs", "encode"):
            return _latin1
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"refused to unpickle {module}.{name}: a CIFAR batch holds only dicts, lists, "
                "bytes, numbers and numpy arrays"
            )
        return super().find_class(module, name)

    def persistent_load(self, pid: object) -> object:
        raise pickle.UnpicklingError("refused a persistent id: not a CIFAR batch")


def _latin1(text: object, encoding: object) -> bytes:
    """``_codecs.encode(text, "latin1")``, the one call a protocol-2 pickle of bytes makes."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(
            f"refused to unpickle _codecs.encode(..., {encoding!r}): a CIFAR batch holds only "
            "dicts, lists, bytes, numbers and numpy arrays"
        )
    return text.encode("latin1")


def unpickle_cifar(path: Path) -> dict:
    """One CIFAR python-release file as a dict (bytes keys), through :class:`CifarUnpickler`."""
    if not path.is_file():
        raise _layout_error(path, "missing", CIFAR_LAYOUT)
    try:
        with path.open("rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # numpy.core in numpy 2
            entry = CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise ConfigError(
            f"cannot read {path}: {first_line(e)}; expected the CIFAR python release "
            "(a pickled dict)"
        ) from None
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(entry, dict):
        raise ConfigError(f"{path} holds a {type(entry).__name__}; expected a CIFAR dict")
    return entry


def _cifar_split(path: Path) -> tuple[np.ndarray, list[int]]:
    entry = unpickle_cifar(path)
    bad = ConfigError(
        f"{path} is not a CIFAR-100 file: expected a dict with b'data' (N x 3072 uint8) and "
        "b'fine_labels' (N labels in 0..99)"
    )
    if b"data" not in entry or b"fine_labels" not in entry:
        raise bad
    try:
        data = np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(entry[b"fine_labels"], dtype=np.int64)
    except (TypeError, ValueError):
        raise bad from None
    if labels.shape != (len(data),) or len(data) == 0 or labels.min() < 0 or labels.max() > 99:
        raise bad
    return np.ascontiguousarray(data.transpose(0, 2, 3, 1)), labels.tolist()


def read_cifar100(root: str) -> ImageSet:
    """CIFAR-100 from torchvision's root: 32x32 images kept in memory (uint8)."""
    folder = _root(root, CIFAR_LAYOUT) / "cifar-100-python"
    if not folder.is_dir():
        raise _layout_error(folder, "missing", CIFAR_LAYOUT)
    meta = unpickle_cifar(folder / "meta")
    names = meta.get(b"fine_label_names")
    if not isinstance(names, list) or len(names) != 100:
        raise ConfigError(
            f"{folder / 'meta'} has no b'fine_label_names' list of 100 names; expected the "
            "CIFAR-100 python release"
        )
    train, test = _cifar_split(folder / "train"), _cifar_split(folder / "test")
    decoded = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]
    return ImageSet(train, test, [readable(n) for n in decoded])


# ---------------------------------------------------------------------- ImageNet-R
IMAGENET_R_LAYOUT = (
    "ROOT/imagenet-r/<wnid>/<image> (or ROOT/<wnid>/<image>), or pre-split "
    "ROOT/imagenet-r/{train,test}/<wnid>/<image>"
)
_WNID_LINE = re.compile(r"^\s*(n\d{8})\s+(.+?)\s*$")


def class_folders(folder: Path, layout: str) -> list[str]:
    """The sorted class folder names under ``folder`` (ImageFolder's class order)."""
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(names) < 2:
        raise _layout_error(folder, f"found {len(names)} class folder(s) in", layout)
    return names


def folder_images(folder: Path) -> list[Path]:
    """Every image file under ``folder`` (subfolders too), in sorted order."""
    return [
        Path(top) / f
        for top, _, files in sorted(os.walk(folder, followlinks=True))
        for f in sorted(files)
        if f.lower().endswith(IMAGE_SUFFIXES)
    ]


def _scan(folder: Path, classes: list[str], layout: str) -> tuple[list[Path], list[int]]:
    paths: list[Path] = []
    labels: list[int] = []
    for c, name in enumerate(classes):
        found = folder_images(folder / name) if (folder / name).is_dir() else []
        if not found:
            raise _layout_error(folder / name, "no images in", layout)
        paths += found
        labels += [c] * len(found)
    return paths, labels


def wnid_names(folder: Path, wnids: list[str]) -> list[str]:
    """Readable names of ``wnids`` from the README.txt shipped in ``imagenet-r/`` (lines
    ``nXXXXXXXX name``); a wnid it does not name keeps the wnid."""
    mapping: dict[str, str] = {}
    for candidate in (folder / "README.txt", folder.parent / "README.txt"):
        if candidate.is_file():
            for line in candidate.read_text(errors="replace").splitlines():
                m = _WNID_LINE.match(line)
                if m:
                    mapping.setdefault(m.group(1), m.group(2))
            break
    return [readable(mapping.get(w, w)) for w in wnids]


def read_imagenet_r(root: str, test_fraction: float, split_seed: int) -> ImageSet:
    """ImageNet-R: pre-split train/test folders if present, else each class's images
    (sorted) split by ``np.random.RandomState(split_seed)``: ``round((1 - test_fraction)
    n)`` of a class's ``n`` images to train (at least one each side), the rest to test."""
    base = _root(root, IMAGENET_R_LAYOUT)
    if (base / "imagenet-r").is_dir():
        base = base / "imagenet-r"
    if (base / "train").is_dir() and (base / "test").is_dir():
        classes = class_folders(base / "train", IMAGENET_R_LAYOUT)
        if class_folders(base / "test", IMAGENET_R_LAYOUT) != classes:
            raise ConfigError(
                f"{base / 'train'} and {base / 'test'} hold different class folders; both "
                "need the same <wnid> folders"
            )
        train = _scan(base / "train", classes, IMAGENET_R_LAYOUT)
        test = _scan(base / "test", classes, IMAGENET_R_LAYOUT)
        return ImageSet(train, test, wnid_names(base, classes))
    classes = class_folders(base, IMAGENET_R_LAYOUT)
    rng = np.random.RandomState(split_seed)
    train: tuple[list[Path], list[int]] = ([], [])
    test: tuple[list[Path], list[int]] = ([], [])
    for c, name in enumerate(classes):
        found = folder_images(base / name)
        if len(found) < 2:
            raise _layout_error(
                base / name,
                f"{len(found)} image(s) (a class needs 2 or more to split) in",
                IMAGENET_R_LAYOUT,
            )
        order = rng.permutation(len(found))
        n_train = min(max(round((1.0 - test_fraction) * len(found)), 1), len(found) - 1)
        for part, idx in ((train, order[:n_train]), (test, order[n_train:])):
            part[0].extend(found[i] for i in sorted(idx))
            part[1].extend([c] * len(idx))
    return ImageSet(train, test, wnid_names(base, classes))


# ---------------------------------------------------------------------- CUB-200-2011
CUB_LAYOUT = (
    "ROOT/CUB_200_2011/{images/<class>/<image>, images.txt, image_class_labels.txt, "
    "train_test_split.txt, classes.txt} (ROOT may be CUB_200_2011 itself)"
)


def _id_table(path: Path, columns: int) -> dict[int, list[str]]:
    """``<id> <value>...`` lines of a CUB metadata file, by id."""
    if not path.is_file():
        raise _layout_error(path, "missing", CUB_LAYOUT)
    table: dict[int, list[str]] = {}
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=columns)
        if len(parts) != columns + 1 or not parts[0].isdigit():
            raise ConfigError(
                f"{path} line {n} is {line!r}; expected '<id> {'<value> ' * columns}'".rstrip()
            )
        table[int(parts[0])] = parts[1:]
    return table


def read_cub200(root: str) -> ImageSet:
    """CUB-200-2011 with its official train/test split (train_test_split.txt: 1 = train),
    class id = classes.txt id - 1. The text files are parsed here: Avalanche's CUB200 crops
    every image to its bounding box (which the class-incremental papers do not do) and
    needs bounding_boxes.txt."""
    base = _root(root, CUB_LAYOUT)
    if (base / "CUB_200_2011").is_dir():
        base = base / "CUB_200_2011"
    images = _id_table(base / "images.txt", 1)
    labels = _id_table(base / "image_class_labels.txt", 1)
    split = _id_table(base / "train_test_split.txt", 1)
    classes = _id_table(base / "classes.txt", 1)
    ids = sorted(classes)
    if ids != list(range(1, len(ids) + 1)) or len(ids) < 2:
        raise ConfigError(
            f"{base / 'classes.txt'} numbers its classes {ids[:3]}...; expected 1, 2, ..., N"
        )
    train: tuple[list[Path], list[int]] = ([], [])
    test: tuple[list[Path], list[int]] = ([], [])
    for image_id in sorted(images):
        if image_id not in labels or image_id not in split:
            raise ConfigError(
                f"image {image_id} of {base / 'images.txt'} is missing from "
                "image_class_labels.txt or train_test_split.txt"
            )
        label, flag = labels[image_id][0], split[image_id][0]
        if not label.isdigit() or int(label) not in classes or flag not in ("0", "1"):
            raise ConfigError(
                f"image {image_id}: class {label!r}, split flag {flag!r}; expected a class id "
                "of classes.txt and 0 (test) or 1 (train)"
            )
        path = base / "images" / images[image_id][0]
        part = train if flag == "1" else test
        part[0].append(path)
        part[1].append(int(label) - 1)
    for part, what in ((train, "training"), (test, "test")):
        if not part[0]:
            raise ConfigError(f"{base / 'train_test_split.txt'} lists no {what} image")
    missing = next((p for p in train[0] + test[0] if not p.is_file()), None)
    if missing is not None:
        raise _layout_error(missing, "missing image", CUB_LAYOUT)
    return ImageSet(train, test, [readable(classes[i][0]) for i in ids])


# ---------------------------------------------------------------------- DomainNet
DOMAINNET_LAYOUT = (
    "ROOT/<domain>/<class>/<image> and the split files ROOT/<domain>_train.txt, "
    "ROOT/<domain>_test.txt (lines '<domain>/<class>/<image> <label>')"
)


def _split_file(path: Path, names: dict[int, str]) -> tuple[list[Path], list[int]]:
    """The (paths, labels) a DomainNet split file lists; ``names``: label -> class folder,
    filled and checked as lines are read."""
    if not path.is_file():
        raise _layout_error(path, "missing split file", DOMAINNET_LAYOUT)
    root = path.parent
    paths: list[Path] = []
    labels: list[int] = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        rel = Path(parts[0]) if parts else Path()
        if len(parts) != 2 or not parts[1].isdigit() or len(rel.parts) < 3:
            raise ConfigError(
                f"{path} line {n} is {line!r}; expected '<domain>/<class>/<image> <label>'"
            )
        label, folder = int(parts[1]), rel.parts[-2]
        if names.setdefault(label, folder) != folder:
            raise ConfigError(
                f"{path} line {n} gives label {label} to class {folder!r}, elsewhere to "
                f"{names[label]!r}; one label per class folder"
            )
        paths.append(root / rel)
        labels.append(label)
    if not paths:
        raise ConfigError(f"{path} lists no image; expected {DOMAINNET_LAYOUT}")
    return paths, labels


def read_domainnet(root: str, domains: list[str]) -> tuple[dict[str, ImageSet], list[str]]:
    """Each chosen domain's train / test samples (the official split files) and the class
    names by label (the class folders the split files name)."""
    base = _root(root, DOMAINNET_LAYOUT)
    names: dict[int, str] = {}
    per_domain: dict[str, tuple] = {}
    for d in domains:
        if not (base / d).is_dir():
            raise _layout_error(base / d, "missing domain folder", DOMAINNET_LAYOUT)
        per_domain[d] = (
            _split_file(base / f"{d}_train.txt", names),
            _split_file(base / f"{d}_test.txt", names),
        )
    labels = sorted(names)
    if labels != list(range(len(labels))):
        gap = next(i for i in range(len(labels) + 1) if i not in names)
        raise ConfigError(
            f"the split files of {', '.join(domains)} under {base} name labels "
            f"{labels[0]}..{labels[-1]} but not {gap}; expected labels 0..N-1, one per class"
        )
    class_names = [readable(names[i]) for i in labels]
    sets = {d: ImageSet(train, test, class_names) for d, (train, test) in per_domain.items()}
    return sets, class_names


def first_missing(paths: list[Path]) -> Path | None:
    """The first of ``paths`` that is not a file (None: all there)."""
    return next((p for p in paths if not p.is_file()), None)
