"""The MIL aggregators (ABMIL, TransMIL, GDAT): what they compute, the attention and instance
embeddings they leave, their padding of a bag to a grid, training, and their configs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clbench.backbones.mil import (
    ABMILConfig,
    GDATConfig,
    TransMILConfig,
    abmil,
    agent_grid,
    gdat,
    square_pad,
    transmil,
)
from clbench.errors import ConfigError
from clbench.models import ClassifierModel

D = 32  # instance feature size of the toy bags
BUILDERS = {
    "abmil": lambda: abmil(ABMILConfig(in_dim=D)),
    "transmil": lambda: transmil(TransMILConfig(in_dim=D)),
    "gdat": lambda: gdat(GDATConfig(in_dim=D)),
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_abmil_gated_attention_matches_a_hand_computation():
    module = abmil(ABMILConfig(in_dim=6, hidden=5, attn_dim=4)).module.double().eval()
    x = torch.randn(7, 6, dtype=torch.float64)
    W, b = module.fc.weight, module.fc.bias
    V, bv = module.attention_a.weight, module.attention_a.bias
    U, bu = module.attention_b.weight, module.attention_b.bias
    w, bw = module.attention_c.weight[0], module.attention_c.bias[0]
    with torch.no_grad():
        h = (x @ W.T + b).clamp_min(0)
        gate = torch.tanh(h @ V.T + bv) * (1 / (1 + torch.exp(-(h @ U.T + bu))))
        scores = gate @ w + bw
        e = torch.exp(scores - scores.max())
        a = e / e.sum()
        z = (a[:, None] * h).sum(0)
        out = module(x)
    assert out.shape == (1, 5)
    torch.testing.assert_close(out[0], z, atol=1e-6, rtol=0)
    torch.testing.assert_close(module.attention, a, atol=1e-6, rtol=0)
    torch.testing.assert_close(module.instances, h, atol=1e-6, rtol=0)


def test_abmil_is_invariant_to_the_order_of_the_instances():
    module = abmil(ABMILConfig(in_dim=D)).module.eval()
    x, perm = torch.randn(50, D), torch.randperm(50)
    with torch.no_grad():
        out, attention = module(x), module.attention
        out_perm = module(x[perm])
    torch.testing.assert_close(out_perm, out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(module.attention, attention[perm], atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_attention_is_a_distribution_over_the_bag_and_instances_keep_their_gradient(name):
    backbone = BUILDERS[name]()
    module = backbone.module.eval()
    out = module(torch.randn(1, 37, D))  # (1, N, D) like the MIL batches
    assert out.shape == (1, backbone.feature_dim) == (1, 512)
    assert module.attention.shape == (37,) and (module.attention >= 0).all()
    assert module.attention.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert module.instances.shape == (37, 512) and module.instances.requires_grad
    assert backbone.input_shape == (None, D) and backbone.accepts((5, D))


def test_square_pad_repeats_the_first_instances():
    h = torch.arange(7.0)[:, None].expand(7, 3)
    padded, side = square_pad(h)
    assert side == 3 and padded.shape == (9, 3)
    assert padded[:, 0].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1]
    assert square_pad(h[:1])[1] == 1 and square_pad(h[:4])[0].shape == (4, 3)


@pytest.mark.parametrize("n", [1, 2, 7, 16, 300])
def test_transmil_takes_any_bag_size_padding_it_to_a_square(n):
    module = transmil(TransMILConfig(in_dim=D)).module.eval()
    seen: dict[str, torch.Tensor] = {}
    module.layer1.register_forward_pre_hook(lambda m, args: seen.update(tokens=args[0]))
    with torch.no_grad():
        out = module(torch.randn(n, D))
    side = math.ceil(math.sqrt(n))
    tokens = seen["tokens"][0]  # CLS, the N instances, then copies of the first ones
    assert tokens.shape == (1 + side * side, 512)
    assert torch.equal(tokens[0], module.cls_token[0, 0])
    assert torch.equal(tokens[1 : n + 1], module.instances)
    assert torch.equal(tokens[n + 1 :], module.instances[: side * side - n])
    assert out.shape == (1, 512) and torch.isfinite(out).all()
    assert module.attention.shape == (n,) and torch.isfinite(module.attention).all()
    assert module.attention.sum().item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("n", [7, 20])
def test_transmil_attention_is_the_cls_attention_of_the_last_layer(n):
    """With no more tokens than landmarks and a converged pseudo-inverse, the Nystrom row
    is the exact softmax row of the CLS query (with the package's zero padding up to the
    landmarks), so the reported attention must equal that row computed from q and k."""
    cfg = TransMILConfig(in_dim=D, hidden=64, landmarks=32, pinv_iterations=20)
    module = transmil(cfg).module.eval()
    seen: dict[str, torch.Tensor] = {}
    module.layer2.register_forward_pre_hook(lambda m, args: seen.update(tokens=args[0]))
    with torch.no_grad():
        module(torch.randn(n, D))
        tokens = seen["tokens"][0]
        length, heads, dim_head = tokens.shape[0], cfg.heads, cfg.hidden // cfg.heads
        q, k, _ = module.layer2.attn.to_qkv(module.layer2.norm(tokens)).chunk(3, -1)
        q, k = (t.view(length, heads, dim_head).transpose(0, 1) for t in (q, k))
        logits = (q[:, 0:1] @ k.transpose(1, 2))[:, 0] / math.sqrt(dim_head)  # (heads, L)
        zeros = torch.zeros(heads, cfg.landmarks - length)  # zero tokens: q = k = 0
        row = torch.softmax(torch.cat([zeros, logits], 1), 1)[:, -length:]
        expected = row[:, 1 : n + 1].mean(0)
    assert length <= cfg.landmarks
    torch.testing.assert_close(module.attention, expected / expected.sum(), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("n", "side", "region"),
    [(1, 2, 2), (5, 4, 4), (9, 4, 4), (10, 16, 16), (256, 16, 16), (257, 32, 16), (1000, 32, 16)],
)
def test_gdat_grid_side_is_a_multiple_of_the_region_size(n, side, region):
    """ceil(sqrt(n)) rounded up to a multiple of 16; under 10 instances, rounded up to even
    with the whole grid as one region (the official fallback)."""
    assert agent_grid(n, 16) == (side, region)


@pytest.mark.parametrize("n", [1, 5, 1000])
def test_gdat_zero_pads_to_the_grid_and_averages_regions_into_agents(n):
    module = gdat(GDATConfig(in_dim=D)).module.eval()
    calls: list[torch.Tensor] = []
    module.blocks[0].attn.qkv.register_forward_hook(lambda m, args, out: calls.append(args[0]))
    with torch.no_grad():
        out = module(torch.randn(n, D))
    grid, agents = calls[:2]  # the padded tokens, then the agents, through the same qkv
    side, region = agent_grid(n, 16)
    assert grid.shape == (side * side, 512) and side % 2 == 0
    assert (n < 10 and region == side) or (side % 16 == 0 and region == 16)
    assert not grid[n:].any() and grid[:n].abs().sum(1).gt(0).all()
    grid2d = grid.view(side, side, 512)
    expected = torch.stack(
        [grid2d[i::region, j::region].mean((0, 1)) for i in range(region) for j in range(region)]
    )
    torch.testing.assert_close(agents, expected, atol=1e-6, rtol=1e-5)
    assert out.shape == (1, 512) and torch.isfinite(out).all()
    assert module.attention.shape == (n,) and module.instances.shape == (n, 512)
    assert module.attention.sum().item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_the_classifier_learns_a_toy_two_bag_problem(name):
    # 32 landmarks: the default 256 make the pseudo-inverse of small bags cost seconds on CPU
    small = {"transmil": lambda: transmil(TransMILConfig(in_dim=D, landmarks=32))}
    backbone = small.get(name, BUILDERS[name])()
    model = ClassifierModel(backbone.module, backbone.feature_dim)
    model.head.grow(2)
    negative = torch.randn(12, D)
    positive = torch.cat([torch.randn(15, D), torch.randn(5, D) + 2.0])  # a few "tumour" ones
    bags = [(negative, torch.tensor([0])), (positive, torch.tensor([1]))]

    def loss() -> float:
        model.eval()
        with torch.no_grad():
            return sum(F.cross_entropy(model(x), y).item() for x, y in bags)

    before = loss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    for _ in range(4):
        for x, y in bags:
            model.train()
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            assert model.backbone.fc.weight.grad.abs().sum() > 0
            opt.step()
    assert loss() < before - 1e-3


@pytest.mark.parametrize(("name", "schema"), [("transmil", TransMILConfig), ("gdat", GDATConfig)])
def test_the_configs_compose_with_the_scenario_feature_size(name, schema):
    from clbench.config import compose, typed
    from clbench.registry import BACKBONES

    cfg = compose(["scenario=digit_bags", f"backbone={name}"])
    assert cfg.backbone.in_dim == 64  # digit_bags' feature_dim, not the 1024 default
    typed_cfg = typed("backbone", cfg.backbone)
    assert isinstance(typed_cfg, schema) and typed_cfg.in_dim == 64
    assert typed_cfg == schema(in_dim=64)  # every other value is the dataclass default
    backbone = BACKBONES.get(name)(typed_cfg)
    assert backbone.name == name and backbone.input_shape == (None, 64)


def test_bad_aggregator_options_raise_one_config_error_line():
    with pytest.raises(ConfigError, match=r"backbone\.heads: 7; must divide backbone\.hidden"):
        TransMILConfig(heads=7)
    with pytest.raises(ConfigError, match=r"backbone\.dropout: 1\.0"):
        GDATConfig(dropout=1.0)
    with pytest.raises(ConfigError, match=r"backbone\.region_size: 0"):
        GDATConfig(region_size=0)
