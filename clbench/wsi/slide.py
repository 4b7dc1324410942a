"""Opening whole-slide images and reading them at reduced resolution.

OpenSlide (``openslide-python``) is used when it is importable, as in CLAM; otherwise
``tiffslide``, a pure-Python reader of SVS and tiled (pyramidal) TIFF with the same API.
Both return regions in level-0 coordinates and pad reads past the border with black.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clbench.errors import ClbenchError

#: file name endings taken as slides when a folder is given
SLIDE_EXTENSIONS = (
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".scn",
    ".bif",
    ".mrxs",
    ".vms",
    ".vmu",
    ".svslide",
    ".qptiff",
)

#: pixels read per strip by :func:`read_downsampled` (bounds its memory: ~100 MB RGB)
STRIP_PIXELS = 1 << 25


def slide_id(path: Path) -> str:
    """The slide's id: its file name without the extension (CLAM's convention)."""
    return Path(path).stem


def expand_slides(paths: Sequence[str | Path]) -> list[Path]:
    """Slide files from files and folders (a folder: its files with a slide extension,
    sorted); a missing path, an empty folder or two slides with one id is an error."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and _is_slide_name(f.name))
            if not found:
                raise ClbenchError(
                    f"no slide in folder {p} (looked for {', '.join(SLIDE_EXTENSIONS)})"
                )
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise ClbenchError(f"no such slide file or folder: {p}")
    seen: dict[str, Path] = {}
    for p in out:
        other = seen.setdefault(slide_id(p), p)
        if other != p:
            raise ClbenchError(
                f"two slides share the id {slide_id(p)!r} ({other} and {p}); outputs are named "
                "by slide id, so give slides with distinct file names"
            )
    return out


def _is_slide_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(SLIDE_EXTENSIONS)


def reader_name() -> str:
    """``openslide`` when openslide-python imports (with its native library), else
    ``tiffslide``."""
    try:
        import openslide  # noqa: F401
    except (ImportError, OSError):  # not installed, or libopenslide missing
        return "tiffslide"
    return "openslide"


def open_slide(path: str | Path) -> Any:
    """The slide at ``path`` as an OpenSlide-like object (``level_count``,
    ``level_dimensions``, ``level_downsamples``, ``read_region``, ``close``); a file neither
    reader can open is one ClbenchError line."""
    path = Path(path)
    if not path.is_file():
        raise ClbenchError(f"no such slide file: {path}")
    errors = []
    if reader_name() == "openslide":
        import openslide

        try:
            return openslide.OpenSlide(str(path))
        except Exception as e:  # an unsupported format: tiffslide may still read it
            errors.append(f"openslide: {_short(e)}")
    import tiffslide

    try:
        return tiffslide.TiffSlide(str(path))
    except Exception as e:  # not a TIFF, a corrupt header, an unsupported layout
        errors.append(f"tiffslide: {_short(e)}")
    raise ClbenchError(f"cannot open slide {path}: {'; '.join(errors)}")


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) < 160 else text[:157] + "..."


@contextlib.contextmanager
def opened(path: str | Path) -> Iterator[Any]:
    """:func:`open_slide` as a context manager that closes the slide."""
    slide = open_slide(path)
    try:
        yield slide
    finally:
        with contextlib.suppress(Exception):
            slide.close()


def level_downsamples(slide: Any) -> list[tuple[float, float]]:
    """Each level's (x, y) downsample from the level sizes, as CLAM estimates them (the
    reported downsample unless the sizes disagree with it)."""
    w0, h0 = slide.level_dimensions[0]
    out = []
    for reported, (w, h) in zip(slide.level_downsamples, slide.level_dimensions, strict=True):
        estimated = (w0 / float(w), h0 / float(h))
        same = estimated == (reported, reported)
        out.append((float(reported), float(reported)) if same else estimated)
    return out


def read_rgb(
    slide: Any, location: tuple[int, int], level: int, size: tuple[int, int]
) -> np.ndarray:
    """One region as an (h, w, 3) uint8 array (RGBA from OpenSlide made RGB as CLAM does)."""
    img = slide.read_region((int(location[0]), int(location[1])), int(level), size)
    return np.asarray(img.convert("RGB"))


def read_downsampled(slide: Any, level: int, factor: int) -> np.ndarray:
    """Level ``level`` of the slide shrunk ``factor`` times (area averaging), read in strips
    so that a large level is never held whole in memory; (h, w, 3) uint8 with
    ``w = max(1, round(level_w / factor))`` and likewise ``h``."""
    wl, hl = slide.level_dimensions[level]
    ds = slide.level_downsamples[level]
    mw, mh = max(1, round(wl / factor)), max(1, round(hl / factor))
    rows = max(factor, (STRIP_PIXELS // max(wl, 1)) // factor * factor)
    out = np.empty((mh, mw, 3), np.uint8)
    for r0 in range(0, hl, rows):
        r1 = min(hl, r0 + rows)
        o0, o1 = round(r0 * mh / hl), round(r1 * mh / hl)
        if o1 <= o0:
            continue
        strip = read_rgb(slide, (0, round(r0 * ds)), level, (wl, r1 - r0))
        if factor == 1 and strip.shape[:2] == (o1 - o0, mw):
            out[o0:o1] = strip
        else:
            import cv2

            out[o0:o1] = cv2.resize(strip, (mw, o1 - o0), interpolation=cv2.INTER_AREA)
    return out
