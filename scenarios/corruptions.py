"""The 15 common corruptions at 5 severities (Hendrycks & Dietterich, ICLR 2019), batched.

A re-implementation of ``make_cifar_c.py`` in numpy / scipy / Pillow (no ImageMagick, no
OpenCV, no downloads) with the CIFAR-resolution (32 x 32) parameters listed in
docs/protocols.md ("Corruptions").
Every function takes a batch ``x`` of uint8 images (N, H, W, C) (C = 1 or 3), a
severity 1..5 and a ``numpy.random.Generator`` and returns uint8 images of the same
shape: the same seed gives the same output. Work is vectorised over the batch (the
sequential pixel swaps of glass blur run once per position for all images at once).

Where the original relies on something unavailable here, the substitute is named:

- ``motion_blur`` (and the snow layer's blur): ImageMagick's ``-motion-blur radius x sigma
  +angle`` is a one-sided Gaussian-weighted line kernel; it is built here directly (weights
  ``exp(-k^2 / 2 sigma^2)`` for k = 0..radius along the angle, bilinear sampling).
- ``frost``: the original blends crops of six frost photographs; those are not
  redistributable offline, so frost textures are **generated procedurally** (branching
  ice-crystal strokes over fractal noise, blurred), seeded, and blended with the same
  (image weight, frost weight) per severity.
- ``defocus_blur`` / ``elastic_transform``: the OpenCV calls (``filter2D``,
  ``GaussianBlur``, ``warpAffine`` with BORDER_REFLECT_101) become their scipy.ndimage
  equivalents (``mode="mirror"`` is reflect-101).
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from matplotlib.colors import hsv_to_rgb, rgb_to_hsv
from PIL import Image
from scipy import fft as sp_fft
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

Corruption = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]


def _float(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) / 255.0


def _uint8(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def _pick(values: tuple, severity: int):
    if not 1 <= severity <= 5:
        raise ValueError(f"corruption severity must be in 1..5, got {severity}")
    return values[severity - 1]


def _gray(x: np.ndarray) -> np.ndarray:
    """(N, H, W, 1) luminance of float images (ITU-R 601, as PIL's "L")."""
    if x.shape[-1] == 1:
        return x
    return (x @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]


# ------------------------------------------------------------------------- noise
def gaussian_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = _pick((0.04, 0.06, 0.08, 0.09, 0.10), severity)
    f = _float(x)
    return _uint8(f + rng.normal(size=f.shape, scale=c).astype(np.float32))


def shot_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = _pick((500, 250, 100, 75, 50), severity)
    return _uint8(rng.poisson(_float(x) * c) / c)


def impulse_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Salt and pepper: a fraction ``amount`` of the values, half set to 1, half to 0."""
    amount = _pick((0.01, 0.02, 0.03, 0.05, 0.07), severity)
    f = _float(x)
    hit = rng.random(f.shape) < amount
    salt = rng.random(f.shape) < 0.5
    f = np.where(hit & salt, 1.0, f)
    return _uint8(np.where(hit & ~salt, 0.0, f))


# -------------------------------------------------------------------------- blur
def _gaussian_kernel_1d(sigma: float, radius: int = 1) -> np.ndarray:
    k = np.exp(-(np.arange(-radius, radius + 1) ** 2) / (2 * sigma**2))
    return k / k.sum()


def _disk(radius: float, alias_blur: float) -> np.ndarray:
    """make_cifar_c's aliased disk kernel, then a 3x3 Gaussian blur of the kernel."""
    size = np.arange(-8, 9) if radius <= 8 else np.arange(-radius, radius + 1)
    xx, yy = np.meshgrid(size, size)
    disk = ((xx**2 + yy**2) <= radius**2).astype(np.float32)
    disk /= disk.sum()
    g = _gaussian_kernel_1d(alias_blur)
    disk = ndimage.convolve1d(
        ndimage.convolve1d(disk, g, axis=0, mode="mirror"), g, axis=1, mode="mirror"
    )
    return disk / disk.sum()


def defocus_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    radius, alias = _pick(((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)), severity)
    kernel = _disk(radius, alias)[None, :, :, None]
    return _uint8(ndimage.convolve(_float(x), kernel, mode="mirror"))


def _gaussian(f: np.ndarray, sigma: float) -> np.ndarray:
    """skimage.filters.gaussian(multichannel) on a batch: blur H and W only."""
    return ndimage.gaussian_filter(f, sigma=(0, sigma, sigma, 0), mode="nearest", truncate=4.0)


def glass_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Blur, then locally shuffle pixels (sequential swaps, batched over images), blur."""
    sigma, delta, iterations = _pick(
        ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)), severity
    )
    f = _gaussian(_float(x), sigma)
    n, h, w, _ = f.shape
    rows = np.arange(n)
    for _ in range(iterations):
        for i in range(h - delta, delta, -1):
            for j in range(w - delta, delta, -1):
                d = rng.integers(-delta, delta, size=(n, 2), endpoint=False)
                i2, j2 = i + d[:, 1], j + d[:, 0]
                a, b = f[rows, i, j].copy(), f[rows, i2, j2].copy()
                f[rows, i, j], f[rows, i2, j2] = b, a
    return _uint8(_gaussian(f, sigma))


def _line_kernels(radius: int, sigma: float, angles: np.ndarray) -> np.ndarray:
    """(N, 2r+1, 2r+1) convolution kernels of a one-sided Gaussian-weighted line: weight
    ``exp(-k^2 / 2 sigma^2)`` for k = 0..radius, splatted bilinearly at ``-k (cos a, sin a)``
    so that ``out(p) = sum_k w_k img(p + k d)`` (ImageMagick's motion blur)."""
    k = np.arange(radius + 1, dtype=np.float64)
    w = np.exp(-(k**2) / (2 * sigma**2))
    w /= w.sum()
    size = 2 * radius + 1
    kernels = np.zeros((len(angles), size, size))
    rad = np.deg2rad(angles)[:, None]
    ys, xs = radius - k[None] * np.sin(rad), radius - k[None] * np.cos(rad)  # (N, K)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    fy, fx = ys - y0, xs - x0
    rows = np.repeat(np.arange(len(angles)), len(k))
    for dy, dx, wt in (
        (0, 0, (1 - fy) * (1 - fx)),
        (1, 0, fy * (1 - fx)),
        (0, 1, (1 - fy) * fx),
        (1, 1, fy * fx),
    ):
        yy, xx = np.clip(y0 + dy, 0, size - 1), np.clip(x0 + dx, 0, size - 1)
        np.add.at(kernels, (rows, yy.ravel(), xx.ravel()), (wt * w[None]).ravel())
    return kernels


def _convolve_each(f: np.ndarray, kernels: np.ndarray) -> np.ndarray:
    """Image i of (N, H, W, C) convolved with kernel i (N, k, k), edges replicated (FFT)."""
    h, w = f.shape[1:3]
    r = kernels.shape[1] // 2
    padded = np.pad(f, ((0, 0), (r, r), (r, r), (0, 0)), mode="edge").transpose(0, 3, 1, 2)
    # linear, not circular, convolution: at least (H + 4r) per side, an FFT-friendly size
    shape = (sp_fft.next_fast_len(h + 4 * r, real=True), sp_fft.next_fast_len(w + 4 * r, real=True))
    spec = sp_fft.rfft2(np.ascontiguousarray(padded), s=shape, workers=-1)
    spec *= sp_fft.rfft2(kernels.astype(np.float32), s=shape, workers=-1)[:, None]
    full = sp_fft.irfft2(spec, s=shape, workers=-1)
    return full[:, :, 2 * r : 2 * r + h, 2 * r : 2 * r + w].transpose(0, 2, 3, 1).astype(np.float32)


def _motion(f: np.ndarray, radius: int, sigma: float, angles: np.ndarray) -> np.ndarray:
    """One-sided Gaussian line blur of each image along its angle (degrees)."""
    return _convolve_each(f, _line_kernels(radius, sigma, angles))


def motion_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    radius, sigma = _pick(((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)), severity)
    angles = rng.uniform(-45, 45, size=len(x))
    return _uint8(_motion(_float(x), radius, sigma, angles))


def _zoom_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) linear interpolation of scipy.ndimage.zoom(order=1) along one axis
    (corner-aligned: input position = output index * (n_in - 1) / (n_out - 1))."""
    pos = np.arange(n_out) * (n_in - 1) / max(n_out - 1, 1)
    lo = np.clip(np.floor(pos).astype(int), 0, n_in - 1)
    hi = np.clip(lo + 1, 0, n_in - 1)
    frac = pos - lo
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), lo] += 1 - frac
    m[np.arange(n_out), hi] += frac
    return m


def _clipped_zoom(f: np.ndarray, factor: float) -> np.ndarray:
    """make_cifar_c's clipped_zoom on a batch (N, H, W, C): crop the centre ceil(H / z),
    zoom it by z (bilinear), crop the centre H x W again. Separable: two small matmuls."""
    h = f.shape[1]
    ch = int(np.ceil(h / factor))
    top = (h - ch) // 2
    crop = f[:, top : top + ch, top : top + ch]
    out_size = round(ch * factor)
    trim = (out_size - h) // 2
    m = _zoom_matrix(ch, out_size)[trim : trim + h].astype(np.float32)  # (H, ch)
    rows = np.tensordot(m, crop, axes=([1], [1]))  # (H, N, ch, C): one GEMM
    both = np.tensordot(rows, m, axes=([2], [1]))  # (H, N, C, W)
    return np.ascontiguousarray(both.transpose(1, 0, 3, 2))


def zoom_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    top = _pick((1.06, 1.11, 1.16, 1.21, 1.26), severity)
    factors = np.arange(1.0, top, 0.01)
    f = _float(x)
    out = np.zeros_like(f)
    for z in factors:
        out += _clipped_zoom(f, float(z))
    return _uint8((f + out) / (len(factors) + 1))


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
    f = _float(x)
    n, h, w, _ = f.shape
    layer = rng.normal(loc=loc, scale=scale, size=(n, h, w, 1)).astype(np.float32)
    if zoom > 1:
        layer = _clipped_zoom(layer, zoom)
    layer = np.where(layer < threshold, 0.0, layer).astype(np.float32)
    layer = np.clip(_motion(layer, radius, sigma, rng.uniform(-135, -45, size=n)), 0, 1)
    f = blend * f + (1 - blend) * np.maximum(f, _gray(f) * 1.5 + 0.5)
    return _uint8(f + layer + np.rot90(layer, k=2, axes=(1, 2)))


def frost_texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """A procedural frost texture (size, size) in [0, 1]: branching ice-crystal strokes
    over fractal noise, softly blurred. Stands in for make_cifar_c's frost photographs."""
    base = plasma_fractal(size, 2.0, rng) * 0.35
    strokes = np.zeros((size, size), np.float32)
    for _ in range(size // 2):
        y, x = rng.uniform(0, size, 2)
        angle = rng.uniform(0, 2 * np.pi)
        for _ in range(int(rng.integers(size // 4, size))):
            yi, xi = int(y) % size, int(x) % size
            strokes[yi, xi] = max(strokes[yi, xi], rng.uniform(0.6, 1.0))
            angle += rng.normal(0, 0.35)
            y, x = y + np.sin(angle), x + np.cos(angle)
    tex = base + ndimage.gaussian_filter(strokes, 0.6) * 1.6
    return np.clip(tex / max(float(tex.max()), 1e-6), 0, 1).astype(np.float32)


def frost(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    img_w, frost_w = _pick(((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)), severity)
    f = _float(x)
    n, h, w, c = f.shape
    textures = np.stack([frost_texture(2 * h, rng) for _ in range(4)])
    pick = rng.integers(0, len(textures), n)
    oy, ox = rng.integers(0, h, n), rng.integers(0, w, n)
    crops = np.stack(
        [textures[p, a : a + h, b : b + w] for p, a, b in zip(pick, oy, ox, strict=True)]
    )
    return _uint8(img_w * f + frost_w * np.repeat(crops[..., None], c, axis=-1))


def plasma_fractal(mapsize: int, wibbledecay: float, rng: np.random.Generator) -> np.ndarray:
    """Diamond-square fractal (mapsize a power of 2) in [0, 1], as make_cifar_c's fog."""
    if mapsize & (mapsize - 1):
        raise ValueError(f"mapsize must be a power of two, got {mapsize}")
    maparray = np.zeros((mapsize, mapsize), dtype=np.float64)
    stepsize = mapsize
    wibble = 100.0

    def wibbledmean(a: np.ndarray) -> np.ndarray:
        return a / 4 + wibble * rng.uniform(-wibble, wibble, a.shape)

    while stepsize >= 2:
        half = stepsize // 2
        # squares: the centre of each square from its four corners
        corners = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        sq = corners + np.roll(corners, -1, axis=0)
        sq = sq + np.roll(sq, -1, axis=1)
        maparray[half:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(sq)
        # diamonds: edge midpoints from their neighbours
        drgrid = maparray[half:mapsize:stepsize, half:mapsize:stepsize]
        ulgrid = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        ldr = drgrid + np.roll(drgrid, 1, axis=0)
        lul = ulgrid + np.roll(ulgrid, -1, axis=1)
        maparray[0:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(ldr + lul)
        tdr = drgrid + np.roll(drgrid, 1, axis=1)
        tul = ulgrid + np.roll(ulgrid, -1, axis=0)
        maparray[half:mapsize:stepsize, 0:mapsize:stepsize] = wibbledmean(tdr + tul)
        stepsize //= 2
        wibble /= wibbledecay
    maparray -= maparray.min()
    return (maparray / maparray.max()).astype(np.float32)


def fog(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    amount, decay = _pick(((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)), severity)
    f = _float(x)
    n, h, w, _ = f.shape
    size = 1 << int(np.ceil(np.log2(max(h, w))))
    fractal = np.stack([plasma_fractal(size, decay, rng)[:h, :w] for _ in range(n)])[..., None]
    peak = f.reshape(n, -1).max(axis=1)[:, None, None, None]
    return _uint8((f + amount * fractal) * peak / (peak + amount))


# ------------------------------------------------------------------------ digital
def brightness(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = _pick((0.05, 0.1, 0.15, 0.2, 0.3), severity)
    f = _float(x)
    if f.shape[-1] == 1:  # grey: V is the value itself
        return _uint8(f + c)
    hsv = rgb_to_hsv(f)
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
    return _uint8(hsv_to_rgb(hsv))


def contrast(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = _pick((0.75, 0.5, 0.4, 0.3, 0.15), severity)
    f = _float(x)
    means = f.mean(axis=(1, 2), keepdims=True)
    return _uint8((f - means) * c + means)


def elastic_transform(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Random affine (corner points moved by up to alpha_affine), then a smooth random
    displacement field (Gaussian-filtered uniform noise, sigma, times alpha)."""
    size = x.shape[1]
    alpha, sigma, alpha_affine = (
        v * size
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
    f = _float(x)
    n, h, w, c = f.shape
    out = np.empty_like(f)
    centre, square = min(h, w) // 2, min(h, w) // 3
    src = np.array(
        [[centre + square, centre + square], [centre + square, centre - square],
         [centre - square, centre - square]], dtype=np.float64,
    )  # fmt: skip
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    for i in range(n):
        dst = src + rng.uniform(-alpha_affine, alpha_affine, size=src.shape)
        # the affine map sending dst -> src (what warpAffine's inverse mapping samples)
        a = np.linalg.solve(np.c_[dst, np.ones(3)], src)  # (3, 2): [x y 1] @ a
        img = f[i]
        mapped_x = a[0, 0] * xx + a[1, 0] * yy + a[2, 0]
        mapped_y = a[0, 1] * xx + a[1, 1] * yy + a[2, 1]
        if sigma > 0:
            dx = ndimage.gaussian_filter(rng.uniform(-1, 1, (h, w)), sigma, mode="reflect") * alpha
            dy = ndimage.gaussian_filter(rng.uniform(-1, 1, (h, w)), sigma, mode="reflect") * alpha
        else:
            dx = dy = np.zeros((h, w))
        coords = [mapped_y + dy, mapped_x + dx]
        for ch in range(c):
            out[i, :, :, ch] = ndimage.map_coordinates(
                img[:, :, ch], coords, order=1, mode="mirror"
            )
    return _uint8(out)


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


def corrupt(x: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """``x`` (N, H, W, C) uint8 under corruption ``name`` at ``severity``, seeded."""
    if name not in FUNCTIONS:
        raise ValueError(f"unknown corruption {name!r}; valid: {', '.join(CORRUPTIONS)}")
    if x.dtype != np.uint8 or x.ndim != 4:
        raise ValueError(f"expected uint8 images (N, H, W, C), got {x.dtype} {x.shape}")
    return FUNCTIONS[name](x, severity, np.random.default_rng(seed))
