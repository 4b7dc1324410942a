"""Continual learning with dynamic sparse training (strategy ``dst``): isolation of earlier
tasks, masks and their density, mask selection by task id, the rewiring schedule, resume."""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any

import pytest
import torch
from avalanche.training.plugins import SupervisedPlugin

from clbench import statefile
from clbench.adapters.sparse import GROW_RULES, INITS, PRUNE_RULES, MaskSet, erk_densities
from clbench.errors import ConfigError
from clbench.models import ClassifierModel
from clbench.registry import BACKBONES, SCENARIOS, STRATEGIES


@pytest.fixture(scope="module")
def scenario():
    build = SCENARIOS.get("split_digits")
    return build(build.Config(n_experiences=5))


def _model() -> ClassifierModel:
    build = BACKBONES.get("wideresnet")
    bb = build(build.Config(depth=10, widen_factor=1, in_chans=1, img_size=16))
    return ClassifierModel(bb.module, bb.feature_dim)


def _strategy(plugins: tuple[Any, ...] = (), **overrides: Any) -> Any:
    torch.manual_seed(0)
    cls = STRATEGIES.get("dst")
    cfg = cls.Config(**{"epochs": 2, "update_every": 3, **overrides})
    return cls(model=_model(), cfg=cfg, plugins=list(plugins))


class Outputs(SupervisedPlugin):
    """Every evaluation's logits and labels, by test experience id."""

    def __init__(self) -> None:
        super().__init__()
        self.logits: dict[int, torch.Tensor] = {}
        self.labels: dict[int, torch.Tensor] = {}

    def before_eval_exp(self, strategy: Any, **kwargs: Any) -> None:
        e = int(strategy.experience.current_experience)
        self.logits[e], self.labels[e] = torch.empty(0), torch.empty(0, dtype=torch.long)

    def after_eval_iteration(self, strategy: Any, **kwargs: Any) -> None:
        e = int(strategy.experience.current_experience)
        self.logits[e] = torch.cat([self.logits[e], strategy.mb_output.detach().clone()])
        self.labels[e] = torch.cat([self.labels[e], strategy.mb_y.detach().clone()])


def _task_aware_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    classes = sorted(set(labels.tolist()))
    pred = torch.tensor(classes)[logits[:, classes].argmax(1)]
    return float((pred == labels).float().mean())


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_weights_of_earlier_tasks_stay_bit_identical(scenario, weight_decay):
    st = _strategy(weight_decay=weight_decay)
    st.train(scenario.train_stream[0], eval_streams=[])
    mask0 = {n: m.clone() for n, m in st.task_masks[0].items()}
    before = {n: w.clone() for n, w in st.dense_store.items()}
    head = [p.detach().clone() for p in st.model.head.parameters()]
    st.train(scenario.train_stream[1], eval_streams=[])
    for old, new in zip(head, st.model.head.parameters(), strict=True):
        assert torch.equal(new[: old.shape[0]], old)  # task 0's head rows
    changed = 0
    for name, w in st.dense_store.items():
        assert torch.equal(w[mask0[name]], before[name][mask0[name]]), name
        # the model holds the dense store between tasks
        assert torch.equal(st.masks.layers[name].weight.detach(), w), name
        new = st.task_masks[1][name] & ~mask0[name]
        changed += int((w[new] != before[name][new]).sum())
    assert changed > 0  # task 1 did train its own weights


class ForwardProbe(SupervisedPlugin):
    """Checks in every training forward that stored weights outside the mask are zero."""

    def __init__(self, layers: dict[str, Any]) -> None:
        super().__init__()
        self.checked = 0
        self.violations = 0
        for layer in layers.values():
            layer.register_forward_pre_hook(self._hook)

    def _hook(self, module: Any, args: Any) -> None:
        if module.training:
            self.checked += 1
            self.violations += int((module.weight[~module.mask] != 0).sum())


def test_weights_outside_the_mask_are_zero_and_masks_have_the_exact_density(scenario):
    st = _strategy(update_every=2, test_mask="full")
    probe = ForwardProbe(st.masks.layers)
    st.plugins.append(probe)
    for exp in scenario.train_stream[:2]:
        st.train(exp, eval_streams=[])
    assert probe.checked > 0 and probe.violations == 0
    assert len(st.task_masks) == 2
    for masks in st.task_masks:
        for name, m in masks.items():
            assert m.dtype == torch.bool
            assert int(m.sum()) == round(0.2 * m.numel()), name
    assert st.task_updates == [st.task_updates[0]] * 2 and st.task_updates[0] > 0
    assert all(abs(d - 0.2) < 1e-3 for d in st.task_densities)
    report = st.sparsity_report()
    assert abs(report["overall"] - 0.2) < 1e-3 and 0.2 < report["union_density"] < 0.4


@pytest.mark.parametrize("dense_params", ["per_task", "shared"])
def test_per_task_dense_params_isolate_earlier_tasks_exactly(scenario, dense_params):
    out = Outputs()
    st = _strategy(plugins=(out,), dense_params=dense_params)
    features: list[torch.Tensor] = []
    st.model.backbone.register_forward_hook(
        lambda m, a, y: None if m.training else features.append(y.detach().clone())
    )
    tests = scenario.test_stream
    st.train(scenario.train_stream[0], eval_streams=[])
    st.eval([tests[0]])
    right_after, labels = out.logits[0].clone(), out.labels[0]
    feats_after = torch.cat(features)
    for exp in scenario.train_stream[1:3]:
        st.train(exp, eval_streams=[])
    features.clear()
    st.eval([tests[0]])
    later = out.logits[0][:, : right_after.shape[1]]  # the head grew: task 0's columns
    if dense_params == "per_task":
        # the backbone computes exactly what it did; the logits of task 0's head rows agree
        # up to the rounding of a wider matrix product
        assert torch.equal(torch.cat(features), feats_after)
        assert torch.allclose(later, right_after, rtol=0, atol=1e-6)
        assert _task_aware_accuracy(later, labels) == _task_aware_accuracy(right_after, labels)
    else:  # shared BatchNorm statistics and biases kept training: task 0's features moved
        assert not torch.equal(torch.cat(features), feats_after)


def test_the_test_experience_id_selects_the_mask(scenario):
    out = Outputs()
    st = _strategy(plugins=(out,), dense_params="per_task")
    for exp in scenario.train_stream[:2]:
        st.train(exp, eval_streams=[])
    masks = st.task_masks
    assert any(not torch.equal(masks[0][n], masks[1][n]) for n in masks[0])
    seen = []
    hook = next(iter(st.masks.layers.values())).register_forward_pre_hook(
        lambda m, a: seen.append(m.mask.clone())
    )
    same_input = [copy.copy(scenario.test_stream[0]) for _ in range(3)]
    for e, exp in enumerate(same_input):
        exp.current_experience = e  # task 0's images under ids 0, 1 and 2 (not yet trained)
        st.eval([exp])
    hook.remove()
    first = next(iter(masks[0]))
    assert torch.equal(seen[0], masks[0][first]) and torch.equal(seen[-1], masks[1][first])
    assert not torch.equal(out.logits[0], out.logits[1])
    assert torch.equal(out.logits[1], out.logits[2])  # unseen task: the latest mask
    # after evaluation the latest task's mask is back in the model
    assert torch.equal(st.masks.layers[first].mask, masks[1][first])


class LRProbe(SupervisedPlugin):
    def __init__(self) -> None:
        super().__init__()
        self.lrs: list[float] = []

    def before_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        self.lrs.append(strategy.optimizer.param_groups[0]["lr"])


def test_rewiring_count_and_cosine_death_rate_and_multistep_lr(scenario, monkeypatch):
    rates: list[float] = []
    real = MaskSet.prune

    def spy(self: MaskSet, rate: float, rule: str) -> dict[str, torch.Tensor]:
        rates.append(rate)
        return real(self, rate, rule)

    monkeypatch.setattr(MaskSet, "prune", spy)
    lrs = LRProbe()
    epochs, every, start, end = 4, 3, 0.5, 0.005
    st = _strategy(plugins=(lrs,), epochs=epochs, update_every=every)
    exp = scenario.train_stream[0]
    st.train(exp, eval_streams=[])
    steps = epochs * math.ceil(len(exp.dataset) / 64)
    assert len(rates) == steps // every == st.task_updates[0]
    for k, rate in enumerate(rates, start=1):
        s = k * every
        expected = end + (start - end) * (1 + math.cos(math.pi * s / steps)) / 2
        assert rate == pytest.approx(expected, rel=1e-6)
    # MultiStepLR x0.1 at int(E/2) = 2 and int(3E/4) = 3
    assert lrs.lrs == pytest.approx([1e-3, 1e-3, 1e-4, 1e-5])


@pytest.mark.parametrize(
    ("init", "prune", "grow"), list(itertools.product(INITS, PRUNE_RULES, GROW_RULES))
)
def test_every_rule_combination_keeps_the_density(scenario, init, prune, grow):
    st = _strategy(epochs=1, update_every=1, init=init, prune=prune, grow=grow, test_mask="full")
    counts: dict[str, int] = {}

    def count(strategy: Any) -> None:
        counts.update({n: int(layer.mask.sum()) for n, layer in strategy.masks.layers.items()})

    st.adapt_to_experience = _after(st.adapt_to_experience, lambda: count(st))
    st.train(scenario.train_stream[0], eval_streams=[])
    assert st.task_updates == [math.ceil(len(scenario.train_stream[0].dataset) / 64)]
    for name, layer in st.masks.layers.items():
        assert int(st.task_masks[0][name].sum()) == counts[name], name
        assert int((layer.weight[~layer.mask] != 0).sum()) == 0, name


def _after(method: Any, then: Any) -> Any:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        result = method(*args, **kwargs)
        then()
        return result

    return wrapped


def test_erk_init_gives_erdos_renyi_kernel_layer_densities(scenario):
    st = _strategy(epochs=1, init="erk", test_mask="full")
    st.train(scenario.train_stream[0], eval_streams=[])
    shapes = {n: tuple(layer.weight.shape) for n, layer in st.masks.layers.items()}
    want = erk_densities(shapes, 0.2)
    total = sum(math.prod(s) for s in shapes.values())
    got = {n: int(m.sum()) for n, m in st.task_masks[0].items()}
    for name, shape in shapes.items():
        assert got[name] == round(want[name] * math.prod(shape)), name
    # independently of erk_densities: the global budget, and density proportional to
    # sum(shape) / prod(shape) among the layers that are not dense
    assert sum(got.values()) == pytest.approx(0.2 * total, rel=1e-3)
    ratios = [got[n] / sum(s) for n, s in shapes.items() if got[n] < math.prod(s)]
    assert max(ratios) == pytest.approx(min(ratios), rel=0.05)
    assert len({round(got[n] / math.prod(s), 3) for n, s in shapes.items()}) > 1  # not uniform


def test_resume_from_a_checkpoint_continues_like_the_uninterrupted_run(scenario, tmp_path):
    a = _strategy(dense_params="per_task", grow="random_unfired")
    for exp in scenario.train_stream[:2]:
        a.train(exp, eval_streams=[])
    statefile.save(tmp_path / "state.safetensors", a.checkpoint_state())
    b = _strategy(dense_params="per_task", grow="random_unfired")
    b.restore_checkpoint_state(statefile.load(tmp_path / "state.safetensors"))
    for st in (a, b):
        torch.manual_seed(1)  # the protocol restores the global RNGs (new head rows)
        st.train(scenario.train_stream[2], eval_streams=[])
    assert len(b.task_masks) == 3
    for name in a.dense_store:
        assert torch.equal(a.dense_store[name], b.dense_store[name]), name
        for t in range(3):
            assert torch.equal(a.task_masks[t][name], b.task_masks[t][name]), (t, name)
    for k, v in a.task_params[2].items():
        assert torch.equal(v, b.task_params[2][k]), k


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"init": "gmp"}, "strategy.init"),
        ({"prune": "threshold"}, "strategy.prune"),
        ({"grow": "momentum_neuron"}, "strategy.grow"),
        ({"density": 0.0}, "strategy.density"),
        ({"density": 1.5}, "strategy.density"),
        ({"update_every": 0}, "strategy.update_every"),
        ({"death_rate": 1.5}, "strategy.death_rate"),
        ({"death_rate_end": -0.1}, "strategy.death_rate_end"),
        ({"dense_params": "private"}, "strategy.dense_params"),
        ({"lr_schedule": "step"}, "strategy.lr_schedule"),
        ({"targets": []}, "strategy.targets"),
        ({"targets": ["qkvv"]}, "strategy.targets"),
    ],
)
def test_bad_options_are_one_line_config_errors(overrides, needle):
    with pytest.raises(ConfigError) as e:
        STRATEGIES.get("dst").Config(**overrides)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_targets_matching_no_layer_is_a_config_error():
    with pytest.raises(ConfigError) as e:
        _strategy(targets=["qkv"])  # a CNN has no ViT attention
    assert "strategy.targets" in str(e.value) and "\n" not in str(e.value)


def test_multistep_is_accepted_with_the_base_schedules():
    cls = STRATEGIES.get("dst").Config
    assert cls().lr_schedule == "multistep"
    assert cls(lr_schedule="cosine").lr_schedule == "cosine"


def test_momentum_growth_reads_adam_moments_kept_outside_the_mask(scenario, monkeypatch):
    st = _strategy(epochs=1, update_every=2, grow="momentum")
    grown: list[dict[str, torch.Tensor]] = []
    real = MaskSet.grow

    def spy(self: MaskSet, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        grown.append(real(self, *args, **kwargs))
        return grown[-1]

    monkeypatch.setattr(MaskSet, "grow", spy)
    st.train(scenario.train_stream[0], eval_streams=[])
    assert grown
    name, layer = next(iter(st.masks.layers.items()))
    m = st.optimizer.state[layer.weight]["exp_avg"]
    assert int((m[~layer.mask] != 0).sum()) > 0  # moments outside the mask (official)
    # so growth is not "the lowest inactive positions" (what all-zero scores would give)
    flat = grown[0][name].flatten().nonzero().squeeze(1)
    assert int(flat.max()) > 2 * int(flat.numel())


class LastEpochOutputs(SupervisedPlugin):
    """Eval-mode logits on ``x`` of the network as it ends each task's last epoch."""

    def __init__(self, x: torch.Tensor) -> None:
        super().__init__()
        self.x = x
        self.logits: list[torch.Tensor] = []

    def after_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        if strategy.clock.train_exp_epochs == strategy.train_epochs - 1:
            strategy.model.eval()
            with torch.no_grad():
                self.logits.append(strategy.model(self.x))
            strategy.model.train()


@pytest.mark.parametrize("test_mask", ["used", "full"])
def test_a_task_is_tested_on_the_network_it_trained(scenario, test_mask):
    x = torch.stack([scenario.test_stream[1].dataset[i][0] for i in range(32)])
    probe = LastEpochOutputs(x)
    st = _strategy(plugins=(probe,), keep_best_epoch=False, test_mask=test_mask, epochs=3)
    for exp in scenario.train_stream[:2]:
        st.train(exp, eval_streams=[])
    st.model.eval()
    with torch.no_grad():
        tested = st.model(x)  # the dense store under task 1's stored mask
    trained = probe.logits[1]
    stored, dense = st.task_masks[1], st.dense_store
    regrown_old = sum(int((st.task_masks[0][n] & ~stored[n]).sum()) for n in stored)
    if test_mask == "used":
        assert torch.equal(tested, trained)
        for n, m in stored.items():
            assert bool((dense[n][m] != 0).all())  # only weights the task computed with
            assert 0.9 * round(0.2 * m.numel()) <= int(m.sum()) <= round(0.2 * m.numel())
    else:  # earlier tasks' weights regrown at zero are filled in: another network
        assert not torch.equal(tested, trained)
    assert regrown_old > 0


@pytest.mark.parametrize(("tie", "kept"), [("first", 1), ("last", 2)])
def test_a_tie_in_training_accuracy_keeps_the_first_or_last_best_epoch(tie, kept):
    st = _strategy(best_epoch_tie=tie)
    st._best, st._best_acc = None, -1.0
    name, p = next(iter(st.model.named_parameters()))
    for epoch, acc in enumerate([0.5, 1.0, 1.0, 0.75]):  # epochs 1 and 2 tie at the best
        with torch.no_grad():
            p.fill_(float(epoch))  # marks the weights of this epoch
        st._correct, st._seen = int(acc * 4), 4
        st._after_training_epoch()
    assert torch.all(st._best[name] == kept)
