"""The continual-forgetting baselines of the GS-LoRA code (strategies/erasure.py): each runs
end to end, and the pieces that make each one what it is (regularisers, relabelling,
retraining from scratch, SCRUB's max step) hold on tiny models."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from avalanche.training.plugins import SupervisedPlugin
from clbench.scenarios.base import _dataset
from clbench.strategies.erasure import (
    EWC,
    L2,
    SCRUB,
    ErasureRequest,
    EWCConfig,
    ForgetLedBatches,
    L2Config,
    RelabelledBatches,
    Retrain,
    RetrainConfig,
    SCRUBConfig,
    distill_kl,
    ewc_importance,
    frozen_copy,
    mas_importance,
    trainable_named,
)
from torch import nn

from clbench.models import ClassifierModel
from helpers import only_run_dir, results_of, run_cli

BASELINES = [
    "finetune_retain",
    "retrain",
    "forget_l2",
    "forget_ewc",
    "forget_mas",
    "forget_lwf",
    "forget_derpp",
    "scrub",
]
#: one erasure request of a small glyph_forget, one epoch
ONE_REQUEST = [
    "scenario=glyph_forget",
    "scenario.n_requests=1",
    "scenario.train_per_class=20",
    "scenario.test_per_class=5",
    "strategy.epochs=1",
    "tracking=none",
    "progress=false",
]
EXTRA = {
    "scrub": ["strategy.inner_epochs=2", "strategy.max_epochs=1"],
    "scrub_s": ["strategy=scrub", "strategy.inner_epochs=2", "strategy.smoothing=0.1"],
}


@pytest.mark.parametrize("name", [*BASELINES, "scrub_s"])
def test_baseline_serves_a_request_end_to_end(pretrained, tmp_path, name):
    args = ["run", f"strategy={name}", f"runs_dir={tmp_path}", *ONE_REQUEST, *EXTRA.get(name, [])]
    if name == "scrub_s":
        args.remove("strategy=scrub_s")
    assert run_cli(args) == 0
    result = results_of(only_run_dir(tmp_path))
    for key in ("H", "acc_r", "acc_f"):
        assert math.isfinite(result["metrics"][key]), (key, result["metrics"])
    assert result["efficiency"]["train_steps"] > 0


# ----------------------------------------------------------------- tiny setting
N_CLASSES, PER_CLASS, DIM = 5, 6, 4
REQUEST = ErasureRequest(forget=(3, 4), remain=(0, 1, 2))


def tiny_model(seed: int = 0) -> ClassifierModel:
    torch.manual_seed(seed)
    model = ClassifierModel(nn.Sequential(nn.Linear(DIM, 6), nn.Tanh()), 6)
    model.head.grow(N_CLASSES)
    return model


def tiny_experience(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_CLASSES * PER_CLASS, DIM, generator=g)
    y = torch.arange(N_CLASSES).repeat_interleave(PER_CLASS)
    bench = benchmark_from_datasets(train=[_dataset(x, y)], test=[_dataset(x, y)])
    return bench.train_stream[0], x, y


def tiny_strategy(cls, cfg, plugins=(), seed: int = 0):
    st = cls(model=tiny_model(seed), cfg=cfg, plugins=list(plugins))
    st.request = REQUEST
    return st


class Recorder(SupervisedPlugin):
    """Keeps every training mini-batch's labels and inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.ys: list[torch.Tensor] = []
        self.xs: list[torch.Tensor] = []

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        self.ys.append(strategy.mb_y.detach().clone())
        self.xs.append(strategy.mb_x.detach().clone())


# ------------------------------------------------------------------ regularisers
def test_l2_penalty_is_the_squared_distance_to_every_anchor():
    st = tiny_strategy(L2, L2Config(name="l2", reg_lambda=0.3))
    params = trainable_named(st.model)
    assert not any(n.startswith("head.") for n in params)  # the head is frozen
    start = {n: p.detach().clone() for n, p in params.items()}
    st.adapt_to_experience()  # request 1: anchor at the start weights
    with torch.no_grad():
        for p in params.values():
            p.add_(0.1 * torch.randn_like(p))
    middle = {n: p.detach().clone() for n, p in params.items()}
    st.adapt_to_experience()  # request 2: a second anchor
    with torch.no_grad():
        for p in params.values():
            p.add_(0.1 * torch.randn_like(p))
    by_hand = sum(
        float(((p - start[n]) ** 2).sum() + ((p - middle[n]) ** 2).sum()) for n, p in params.items()
    )
    assert float(st.penalty()) == pytest.approx(by_hand, rel=1e-5)
    # the training loss is cross-entropy + reg_lambda x penalty
    x, y = torch.randn(4, DIM), torch.tensor([0, 1, 3, 4])
    st.mbatch = [x, y, torch.zeros(4, dtype=torch.long)]
    st.mb_output = st.model(x)
    st.forget_mask = torch.zeros(4, dtype=torch.bool)
    st.is_training = True
    expected = float(F.cross_entropy(st.mb_output, y)) + 0.3 * by_hand
    assert float(st.criterion()) == pytest.approx(expected, rel=1e-5)


def _linear_softmax_grads(w, b, x, y):
    """Per-sample gradients of the cross-entropy of softmax(W x + b), by hand."""
    p = torch.softmax(x @ w.T + b, dim=1)
    err = p - F.one_hot(y, w.shape[0]).float()  # (n, classes)
    return err[:, :, None] * x[:, None, :], err  # dW (n, c, d), db (n, c)


@pytest.mark.parametrize("batch", [1, 3])
def test_ewc_importance_is_the_official_squared_gradient_mean(batch):
    torch.manual_seed(0)
    model = nn.Linear(DIM, 3)
    x, y = torch.randn(6, DIM), torch.tensor([0, 1, 2, 2, 1, 0])
    params = dict(model.named_parameters())
    batches = [(x[i : i + batch], y[i : i + batch]) for i in range(0, 6, batch)]
    imp = ewc_importance(model, batches, params)
    dw, db = _linear_softmax_grads(model.weight.detach(), model.bias.detach(), x, y)
    # per mini-batch the gradient of its mean loss, squared, times its size; mean over batches
    gw = dw.reshape(-1, batch, *dw.shape[1:]).mean(1)
    gb = db.reshape(-1, batch, *db.shape[1:]).mean(1)
    assert torch.allclose(imp["weight"], (batch * gw**2).mean(0), atol=1e-6)
    assert torch.allclose(imp["bias"], (batch * gb**2).mean(0), atol=1e-6)
    if batch == 1:  # the empirical Fisher diagonal: the mean squared per-sample gradient
        assert torch.allclose(imp["weight"], (dw**2).mean(0), atol=1e-6)


def test_mas_importance_is_the_mean_absolute_output_gradient():
    torch.manual_seed(0)
    model = nn.Linear(DIM, 3)
    x = torch.randn(4, DIM)
    imp = mas_importance(model, [(x[:2], None), (x[2:], None)], dict(model.named_parameters()))
    # d mean(out^2) / dW = 2 out x^T / (rows x classes), per batch; |.| averaged over batches
    by_hand = torch.zeros_like(model.weight)
    for xb in (x[:2], x[2:]):
        out = model(xb).detach()
        by_hand += (2 * out.T @ xb / out.numel()).abs() / 2
    assert torch.allclose(imp["weight"], by_hand, atol=1e-6)


def test_ewc_anchors_on_the_retained_samples_at_the_request_start():
    exp, x, y = tiny_experience()
    st = tiny_strategy(EWC, EWCConfig(name="ewc", epochs=1, batch_size=64))
    start = tiny_model()
    start.head.requires_grad_(False)
    st.train(exp, eval_streams=[])
    [(importance, anchor)] = st.anchors
    keep = torch.isin(y, torch.tensor(REQUEST.remain))
    params = trainable_named(start)
    on_retained = ewc_importance(start, [(x[keep], y[keep])], params)
    on_all = ewc_importance(start, [(x, y)], params)
    flat = torch.cat([on_retained[n].reshape(-1) for n in params])
    assert torch.allclose(importance, flat, atol=1e-6)
    assert not torch.allclose(importance, torch.cat([on_all[n].reshape(-1) for n in params]))
    assert torch.equal(anchor, torch.cat([p.detach().reshape(-1) for p in params.values()]))


# ------------------------------------------------------------------ relabelling
def _relabel(n):
    def draw(labels, generator):
        return (labels + torch.randint(1, n, labels.shape, generator=generator)) % n

    return draw


def test_relabelled_batches_draw_other_valid_labels_anew_each_pass():
    true_y = torch.arange(40) % N_CLASSES
    idx = torch.arange(40)
    forget = torch.isin(true_y, torch.tensor(REQUEST.forget))
    plan = RelabelledBatches(
        [idx[~forget], true_y[~forget]],
        [idx[forget], true_y[forget]],
        _relabel(N_CLASSES),
        7,
        torch.Generator().manual_seed(0),
    )
    passes = []
    for _ in range(2):
        got = torch.full((40,), -1)
        for b in plan:
            got[b[0]] = b[1]
        assert (got >= 0).all() and (got < N_CLASSES).all()  # every sample, valid labels
        assert torch.equal(got[~forget], true_y[~forget])  # retained: true labels
        assert (got[forget] != true_y[forget]).all()  # forget: never the true label
        passes.append(got[forget])
    assert not torch.equal(passes[0], passes[1])  # drawn anew at each pass


def test_base_relabel_never_returns_the_label_and_stays_in_range():
    st = tiny_strategy(L2, L2Config(name="l2"))
    y = torch.arange(N_CLASSES).repeat(200)
    moved = st.relabelled(y, torch.Generator().manual_seed(0))
    assert (moved != y).all() and (moved >= 0).all() and (moved < N_CLASSES).all()
    assert set(moved[y == 0].tolist()) == set(range(1, N_CLASSES))  # every other class


def test_forget_led_batches_pair_relabelled_forget_rows_with_retained_batches():
    true_y = torch.arange(30) % N_CLASSES
    idx = torch.arange(30)
    forget = torch.isin(true_y, torch.tensor(REQUEST.forget))
    plan = ForgetLedBatches(
        [idx[forget], true_y[forget]],
        [idx[~forget], true_y[~forget]],
        _relabel(N_CLASSES),
        5,
        torch.Generator().manual_seed(0),
        n_remain=2,
    )
    batches = list(plan)
    assert len(batches) == len(plan) == 3  # one pass over the 12 forget samples
    retained_order = []
    for x, y, _, group in batches:
        assert forget[x[group == 0]].all() and not forget[x[group > 0]].any()
        assert (y[group == 0] != true_y[x[group == 0]]).all()
        assert torch.equal(y[group > 0], true_y[x[group > 0]])
        assert all(0 < int((group == k).sum()) <= 5 for k in (1, 2))  # two retained batches
        retained_order += [x[group == 1], x[group == 2]]
    # the retained batches cycle: one whole pass over the 18 retained samples, then the next
    assert torch.equal(torch.cat(retained_order)[:18].sort().values, idx[~forget])


# ------------------------------------------------------------------ retrain, SCRUB
def test_retrain_starts_fresh_and_never_sees_the_forget_samples():
    exp, x, y = tiny_experience()
    recorder = Recorder()
    st = tiny_strategy(Retrain, RetrainConfig(name="retrain", epochs=2, batch_size=4), [recorder])
    start = {n: p.detach().clone() for n, p in st.model.named_parameters()}
    first: dict[str, torch.Tensor] = {}

    class AtFirstStep(SupervisedPlugin):
        def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
            if not first:
                first.update({n: p.detach().clone() for n, p in strategy.model.named_parameters()})

    st.plugins.append(AtFirstStep())
    st.train(exp, eval_streams=[])
    assert all(not torch.equal(first[n], start[n]) for n in start)  # re-initialised, head too
    assert all(p.requires_grad for p in st.model.parameters())
    seen_y = torch.cat(recorder.ys)
    assert not torch.isin(seen_y, torch.tensor(REQUEST.forget)).any()
    retained = int(torch.isin(y, torch.tensor(REQUEST.remain)).sum())
    assert len(seen_y) == 2 * retained  # every retained sample once per epoch, nothing else
    forget_x = x[torch.isin(y, torch.tensor(REQUEST.forget))]
    seen_x = torch.cat(recorder.xs)
    assert not (seen_x[:, None, :] == forget_x[None]).all(-1).any()


def test_scrub_max_step_moves_away_from_the_teacher_on_forget_samples():
    exp, x, y = tiny_experience()
    forget_x = x[torch.isin(y, torch.tensor(REQUEST.forget))]
    kls: list[float] = []

    def divergence(strategy: Any) -> float:
        with torch.no_grad():
            return float(distill_kl(strategy.model(forget_x), strategy.teacher(forget_x), 2.0))

    class AfterMaxSteps(SupervisedPlugin):
        def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
            if strategy.phase == 0:
                kls.append(divergence(strategy))

    cfg = SCRUBConfig(
        name="scrub", epochs=1, batch_size=4, lr=1e-2, weight_decay=0.0, inner_epochs=1
    )
    st = tiny_strategy(SCRUB, cfg, [AfterMaxSteps()])
    # a teacher a little off the student, so the KL has a gradient from the first step
    st.teacher = frozen_copy(st.model)
    with torch.no_grad():
        st.teacher.head.fc.weight.add_(0.3 * torch.randn_like(st.teacher.head.fc.weight))
    before = divergence(st)
    st.train(exp, eval_streams=[])
    assert len(kls) == 3  # 12 forget samples in batches of 4, one max pass
    assert before < kls[0] < kls[1] < kls[2], (before, kls)  # every max step raises it
