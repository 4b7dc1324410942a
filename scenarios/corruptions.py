"""The 15 common corruptions at 5 severities (Hendrycks & Dietterich, ICLR 2019), batched.

A re-implementation of the generator of the released CIFAR-10-C, ``make_cifar_c.py``
(github.com/hendrycks/robustness, ``ImageNet-C/create_c/make_cifar_c.py``), in numpy /
scipy / Pillow, vectorised over a batch, with its CIFAR (32 x 32) parameters (listed in
docs/protocols.md, "Corruptions"). The frost photographs come from the ``imagecorruptions``
package (read as files; the package is never imported).

Conventions. Every corruption takes a batch ``x`` of uint8 images (N, H, W, C), C = 1 or
3, a severity 1..5 and a ``numpy.random.Generator``, and returns uint8 images of the same
shape. The arithmetic follows the reference's dtypes (float64 where it divides a uint8
image by ``255.``, float32 where it asks for float32) and its conversion to uint8: the
float in 0..255 is **truncated** (``np.uint8(np.clip(v, 0, 255))``), except motion blur,
whose output is ImageMagick's (rounded to the nearest level), and pixelate / JPEG, which
are Pillow's. The random draws are made image by image, in the order the reference makes
them for one image (``np.random.normal`` -> ``rng.normal``, ``randint`` -> ``integers``,
and so on): a batch takes exactly the draws of a per-image loop over the same
``Generator``, so :func:`corrupt` may cut a batch into chunks and the per-image reference
loop in ``benchmarks/cifar_c_reference.py`` reproduces a batch from the same seed.

What the reference does, and how it is reproduced here:

- ``impulse_noise``: ``skimage.util.random_noise(mode="s&p", amount=a)``; from
  scikit-image 0.13 on, a value flips with probability ``a`` (one uniform draw per value)
  and a flipped value becomes 1 or 0 with probability 1/2 (a second draw per value).
- ``defocus_blur``: ``cv2.filter2D`` with a 17 x 17 aliased disk smoothed by a 3 x 3
  ``cv2.GaussianBlur`` (float32, reflect-101 border), here ``scipy.ndimage.correlate``
  with ``mode="mirror"`` (= reflect-101).
- ``glass_blur``: ``skimage.filters.gaussian`` (scipy's ``gaussian_filter``, mode
  "nearest", truncate 4), truncated to uint8, then for every position (h, w), h and w
  running from H - 1 down to 2, an offset (dx, dy) = ``randint(-1, 1, size=2)`` (each -1
  or 0) and the statement ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` on numpy views.
  The right-hand side holds two *views*: ``x[h, w]`` first receives the neighbour's
  pixel, then the neighbour receives the (already overwritten) ``x[h, w]``, i.e. itself.
  In effect (h, w) copies its neighbour and the neighbour keeps its pixel: that is what the
  published data contains, and the default here. As the neighbours (offsets -1 or 0) are
  visited later in that order, one pass is a pure gather from the pass's input, done for
  all positions and images at once. ``glass_blur(..., true_swap=True)`` (or
  ``corrupt(..., true_swap=True)``) exchanges the two pixels instead (sequentially, as
  the code reads).
- ``motion_blur`` (and snow's layer): Wand's ``motion_blur(radius, sigma, angle)``, i.e.
  ImageMagick's ``MotionBlurImage``: ``GetOptimalKernelWidth1D`` gives ``2 ceil(radius) +
  1`` taps (radius > 0: 13, 13, 13, 17, 19 taps for the 5 severities), all on one side;
  tap i weighs ``exp(-i^2 / 2 sigma^2)`` (normalised) and reads the pixel at offset
  ``(ceil(i cos a - 1/2), ceil(i sin a - 1/2))`` (x, y), the nearest pixel along the
  direction (no interpolation), with the default "edge" virtual pixels beyond the border.
  The sum is made on 16-bit quanta (Q16, ``257 v``), rounded to a quantum, and the 8-bit
  PNG Wand writes holds ``round(q / 257)`` (ImageMagick 6, as Wand 0.4.4, the reference's
  requirement, binds it). Here: the same taps as shifted sums over the batch (images
  sorted by angle so that equal offsets are contiguous runs), the Q16 rounding included;
  the quanta were checked equal to ImageMagick 6.9.11 Q16's on random images.
  Severities 3 and 4, (6, 2) and (8, 2), give the same image: the four extra taps weigh
  ~1e-10.
- ``zoom_blur``: ``scipy.ndimage.zoom(order=1)`` of the centre crop per zoom factor, the
  float32 results summed one by one: here two 2-tap linear interpolations per factor (in
  float64, as scipy computes), cast to float32 and summed in the same order.
- ``snow``: the layer is zoomed, thresholded, stored as an 8-bit greyscale PNG via PIL
  (truncated to uint8), motion-blurred by ImageMagick, read back and divided by 255, then
  added to the image together with ``np.rot90(layer, k=2)`` (the layer turned by 180
  degrees); the image is first blended with ``max(x, 1.5 grey + 0.5)``, grey =
  ``cv2.cvtColor(RGB2GRAY)`` = .299 R + .587 G + .114 B.
- ``frost``: ``idx = randint(5)``, so only the first **five** of the six photographs
  (frost1.png .. frost5.jpg) are ever used; ``cv2.imread`` (BGR, alpha dropped),
  ``cv2.resize(fx=0.2, fy=0.2)`` (bilinear, half-pixel centres: at factor 1/5 every output
  pixel is exactly the source pixel (5 i + 2, 5 j + 2)), a random 32 x 32 crop, BGR -> RGB,
  and ``clip(c0 x + c1 frost, 0, 255)`` in 0..255. The photographs are read with Pillow
  (as RGB), subsampled and cached.
- ``fog``: a 32 x 32 diamond-square plasma fractal per image (``np.random.uniform`` per
  step), ``x + amount * fractal`` rescaled by ``max / (max + amount)``.
- ``brightness``: ``skimage.color`` rgb2hsv / hsv2rgb; the same formulas here.
- ``elastic_transform``: ``cv2.warpAffine`` (bilinear, reflect-101) by the affine map
  sending three points to their randomly moved copies, then
  ``scipy.ndimage.map_coordinates(order=1, mode="reflect")`` along a displacement field
  ``skimage gaussian(uniform(-1, 1), sigma, mode="reflect", truncate=3) * alpha``. The two
  resamplings are separate (the image is interpolated twice). The affine part reproduces
  the OpenCV of the reference's time (up to 4.10): source positions in fixed point, cut
  to 1/32 pixel, float32 bilinear weights from its table; checked bit-exact against
  OpenCV 4.10.
- ``gaussian_noise``, ``shot_noise``, ``contrast``, ``pixelate`` (Pillow box resize
  down and up), ``jpeg_compression`` (Pillow JPEG at the quality): as written.

Known differences from the published files (also in docs/protocols.md):

- the draws come from a seeded ``numpy.random.Generator``; the reference used the unseeded
  global legacy generator, so no released image can be reproduced draw for draw, only
  its distribution;
- truncation makes whole-level results fragile: where the exact value is an integer (flat
  regions), the last bit of the float computation decides between two levels. The
  library repeats the reference's operations in its order and dtypes (scikit-image's
  Gaussian and HSV, scipy's zoom and map_coordinates, OpenCV 4.10's GaussianBlur kernel
  and warpAffine agree bit for bit in the tests), but OpenCV's own float paths are not
  all reproduced: ``cv2.cvtColor`` (snow's grey) may differ in the last bit (SIMD / FMA),
  and ``cv2.filter2D`` (defocus) runs a DFT whose rounding is not reproduced (harmless
  here: the float32 kernel sums to slightly above 1, so flat regions truncate to their
  level either way);
- ImageMagick: a Q16 build without HDRI, writing 8-bit PNGs by rounding, as ImageMagick 6
  did in 2018; from 6.9.10-69 (October 2019) it truncates q / 257 there, and an HDRI
  build (ImageMagick 7's default) rounds once instead of twice;
- OpenCV >= 4.11 computes warpAffine's source positions in float (no 1/32 grid); the
  library follows the OpenCV of 2018;
- ``impulse_noise`` follows scikit-image >= 0.13 (before it, scikit-image drew salt and
  pepper coordinates instead of per-value masks);
- JPEG and pixelate use the installed Pillow / libjpeg;
- extensions beyond the reference (which handles 32 x 32 RGB only): grey images (C = 1)
  use the value itself as the grey / V channel, and frost blends the luminance of the crop;
  other sizes scale glass blur's loop bounds, elastic's parameters (fractions of the
  image size), pixelate's size and the frost crop; fog crops a fractal of size
  max(32, next power of two).
"""

from __future__ import annotations

import importlib.util
import io
import math
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

#: the standard order of the continual stream (docs/protocols.md)
CORRUPTIONS = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)

#: images per call in :func:`corrupt` (bounds memory; results do not depend on it)
CHUNK = 100

#: make_cifar_c's frost photographs; ``randint(5)`` picks among the first five only
FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg")
FROST_USED = 5
FROST_SCALE = 0.2  # cv2.resize(frost, (0, 0), fx=0.2, fy=0.2) for CIFAR

Corruption = Callable[..., np.ndarray]


def _check_severity(severity: int) -> None:
    if not 1 <= severity <= 5:
        raise ValueError(f"corruption severity must be in 1..5, got {severity}")


def _pick(values: tuple, severity: int):
    _check_severity(severity)
    return values[severity - 1]


def _f64(x: np.ndarray) -> np.ndarray:
    """``np.array(x) / 255.``: float64 in [0, 1]."""
    return x / 255.0


def _f32(x: np.ndarray) -> np.ndarray:
    """``np.array(x, dtype=np.float32) / 255.``: float32 in [0, 1]."""
    return x.astype(np.float32) / np.float32(255.0)


def _out(f: np.ndarray) -> np.ndarray:
    """``np.uint8(np.clip(f, 0, 1) * 255)``, in f's dtype: truncation, as the reference."""
    return (np.clip(f, 0, 1) * 255).astype(np.uint8)


def _grey(f: np.ndarray) -> np.ndarray:
    """(..., 1) grey of float images: .299 R + .587 G + .114 B (cv2 RGB2GRAY), in f's dtype;
    a 1-channel image is its own grey."""
    if f.shape[-1] == 1:
        return f
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    c = [np.asarray(v, f.dtype) for v in (0.299, 0.587, 0.114)]
    return (r * c[0] + g * c[1] + b * c[2])[..., None]


def _gaussian(f: np.ndarray, sigma: float, mode: str = "nearest", truncate: float = 4.0):
    """``skimage.filters.gaussian`` (multichannel) on a batch: blur the two image axes."""
    sig = [0.0] * f.ndim
    sig[1] = sig[2] = sigma
    return ndimage.gaussian_filter(f, sigma=sig, mode=mode, truncate=truncate)


# ------------------------------------------------------------------------- noise
def gaussian_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = _pick((0.04, 0.06, 0.08, 0.09, 0.10), severity)
    f = _f64(x)
    return _out(f + rng.normal(size=f.shape, scale=c))


def shot_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = _pick((500, 250, 100, 75, 50), severity)
    return _out(rng.poisson(_f64(x) * c) / c)


def impulse_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """skimage's salt and pepper: each value flips with probability ``amount`` (one draw per
    value), a flipped value is 1 or 0 with probability 1/2 (a second draw per value)."""
    amount = _pick((0.01, 0.02, 0.03, 0.05, 0.07), severity)
    f = _f64(x)
    u = rng.random((len(x), 2, *x.shape[1:]))  # per image: the flip draws, then the salt draws
    flipped, salted = u[:, 0] < amount, u[:, 1] < 0.5
    f[flipped & salted] = 1.0
    f[flipped & ~salted] = 0.0
    return _out(f)


# -------------------------------------------------------------------------- blur
def _cv2_gaussian_kernel(ksize: int, sigma: float) -> np.ndarray:
    """``cv2.getGaussianKernel(ksize, sigma, CV_32F)``: exp(-x^2 / 2 sigma^2) as float32,
    scaled by the reciprocal of their (float64) sum."""
    x = np.arange(ksize) - (ksize - 1) * 0.5
    k = np.exp((-0.5 / (sigma * sigma)) * x * x).astype(np.float32)
    return (k * (1.0 / k.astype(np.float64).sum())).astype(np.float32)


def _symmetric_3tap(a: np.ndarray, k: np.ndarray, axis: int) -> np.ndarray:
    """OpenCV's symmetric 3-tap float32 filter along ``axis``, reflect-101 border:
    ``a * k1 + (left + right) * k0`` (k = [k0, k1, k0])."""
    p = np.pad(a, [(1, 1) if d == axis else (0, 0) for d in range(a.ndim)], mode="reflect")
    n = a.shape[axis]
    left, mid, right = (np.take(p, np.arange(i, i + n), axis=axis) for i in range(3))
    return mid * k[1] + (left + right) * k[0]


def _disk(radius: float, alias_blur: float) -> np.ndarray:
    """make_cifar_c's kernel: a 17 x 17 aliased disk (float32, normalised), smoothed by a
    3 x 3 ``cv2.GaussianBlur`` (rows, then columns, float32), not renormalised."""
    if radius > 8:
        raise ValueError("make_cifar_c's defocus radii are at most 1.5")
    size = np.arange(-8, 9)
    xx, yy = np.meshgrid(size, size)
    disk = np.array((xx**2 + yy**2) <= radius**2, dtype=np.float32)
    disk /= np.sum(disk)
    g = _cv2_gaussian_kernel(3, alias_blur)
    return _symmetric_3tap(_symmetric_3tap(disk, g, axis=1), g, axis=0)


def defocus_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    radius, alias = _pick(((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)), severity)
    kernel = _disk(radius, alias).astype(np.float64)[None, :, :, None]
    return _out(ndimage.correlate(_f64(x), kernel, mode="mirror"))


def _glass_positions(h: int, w: int, delta: int) -> tuple[np.ndarray, np.ndarray]:
    """The (h, w) the reference visits, in its order: both from the far edge down."""
    hh, ww = np.meshgrid(np.arange(h - delta, delta, -1), np.arange(w - delta, delta, -1))
    return hh.T.ravel(), ww.T.ravel()


def glass_shuffle(
    u: np.ndarray, offsets: np.ndarray, delta: int, true_swap: bool = False
) -> np.ndarray:
    """Glass blur's local shuffle of uint8 images ``u`` (N, H, W, C), in place.

    ``offsets`` (N, iterations, positions, 2) holds each position's (dx, dy), positions in
    the order of :func:`_glass_positions`. Default: position (h, w) takes the pixel at
    (h + dy, w + dx), which keeps its own (the reference's view assignment); ``true_swap``:
    the two pixels are exchanged."""
    n, h, w, c = u.shape
    if not u.flags.c_contiguous:
        raise ValueError("glass_shuffle works in place on a C-contiguous array")
    hh, ww = _glass_positions(h, w, delta)
    pixels = u.view(np.dtype((np.void, c)))[..., 0].reshape(-1)  # one element per pixel
    base = (np.arange(n)[:, None] * h + hh) * w + ww  # (N, positions) flat index
    for it in range(offsets.shape[1]):
        dx, dy = offsets[:, it, :, 0], offsets[:, it, :, 1]
        source = base + dy * w + dx
        if not true_swap and offsets.size and dx.max() <= 0 and dy.max() <= 0:
            # sources come later in the visiting order: one gather from this pass's input
            pixels[base] = pixels[source]
            continue
        for p in range(base.shape[1]):  # sequentially, all images at once
            mine, theirs = base[:, p], source[:, p]
            neighbour = pixels[theirs]
            if true_swap:
                pixels[theirs] = pixels[mine]
            pixels[mine] = neighbour
    return u


def glass_blur(
    x: np.ndarray, severity: int, rng: np.random.Generator, true_swap: bool = False
) -> np.ndarray:
    """Blur, truncate to uint8, locally shuffle pixels, blur again. ``true_swap=False``
    reproduces the published data (each visited pixel copies a neighbour, see the module
    docstring); ``True`` exchanges the two pixels."""
    sigma, delta, iterations = _pick(
        ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)), severity
    )
    n, h, w, _ = x.shape
    positions = len(_glass_positions(h, w, delta)[0])
    offsets = rng.integers(-delta, delta, size=(n, iterations, positions, 2))
    u = (_gaussian(_f64(x), sigma) * 255).astype(np.uint8)
    glass_shuffle(u, offsets, delta, true_swap)
    return _out(_gaussian(_f64(u), sigma))


# ImageMagick's constants (MagickCore/image-private.h)
_MAGICK_PI = 3.14159265358979323846264338327950288419716939937510
_MAGICK_SQ2PI = 2.50662827463100024161235523934010416269302368164062
_MAGICK_EPSILON = 1.0e-12


def magick_motion_kernel(radius: float, sigma: float) -> np.ndarray:
    """MotionBlurImage's weights: GetOptimalKernelWidth1D gives ``2 ceil(radius) + 1`` taps
    for radius > 0; tap i weighs exp(-i^2 / 2 sigma^2) / (sqrt(2 pi) sigma), normalised."""
    if radius <= _MAGICK_EPSILON:
        raise ValueError("only radius > 0 is supported (make_cifar_c's radii are 6..14)")
    width = int(2.0 * math.ceil(radius) + 1.0)
    s = sigma if abs(sigma) >= _MAGICK_EPSILON else _MAGICK_EPSILON
    k = [math.exp(-(i * i) / (2.0 * s * s)) / (_MAGICK_SQ2PI * s) for i in range(width)]
    total = 0.0
    for v in k:  # summed in order, as ImageMagick does
        total += v
    return np.array([v / total for v in k])


def magick_motion_offsets(width: int, angles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dy, dx) of each tap (N, width): ``ceil(i sin a - 1/2)``, ``ceil(i cos a - 1/2)``,
    computed as MotionBlurImage does (through a point ``width`` long and its hypot)."""
    rad = _MAGICK_PI * np.asarray(angles, np.float64) / 180.0
    px, py = width * np.sin(rad), width * np.cos(rad)
    hyp = np.hypot(px, py)[:, None]
    i = np.arange(width, dtype=np.float64)
    dx = np.ceil(i * py[:, None] / hyp - 0.5).astype(np.intp)
    dy = np.ceil(i * px[:, None] / hyp - 0.5).astype(np.intp)
    return dy, dx


def magick_motion_blur(
    x: np.ndarray, radius: float, sigma: float, angles: np.ndarray
) -> np.ndarray:
    """ImageMagick's ``MotionBlurImage(radius, sigma, angle)`` of uint8 images (N, H, W, C),
    angle per image (degrees), read back as 8 bits, as ``MagickMotionBlurImage`` + PNG do:
    out = sum_i k_i x[y + dy_i, x + dx_i], edge pixels repeated beyond the border, the sum
    rounded to a 16-bit quantum, then scaled to 8 bits (ScaleQuantumToChar)."""
    k = magick_motion_kernel(radius, sigma)
    n, h, w, _ = x.shape
    dy, dx = magick_motion_offsets(len(k), angles)
    order = np.argsort(np.asarray(angles), kind="stable")  # similar angles share offsets
    dy, dx = dy[order], dx[order]
    r = len(k) - 1
    pad = np.pad(x[order], ((0, 0), (r, r), (r, r), (0, 0)), mode="edge")
    acc = np.zeros(x.shape, np.float64)
    for i, weight in enumerate(k):
        a, b = dy[:, i], dx[:, i]
        cut = np.flatnonzero((a[1:] != a[:-1]) | (b[1:] != b[:-1])) + 1
        for s, e in zip(np.r_[0, cut], np.r_[cut, n], strict=True):
            y0, x0 = r + a[s], r + b[s]
            acc[s:e] += weight * pad[s:e, y0 : y0 + h, x0 : x0 + w]
    # ClampToQuantum (Q16: + 0.5, truncated), then ScaleQuantumToChar
    q = np.clip(np.floor(acc * 257.0 + 0.5), 0, 65535).astype(np.int64)
    out = np.empty_like(x)
    out[order] = (((q + 128) - ((q + 128) >> 8)) >> 8).astype(np.uint8)
    return out


def motion_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    radius, sigma = _pick(((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)), severity)
    return magick_motion_blur(x, radius, sigma, rng.uniform(-45, 45, size=len(x)))


def _zoom_taps(n_in: int, n_out: int, first: int, count: int):
    """scipy.ndimage.zoom(order=1) along one axis, outputs first..first+count-1: input
    position k * ((n_in - 1) / (n_out - 1)); its floor and the next index (clamped), and
    their weights as scipy computes them (1 - t, then 1 - (1 - t))."""
    pos = np.arange(first, first + count) * ((n_in - 1) / max(n_out - 1, 1))
    lo = np.floor(pos)
    w0 = 1.0 - (pos - lo)
    lo = lo.astype(np.intp)
    return np.minimum(lo, n_in - 1), np.minimum(lo + 1, n_in - 1), w0, 1.0 - w0


def _clipped_zoom(f: np.ndarray, factor: float, dtype=None) -> np.ndarray:
    """make_cifar_c's clipped_zoom of images stacked on the *last* axes, f (H, W, ...):
    the centre ceil(H / z) crop, zoomed by z (scipy.ndimage.zoom, order 1), its centre
    H x W. Float64 arithmetic with scipy's weights, the result cast to ``dtype`` (default
    f's: scipy casts back to the input's dtype). Images last keeps every operation on long
    contiguous runs."""
    h = f.shape[0]
    ch = int(np.ceil(h / factor))
    top = (h - ch) // 2
    crop = f[top : top + ch, top : top + ch]
    n_out = round(ch * factor)
    lo, hi, w0, w1 = _zoom_taps(ch, n_out, (n_out - h) // 2, h)
    if ch == n_out == h and not w1.any():  # the identity (zoom 1 and 1.01 at 32 pixels)
        return crop.astype(dtype or f.dtype)
    extra = (None,) * (f.ndim - 2)
    rows = crop[lo].astype(np.float64)  # (H, ch, ...)
    rows *= w0[(slice(None), None, *extra)]
    rows += crop[hi] * w1[(slice(None), None, *extra)]
    out = rows[:, lo]  # (H, H, ...)
    out *= w0[(None, slice(None), *extra)]
    out += rows[:, hi] * w1[(None, slice(None), *extra)]
    return out.astype(dtype or f.dtype)


#: images per zoom-blur pass (small blocks stay in cache)
_ZOOM_BLOCK = 100


def zoom_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    top = _pick((1.06, 1.11, 1.16, 1.21, 1.26), severity)
    factors = np.arange(1, top, 0.01)
    out = np.empty_like(x)
    for s in range(0, len(x), _ZOOM_BLOCK):
        # (np.array(x) / 255.).astype(np.float32), images last: (H, W, C, n)
        f = np.ascontiguousarray(
            np.moveaxis(_f64(x[s : s + _ZOOM_BLOCK]).astype(np.float32), 0, -1)
        )
        acc = np.zeros_like(f)
        for z in factors:  # float32 sums of float32 zooms, in order
            acc += _clipped_zoom(f, float(z))
        out[s : s + _ZOOM_BLOCK] = np.moveaxis(_out((f + acc) / (len(factors) + 1)), -1, 0)
    return out


# ----------------------------------------------------------------------- weather
def snow(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    loc, scale, zoom, threshold, radius, sigma, blend = _pick(
        (
            (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
            (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
            (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
            (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
            (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
        ),
        severity,
    )
    n, h, w, _ = x.shape
    layer, angles = np.empty((n, h, w, 1)), np.empty(n)
    for i in range(n):  # per image: the layer, then the blur angle
        layer[i, ..., 0] = rng.normal(size=(h, w), loc=loc, scale=scale)
        angles[i] = rng.uniform(-135, -45)
    if zoom != 1:
        layer = np.moveaxis(_clipped_zoom(np.moveaxis(layer, 0, -1), zoom), -1, 0)
    layer[layer < threshold] = 0
    png = (np.clip(layer, 0, 1) * 255).astype(np.uint8)  # the 8-bit layer PIL writes
    layer = magick_motion_blur(png, radius, sigma, angles) / 255.0
    f = _f32(x)
    f = blend * f + (1 - blend) * np.maximum(f, _grey(f) * 1.5 + 0.5)
    return _out(f + layer + np.rot90(layer, k=2, axes=(1, 2)))


def frost_directory() -> Path:
    """The folder of the frost photographs in the installed ``imagecorruptions`` package,
    found without importing it (its __init__ imports OpenCV and scikit-image)."""
    spec = importlib.util.find_spec("imagecorruptions")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "frost needs the frost photographs of the imagecorruptions package: "
            "pip install 'imagecorruptions>=1.1'"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "frost"


def _resize_linear_exact(a: np.ndarray, factor: float) -> np.ndarray:
    """``cv2.resize(a, (0, 0), fx=factor, fy=factor)`` (INTER_LINEAR) where every source
    position (i + 0.5) / factor - 0.5 is a whole pixel (factor 1/5: pixels 2, 7, 12, ...):
    then the bilinear weights are (1, 0) and the resize picks those pixels."""
    idx = []
    for size in a.shape[:2]:
        n_out = int(np.rint(size * factor))
        pos = (np.arange(n_out) + 0.5) * (1.0 / factor) - 0.5
        if not np.array_equal(pos, np.round(pos)):
            raise ValueError(f"resize by {factor} falls between pixels; only 1/k is supported")
        idx.append(np.clip(pos.astype(np.intp), 0, size - 1))
    return a[idx[0][:, None], idx[1][None, :]]


@lru_cache(maxsize=1)
def frost_photographs() -> tuple[np.ndarray, ...]:
    """make_cifar_c's frost photographs as RGB uint8 arrays, resized by 0.2 (cached)."""
    folder = frost_directory()
    out = []
    for name in FROST_FILES:
        with Image.open(folder / name) as im:
            a = _resize_linear_exact(np.asarray(im.convert("RGB")), FROST_SCALE)
        a.flags.writeable = False
        out.append(a)
    return tuple(out)


def frost(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    img_w, frost_w = _pick(((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)), severity)
    photos = frost_photographs()
    n, h, w, c = x.shape
    rows, cols = (min(p.shape[i] for p in photos[:FROST_USED]) for i in (0, 1))
    if h >= rows or w >= cols:
        raise ValueError(
            f"frost crops CIFAR-scale photographs ({rows} x {cols} at least): images must be "
            f"smaller, got {h} x {w}"
        )
    crops = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):  # per image: the photograph, the top row, the left column
        photo = photos[int(rng.integers(FROST_USED))]
        top = int(rng.integers(0, photo.shape[0] - h))
        left = int(rng.integers(0, photo.shape[1] - w))
        crops[i] = photo[top : top + h, left : left + w]
    layer = crops.astype(np.float64) if c == 3 else _grey(crops.astype(np.float64))
    return np.clip(img_w * x.astype(np.float64) + frost_w * layer, 0, 255).astype(np.uint8)


def _plasma(n: int, mapsize: int, wibbledecay: float, rng: np.random.Generator) -> np.ndarray:
    """n diamond-square fractals (n, mapsize, mapsize) in [0, 1], as make_cifar_c's
    plasma_fractal; each image's uniform draws are made in its order (squares, then the
    two diamond sets, per step), from one block of draws per image."""
    if mapsize & (mapsize - 1):
        raise ValueError(f"mapsize must be a power of two, got {mapsize}")
    steps = []
    stepsize = mapsize
    while stepsize >= 2:
        steps.append(stepsize)
        stepsize //= 2
    sizes = [(mapsize // s) ** 2 for s in steps]
    draws = rng.random((n, 3 * sum(sizes)))
    maparray = np.zeros((n, mapsize, mapsize))
    wibble, at = 100.0, 0

    def wibbledmean(a: np.ndarray) -> np.ndarray:
        nonlocal at
        u = draws[:, at : at + a[0].size].reshape(a.shape)
        at += a[0].size
        # np.random.uniform(-wibble, wibble) = -wibble + (wibble - -wibble) * u
        return a / 4 + wibble * (-wibble + (wibble - -wibble) * u)

    for stepsize in steps:
        half = stepsize // 2
        corners = maparray[:, 0:mapsize:stepsize, 0:mapsize:stepsize]
        sq = corners + np.roll(corners, -1, axis=1)
        sq = sq + np.roll(sq, -1, axis=2)
        maparray[:, half:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(sq)
        dr = maparray[:, half:mapsize:stepsize, half:mapsize:stepsize]
        ul = maparray[:, 0:mapsize:stepsize, 0:mapsize:stepsize]
        lt = (dr + np.roll(dr, 1, axis=1)) + (ul + np.roll(ul, -1, axis=2))
        maparray[:, 0:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(lt)
        tt = (dr + np.roll(dr, 1, axis=2)) + (ul + np.roll(ul, -1, axis=1))
        maparray[:, half:mapsize:stepsize, 0:mapsize:stepsize] = wibbledmean(tt)
        wibble /= wibbledecay
    maparray -= maparray.min(axis=(1, 2), keepdims=True)
    return maparray / maparray.max(axis=(1, 2), keepdims=True)


def plasma_fractal(mapsize: int, wibbledecay: float, rng: np.random.Generator) -> np.ndarray:
    """One diamond-square fractal (mapsize, mapsize) in [0, 1] (mapsize a power of 2)."""
    return _plasma(1, mapsize, wibbledecay, rng)[0]


def fog(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    amount, decay = _pick(((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)), severity)
    f = _f64(x)
    n, h, w, _ = f.shape
    size = max(32, 1 << int(np.ceil(np.log2(max(h, w)))))
    fractal = _plasma(n, size, decay, rng)[:, :h, :w, None]
    peak = f.max(axis=(1, 2, 3), keepdims=True)
    f += amount * fractal
    return _out(f * peak / (peak + amount))


# ------------------------------------------------------------------------ digital
def _rgb_to_hsv(r: np.ndarray, g: np.ndarray, b: np.ndarray):
    """skimage.color.rgb2hsv's formulas on float64 planes (where two channels tie for the
    maximum, blue's hue formula wins over green's over red's, as its assignments do)."""
    v = np.maximum(np.maximum(r, g), b)
    delta = v - np.minimum(np.minimum(r, g), b)
    flat = delta == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        s = np.where(flat, 0.0, delta / v)
        h = np.where(g == v, 2.0 + (b - r) / delta, (g - b) / delta)
        h = np.where(b == v, 4.0 + (r - g) / delta, h)
    h = np.where(flat, 0.0, (h / 6.0) % 1.0)
    return h, s, v


#: hsv2rgb's (v, t, p, q) pick for (R, G, B) in each sixth of the hue circle
_HSV_PICK = np.array([[0, 3, 2, 2, 1, 0], [1, 0, 0, 3, 2, 2], [2, 2, 1, 0, 0, 3]])


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> list[np.ndarray]:
    """skimage.color.hsv2rgb's formulas on float64 planes: [R, G, B]."""
    hi = np.floor(h * 6)
    f = h * 6 - hi
    p = v * (1 - s)
    q = v * (1 - f * s)
    t = v * (1 - (1 - f) * s)
    sector = hi.astype(np.uint8) % 6
    candidates = np.stack([v, t, p, q])
    return [np.take_along_axis(candidates, pick[sector][None], 0)[0] for pick in _HSV_PICK]


def brightness(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = _pick((0.05, 0.1, 0.15, 0.2, 0.3), severity)
    f = _f64(x)
    if f.shape[-1] == 1:  # grey: V is the value itself
        return _out(np.clip(f + c, 0, 1))
    h, s, v = _rgb_to_hsv(*np.moveaxis(f, -1, 0).copy())  # contiguous planes
    rgb = _hsv_to_rgb(h, s, np.clip(v + c, 0, 1))
    return np.stack([_out(plane) for plane in rgb], axis=-1)


def contrast(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = _pick((0.75, 0.5, 0.4, 0.3, 0.15), severity)
    f = _f64(x)
    means = np.mean(f, axis=(1, 2), keepdims=True)
    return _out((f - means) * c + means)


def cv2_affine_coordinates(
    m: np.ndarray, h: int, w: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Where ``cv2.warpAffine(img, M, (w, h))`` (INTER_LINEAR, no WARP_INVERSE_MAP) samples,
    for M (N, 2, 3): M is inverted (invertAffineTransform), each output pixel's source
    position computed in fixed point (1/1024, rounded, + 1/64) and cut to 1/32 pixel.
    Returns the integer (row, col) of the top-left neighbour and the 1/32 fractions."""
    a, b, c = m[:, 0, 0], m[:, 0, 1], m[:, 0, 2]
    d, e, f = m[:, 1, 0], m[:, 1, 1], m[:, 1, 2]
    det = a * e - b * d
    det = np.where(det != 0, 1.0 / np.where(det != 0, det, 1.0), 0.0)
    i00, i11, i01, i10 = e * det, a * det, -b * det, -d * det
    i02 = -i00 * c - i01 * f
    i12 = -i10 * c - i11 * f
    scale = 1024  # AB_SCALE: 10 bits; INTER_BITS = 5; round_delta = 1024 / 32 / 2
    xs = np.arange(w, dtype=np.float64)
    ys = np.arange(h, dtype=np.float64)
    adelta = np.rint(i00[:, None] * xs * scale).astype(np.int64)  # (N, W)
    bdelta = np.rint(i10[:, None] * xs * scale).astype(np.int64)
    x0 = np.rint((i01[:, None] * ys + i02[:, None]) * scale).astype(np.int64) + 16  # (N, H)
    y0 = np.rint((i11[:, None] * ys + i12[:, None]) * scale).astype(np.int64) + 16
    px = (x0[:, :, None] + adelta[:, None, :]) >> 5  # (N, H, W) in 1/32 pixel
    py = (y0[:, :, None] + bdelta[:, None, :]) >> 5
    return py >> 5, px >> 5, py & 31, px & 31


def _corners(
    planes: np.ndarray, rows: np.ndarray, cols: np.ndarray, mode: str
) -> tuple[np.ndarray, ...]:
    """The four neighbours (r, c), (r, c + 1), (r + 1, c), (r + 1, c + 1) of per-image
    integer positions (N, H, W) in images given as channel planes (C, N, H, W), each
    (C, N * H * W); outside the image, the planes extend by ``np.pad(mode)``: "reflect" is
    OpenCV's BORDER_REFLECT_101, "symmetric" scipy.ndimage's "reflect"."""
    c, n, h, w = planes.shape
    pad = max(0, -int(rows.min()), -int(cols.min()))
    pad = max(pad, int(rows.max()) + 2 - h, int(cols.max()) + 2 - w)
    p = np.pad(planes, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode=mode)
    hp, wp = h + 2 * pad, w + 2 * pad
    flat = p.reshape(c, -1)
    i00 = ((np.arange(n)[:, None, None] * hp + rows + pad) * wp + cols + pad).reshape(-1)
    return tuple(np.take(flat, i00 + d, axis=1) for d in (0, 1, wp, wp + 1))


def _warp_affine(planes: np.ndarray, m: np.ndarray) -> np.ndarray:
    """``cv2.warpAffine(img, m[i], (W, H), borderMode=cv2.BORDER_REFLECT_101)`` of float32
    images given as channel planes (C, N, H, W): bilinear weights from OpenCV's float32
    table, summed in its order (top-left, top-right, bottom-left, bottom-right)."""
    h, w = planes.shape[2:]
    sy, sx, fy, fx = cv2_affine_coordinates(m, h, w)
    tab = np.arange(32, dtype=np.float32) * np.float32(1 / 32)
    wy1, wx1 = tab[fy].reshape(-1), tab[fx].reshape(-1)
    wy0, wx0 = np.float32(1) - wy1, np.float32(1) - wx1
    v00, v01, v10, v11 = _corners(planes, sy, sx, "reflect")
    out = v00 * (wy0 * wx0)
    out += v01 * (wy0 * wx1)
    out += v10 * (wy1 * wx0)
    out += v11 * (wy1 * wx1)
    return out.reshape(planes.shape)


def _map_coordinates(planes: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.map_coordinates(img, (rows, cols, channel), order=1,
    mode="reflect")`` of images given as channel planes (C, N, H, W), rows / cols
    (N, H, W): float64 arithmetic with scipy's weights (1 - t, then 1 - (1 - t)), the
    result in the planes' dtype."""
    r0, c0 = np.floor(rows), np.floor(cols)
    ur, uc = (1.0 - (rows - r0)).reshape(-1), (1.0 - (cols - c0)).reshape(-1)
    tr, tc = 1.0 - ur, 1.0 - uc
    v00, v01, v10, v11 = _corners(planes, r0.astype(np.intp), c0.astype(np.intp), "symmetric")
    top = v00.astype(np.float64) * uc + v01 * tc
    bottom = v10.astype(np.float64) * uc + v11 * tc
    return (top * ur + bottom * tr).astype(planes.dtype).reshape(planes.shape)


def affine_points(h: int, w: int) -> np.ndarray:
    """make_cifar_c's three (x, y) points around the centre, float32 (3, 2)."""
    centre = np.float32([h, w]) // 2
    side = min(h, w) // 3
    return np.float32([centre + side, [centre[0] + side, centre[1] - side], centre - side])


def affine_from_points(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """``cv2.getAffineTransform(src, dst)`` for (N, 3, 2) points: M (N, 2, 3), M [x y 1] =
    dst, solved in float64."""
    src = np.broadcast_to(np.asarray(src, np.float64), dst.shape)
    a = np.concatenate([src, np.ones((*src.shape[:-1], 1))], axis=-1)  # (N, 3, 3)
    return np.linalg.solve(a, np.asarray(dst, np.float64)).transpose(0, 2, 1)


def elastic_transform(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """cv2.warpAffine by a random affine map (three points moved by up to alpha_affine),
    then map_coordinates along a smooth random displacement field (skimage gaussian of
    uniform noise, truncate 3, times alpha): two resamplings, as the reference."""
    n, h, w, _ = x.shape
    alpha, sigma, alpha_affine = (
        h * v
        for v in _pick(
            (
                (0, 0, 0.08),
                (0.05, 0.2, 0.07),
                (0.08, 0.06, 0.06),
                (0.1, 0.04, 0.05),
                (0.1, 0.03, 0.03),
            ),
            severity,
        )
    )
    # per image: 6 affine draws, then the x field, then the y field (np.random.uniform)
    u = rng.random((n, 6 + 2 * h * w))
    jitter = (-alpha_affine + (alpha_affine - -alpha_affine) * u[:, :6]).astype(np.float32)
    src = affine_points(h, w)
    dst = src + jitter.reshape(n, 3, 2)
    planes = np.ascontiguousarray(np.moveaxis(_f32(x), -1, 0))  # (C, N, H, W)
    warped = _warp_affine(planes, affine_from_points(src, dst))
    fields = -1 + (1 - -1) * u[:, 6:].reshape(n, 2, h, w)
    dx = (_gaussian(fields[:, 0], sigma, mode="reflect", truncate=3) * alpha).astype(np.float32)
    dy = (_gaussian(fields[:, 1], sigma, mode="reflect", truncate=3) * alpha).astype(np.float32)
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    rows, cols = yy + dy.astype(np.float64), xx + dx.astype(np.float64)
    return _out(np.moveaxis(_map_coordinates(warped, rows, cols), 0, -1))


def _pil_roundtrip(x: np.ndarray, fn: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    out = np.empty_like(x)
    for i, img in enumerate(x):
        pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        res = np.asarray(fn(pil))
        out[i] = res[..., None] if res.ndim == 2 else res
    return out


def pixelate(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = _pick((0.95, 0.9, 0.85, 0.75, 0.65), severity)
    h, w = x.shape[1:3]
    small = (int(w * c), int(h * c))
    return _pil_roundtrip(x, lambda im: im.resize(small, Image.BOX).resize((w, h), Image.BOX))


def jpeg_compression(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    quality = _pick((80, 65, 58, 50, 40), severity)

    def roundtrip(im: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality)
        buf.seek(0)
        return Image.open(buf).convert(im.mode)

    return _pil_roundtrip(x, roundtrip)


FUNCTIONS: dict[str, Corruption] = {name: globals()[name] for name in CORRUPTIONS}


def corrupt(x: np.ndarray, name: str, severity: int, seed: int, **options) -> np.ndarray:
    """``x`` (N, H, W, C) uint8 under corruption ``name`` at ``severity``, seeded.

    ``options`` go to the corruption function: ``true_swap=True`` for ``glass_blur``
    exchanges pixels instead of reproducing the published data's copy. The batch is
    processed in chunks of :data:`CHUNK` images; the result does not depend on it."""
    if name not in FUNCTIONS:
        raise ValueError(f"unknown corruption {name!r}; valid: {', '.join(CORRUPTIONS)}")
    if x.dtype != np.uint8 or x.ndim != 4:
        raise ValueError(f"expected uint8 images (N, H, W, C), got {x.dtype} {x.shape}")
    _check_severity(severity)  # before any work
    fn, rng = FUNCTIONS[name], np.random.default_rng(seed)
    out = np.empty_like(x)
    for s in range(0, len(x), CHUNK):
        out[s : s + CHUNK] = fn(x[s : s + CHUNK], severity, rng, **options)
    return out
