"""Micro ViT, glyph source data and offline pretraining (few steps, temporary cache)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from clbench.backbones.micro_vit import MICRO_VIT_ARCH, build_micro_vit
from clbench.pretrain import train
from clbench.pretrain.glyphs import CHARACTERS, GlyphSource, glyph_batches
from clbench.pretrain.train import (
    HEAD_PREFIX,
    default_checkpoint_path,
    ensure_pretrained,
    load_glyph_head,
    load_micro_vit,
    pretrain_micro_vit,
    read_metadata,
)

FEW_STEPS = 3
SMALL_BATCH = 16


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Never touch the real user cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("CLBENCH_CACHE_DIR", str(cache))
    return cache


def _pretrain(path: Path, seed: int) -> Path:
    return pretrain_micro_vit(
        seed=seed, steps=FEW_STEPS, batch_size=SMALL_BATCH, out=path, progress=False
    )


def test_micro_vit_is_timm_vit_with_vit_b_module_names() -> None:
    torch.manual_seed(0)
    model = build_micro_vit()
    names = dict(model.named_modules())
    for suffix in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
        assert f"blocks.0.{suffix}" in names
    out = model(torch.zeros(2, 1, 16, 16))
    assert out.shape == (2, MICRO_VIT_ARCH["embed_dim"])
    torch.manual_seed(0)
    again = build_micro_vit()
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True)
    )


def test_glyph_samples_format_and_classes() -> None:
    assert not any(c.isdigit() for c in CHARACTERS)
    source = GlyphSource()
    assert source.num_classes == len(CHARACTERS)
    x, y = source.sample(64, torch.Generator().manual_seed(0))
    assert x.shape == (64, 1, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert y.dtype == torch.long and y.min() >= 0 and y.max() < source.num_classes
    counts, _ = source.sample_counts(64, torch.Generator().manual_seed(0))
    assert counts.shape == (64, 8, 8)
    assert torch.equal(counts, counts.round()) and counts.min() >= 0 and counts.max() <= 16
    assert counts.sum((1, 2)).min() > 0  # no blank glyph
    x2, y2 = next(glyph_batches(seed=0, batch_size=64, source=source))
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_glyph_source_refuses_digits() -> None:
    with pytest.raises(ValueError, match="digit"):
        GlyphSource(characters="AB7")


def test_pretraining_is_deterministic(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = load_file(_pretrain(tmp_path / "a.safetensors", seed=0))
    assert torch.equal(torch.rand(3), expected_next)  # caller's global RNG untouched
    b = load_file(_pretrain(tmp_path / "b.safetensors", seed=0))
    c = load_file(_pretrain(tmp_path / "c.safetensors", seed=1))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert not any(k.startswith("head") for k in a)  # backbone only, no glyph classifier
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.safetensors",
        "b.safetensors",
        "c.safetensors",
    ]


def test_save_load_round_trip(tmp_path: Path) -> None:
    path = _pretrain(tmp_path / "m.safetensors", seed=0)
    meta = read_metadata(path)
    assert json.loads(meta["arch"]) == MICRO_VIT_ARCH
    assert (meta["seed"], meta["steps"]) == ("0", str(FEW_STEPS))
    assert 0.0 <= float(meta["source_accuracy"]) <= 1.0 and meta["source"]
    model = load_micro_vit(path)
    assert not model.training
    tensors = load_file(path)
    head_keys = {k for k in tensors if k.startswith(HEAD_PREFIX)}
    assert head_keys == {HEAD_PREFIX + "weight", HEAD_PREFIX + "bias"}
    reference = build_micro_vit()
    reference.load_state_dict({k: v for k, v in tensors.items() if k not in head_keys})
    x = GlyphSource().sample(8, torch.Generator().manual_seed(1))[0]
    head = load_glyph_head(path)
    assert head is not None and head.out_features == GlyphSource().num_classes
    with torch.no_grad():
        assert torch.equal(model(x), reference.eval()(x))
        assert torch.equal(model(x), load_micro_vit(path)(x))


def test_load_rejects_bad_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"garbage\.safetensors"):
        load_micro_vit(garbage)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match=r"foreign\.safetensors"):
        load_micro_vit(foreign)
    path = _pretrain(tmp_path / "m.safetensors", seed=0)
    tensors = load_file(path)
    tensors.pop("cls_token")
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken), metadata=read_metadata(path))
    with pytest.raises(ValueError, match=r"broken\.safetensors"):
        load_micro_vit(broken)


def test_cache_path_honours_env(_private_cache: Path) -> None:
    path = default_checkpoint_path(0, 10)
    assert path.is_relative_to(_private_cache) and path.suffix == ".safetensors"
    assert "seed0" in path.name and "steps10" in path.name
    assert len({path, default_checkpoint_path(1, 10), default_checkpoint_path(0, 11)}) == 3


def test_ensure_pretrained_creates_once(
    _private_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = ensure_pretrained(seed=0, steps=2, progress=False)
    assert path == default_checkpoint_path(0, 2) and path.is_file()
    assert path.is_relative_to(_private_cache)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no leftover temp file

    def fail(*args: object, **kwargs: object) -> Path:
        raise AssertionError("cached checkpoint should be reused")

    monkeypatch.setattr(train, "pretrain_micro_vit", fail)
    assert ensure_pretrained(seed=0, steps=2, progress=False) == path
