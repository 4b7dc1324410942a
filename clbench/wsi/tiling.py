"""Tissue segmentation and patch coordinates of whole slides, in CLAM's layout.

Follows CLAM's ``create_patches_fp.py`` (Lu et al., "Data-efficient and weakly supervised
computational pathology on whole-slide images", Nat. Biomed. Eng. 2021;
github.com/mahmoodlab/CLAM, ``wsi_core/WholeSlideImage.py``): saturation of the
median-blurred HSV image thresholded, closed, contoured with holes and filtered by area;
a patch grid over each tissue contour's bounding box at level 0, a patch kept by the
"four_pt" test. Outputs, under ``--out``: ``patches/<slide_id>.h5`` (dataset ``coords``,
N x 2 level-0 top-left (x, y), with CLAM's attributes), ``masks/<slide_id>.png`` and
``process_list_autogen.csv``. What differs from CLAM is in docs/wsi.md.
"""

from __future__ import annotations

import csv
import io
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from clbench.errors import ClbenchError, ConfigError
from clbench.wsi import slide as wsi_slide
from clbench.wsi.store import atomic_output, remove_stale_temps, write_text

#: CLAM's reference patch: areas are counted in 512 x 512 level-0 patches
REF_PATCH_SIZE = 512
#: CLAM segments at the level nearest this downsample (get_best_level_for_downsample(64))
SEG_TARGET_DOWNSAMPLE = 64
#: our floor: a slide whose best level is finer (one-level slides) is shrunk to about this
SEG_MIN_DOWNSAMPLE = 16
#: CLAM refuses to segment a level larger than this many pixels ("failed_seg")
SEG_MAX_PIXELS = 1e8

#: segmentation and filter presets (CLAM's defaults and presets/tcga.csv)
PRESETS: dict[str, dict[str, Any]] = {
    "default": {
        "sthresh": 8,
        "mthresh": 7,
        "close": 4,
        "use_otsu": False,
        "a_t": 100.0,
        "a_h": 16.0,
        "max_n_holes": 8,
    },
    "tcga": {
        "sthresh": 8,
        "mthresh": 7,
        "close": 4,
        "use_otsu": False,
        "a_t": 16.0,
        "a_h": 4.0,
        "max_n_holes": 8,
    },
}


@dataclass(frozen=True)
class TilingParams:
    """Segmentation, filtering and patching parameters (CLAM's names and defaults)."""

    patch_size: int = 256
    #: None: the patch size (no overlap)
    step_size: int | None = None
    patch_level: int = 0
    #: None: automatic (see :func:`choose_seg_level`); an int: segment that level as is
    seg_level: int | None = None
    sthresh: int = 8
    mthresh: int = 7
    close: int = 4
    use_otsu: bool = False
    a_t: float = 100.0
    a_h: float = 16.0
    max_n_holes: int = 8
    contour_fn: str = "four_pt"
    use_padding: bool = True
    preset: str = "default"

    def __post_init__(self) -> None:
        if self.step_size is None:
            object.__setattr__(self, "step_size", self.patch_size)
        for name in ("a_t", "a_h"):  # areas in reference patches: fractions are fine
            object.__setattr__(self, name, float(getattr(self, name)))
        checks: list[tuple[str, Any, bool, str]] = [
            ("--patch-size", self.patch_size, self.patch_size >= 8, "an integer >= 8"),
            ("--step", self.step_size, self.step_size >= 1, "an integer >= 1"),  # type: ignore[operator]
            ("--level", self.patch_level, self.patch_level >= 0, "a level index >= 0"),
            (
                "--seg-level",
                self.seg_level,
                self.seg_level is None or self.seg_level >= 0,
                "auto or a level index >= 0",
            ),
            ("--sthresh", self.sthresh, 0 <= self.sthresh <= 255, "an integer in 0..255"),
            (
                "--mthresh",
                self.mthresh,
                self.mthresh >= 1 and self.mthresh % 2 == 1,
                "an odd integer >= 1 (a median-blur kernel)",
            ),
            ("--close", self.close, self.close >= 0, "an integer >= 0 (0: no closing)"),
            ("--a-t", self.a_t, math.isfinite(self.a_t) and self.a_t >= 0, "a number >= 0"),
            ("--a-h", self.a_h, math.isfinite(self.a_h) and self.a_h >= 0, "a number >= 0"),
            ("--max-holes", self.max_n_holes, self.max_n_holes >= 0, "an integer >= 0"),
            ("--preset", self.preset, self.preset in PRESETS, " or ".join(PRESETS)),
            ("contour_fn", self.contour_fn, self.contour_fn == "four_pt", "four_pt"),
        ]
        for flag, value, ok, valid in checks:
            if not ok:
                raise ConfigError(f"invalid value for {flag}: {value!r}; expected {valid}")


@dataclass
class Tissue:
    """A slide's segmentation: tissue contours and their holes at level 0, and the image
    they were found on (``thumb``, RGB at ``seg_downsample``, contours in its pixels)."""

    contours: list[np.ndarray]  # each (K, 1, 2) int32, level-0 (x, y)
    holes: list[list[np.ndarray]]  # per contour, its kept holes, level-0
    thumb: np.ndarray
    seg_level: int
    seg_downsample: tuple[float, float]  # level-0 pixels per thumbnail pixel, (x, y)
    thumb_contours: list[np.ndarray] = field(default_factory=list)
    thumb_holes: list[list[np.ndarray]] = field(default_factory=list)
    #: every outer contour's net area in reference patches (kept or not), largest first
    areas: list[float] = field(default_factory=list)


def choose_seg_level(slide: Any, seg_level: int | None) -> tuple[int, int]:
    """(level read, further integer shrink factor) for segmentation.

    An explicit ``seg_level`` is used as is (CLAM). Automatic: CLAM's level, the best one
    for a 64x downsample; if that level is finer than 16x (a one-level slide, which CLAM
    would segment at full resolution), it is shrunk by an integer factor to about 16x, so
    the median and closing kernels span what they span on a typical SVS pyramid."""
    if seg_level is not None:
        if seg_level >= slide.level_count:
            raise ClbenchError(
                f"--seg-level {seg_level} is past the slide's last level ({slide.level_count - 1})"
            )
        return seg_level, 1
    level = int(slide.get_best_level_for_downsample(SEG_TARGET_DOWNSAMPLE))
    ds = float(slide.level_downsamples[level])
    factor = max(1, int(SEG_MIN_DOWNSAMPLE // ds)) if ds < SEG_MIN_DOWNSAMPLE else 1
    return level, factor


def tissue_binary(rgb: np.ndarray, params: TilingParams) -> np.ndarray:
    """CLAM's tissue mask: HSV saturation, median blur, threshold (fixed or Otsu),
    morphological closing; uint8 0/255."""
    sat = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)[:, :, 1]
    blurred = cv2.medianBlur(sat, params.mthresh) if params.mthresh > 1 else sat
    if params.use_otsu:
        _, binary = cv2.threshold(blurred, 0, 255, cv2.THRESH_OTSU + cv2.THRESH_BINARY)
    else:
        _, binary = cv2.threshold(blurred, params.sthresh, 255, cv2.THRESH_BINARY)
    if params.close > 0:
        kernel = np.ones((params.close, params.close), np.uint8)
        binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, kernel)
    return binary


def filter_contours(
    contours: Sequence[np.ndarray], hierarchy: np.ndarray, ref_area: float, params: TilingParams
) -> tuple[list[int], list[list[int]], list[float]]:
    """CLAM's area filter on a RETR_CCOMP hierarchy: an outer contour is kept if its area
    minus its holes' exceeds ``a_t`` reference areas; of its holes, the ``max_n_holes``
    largest are considered and those over ``a_h`` reference areas kept. Returns kept
    contour indices, their kept hole indices, and every outer contour's net area in
    reference areas (largest first)."""
    parent = hierarchy[:, 3]
    min_tissue, min_hole = params.a_t * ref_area, params.a_h * ref_area
    kept, kept_holes, areas = [], [], []
    for i in np.flatnonzero(parent == -1):
        holes = [int(j) for j in np.flatnonzero(parent == i)]
        area = cv2.contourArea(contours[i]) - sum(cv2.contourArea(contours[j]) for j in holes)
        areas.append(area / ref_area)
        if area == 0 or not area > min_tissue:
            continue
        largest = sorted(holes, key=lambda j: cv2.contourArea(contours[j]), reverse=True)
        kept.append(int(i))
        kept_holes.append(
            [j for j in largest[: params.max_n_holes] if cv2.contourArea(contours[j]) > min_hole]
        )
    return kept, kept_holes, sorted(areas, reverse=True)


def segment_tissue(slide: Any, params: TilingParams) -> Tissue:
    """Tissue contours (with holes) of ``slide`` at level 0."""
    level, factor = choose_seg_level(slide, params.seg_level)
    wl, hl = slide.level_dimensions[level]
    if factor == 1 and wl * hl > SEG_MAX_PIXELS:
        raise ClbenchError(
            f"level {level} is {wl} x {hl} px, too large to segment (CLAM's limit is "
            f"{SEG_MAX_PIXELS:.0e} px); give a coarser --seg-level or leave it on auto"
        )
    thumb = wsi_slide.read_downsampled(slide, level, factor)
    w0, h0 = slide.level_dimensions[0]
    scale = (w0 / thumb.shape[1], h0 / thumb.shape[0])
    ref_area = int(REF_PATCH_SIZE**2 / (scale[0] * scale[1]))
    binary = tissue_binary(thumb, params)
    contours, hierarchy = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if hierarchy is None:  # nothing above the threshold
        kept, kept_holes, areas = [], [], []
    else:
        kept, kept_holes, areas = filter_contours(contours, hierarchy[0], ref_area, params)
    thumb_contours = [contours[i] for i in kept]
    thumb_holes = [[contours[j] for j in hs] for hs in kept_holes]
    factor_xy = np.array(scale)
    return Tissue(
        contours=[np.array(c * factor_xy, dtype=np.int32) for c in thumb_contours],
        holes=[[np.array(h * factor_xy, dtype=np.int32) for h in hs] for hs in thumb_holes],
        thumb=thumb,
        seg_level=level,
        seg_downsample=scale,
        thumb_contours=thumb_contours,
        thumb_holes=thumb_holes,
        areas=areas,
    )


def _inside(contour: np.ndarray, x: float, y: float) -> bool:
    return cv2.pointPolygonTest(contour, (float(x), float(y)), False) >= 0


def contour_coords(
    contour: np.ndarray,
    holes: Sequence[np.ndarray],
    patch_size: int,
    step_size: int,
    patch_downsample: int,
) -> np.ndarray:
    """Level-0 top-left corners of one contour's patches (CLAM's ``process_contour``).

    Candidates: a grid with the level-0 step ``step_size * patch_downsample`` from the
    contour's bounding-box corner over the whole box (CLAM's padding). Kept if any of
    four points, ``ref/4`` from the patch centre diagonally (``ref`` = the patch's
    level-0 side), lies in or on the contour ("four_pt"), and the centre lies strictly
    inside none of the holes. Order: x-major, as CLAM's meshgrid."""
    ref = patch_size * patch_downsample
    step = step_size * patch_downsample
    x0, y0, w, h = cv2.boundingRect(contour)
    half, shift = ref // 2, int(ref // 2 * 0.5)
    kept = []
    for x in range(x0, x0 + w, step):
        for y in range(y0, y0 + h, step):
            cx, cy = x + half, y + half
            corners = ((-shift, -shift), (shift, shift), (shift, -shift), (-shift, shift))
            if not any(_inside(contour, cx + dx, cy + dy) for dx, dy in corners):
                continue
            centre = (x + ref / 2, y + ref / 2)
            if any(cv2.pointPolygonTest(hole, centre, False) > 0 for hole in holes):
                continue
            kept.append((x, y))
    return np.array(kept, dtype=np.int64).reshape(-1, 2)


def patch_coords(slide: Any, tissue: Tissue, params: TilingParams) -> np.ndarray:
    """Every tissue contour's patch corners, contour after contour: (N, 2) int64."""
    if params.patch_level >= slide.level_count:
        raise ClbenchError(
            f"--level {params.patch_level} is past the slide's last level ({slide.level_count - 1})"
        )
    ds = wsi_slide.level_downsamples(slide)[params.patch_level]
    patch_downsample = int(ds[0])
    step = params.step_size or params.patch_size
    parts = [
        contour_coords(c, hs, params.patch_size, step, patch_downsample)
        for c, hs in zip(tissue.contours, tissue.holes, strict=True)
    ]
    return np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)


def mask_image(tissue: Tissue) -> np.ndarray:
    """The segmentation thumbnail with kept tissue contours in green and holes in blue
    (CLAM's ``visWSI``), RGB."""
    img = tissue.thumb.copy()
    thickness = max(1, round(min(img.shape[:2]) / 250))
    cv2.drawContours(img, tissue.thumb_contours, -1, (0, 255, 0), thickness)
    for hs in tissue.thumb_holes:
        cv2.drawContours(img, hs, -1, (0, 0, 255), thickness)
    return img


def write_patches_h5(
    path: Path, coords: np.ndarray, attrs: dict[str, Any], file_attrs: dict[str, Any]
) -> None:
    """``coords`` with CLAM's attributes on the dataset, atomically."""
    import h5py

    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        d = f.create_dataset("coords", data=np.asarray(coords, np.int64).reshape(-1, 2))
        for k, v in attrs.items():
            d.attrs[k] = v
        for k, v in file_attrs.items():
            f.attrs[k] = v


def read_coords(path: Path) -> tuple[np.ndarray, dict[str, Any], dict[str, Any]]:
    """(coords (N, 2) int64, the coords dataset's attributes, the file's attributes)."""
    import h5py

    with h5py.File(path, "r") as f:
        if "coords" not in f:
            raise ClbenchError(f"{path} has no 'coords' dataset: not a CLAM patches file")
        d = f["coords"]
        coords = np.asarray(d[...], np.int64).reshape(-1, 2)
        return coords, dict(d.attrs), dict(f.attrs)


def patches_complete(path: Path) -> bool:
    """An existing patches file that opens and holds ``coords`` (a final name is only ever
    written whole, see clbench.wsi.store; this guards against files from elsewhere)."""
    if not path.is_file():
        return False
    try:
        read_coords(path)
    except (OSError, ClbenchError, KeyError, ValueError):
        return False
    return True


@dataclass
class SlideResult:
    """What tiling one slide did (one row of the process list)."""

    path: str
    slide_id: str
    status: str  # processed | already_exist | failed_seg | failed
    n_patches: int = -1
    seg_level: int = -1
    seg_downsample: float = -1.0
    message: str = ""
    seconds: float = 0.0


def tile_slide(path: Path, out: Path, params: TilingParams, force: bool = False) -> SlideResult:
    """Segment and patch one slide into ``out``; skipped if its patches file exists."""
    sid = wsi_slide.slide_id(path)
    h5_path = out / "patches" / f"{sid}.h5"
    stale = remove_stale_temps(h5_path)
    if not force and patches_complete(h5_path):
        return SlideResult(str(path), sid, "already_exist", message=_params_change(h5_path, params))
    start = time.perf_counter()
    try:
        with wsi_slide.opened(path) as slide:
            try:
                tissue = segment_tissue(slide, params)
            except ClbenchError as e:
                return SlideResult(str(path), sid, "failed_seg", message=str(e))
            coords = patch_coords(slide, tissue, params)
            ds = wsi_slide.level_downsamples(slide)[params.patch_level]
            level_dim = tuple(int(v) for v in slide.level_dimensions[params.patch_level])
            reader = type(slide).__module__.split(".")[0]
    except ClbenchError as e:
        return SlideResult(str(path), sid, "failed", message=str(e))
    except Exception as e:  # a corrupt tile, a reader bug: this slide fails, the run goes on
        why = " ".join(str(e).split())[:200]
        return SlideResult(str(path), sid, "failed", message=f"{type(e).__name__}: {why}")
    attrs = {  # CLAM's, on the coords dataset
        "patch_size": params.patch_size,
        "patch_level": params.patch_level,
        "downsample": np.array(ds, np.float64),
        "downsampled_level_dim": np.array(level_dim, np.int64),
        "level_dim": np.array(level_dim, np.int64),
        "name": sid,
        "save_path": str(out / "patches"),
    }
    file_attrs = {  # ours: where the slide is (clbench wsi features) and how it was tiled
        "slide_path": str(Path(path).resolve()),
        "reader": reader,
        "step_size": params.step_size,
        "seg_level": tissue.seg_level,
        "seg_downsample": np.array(tissue.seg_downsample, np.float64),
        "params": _json(asdict(params)),
    }
    _write_mask(out / "masks" / f"{sid}.png", mask_image(tissue))
    write_patches_h5(h5_path, coords, attrs, file_attrs)
    message = f"{len(tissue.contours)} tissue contour(s)"
    if stale:
        message += f", removed {len(stale)} leftover temporary file(s)"
    if not tissue.contours:
        biggest = f"{tissue.areas[0]:.2f}" if tissue.areas else "none"
        message = (
            f"no patch: no tissue piece passed the area filter a_t={params.a_t:g} reference "
            f"areas of {REF_PATCH_SIZE}^2 px (largest piece: {biggest}); lower --a-t"
        )
    elif not len(coords):
        message = f"no patch in the {len(tissue.contours)} tissue contour(s)"
    return SlideResult(
        str(path),
        sid,
        "processed",
        n_patches=len(coords),
        seg_level=tissue.seg_level,
        seg_downsample=round(float(np.mean(tissue.seg_downsample)), 3),
        message=message,
        seconds=time.perf_counter() - start,
    )


def _params_change(h5_path: Path, params: TilingParams) -> str:
    """How the parameters an existing patches file was made with differ from ``params``
    ("" if they do not, or if the file does not say)."""
    import json

    try:
        _, _, file_attrs = read_coords(h5_path)
        before = json.loads(str(file_attrs["params"]))
    except (OSError, ClbenchError, KeyError, ValueError):
        return ""
    now = asdict(params)
    changed = [
        f"{k} {before[k]} -> {now[k]}" for k in sorted(now) if before.get(k, now[k]) != now[k]
    ]
    return (
        f"made with other parameters ({', '.join(changed)}); --force redoes it" if changed else ""
    )


def _json(value: Any) -> str:
    import json

    return json.dumps(value, sort_keys=True)


def _write_mask(path: Path, rgb: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ClbenchError(f"cannot encode the mask image {path}")
    with atomic_output(path) as tmp:
        tmp.write_bytes(buf.tobytes())


#: process_list_autogen.csv: CLAM's columns, then ours
PROCESS_LIST_COLUMNS = (
    "slide_id",
    "process",
    "status",
    "seg_level",
    "sthresh",
    "mthresh",
    "close",
    "use_otsu",
    "keep_ids",
    "exclude_ids",
    "a_t",
    "a_h",
    "max_n_holes",
    "vis_level",
    "line_thickness",
    "use_padding",
    "contour_fn",
    "patch_size",
    "step_size",
    "patch_level",
    "seg_downsample",
    "n_patches",
    "message",
)


def write_process_list(
    path: Path, rows: Sequence[tuple[Path, SlideResult | None]], params: TilingParams
) -> None:
    """CLAM's process list (slide_id with its extension, process 1 = still to do, status
    tbp/processed/already_exist/failed_seg/failed, the parameters) plus our columns."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(PROCESS_LIST_COLUMNS)
    for slide_path, r in rows:
        w.writerow(
            [
                Path(slide_path).name,
                0 if r is not None else 1,
                r.status if r is not None else "tbp",
                r.seg_level if r is not None else -1,
                params.sthresh,
                params.mthresh,
                params.close,
                params.use_otsu,
                "none",
                "none",
                params.a_t,
                params.a_h,
                params.max_n_holes,
                r.seg_level if r is not None else -1,
                250,
                params.use_padding,
                params.contour_fn,
                params.patch_size,
                params.step_size,
                params.patch_level,
                r.seg_downsample if r is not None else -1,
                r.n_patches if r is not None else -1,
                r.message if r is not None else "",
            ]
        )
    write_text(path, buf.getvalue())


def tile_slides(
    slides: Sequence[Path],
    out: Path,
    params: TilingParams,
    workers: int = 1,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> list[SlideResult]:
    """Tile every slide into ``out`` (resumable: a slide with a complete patches file is
    skipped unless ``force``), one progress line per slide on ``log`` (stderr)."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("patches", "masks"):
        (out / sub).mkdir(exist_ok=True)
    results: dict[int, SlideResult] = {}
    n = len(slides)
    process_list = out / "process_list_autogen.csv"

    def done(i: int, r: SlideResult) -> None:
        results[i] = r
        head = f"tile [{len(results)}/{n}] {r.slide_id}:"
        if r.status == "processed":
            log(f"{head} {r.n_patches} patches in {r.seconds:.1f} s ({r.message})")
        elif r.status == "already_exist":
            note = f": {r.message}" if r.message else ""
            log(f"{head} skipped, patches/{r.slide_id}.h5 already exists{note}")
        else:
            log(f"{head} {r.status}: {r.message}")
        write_process_list(
            process_list, [(s, results.get(j)) for j, s in enumerate(slides)], params
        )

    write_process_list(process_list, [(s, None) for s in slides], params)
    if workers <= 1 or n <= 1:
        for i, s in enumerate(slides):
            done(i, tile_slide(s, out, params, force))
    else:
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=min(workers, n)) as pool:
            futures = {
                pool.submit(tile_slide, s, out, params, force): i for i, s in enumerate(slides)
            }
            for fut in as_completed(futures):
                done(futures[fut], fut.result())
    return [results[i] for i in range(n)]
