"""make_cifar_c.py, one image at a time: the oracle of the corruption library's tests and
the per-image loop its benchmark times against.

The structure of ``make_cifar_c.py`` (github.com/hendrycks/robustness,
``ImageNet-C/create_c/make_cifar_c.py``), written out per image: each function takes one
uint8 RGB image (H, W, 3), a severity and a ``numpy.random.Generator`` standing in for the
global ``np.random`` (same calls, same order: ``np.random.normal`` -> ``rng.normal``,
``randint`` -> ``rng.integers``), and returns what the reference returns (a float image in
0..255, or uint8); :func:`corrupt_loop` applies the reference's ``np.uint8(...)``. Given
the same seed, the batched library (``scenarios/corruptions.py``) takes the same draws.

numpy, scipy (``ndimage.zoom``, ``map_coordinates``) and Pillow are used as the reference
uses them. Where the reference calls scikit-image, OpenCV or ImageMagick (Wand), this file
takes its own route, written from those libraries' documented arithmetic and not shared
with the library:

- ``skimage.filters.gaussian``: a sampled Gaussian, radius ``int(truncate sigma + 0.5)``,
  applied along rows then columns with scipy's symmetric accumulation, borders by np.pad;
- ``skimage.util.random_noise(mode="s&p")``: two uniform masks (flip, then salt);
- ``skimage.color`` rgb2hsv / hsv2rgb: the textbook (colorsys) formulas, per image;
- ``cv2.GaussianBlur`` / ``cv2.filter2D``: sums of shifted copies of a reflect-101 padded
  image; ``cv2.cvtColor(RGB2GRAY)``: .299 R + .587 G + .114 B in float32;
- ``cv2.imread`` + ``cv2.resize(fx=fy=0.2)``: Pillow, then bilinear resampling at the
  half-pixel-centre positions ``(i + 0.5) / 0.2 - 0.5``;
- ``cv2.getAffineTransform`` + ``cv2.warpAffine``: the 6 x 6 linear system, the inverse
  map, OpenCV's fixed-point source positions (1/32 pixel) and float32 bilinear table;
- Wand's ``motion_blur`` (ImageMagick 6, Q16): the MotionBlurImage taps, shifted copies of
  an edge-padded image, rounding to a 16-bit quantum and back to 8 bits;
- the PNG round trips of the reference (PIL -> Wand -> cv2): lossless, kept as PIL
  round trips where the reference quantises (snow's layer).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import map_coordinates
from scipy.ndimage import zoom as scizoom

# ------------------------------------------------------------------ helpers


def _gaussian_1d(sigma: float, truncate: float) -> np.ndarray:
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1)
    w = np.exp(-0.5 / (sigma * sigma) * x**2)
    return w / w.sum()


def gaussian(image: np.ndarray, sigma: float, mode: str = "nearest", truncate: float = 4.0):
    """skimage.filters.gaussian of a 2-D image or an (H, W, C) image (channels apart)."""
    if sigma <= 0:
        return image.astype(np.float64)
    w = _gaussian_1d(sigma, truncate)
    r = len(w) // 2
    pad_mode = {"nearest": "edge", "reflect": "symmetric"}[mode]
    out = image.astype(np.float64)
    for axis in (0, 1):
        if r == 0:
            continue
        widths = [(0, 0)] * out.ndim
        widths[axis] = (r, r)
        p = np.pad(out, widths, mode=pad_mode)
        n = out.shape[axis]

        def tap(k: int, p=p, n=n, axis=axis) -> np.ndarray:  # the input shifted by k
            return np.take(p, np.arange(r + k, r + k + n), axis=axis)

        acc = tap(0) * w[r]
        for k in range(r, 0, -1):  # outermost pair first, as scipy's correlate1d
            acc = acc + (tap(-k) + tap(k)) * w[r - k]
        out = acc
    return out


def _reflect101_pad(a: np.ndarray, r: int) -> np.ndarray:
    return np.pad(a, ((r, r), (r, r)), mode="reflect")


def cv2_gaussian_blur_3x3(a: np.ndarray, sigma: float) -> np.ndarray:
    """cv2.GaussianBlur(a, (3, 3), sigma) of a float32 2-D array: the float32 kernel
    (exp(-x^2 / 2 sigma^2), scaled by 1 / sum), rows then columns, center * k1 + (left +
    right) * k0, reflect-101 borders."""
    k = np.array([math.exp(-0.5 / (sigma * sigma) * t * t) for t in (-1.0, 0.0, 1.0)])
    k = k.astype(np.float32)
    k = (k * (1.0 / float(k.astype(np.float64).sum()))).astype(np.float32)
    p = np.pad(a, ((0, 0), (1, 1)), mode="reflect")
    a = p[:, 1:-1] * k[1] + (p[:, :-2] + p[:, 2:]) * k[0]
    p = np.pad(a, ((1, 1), (0, 0)), mode="reflect")
    return p[1:-1] * k[1] + (p[:-2] + p[2:]) * k[0]


def cv2_filter2d(a: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """cv2.filter2D(a, -1, kernel), reflect-101 border (a correlation)."""
    r = kernel.shape[0] // 2
    p = _reflect101_pad(a, r)
    h, w = a.shape
    out = np.zeros_like(a)
    for i in range(kernel.shape[0]):
        for j in range(kernel.shape[1]):
            if kernel[i, j] != 0:
                out += float(kernel[i, j]) * p[i : i + h, j : j + w]
    return out


def rgb2gray(x: np.ndarray) -> np.ndarray:
    """cv2.cvtColor(x, cv2.COLOR_RGB2GRAY) of float32 RGB."""
    c = np.float32([0.299, 0.587, 0.114])
    return x[..., 0] * c[0] + x[..., 1] * c[1] + x[..., 2] * c[2]


def disk(radius: float, alias_blur: float = 0.1, dtype=np.float32) -> np.ndarray:
    if radius <= 8:
        L = np.arange(-8, 8 + 1)
    else:
        raise NotImplementedError("radius > 8 (5 x 5 blur) is not used at CIFAR's severities")
    X, Y = np.meshgrid(L, L)
    aliased_disk = np.array(radius**2 >= X**2 + Y**2, dtype=dtype)
    aliased_disk /= np.sum(aliased_disk)
    return cv2_gaussian_blur_3x3(aliased_disk, alias_blur)


def plasma_fractal(rng, mapsize: int = 32, wibbledecay: float = 3) -> np.ndarray:
    """Diamond-square heightmap (mapsize, mapsize) in [0, 1]."""
    assert mapsize & (mapsize - 1) == 0
    maparray = np.zeros((mapsize, mapsize))
    stepsize = mapsize
    wibble = 100.0

    def wibbledmean(array):
        return array / 4 + wibble * rng.uniform(-wibble, wibble, array.shape)

    while stepsize >= 2:
        half = stepsize // 2
        corners = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        squareaccum = corners + np.roll(corners, shift=-1, axis=0)
        squareaccum += np.roll(squareaccum, shift=-1, axis=1)
        maparray[half:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(squareaccum)
        drgrid = maparray[half:mapsize:stepsize, half:mapsize:stepsize]
        ulgrid = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        ltsum = (drgrid + np.roll(drgrid, 1, axis=0)) + (ulgrid + np.roll(ulgrid, -1, axis=1))
        maparray[0:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(ltsum)
        ttsum = (drgrid + np.roll(drgrid, 1, axis=1)) + (ulgrid + np.roll(ulgrid, -1, axis=0))
        maparray[half:mapsize:stepsize, 0:mapsize:stepsize] = wibbledmean(ttsum)
        stepsize //= 2
        wibble /= wibbledecay
    maparray -= maparray.min()
    return maparray / maparray.max()


def clipped_zoom(img: np.ndarray, zoom_factor: float) -> np.ndarray:
    h = img.shape[0]
    ch = int(np.ceil(h / zoom_factor))
    top = (h - ch) // 2
    img = scizoom(img[top : top + ch, top : top + ch], (zoom_factor, zoom_factor, 1), order=1)
    trim_top = (img.shape[0] - h) // 2
    return img[trim_top : trim_top + h, trim_top : trim_top + h]


def motion_blur_magick(img: np.ndarray, radius: float, sigma: float, angle: float):
    """ImageMagick 6 (Q16) MotionBlurImage of a uint8 (H, W) or (H, W, C) image, as the
    8-bit PNG Wand writes (values rounded to 16-bit quanta, then to 8 bits)."""
    width = int(2 * math.ceil(radius) + 1)  # GetOptimalKernelWidth1D, radius > 0
    kernel = [math.exp(-(i * i) / (2.0 * sigma * sigma)) / (math.sqrt(2 * math.pi) * sigma)
              for i in range(width)]  # fmt: skip
    norm = sum(kernel)
    kernel = [k / norm for k in kernel]
    theta = math.pi * angle / 180.0
    px, py = width * math.sin(theta), width * math.cos(theta)
    hyp = math.hypot(px, py)
    r = width - 1
    a = img.astype(np.float64)
    widths = ((r, r), (r, r)) + ((0, 0),) * (a.ndim - 2)
    pad = np.pad(a, widths, mode="edge")  # "edge" virtual pixels
    h, w = a.shape[:2]
    acc = np.zeros_like(a)
    for i, k in enumerate(kernel):
        dx = math.ceil(i * py / hyp - 0.5)
        dy = math.ceil(i * px / hyp - 0.5)
        acc += k * (pad[r + dy : r + dy + h, r + dx : r + dx + w] * 257.0)
    quantum = np.clip(np.floor(acc + 0.5), 0, 65535)  # ClampToQuantum
    return np.floor(quantum * 255.0 / 65535.0 + 0.5).astype(np.uint8)  # to 8 bits


def _frost_folder() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("imagecorruptions")
    return Path(next(iter(spec.submodule_search_locations))) / "frost"


_FROST: dict[int, np.ndarray] = {}


def _resize_bilinear(a: np.ndarray, fx: float) -> np.ndarray:
    """cv2.resize(a, (0, 0), fx=fx, fy=fx), INTER_LINEAR: half-pixel centres, no
    antialiasing, edge indices clamped; rounded back to uint8."""
    out = a.astype(np.float64)
    for axis in (0, 1):
        n = out.shape[axis]
        n_out = round(n * fx)
        pos = (np.arange(n_out) + 0.5) / fx - 0.5
        lo = np.floor(pos).astype(int)
        t = pos - lo
        lo_c, hi_c = np.clip(lo, 0, n - 1), np.clip(lo + 1, 0, n - 1)
        shape = [1] * out.ndim
        shape[axis] = n_out
        t = t.reshape(shape)
        out = np.take(out, lo_c, axis=axis) * (1 - t) + np.take(out, hi_c, axis=axis) * t
    return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)


def frost_image(idx: int) -> np.ndarray:
    """frost<idx+1> as cv2 reads it (BGR), resized by 0.2."""
    if idx not in _FROST:
        name = ["frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg",
                "frost6.jpg"][idx]  # fmt: skip
        rgb = np.asarray(Image.open(_frost_folder() / name).convert("RGB"))
        _FROST[idx] = _resize_bilinear(rgb[..., ::-1], 0.2)
    return _FROST[idx]


def _rgb2hsv(x: np.ndarray) -> np.ndarray:
    """colorsys.rgb_to_hsv, vectorised over one image."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    maxc, minc = x.max(-1), x.min(-1)
    rangec = maxc - minc
    safe = np.where(rangec == 0, 1.0, rangec)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = np.where(r == maxc, bc - gc, np.where(g == maxc, 2.0 + rc - bc, 4.0 + gc - rc))
    h = np.where(rangec == 0, 0.0, (h / 6.0) % 1.0)
    s = np.where(rangec == 0, 0.0, rangec / np.where(maxc == 0, 1.0, maxc))
    return np.stack([h, s, maxc], -1)


def _hsv2rgb(x: np.ndarray) -> np.ndarray:
    """colorsys.hsv_to_rgb, vectorised over one image."""
    h, s, v = x[..., 0], x[..., 1], x[..., 2]
    i = np.floor(h * 6.0)
    f = h * 6.0 - i
    p, q, t = v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f))
    i = i.astype(int) % 6
    r = np.select([i == 0, i == 1, i == 2, i == 3, i == 4], [v, q, p, p, t], v)
    g = np.select([i == 0, i == 1, i == 2, i == 3, i == 4], [t, v, v, q, p], p)
    b = np.select([i == 0, i == 1, i == 2, i == 3, i == 4], [p, p, t, v, v], q)
    return np.where((s == 0)[..., None], v[..., None], np.stack([r, g, b], -1))


def get_affine_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """cv2.getAffineTransform: the 6 x 6 system for M (2 x 3), M [x y 1] = dst."""
    a = np.zeros((6, 6))
    b = np.zeros(6)
    for i in range(3):
        a[2 * i, 0:2] = a[2 * i + 1, 3:5] = src[i]
        a[2 * i, 2] = a[2 * i + 1, 5] = 1
        b[2 * i], b[2 * i + 1] = dst[i]
    return np.linalg.solve(a, b).reshape(2, 3)


def warp_affine_reflect101(image: np.ndarray, m: np.ndarray) -> np.ndarray:
    """cv2.warpAffine(image, m, (W, H), borderMode=cv2.BORDER_REFLECT_101) of a float32
    (H, W, C) image, OpenCV <= 4.10 arithmetic: inverse map, source positions in fixed
    point (x 1024, rounded half to even, + 16, >> 5: 1/32 pixel), float32 bilinear weights
    summed top-left, top-right, bottom-left, bottom-right."""
    (a, b, c), (d, e, f) = m
    det = a * e - b * d
    det = 1.0 / det if det != 0 else 0.0
    a2, e2 = e * det, a * det
    b2, d2 = b * -det, d * -det
    c2 = -a2 * c - b2 * f
    f2 = -d2 * c - e2 * f
    h, w = image.shape[:2]
    ys, xs = np.arange(h), np.arange(w)
    x_row = np.rint((b2 * ys + c2) * 1024).astype(np.int64) + 16  # per output row
    y_row = np.rint((e2 * ys + f2) * 1024).astype(np.int64) + 16
    x_col = np.rint(a2 * xs * 1024).astype(np.int64)  # per output column
    y_col = np.rint(d2 * xs * 1024).astype(np.int64)
    sx = (x_row[:, None] + x_col[None, :]) >> 5
    sy = (y_row[:, None] + y_col[None, :]) >> 5
    ix, iy = sx >> 5, sy >> 5
    tab = np.arange(32, dtype=np.float32) * np.float32(1.0 / 32)
    fx, fy = tab[sx & 31][..., None], tab[sy & 31][..., None]
    one = np.float32(1)
    c0, c1 = _r101(ix, w), _r101(ix + 1, w)
    r0, r1 = _r101(iy, h), _r101(iy + 1, h)
    out = image[r0, c0] * ((one - fy) * (one - fx))
    out = out + image[r0, c1] * ((one - fy) * fx)
    out = out + image[r1, c0] * (fy * (one - fx))
    return out + image[r1, c1] * (fy * fx)


def _r101(i: np.ndarray, n: int) -> np.ndarray:
    """BORDER_REFLECT_101 (gfedcb|abcdefgh|gfedcba), folded until inside."""
    i = i.copy()
    while True:
        low, high = i < 0, i >= n
        if not (low.any() or high.any()):
            return i
        i[low] = -i[low]
        i[high] = 2 * n - 2 - i[high]


# ------------------------------------------------------------------ corruptions


def gaussian_noise(x, severity, rng):
    c = [0.04, 0.06, 0.08, 0.09, 0.10][severity - 1]
    x = np.array(x) / 255.0
    return np.clip(x + rng.normal(size=x.shape, scale=c), 0, 1) * 255


def shot_noise(x, severity, rng):
    c = [500, 250, 100, 75, 50][severity - 1]
    x = np.array(x) / 255.0
    return np.clip(rng.poisson(x * c) / c, 0, 1) * 255


def impulse_noise(x, severity, rng):
    c = [0.01, 0.02, 0.03, 0.05, 0.07][severity - 1]
    x = np.array(x) / 255.0
    flipped = rng.random(x.shape) < c  # random_noise(mode="s&p", amount=c, salt_vs_pepper=.5)
    salted = rng.random(x.shape) < 0.5
    x = x.copy()
    x[flipped & salted] = 1
    x[flipped & ~salted] = 0
    return np.clip(x, 0, 1) * 255


def defocus_blur(x, severity, rng):
    c = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)][severity - 1]
    x = np.array(x) / 255.0
    kernel = disk(radius=c[0], alias_blur=c[1])
    channels = [cv2_filter2d(x[:, :, d], kernel) for d in range(3)]
    return np.clip(np.stack(channels, -1), 0, 1) * 255


def glass_blur(x, severity, rng, true_swap=False):
    c = [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)][severity - 1]
    x = np.uint8(gaussian(np.array(x) / 255.0, sigma=c[0]) * 255)
    h, w = x.shape[:2]
    for _ in range(c[2]):
        for hh in range(h - c[1], c[1], -1):
            for ww in range(w - c[1], c[1], -1):
                dx, dy = rng.integers(-c[1], c[1], size=(2,))
                h_prime, w_prime = hh + dy, ww + dx
                if true_swap:
                    x[hh, ww], x[h_prime, w_prime] = x[h_prime, w_prime].copy(), x[hh, ww].copy()
                else:  # the reference's statement: the right-hand side holds numpy views
                    x[hh, ww], x[h_prime, w_prime] = x[h_prime, w_prime], x[hh, ww]
    return np.clip(gaussian(x / 255.0, sigma=c[0]), 0, 1) * 255


def motion_blur(x, severity, rng):
    c = [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)][severity - 1]
    # PIL -> PNG -> Wand, blurred, -> PNG -> cv2 (BGR) -> RGB: lossless round trips
    return motion_blur_magick(np.array(x), c[0], c[1], rng.uniform(-45, 45))


def zoom_blur(x, severity, rng):
    top = [1.06, 1.11, 1.16, 1.21, 1.26][severity - 1]
    c = np.arange(1, top, 0.01)
    x = (np.array(x) / 255.0).astype(np.float32)
    out = np.zeros_like(x)
    for zoom_factor in c:
        out += clipped_zoom(x, zoom_factor)
    x = (x + out) / (len(c) + 1)
    return np.clip(x, 0, 1) * 255


def snow(x, severity, rng):
    c = [
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
        (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
    ][severity - 1]
    x = np.array(x, dtype=np.float32) / 255.0
    snow_layer = rng.normal(size=x.shape[:2], loc=c[0], scale=c[1])
    snow_layer = clipped_zoom(snow_layer[..., np.newaxis], c[2])
    snow_layer[snow_layer < c[3]] = 0
    layer = Image.fromarray((np.clip(snow_layer.squeeze(), 0, 1) * 255).astype(np.uint8))
    buf = io.BytesIO()
    layer.save(buf, format="PNG")
    layer = np.asarray(Image.open(io.BytesIO(buf.getvalue())))
    snow_layer = motion_blur_magick(layer, c[4], c[5], rng.uniform(-135, -45)) / 255.0
    snow_layer = snow_layer[..., np.newaxis]
    grey = rgb2gray(x)[..., np.newaxis]
    x = c[6] * x + (1 - c[6]) * np.maximum(x, grey * 1.5 + 0.5)
    return np.clip(x + snow_layer + np.rot90(snow_layer, k=2), 0, 1) * 255


def frost(x, severity, rng):
    c = [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)][severity - 1]
    idx = rng.integers(5)
    fr = frost_image(int(idx))
    h, w = np.array(x).shape[:2]
    x_start, y_start = rng.integers(0, fr.shape[0] - h), rng.integers(0, fr.shape[1] - w)
    fr = fr[x_start : x_start + h, y_start : y_start + w][..., [2, 1, 0]]
    return np.clip(c[0] * np.array(x) + c[1] * fr, 0, 255)


def fog(x, severity, rng):
    c = [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)][severity - 1]
    x = np.array(x) / 255.0
    max_val = x.max()
    h, w = x.shape[:2]
    x += c[0] * plasma_fractal(rng, wibbledecay=c[1])[:h, :w][..., np.newaxis]
    return np.clip(x * max_val / (max_val + c[0]), 0, 1) * 255


def brightness(x, severity, rng):
    c = [0.05, 0.1, 0.15, 0.2, 0.3][severity - 1]
    x = np.array(x) / 255.0
    x = _rgb2hsv(x)
    x[:, :, 2] = np.clip(x[:, :, 2] + c, 0, 1)
    x = _hsv2rgb(x)
    return np.clip(x, 0, 1) * 255


def contrast(x, severity, rng):
    c = [0.75, 0.5, 0.4, 0.3, 0.15][severity - 1]
    x = np.array(x) / 255.0
    means = np.mean(x, axis=(0, 1), keepdims=True)
    return np.clip((x - means) * c + means, 0, 1) * 255


def elastic_transform(image, severity, rng):
    image = np.array(image, dtype=np.float32) / 255.0
    shape = image.shape
    size = shape[0]
    c = [
        (size * 0, size * 0, size * 0.08),
        (size * 0.05, size * 0.2, size * 0.07),
        (size * 0.08, size * 0.06, size * 0.06),
        (size * 0.1, size * 0.04, size * 0.05),
        (size * 0.1, size * 0.03, size * 0.03),
    ][severity - 1]
    shape_size = shape[:2]
    center_square = np.float32(shape_size) // 2
    square_size = min(shape_size) // 3
    pts1 = np.float32(
        [
            center_square + square_size,
            [center_square[0] + square_size, center_square[1] - square_size],
            center_square - square_size,
        ]
    )
    pts2 = pts1 + rng.uniform(-c[2], c[2], size=pts1.shape).astype(np.float32)
    m = get_affine_transform(pts1.astype(np.float64), pts2.astype(np.float64))
    image = warp_affine_reflect101(image, m)
    dx = gaussian(rng.uniform(-1, 1, size=shape[:2]), c[1], mode="reflect", truncate=3) * c[0]
    dy = gaussian(rng.uniform(-1, 1, size=shape[:2]), c[1], mode="reflect", truncate=3) * c[0]
    dx, dy = dx.astype(np.float32)[..., None], dy.astype(np.float32)[..., None]
    x, y, z = np.meshgrid(np.arange(shape[1]), np.arange(shape[0]), np.arange(shape[2]))
    indices = np.reshape(y + dy, (-1, 1)), np.reshape(x + dx, (-1, 1)), np.reshape(z, (-1, 1))
    warped = map_coordinates(image, indices, order=1, mode="reflect").reshape(shape)
    return np.clip(warped, 0, 1) * 255


def pixelate(x, severity, rng):
    c = [0.95, 0.9, 0.85, 0.75, 0.65][severity - 1]
    x = Image.fromarray(np.asarray(x))
    w, h = x.size
    x = x.resize((int(w * c), int(h * c)), Image.BOX)
    return x.resize((w, h), Image.BOX)


def jpeg_compression(x, severity, rng):
    c = [80, 65, 58, 50, 40][severity - 1]
    output = io.BytesIO()
    Image.fromarray(np.asarray(x)).save(output, "JPEG", quality=c)
    return Image.open(output)


FUNCTIONS = {
    f.__name__: f
    for f in (
        gaussian_noise, shot_noise, impulse_noise, defocus_blur, glass_blur, motion_blur,
        zoom_blur, snow, frost, fog, brightness, contrast, elastic_transform, pixelate,
        jpeg_compression,
    )
}  # fmt: skip


def corrupt_loop(x: np.ndarray, name: str, severity: int, seed: int, **options) -> np.ndarray:
    """The reference's loop: ``np.uint8(corruption(img, severity))`` image by image, with
    one ``Generator(seed)`` for the whole batch."""
    rng = np.random.default_rng(seed)
    fn = FUNCTIONS[name]
    return np.stack([np.uint8(fn(img, severity, rng, **options)) for img in x])
