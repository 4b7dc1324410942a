"""Patch features of tiled slides, in CLAM's layout (``extract_features_fp.py``).

For every ``patches/<slide_id>.h5`` the patches are read from the slide at the stored
level-0 coordinates, encoded, and written to ``h5_files/<slide_id>.h5`` (``features``
N x D float32, ``coords`` N x 2) and ``pt_files/<slide_id>.pt`` (the features tensor).
Encoders are listed in :data:`ENCODERS`; add one with :func:`register_encoder`.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clbench.errors import ClbenchError, ConfigError, first_line, unknown_choice
from clbench.wsi import slide as wsi_slide
from clbench.wsi.store import atomic_output, remove_stale_temps
from clbench.wsi.tiling import read_coords

#: an encoder: (B, H, W, 3) uint8 RGB patches -> (B, D) float32 features
Encode = Callable[[np.ndarray], np.ndarray]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EncoderOptions:
    """What the command line passes to an encoder builder."""

    weights: Path | None = None
    device: str = "cpu"
    target_patch_size: int = 224


@dataclass(frozen=True)
class EncoderSpec:
    """One encoder of the table: its name, feature dimension, a one-line summary and a
    builder ``build(options) -> encode``."""

    name: str
    dim: int
    summary: str
    build: Callable[[EncoderOptions], Encode]


# ----------------------------------------------------------------- stain (offline default)

#: hematoxylin and eosin histogram ranges of skimage's rgb2hed optical densities (the
#: 99th percentile of H is about 0.2 and of E about 0.07 on H&E tissue)
H_RANGE, E_RANGE, HIST_BINS = (0.0, 0.25), (0.0, 0.10), 8
#: CLAM's saturation threshold (of 255): pixels above it count as tissue
TISSUE_SAT = 8
#: the number of stain features (:func:`stain_feature_names` lists them)
STAIN_DIM = 64


def _named_stain_features(patch: np.ndarray) -> list[tuple[str, float]]:
    """The stain encoder's features of one (H, W, 3) uint8 RGB patch, with their names."""
    import cv2
    from skimage.color import rgb2hed

    patch = np.ascontiguousarray(patch[..., :3], dtype=np.uint8)
    out: list[tuple[str, float]] = []
    hed = rgb2hed(patch).astype(np.float32).reshape(-1, 3)
    pcts = np.percentile(hed, (10, 50, 90), axis=0)
    for c, stain in enumerate("HED"):
        v = hed[:, c]
        out += [(f"{stain}_mean", v.mean()), (f"{stain}_std", v.std())]
        out += [(f"{stain}_p{q}", pcts[i, c]) for i, q in enumerate((10, 50, 90))]
    rgb = patch.reshape(-1, 3).astype(np.float32) / 255.0
    for c, ch in enumerate("RGB"):
        out += [(f"{ch}_mean", rgb[:, c].mean()), (f"{ch}_std", rgb[:, c].std())]
    hsv = cv2.cvtColor(patch, cv2.COLOR_RGB2HSV).reshape(-1, 3)
    sat, val = hsv[:, 1].astype(np.float32) / 255.0, hsv[:, 2].astype(np.float32) / 255.0
    hue = hsv[:, 0].astype(np.float32) * np.float32(np.pi / 90.0)  # OpenCV: degrees / 2
    w = sat.sum()
    hue_cos = float((sat * np.cos(hue)).sum() / w) if w > 0 else 0.0
    hue_sin = float((sat * np.sin(hue)).sum() / w) if w > 0 else 0.0
    out += [("S_mean", sat.mean()), ("S_std", sat.std()), ("V_mean", val.mean())]
    out += [("V_std", val.std()), ("hue_cos", hue_cos), ("hue_sin", hue_sin)]
    tissue = hsv[:, 1] > TISSUE_SAT
    h, e = hed[:, 0], hed[:, 1]
    out.append(("tissue_fraction", tissue.mean()))
    out.append(("H_tissue_mean", h[tissue].mean() if tissue.any() else 0.0))
    out.append(("E_tissue_mean", e[tissue].mean() if tissue.any() else 0.0))
    he = np.corrcoef(h, e)[0, 1] if h.std() > 0 and e.std() > 0 else 0.0
    out.append(("HE_corr", he))
    for stain, chan, (lo, hi) in (("H", h, H_RANGE), ("E", e, E_RANGE)):
        # HIST_BINS equal bins over [lo, hi]; values outside count in the end bins
        idx = np.clip(((chan - lo) * (HIST_BINS / (hi - lo))).astype(np.int64), 0, HIST_BINS - 1)
        counts = np.bincount(idx, minlength=HIST_BINS) / chan.size
        out += [(f"{stain}_hist{i}", c) for i, c in enumerate(counts)]
    shape = patch.shape[:2]
    h, e = h.reshape(shape), e.reshape(shape)
    gray_u8 = cv2.cvtColor(patch, cv2.COLOR_RGB2GRAY)
    gray = gray_u8.astype(np.float32) / 255.0
    mag = _gradient_magnitude(gray)
    out += [("grad_mean", mag.mean()), ("grad_std", mag.std())]
    out.append(("grad_p90", np.percentile(mag, 90)))
    out.append(("laplacian_abs_mean", np.abs(cv2.Laplacian(gray, cv2.CV_32F, ksize=3)).mean()))
    counts = np.bincount(gray_u8.ravel(), minlength=256) / gray_u8.size
    nz = counts[counts > 0]
    out.append(("gray_entropy", float(-(nz * np.log2(nz)).sum() / 8.0)))
    out.append(("H_grad_mean", _gradient_magnitude(h).mean()))
    out.append(("E_grad_mean", _gradient_magnitude(e).mean()))
    codes = uniform_lbp(gray_u8)
    counts = np.bincount(codes.ravel(), minlength=10) / codes.size
    out += [(f"lbp{i}", c) for i, c in enumerate(counts)]
    return [(n, float(v)) for n, v in out]


#: the 8 neighbours of a pixel, in circular order (dy, dx)
_RING = ((-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1))


def uniform_lbp(gray: np.ndarray) -> np.ndarray:
    """Rotation-invariant uniform local binary patterns over the 8 pixels around each
    pixel (Ojala et al. 2002, P=8 on the square ring, edges replicated): a pattern with at
    most two 0/1 transitions is coded by its number of neighbours >= the centre (0-8),
    any other as 9. (H, W) int64 codes in 0..9."""
    g = np.pad(gray.astype(np.int16), 1, mode="edge")
    h, w = gray.shape
    centre = g[1 : h + 1, 1 : w + 1]
    bits = [g[1 + dy : h + 1 + dy, 1 + dx : w + 1 + dx] >= centre for dy, dx in _RING]
    ones = np.sum(bits, axis=0)
    transitions = np.sum([bits[i] != bits[i - 1] for i in range(8)], axis=0)
    return np.where(transitions <= 2, ones, 9).astype(np.int64)


def _gradient_magnitude(img: np.ndarray) -> np.ndarray:
    import cv2

    gx = cv2.Sobel(img, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(img, cv2.CV_32F, 0, 1, ksize=3)
    return np.sqrt(gx * gx + gy * gy)  # not cv2.magnitude: its SIMD path varies by alignment


def stain_feature_names() -> tuple[str, ...]:
    """The names of the stain encoder's features, in order."""
    return tuple(n for n, _ in _named_stain_features(np.full((16, 16, 3), 200, np.uint8)))


def stain_features(patches: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) uint8 patches -> (B, 64) float32 handcrafted H&E features."""
    rows = [[v for _, v in _named_stain_features(p)] for p in patches]
    return np.asarray(rows, np.float32).reshape(len(patches), STAIN_DIM)


def _build_stain(options: EncoderOptions) -> Encode:
    return stain_features


# ---------------------------------------------------------- resnet50_trunc (CLAM default)

#: the modules of timm's resnet50 the truncated encoder keeps (up to layer3)
TRUNK = ("conv1", "bn1", "layer1", "layer2", "layer3")
RESNET_SOURCE = "resnet50.tv_in1k"


def load_state_file(path: Path) -> dict[str, Any]:
    """A state dict from a ``.safetensors`` file or a weights-only ``torch.save`` file
    (nothing is unpickled but tensors); ``{"state_dict": ...}`` / ``{"model": ...}`` and
    DataParallel's ``module.`` prefix are unwrapped."""
    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise ClbenchError(f"no such weights file: {path}")
    try:
        with open(path, "rb") as f:
            magic = f.read(2)
    except OSError as e:
        raise ClbenchError(f"cannot read weights file {path}: {e.strerror}") from None
    if magic[:2] == b"PK" or magic[:1] == b"\x80":  # torch.save: a zip, or a bare pickle
        from clbench.backbones.base import torch_load_failure

        try:
            state: Any = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ClbenchError(
                f"cannot read weights file {path}: {torch_load_failure(e)}; expected a "
                ".safetensors file or a state dict saved with torch.save"
            ) from None
    else:
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as e:
            raise ClbenchError(
                f"cannot read weights file {path}: not a safetensors or torch.save file "
                f"({first_line(e)[:120]})"
            ) from None
    from clbench.backbones.base import unwrap_state_dict

    weights = unwrap_state_dict(state)
    if weights is None:
        raise ClbenchError(f"{path} is not a state dict (a mapping of names to tensors)")
    return weights


def _resnet50_trunk(weights: Path | None) -> Any:
    """timm's resnet50 cut after layer3 and average-pooled (CLAM's ``TimmCNNEncoder``),
    with weights from ``weights`` or timm's pretrained ``resnet50.tv_in1k``."""
    import timm
    from torch import nn

    if weights is None:
        try:
            model = timm.create_model(RESNET_SOURCE, pretrained=True, num_classes=0)
        except Exception as e:  # offline and not cached; any hub or network failure
            raise ClbenchError(
                f"encoder resnet50_trunc needs ImageNet weights: give --weights FILE (a "
                f"resnet50 state dict, .safetensors or torch.save), or run once where timm "
                f"can download {RESNET_SOURCE} ({type(e).__name__}: {first_line(e)[:120]})"
            ) from None
    else:
        model = timm.create_model("resnet50", pretrained=False, num_classes=0)
        state = load_state_file(weights)
        state = {k: v for k, v in state.items() if k.split(".")[0] in TRUNK}
        expected = {k for k in model.state_dict() if k.split(".")[0] in TRUNK}
        missing = sorted(k for k in expected - set(state) if "num_batches_tracked" not in k)
        if missing:
            raise ClbenchError(
                f"{weights} is not a resnet50 state dict: {len(missing)} tensors of "
                f"conv1..layer3 missing (e.g. {missing[0]!r})"
            )
        try:
            model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape mismatches
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            detail = lines[1] if len(lines) > 1 else lines[0]
            raise ClbenchError(f"{weights} does not fit resnet50: {detail}") from None
    trunk = nn.Sequential(
        model.conv1,
        model.bn1,
        model.act1,
        model.maxpool,
        model.layer1,
        model.layer2,
        model.layer3,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
    )
    return trunk.eval()


def _build_resnet50_trunc(options: EncoderOptions) -> Encode:
    import torch
    import torch.nn.functional as F

    device = torch.device(options.device)
    model = _resnet50_trunk(options.weights).to(device)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    size = options.target_patch_size

    def encode(patches: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(patches)).to(device)
        x = x.permute(0, 3, 1, 2).float() / 255.0
        if size > 0 and x.shape[-2:] != (size, size):  # torchvision Resize(224) on squares
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        with torch.inference_mode():
            return model((x - mean) / std).float().cpu().numpy()

    return encode


#: the encoders, by name (``clbench wsi features --encoder NAME``)
ENCODERS: dict[str, EncoderSpec] = {}


def register_encoder(spec: EncoderSpec) -> None:
    """Add an encoder to :data:`ENCODERS` (a name may be registered once)."""
    if spec.name in ENCODERS:
        raise ValueError(f"encoder {spec.name!r} is already registered")
    ENCODERS[spec.name] = spec


register_encoder(
    EncoderSpec(
        "stain",
        STAIN_DIM,
        "64 handcrafted H&E colour-deconvolution, colour and texture statistics (offline)",
        _build_stain,
    )
)
register_encoder(
    EncoderSpec(
        "resnet50_trunc",
        1024,
        "ImageNet ResNet-50 cut after layer3, average-pooled, 224 px (CLAM's default)",
        _build_resnet50_trunc,
    )
)


def build_encoder(name: str, options: EncoderOptions) -> Encode:
    """The encode function of encoder ``name``."""
    if name not in ENCODERS:
        raise unknown_choice("encoder", name, ENCODERS)
    return ENCODERS[name].build(options)


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; a device that is not here is one
    line."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", device):
        raise ConfigError(f"invalid value for --device: {device!r}; expected auto, cpu, cuda[:N]")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device here; use --device cpu")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise ConfigError(
            f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here"
        )
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps: MPS is not available here; use --device cpu")
    return device


# ---------------------------------------------------------------------------- extraction


def find_slide(slide_id: str, file_attrs: dict[str, Any], slides_dir: Path | None) -> Path | None:
    """The slide of ``slide_id``: a file named ``<slide_id>.<ext>`` in ``slides_dir`` if
    given, else the path stored by ``clbench wsi tile``; None if neither exists."""
    if slides_dir is not None:
        for ext in wsi_slide.SLIDE_EXTENSIONS:
            for candidate in (
                slides_dir / f"{slide_id}{ext}",
                slides_dir / f"{slide_id}{ext.upper()}",
            ):
                if candidate.is_file():
                    return candidate
        return None
    stored = file_attrs.get("slide_path")
    if stored is not None and Path(str(stored)).is_file():
        return Path(str(stored))
    return None


def features_complete(h5_path: Path, pt_path: Path, encoder: str) -> bool:
    """Both outputs of a slide exist and the h5 opens with ``features`` and ``coords`` of
    one length. Features of another encoder there are an error (no silent mixing)."""
    import h5py

    if not (h5_path.is_file() and pt_path.is_file()):
        return False
    try:
        with h5py.File(h5_path, "r") as f:
            n_ok = f["features"].shape[0] == f["coords"].shape[0]
            made_by = f.attrs.get("encoder")
    except (OSError, KeyError):
        return False
    if made_by is not None and str(made_by) != encoder:
        raise ClbenchError(
            f"{h5_path} holds features of encoder {made_by!r}, not {encoder!r}; write them "
            "elsewhere with --out DIR, or delete h5_files/ and pt_files/"
        )
    return bool(n_ok)


@dataclass
class FeatureResult:
    """What extraction did for one slide."""

    slide_id: str
    status: str  # processed | already_exist | no_patches
    n_patches: int = 0
    seconds: float = 0.0


def _read_patches(slide: Any, coords: np.ndarray, level: int, size: int) -> np.ndarray:
    return np.stack([wsi_slide.read_rgb(slide, (x, y), level, (size, size)) for x, y in coords])


def extract_slide(
    patches_h5: Path,
    slide_path: Path,
    out: Path,
    encoder_name: str,
    encode: Encode,
    batch_size: int,
) -> FeatureResult:
    """Encode one slide's patches into ``out/h5_files`` and ``out/pt_files``."""
    import h5py
    import torch
    from tqdm import tqdm

    sid = patches_h5.stem
    coords, attrs, _ = read_coords(patches_h5)
    level, size = int(attrs.get("patch_level", 0)), int(attrs["patch_size"])
    start = time.perf_counter()
    parts = []
    with wsi_slide.opened(slide_path) as slide:
        if level >= slide.level_count:
            raise ClbenchError(
                f"{patches_h5}: patch_level {level} is past the last level of {slide_path}"
            )
        bar = tqdm(total=len(coords), desc=sid, unit="patch", file=sys.stderr, disable=None)
        for i in range(0, len(coords), batch_size):
            batch = coords[i : i + batch_size]
            feats = np.asarray(encode(_read_patches(slide, batch, level, size)), np.float32)
            parts.append(feats.reshape(len(batch), -1))
            bar.update(len(batch))
        bar.close()
    features = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    h5_path = out / "h5_files" / f"{sid}.h5"
    pt_path = out / "pt_files" / f"{sid}.pt"
    for p in (h5_path, pt_path):
        remove_stale_temps(p)
    with atomic_output(h5_path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=features)
        d = f.create_dataset("coords", data=coords)
        for k, v in attrs.items():
            d.attrs[k] = v
        f.attrs["encoder"] = encoder_name
        f.attrs["slide_path"] = str(Path(slide_path).resolve())
    with atomic_output(pt_path) as tmp:
        torch.save(torch.from_numpy(features), tmp)
    return FeatureResult(sid, "processed", len(coords), time.perf_counter() - start)


def extract_features(
    root: Path,
    encoder: str,
    *,
    slides_dir: Path | None = None,
    out: Path | None = None,
    batch_size: int = 256,
    device: str = "auto",
    weights: Path | None = None,
    target_patch_size: int = 224,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> list[FeatureResult]:
    """Features of every ``root/patches/*.h5`` into ``out`` (default ``root``); slides
    whose two outputs exist are skipped unless ``force``. Every slide is located before
    anything is encoded, so a missing one fails fast."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    if encoder not in ENCODERS:
        raise unknown_choice("encoder", encoder, ENCODERS)
    if batch_size < 1:
        raise ConfigError(f"invalid value for --batch-size: {batch_size}; must be >= 1")
    if slides_dir is not None and not slides_dir.is_dir():
        raise ClbenchError(f"--slides-dir {slides_dir} is not a folder")
    out = out or root
    patch_files = sorted(p for p in (root / "patches").glob("*.h5") if not p.name.startswith("."))
    if not patch_files:
        raise ClbenchError(
            f"no patches/*.h5 under {root}; make them with: clbench wsi tile SLIDES --out {root}"
        )
    todo: dict[Path, Path] = {}  # patches file -> its slide
    results: dict[str, FeatureResult] = {}
    for p in patch_files:
        h5_path, pt_path = out / "h5_files" / f"{p.stem}.h5", out / "pt_files" / f"{p.stem}.pt"
        if not force and features_complete(h5_path, pt_path, encoder):
            results[p.stem] = FeatureResult(p.stem, "already_exist")
            continue
        try:
            coords, _, file_attrs = read_coords(p)
        except OSError as e:
            raise ClbenchError(f"cannot read {p}: {first_line(e)}") from None
        if not len(coords):
            results[p.stem] = FeatureResult(p.stem, "no_patches")
            continue
        slide_path = find_slide(p.stem, file_attrs, slides_dir)
        if slide_path is None:
            where = f"in --slides-dir {slides_dir}" if slides_dir else "at the stored path"
            stored = file_attrs.get("slide_path")
            hint = f" ({stored})" if stored is not None and slides_dir is None else ""
            raise ClbenchError(
                f"slide of {p.name} not found {where}{hint}; give --slides-dir DIR holding "
                f"{p.stem}.<ext>"
            )
        todo[p] = slide_path
    encode = None
    if todo:  # weights are loaded only when there is something to encode
        options = EncoderOptions(weights, resolve_device(device), target_patch_size)
        encode = build_encoder(encoder, options)
    n = len(patch_files)
    for i, p in enumerate(patch_files):
        head = f"features [{i + 1}/{n}] {p.stem}:"
        r = results.get(p.stem)
        if r is not None and r.status == "already_exist":
            log(f"{head} skipped, h5_files/{p.stem}.h5 and pt_files/{p.stem}.pt already exist")
            continue
        if r is not None:
            log(f"{head} no patches in patches/{p.name}, nothing written")
            continue
        assert encode is not None
        r = extract_slide(p, todo[p], out, encoder, encode, batch_size)
        results[p.stem] = r
        log(f"{head} {r.n_patches} patches encoded in {r.seconds:.1f} s")
    return [results[p.stem] for p in patch_files]


def read_features(h5_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, D) float32, coords (N, 2) int64) of an ``h5_files/<slide>.h5``."""
    import h5py

    with h5py.File(h5_path, "r") as f:
        return np.asarray(f["features"][...], np.float32), np.asarray(f["coords"][...], np.int64)


__all__: Sequence[str] = (
    "ENCODERS",
    "EncoderOptions",
    "EncoderSpec",
    "build_encoder",
    "extract_features",
    "read_features",
    "register_encoder",
    "stain_feature_names",
    "stain_features",
)
