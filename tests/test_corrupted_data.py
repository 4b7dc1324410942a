"""Readers of the corrupted benchmarks on small fixtures in the exact on-disk layouts."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from clbench.scenarios.corrupted_data import (
    generate_cifar_c,
    imagenet_c_samples,
    load_cifar_c,
    load_cifar_test,
)
from clbench.scenarios.corruptions import corrupt
from PIL import Image

from clbench.errors import ClbenchError


def test_cifar_c_npy_layout(tmp_path):
    n = 4  # per severity (10,000 in the released files)
    rng = np.random.default_rng(0)
    stacked = rng.integers(0, 256, (5 * n, 32, 32, 3), dtype=np.uint8)
    labels = np.tile(np.arange(n), 5).astype(np.uint8)  # the release stores uint8 labels
    np.save(tmp_path / "fog.npy", stacked)
    np.save(tmp_path / "labels.npy", labels)
    for severity in (1, 3, 5):
        x, y = load_cifar_c(tmp_path, "fog", severity)
        assert np.array_equal(x, stacked[(severity - 1) * n : severity * n])
        assert y.dtype == np.int64 and list(y) == list(range(n))
    with pytest.raises(ClbenchError, match=r"snow\.npy"):
        load_cifar_c(tmp_path, "snow", 1)
    with pytest.raises(ClbenchError, match="valid: 1, 2, 3, 4, 5"):
        load_cifar_c(tmp_path, "fog", 0)
    np.save(tmp_path / "labels.npy", labels[:-1])
    with pytest.raises(ClbenchError, match="same count"):
        load_cifar_c(tmp_path, "fog", 1)


def _cifar_root(tmp_path, dataset: str, n: int = 6):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = list(range(n))
    if dataset == "cifar10":
        folder, name, key = tmp_path / "cifar-10-batches-py", "test_batch", b"labels"
    else:
        folder, name, key = tmp_path / "cifar-100-python", "test", b"fine_labels"
    folder.mkdir()
    flat = images.transpose(0, 3, 1, 2).reshape(n, -1)  # rows of R plane, G plane, B plane
    with (folder / name).open("wb") as f:
        pickle.dump({b"data": flat, key: labels}, f)
    return images, labels


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_python_release_and_generated_c(tmp_path, dataset):
    images, labels = _cifar_root(tmp_path, dataset)
    x, y = load_cifar_test(tmp_path, dataset)
    assert np.array_equal(x, images) and list(y) == labels
    xc, yc = generate_cifar_c(tmp_path, "gaussian_noise", 5, seed=0, dataset=dataset)
    assert np.array_equal(xc, corrupt(images, "gaussian_noise", 5, 0))
    assert list(yc) == labels
    with pytest.raises(ClbenchError, match="missing"):
        load_cifar_test(tmp_path / "nowhere", dataset)


def test_imagenet_c_folder_layout(tmp_path):
    for wnid in ("n02", "n01"):
        d = tmp_path / "frost" / "5" / wnid
        d.mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(d / f"img{i}.JPEG")
        (d / "notes.txt").write_text("not an image")
    paths, targets, wnids = imagenet_c_samples(tmp_path, "frost", 5)
    assert wnids == ["n01", "n02"]
    assert [p.parent.name for p in paths] == ["n01", "n01", "n02", "n02"]
    assert targets == [0, 0, 1, 1]
    with pytest.raises(ClbenchError, match="frost/4"):
        imagenet_c_samples(tmp_path, "frost", 4)
