"""Invariants of the LoRA-family strategies (issue: orthogonal and incremental-rank LoRA)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from avalanche.training.plugins import SupervisedPlugin

from clbench.adapters.lora import lora_layers
from clbench.backbones.micro_vit import build_micro_vit
from clbench.models import ClassifierModel
from clbench.registry import SCENARIOS, STRATEGIES


@pytest.fixture(scope="module")
def scenario():
    build = SCENARIOS.get("split_digits")
    return build(build.Config(n_experiences=5))


def _strategy(name: str, plugins=(), **overrides: Any):
    torch.manual_seed(0)
    vit = build_micro_vit()
    cls = STRATEGIES.get(name)
    cfg = cls.Config(name=name, **overrides)
    model = ClassifierModel(vit, vit.num_features)
    return cls(model=model, cfg=cfg, plugins=list(plugins))


class OrthogonalityProbe(SupervisedPlugin):
    """Records O-LoRA's orthogonality term before the first step and after the last."""

    def __init__(self) -> None:
        super().__init__()
        self.values: list[tuple[float, float]] = []
        self._start = 0.0

    def before_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        if strategy.clock.train_exp_epochs == 0:
            self._start = float(strategy.orthogonality())

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.values.append((self._start, float(strategy.orthogonality())))


@pytest.mark.parametrize("l1", [0.5, 0.0])
def test_olora_orthogonality_falls_only_with_the_loss_on(scenario, l1):
    probe = OrthogonalityProbe()
    st = _strategy("olora", plugins=[probe], l1=l1, epochs=3, lr=1e-3, targets=["q", "v"])
    for exp in list(scenario.train_stream)[:2]:
        st.train(exp, eval_streams=[])
    start, end = probe.values[1]  # second task: old blocks exist
    assert start > 0
    if l1 > 0:
        assert end < 0.8 * start, (start, end)
    else:
        assert end >= 0.99 * start, (start, end)


def test_olora_freezes_past_blocks_and_adds_a_fresh_pair(scenario):
    st = _strategy("olora", epochs=1, targets=["q", "v"], rank=4)
    exps = list(scenario.train_stream)[:2]
    st.train(exps[0], eval_streams=[])
    old = {
        n: [b.A.detach().clone() for b in layer.blocks]
        for n, layer in lora_layers(st.model).items()
    }
    st.train(exps[1], eval_streams=[])
    for name, layer in lora_layers(st.model).items():
        assert len(layer.blocks) == 2 * len(old[name])  # q and v: one new block each
        for b, a in zip(layer.blocks, old[name], strict=False):
            assert torch.equal(b.A, a) and not b.A.requires_grad and not b.B.requires_grad


def test_sdlora_past_directions_fixed_magnitudes_learn(scenario):
    st = _strategy("sdlora", epochs=2)
    exps = list(scenario.train_stream)[:2]
    st.train(exps[0], eval_streams=[])
    first = list(st.new_blocks)
    directions = [(b.B @ b.A / (b.B.norm() * b.A.norm())).detach().clone() for b in first]
    mags = [float(b.magnitude) for b in first]
    st.train(exps[1], eval_streams=[])
    for b, d in zip(first, directions, strict=True):
        assert b.normalized and not b.A.requires_grad and not b.B.requires_grad
        assert torch.allclose(b.B @ b.A / (b.B.norm() * b.A.norm()), d)
        assert b.magnitude.requires_grad
    assert any(abs(float(b.magnitude) - m) > 1e-4 for b, m in zip(first, mags, strict=True))


class MagnitudeProbe(SupervisedPlugin):
    """SD-LoRA's distinct magnitudes when each task's training starts."""

    def __init__(self) -> None:
        super().__init__()
        self.at_start: list[list[float]] = []

    def before_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        if strategy.clock.train_exp_epochs == 0:
            self.at_start.append([float(m) for m in strategy.magnitudes()])


def _distinct_magnitudes(st: Any) -> list[torch.nn.Parameter]:
    found: dict[int, torch.nn.Parameter] = {}
    for layer in lora_layers(st.model).values():
        for b in layer.blocks:
            found.setdefault(id(b.magnitude), b.magnitude)
    return list(found.values())


def test_sdlora_one_magnitude_per_task_shared_by_every_block_and_reset_to_init(scenario):
    probe = MagnitudeProbe()
    st = _strategy("sdlora", plugins=[probe], epochs=1, targets=["q", "v"])
    blocks = [b for layer in lora_layers(st.model).values() for b in layer.blocks]
    n_layers = len(lora_layers(st.model))
    assert len(blocks) == 2 * n_layers > 2  # q and v in every block...
    (shared,) = _distinct_magnitudes(st)  # ...and one scalar for all of them
    assert shared.numel() == 1 and all(b.magnitude is shared for b in blocks)
    trainable = {id(p) for p in st.trainable_parameters()}
    assert id(shared) in trainable
    # one gradient step: every block's contribution lands on the one scalar
    x = scenario.test_stream[0].dataset[0][0].unsqueeze(0).repeat(4, 1, 1, 1)
    with torch.no_grad():
        for b in blocks:
            b.B.normal_()
    st.model.head.grow(2)
    st.model(x).sum().backward()
    assert shared.grad is not None and float(shared.grad.abs()) > 0
    before = float(shared)
    torch.optim.SGD([shared], lr=0.1).step()
    assert float(shared) != before
    shared.grad = None

    st = _strategy("sdlora", plugins=[probe], epochs=1, targets=["q", "v"])
    probe.at_start.clear()
    for exp in list(scenario.train_stream)[:3]:
        st.train(exp, eval_streams=[])
    mags = _distinct_magnitudes(st)
    assert len(mags) == 3 and st.magnitudes() == mags  # one per task
    at_start = [[round(v, 6) for v in row] for row in probe.at_start]
    assert at_start == [[0.8], [0.8, 0.8], [0.8, 0.8, 0.8]]  # past ones restart
    assert all(abs(float(m) - 0.8) > 1e-6 for m in mags)  # and every one of them trains
    assert {id(m) for m in mags} <= {id(p) for p in st.trainable_parameters()}


def test_sdlora_per_block_variant_keeps_one_magnitude_per_block(scenario):
    st = _strategy("sdlora", epochs=1, targets=["q", "v"], magnitude_per_block=True)
    st.train(scenario.train_stream[0], eval_streams=[])
    n_blocks = sum(len(layer.blocks) for layer in lora_layers(st.model).values())
    assert len(_distinct_magnitudes(st)) == n_blocks == len(st.magnitudes())


@pytest.mark.parametrize("name", ["lora", "olora", "sdlora"])
def test_merging_leaves_outputs_and_costs_the_bare_backbone(scenario, name):
    st = _strategy(name, epochs=1)
    for exp in list(scenario.train_stream)[:2]:
        st.train(exp, eval_streams=[])
    model = st.model.eval()
    x = scenario.test_stream[0].dataset[0][0].unsqueeze(0).repeat(4, 1, 1, 1)
    with torch.no_grad():
        before = model(x)
        expected_params = st.num_inference_parameters()
        for layer in lora_layers(model).values():
            layer.merge_and_clear()
        after = model(x)
    assert torch.allclose(before, after, atol=1e-5)
    bare = build_micro_vit()
    n_bare = sum(p.numel() for p in bare.parameters()) + sum(
        p.numel() for p in model.head.parameters()
    )
    assert sum(p.numel() for p in model.parameters()) == n_bare == expected_params


class EpochLrProbe(SupervisedPlugin):
    def __init__(self) -> None:
        super().__init__()
        self.lrs: list[float] = []

    def before_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        self.lrs.append(strategy.optimizer.param_groups[0]["lr"])


def test_inflora_default_is_the_official_quarter_cosine(scenario):
    probe = EpochLrProbe()
    st = _strategy("inflora", plugins=[probe], epochs=3, lr=1e-3)
    assert st.cfg.lr_schedule == "quarter_cosine"
    st.n_experiences = scenario.num_experiences
    st.train(scenario.train_stream[0], eval_streams=[])
    expected = [1e-3 * math.cos(99 * math.pi * e / 400) for e in range(3)]
    assert probe.lrs == pytest.approx(expected)
    assert probe.lrs[-1] == pytest.approx(1e-3 * 0.0157, abs=1e-6)


def test_inflora_designs_a_orthogonal_to_the_basis_which_grows(scenario):
    st = _strategy("inflora", epochs=1)
    st.n_experiences = scenario.num_experiences
    exps = list(scenario.train_stream)
    st.train(exps[0], eval_streams=[])
    dim = next(iter(lora_layers(st.model).values())).in_features
    basis0 = {n: u.clone() for n, u in st.gpm.basis.items()}
    mode0 = dict(st.gpm.mode)
    used0 = {n: st.gpm.used_dims(n, dim) for n in basis0}
    assert basis0 and all(0 < u < dim for u in used0.values())
    st.train(exps[1], eval_streams=[])
    checked = 0
    for name, layer in lora_layers(st.model).items():
        for block in st.new_blocks:
            if block in list(layer.blocks):
                assert not block.A.requires_grad and block.B.requires_grad
                u = basis0[name]
                if mode0[name] == "remove":  # A_1 rows orthogonal to the used subspace
                    residual = (block.A @ u).abs().max()
                else:  # "retain": A_1 rows inside the free subspace
                    residual = (block.A - block.A @ u @ u.T).abs().max()
                assert residual < 1e-4, (name, mode0[name], float(residual))
                checked += 1
    assert checked > 0
    used1 = {n: st.gpm.used_dims(n, dim) for n in st.gpm.basis}
    assert all(used1[n] >= used0[n] for n in used0)
    assert any(used1[n] > used0[n] for n in used0)


def test_dyrank_zeroes_gates_prunes_exactly_and_merges(scenario):
    from clbench.adapters.lora import prune_zero_ranks

    st = _strategy("dyrank", epochs=3, kappa=0.05, ramp_steps=5)
    exp = scenario.train_stream[0]
    x = scenario.test_stream[0].dataset[0][0].unsqueeze(0).repeat(3, 1, 1, 1)
    # stop right before the between-task merge to look at the gates
    merged = st._after_training_exp
    st._after_training_exp = lambda **kw: None
    st.train(exp, eval_streams=[])
    gates = torch.cat([b.gate.detach() for b in st.new_blocks])
    assert (gates == 0).any() and (gates != 0).any()
    model = st.model.eval()
    with torch.no_grad():
        before = model(x)
        total = sum(b.rank for b in st.new_blocks)
        kept = sum(prune_zero_ranks(b) for b in st.new_blocks)
        assert kept < total
        assert torch.allclose(model(x), before, atol=1e-6)
        st._after_training_exp = merged
        st._after_training_exp()
        assert torch.allclose(model(x), before, atol=1e-5)
    assert all(len(layer.blocks) == 0 for layer in lora_layers(model).values())
    bare = sum(p.numel() for p in build_micro_vit().parameters())
    assert sum(p.numel() for p in model.backbone.parameters()) == bare


def test_dyrank_threshold_schedule():
    st = _strategy("dyrank", kappa=0.01, dense_fraction=0.5, ramp_steps=10)
    st._total_steps = 100
    assert st.threshold(0) == 0.0 and st.threshold(49) == 0.0
    assert st.threshold(50) == pytest.approx(0.001)
    assert st.threshold(59) == pytest.approx(0.01) and st.threshold(99) == pytest.approx(0.01)


class InitOverlapProbe(SupervisedPlugin):
    """Largest |v_old . v_new| among same-target blocks when each task starts."""

    def __init__(self) -> None:
        super().__init__()
        self.overlaps: list[float] = []

    def before_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        if strategy.clock.train_exp_epochs or strategy.tasks_seen < 2:
            return
        worst = 0.0
        for layer in lora_layers(strategy.model).values():
            new = [b for b in layer.blocks if b.A.requires_grad]
            old = [b for b in layer.blocks if not b.A.requires_grad]
            for n in new:
                for o in old:
                    if o.out_slice == n.out_slice:
                        worst = max(worst, float((o.A @ n.A.T).abs().max()))
        self.overlaps.append(worst)


def test_inc_rank_task_selectors_and_orthogonal_growth(scenario):
    probe = InitOverlapProbe()
    st = _strategy("inc_rank", plugins=[probe], epochs=2)
    exps = list(scenario.train_stream)[:2]
    st.train(exps[0], eval_streams=[])
    first = {
        n: [(b.A.detach().clone(), b.B.detach().clone()) for b in layer.blocks]
        for n, layer in lora_layers(st.model).items()
    }
    s0 = {k: v.detach().clone() for k, v in st.selectors[0].items()}
    st.train(exps[1], eval_streams=[])
    assert len(st.selectors) == 2
    for name, layer in lora_layers(st.model).items():
        old, new = layer.blocks[: len(first[name])], layer.blocks[len(first[name]) :]
        for b, (a0, b0) in zip(old, first[name], strict=True):
            assert torch.equal(b.A, a0) and torch.equal(b.B, b0)  # U, V frozen
            assert torch.equal(st.selectors[0][id(b)], s0[id(b)])  # s_0 untouched
        assert all(n.rank == 1 for n in new)
    assert len(probe.overlaps) == 1 and probe.overlaps[0] < 1e-5  # new v orthogonal to old V
    # the task id picks the selector: the model differs between task 0 and task 1
    x = scenario.test_stream[0].dataset[0][0].unsqueeze(0)
    model = st.model.eval()
    with torch.no_grad():
        st._use_selector(0)
        out0 = model(x)
        st._use_selector(1)
        out1 = model(x)
    assert not torch.allclose(out0, out1)


def test_dualgpm_switches_to_retain_and_stores_the_complement():
    from clbench.strategies.inflora import DualGPM

    torch.manual_seed(0)
    dim = 8
    gpm = DualGPM()
    # task 0: 3 strong directions (and a faint 4th, below the energy threshold)
    x0 = (torch.randn(500, 4) * torch.tensor([1.0, 1.0, 1.0, 0.5])) @ torch.eye(dim)[:4]
    gpm.update("layer", x0.T @ x0 / 500, threshold=0.99)
    assert gpm.mode["layer"] == "remove" and gpm.used_dims("layer", dim) == 3
    basis0 = gpm.basis["layer"].clone()
    # task 1 fills 2 more: 5 used > dim / 2 -> "retain", the stored basis is the free complement
    x1 = torch.randn(500, 2) @ torch.eye(dim)[4:6]
    gpm.update("layer", x1.T @ x1 / 500, threshold=0.99)
    assert gpm.mode["layer"] == "retain" and gpm.used_dims("layer", dim) == 5
    free = gpm.basis["layer"]
    used = torch.cat([basis0.T, torch.eye(dim)[4:6]])
    assert free.shape == (dim, 3)
    assert torch.allclose(used @ free, torch.zeros(5, 3), atol=1e-4)
    # projecting a covariance keeps only the free directions
    projected = gpm.project("layer", torch.eye(dim))
    assert torch.allclose(used @ projected, torch.zeros(5, dim), atol=1e-4)
