"""The shared sparse-mask abstraction (clbench.adapters.sparse): layer densities, exact
random masks, prune / grow rules on hand-made weights, masked forward, optimizer state,
SparCL's percentile gradient mask, the death-rate schedule and injection into backbones."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from clbench.adapters.sparse import (
    GROW_RULES,
    PRUNE_RULES,
    CosineDecay,
    MaskedLayer,
    MaskSet,
    erk_densities,
    keep_largest,
    layer_densities,
    mask_layers,
    masked_layers,
    percentile_gradient_mask,
    uniform_densities,
    unmask_layers,
)
from clbench.backbones.wideresnet import WideResNet
from clbench.errors import ConfigError

SHAPES = {"a": (16, 3, 3, 3), "b": (32, 16, 3, 3), "c": (10, 32)}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _small_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 5, 3), nn.Flatten(), nn.Linear(5 * 4 * 4, 7))


def _layer(weight: list[float] | torch.Tensor, mask: list[bool] | None = None) -> MaskedLayer:
    """A MaskedLayer around a Linear(n, 1) holding ``weight`` (and ``mask``) as one row."""
    w = torch.as_tensor(weight, dtype=torch.float32).reshape(1, -1)
    layer = MaskedLayer(nn.Linear(w.shape[1], 1))
    with torch.no_grad():
        layer.weight.copy_(w)
        if mask is not None:
            layer.mask.copy_(torch.tensor(mask).reshape(1, -1))
    return layer


def _flat_set(t: torch.Tensor) -> set[int]:
    return set(t.flatten().nonzero().flatten().tolist())


# ------------------------------------------------------------------ 1. densities
def test_erk_densities_match_the_formula_and_the_budget():
    numel = {n: math.prod(s) for n, s in SHAPES.items()}
    total = sum(numel.values())
    density = 0.1
    # d_l = eps * sum(shape_l) / numel_l, so sum_l d_l numel_l = eps * sum_l sum(shape_l)
    eps = density * total / sum(sum(s) for s in SHAPES.values())
    expected = {n: eps * sum(s) / numel[n] for n, s in SHAPES.items()}
    assert max(expected.values()) < 1  # no layer made dense at this density
    got = erk_densities(SHAPES, density)
    for n in SHAPES:
        assert got[n] == pytest.approx(expected[n], rel=1e-12)
    assert abs(sum(got[n] * numel[n] for n in SHAPES) - density * total) < 1e-9
    assert layer_densities(SHAPES, density, "erk") == got


def test_erk_makes_overfull_layers_dense_and_keeps_the_budget():
    numel = {n: math.prod(s) for n, s in SHAPES.items()}
    total = sum(numel.values())
    density = 0.5
    # the linear (largest score) then the small conv exceed 1: both dense, the rest of the
    # budget goes to the big conv
    got = erk_densities(SHAPES, density)
    assert got["c"] == 1.0 and got["a"] == 1.0
    assert got["b"] == pytest.approx((density * total - numel["a"] - numel["c"]) / numel["b"])
    assert abs(sum(got[n] * numel[n] for n in SHAPES) - density * total) < 1e-9


def test_uniform_densities_and_bad_inputs():
    assert uniform_densities(SHAPES, 0.3) == {"a": 0.3, "b": 0.3, "c": 0.3}
    assert layer_densities(SHAPES, 0.3, "uniform") == {"a": 0.3, "b": 0.3, "c": 0.3}
    with pytest.raises(ConfigError, match="uniform, erk"):
        layer_densities(SHAPES, 0.3, "gaussian")
    with pytest.raises(ConfigError, match="density"):
        erk_densities(SHAPES, 0.0)
    with pytest.raises(ConfigError, match="density"):
        uniform_densities(SHAPES, 1.5)


# ----------------------------------------------------------------- 2. randomize
def test_randomize_draws_exact_counts_deterministically():
    densities = {"0": 0.37, "2": 0.55}  # 0.37 * 135 = 49.95: rounded, not truncated

    def masks(seed: int) -> dict[str, torch.Tensor]:
        ms = MaskSet(mask_layers(_small_model()), _gen(seed))
        ms.randomize(densities)
        for name, layer in ms.layers.items():
            assert layer.nonzero() == round(densities[name] * layer.mask.numel())
            assert torch.equal(ms.fired[name], layer.mask)
        return ms.get()

    first, again, other = masks(1), masks(1), masks(2)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert any(not torch.equal(first[n], other[n]) for n in first)


# ------------------------------------------------------------- 3. prune / grow
@pytest.mark.parametrize("prune_rule", PRUNE_RULES)
@pytest.mark.parametrize("grow_rule", GROW_RULES)
def test_update_keeps_every_layer_count(prune_rule: str, grow_rule: str):
    model = _small_model()
    ms = MaskSet(mask_layers(model), _gen(3))
    ms.randomize({"0": 0.4, "2": 0.25})
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 3, 6, 6)).square().mean().backward()
        opt.step()
    before = {n: layer.nonzero() for n, layer in ms.layers.items()}
    old = ms.get()
    ms.update(0.3, prune_rule, grow_rule, opt)
    for name, layer in ms.layers.items():
        assert layer.nonzero() == before[name]
        assert not torch.equal(layer.mask, old[name])  # the topology did change
        assert torch.all(layer.weight[~layer.mask] == 0)


def test_magnitude_prunes_the_smallest_active_weights():
    # position 7 is inactive with a tiny stored weight: it is never a candidate
    layer = _layer([0.5, -0.1, 3.0, 0.2, -2.0, 0.05, 1.0, 0.001], [True] * 7 + [False])
    ms = MaskSet({"l": layer}, _gen())
    removed = ms.prune(0.3, "magnitude")  # ceil(0.3 * 7) = 3
    assert _flat_set(removed["l"]) == {1, 3, 5}
    assert _flat_set(layer.mask) == {0, 2, 4, 6}


def test_prune_count_is_exact_with_ties_and_float_noise():
    layer = _layer([1.0] * 25)
    ms = MaskSet({"l": layer}, _gen())
    removed = ms.prune(0.28, "magnitude")  # 0.28 * 25 is 7.000000000000001 in floats
    assert _flat_set(removed["l"]) == set(range(7))  # equal magnitudes: lowest positions
    assert layer.nonzero() == 18


def test_set_prunes_smallest_positive_and_largest_negative():
    weights = [0.5, -0.1, 3.0, 0.2, -2.0, -0.05, 1.0, -0.3]
    ms = MaskSet({"l": _layer(weights)}, _gen())
    assert _flat_set(ms.prune(0.5, "set")["l"]) == {3, 0, 5, 1}  # 2 positive, 2 negative
    ms = MaskSet({"l": _layer(weights)}, _gen())
    assert _flat_set(ms.prune(0.375, "set")["l"]) == {3, 0, 5}  # k=3: 2 positive, 1 negative
    # only one positive weight: the negatives make up the count
    ms = MaskSet({"l": _layer([0.4, -1.0, -0.2, -3.0, -0.5, -0.7])}, _gen())
    assert _flat_set(ms.prune(0.5, "set")["l"]) == {0, 2, 4}


def test_taylor_fo_prunes_the_smallest_squared_weight_times_gradient():
    layer = _layer([1.0, -2.0, 0.5, 3.0, -1.0, 0.1], [True, True, True, True, True, False])
    layer.weight.grad = torch.tensor([[0.1, 0.01, 4.0, -0.2, 0.0, 0.0]])
    # (w g)^2 over the active: 0.01, 0.0004, 4, 0.36, 0 -> two smallest: positions 4 and 1
    removed = MaskSet({"l": layer}, _gen()).prune(0.4, "taylor_fo")  # ceil(2.0) = 2
    assert _flat_set(removed["l"]) == {4, 1}


def test_random_unfired_never_regrows_fired_positions():
    torch.manual_seed(0)
    layer = MaskedLayer(nn.Linear(20, 10))
    ms = MaskSet({"l": layer}, _gen(5))
    ms.randomize({"l": 0.1})  # 20 active, 180 never fired
    for _ in range(4):  # 10 regrown per step: unfired positions never run out
        fired = ms.fired["l"].clone()
        removed = ms.prune(0.5, "magnitude")["l"]
        grown = ms.grow({"l": int(removed.sum())}, "random_unfired")["l"]
        assert int(grown.sum()) == 10
        assert not (grown & removed).any()
        assert not (grown & fired).any()  # only never-fired positions
        assert torch.equal(ms.fired["l"], fired | grown)
        assert torch.all(layer.weight[grown] == 0)
    assert layer.nonzero() == 20


def test_random_unfired_falls_back_to_fired_positions_when_they_run_out():
    layer = _layer(list(range(1, 9)), [True] * 6 + [False] * 2)
    ms = MaskSet({"l": layer}, _gen(0))
    ms.fired["l"][0, 7] = True  # position 6 is the only never-fired one
    ms.prune(0.5, "magnitude")  # removes positions 0, 1, 2
    grown = ms.grow({"l": 3}, "random_unfired")["l"]
    assert int(grown.sum()) == 3 and bool(grown[0, 6])
    assert layer.nonzero() == 6


def test_random_growth_picks_exactly_among_inactive():
    def grow(seed: int) -> torch.Tensor:
        layer = _layer(torch.ones(50), [True] * 10 + [False] * 40)
        return MaskSet({"l": layer}, _gen(seed)).grow({"l": 7}, "random")["l"]

    grown = grow(4)
    assert int(grown.sum()) == 7 and not grown[0, :10].any()
    assert torch.equal(grown, grow(4)) and not torch.equal(grown, grow(5))


def test_gradient_growth_picks_the_largest_inactive_gradients():
    mask = [True, False, True, False, False, False, False, True]
    layer = _layer([1.0] * 8, mask)
    # the active positions have the largest gradients: they must not be chosen
    layer.weight.grad = torch.tensor([[9.0, 0.5, 8.0, -3.0, 0.1, 2.0, -0.2, 7.0]])
    grown = MaskSet({"l": layer}, _gen()).grow({"l": 2}, "gradient")["l"]
    assert _flat_set(grown) == {3, 5}
    assert layer.weight[0, 3] == 0 and layer.weight[0, 5] == 0  # grown at zero
    assert layer.nonzero() == 5


def test_momentum_growth_uses_adams_normalised_first_moment():
    layer = _layer([1.0] * 6, [True, False, False, False, False, False])
    opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
    m = torch.tensor([[5.0, 1.0, 0.5, -0.3, 2.0, 0.01]])
    v = torch.tensor([[1.0, 1.0, 0.01, 0.0009, 100.0, 0.0]])
    # |m| / (sqrt(v) + 1e-8): 5, 1, 5, 10, 0.2, 1e6 -> largest inactive: 5, 3 (not |m|'s 4, 1)
    opt.state[layer.weight] = {"step": torch.tensor(1.0), "exp_avg": m, "exp_avg_sq": v}
    grown = MaskSet({"l": layer}, _gen()).grow({"l": 2}, "momentum", opt)["l"]
    assert _flat_set(grown) == {5, 3}


def test_momentum_growth_uses_sgd_momentum_buffer():
    layer = _layer([1.0] * 5, [False, True, False, False, False])
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    opt.state[layer.weight] = {"momentum_buffer": torch.tensor([[0.1, 9.0, -3.0, 0.2, 2.0]])}
    grown = MaskSet({"l": layer}, _gen()).grow({"l": 2}, "momentum", opt)["l"]
    assert _flat_set(grown) == {2, 4}


def test_bad_rules_are_config_errors():
    ms = MaskSet({"l": _layer([1.0, 2.0])}, _gen())
    with pytest.raises(ConfigError, match="magnitude, set, taylor_fo"):
        ms.prune(0.5, "l1")
    with pytest.raises(ConfigError, match="random, random_unfired"):
        ms.update(0.5, "magnitude", "rigl")
    assert ms.layers["l"].nonzero() == 2  # nothing changed before the error


# --------------------------------------------------------------- 4. forward
def test_weights_outside_the_mask_are_zero_in_the_forward():
    torch.manual_seed(0)
    lin, conv = MaskedLayer(nn.Linear(6, 4)), MaskedLayer(nn.Conv2d(2, 3, 3, padding=1))
    for layer in (lin, conv):
        with torch.no_grad():
            layer.mask.copy_(torch.rand(layer.mask.shape) < 0.5)
            layer.weight[~layer.mask] = 1e3
    x = torch.randn(5, 6)
    masked_w = lin.weight * lin.mask
    assert torch.equal(lin(x), F.linear(x, masked_w, lin.bias))
    assert not torch.allclose(lin(x), F.linear(x, lin.weight, lin.bias))
    xc = torch.randn(2, 2, 5, 5)
    masked_wc = conv.weight * conv.mask
    assert torch.equal(conv(xc), F.conv2d(xc, masked_wc, conv.bias, padding=1))
    assert not torch.allclose(conv(xc), F.conv2d(xc, conv.weight, conv.bias, padding=1))


def test_the_stored_weight_receives_the_dense_gradient():
    torch.manual_seed(0)
    layer = MaskedLayer(nn.Linear(6, 4))
    with torch.no_grad():
        layer.mask.copy_(torch.rand(layer.mask.shape) < 0.5)
    x = torch.randn(5, 6)
    layer(x).square().sum().backward()
    effective = (layer.weight * layer.mask).detach().requires_grad_()
    F.linear(x, effective, layer.bias).square().sum().backward()
    assert torch.allclose(layer.weight.grad, effective.grad)
    assert (layer.weight.grad[~layer.mask] != 0).any()  # not masked: RigL reads it


# -------------------------------------------------------- 5. weights and state
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_apply_zeroes_weights_and_optimizer_state_outside_the_mask(kind: str):
    model = _small_model()
    ms = MaskSet(mask_layers(model), _gen(0))
    ms.randomize({"0": 0.5, "2": 0.3})
    if kind == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        keys = ["momentum_buffer"]
    else:
        opt = torch.optim.Adam(model.parameters(), lr=0.1)
        keys = ["exp_avg", "exp_avg_sq"]
    model(torch.randn(3, 3, 6, 6)).sum().backward()
    opt.step()
    for layer in ms.layers.values():  # the dense gradient fills the state everywhere
        assert all((opt.state[layer.weight][k][~layer.mask] != 0).any() for k in keys)
    kept = {n: layer.weight[layer.mask].clone() for n, layer in ms.layers.items()}
    ms.apply(opt)
    for name, layer in ms.layers.items():
        assert torch.all(layer.weight[~layer.mask] == 0)
        assert torch.equal(layer.weight[layer.mask], kept[name])
        for k in keys:
            state = opt.state[layer.weight][k]
            assert torch.all(state[~layer.mask] == 0) and (state[layer.mask] != 0).any()


def test_freeze_and_mask_gradients():
    model = _small_model()
    ms = MaskSet(mask_layers(model), _gen(0))
    ms.randomize({"0": 0.5, "2": 0.5})
    model(torch.randn(3, 3, 6, 6)).sum().backward()
    grads = {n: layer.weight.grad.clone() for n, layer in ms.layers.items()}
    frozen = {"0": torch.rand(ms.shapes()["0"], generator=_gen(9)) < 0.3}
    ms.freeze_gradients(frozen)
    conv = ms.layers["0"].weight.grad
    assert torch.all(conv[frozen["0"]] == 0)
    assert torch.equal(conv[~frozen["0"]], grads["0"][~frozen["0"]])
    assert torch.equal(ms.layers["2"].weight.grad, grads["2"])  # not named: untouched
    ms.mask_gradients()
    for name, layer in ms.layers.items():
        expected = grads[name] * layer.mask
        if name == "0":
            expected[frozen["0"]] = 0
        assert torch.equal(layer.weight.grad, expected)


# ---------------------------------------------------------- 6. SparCL's DGM
def test_percentile_gradient_mask_matches_numpy():
    grad = np.array(
        [
            [0.9, -0.2, 0.4, 0.0, 0.05, -0.7, 0.4],
            [1.2, -0.4, 0.3, 0.6, -0.1, 0.4, 2.0],
            [-0.05, 0.8, 0.15, 0.4, -3.0, 0.25, 0.35],
        ],
        dtype=np.float32,
    )
    mask = np.ones_like(grad, dtype=bool)
    mask[0, 0] = mask[1, 6] = mask[2, 4] = False
    layer = MaskedLayer(nn.Linear(7, 3))
    layer.mask.copy_(torch.from_numpy(mask))
    layer.weight.grad = torch.from_numpy(grad.copy())
    masked = grad * mask
    threshold = np.percentile(np.abs(masked), 80)  # (21 - 1) * 0.8 = 16: an entry, 0.4
    assert threshold == np.float32(0.4)
    expected = np.where(np.abs(masked) < threshold, 0, masked)  # 0.4 itself is kept
    got = percentile_gradient_mask({"l": layer}, 80)
    assert np.array_equal(layer.weight.grad.numpy(), expected)
    assert got == {"l": np.count_nonzero(expected) / 21} and layer.grad_density == got["l"]
    assert layer.flop_density() == (18 / 21, got["l"])


def test_percentile_gradient_mask_on_random_gradients():
    rng = np.random.default_rng(0)
    grad = rng.standard_normal((16, 9)).astype(np.float32)
    mask = rng.random((16, 9)) < 0.6
    layer = MaskedLayer(nn.Linear(9, 16))
    layer.mask.copy_(torch.from_numpy(mask))
    layer.weight.grad = torch.from_numpy(grad.copy())
    masked = grad * mask
    expected = np.where(np.abs(masked) < np.percentile(np.abs(masked), 75), 0, masked)
    percentile_gradient_mask({"l": layer}, 75)
    assert np.array_equal(layer.weight.grad.numpy(), expected)
    assert layer.grad_density == pytest.approx(np.count_nonzero(expected) / grad.size)


# ------------------------------------------------------------- 7. schedule
def test_cosine_decay_follows_the_closed_form_and_stays_at_end():
    decay = CosineDecay(0.5, 10, end=0.005)
    assert decay.rate == 0.5
    rates = [decay.step() for _ in range(14)]
    for i in (1, 3, 5, 9):
        assert rates[i - 1] == pytest.approx(0.005 + 0.495 * (1 + math.cos(math.pi * i / 10)) / 2)
    assert rates[4] == pytest.approx((0.5 + 0.005) / 2)
    assert rates[9:] == [0.005] * 5
    with pytest.raises(ConfigError, match="steps"):
        CosineDecay(0.5, 0)


# ---------------------------------------------------------------- 8. models
def test_mask_layers_on_a_wideresnet_keeping_the_first_conv_dense():
    torch.manual_seed(0)
    model = WideResNet(16, 2, in_chans=1).eval()
    dense = copy.deepcopy(model)
    wanted = {
        n
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear)) and n != "conv1"
    }
    layers = mask_layers(model, where=lambda name, module: name != "conv1")
    assert set(layers) == wanted and "fc" in layers
    assert set(masked_layers(model)) == wanted
    assert type(model.conv1) is nn.Conv2d
    assert mask_layers(model) == {**layers, "conv1": model.conv1}  # no double wrapping
    assert not isinstance(model.conv1.base, MaskedLayer)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), dense(x))


def test_mask_layers_on_a_vit_by_target_and_state_dict_round_trip():
    def vit() -> VisionTransformer:
        torch.manual_seed(0)
        return VisionTransformer(
            img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2
        ).eval()

    model, dense = vit(), vit()
    layers = mask_layers(model, targets=["qkv", "fc1"])
    assert set(layers) == {f"blocks.{i}.{s}" for i in range(2) for s in ("attn.qkv", "mlp.fc1")}
    assert set(masked_layers(model)) == set(layers)
    assert type(model.blocks[0].attn.proj) is nn.Linear
    assert type(model.blocks[0].mlp.fc2) is nn.Linear
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), dense(x))

    ms = MaskSet(layers, _gen(7))
    ms.randomize(uniform_densities(ms.shapes(), 0.3))
    state = model.state_dict()
    assert state["blocks.0.attn.qkv.mask"].dtype == torch.bool
    assert "blocks.0.attn.qkv.base.weight" in state
    copy_model = vit()
    mask_layers(copy_model, targets=["qkv", "fc1"])
    copy_model.load_state_dict(state)
    with torch.no_grad():
        out = model(x)
        assert torch.equal(copy_model(x), out)
        assert not torch.allclose(out, dense(x))  # the masks do change the output

    stored = {n: (layer.weight.detach().clone(), layer.mask.clone()) for n, layer in layers.items()}
    unmask_layers(model)
    assert not masked_layers(model)
    for name, (weight, mask) in stored.items():
        plain = model.get_submodule(name)
        assert type(plain) is nn.Linear
        assert torch.all(plain.weight[~mask] == 0)
        assert torch.equal(plain.weight[mask], weight[mask])
    with torch.no_grad():
        assert torch.allclose(model(x), out, atol=1e-6)


# ---------------------------------------------------------------- 9. report
def test_report_counts_by_hand():
    lin, conv = MaskedLayer(nn.Linear(4, 3)), MaskedLayer(nn.Conv2d(1, 2, 2))
    lin.mask.zero_()
    lin.mask[0, :3] = True  # 3 of 12
    conv.mask[0] = False
    conv.mask[1, 0, 0, 0] = False  # 3 of 8
    report = MaskSet({"lin": lin, "conv": conv}, _gen()).report()
    assert report == {
        "overall": 6 / 20,
        "nonzero": 6,
        "total": 20,
        "layers": {"lin": 0.25, "conv": 0.375},
    }


def test_keep_largest_narrows_a_mask_to_the_top_scores_of_its_active_positions():
    mask = torch.tensor([True, True, False, True, True, True])
    importance = torch.tensor([0.5, 3.0, 9.0, 1.0, 1.0, 0.2])  # 9.0 is inactive: never kept
    got = keep_largest(mask, importance, 3)
    # 3.0, then the tie 1.0 / 1.0 (both kept), not 0.5 or 0.2
    assert got.tolist() == [False, True, False, True, True, False]
    assert keep_largest(mask, importance, 2).tolist() == [False, True, False, True, False, False]
    assert torch.equal(keep_largest(mask, importance, 9), mask)
