"""Offline pretraining of the micro ViT on rendered glyphs, with a content-addressed cache.

The checkpoint is a safetensors file holding the backbone's state dict (no classifier
head) and, in its metadata, everything needed to rebuild it: the architecture kwargs
as JSON, the seed, the number of steps and a description of the source task.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import matplotlib
import platformdirs
import timm
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer
from tqdm.auto import tqdm

from clbench.backbones.micro_vit import MICRO_VIT_ARCH, build_micro_vit
from clbench.pretrain.glyphs import SOURCE_DESCRIPTION, SOURCE_VERSION, GlyphSource

DEFAULT_STEPS = 600
DEFAULT_BATCH_SIZE = 256
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 0.05
WARMUP_FRACTION = 0.05
LABEL_SMOOTHING = 0.1
EVAL_SAMPLES = 2048
CACHE_ENV_VAR = "CLBENCH_CACHE_DIR"
FORMAT = "clbench.micro_vit/2"
#: checkpoint formats that load: /1 holds the backbone only, /2 also the glyph head
FORMATS = ("clbench.micro_vit/1", FORMAT)
#: the prefix of the glyph classifier's tensors in a /2 checkpoint
HEAD_PREFIX = "glyph_head."
#: names the glyph source task: a backbone's ``task_heads`` key and the ``data_id`` of a
#: scenario whose start model is the pretrained classifier (``glyph_forget``)
GLYPH_TASK = f"glyphs/v{SOURCE_VERSION}"


def cache_dir() -> Path:
    """Checkpoint cache: ``$CLBENCH_CACHE_DIR`` if set, else the user cache dir."""
    override = os.environ.get(CACHE_ENV_VAR)
    return Path(override) if override else Path(platformdirs.user_cache_dir("clbench"))


def _recipe_hash(arch: dict[str, Any]) -> str:
    """Short hash of everything besides seed/steps/batch that changes the weights."""
    recipe = {
        "format": FORMAT,
        "arch": arch,
        "source_version": SOURCE_VERSION,
        "lr": LEARNING_RATE,
        "weight_decay": WEIGHT_DECAY,
        "warmup": WARMUP_FRACTION,
        "label_smoothing": LABEL_SMOOTHING,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]


def default_checkpoint_path(
    seed: int = 0, steps: int = DEFAULT_STEPS, batch_size: int = DEFAULT_BATCH_SIZE
) -> Path:
    """Cache location for a given pretraining setting; the name encodes recipe hash/seed/steps."""
    name = f"micro_vit-{_recipe_hash(MICRO_VIT_ARCH)}-seed{seed}-steps{steps}-bs{batch_size}"
    return cache_dir() / "pretrained" / f"{name}.safetensors"


def _lr_factor(step: int, steps: int) -> float:
    """Linear warmup then cosine decay to zero."""
    warmup = max(1, round(WARMUP_FRACTION * steps))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


@torch.no_grad()
def _accuracy(
    model: torch.nn.Module, head: torch.nn.Module, source: GlyphSource, seed: int
) -> float:
    generator = torch.Generator().manual_seed(seed)
    x, y = source.sample(EVAL_SAMPLES, generator)
    return (head(model(x)).argmax(1) == y).float().mean().item()


def _save_atomic(tensors: dict[str, torch.Tensor], metadata: dict[str, str], out: Path) -> None:
    """Write to a temporary file next to ``out`` and rename, so readers never see a partial file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def pretrain_micro_vit(
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    out: Path | None = None,
    progress: bool = True,
) -> Path:
    """Pretrain the micro ViT on glyph classification; save its backbone and glyph head.

    Deterministic from ``seed``: same seed (and machine) gives bitwise-identical weights.
    The caller's global RNG state is left untouched. Returns the checkpoint path
    (``default_checkpoint_path(seed, steps, batch_size)`` when ``out`` is None).
    """
    out = Path(out) if out is not None else default_checkpoint_path(seed, steps, batch_size)
    start = time.perf_counter()
    source = GlyphSource()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_micro_vit()
        head = torch.nn.Linear(model.embed_dim, source.num_classes)
    params = [*model.parameters(), *head.parameters()]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": WEIGHT_DECAY},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=LEARNING_RATE,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, steps))
    generator = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(range(steps), desc="pretrain micro ViT", disable=not progress, leave=False)
    for step in bar:
        x, y = source.sample(batch_size, generator)
        loss = F.cross_entropy(head(model(x)), y, label_smoothing=LABEL_SMOOTHING)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    accuracy = _accuracy(model, head, source, seed=seed + 1_000_003)
    metadata = {
        "format": FORMAT,
        "arch": json.dumps(MICRO_VIT_ARCH, sort_keys=True),
        "seed": str(seed),
        "steps": str(steps),
        "batch_size": str(batch_size),
        "recipe_hash": _recipe_hash(MICRO_VIT_ARCH),
        "source": SOURCE_DESCRIPTION,
        "source_version": str(SOURCE_VERSION),
        "source_accuracy": f"{accuracy:.4f}",
        "software": f"torch {torch.__version__}, timm {timm.__version__}, "
        f"matplotlib {matplotlib.__version__}",
    }
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    state.update({HEAD_PREFIX + k: v.detach().contiguous() for k, v in head.state_dict().items()})
    _save_atomic(state, metadata, out)
    if progress:
        elapsed = time.perf_counter() - start
        tqdm.write(f"micro ViT pretrained in {elapsed:.1f}s, source accuracy {accuracy:.3f}: {out}")
    return out


def read_metadata(path: Path | str) -> dict[str, str]:
    """The safetensors metadata of a micro ViT checkpoint (``ValueError`` if unreadable)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"micro ViT checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"unreadable micro ViT checkpoint {path}: {err}") from err
    if metadata.get("format") not in FORMATS or "arch" not in metadata:
        raise ValueError(
            f"{path} is not a micro ViT checkpoint (format {metadata.get('format')!r})"
        )
    return metadata


def load_micro_vit(path: Path | str) -> VisionTransformer:
    """Rebuild the micro ViT from a checkpoint's metadata and load its weights (eval mode)."""
    path = Path(path)
    metadata = read_metadata(path)
    try:
        arch = json.loads(metadata["arch"])
        with torch.random.fork_rng(devices=[]):  # random init is overwritten; spare caller RNG
            model = build_micro_vit(**arch)
        tensors = load_file(str(path))
        backbone = {k: v for k, v in tensors.items() if not k.startswith(HEAD_PREFIX)}
        model.load_state_dict(backbone, strict=True)
    except (SafetensorError, RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"cannot load micro ViT checkpoint {path}: {err}") from err
    return model.eval()


def load_glyph_head(path: Path | str) -> torch.nn.Linear | None:
    """The glyph classifier pretrained with the backbone (None in a backbone-only file)."""
    try:
        tensors = {
            k[len(HEAD_PREFIX) :]: v
            for k, v in load_file(str(path)).items()
            if k.startswith(HEAD_PREFIX)
        }
        if not tensors:
            return None
        weight = tensors["weight"]
        head = torch.nn.Linear(weight.shape[1], weight.shape[0])
        head.load_state_dict(tensors, strict=True)
    except (SafetensorError, OSError, KeyError, RuntimeError, ValueError) as err:
        raise ValueError(f"cannot load the glyph head of {path}: {err}") from err
    return head.eval()


def corrupt_cache_fix(seed: int, steps: int) -> str:
    """What to do about a corrupt cached checkpoint of (seed, steps)."""
    return (
        f"the cached checkpoint is corrupt; remake it with: clbench pretrain --seed {seed} "
        f"--steps {steps} --force"
    )


def ensure_pretrained(seed: int = 0, steps: int = DEFAULT_STEPS, progress: bool = True) -> Path:
    """Path of the cached pretrained checkpoint, pretraining it first if it is missing."""
    path = default_checkpoint_path(seed, steps)
    if path.is_file():
        return path
    return pretrain_micro_vit(seed=seed, steps=steps, out=path, progress=progress)
