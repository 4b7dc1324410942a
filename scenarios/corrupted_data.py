"""Readers for the corrupted-image benchmarks, from local files in their released layouts.

- :func:`load_cifar_c`: CIFAR-10-C / CIFAR-100-C as released (the layout RobustBench
  reads): ``ROOT/<corruption>.npy`` holds the 5 severities one after the other (uint8,
  (5 n, 32, 32, 3); n = 10,000 for the real files) and ``ROOT/labels.npy`` the labels.
- :func:`load_cifar_test` + :func:`generate_cifar_c`: CIFAR-10 / CIFAR-100 test images from
  the torchvision root layout (``cifar-10-batches-py/test_batch`` or
  ``cifar-100-python/test``, the python-pickle release), corrupted by
  ``scenarios/corruptions.py`` instead of downloaded.
- :func:`imagenet_c_samples`: the ImageNet-C folder layout
  ``ROOT/<corruption>/<severity>/<wnid>/<image>``; class index = position of the wnid in
  the sorted list of wnids (ImageFolder's convention).

Nothing here downloads: a missing file is one :class:`~clbench.errors.ClbenchError` line
naming the path and what was expected there.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
from clbench.scenarios.corruptions import CORRUPTIONS, corrupt
from clbench.scenarios.imagesets import CifarUnpickler

from clbench.errors import ClbenchError, first_line

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def _check_corruption(name: str, severity: int) -> None:
    if name not in CORRUPTIONS:
        raise ClbenchError(f"unknown corruption {name!r}; valid: {', '.join(CORRUPTIONS)}")
    if not 1 <= severity <= 5:
        raise ClbenchError(f"invalid severity {severity}; valid: 1, 2, 3, 4, 5")


def load_cifar_c(root: str | Path, corruption: str, severity: int) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, 32, 32, 3) uint8, labels (n,) int64) of one corruption and severity."""
    _check_corruption(corruption, severity)
    root = Path(root).expanduser()
    data_path, label_path = root / f"{corruption}.npy", root / "labels.npy"
    for p in (data_path, label_path):
        if not p.is_file():
            raise ClbenchError(
                f"missing {p}: expected the released CIFAR-10-C / CIFAR-100-C layout "
                "(<corruption>.npy with the 5 severities stacked, and labels.npy)"
            )
    data, labels = _load_npy(data_path, mmap=True), _load_npy(label_path)
    if data.ndim != 4 or data.shape[-1] != 3 or labels.ndim != 1:
        raise ClbenchError(
            f"{data_path} holds images of shape {data.shape[1:]} and labels.npy "
            f"{labels.shape}: expected (5 n, H, W, 3) images and (5 n,) labels"
        )
    if len(data) != len(labels) or len(data) % 5:
        raise ClbenchError(
            f"{data_path} has {len(data)} images and labels.npy {len(labels)}: expected the "
            "same count, 5 severities of equal size"
        )
    n = len(data) // 5
    part = slice((severity - 1) * n, severity * n)
    return np.ascontiguousarray(data[part]), labels[part].astype(np.int64)


def _load_npy(path: Path, mmap: bool = False) -> np.ndarray:
    """A numeric .npy array; object arrays (pickles) are refused, in one line."""
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        why = " ".join(str(e).split())
        if "pickle" in why or "Python objects" in why:
            why = "it holds Python objects (a pickle), which are never loaded"
        raise ClbenchError(f"cannot read {path}: {why}; expected a numeric .npy array") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biu":
        raise ClbenchError(
            f"cannot read {path}: it holds {getattr(array, 'dtype', type(array).__name__)} "
            "values; expected an integer .npy array (uint8 images, integer labels)"
        )
    return array


def _unpickle_cifar(path: Path) -> object:
    try:
        with path.open("rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # numpy.core in numpy 2
            return CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise ClbenchError(
            f"cannot read {path}: {first_line(e)}; expected the CIFAR python release "
            "(a pickled dict)"
        ) from None
    except OSError as e:
        raise ClbenchError(f"cannot read {path}: {e.strerror or e}") from None


def load_cifar_test(root: str | Path, dataset: str = "cifar10") -> tuple[np.ndarray, np.ndarray]:
    """CIFAR test images (n, 32, 32, 3) uint8 and labels from a torchvision root.

    The files are the official python release (pickles), read with an unpickler that
    builds only what a CIFAR batch holds and refuses anything else (:class:`_CifarUnpickler`).
    """
    root = Path(root).expanduser()
    if dataset == "cifar10":
        path, key = root / "cifar-10-batches-py" / "test_batch", b"labels"
    elif dataset == "cifar100":
        path, key = root / "cifar-100-python" / "test", b"fine_labels"
    else:
        raise ClbenchError(f"unknown CIFAR dataset {dataset!r}; valid: cifar10, cifar100")
    if not path.is_file():
        raise ClbenchError(
            f"missing {path}: expected torchvision's {dataset} root (the python release, "
            "as torchvision.datasets downloads it)"
        )
    entry = _unpickle_cifar(path)
    bad = ClbenchError(
        f"{path} is not a CIFAR batch: expected a dict with {b'data'!r} (n x 3072 uint8) "
        f"and {key!r} (n labels)"
    )
    if not isinstance(entry, dict) or b"data" not in entry or key not in entry:
        raise bad
    try:
        data = np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(entry[key], dtype=np.int64)
    except (TypeError, ValueError):
        raise bad from None
    if labels.shape != (len(data),):
        raise bad
    return data.transpose(0, 2, 3, 1).copy(), labels


def generate_cifar_c(
    root: str | Path, corruption: str, severity: int, seed: int, dataset: str = "cifar10"
) -> tuple[np.ndarray, np.ndarray]:
    """The CIFAR test set under ``corruption`` at ``severity`` (our generator, seeded)."""
    _check_corruption(corruption, severity)
    images, labels = load_cifar_test(root, dataset)
    return corrupt(images, corruption, severity, seed), labels


def imagenet_c_samples(
    root: str | Path, corruption: str, severity: int
) -> tuple[list[Path], list[int], list[str]]:
    """(image paths, class indices, sorted wnids) of one ImageNet-C corruption/severity."""
    _check_corruption(corruption, severity)
    folder = Path(root).expanduser() / corruption / str(severity)
    if not folder.is_dir():
        raise ClbenchError(
            f"missing {folder}: expected the ImageNet-C layout "
            "<root>/<corruption>/<severity>/<wnid>/<image>"
        )
    wnids = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not wnids:
        raise ClbenchError(f"{folder} has no class folders (<wnid>/)")
    paths, targets = [], []
    for index, wnid in enumerate(wnids):
        for p in sorted((folder / wnid).iterdir()):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(p)
                targets.append(index)
    return paths, targets, wnids
