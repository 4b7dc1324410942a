"""The 15 corruptions x 5 severities (scenarios/corruptions.py): shape, dtype and range
kept, seeded, stronger with severity; the fast paths equal their scipy references."""

from __future__ import annotations

import itertools
import os

import matplotlib
import numpy as np
import pytest
from clbench.scenarios import corruptions as C
from PIL import Image
from scipy import ndimage

#: corruptions whose published CIFAR parameters do not make the pixel distance grow at
#: every step (see test_non_monotone_corruptions_follow_their_parameters)
NOT_STEPWISE = {"glass_blur", "frost", "elastic_transform"}


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """60 natural 32x32 RGB crops of the photograph that ships with matplotlib."""
    path = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    a = np.asarray(Image.open(path).convert("RGB"))
    rng = np.random.default_rng(0)
    out = []
    for _ in range(60):
        s = int(rng.integers(64, 256))
        y, x = rng.integers(0, a.shape[0] - s), rng.integers(0, a.shape[1] - s)
        crop = Image.fromarray(a[y : y + s, x : x + s]).resize((32, 32), Image.BILINEAR)
        out.append(np.asarray(crop))
    return np.stack(out)


def _distances(x: np.ndarray, name: str) -> list[float]:
    return [float(np.abs(C.corrupt(x, name, s, 0).astype(float) - x).mean()) for s in range(1, 6)]


@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_shape_dtype_range_and_seed(images, name):
    for severity in (1, 5):
        y = C.corrupt(images, name, severity, seed=3)
        assert y.shape == images.shape and y.dtype == np.uint8
        assert y.min() >= 0 and y.max() <= 255
        assert np.array_equal(y, C.corrupt(images, name, severity, seed=3))
    grey = images[..., :1]
    assert C.corrupt(grey, name, 3, seed=0).shape == grey.shape


@pytest.mark.parametrize("name", [n for n in C.CORRUPTIONS if n not in NOT_STEPWISE])
def test_distance_grows_with_severity(images, name):
    d = _distances(images, name)
    assert all(b > a for a, b in itertools.pairwise(d)), d
    assert d[0] > 0


def test_non_monotone_corruptions_follow_their_parameters(images):
    """Glass blur and frost still grow from the mild to the strong end; elastic's published
    CIFAR parameters shrink the random affine part (8 % -> 3 % of the image size) while the
    fine elastic field grows, so its pixel distance falls with severity."""
    for name in ("glass_blur", "frost"):
        d = _distances(images, name)
        assert min(d[3:]) > max(d[:2]), (name, d)
    d = _distances(images, "elastic_transform")
    assert d[0] > d[-1] > 5, d


def test_random_corruptions_depend_on_the_seed(images):
    for name in ("gaussian_noise", "glass_blur", "motion_blur", "snow", "frost", "fog"):
        assert not np.array_equal(C.corrupt(images, name, 5, 0), C.corrupt(images, name, 5, 1))


def test_zoom_equals_scipy_zoom():
    f = np.random.default_rng(0).random((2, 32, 32, 3)).astype(np.float32)
    for z in (1.06, 1.21, 2.25):
        ch = int(np.ceil(32 / z))
        top = (32 - ch) // 2
        ref = ndimage.zoom(f[:, top : top + ch, top : top + ch], (1, z, z, 1), order=1)
        t = (ref.shape[1] - 32) // 2
        assert np.allclose(C._clipped_zoom(f, z), ref[:, t : t + 32, t : t + 32], atol=1e-5)


def test_motion_kernel_equals_summed_shifts():
    f = np.random.default_rng(1).random((3, 32, 32, 1)).astype(np.float32)
    angles = np.array([-40.0, 0.0, 33.0])
    k = np.arange(7)
    w = np.exp(-(k**2) / 8.0)
    w /= w.sum()
    for i, a in enumerate(angles):
        dy, dx = np.sin(np.deg2rad(a)), np.cos(np.deg2rad(a))
        ref = sum(
            wt * ndimage.shift(f[i], (-s * dy, -s * dx, 0), order=1, mode="nearest")
            for s, wt in zip(k, w, strict=True)
        )
        assert np.allclose(C._motion(f, 6, 2.0, angles)[i], ref, atol=1e-5)


def test_bad_input_is_refused():
    x = np.zeros((1, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="unknown corruption"):
        C.corrupt(x, "rain", 1, 0)
    with pytest.raises(ValueError, match="severity"):
        C.corrupt(x, "fog", 6, 0)
    with pytest.raises(ValueError, match="uint8"):
        C.corrupt(x.astype(float), "fog", 1, 0)
