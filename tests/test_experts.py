"""Mixtures of rank and adapter experts: MoRA and MoE-Adapters (with DDAS routing)."""

from __future__ import annotations

import math

import pytest
import torch
from avalanche.training.plugins import SupervisedPlugin
from torch import nn

from clbench.adapters.experts import (
    MoRALinear,
    NoisyTopKRouter,
    TaskAutoencoders,
    add_adapter_mixtures,
    routed,
)
from clbench.backbones.micro_vit import build_micro_vit
from clbench.models import ClassifierModel
from clbench.registry import BACKBONES, SCENARIOS, STRATEGIES
from helpers import FAST, only_run_dir, results_of, run_cli


def _mora(top_k: int, delta: float, tau: float = 0.5) -> MoRALinear:
    torch.manual_seed(0)
    layer = MoRALinear(nn.Linear(16, 12), top_k=top_k, tau=tau, delta=delta)
    for _ in range(3):  # three tasks of four rank-1 experts
        block = layer.add_block(4, 8.0)
        nn.init.normal_(block.B)
    return layer


# ---------------------------------------------------------------------------- MoRA
@pytest.mark.parametrize(("top_k", "delta"), [(3, -1.0), (5, 0.0), (12, 0.1)])
def test_mora_budget_and_threshold(top_k, delta):
    layer = _mora(top_k, delta)
    x = torch.randn(40, 7, 16)
    _, w = layer.expert_weights(x)
    active = w > 0
    assert active.sum(-1).max() <= top_k
    h = torch.cat([x @ b.A.T for b in layer.blocks], dim=-1)
    s = h / h.norm(dim=-1, keepdim=True)
    assert not active[s < delta].any()
    if delta <= -1:  # nothing pruned: exactly k act
        assert (active.sum(-1) == top_k).all()


def test_mora_output_is_the_weighted_sum_of_active_experts():
    layer = _mora(top_k=5, delta=0.0)
    x = torch.randn(9, 16)
    a = torch.cat([b.A for b in layer.blocks])  # (12, 16)
    bmat = torch.cat([b.B * b.scale for b in layer.blocks], dim=1)  # (12 out, 12 experts)
    h = x @ a.T
    s = h / h.norm(dim=-1, keepdim=True)
    w = torch.softmax(s / 0.5, dim=-1)
    keep = torch.zeros_like(w, dtype=torch.bool).scatter(-1, s.topk(5, dim=-1).indices, True)
    w = w * (keep & (s >= 0))
    expected = layer.base(x) + (w * h) @ bmat.T
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_mora_pruned_experts_contribute_exactly_zero():
    layer = _mora(top_k=4, delta=0.05)
    x = torch.randn(6, 16)
    _, w = layer.expert_weights(x)
    before = layer(x)
    for token in range(len(x)):
        off = (w[token] == 0).nonzero().flatten().tolist()
        assert off, "the budget should switch experts off"
        with torch.no_grad():
            saved = [b.B.clone() for b in layer.blocks]
            for e in off:  # expert e: block e // 4, rank e % 4; make it huge
                layer.blocks[e // 4].B[:, e % 4] = 1e6
            assert torch.equal(layer(x)[token], before[token])
            for b, old in zip(layer.blocks, saved, strict=True):
                b.B.copy_(old)


def test_mora_strategy_freezes_old_experts_and_adds_new_ones():
    scenario = SCENARIOS.get("split_digits")(SCENARIOS.get("split_digits").Config(n_experiences=2))
    torch.manual_seed(0)
    vit = build_micro_vit()
    cfg = STRATEGIES.get("mora").Config(name="mora", epochs=1, targets=["qkv"])
    st = STRATEGIES.get("mora")(model=ClassifierModel(vit, vit.num_features), cfg=cfg)
    exps = list(scenario.train_stream)
    st.train(exps[0], eval_streams=[])
    layer = next(iter(st.lora_layers().values()))
    assert isinstance(layer, MoRALinear) and len(layer.blocks) == 1
    first = [p.clone() for p in layer.blocks[0].parameters()]
    st.train(exps[1], eval_streams=[])
    assert len(layer.blocks) == 2
    assert all(torch.equal(a, b) for a, b in zip(first, layer.blocks[0].parameters(), strict=True))
    assert layer.blocks[1].B.abs().sum() > 0  # the new experts learnt
    with pytest.raises(RuntimeError, match="cannot be merged"):
        layer.merge()


# ----------------------------------------------------------------- MoE-Adapters
def test_noisy_top_k_router_gates():
    torch.manual_seed(0)
    router = NoisyTopKRouter(8, 6, top_k=2)
    nn.init.normal_(router.w_gate)
    nn.init.normal_(router.w_noise)
    x = torch.randn(32, 8)
    g = router(x)  # training mode: noisy
    assert ((g.gates > 0).sum(1) == 2).all()
    assert torch.allclose(g.gates.sum(1), torch.ones(32))
    assert g.balance >= 0 and g.balance.requires_grad
    router.eval()
    assert torch.equal(router(x).gates, router(x).gates)  # no noise at test


def test_adapter_mixtures_start_as_the_bare_model_on_vit_and_clip():
    torch.manual_seed(0)
    vit = build_micro_vit().eval()
    x = torch.randn(3, 1, 16, 16)
    bare = vit(x)
    mixtures = add_adapter_mixtures(vit, experts=4, top_k=2, bottleneck=8, scale=0.1, dropout=0.0)
    assert len(mixtures) == len(vit.blocks)
    for m in mixtures:
        m.add_router()
    with routed(mixtures, torch.zeros(3, dtype=torch.long)):
        assert torch.allclose(vit(x), bare, atol=1e-6)  # up-projections start at zero
        for m in mixtures:
            nn.init.normal_(m.experts[0].up.weight)
            nn.init.normal_(m.routers[0].w_gate)
        changed = vit(x)
    assert not torch.allclose(changed, bare, atol=1e-4)
    with routed(mixtures, torch.full((3,), -1)):  # experts off: the bare model again
        assert torch.allclose(vit(x), bare, atol=1e-6)

    build = SCENARIOS.get("split_digits")
    torch.manual_seed(0)
    clip_model = (
        BACKBONES.get("clip_tiny")(BACKBONES.get("clip_tiny").Config())
        .classifier(build(build.Config(n_experiences=5)).class_names)
        .eval()
    )
    images = torch.randn(2, 1, 16, 16)
    bare = clip_model.image_features(images)
    mixtures = add_adapter_mixtures(
        clip_model, experts=3, top_k=1, bottleneck=4, scale=0.1, dropout=0.0
    )
    assert len(mixtures) == len(clip_model.backbone.visual.transformer.resblocks)
    for m in mixtures:
        m.add_router()
        nn.init.normal_(m.experts[1].up.weight)
    with routed(mixtures, torch.full((2,), -1)):
        assert torch.allclose(clip_model.image_features(images), bare, atol=1e-6)
    with routed(mixtures, torch.zeros(2, dtype=torch.long)):
        assert clip_model.image_features(images).shape == bare.shape


def test_autoencoder_router_picks_the_task_it_was_trained_on():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 24, generator=g) * 3
    basis = [torch.linalg.qr(torch.randn(24, 4, generator=g)).Q for _ in range(3)]

    def task_feats(t: int, n: int) -> torch.Tensor:  # a 4-d subspace per task
        return centres[t] + torch.randn(n, 4, generator=g) @ basis[t].T

    aes = TaskAutoencoders(24, 8)
    train = [task_feats(t, 200) for t in range(3)]
    for t in range(3):
        aes.fit(train[t], steps=400, lr=1e-2, batch=64, generator=g)
    for t in range(3):
        assert (aes.route(train[t], None) == t).float().mean() > 0.95
        assert (aes.route(task_feats(t, 100), None) == t).float().mean() > 0.9
    far = torch.full((5, 24), 50.0)
    assert (aes.route(far, threshold=1.0) == -1).all()
    assert (aes.route(train[1], threshold=1e9) == 1).float().mean() > 0.95


def test_moe_frozen_experts_do_not_change_in_later_tasks():
    build = SCENARIOS.get("split_digits")
    exps = list(build(build.Config(n_experiences=5)).train_stream)[:3]
    torch.manual_seed(0)
    vit = build_micro_vit()
    cls = STRATEGIES.get("moe_adapters")
    cfg = cls.Config(
        name="moe_adapters", recipe="mtil", epochs=2, experts=6, bottleneck=8, ae_steps=50
    )
    st = cls(model=ClassifierModel(vit, vit.num_features), cfg=cfg, n_experiences=5)
    st.train(exps[0], eval_streams=[])
    frozen = [list(f) for f in st.frozen_experts]
    assert all(len(f) == 2 for f in frozen)
    snapshot = [
        {e: [p.clone() for p in m.experts[e].parameters()] for e in range(6)} for m in st.mixtures
    ]
    router0 = [m.routers[0].w_gate.clone() for m in st.mixtures]
    st.train(exps[1], eval_streams=[])
    st.train(exps[2], eval_streams=[])
    moved = 0
    for i, m in enumerate(st.mixtures):
        assert len(m.routers) == 3
        assert torch.equal(m.routers[0].w_gate, router0[i])
        for e in range(6):
            same = all(
                torch.equal(a, b)
                for a, b in zip(snapshot[i][e], m.experts[e].parameters(), strict=True)
            )
            if e in frozen[i]:
                assert same, (i, e)
            moved += not same
    assert moved > 0  # unfrozen experts did learn on the later tasks
    assert len(st.autoencoders.aes) == 3
    # a plain model(x) routes itself through DDAS, like the strategy's evaluation
    x = torch.stack([exps[1].dataset[i][0] for i in range(8)])
    st.model.eval()
    with torch.no_grad():
        plain = st.model(x)
        with routed(st.mixtures, st.route(x)):
            explicit = st.model(x)
    assert torch.equal(plain, explicit)
    assert all(m.task_ids is None for m in st.mixtures)
    # official DDAS: one router for the whole test batch, even a batch mixing tasks
    mixed = torch.cat([x[:4], torch.stack([exps[2].dataset[i][0] for i in range(4)])])
    assert st.cfg.ddas_routing == "batch" and st.route(mixed).unique().numel() == 1


@pytest.mark.parametrize(
    ("name", "extra", "passes"),
    [
        ("mora", [], 1.0),
        ("moe_adapters", [], 1.0),  # class-incremental recipe: one shared router, no DDAS
        # MTIL recipe: DDAS needs the frozen features, a second pass per prediction
        (
            "moe_adapters",
            ["strategy.recipe=mtil", "strategy.experts=4", "strategy.ae_steps=20"],
            2.0,
        ),
    ],
)
def test_cli_runs_expert_mixtures(tmp_path, name, extra, passes):
    code = run_cli(["run", *FAST, f"strategy={name}", *extra, f"runs_dir={tmp_path}"])
    assert code == 0
    res = results_of(only_run_dir(tmp_path))
    assert len(res["accuracy_matrix"]) == 2
    assert res["efficiency"]["passes_per_prediction"] == pytest.approx(passes)


def _moe(**overrides: object):
    torch.manual_seed(0)
    vit = build_micro_vit()
    cls = STRATEGIES.get("moe_adapters")
    cfg = cls.Config(name="moe_adapters", **overrides)
    return cls(model=ClassifierModel(vit, vit.num_features), cfg=cfg, n_experiences=2)


def test_moe_recipes_fill_what_is_left_unset():
    cls = STRATEGIES.get("moe_adapters")
    ci = cls.Config(name="moe_adapters")
    assert ci.recipe == "class_incremental"
    assert (ci.experts, ci.top_k, ci.routers, ci.freeze_top) == (2, 2, "shared", 0)
    assert (ci.label_smoothing, ci.balance, ci.warmup_steps) == (0.0, 0.0, 30)
    assert (ci.optimizer, ci.lr, ci.lr_schedule) == ("adamw", 1e-3, "warmup_cosine")
    mtil = cls.Config(name="moe_adapters", recipe="mtil")
    assert (mtil.experts, mtil.routers, mtil.freeze_top) == (22, "per_task", 2)
    assert (mtil.label_smoothing, mtil.warmup_steps, mtil.ddas_routing) == (0.2, 100, "batch")
    mixed = cls.Config(name="moe_adapters", recipe="mtil", experts=6, label_smoothing=0.0)
    assert (mixed.experts, mixed.label_smoothing, mixed.freeze_top) == (6, 0.0, 2)
    from clbench.errors import ConfigError

    with pytest.raises(ConfigError, match=r"strategy\.recipe"):
        cls.Config(name="moe_adapters", recipe="cil")
    with pytest.raises(ConfigError, match=r"strategy\.routers"):
        cls.Config(name="moe_adapters", routers="per_sample")


def test_moe_class_incremental_recipe_builds_one_shared_router_and_no_autoencoder():
    build = SCENARIOS.get("split_digits")
    exps = list(build(build.Config(n_experiences=5)).train_stream)[:2]
    st = _moe(epochs=1, bottleneck=8)
    assert not hasattr(st.model, "task_autoencoders")
    assert all(len(m.experts) == 2 and m.top_k == 2 for m in st.mixtures)
    router = None
    for exp in exps:
        st.train(exp, eval_streams=[])
        assert all(len(m.routers) == 1 for m in st.mixtures)
        if router is None:
            router = [m.routers[0].w_gate.clone() for m in st.mixtures]
    # the one router keeps training on the second task; no expert is ever frozen
    assert any(
        not torch.equal(r, m.routers[0].w_gate) for r, m in zip(router, st.mixtures, strict=True)
    )
    assert st.frozen_experts == [[] for _ in st.mixtures]
    assert all(p.requires_grad for m in st.mixtures for p in m.parameters())
    x = torch.stack([exps[0].dataset[i][0] for i in range(4)])
    st.model.eval()
    assert st.route(x).tolist() == [0, 0, 0, 0]


def test_mtil_recipe_builds_a_router_per_task_and_autoencoders():
    st = _moe(recipe="mtil", experts=6)
    assert isinstance(st.model.task_autoencoders, TaskAutoencoders)
    assert all(len(m.experts) == 6 for m in st.mixtures)
    st.adapt_to_experience()
    st.adapt_to_experience()
    assert all(len(m.routers) == 2 for m in st.mixtures)
    assert all(not p.requires_grad for m in st.mixtures for p in m.routers[0].parameters())


def test_ddas_batch_routing_picks_one_router_per_batch():
    g = torch.Generator().manual_seed(0)
    aes = TaskAutoencoders(16, 4)
    centres = [torch.zeros(16), torch.full((16,), 4.0)]
    for c in centres:
        aes.fit(c + 0.1 * torch.randn(200, 16, generator=g), 300, 1e-2, 64, g)
    batch = torch.cat([centres[0] + torch.zeros(5, 16), centres[1] + torch.zeros(3, 16)])
    assert aes.route(batch, None).tolist() == [0] * 5 + [1] * 3
    by_batch = aes.route(batch, None, per_batch=True)
    assert by_batch.unique().numel() == 1
    best = int(aes.errors(batch).mean(0).argmin())
    assert by_batch.tolist() == [best] * 8
    assert aes.route(batch, threshold=1e-9, per_batch=True).tolist() == [-1] * 8


class LrProbe(SupervisedPlugin):
    def __init__(self) -> None:
        super().__init__()
        self.lrs: list[float] = []

    def before_training_iteration(self, strategy, **kwargs) -> None:
        self.lrs.append(strategy.optimizer.param_groups[0]["lr"])


def test_moe_warmup_cosine_schedule_is_linear_then_cosine_per_step():
    build = SCENARIOS.get("split_digits")
    exp = build(build.Config(n_experiences=5)).train_stream[0]
    probe = LrProbe()
    st = _moe(epochs=1, bottleneck=4, warmup_steps=3, lr=1e-3)
    st.plugins.append(probe)
    st.train(exp, eval_streams=[])
    n, w = len(probe.lrs), 3
    assert n > w + 2
    expected = [1e-3 * (s + 1) / w for s in range(w)] + [
        1e-3 * (1 + math.cos(math.pi * (s - w) / (n - w))) / 2 for s in range(w, n)
    ]
    assert probe.lrs == pytest.approx(expected)
