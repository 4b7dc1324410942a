"""SparCL: dynamic gradient masking, dynamic data removal with forgetting statistics, the
task-aware mask schedule, sparse weights after each step, and a CLI run on the WRN."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import numpy as np
import pytest
import torch
from avalanche.core import SupervisedPlugin
from clbench.strategies.sparcl import ForgettingStats, tdm_bounds
from torch import nn

from clbench.errors import ConfigError
from clbench.models import ClassifierModel
from clbench.registry import SCENARIOS, STRATEGIES
from helpers import only_run_dir, results_of, run_cli, snapshot_after


class TinyCNN(nn.Module):
    """A stem ``conv1`` (kept dense by default) and two convolutions SparCL masks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 16, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h))
        h = torch.relu(self.conv3(h))
        return h.mean(dim=(2, 3))


def _sparcl(plugins: tuple = (), **overrides: Any):
    torch.manual_seed(0)
    cls = STRATEGIES.get("sparcl")
    cfg = cls.Config(name="sparcl", **overrides)
    return cls(model=ClassifierModel(TinyCNN(), 16), cfg=cfg, plugins=list(plugins), seed=0)


@pytest.fixture(scope="module")
def digits():
    build = SCENARIOS.get("split_digits")
    return build(build.Config(n_experiences=5))


# ------------------------------------------------------------------------ DGM
def test_gradient_masking_zeroes_exactly_the_gradients_below_the_percentile():
    s = _sparcl(gradient_sparsity=0.8, gradient_mask_every=3)
    assert set(s.sparse_layers) == {"backbone.conv2", "backbone.conv3"}  # stem dense
    layer = s.sparse_layers["backbone.conv3"]
    g = torch.Generator().manual_seed(1)
    for other in s.sparse_layers.values():
        other.weight.grad = torch.randn(other.weight.shape, generator=g)
    grad = layer.weight.grad.clone().numpy()
    mask = layer.mask.numpy()
    s._iteration = 0  # the epoch's first mini-batch: the gradient mask is computed
    s.mask_gradients()
    masked = grad * mask
    expected = np.where(np.abs(masked) < np.percentile(np.abs(masked), 80), 0.0, masked)
    np.testing.assert_array_equal(layer.weight.grad.numpy(), expected.astype(np.float32))
    kept = expected != 0
    assert 0.18 < kept.mean() < 0.22  # 20% of all entries (of the 25% active)
    assert layer.grad_density == pytest.approx(kept.mean())

    # the next mini-batches reuse that gradient mask (official gradient_efficient_mix)
    fresh = torch.randn(layer.weight.shape, generator=g)
    layer.weight.grad = fresh.clone()
    s._iteration = 1
    s.mask_gradients()
    np.testing.assert_array_equal(layer.weight.grad.numpy(), fresh.numpy() * kept)
    # ... until the gradient_mask_every-th one recomputes it from the new gradient
    layer.weight.grad = fresh.clone()
    s._iteration = 3
    s.mask_gradients()
    masked = fresh.numpy() * mask
    expected = np.where(np.abs(masked) < np.percentile(np.abs(masked), 80), 0.0, masked)
    np.testing.assert_array_equal(layer.weight.grad.numpy(), expected.astype(np.float32))


# ------------------------------------------------------------------------ DDR
def test_forgetting_events_of_a_hand_made_sequence():
    stats = ForgettingStats(6)
    # outcome of each example at presentations 1..5 (None: not in that presentation)
    seq = {
        0: [1, 0, 1, 0, 1],  # learned, forgotten twice
        1: [0, 0, 1, 1, 1],  # learned late, never forgotten
        2: [0, 0, 0, 0, 0],  # never learned: the maximum
        3: [1, 1, 0, None, 0],  # one event (1 -> 0), then wrong again
        4: [None, 1, None, 0, None],  # one event across a gap in its presentations
        # 5: never presented
    }
    for p in range(5):
        ids = [i for i, outs in seq.items() if outs[p] is not None]
        stats.record(torch.tensor(ids), torch.tensor([bool(seq[i][p]) for i in ids]))
    assert stats.counts(never_learned=50).tolist() == [2, 0, 50, 1, 1, 50]


def test_removal_takes_exactly_the_examples_with_fewest_forgetting_events():
    stats = ForgettingStats(8)
    # example ids in the order first presented: 7, 6, ..., 0
    first = torch.arange(7, -1, -1)
    outcomes = {  # per example: presentation outcomes -> counts
        0: [1, 1, 1],  # 0
        1: [1, 0, 1],  # 1
        2: [0, 0, 0],  # never learned: 3 (= never_learned)
        3: [1, 0, 0],  # 1
        4: [0, 1, 1],  # 0
        5: [1, 0, 1],  # 1
        6: [0, 0, 0],  # never learned
        7: [1, 1, 0],  # 1
    }
    for p in range(3):
        stats.record(first, torch.tensor([bool(outcomes[int(i)][p]) for i in first]))
    candidates = torch.ones(8, dtype=torch.bool)
    assert stats.lowest(candidates, 2, never_learned=3).tolist() == [0, 4]
    # ties at count 1 go in the order first presented (7, 5, 3, 1)
    assert stats.lowest(candidates, 4, never_learned=3).tolist() == [0, 4, 5, 7]
    # removed (non-candidate) examples are not chosen again; never-learned go last
    candidates[[0, 4, 7]] = False
    assert stats.lowest(candidates, 6, never_learned=3).tolist() == [1, 2, 3, 5, 6]
    assert stats.lowest(candidates, 4, never_learned=3).tolist() == [1, 3, 5, 6]


class Presentations(SupervisedPlugin):
    """Records every training presentation (example id, correct) per experience and epoch,
    independently of the strategy's statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.experiences: list[list[list[tuple[int, bool]]]] = []
        self.memory_rows: list[int] = []

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.experiences.append([])

    def before_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        self.experiences[-1].append([])

    def after_forward(self, strategy: Any, **kwargs: Any) -> None:
        start = strategy.mem_rows
        self.memory_rows.append(start)
        pred = strategy.mb_output[start:].argmax(1)
        ids = strategy.mbatch[3].tolist()
        correct = (pred == strategy.mb_y[start:]).tolist()
        self.experiences[-1][-1].extend(zip(ids, correct, strict=True))


def _reference_counts(presentations: list[tuple[int, bool]], never: int) -> dict[int, int]:
    """Toneva counts from a list of (id, correct) in presentation order."""
    history: dict[int, list[bool]] = {}
    for i, ok in presentations:
        history.setdefault(i, []).append(ok)
    return {
        i: sum(a and not b for a, b in pairwise(h)) if any(h) else never for i, h in history.items()
    }


def test_data_removal_in_training_drops_the_least_forgotten_and_never_feeds_them(digits):
    probe = Presentations()
    s = _sparcl(
        plugins=(probe,),
        epochs=5,
        update_every_epochs=2,
        remove_data_epoch=4,
        remove_fraction=0.4,
        lr=0.05,
        mem_size=40,
    )
    sizes = []
    for t in range(2):
        s.train(digits.train_stream[t])
        sizes.append(len(digits.train_stream[t].dataset))
    per_step = [int(0.4 * n / 2) for n in sizes]  # 2 removals (before epochs 2 and 4)
    assert s.data_removal_report() == {
        "train_size_per_experience": sizes,
        "removed_per_experience": [2 * k for k in per_step],
    }
    assert max(probe.memory_rows) == 32  # the second experience replays the memory
    for t, (n, k, epochs) in enumerate(zip(sizes, per_step, probe.experiences, strict=True)):
        assert sorted(i for i, _ in epochs[0]) == list(range(n))  # each example once an epoch
        removed: set[int] = set()
        window: list[tuple[int, bool]] = []
        for e, ep in enumerate(epochs):
            trained = {i for i, _ in ep}
            if e in (2, 4):  # the fewest forgetting events since the last removal go
                counts = _reference_counts(window, never=5)
                order = list(dict.fromkeys(i for i, _ in window))  # first presented first
                ranked = sorted((i for i in order if i not in removed), key=lambda i: counts[i])
                dropped = set(range(n)) - removed - trained
                assert dropped == set(ranked[:k]), (t, e)
                removed |= dropped
                window = []
            assert not removed & trained and len(ep) == n - len(removed)
            window.extend(ep)
        if t == 0:  # the buffer was offered the kept examples only
            memory = {i for exp, i in s.memory.refs if exp == 0}
            assert memory and not memory & removed


# ------------------------------------------------------------------------ TDM
def test_mask_schedule_gives_the_official_sparsities_at_the_official_epochs():
    lower, upper, epochs = [0.75, 0.76, 0.75], [0.74, 0.75, 0.75], [5, 45]
    assert tdm_bounds(0, lower, upper, epochs) == (0.75, 0.74)
    assert tdm_bounds(4, lower, upper, epochs) == (0.75, 0.74)
    assert tdm_bounds(5, lower, upper, epochs) == (0.76, 0.75)
    assert tdm_bounds(40, lower, upper, epochs) == (0.76, 0.75)
    assert tdm_bounds(45, lower, upper, epochs) == (0.75, 0.75)

    s = _sparcl(prune_grad_weight=0.5)
    s.optimizer = torch.optim.SGD(s.model.parameters(), lr=0.1)
    layers = s.sparse_layers
    numel = {n: layer.mask.numel() for n, layer in layers.items()}
    for n, layer in layers.items():  # the start: 25% by magnitude of the initial weights
        w = layer.weight.detach().abs().flatten()
        assert layer.nonzero() == round(0.25 * numel[n])
        assert bool(w[layer.mask.flatten()].min() >= w[~layer.mask.flatten()].max())

    s.update_topology(0)  # prune to 75% (nothing to prune), grow to 74%
    for n, layer in layers.items():
        assert layer.nonzero() == round(0.26 * numel[n])
    g = torch.Generator().manual_seed(3)
    for layer in layers.values():  # trained weights and a last gradient
        layer.weight.data = torch.randn(layer.weight.shape, generator=g) * layer.mask
        layer.weight.grad = torch.randn(layer.weight.shape, generator=g) * layer.mask

    before = {n: (layer.mask.clone(), layer.weight.detach().clone()) for n, layer in layers.items()}
    imp = {n: ly.weight.detach().abs() + 0.5 * ly.weight.grad.abs() for n, ly in layers.items()}
    s.update_topology(5)  # prune to 76% by |w| + 0.5 |g|, regrow at random to 75%
    for n, layer in layers.items():
        mask0, w0 = before[n]
        assert layer.nonzero() == round(0.25 * numel[n])
        kept = layer.mask & mask0 & (layer.weight != 0)
        grown = layer.mask & (layer.weight == 0)
        assert int(kept.sum()) == round(0.24 * numel[n])
        assert int(grown.sum()) == round(0.25 * numel[n]) - round(0.24 * numel[n])
        scores = imp[n][mask0]
        cut = torch.sort(scores, descending=True).values[round(0.24 * numel[n]) - 1]
        assert bool(imp[n][kept].min() >= cut)  # the most important active ones stay
        assert torch.equal(layer.weight[kept], w0[kept])
        assert not (layer.weight[~layer.mask] != 0).any()

    for layer in layers.values():  # grown weights trained a little
        layer.weight.data += 0.01 * layer.mask
        layer.weight.grad = None
    s.update_topology(45)  # prune to 75% (already there): no change, no growth
    for n, layer in layers.items():
        assert layer.nonzero() == round(0.25 * numel[n])


def test_weights_outside_the_masks_are_zero_after_every_step(digits):
    class AfterStep(SupervisedPlugin):
        def __init__(self) -> None:
            super().__init__()
            self.checked = 0

        def after_update(self, strategy: Any, **kwargs: Any) -> None:
            for layer in strategy.sparse_layers.values():
                assert not (layer.weight[~layer.mask] != 0).any()
                assert layer.nonzero() / layer.mask.numel() == pytest.approx(0.26, abs=0.01)
            self.checked += 1

    probe = AfterStep()
    s = _sparcl(plugins=(probe,), epochs=1, lr=0.5)
    before = {n: layer.weight.detach().clone() for n, layer in s.sparse_layers.items()}
    exp = digits.train_stream[0]
    s.train(exp)
    assert probe.checked == -(-len(exp.dataset) // 32)  # every step of the epoch
    for n, layer in s.sparse_layers.items():
        assert not torch.equal(before[n], layer.weight.detach())  # it did train


def test_bad_options_are_one_config_error_line():
    cls = STRATEGIES.get("sparcl")
    with pytest.raises(ConfigError, match="bound_epochs"):
        cls.Config(name="sparcl", lower_bounds=[0.75], upper_bounds=[0.74])
    with pytest.raises(ConfigError, match="upper_bounds"):
        cls.Config(name="sparcl", upper_bounds=[0.74, 0.8, 0.75])
    with pytest.raises(ConfigError, match="remove_fraction"):
        cls.Config(name="sparcl", remove_fraction=1.0)
    with pytest.raises(ConfigError, match=r"dense_layers.*valid names: conv1, conv2, conv3"):
        _sparcl(dense_layers=["stem"])


# ------------------------------------------------------------------------ CLI
def test_cli_run_on_the_wide_resnet_ends_at_a_quarter_density_and_resumes(tmp_path):
    """A short run on the WRN (every part active: mask updates, removals, gradient masks,
    replay) reaches the official density; snapshotted after its first experience's
    checkpoint and resumed, it ends exactly as the uninterrupted run."""
    snapshot = tmp_path / "killed"
    args = [
        "run",
        "scenario=split_digits",
        "scenario.n_experiences=2",
        "backbone=wrn_16_2",
        "strategy=sparcl",
        "strategy.epochs=2",
        "strategy.update_every_epochs=1",
        "strategy.bound_epochs=[1,2]",  # epoch 0: 75% -> 74%; epoch 1: 76% -> 75%
        "strategy.remove_data_epoch=1",
        "strategy.gradient_mask_every=3",
        "tracking=none",
        "progress=false",
        f"runs_dir={tmp_path / 'runs'}",
    ]
    with snapshot_after(1, snapshot):
        assert run_cli(args) == 0
    res = results_of(only_run_dir(tmp_path / "runs"))
    sparsity = res["sparsity"]
    assert sparsity["overall"] == pytest.approx(0.25, abs=0.002)
    layers = sparsity["layers"]
    assert "backbone.conv1" not in layers and len(layers) == 15  # stem dense, 15 masked
    assert all(d == pytest.approx(0.25, abs=0.01) for d in layers.values())
    assert res["efficiency"]["flops_vs_dense"] < 0.5

    assert run_cli(["resume", str(snapshot)]) == 0
    resumed = results_of(snapshot)
    assert resumed["resumed_after_experience"] == 1
    assert resumed["accuracy_matrix"] == res["accuracy_matrix"]
    assert resumed["sparsity"] == sparsity
