"""The papers' ViT-B/16 (timm) and CLIP's data config, offline: a randomly initialised model
of the same architecture, local files we write, a fake Hugging Face cache, and the
adapters (LoRA, prompts) on it; CLIP's prepared inputs."""

from __future__ import annotations

import builtins
import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from clbench.scenarios.base import class_incremental_from_tensors
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from clbench.adapters.lora import LoRALinear, lora_layers
from clbench.backbones.vit import ViTConfig, build_vit, vit_b16
from clbench.errors import ClbenchError, ConfigError
from clbench.models import ClassifierModel
from clbench.registry import BACKBONES, STRATEGIES
from helpers import only_run_dir, results_of, run_cli

TINY = "vit_tiny_patch16_224"
CLI = ["scenario.n_experiences=2", "strategy.epochs=1", "tracking=none", "progress=false"]


def _tiny_state(seed: int = 1, head: int = 0) -> dict[str, torch.Tensor]:
    """A random ViT-Ti/16 (224) state dict, with a ``head`` of that many classes if > 0."""
    torch.manual_seed(seed)
    state = build_vit(ViTConfig(model=TINY)).state_dict()
    if head:
        state |= {"head.weight": torch.randn(head, 192), "head.bias": torch.randn(head)}
    return {k: v.contiguous() for k, v in state.items()}


def _one_line_error(capsys: Any, args: list[str], tmp_path: Path) -> str:
    """``clbench run ARGS`` must exit 2 with one error line; returns it."""
    capsys.readouterr()
    assert run_cli(["run", *args, *CLI, f"runs_dir={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert not list(tmp_path.rglob("results.json"))
    return err[0]


def test_random_init_vit_b16_is_timms_architecture():
    torch.manual_seed(0)
    bb = BACKBONES.get("vit_b16")(ViTConfig(pretrained="none"))
    vit = bb.module
    assert isinstance(vit, VisionTransformer) and bb.name == "vit_b16"
    assert bb.source == "random-init(vit_base_patch16_224)"
    assert bb.num_parameters() == 85_798_656  # ViT-B/16 without its classifier: 85.8M
    assert (bb.feature_dim, bb.input_shape, bb.stem) == (768, (3, 224, 224), "patch_embed")
    assert bb.data_config == {
        "input_size": (3, 224, 224),
        "interpolation": "bicubic",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "crop_pct": 0.9,
        "crop_mode": "center",
    }
    names = {n for n, _ in vit.named_modules()}
    for i in range(12):
        for leaf in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            assert isinstance(vit.get_submodule(f"blocks.{i}.{leaf}"), torch.nn.Linear)
    assert "blocks.12" not in names and vit.blocks[0].attn.qkv.out_features == 3 * 768
    assert vit.cls_token.shape == (1, 1, 768) and vit.pos_embed.shape == (1, 197, 768)
    assert vit.global_pool == "token" and isinstance(vit.head, torch.nn.Identity)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():  # the pooled feature is the final-norm CLS token
        feats = vit(x)
        assert feats.shape == (1, 768)
        assert torch.allclose(feats, vit.forward_features(x)[:, 0], atol=1e-6)
    model = bb.classifier(["a", "b"])
    assert bb.pass_modules(model) == [vit.patch_embed]
    # the tag sets the data config, normalize=false leaves images in [0, 1]
    raw = vit_b16(ViTConfig(model=TINY, pretrained="none", img_size=32, normalize=False))
    assert raw.data_config["mean"] == (0.0,) * 3 and raw.data_config["std"] == (1.0,) * 3
    assert raw.data_config["input_size"] == raw.input_shape == (3, 32, 32)
    assert raw.name == TINY and raw.feature_dim == 192


def test_bad_names_are_one_line_config_errors():
    with pytest.raises(ConfigError, match="is a timm ResNet, not a VisionTransformer"):
        vit_b16(ViTConfig(model="resnet50", tag="a1_in1k", pretrained="none"))
    with pytest.raises(ConfigError, match=r"not a timm weights tag .*augreg_in21k_ft_in1k"):
        vit_b16(ViTConfig(tag="in21k_please", pretrained="none"))
    with pytest.raises(
        ConfigError, match=r"backbone\.model=vit_base_patch16_224 backbone\.tag=augreg_in21k$"
    ):
        ViTConfig(model="vit_base_patch16_224.augreg_in21k")
    with pytest.raises(ConfigError, match=r"backbone\.drop_path_rate: 1\.5"):
        ViTConfig(drop_path_rate=1.5)
    with pytest.raises(ConfigError, match=r"one 16 x 16 patch \(img_size >= 16\)"):
        vit_b16(ViTConfig(model=TINY, pretrained="none", img_size=8))


def test_local_safetensors_and_weights_only_files_load_exactly(tmp_path):
    state = _tiny_state(head=7)  # a classifier of the file's own: dropped
    path = tmp_path / "vit_ti.safetensors"
    save_file(state, str(path))
    torch.manual_seed(5)  # the random init that loading overwrites: any seed will do
    bb = vit_b16(ViTConfig(model=TINY, pretrained=str(path)))
    assert bb.source == str(path) and bb.input_shape == (3, 224, 224)
    ref = build_vit(ViTConfig(model=TINY)).eval()
    ref.load_state_dict({k: v for k, v in state.items() if not k.startswith("head.")})
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(bb.module(x), ref(x))
    # a torch.save'd checkpoint, wrapped and with DataParallel names, loads weights-only
    pt = tmp_path / "vit_ti.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, pt)
    with torch.no_grad():
        assert torch.equal(vit_b16(ViTConfig(model=TINY, pretrained=str(pt))).module(x), ref(x))
    # built smaller: the 14 x 14 position embeddings are resampled to 2 x 2 (timm's filter)
    small = vit_b16(ViTConfig(model=TINY, pretrained=str(path), img_size=32)).module
    expected = resample_abs_pos_embed(state["pos_embed"], new_size=[2, 2], num_prefix_tokens=1)
    assert small.pos_embed.shape == (1, 5, 192)
    assert torch.allclose(small.pos_embed, expected, atol=1e-6)
    assert torch.equal(small.blocks[3].mlp.fc2.weight, state["blocks.3.mlp.fc2.weight"])


class _Payload:
    """Unpickling it would create ``self.path`` (code run by a malicious checkpoint)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (builtins.open, (str(self.path), "w"))


def test_a_pickle_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"pos_embed": torch.zeros(1), "x": _Payload(marker)}, evil)
    with pytest.raises(ClbenchError, match=r"refused to unpickle io\.open \(only tensors") as e:
        vit_b16(ViTConfig(model=TINY, pretrained=str(evil)))
    assert not marker.exists() and "\n" not in str(e.value)


def test_wrong_files_and_offline_hub_are_one_line_through_the_cli(tmp_path, capsys, monkeypatch):
    base = ["backbone=vit_b16", f"backbone.model={TINY}", "backbone.img_size=32"]
    state = _tiny_state()
    wrong = {("encoder." + k if k.startswith("blocks.1.") else k): v for k, v in state.items()}
    bad = tmp_path / "renamed.safetensors"
    save_file(wrong, str(bad))
    line = _one_line_error(capsys, [*base, f"backbone.pretrained={bad}"], tmp_path)
    assert line.startswith("error: ") and f"does not fit {TINY}" in line
    assert "missing keys 12 (blocks.1.attn.proj.bias" in line
    assert "unexpected keys 12 (encoder.blocks.1.attn.proj.bias" in line
    big = tmp_path / "vit_s.safetensors"  # another architecture's weights: shapes differ
    torch.manual_seed(0)
    save_file(build_vit(ViTConfig(model="vit_small_patch16_224")).state_dict(), str(big))
    with pytest.raises(ClbenchError, match=f"does not fit {TINY}: size mismatch for ") as e:
        vit_b16(ViTConfig(model=TINY, pretrained=str(big), img_size=32))
    assert "\n" not in str(e.value)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ClbenchError, match="cannot read ViT weights") as e:
        vit_b16(ViTConfig(model=TINY, pretrained=str(junk)))
    assert "\n" not in str(e.value)
    # the hub tag, neither cached nor reachable: where to put a local file, no traceback
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = _one_line_error(capsys, [*base, "backbone.pretrained=hub"], tmp_path)
    assert f"the {TINY}.augreg_in21k weights are not in the Hugging Face cache" in line
    assert f"/timm/{TINY}.augreg_in21k/resolve/main/model.safetensors" in line
    assert "backbone.pretrained=/path/to/model.safetensors" in line


def test_hub_weights_come_from_the_hugging_face_cache_offline(tmp_path, monkeypatch):
    cache = tmp_path / "hf"
    repo = cache / f"models--timm--{TINY}.augreg_in21k"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    state = _tiny_state(seed=3, head=11)  # the in21k files keep their classifier
    save_file(state, str(repo / "snapshots" / commit / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bb = vit_b16(ViTConfig(model=TINY, pretrained="hub"))
    assert bb.source == f"timm:{TINY}.augreg_in21k (hf:timm/{TINY}.augreg_in21k@{commit[:12]})"
    assert torch.equal(bb.module.blocks[11].attn.qkv.weight, state["blocks.11.attn.qkv.weight"])
    assert torch.equal(bb.module.cls_token, state["cls_token"])


@pytest.fixture(scope="module")
def small_b16() -> Any:
    """ViT-B/16 (all 12 blocks, real widths) built at 32 x 32: 2 x 2 patches + CLS."""
    torch.manual_seed(0)
    return vit_b16(ViTConfig(pretrained="none", img_size=32))


def _experience(n: int = 8) -> Any:
    torch.manual_seed(0)
    x, y = torch.randn(n, 3, 32, 32), torch.arange(n) % 2
    return class_incremental_from_tensors(x, y, x, y, [0, 1], 1).train_stream[0]


def _strategy(name: str, bb: Any, **overrides: Any) -> Any:
    model = ClassifierModel(copy.deepcopy(bb.module), bb.feature_dim)
    cls = STRATEGIES.get(name)
    cfg = cls.Config(name=name, epochs=1, batch_size=8, **overrides)
    return cls(model=model, cfg=cfg, plugins=[], n_experiences=2)


def test_lora_goes_into_every_block_and_one_step_trains_only_it(small_b16):
    st = _strategy("lora", small_b16)
    vit = st.model.backbone
    layers = lora_layers(st.model)
    wanted = {
        f"backbone.blocks.{i}.{leaf}"
        for i in range(12)
        for leaf in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    }
    assert set(layers) == wanted and all(isinstance(m, LoRALinear) for m in layers.values())
    before = {n: p.detach().clone() for n, p in vit.named_parameters()}
    st.train(_experience(), eval_streams=[])
    moved = {n for n, p in vit.named_parameters() if not torch.equal(p, before[n])}
    factors = {n for n in before if n.startswith("blocks.") and ".base." not in n}
    assert moved and moved <= factors, sorted(moved - factors)[:5]  # LoRA factors only
    assert st.model.head.num_classes == 2


def test_l2p_prompts_ride_on_vit_b16_and_one_step_trains_the_pool(small_b16):
    st = _strategy("l2p", small_b16)
    pool = st.pool
    assert pool.prompts.shape[-1] == 768 and pool.keys.shape[-1] == 768
    frozen = {n: p.detach().clone() for n, p in st.model.backbone.named_parameters()}
    prompts = pool.prompts.detach().clone()
    st.train(_experience(), eval_streams=[])
    assert not torch.equal(pool.prompts, prompts)
    for n, p in st.model.backbone.named_parameters():
        assert torch.equal(p, frozen[n]), n
    with torch.no_grad():
        logits = st.model.eval()(torch.randn(3, 3, 32, 32))
    assert logits.shape == (3, 2) and torch.isfinite(logits).all()


def test_clip_prepared_inputs_match_what_the_module_made_of_raw_ones():
    torch.manual_seed(0)
    build = BACKBONES.get("clip_vit_b16")
    bb = build(build.Config(pretrained="none", image_size=32))
    dc = bb.data_config
    assert dc["input_size"] == (3, 32, 32) and dc["interpolation"] == "bicubic"
    assert dc["mean"] == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert dc["std"] == pytest.approx((0.26862954, 0.26130258, 0.27577711))
    model = bb.classifier([f"digit {i}" for i in range(3)]).eval()
    model.head.grow(3)
    raw = torch.rand(4, 1, 16, 16) * 2 - 1  # an embedded scenario's grey [-1, 1] tensors
    assert bb.accepts((1, 16, 16))
    with torch.no_grad():
        old = model(raw)
        # what an image scenario's transforms make of them from the data config
        rgb = F.interpolate(raw.expand(-1, 3, -1, -1), size=(32, 32), mode="bilinear")
        mean, std = (torch.tensor(dc[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
        prepared = ((rgb + 1) / 2 - mean) / std
        adapted_twice = model(prepared)
        bb.use_prepared_inputs()
        new = model(prepared)
    assert torch.allclose(new, old, atol=1e-5)
    assert not torch.allclose(adapted_twice, old, atol=1e-3)  # the switch matters
    assert bb.input_shapes == ((3, 32, 32),) and not bb.accepts((1, 16, 16))
    tiny = BACKBONES.get("clip_tiny")(BACKBONES.get("clip_tiny").Config())
    assert tiny.data_config["input_size"] == (3, 16, 16) and tiny.accepts((1, 16, 16))


def _write_cifar100(root: Path) -> Path:
    """torchvision's CIFAR-100 root, one random 32 x 32 image per class and split."""
    import pickle

    import numpy as np

    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        entry = {
            b"fine_labels": list(range(100)),
            b"coarse_labels": [c // 5 for c in range(100)],
            b"data": rng.integers(0, 256, (100, 3072), dtype=np.uint8),
        }
        (folder / split).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {b"fine_label_names": [f"class_{i}".encode() for i in range(100)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


def test_cli_runs_lora_on_split_cifar100_with_a_small_vit(tmp_path, capsys):
    root = _write_cifar100(tmp_path / "data")
    args = [
        "run",
        "scenario=split_cifar100",
        f"scenario.root={root}",
        "scenario.init_cls=60",  # PILOT's uneven split: B60 Inc40
        "scenario.increment=40",
        "scenario.n_experiences=0",
        "scenario.num_workers=0",
        "backbone=vit_b16",
        f"backbone.model={TINY}",
        "backbone.pretrained=none",
        "backbone.img_size=32",
        "strategy=lora",
        "strategy.epochs=1",
        "strategy.batch_size=50",
        "tracking=none",
        "progress=false",
        f"runs_dir={tmp_path / 'runs'}",
    ]
    assert run_cli(args) == 0, capsys.readouterr().err
    res = results_of(only_run_dir(tmp_path / "runs"))
    assert res["backbone"] == TINY and res["tags"]["backbone_source"] == f"random-init({TINY})"
    assert [len(c) for c in res["classes_per_experience"]] == [60, 40]
    assert len(res["accuracy_matrix"]) == 2
    assert 0 < res["efficiency"]["trainable_params"] < res["efficiency"]["backbone_params"]


def test_cli_runs_clip_on_split_cifar100_with_prepared_inputs(tmp_path, capsys, monkeypatch):
    from clbench.backbones import clip

    prepared = []
    use = clip.ClipBackbone.use_prepared_inputs
    monkeypatch.setattr(
        clip.ClipBackbone, "use_prepared_inputs", lambda self: (prepared.append(self), use(self))
    )
    root = _write_cifar100(tmp_path / "data")
    args = [
        "run",
        "scenario=split_cifar100",
        f"scenario.root={root}",
        "scenario.n_experiences=2",
        "scenario.num_workers=0",
        "backbone=clip_tiny",
        "strategy=lora",
        "strategy.epochs=1",
        "strategy.batch_size=50",
        "tracking=none",
        "progress=false",
        f"runs_dir={tmp_path / 'runs'}",
    ]
    assert run_cli(args) == 0, capsys.readouterr().err
    res = results_of(only_run_dir(tmp_path / "runs"))
    assert len(res["accuracy_matrix"]) == 2 and res["class_names"][0].startswith("class ")
    (bb,) = prepared  # the runner switched the adapter off: the scenario prepared the images
    assert bb.input_adapter.prepared and bb.input_shapes == ((3, 16, 16),)
