"""Offline source data for pretraining the micro ViT: rendered font glyphs.

Letters (and a few symbols, never digits) are rendered once per font with the TrueType
fonts that ship with matplotlib, fitted into a square box the way the UCI optdigits
bitmaps are (glyph scaled to fill the box, aspect ratio kept). Samples are then drawn on
the fly in torch: a random affine plus a smooth elastic warp, stroke-thickness variation,
thresholding to a 32x32 binary bitmap and the same 4x4 block counting as the digits data
(``clbench.lowres``), so the source lives in the continual data's format while sharing
no class with it.
"""

from __future__ import annotations

import inspect
import math
import string
from collections.abc import Iterator, Sequence
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from fontTools.ttLib import TTFont
from PIL import Image, ImageDraw, ImageFont

from clbench.lowres import block_count, to_model_input

#: Text fonts bundled with matplotlib whose glyph maps are plain Unicode (sorted, fixed).
FONT_FILES: tuple[str, ...] = tuple(
    sorted(
        f"{family}{style}.ttf"
        for family, styles in {
            "DejaVuSans": ("", "-Bold", "-Oblique", "-BoldOblique"),
            "DejaVuSansMono": ("", "-Bold", "-Oblique", "-BoldOblique"),
            "DejaVuSerif": ("", "-Bold", "-Italic", "-BoldItalic"),
            "STIXGeneral": ("", "Bol", "Italic", "BolIta"),
        }.items()
        for style in styles
    )
)
#: Source classes: the 52 Latin letters and a few symbols; no digit, by construction.
CHARACTERS: str = string.ascii_uppercase + string.ascii_lowercase + "#$%&?@"
SOURCE_DESCRIPTION = (
    f"{len(CHARACTERS)}-way glyph classification ({CHARACTERS}) rendered from "
    f"{len(FONT_FILES)} matplotlib fonts, randomly warped, thresholded to 32x32 binary, "
    "counted in 4x4 blocks (clbench.lowres)"
)
#: Bumped whenever rendering or sampling changes, so cached checkpoints are not reused.
SOURCE_VERSION = 1

BITMAP_SIZE = 32
_RENDER_PX = 96


def font_paths(fonts: Sequence[str] = FONT_FILES) -> list[Path]:
    """Absolute paths of ``fonts`` inside matplotlib's bundled font directory."""
    root = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    paths = [root / name for name in fonts]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"matplotlib fonts not found: {missing}")
    return paths


def _render_glyph(font: ImageFont.FreeTypeFont, char: str, size: int) -> np.ndarray:
    """One glyph cropped to its ink and fitted, centred, into a ``size`` x ``size`` box."""
    canvas = Image.new("L", (3 * _RENDER_PX, 3 * _RENDER_PX), 0)
    ImageDraw.Draw(canvas).text((_RENDER_PX, _RENDER_PX), char, fill=255, font=font)
    bbox = canvas.getbbox()
    if bbox is None:
        raise ValueError(f"font {font.path} renders {char!r} as blank")
    glyph = canvas.crop(bbox)
    scale = size / max(glyph.width, glyph.height)
    width = max(1, round(glyph.width * scale))
    height = max(1, round(glyph.height * scale))
    glyph = glyph.resize((width, height), Image.Resampling.LANCZOS)
    box = Image.new("L", (size, size), 0)
    box.paste(glyph, ((size - width) // 2, (size - height) // 2))
    return np.asarray(box, dtype=np.float32) / 255.0


@lru_cache(maxsize=4)
def render_templates(
    size: int = 64, fonts: tuple[str, ...] = FONT_FILES, characters: str = CHARACTERS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render every (font, character) once: ``(F*C, 1, size, size)`` in [0, 1] and labels."""
    images, labels = [], []
    for path in font_paths(fonts):
        font = ImageFont.truetype(str(path), _RENDER_PX)
        for label, char in enumerate(characters):
            images.append(_render_glyph(font, char, size))
            labels.append(label)
    templates = torch.from_numpy(np.stack(images)).unsqueeze(1)
    return templates, torch.tensor(labels, dtype=torch.long)


@cache
def _font_codepoints(path: str) -> frozenset[int]:
    """The code points a font file maps to a glyph (its best Unicode cmap)."""
    with TTFont(path, lazy=True) as font:
        return frozenset(font.getBestCmap() or {})


def fonts_with_glyph(char: str, fonts: Sequence[str] = FONT_FILES) -> tuple[str, ...]:
    """The fonts among ``fonts`` whose character map has a glyph for ``char`` (rendering a
    character a font lacks would draw its .notdef box, "tofu")."""
    return tuple(
        name
        for name, path in zip(fonts, font_paths(fonts), strict=True)
        if ord(char) in _font_codepoints(str(path))
    )


@lru_cache(maxsize=4)
def render_character_set(
    characters: str, fonts: tuple[str, ...] = FONT_FILES, size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render each character with every font of ``fonts`` that has a glyph for it:
    ``(T, 1, size, size)`` in [0, 1] and labels (positions in ``characters``), class-major.
    ``ValueError`` if a character is in none of the fonts."""
    images, labels = [], []
    for label, char in enumerate(characters):
        have = fonts_with_glyph(char, fonts)
        if not have:
            raise ValueError(f"no font of {list(fonts)} has a glyph for {char!r}")
        for path in font_paths(have):
            images.append(_render_glyph(_font(str(path)), char, size))
            labels.append(label)
    templates = torch.from_numpy(np.stack(images)).unsqueeze(1)
    return templates, torch.tensor(labels, dtype=torch.long)


@lru_cache(maxsize=32)
def _font(path: str) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, _RENDER_PX)


def stroke_width(binary: torch.Tensor) -> torch.Tensor:
    """Mean stroke width (pixels) of (N, 1, H, W) binary images: 2 * area / perimeter."""
    area = binary.sum((1, 2, 3))
    interior = -F.max_pool2d(-binary, 3, 1, 1)
    perimeter = (binary - interior).sum((1, 2, 3)).clamp_min(1.0)
    return 2.0 * area / perimeter


def _morph(binary: torch.Tensor, radius: int) -> torch.Tensor:
    """Dilate (radius > 0) or erode (radius < 0) with a (2|r|+1)-square structuring element."""
    if radius == 0:
        return binary
    k = 2 * abs(radius) + 1
    if radius > 0:
        return F.max_pool2d(binary, k, 1, abs(radius))
    return -F.max_pool2d(-binary, k, 1, abs(radius))


def normalise_strokes(templates: torch.Tensor, width: float, blur: float) -> torch.Tensor:
    """Re-draw glyphs with roughly uniform ``width``-pixel strokes, then Gaussian-blur them.

    Fonts differ a lot in weight (hairline italics to bold); handwriting is a pen of
    near-constant width. The blur makes a per-sample threshold act as a smooth thickness
    control later on.
    """
    binary = (templates > 0.5).float()
    radius = ((width - stroke_width(binary)) / 2).round().long()
    out = torch.empty_like(binary)
    for r in radius.unique().tolist():
        sel = radius == r
        out[sel] = _morph(binary[sel], int(r))
    if blur > 0:
        half = math.ceil(3 * blur)
        x = torch.arange(-half, half + 1, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (x / blur) ** 2)
        kernel = kernel / kernel.sum()
        out = F.conv2d(out, kernel.view(1, 1, 1, -1), padding=(0, half))
        out = F.conv2d(out, kernel.view(1, 1, -1, 1), padding=(half, 0))
    return out


@lru_cache(maxsize=4)
def _stroke_templates(
    size: int,
    fonts: tuple[str, ...],
    characters: str,
    stroke_widths: tuple[float, ...],
    blur: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All templates redrawn at each of ``stroke_widths`` (stacked) and their labels."""
    templates, labels = render_templates(size, fonts, characters)
    normalised = [normalise_strokes(templates, w, blur) for w in stroke_widths]
    return torch.cat(normalised), labels.repeat(len(stroke_widths))


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator).mul(high - low).add(low)


class GlyphSource:
    """Random, seeded glyph samples in the continual data's format.

    ``sample(n, generator)`` returns ``(x, y)``: ``x`` of shape ``(n, 1, 16, 16)`` in
    [-1, 1] (``clbench.lowres.to_model_input``) and integer labels in ``[0, num_classes)``.
    Geometry is in normalised box coordinates (the box spans [-1, 1]); stroke widths are
    in template pixels (``template_size`` spans the 32-pixel bitmap).
    """

    def __init__(
        self,
        fonts: Sequence[str] = FONT_FILES,
        characters: str = CHARACTERS,
        template_size: int = 64,
        stroke_widths: Sequence[float] = (7.0, 10.0),
        blur: float = 2.0,
        threshold: tuple[float, float] = (0.25, 0.75),
        rotation_deg: float = 12.0,
        scale: tuple[float, float] = (0.85, 1.05),
        squeeze: tuple[float, float] = (0.65, 1.0),
        shear: float = 0.25,
        translate: float = 0.06,
        elastic: float = 0.06,
    ) -> None:
        if any(c.isdigit() for c in characters):
            raise ValueError("glyph source must not contain digits (they are the target task)")
        self.characters = characters
        self.templates, self.labels = _stroke_templates(
            template_size, tuple(fonts), characters, tuple(stroke_widths), blur
        )
        self._set_warp(threshold, rotation_deg, scale, squeeze, shear, translate, elastic)

    def _set_warp(
        self,
        threshold: tuple[float, float],
        rotation_deg: float,
        scale: tuple[float, float],
        squeeze: tuple[float, float],
        shear: float,
        translate: float,
        elastic: float,
    ) -> None:
        self.threshold = threshold
        self.rotation = math.radians(rotation_deg)
        self.scale = scale
        self.squeeze = squeeze
        self.shear = shear
        self.translate = translate
        self.elastic = elastic

    @property
    def num_classes(self) -> int:
        return len(self.characters)

    def _template_index(
        self, n: int, generator: torch.Generator, classes: torch.Tensor | None
    ) -> torch.Tensor:
        """Which template each of ``n`` samples warps (of ``classes``, if given)."""
        if classes is None:
            return torch.randint(len(self.labels), (n,), generator=generator)
        fonts = len(self.labels) // self.num_classes  # templates are font-major
        font = torch.randint(fonts, (n,), generator=generator)
        index = font * self.num_classes + classes
        if not torch.equal(self.labels[index], classes):
            raise AssertionError("glyph templates are not laid out font-major")
        return index

    def _warp_grid(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Sampling grid (n, 32, 32, 2): random affine plus a smooth elastic displacement."""
        angle = _uniform(n, -self.rotation, self.rotation, generator)
        zoom = _uniform(n, *self.scale, generator)
        squeeze = _uniform(n, *self.squeeze, generator)
        shear = _uniform(n, -self.shear, self.shear, generator)
        shift = _uniform(2 * n, -self.translate, self.translate, generator).view(n, 2)
        # affine_grid maps output to template coordinates, i.e. the inverse of the forward
        # warp rotate @ shear @ scale: (scale^-1 @ shear^-1 @ rotate^T), written out.
        cos, sin = angle.cos(), angle.sin()
        sx, sy = zoom * squeeze, zoom
        theta = torch.stack(
            [
                (cos + shear * sin) / sx,
                (sin - shear * cos) / sx,
                shift[:, 0],
                -sin / sy,
                cos / sy,
                shift[:, 1],
            ],
            1,
        ).view(n, 2, 3)
        grid = F.affine_grid(theta, [n, 1, BITMAP_SIZE, BITMAP_SIZE], align_corners=False)
        if self.elastic > 0:
            coarse = torch.randn(n, 2, 4, 4, generator=generator).mul(self.elastic)
            field = F.interpolate(coarse, size=BITMAP_SIZE, mode="bilinear", align_corners=True)
            grid = grid + field.permute(0, 2, 3, 1)
        return grid

    def sample_bitmaps(
        self, n: int, generator: torch.Generator, classes: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` random (32, 32) binary bitmaps (float 0/1) and their labels; ``classes``
        (``n`` labels): render these classes, each in a uniformly drawn font."""
        index = self._template_index(n, generator, classes)
        gray = F.grid_sample(
            self.templates[index],
            self._warp_grid(n, generator),
            mode="bilinear",
            padding_mode="zeros",
            align_corners=False,
        )
        threshold = _uniform(n, *self.threshold, generator).view(n, 1, 1, 1)
        bitmap = (gray > threshold).float().squeeze(1)
        return bitmap, self.labels[index]

    def sample_counts(
        self, n: int, generator: torch.Generator, classes: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` random (8, 8) block-count images (levels 0..16), like ``load_digits().images``."""
        bitmap, labels = self.sample_bitmaps(n, generator, classes)
        return block_count(bitmap), labels

    def sample(
        self, n: int, generator: torch.Generator, classes: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` random model inputs ``(n, 1, 16, 16)`` in [-1, 1] and their labels
        (``classes``: the labels to render, one per sample)."""
        counts, labels = self.sample_counts(n, generator, classes)
        return to_model_input(counts), labels


class CharacterSetSource(GlyphSource):
    """:class:`GlyphSource` samples of any ``characters`` (digits allowed), each rendered
    only with the fonts of ``fonts`` that have a glyph for it (:func:`fonts_with_glyph`), so
    no sample is a missing-glyph box; same stroke normalisation, warps and thresholds
    (``warp``: the warp keywords of :class:`GlyphSource`). A sample of class ``c`` warps
    one of ``c``'s (font, stroke width) templates, drawn uniformly."""

    def __init__(
        self,
        characters: str,
        fonts: Sequence[str] = FONT_FILES,
        template_size: int = 64,
        stroke_widths: Sequence[float] = (7.0, 10.0),
        blur: float = 2.0,
        **warp: Any,
    ) -> None:
        if len(set(characters)) != len(characters):
            raise ValueError(f"repeated characters in {characters!r}")
        self.characters = characters
        templates, labels = render_character_set(characters, tuple(fonts), template_size)
        widths = [normalise_strokes(templates, w, blur) for w in stroke_widths]
        order = labels.repeat(len(widths)).argsort(stable=True)  # class-major again
        self.templates = torch.cat(widths)[order]
        self.labels = labels.repeat(len(widths))[order]
        counts = torch.bincount(self.labels, minlength=len(characters))
        self._count = counts
        self._start = counts.cumsum(0) - counts
        defaults = inspect.signature(GlyphSource).parameters
        kwargs = {k: defaults[k].default for k in inspect.signature(self._set_warp).parameters}
        unknown = sorted(set(warp) - set(kwargs))
        if unknown:
            raise TypeError(f"unknown warp keywords {unknown}; valid: {sorted(kwargs)}")
        self._set_warp(**{**kwargs, **warp})

    def _template_index(
        self, n: int, generator: torch.Generator, classes: torch.Tensor | None
    ) -> torch.Tensor:
        if classes is None:
            classes = torch.randint(self.num_classes, (n,), generator=generator)
        count = self._count[classes]
        pick = (torch.rand(n, generator=generator) * count).long().minimum(count - 1)
        return self._start[classes] + pick


def glyph_batches(
    seed: int, batch_size: int, source: GlyphSource | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless, reproducible stream of ``(x, y)`` glyph batches seeded by ``seed``."""
    source = source or GlyphSource()
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield source.sample(batch_size, generator)
