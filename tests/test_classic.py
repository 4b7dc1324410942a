"""The classic baselines ewc / lwf / gdumb / icarl (strategies/classic.py) on split_digits with
a tiny CNN: what makes each method what it is (EWC's importances and penalty, LwF's frozen
teacher and head warm-up, GDumb's restart on its class-balanced memory and its schedule,
iCaRL's herding, memory split and nearest-mean prediction), determinism for a seed, an exact
checkpoint round trip, config errors, and each strategy end to end through the CLI."""

from __future__ import annotations

import copy
import json
from collections import Counter
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from avalanche.models import NCMClassifier
from avalanche.training.losses import ICaRLLossPlugin
from avalanche.training.plugins import EWCPlugin, LwFPlugin, SupervisedPlugin
from avalanche.training.storage_policy import ClassBalancedBuffer
from clbench.strategies.classic import sgdr_factor
from torch import nn

from clbench import statefile
from clbench.data import materialise
from clbench.errors import ConfigError
from clbench.models import ClassifierModel
from clbench.registry import SCENARIOS, STRATEGIES
from helpers import FAST, results_of, run_cli


@pytest.fixture(scope="module")
def scenario() -> Any:
    build = SCENARIOS.get("split_digits")
    return build(build.Config(n_experiences=5))


def _model() -> ClassifierModel:
    """A tiny CNN with BatchNorm (train and eval outputs differ)."""
    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
    )
    return ClassifierModel(backbone, 16)


def build(name: str, plugins: tuple[Any, ...] = (), seed: int = 0, **options: Any) -> Any:
    cls = STRATEGIES.get(name)
    cfg = cls.Config(name=name, **{"epochs": 1, **options})
    return cls(model=_model(), cfg=cfg, seed=seed, plugins=list(plugins), n_experiences=5)


class Steps(SupervisedPlugin):
    """Per training step, after backward and before the update: the mini-batch, outputs,
    loss, learning rate; per epoch start: the model's weights."""

    def __init__(self, extra: Any = None) -> None:
        super().__init__()
        self.steps: list[dict[str, Any]] = []
        self.epoch_weights: list[dict[str, torch.Tensor]] = []
        self.extra = extra

    def before_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        state = {k: v.detach().clone() for k, v in strategy.model.state_dict().items()}
        self.epoch_weights.append(state)

    def before_update(self, strategy: Any, **kwargs: Any) -> None:
        step = {
            "exp": int(strategy.experience.current_experience),
            "epoch": int(strategy.clock.train_exp_epochs),
            "x": strategy.mb_x.detach().clone(),
            "y": strategy.mb_y.detach().clone(),
            "out": strategy.mb_output.detach().clone(),
            "loss": float(strategy.loss),
            "lr": strategy.optimizer.param_groups[0]["lr"],
        }
        if self.extra is not None:
            step.update(self.extra(strategy))
        self.steps.append(step)


def train_x(scenario: Any, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = materialise(scenario.train_stream[e].dataset)[:2]
    return x, y


def rows_in(pool: torch.Tensor, x: torch.Tensor) -> list[int]:
    """The position in ``pool`` of each row of ``x`` (exact match; -1 if absent)."""
    flat_pool, flat_x = pool.flatten(1), x.flatten(1)
    out = []
    for row in flat_x:
        hits = torch.nonzero((flat_pool == row).all(1)).flatten()
        out.append(int(hits[0]) if len(hits) else -1)
    return out


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------ EWC
def test_ewc_importances_are_per_sample_squared_gradients(scenario):
    st = build("ewc", lr=0.05)
    assert isinstance(st.ewc, EWCPlugin) and st.ewc in st.plugins  # Avalanche's plugin
    st.train(scenario.train_stream[0])
    imp = st.ewc.importances[0]
    model = st.model
    assert set(imp) == {n for n, _ in model.named_parameters()}
    x, y = train_x(scenario, 0)
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    model.eval()
    for i in range(len(x)):  # the empirical Fisher, one sample at a time, model in eval mode
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for n, p in model.named_parameters():
            expected[n] += p.grad.pow(2) / len(x)
    model.train()
    for n in expected:
        assert torch.allclose(imp[n].data, expected[n], rtol=1e-4, atol=1e-9), n
    assert all(bool((imp[n].data > 0).any()) for n in imp)
    for n, p in model.named_parameters():  # the anchor: the weights at the experience's end
        assert torch.equal(st.ewc.saved_params[0][n].data, p.detach())


def test_ewc_penalty_is_zero_first_then_positive_and_in_the_loss(scenario):
    rec = Steps(lambda s: {"penalty": float(s.penalty())})
    st = build("ewc", plugins=(rec,), lr=0.05, ewc_lambda=50.0)
    st.train(scenario.train_stream[0])
    assert rec.steps and all(s["penalty"] == 0.0 for s in rec.steps)
    for s in rec.steps:  # the first experience: the cross-entropy alone
        assert s["loss"] == pytest.approx(float(F.cross_entropy(s["out"], s["y"])), rel=1e-6)
    imp0 = {n: d.data.clone() for n, d in st.ewc.importances[0].items()}
    rec.steps.clear()
    st.train(scenario.train_stream[1])
    first, later = rec.steps[0], rec.steps[1:]
    assert first["penalty"] == 0.0  # at the anchor; the new head units have no importance
    assert later and all(s["penalty"] > 0 for s in later)
    for s in rec.steps:
        ce = float(F.cross_entropy(s["out"], s["y"]))
        assert s["loss"] == pytest.approx(ce + 50.0 * s["penalty"], rel=1e-5, abs=1e-7)
    # online mode: one importance, the decayed old one (gamma 1) plus the new one
    assert list(st.ewc.importances) == [1] and list(st.ewc.saved_params) == [1]
    head = st.ewc.importances[1]["head.fc.weight"].data
    assert head.shape == (4, 16)
    assert bool((head[:2] >= imp0["head.fc.weight"] - 1e-12).all())
    assert bool((head[2:] > 0).any())


# ------------------------------------------------------------------------ LwF
def test_lwf_distils_the_frozen_previous_model_on_old_classes(scenario):
    rec = Steps()
    st = build("lwf", plugins=(rec,), lr=0.05, warmup_epochs=1)
    assert isinstance(st.lwf_plugin, LwFPlugin) and st.lwf_plugin in st.plugins
    st.train(scenario.train_stream[0])
    assert st.teacher is None
    for s in rec.steps:  # no teacher yet: the cross-entropy alone
        assert s["loss"] == pytest.approx(float(F.cross_entropy(s["out"], s["y"])), rel=1e-6)
    previous = copy.deepcopy(st.model).eval()
    rec.steps.clear()
    st.train(scenario.train_stream[1])
    teacher = st.teacher
    assert teacher is not None and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    old = sorted(st.lwf_plugin.lwf.prev_classes_by_task[0])  # the distilled outputs
    assert old == sorted(int(c) for c in scenario.train_stream[0].classes_in_this_experience)
    with torch.no_grad():
        x0 = rec.steps[0]["x"]
        assert torch.equal(teacher(x0)[:, old], previous(x0)[:, old])
        assert same_weights(teacher.backbone, previous.backbone)  # frozen through training
    distilled = []
    for s in rec.steps:
        with torch.no_grad():
            q = F.softmax(previous(s["x"])[:, old] / 2.0, dim=1)
        log_p = F.log_softmax(s["out"][:, old] / 2.0, dim=1)
        kl = float(F.kl_div(log_p, q, reduction="batchmean"))
        ce = float(F.cross_entropy(s["out"], s["y"]))
        assert s["loss"] == pytest.approx(ce + 3.0 * kl, rel=1e-5, abs=1e-7)
        distilled.append(kl)
    assert max(distilled) > 1e-4


def test_lwf_warm_up_trains_only_the_new_head_units(scenario):
    starts = {}
    for warmup in (0, 2):
        rec = Steps()
        st = build("lwf", plugins=(rec,), lr=0.05, warmup_epochs=warmup)
        st.train(scenario.train_stream[0])
        rec.epoch_weights.clear()
        st.train(scenario.train_stream[1])
        starts[warmup] = rec.epoch_weights[0]  # the weights the training starts from
    plain, warm = starts[0], starts[2]
    for k in plain:
        if not k.startswith("head."):
            assert torch.equal(plain[k], warm[k]), k  # backbone (and BN stats) untouched
    w0, w2 = plain["head.fc.weight"], warm["head.fc.weight"]
    assert torch.equal(w0[:2], w2[:2])  # the earlier classes' units: no gradient
    assert not torch.allclose(w0[2:], w2[2:])  # the new units trained


# ---------------------------------------------------------------------- GDumb
def test_gdumb_retrains_from_the_initial_model_on_its_balanced_memory(scenario):
    mem = 30
    rec = Steps()
    st = build("gdumb", plugins=(rec,), mem_size=mem, epochs=2, batch_size=8)
    assert isinstance(st.storage_policy, ClassBalancedBuffer)  # Avalanche's (GDumbPlugin's)
    initial = {k: v.clone() for k, v in st.model.state_dict().items() if k.startswith("backbone")}
    seen: list[int] = []
    for t in range(3):
        rec.steps.clear()
        rec.epoch_weights.clear()
        st.train(scenario.train_stream[t])
        seen += sorted(int(c) for c in scenario.train_stream[t].classes_in_this_experience)
        for k, v in initial.items():  # every experience starts from the initial weights
            assert torch.equal(rec.epoch_weights[0][k], v), k
        mx, my = materialise(st.memory.dataset)[:2]
        assert len(mx) == mem  # bounded (every class has more samples than its share)
        counts = Counter(my.tolist())
        assert set(counts) == set(seen)
        share = mem // len(seen)
        assert set(counts.values()) <= {share, share + 1}
        assert {e for e, _ in st.memory.refs} == set(range(t + 1))
        for epoch in (0, 1):  # each epoch is one pass over the memory, nothing else
            steps = [s for s in rec.steps if s["epoch"] == epoch]
            x = torch.cat([s["x"] for s in steps])
            rows = rows_in(mx, x)
            assert -1 not in rows and sorted(rows) == list(range(mem))


def test_gdumb_schedule_is_warm_start_then_sgdr():
    params = [nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD(params, lr=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=1, T_mult=2, eta_min=5e-4)
    for epoch in range(40):  # GDumb's src/main.py loop
        if epoch == 0:
            opt.param_groups[0]["lr"] = 0.005
        elif epoch == 1:
            opt.param_groups[0]["lr"] = 0.05
        else:
            sched.step()
        expected = opt.param_groups[0]["lr"]
        assert 0.05 * sgdr_factor(epoch, 5e-4 / 0.05) == pytest.approx(expected, rel=1e-9)


def test_gdumb_applies_the_schedule_clipping_and_cutmix(scenario):
    rec = Steps(lambda s: {"mix": s._mix})
    st = build("gdumb", plugins=(rec,), mem_size=20, epochs=4, batch_size=8, cutmix_prob=1.0)
    st.train(scenario.train_stream[0])
    lrs = sorted({(s["epoch"], s["lr"]) for s in rec.steps})
    assert [lr for _, lr in lrs] == pytest.approx([0.05 * sgdr_factor(e, 0.01) for e in range(4)])
    mx = materialise(st.memory.dataset)[0]
    for s in rec.steps:  # every batch mixed: a box pasted from another row of the batch
        y_b, kept = s["mix"]
        assert 0.0 <= kept <= 1.0
        ce = F.cross_entropy(s["out"], s["y"])
        other = F.cross_entropy(s["out"], y_b)
        assert s["loss"] == pytest.approx(float(kept * ce + (1 - kept) * other), rel=1e-5)
    assert any(-1 in rows_in(mx, s["x"]) for s in rec.steps)  # some rows are mixed images


# ---------------------------------------------------------------------- iCaRL
def _herding(features: torch.Tensor, k: int) -> list[int]:
    """iCaRL's Algorithm 4 written out: each step adds the sample whose inclusion brings
    the exemplars' mean of normalised features closest to the class mean."""
    f = F.normalize(features)
    mu, chosen, total = f.mean(0), [], torch.zeros_like(f[0])
    for i in range(k):
        dist = ((mu - (total + f) / (i + 1)) ** 2).sum(1)
        dist[chosen] = float("inf")
        j = int(dist.argmin())
        chosen.append(j)
        total = total + f[j]
    return chosen


@torch.no_grad()
def _features(model: ClassifierModel, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    out = model.backbone(x)
    model.train()
    return out


def test_icarl_herding_memory_split_and_training_set(scenario):
    mem = 20
    rec = Steps()
    st = build("icarl", plugins=(rec,), mem_size=mem)
    assert isinstance(st.icarl_loss, ICaRLLossPlugin) and st.icarl_loss in st.plugins
    st.train(scenario.train_stream[0])
    x0, y0 = train_x(scenario, 0)
    first = {}
    for c, refs in st.exemplars.items():
        assert len(refs) == mem // 2  # mem_size // seen classes
        rows = torch.nonzero(y0 == c).flatten()
        expected = _herding(_features(st.model, x0[rows]), mem // 2)
        assert refs[:, 1].tolist() == rows[expected].tolist()  # herding order
        assert set(refs[:, 0].tolist()) == {0}
        first[c] = refs
    rec.steps.clear()
    st.train(scenario.train_stream[1])
    assert len(st.exemplars) == 4
    for c, refs in st.exemplars.items():
        assert len(refs) == mem // 4
        if c in first:  # a class's memory shrinks to the head of its herding order
            assert torch.equal(refs, first[c][: mem // 4])
    # exp 1 trains on its samples and every exemplar of exp 0, once per epoch
    x1 = train_x(scenario, 1)[0]
    batch_x = torch.cat([s["x"] for s in rec.steps])
    assert len(batch_x) == len(x1) + mem
    pool = torch.cat([x1, x0[[i for refs in first.values() for i in refs[:, 1].tolist()]]])
    assert -1 not in rows_in(pool, batch_x)


def test_icarl_features_are_the_same_read_lazily(scenario):
    """Exemplar features come from batches of stacked tensors, or read sample by sample
    from the dataset when the scenario is not in memory: the same features."""
    st = build("icarl", mem_size=20)
    st.train(scenario.train_stream[0])
    data = scenario.train_stream[0].dataset.eval().subset(list(range(40)))
    eager = st.features(data)
    st.in_memory = False
    assert torch.allclose(st.features(data), eager, atol=1e-6)
    flipped = st.features(data, flip=True)
    assert flipped.shape == eager.shape and not torch.allclose(flipped, eager)


class EvalOutputs(SupervisedPlugin):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[torch.Tensor, torch.Tensor]] = []

    def after_eval_iteration(self, strategy: Any, **kwargs: Any) -> None:
        self.rows.append((strategy.mb_x.clone(), strategy.mb_output.clone()))


def test_icarl_predicts_the_nearest_mean_of_exemplars_and_distils(scenario):
    rec, outs = Steps(), EvalOutputs()
    st = build("icarl", plugins=(rec, outs), mem_size=20)
    st.train(scenario.train_stream[0])
    previous = copy.deepcopy(st.model).eval()
    rec.steps.clear()
    st.train(scenario.train_stream[1])
    # the loss: BCE on one-hot targets, old classes' entries = the previous model's sigmoid
    old = sorted(int(c) for c in scenario.train_stream[0].classes_in_this_experience)
    for s in rec.steps:
        with torch.no_grad():
            target = F.one_hot(s["y"], s["out"].shape[1]).float()
            target[:, old] = torch.sigmoid(previous(s["x"]))[:, old]
        bce = F.binary_cross_entropy(torch.sigmoid(s["out"]), target)
        assert s["loss"] == pytest.approx(float(bce), rel=1e-4)
    # the class means, by hand: mean of normalised features of the exemplars and of their
    # flipped copies, averaged and normalised
    means = []
    for c in range(4):
        x = torch.stack(
            [scenario.train_stream[e].dataset[i][0] for e, i in st.exemplars[c].tolist()]
        )
        m = F.normalize(_features(st.model, x)).mean(0)
        m_flip = F.normalize(_features(st.model, torch.flip(x, [3]))).mean(0)
        means.append(F.normalize((m + m_flip) / 2, dim=0))
    means = torch.stack(means)
    assert isinstance(st.ncm, NCMClassifier)
    assert torch.allclose(st.ncm.class_means[:4], means, atol=1e-5)
    st.eval(scenario.test_stream[:2])
    for x, out in outs.rows:
        f = F.normalize(_features(st.model, x))
        dist = torch.cdist(f, means)
        assert out.shape[1] == 4  # the classes seen (the full head has 10 units)
        assert torch.allclose(out, -dist, atol=1e-4)
        assert torch.equal(out.argmax(1), dist.argmin(1))
        with torch.no_grad():  # not the head's prediction (eval mode: BN stats kept)
            st.model.eval()
            head = st.model(x)[:, :4]
            st.model.train()
        assert not torch.allclose(out, head)


# -------------------------------------------------------- determinism, resume
OPTIONS = {
    "ewc": {},
    "lwf": {"warmup_epochs": 1},
    "gdumb": {"mem_size": 30, "cutmix_prob": 0.5},
    "icarl": {"mem_size": 20},
}


def _two_experiences(scenario: Any, name: str, seed: int = 0, disturb: bool = False) -> Any:
    st = build(name, seed=seed, **OPTIONS[name])
    for t in range(2):
        if disturb and t > 0:
            torch.manual_seed(1000 + t)  # the global RNG (only the head's new units use it)
        st.train(scenario.train_stream[t])
    return st


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_a_run_is_deterministic_for_its_seed(scenario, name):
    a = _two_experiences(scenario, name)
    b = _two_experiences(scenario, name)
    assert same_weights(a.model, b.model)
    if name == "icarl":  # its full head grows once: nothing after it draws from torch's RNG
        c = _two_experiences(scenario, name, disturb=True)
        assert same_weights(a.model, c.model)
        assert all(torch.equal(a.exemplars[k], c.exemplars[k]) for k in a.exemplars)
    if name == "gdumb":  # the memory and CutMix draw from the run seed only
        c = _two_experiences(scenario, name, disturb=True)
        assert c.memory.refs == a.memory.refs
        d = _two_experiences(scenario, name, seed=1)
        assert d.memory.refs != a.memory.refs


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_checkpoint_round_trip_gives_the_same_next_experience(scenario, tmp_path, name):
    rec_a, rec_b = Steps(), Steps()
    a = build(name, plugins=(rec_a,), **OPTIONS[name])
    for t in range(2):
        a.train(scenario.train_stream[t])
    path = tmp_path / "state.safetensors"
    statefile.save(path, a.checkpoint_state())  # data only: tensors and JSON
    rng = torch.get_rng_state()
    b = build(name, plugins=(rec_b,), **OPTIONS[name])
    b.restore_checkpoint_state(statefile.load(path))
    rec_a.steps.clear()
    torch.set_rng_state(rng)
    a.train(scenario.train_stream[2])
    torch.set_rng_state(rng)
    b.train(scenario.train_stream[2])
    assert [s["loss"] for s in rec_b.steps] == [s["loss"] for s in rec_a.steps]
    assert same_weights(a.model, b.model)
    if name == "icarl":
        assert torch.equal(a.ncm.class_means, b.ncm.class_means)


# --------------------------------------------------------------------- config
@pytest.mark.parametrize("name", ["ewc", "lwf", "gdumb", "icarl"])
def test_the_dataclass_defaults_are_the_yaml(name):
    """Built in Python from ``Config()``, a strategy has the defaults ``clbench run`` uses."""
    import dataclasses

    from omegaconf import OmegaConf

    from clbench.config import CONF_DIR

    yaml = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "strategy" / f"{name}.yaml"))
    assert dataclasses.asdict(STRATEGIES.get(name).Config(name=name)) == yaml


@pytest.mark.parametrize(
    ("name", "options", "key"),
    [
        ("ewc", {"mode": "offline"}, "strategy.mode"),
        ("ewc", {"fisher_batch_size": 0}, "strategy.fisher_batch_size"),
        ("lwf", {"temperature": 0.0}, "strategy.temperature"),
        ("gdumb", {"lr_schedule": "cosine"}, "strategy.lr_schedule"),
        ("gdumb", {"cutmix_prob": 1.5}, "strategy.cutmix_prob"),
        ("gdumb", {"min_lr": 1.0}, "strategy.min_lr"),
        ("icarl", {"loss_mask": "current"}, "strategy.loss_mask"),
        ("icarl", {"label_smoothing": 0.1}, "strategy.label_smoothing"),
    ],
)
def test_bad_options_are_one_config_error(name, options, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
        STRATEGIES.get(name).Config(name=name, **options)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------ CLI
@pytest.mark.parametrize("name", ["ewc", "lwf", "gdumb", "icarl"])
def test_each_strategy_runs_through_the_cli(tmp_path, name):
    """Two experiences end to end on the micro ViT; gdumb's run twice with one seed gives
    the same record."""
    extra = {
        "ewc": ["strategy.fisher_batch_size=32"],  # per-sample importances: tested above
        "gdumb": ["strategy.mem_size=60"],
        "icarl": ["strategy.mem_size=60"],
    }.get(name, [])
    runs = 2 if name == "gdumb" else 1
    results = []
    for r in range(runs):
        args = ["run", *FAST, f"strategy={name}", *extra, f"runs_dir={tmp_path / str(r)}"]
        assert run_cli(args) == 0
        (run_dir,) = (tmp_path / str(r)).iterdir()
        results.append(results_of(run_dir))
    res = results[0]
    assert res["strategy"] == name
    matrix = res["accuracy_matrix"]
    assert len(matrix) == 2 and all(len(row) == 2 for row in matrix)
    assert all(0.0 <= v <= 1.0 for row in matrix for v in row)
    assert matrix[0][1] == 0.0  # an unseen experience's classes are not predicted yet
    if runs == 2:
        assert results[1]["accuracy_matrix"] == matrix
        assert json.dumps(results[1]["metrics"]) == json.dumps(res["metrics"])
