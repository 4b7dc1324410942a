"""Test-time adapters: what each method updates, returns, filters and restores."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from clbench.scenarios.base import LabelledTensors
from clbench.strategies.tta import EATA, PSMT, CoTTA, EcoTTA, Tent
from torch import nn

from clbench.adapters.tta import (
    cotta_augment,
    fisher_diagonal,
    norm_affine_parameters,
    seeded_subset,
    soft_cross_entropy,
    softmax_entropy,
    stochastic_restore_,
    use_batch_statistics,
)
from clbench.backbones.micro_vit import build_micro_vit
from clbench.backbones.wideresnet import WideResNet
from clbench.errors import ClbenchError
from clbench.models import ClassifierModel
from clbench.protocols.tta import DomainStream
from clbench.registry import STRATEGIES

N_CLASSES = 4


def bn_model(seed: int = 0) -> ClassifierModel:
    torch.manual_seed(seed)
    wrn = WideResNet(depth=10, widen_factor=1, num_classes=N_CLASSES, in_chans=1)
    wrn.fc = nn.Identity()
    model = ClassifierModel(wrn, wrn.num_features)
    model.head.grow(N_CLASSES)
    # non-trivial running statistics, as a trained source model has
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 1, 8, 8) * 2 + 0.5)
    return model.eval()


def vit_model(seed: int = 0) -> ClassifierModel:
    torch.manual_seed(seed)
    vit = build_micro_vit(depth=1, embed_dim=16, num_heads=2, img_size=8)
    model = ClassifierModel(vit, vit.num_features)
    model.head.grow(N_CLASSES)
    return model.eval()


def make(name: str, model: nn.Module, source=None, seed: int = 0, **cfg) -> object:
    cls = STRATEGIES.get(name)
    st = cls(
        model=model,
        cfg=cls.Config(name=name, **cfg),
        seed=seed,
        stream=DomainStream(domains=(), batch_size=8, value_range=(-1.0, 1.0)),
    )
    st.setup(source)
    st.reset()
    return st


def batch(seed: int, n: int = 16, size: int = 8) -> torch.Tensor:
    return torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


def source_data(n: int = 32) -> LabelledTensors:
    g = torch.Generator().manual_seed(7)
    return LabelledTensors(torch.randn(n, 1, 8, 8, generator=g), torch.arange(n) % N_CLASSES)


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("build", [bn_model, vit_model])
def test_tent_updates_only_norm_affine_and_returns_the_pre_update_prediction(build):
    model = build()
    st = make("tent", model)
    norm = set(norm_affine_parameters(st.model))
    assert norm and {n for n, p in st.model.named_parameters() if p.requires_grad} == norm
    x = batch(1)
    with torch.no_grad():
        expected = copy.deepcopy(st.model)(x)  # the same (batch-statistics) forward
    before = {n: p.detach().clone() for n, p in st.model.named_parameters()}
    logits = st.adapt(x)
    assert torch.equal(logits, expected)
    after = dict(st.model.named_parameters())
    assert changed(before, after) == norm  # every norm affine moved, nothing else
    # the update minimised entropy on the batch
    with torch.no_grad():
        assert softmax_entropy(st.model(x)).mean() < softmax_entropy(expected).mean()


def test_bn_adapt_uses_batch_statistics_and_no_gradient():
    model = bn_model()
    x = batch(2) * 3 + 1  # shifted inputs: batch statistics differ from the running ones
    with torch.no_grad():
        source_logits = model(x)
    st = make("bn_adapt", copy.deepcopy(model))
    logits = st.adapt(x)
    assert not torch.allclose(logits, source_logits)
    manual = copy.deepcopy(model).train()  # train-mode BN normalises with the batch
    with torch.no_grad():
        assert torch.allclose(logits, manual(x), atol=1e-5)
    assert st.num_trainable_parameters() == 0
    assert torch.equal(st.adapt(x), logits)  # nothing was learned


def test_cotta_teacher_is_the_ema_of_the_student():
    st = make("cotta", bn_model(), restore_p=0.0, anchor_threshold=0.0)
    t0 = [p.detach().clone() for p in st.teacher.parameters()]
    st.adapt(batch(3))
    for t_before, t, s in zip(t0, st.teacher.parameters(), st.model.parameters(), strict=True):
        assert torch.allclose(t, 0.999 * t_before + 0.001 * s.detach(), atol=1e-7)
    assert not all(torch.equal(a, b) for a, b in zip(t0, st.teacher.parameters(), strict=True))


def test_cotta_averages_augmentations_exactly_when_the_anchor_is_unsure():
    x = batch(4)
    probe = make("cotta", bn_model())
    with torch.no_grad():
        confidence = float(probe.anchor(x).softmax(1).max(1).values.mean())
    for threshold, augmented in ((confidence + 1e-3, True), (confidence - 1e-3, False)):
        st = make("cotta", bn_model(), anchor_threshold=threshold, n_augmentations=4)
        with torch.no_grad():
            plain = st.teacher(x)
        target = st.teacher_output(x)
        assert st.last_augmented is augmented
        assert torch.equal(target, plain) is (not augmented)


def test_cotta_augmentation_is_seeded_and_keeps_the_range():
    x = batch(5).clamp(-1, 1)
    a = cotta_augment(x, torch.Generator().manual_seed(0), (-1.0, 1.0), flip=False)
    b = cotta_augment(x, torch.Generator().manual_seed(0), (-1.0, 1.0), flip=False)
    c = cotta_augment(x, torch.Generator().manual_seed(1), (-1.0, 1.0), flip=False)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.min() >= -1 and a.max() <= 1


def test_stochastic_restore_resets_about_p_of_the_elements_to_source():
    torch.manual_seed(0)
    params = {"w": nn.Parameter(torch.randn(200, 100)), "b": nn.Parameter(torch.randn(300))}
    source = {k: torch.zeros_like(v) for k, v in params.items()}
    fraction = stochastic_restore_(params, source, 0.3, torch.Generator().manual_seed(0))
    zeros = sum(int((p == 0).sum()) for p in params.values())
    total = sum(p.numel() for p in params.values())
    assert zeros / total == pytest.approx(fraction)
    assert fraction == pytest.approx(0.3, abs=0.01)  # 20,300 draws: std 0.003


def test_cotta_restores_with_the_configured_probability():
    st = make("cotta", bn_model(), restore_p=0.2, anchor_threshold=0.0)
    st.adapt(batch(6))
    assert st.last_restored == pytest.approx(0.2, abs=0.02)
    restored = sum(int((p == st.source_params[n]).sum()) for n, p in st.params.items()) / sum(
        p.numel() for p in st.params.values()
    )
    assert restored >= st.last_restored  # restored elements hold exactly the source value


def test_eata_filters_by_entropy_margin_then_redundancy():
    st = make("eata", bn_model(), fisher_alpha=0.0)
    e0 = st.e0
    # sample 0, 1: confident (low entropy); 2: uniform (entropy ln 4 > 0.4 ln 4)
    logits = torch.tensor([[8.0, 0, 0, 0], [0, 8.0, 0, 0], [0.0, 0, 0, 0]])
    assert softmax_entropy(logits)[2] > e0 > softmax_entropy(logits)[0]
    keep = st.select(logits)
    assert keep.tolist() == [0, 1] and st.probs_ema is not None
    # now the moving average points to classes 0/1: a sample like it is redundant,
    # one predicting class 3 is not
    st.probs_ema = torch.tensor([0.5, 0.5, 0.0, 0.0])
    keep = st.select(torch.tensor([[8.0, 0, 0, 0], [0, 0, 0, 8.0], [0.0, 0, 0, 0]]))
    assert keep.tolist() == [1]
    assert (st.last_reliable, st.last_selected) == (2, 1)


def test_eata_fisher_penalty_is_zero_at_source_and_grows_away_from_it():
    st = make("eata", bn_model(), source=source_data(), fisher_alpha=2000.0, fisher_size=32)
    assert st.fisher and all(f.sum() > 0 for f in st.fisher.values())
    assert float(st.fisher_penalty()) == 0.0
    with torch.no_grad():
        for p in st.norm_params.values():
            p.add_(0.1)
    assert float(st.fisher_penalty()) > 0.0
    with pytest.raises(ClbenchError, match="fisher_alpha=0"):
        make("eata", bn_model(), source=None)


def test_eata_weights_reliable_samples_by_their_entropy():
    st = make("eata", bn_model(), fisher_alpha=0.0, e_margin=1.0)  # every sample reliable
    x = batch(8)
    before = copy.deepcopy(st.model)
    st.adapt(x)
    # the same step by hand: loss = mean(H * exp(E0 - H)) over the batch
    ref = copy.deepcopy(before)
    params = list(norm_affine_parameters(ref).values())
    opt = torch.optim.SGD(params, lr=2.5e-4, momentum=0.9)
    h = softmax_entropy(ref(x))
    (h * torch.exp(-(h.detach() - st.e0))).mean().backward()
    opt.step()
    for (n, p), q in zip(st.norm_params.items(), params, strict=True):
        assert torch.allclose(p, q, atol=1e-7), n


@pytest.mark.parametrize("name", ["tent", "cotta", "eata", "psmt", "ecotta"])
def test_reset_restores_the_exact_source_state(name):
    extra = {
        "ecotta": {"warmup_epochs": 1},
        "eata": {"fisher_size": 32, "e_margin": 1.0, "d_margin": 1.0},  # every sample used
    }.get(name, {})
    st = make(name, bn_model(), source=source_data(), **extra)
    modules = st.stateful()
    source = {k: copy.deepcopy(m.state_dict()) for k, m in modules.items()}
    for i in range(3):
        st.adapt(batch(10 + i) * 2)
    assert any(changed(source[k], m.state_dict()) for k, m in modules.items())
    st.reset()
    for k, m in modules.items():
        assert not changed(source[k], m.state_dict()), k
    assert not st.optimizer.state or all(
        torch.equal(a, b)
        for s_new, s_old in zip(
            st.optimizer.state_dict()["state"].values(),
            st._snapshot._opt_states["optimizer"]["state"].values(),
            strict=True,
        )
        for a, b in zip(s_new.values(), s_old.values(), strict=True)
        if isinstance(a, torch.Tensor)
    )
    # a reset run repeats the first run exactly
    first = [st.adapt(batch(20 + i)) for i in range(2)]
    st.reset()
    st.generator.manual_seed(0)
    again = [st.adapt(batch(20 + i)) for i in range(2)]
    st.reset()
    st.generator.manual_seed(0)
    third = [st.adapt(batch(20 + i)) for i in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(again, third, strict=True))
    assert first[0].shape == (16, N_CLASSES)


def test_psmt_restores_low_gradient_elements_and_predicts_teacher_plus_student():
    st = make("psmt", bn_model(), source=source_data(), fisher_size=32)
    x = batch(30)
    with torch.no_grad():
        expected = st.teacher(x) + st.model(x)
    out = st.adapt(x)
    assert torch.allclose(out, expected, atol=1e-5)
    assert 0.02 <= st.last_restored <= 0.2  # about the 3 % quantile (ties at zero grad add)
    assert float(st.fisher_penalty()) > 0.0  # the student moved away from the source


def test_ecotta_trains_only_the_meta_networks_and_needs_a_wideresnet():
    st = make("ecotta", bn_model(), source=source_data(), warmup_epochs=1)
    assert len(st.parts) == 3  # WRN-10: one block per stage; stages of 1 block stay whole
    trainable = {id(p) for p in st.model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in st.meta_params}
    frozen = {n: p.detach().clone() for n, p in st.model.named_parameters() if not p.requires_grad}
    st.adapt(batch(31))
    assert not changed(frozen, dict(st.model.named_parameters()))
    assert float(st.regulariser()) > 0
    with pytest.raises(ClbenchError, match="WideResNet"):
        make("ecotta", vit_model(), source=source_data())


def test_ecotta_partitions_wrn28_as_the_paper():
    wrn = WideResNet(depth=28, widen_factor=1)
    from clbench.adapters.tta import attach_meta_parts

    parts = attach_meta_parts(wrn, [True, True, False])
    assert [len(p.part) for p in parts] == [2, 2, 2, 2, 4]
    assert wrn(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_strategies_are_deterministic_given_the_seed():
    outs = []
    for _ in range(2):
        st = make("cotta", bn_model(), anchor_threshold=1.0, n_augmentations=2)
        outs.append(torch.cat([st.adapt(batch(40 + i)) for i in range(2)]))
    assert torch.equal(outs[0], outs[1])


def test_test_time_classes_are_the_registered_ones():
    assert STRATEGIES.get("tent") is Tent and STRATEGIES.get("cotta") is CoTTA
    assert STRATEGIES.get("eata") is EATA and STRATEGIES.get("psmt") is PSMT
    assert STRATEGIES.get("ecotta") is EcoTTA
    assert np.isclose(make("eata", bn_model(), fisher_alpha=0.0).e0, 0.4 * np.log(N_CLASSES))


def test_lean_frozen_layers_keep_less_for_backward_and_compute_the_same():
    from clbench.adapters.tta import SavedTensorMeter, make_frozen_layers_lean

    model = bn_model().requires_grad_(False)
    lean = copy.deepcopy(model)
    assert make_frozen_layers_lean(lean) > 0
    x = batch(50).requires_grad_(True)
    results = []
    for m in (model, lean):
        meter = SavedTensorMeter(m)
        with meter.measure():
            y = m(x)
            (g,) = torch.autograd.grad(y.square().sum(), x)
        results.append((y.detach(), g, meter.peak))
    (y0, g0, mem0), (y1, g1, mem1) = results
    assert torch.allclose(y0, y1, atol=1e-5) and torch.allclose(g0, g1, atol=1e-5)
    assert mem1 < 0.25 * mem0  # no conv inputs, no BN inputs, one-byte ReLU masks
    assert lean.state_dict().keys() == model.state_dict().keys()


@pytest.mark.parametrize("frozen_bn", ["source", "batch"])
def test_ecotta_frozen_encoder_statistics(frozen_bn):
    st = make("ecotta", bn_model(), source=source_data(), warmup_epochs=1, frozen_bn=frozen_bn)
    stem_bn = st.model.backbone.block1.layer[0].part[0].bn1
    assert (stem_bn.running_var is not None) is (frozen_bn == "source")
    assert all(p.meta_bn.running_var is None for p in st.parts)  # meta BN: batch statistics
    st.adapt(batch(51))


# ------------------------------------------------- several updates per batch (steps)
def params_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def equal_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("build", [bn_model, vit_model])
def test_tent_with_several_steps_returns_the_last_iterations_forward(build):
    model = build()
    ref = copy.deepcopy(model)
    st = make("tent", model, steps=3)
    x = batch(60)
    out = st.adapt(x)
    # the official loop: for _ in range(steps): outputs = forward_and_adapt(x)
    use_batch_statistics(ref)
    ref.train()
    params = list(norm_affine_parameters(ref).values())
    ref.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999))
    forwards = []
    for _ in range(3):
        logits = ref(x)
        softmax_entropy(logits).mean().backward()
        opt.step()
        opt.zero_grad()
        forwards.append(logits.detach())
    assert torch.equal(out, forwards[2]) and not torch.equal(out, forwards[0])
    assert equal_params(params_of(st.model), params_of(ref))


def test_cotta_with_two_steps_is_two_full_adapt_steps():
    x = batch(61)
    kw = {"anchor_threshold": 0.0, "restore_p": 0.0}  # no augmentation, no restore
    one = make("cotta", bn_model(), steps=1, **kw)
    two = make("cotta", bn_model(), steps=2, **kw)
    one.adapt(x)
    out = two.adapt(x)
    assert not equal_params(params_of(one.model), params_of(two.model))
    # by hand: student CE to the teacher's soft labels, Adam step, teacher EMA; twice
    student = bn_model()
    use_batch_statistics(student)
    student.train()
    teacher = copy.deepcopy(student).requires_grad_(False)
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    for _ in range(2):
        logits = student(x)
        with torch.no_grad():
            target = teacher(x)
        soft_cross_entropy(logits, target).mean().backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
                t.mul_(0.999).add_(s, alpha=0.001)
    assert torch.equal(out, target)  # the last step's teacher output
    assert equal_params(params_of(two.model), params_of(student))
    assert equal_params(params_of(two.teacher), params_of(teacher))
    # with restore on, two steps equal two single steps drawing from the same generator
    a = make("cotta", bn_model(), steps=2, anchor_threshold=0.0, restore_p=0.3)
    b = make("cotta", bn_model(), steps=1, anchor_threshold=0.0, restore_p=0.3)
    out_a = a.adapt(x)
    out_b = [b.adapt(x) for _ in range(2)][-1]
    assert torch.equal(out_a, out_b) and equal_params(params_of(a.model), params_of(b.model))


def test_eata_with_two_steps_is_two_full_adapt_steps():
    x = batch(62)
    kw = {"fisher_size": 32, "e_margin": 1.0, "d_margin": 1.0}  # every sample used
    one = make("eata", bn_model(), source=source_data(), steps=1, **kw)
    two = make("eata", bn_model(), source=source_data(), steps=2, **kw)
    one.adapt(x)
    out = two.adapt(x)
    assert not equal_params(params_of(one.model), params_of(two.model))
    # by hand: weighted entropy + Fisher penalty, SGD step; twice (the same Fisher)
    ref = bn_model()
    use_batch_statistics(ref)
    ref.train()
    params = norm_affine_parameters(ref)
    opt = torch.optim.SGD(params.values(), lr=2.5e-4, momentum=0.9)
    for _ in range(2):
        logits = ref(x)
        h = softmax_entropy(logits)
        loss = (h * torch.exp(-(h.detach() - two.e0))).mean()
        for n, f in two.fisher.items():
            loss = loss + 2000.0 * (f * (params[n] - two.anchor_params[n]) ** 2).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(out, logits.detach())  # the last step's forward
    for n, p in two.norm_params.items():
        assert torch.allclose(p, params[n], atol=1e-7), n
    assert two.counts["samples"] == 2 * len(x)  # both steps filtered the batch


@pytest.mark.parametrize("name", ["tent", "cotta", "eata", "psmt", "ecotta"])
def test_every_optimised_strategy_loops_the_whole_adapt_step(name):
    extra = {"ecotta": {"warmup_epochs": 0}, "eata": {"fisher_size": 16}}.get(name, {})
    extra |= {"psmt": {"fisher_size": 16}}.get(name, {})
    st = make(name, bn_model(), source=source_data(), steps=3, **extra)
    outputs = []
    step = st.adapt_step
    st.adapt_step = lambda x: outputs.append(step(x)) or outputs[-1]
    out = st.adapt(batch(63))
    assert len(outputs) == 3 and out is outputs[-1]


# ----------------------------------------------- CoTTA's parameter set on a ViT
def reference_cotta_set(model: nn.Module) -> set[str]:
    """The official collect_params / restore loop, verbatim in structure."""
    names = set()
    for nm, m in model.named_modules():
        for npp, _ in m.named_parameters():
            if npp in ["weight", "bias"]:
                names.add(f"{nm}.{npp}" if nm else npp)
    return names


@pytest.mark.parametrize("name", ["cotta", "psmt"])
def test_mean_teachers_train_and_restore_the_references_set_on_a_vit(name):
    model = vit_model()
    expected = reference_cotta_set(model)
    assert {"backbone.cls_token", "backbone.pos_embed"}.isdisjoint(expected)
    extra = {"cotta": {"anchor_threshold": 0.0, "restore_p": 0.0}, "psmt": {"fisher_size": 16}}
    st = make(name, model, source=source_data(), lr=1e-2, **extra[name])
    trainable = {n for n, p in st.model.named_parameters() if p.requires_grad}
    assert trainable == set(st.params) == set(st.source_params) == expected
    before = params_of(st.model)
    teacher_before = params_of(st.teacher)
    st.adapt(batch(64))
    assert changed(before, params_of(st.model)) == expected
    for n in ("backbone.cls_token", "backbone.pos_embed"):  # kept at their source values
        assert torch.equal(st.model.get_parameter(n), before[n])
        # the teacher's EMA (over every parameter, as the official code) of equal values
        assert torch.allclose(st.teacher.get_parameter(n), teacher_before[n], rtol=1e-6)


def test_cotta_restore_covers_exactly_the_trained_set_on_a_vit():
    st = make("cotta", vit_model(), anchor_threshold=0.0, restore_p=1.0, lr=1e-2)
    before = params_of(st.model)
    st.adapt(batch(65))
    assert st.last_restored == 1.0  # every element of the set returned to source
    assert not changed(before, params_of(st.model))


# ----------------------------------------------------- EATA's Fisher data subset
def test_eata_fisher_uses_a_seeded_random_subset_of_the_source():
    source = source_data(32)
    kw = {"source": source, "fisher_size": 8}

    def fisher(seed: int) -> dict[str, torch.Tensor]:
        return make("eata", bn_model(), seed=seed, **kw).fisher

    def by_hand(x: torch.Tensor) -> dict[str, torch.Tensor]:
        ref = bn_model()
        use_batch_statistics(ref)
        ref.train()
        return fisher_diagonal(ref, [x], norm_affine_parameters(ref))

    idx = seeded_subset(32, 8, torch.Generator().manual_seed(3))
    assert idx.tolist() != list(range(8)) and len(set(idx.tolist())) == 8
    f3, f4, f3_again = fisher(3), fisher(4), fisher(3)
    assert equal_params(f3, f3_again) and not equal_params(f3, f4)
    for n, f in by_hand(source.tensors[0][idx]).items():
        assert torch.allclose(f3[n], f, rtol=1e-5, atol=1e-9), n
    first_n = by_hand(source.tensors[0][:8])
    assert not all(torch.allclose(f3[n], first_n[n]) for n in first_n)
