"""CLIP backbones: the text-embedding classifier, LoRA in either tower, the CLI (offline)."""

from __future__ import annotations

import copy
from typing import Any

import open_clip
import pytest
import torch
import torch.nn.functional as F

from clbench.adapters.lora import lora_layers
from clbench.backbones.clip import ClipBackbone
from clbench.config import compose, validate
from clbench.errors import ConfigError
from clbench.models import ClipClassifier
from clbench.progress import StepCounter
from clbench.registry import BACKBONES, SCENARIOS, STRATEGIES
from helpers import only_run_dir, results_of, run_cli

CLI_FAST = ["scenario.n_experiences=2", "strategy.epochs=1", "tracking=none", "progress=false"]


@pytest.fixture(scope="module")
def scenario():
    build = SCENARIOS.get("split_digits")
    return build(build.Config(n_experiences=5))


def _tiny(seed: int = 0) -> Any:
    torch.manual_seed(seed)
    build = BACKBONES.get("clip_tiny")
    return build(build.Config())


def _classifier(scenario: Any, seed: int = 0) -> ClipClassifier:
    model = _tiny(seed).classifier(scenario.class_names)
    assert isinstance(model, ClipClassifier)
    return model


def _images(scenario: Any, n: int = 6) -> torch.Tensor:
    data = scenario.test_stream[0].dataset
    return torch.stack([data[i][0] for i in range(n)])


def _strategy(name: str, model: Any, plugins: Any = (), **overrides: Any) -> Any:
    torch.manual_seed(0)
    cls = STRATEGIES.get(name)
    cfg = cls.Config(name=name, **overrides)
    return cls(model=model, cfg=cfg, plugins=list(plugins), n_experiences=5)


def test_logits_are_scaled_cosine_similarity_with_the_prompts(scenario):
    model = _classifier(scenario).eval()
    model.head.grow(4)
    x = _images(scenario)
    clip = model.backbone
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=clip.context_length)
    prompts = [f"a photo of a {name}." for name in scenario.class_names[:4]]
    with torch.no_grad():
        text = F.normalize(clip.encode_text(tokenizer(prompts)), dim=-1)
        image = F.normalize(clip.encode_image(x.repeat(1, 3, 1, 1)), dim=-1)
        expected = clip.logit_scale.exp() * image @ text.T
        logits = model(x)
    assert model.head.prompts() == prompts
    assert logits.shape == (len(x), 4)
    assert torch.allclose(logits, expected, atol=1e-5)
    with torch.no_grad():  # an RGB input of the same grey image gives the same logits
        assert torch.allclose(model(x.repeat(1, 3, 1, 1)), logits, atol=1e-6)


def test_head_grows_with_classes_in_arrival_order(scenario):
    model = _classifier(scenario).eval()
    x = _images(scenario)
    assert model.head.num_classes == 0
    with torch.no_grad():
        assert model(x).shape == (len(x), 0)
        assert model.head.grow(2) and not model.head.grow(2)
        two = model(x)
        assert model.head.grow(6)
        six = model(x)
    assert six.shape == (len(x), 6)
    assert torch.allclose(six[:, :2], two, atol=1e-6)  # old classes keep their embedding
    assert not torch.allclose(six[:, 2:4], six[:, :2])  # new names, new embeddings
    with pytest.raises(ValueError, match="class names"):
        model.head.grow(11)


def test_cached_text_embeddings_follow_the_weights(scenario):
    model = _classifier(scenario).eval()
    model.head.grow(4)
    x = _images(scenario)
    with torch.no_grad():
        before = model(x)
        assert model.text_features() is model.text_features()  # cached in eval mode
        model.backbone.ln_final.weight.mul_(1.5)  # an in-place change of the text tower
        model.backbone.ln_final.bias.add_(0.3)
        after = model(x)
    assert not torch.allclose(before, after)
    text = F.normalize(model.backbone.encode_text(model.head.tokens), dim=-1)
    assert torch.allclose(model.text_features(), text.detach(), atol=1e-6)


def _features(model: ClipClassifier, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.image_features(x), model.text_features()


@pytest.mark.parametrize("tower", ["image", "text", "both"])
def test_lora_in_a_tower_trains_only_lora_and_merges_exactly(scenario, tower):
    model = _classifier(scenario)
    bare = copy.deepcopy(model)
    st = _strategy("lora", model, tower=tower, epochs=2, lr=3e-3, rank=4)
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = [names[id(p)] for p in st.trainable_parameters()]
    in_image = [n for n in trainable if n.startswith("backbone.visual.")]
    assert trainable and all(".blocks." in n for n in trainable)  # LoRA factors only
    assert bool(in_image) == (tower != "text")
    assert (len(in_image) < len(trainable)) == (tower != "image")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    st.train(scenario.train_stream[0], eval_streams=[])
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    model.eval()
    bare.head.grow(model.head.num_classes)
    x = _images(scenario)
    (image, text), (image0, text0) = _features(model, x), _features(bare.eval(), x)
    assert torch.allclose(image, image0, atol=1e-6) == (tower == "text")
    assert torch.allclose(text, text0, atol=1e-6) == (tower == "image")
    with torch.no_grad():
        before = model(x)
        assert not torch.allclose(before, bare(x), atol=1e-4)
        layers = lora_layers(model)
        for name in layers:
            layers[name].merge()
        after = model(x)
    assert torch.allclose(before, after, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("olora", {"tower": "text"}),
        ("sdlora", {"tower": "both"}),
        ("dyrank", {"tower": "both", "kappa": 0.05, "ramp_steps": 2}),
        ("inc_rank", {"tower": "text"}),
        ("inflora", {"tower": "image"}),
        ("mora", {"tower": "image"}),
        ("moe_adapters", {"experts": 4, "bottleneck": 8, "ae_steps": 20}),
        ("finetune", {}),
        ("linear_probe", {}),
        ("joint", {}),
    ],
)
def test_strategies_run_on_clip(scenario, name, overrides):
    model = _classifier(scenario)
    counter = StepCounter()  # the most trainable parameters seen while training
    st = _strategy(name, model, plugins=[counter], epochs=1, **overrides)
    x = _images(scenario)
    for exp in list(scenario.train_stream)[:2]:
        st.train(exp, eval_streams=[])
    with torch.no_grad():
        logits = st.model.eval()(x)
    assert logits.shape == (len(x), 4) and torch.isfinite(logits).all()
    n_trainable = counter.trainable
    n_all = sum(p.numel() for p in model.parameters())
    if name == "linear_probe":  # the text head has no parameter: the frozen CLIP classifier
        assert n_trainable == 0
    elif name in ("finetune", "joint"):
        assert n_trainable == n_all
    else:
        assert 0 < n_trainable < n_all // 10


def test_text_towers_are_refused_where_they_cannot_apply(scenario):
    with pytest.raises(ConfigError, match="tower=image only"):
        _strategy("inflora", _classifier(scenario), tower="text")
    from clbench.backbones.micro_vit import build_micro_vit
    from clbench.models import ClassifierModel

    vit = build_micro_vit()
    with pytest.raises(ConfigError, match="needs a CLIP backbone"):
        _strategy("lora", ClassifierModel(vit, vit.num_features), tower="both")


def test_clip_backbones_declare_the_inputs_they_take(scenario):
    tiny = _tiny()
    assert isinstance(tiny, ClipBackbone) and tiny.source == "random-init"
    assert tiny.accepts((1, 16, 16)) and tiny.accepts((3, 16, 16))
    assert not tiny.accepts((1, 32, 32))
    assert tiny.accepts(scenario.input_shape)


def test_cli_runs_clip_tiny_with_lora_in_both_towers(tmp_path):
    args = ["run", "backbone=clip_tiny", "strategy=lora", "strategy.tower=both", *CLI_FAST]
    assert run_cli([*args, f"runs_dir={tmp_path}"]) == 0
    res = results_of(only_run_dir(tmp_path))
    assert res["backbone"] == "clip_tiny" and res["config"]["strategy"]["tower"] == "both"
    assert len(res["accuracy_matrix"]) == 2
    assert 0 < res["efficiency"]["trainable_params"] < res["efficiency"]["backbone_params"]


def test_vit_b16_config_composes_and_a_missing_file_is_one_line(tmp_path, capsys):
    typed = validate(compose(["backbone=clip_vit_b16"]))["backbone"]
    assert (typed.model, typed.pretrained, typed.template) == (
        "ViT-B-16",
        "openai",
        "a photo of a {}.",
    )
    missing = tmp_path / "missing.safetensors"
    args = ["run", "backbone=clip_vit_b16", f"backbone.pretrained={missing}", *CLI_FAST]
    assert run_cli([*args, f"runs_dir={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: CLIP weights file not found") and str(missing) in err[0]
    assert not list(tmp_path.rglob("results.json"))
