"""The 15 corruptions x 5 severities (scenarios/corruptions.py): shape, dtype and range
kept, seeded, stronger with severity; equal to make_cifar_c written out per image
(benchmarks/cifar_c_reference.py) at every severity; the pieces standing in for OpenCV and
scikit-image equal those libraries where they are installed."""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from clbench.scenarios import corruptions as C
from PIL import Image
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import cifar_c_reference as R

#: corruptions whose published CIFAR parameters do not make the pixel distance grow at
#: every step (see test_non_monotone_corruptions_follow_their_parameters)
NOT_STEPWISE = {"glass_blur", "frost", "elastic_transform", "motion_blur"}


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


@pytest.fixture(scope="module")
def few(images) -> np.ndarray:
    """4 crops, one with a flat grey band and one with a saturated red band (flat regions
    are where truncation to uint8 is most fragile)."""
    x = images[:4].copy()
    x[0, :12] = 128
    x[1, :, :10] = (250, 30, 30)
    return x


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
    small = images[:3, :16, :16, :1]  # digits_c's 16 x 16 grey inputs
    assert C.corrupt(small, name, 5, seed=0).shape == small.shape


@pytest.mark.parametrize("name", [n for n in C.CORRUPTIONS if n not in NOT_STEPWISE])
def test_distance_grows_with_severity(images, name):
    d = _distances(images, name)
    assert all(b > a for a, b in itertools.pairwise(d)), d
    assert d[0] > 0


def test_non_monotone_corruptions_follow_their_parameters(images):
    """Glass blur and frost still grow from the mild to the strong end; elastic's published
    CIFAR parameters shrink the random affine part (8 % -> 3 % of the image size) while the
    fine elastic field grows, so its pixel distance falls with severity. Motion blur's
    severities 3 and 4, (radius 6, sigma 2) and (8, 2), differ only by ImageMagick taps
    7..8 pixels out, whose Gaussian weights (~1e-10) change nothing: the same image."""
    for name in ("glass_blur", "frost"):
        d = _distances(images, name)
        assert min(d[3:]) > max(d[:2]), (name, d)
    d = _distances(images, "elastic_transform")
    assert d[0] > d[-1] > 5, d
    d = _distances(images, "motion_blur")
    assert d[0] < d[1] < d[2] == d[3] < d[4], d


def test_random_corruptions_depend_on_the_seed(images):
    for name in ("gaussian_noise", "glass_blur", "motion_blur", "snow", "frost", "fog"):
        assert not np.array_equal(C.corrupt(images, name, 5, 0), C.corrupt(images, name, 5, 1))


# ---------------------------------------------------- against make_cifar_c, per image
@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_matches_the_per_image_reference(few, name):
    """Every corruption at every severity equals make_cifar_c written out one image at a
    time (benchmarks/cifar_c_reference.py), given the same Generator: same draws, same
    arithmetic. Only brightness may differ (by one level, rarely): the reference file
    converts to HSV with colorsys's formulas, the library with scikit-image's."""
    for severity in range(1, 6):
        lib = C.corrupt(few, name, severity, seed=11)
        ref = R.corrupt_loop(few, name, severity, seed=11)
        diff = np.abs(lib.astype(int) - ref)
        if name == "brightness":
            assert diff.max() <= 1 and np.mean(diff > 0) < 0.005, (severity, np.mean(diff > 0))
        else:
            assert diff.max() == 0, (name, severity, diff.max(), np.mean(diff > 0))


@pytest.mark.parametrize("true_swap", [False, True])
def test_glass_blur_swap_semantics(few, true_swap):
    for severity in (1, 4):
        lib = C.corrupt(few, "glass_blur", severity, seed=5, true_swap=true_swap)
        ref = R.corrupt_loop(few, "glass_blur", severity, seed=5, true_swap=true_swap)
        assert np.array_equal(lib, ref)
    copy = C.corrupt(few, "glass_blur", 5, seed=5)
    swap = C.corrupt(few, "glass_blur", 5, seed=5, true_swap=True)
    assert not np.array_equal(copy, swap)


def test_the_reference_swap_copies_through_numpy_views():
    """make_cifar_c's ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` on numpy views: (h, w)
    gets the neighbour's pixel and the neighbour keeps its own."""
    x = np.arange(5 * 5 * 3, dtype=np.uint8).reshape(5, 5, 3)
    before = x.copy()
    x[3, 3], x[2, 2] = x[2, 2], x[3, 3]
    assert np.array_equal(x[3, 3], before[2, 2]) and np.array_equal(x[2, 2], before[2, 2])
    u = before[None].copy()
    offsets = np.zeros((1, 1, 9, 2), np.int64)  # (4,4), (4,3), (4,2), (3,4), (3,3), ...
    offsets[0, 0, 4] = (-1, -1)  # (3, 3) takes (2, 2)
    C.glass_shuffle(u, offsets, delta=1)
    assert np.array_equal(u[0], x)


def test_chunks_do_not_change_the_result(few, monkeypatch):
    """Draws are made image by image: a batch cut in chunks gives the same images."""
    names = ("impulse_noise", "glass_blur", "motion_blur", "snow", "frost", "fog")
    whole = {name: C.corrupt(few, name, 4, seed=2) for name in (*names, "elastic_transform")}
    monkeypatch.setattr(C, "CHUNK", 3)
    for name in whole:
        assert np.array_equal(C.corrupt(few, name, 4, seed=2), whole[name]), name


def test_output_is_truncated_not_rounded():
    x = np.full((1, 32, 32, 3), 100, np.uint8)
    # brightness on grey adds c: (100 / 255 + .05) * 255 = 112.75 -> 112
    assert (C.corrupt(x[..., :1], "brightness", 1, 0) == 112).all()
    # a flat image under contrast: np.mean of its 1024 equal values falls an ulp short of
    # 100 / 255, so the reference's truncation gives 99, and so does the library
    assert (C.corrupt(x, "contrast", 3, 0) == 99).all()
    assert np.array_equal(C.corrupt(x, "contrast", 3, 0), R.corrupt_loop(x, "contrast", 3, 0))
    assert C._out(np.array([100.9 / 255, 1.2, -0.1])).tolist() == [100, 255, 0]


def test_motion_blur_taps_follow_imagemagick():
    """GetOptimalKernelWidth1D: 2 ceil(radius) + 1 one-sided taps, Gaussian weights
    normalised; offsets ceil(i cos a - 1/2), ceil(i sin a - 1/2), the nearest pixel."""
    k = C.magick_motion_kernel(6, 2)
    assert len(k) == 13 and np.isclose(k.sum(), 1)
    assert np.allclose(k / k[0], np.exp(-(np.arange(13) ** 2) / 8))
    dy, dx = C.magick_motion_offsets(13, np.array([0.0, 90.0, 45.0, -20.0]))
    i = np.arange(13)
    assert (dy[0] == 0).all() and (dx[0] == i).all()
    assert (dy[1] == i).all() and (dx[1] == 0).all()
    assert (dx[2] == np.ceil(i * np.cos(np.pi / 4) - 0.5)).all() and (dy[2] == dx[2]).all()
    assert (dy[3] == np.ceil(i * np.sin(np.deg2rad(-20)) - 0.5)).all() and dy[3, -1] == -4
    # angle 0 on a step edge: out[x] = sum_i k_i img[x + i], the last column repeated,
    # rounded to a 16-bit quantum, then to 8 bits
    img = np.zeros((1, 4, 32, 1), np.uint8)
    img[..., 20:, 0] = 200
    out = C.magick_motion_blur(img, 6, 2, np.array([0.0]))[0, 0, :, 0]
    row = np.r_[img[0, 0, :, 0], np.full(12, 200)].astype(float)
    q = [np.floor(sum(k * row[x : x + 13]) * 257 + 0.5) for x in range(32)]
    assert out.tolist() == [int(np.floor(v / 257 + 0.5)) for v in q]


def test_zoom_equals_scipy_zoom():
    """clipped_zoom (images on the last axis) equals scipy.ndimage.zoom(order=1) of the
    centre crop once cast to float32, at every factor the corruptions use."""
    for size in (32, 16):
        f = np.random.default_rng(0).random((size, size, 3, 2)).astype(np.float32)
        for z in [*np.arange(1, 1.26, 0.01), 1.75, 2.25]:
            ch = int(np.ceil(size / z))
            top = (size - ch) // 2
            ref = ndimage.zoom(f[top : top + ch, top : top + ch], (z, z, 1, 1), order=1)
            t = (ref.shape[0] - size) // 2
            ref = ref[t : t + size, t : t + size]
            mine = C._clipped_zoom(f.astype(np.float64), float(z), np.float32)
            assert np.abs(mine - ref).max() <= 6e-8, (size, z)
            assert np.mean(mine == ref) > 0.999, (size, z)


def test_frost_photographs():
    """The photographs of the imagecorruptions package, resized by 0.2 the way
    cv2.resize(INTER_LINEAR) does it (at 1/5, the source pixels 2, 7, 12, ...); only the
    first five are drawn."""
    photos = C.frost_photographs()
    assert len(photos) == 6 and C.FROST_USED == 5
    assert photos[0].shape == (120, 180, 3) and photos[3].shape == (70, 105, 3)
    with Image.open(C.frost_directory() / "frost4.jpg") as im:
        full = np.asarray(im.convert("RGB"))
    assert np.array_equal(photos[3], full[2::5, 2::5][:70, :105])
    assert C.frost_photographs() is photos  # cached


# ------------------------------------- cross-checks with the reference's own libraries
def test_frost_resize_equals_opencv():
    cv2 = pytest.importorskip("cv2")
    for name, photo in zip(C.FROST_FILES, C.frost_photographs(), strict=True):
        bgr = cv2.imread(str(C.frost_directory() / name))
        assert np.array_equal(cv2.resize(bgr, (0, 0), fx=0.2, fy=0.2)[..., ::-1], photo)


def test_defocus_kernel_equals_opencv():
    cv2 = pytest.importorskip("cv2")
    grid = np.arange(-8, 9)
    xx, yy = np.meshgrid(grid, grid)
    for radius, alias in ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)):
        disk = np.array(radius**2 >= xx**2 + yy**2, dtype=np.float32)
        disk /= disk.sum()
        ref = cv2.GaussianBlur(disk, ksize=(3, 3), sigmaX=alias)
        assert np.array_equal(C._disk(radius, alias), ref)


def test_gaussian_and_hsv_equal_scikit_image(few):
    pytest.importorskip("skimage")
    from skimage.color import hsv2rgb, rgb2hsv
    from skimage.filters import gaussian

    f = few / 255.0
    for sigma in (0.05, 0.25, 0.4):
        ref = np.stack([gaussian(im, sigma=sigma, channel_axis=-1) for im in f])
        assert np.array_equal(C._gaussian(f, sigma), ref)
    hsv = np.stack(C._rgb_to_hsv(*np.moveaxis(f, -1, 0)), axis=-1)
    assert np.array_equal(hsv, np.stack([rgb2hsv(im) for im in f]))
    rgb = np.stack(C._hsv_to_rgb(*np.moveaxis(hsv, -1, 0)), axis=-1)
    assert np.array_equal(rgb, np.stack([hsv2rgb(im) for im in hsv]))


def test_bad_input_is_refused():
    x = np.zeros((1, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="unknown corruption"):
        C.corrupt(x, "rain", 1, 0)
    with pytest.raises(ValueError, match="severity"):
        C.corrupt(x, "fog", 6, 0)
    with pytest.raises(ValueError, match="uint8"):
        C.corrupt(x.astype(float), "fog", 1, 0)
