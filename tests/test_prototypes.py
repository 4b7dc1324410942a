"""The pretrained-model baselines simplecil and fsa (strategies/prototypes.py) on split_digits
with a tiny backbone (with dropout, so a statistics pass in train mode would show): SimpleCIL
trains nothing and scores the cosine to class means computed here; FSA's LDA logits equal a
numpy computation from the features, its per-experience statistics equal those of all the data
at once, the body changes during the first experience only, the learning-rate milestones; a
checkpoint round trip; config errors; both end to end through the CLI, deterministic."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from avalanche.training.plugins import SupervisedPlugin
from clbench.strategies.prototypes import FSA, LDAHead, SimpleCIL
from torch import nn

from clbench import statefile
from clbench.data import materialise
from clbench.errors import ConfigError
from clbench.models import ClassifierModel
from clbench.registry import SCENARIOS
from helpers import only_run_dir, results_of, run_cli

DIM = 12


@pytest.fixture(scope="module")
def scenario() -> Any:
    build = SCENARIOS.get("split_digits")
    return build(build.Config(n_experiences=5))


def _model() -> ClassifierModel:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(256, DIM), nn.Tanh(), nn.Dropout(0.5))
    return ClassifierModel(backbone, DIM)


def build(cls: type, **options: Any) -> Any:
    cfg = cls.Config(name=cls.__name__.lower(), **options)
    return cls(model=_model(), cfg=cfg, seed=0, n_experiences=5)


def data(scenario: Any, stream: str, experiences: range) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [materialise(getattr(scenario, stream)[e].dataset)[:2] for e in experiences]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


@torch.no_grad()
def features(strategy: Any, x: torch.Tensor) -> np.ndarray:
    backbone = copy.deepcopy(strategy.model.backbone).eval()
    return backbone(x).double().numpy()


@torch.no_grad()
def logits(strategy: Any, x: torch.Tensor) -> np.ndarray:
    strategy.model.eval()
    return strategy.model(x).double().numpy()


def test_simplecil_trains_nothing_and_scores_the_cosine_to_the_class_means(scenario):
    s = build(SimpleCIL)
    before = copy.deepcopy(s.model.backbone.state_dict())
    for e in range(3):
        s.train(scenario.train_stream[e], eval_streams=[])
    assert s.num_trainable_parameters() == 0
    assert not any(p.requires_grad for p in s.model.parameters())
    after = s.model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert s.model.head.num_classes == 6

    x, y = data(scenario, "train_stream", range(3))
    f = features(s, x)
    means = np.stack([f[y.numpy() == c].mean(0) for c in range(6)])
    xt, _ = data(scenario, "test_stream", range(5))
    ft = features(s, xt)
    expected = (ft / np.linalg.norm(ft, axis=1, keepdims=True)) @ (
        means / np.linalg.norm(means, axis=1, keepdims=True)
    ).T
    np.testing.assert_allclose(logits(s, xt), expected, rtol=0, atol=1e-5)
    # inference: the backbone plus one prototype per class
    backbone = sum(p.numel() for p in s.model.backbone.parameters())
    assert s.num_inference_parameters() == backbone + 6 * DIM


def test_fsa_adapts_the_body_on_the_first_experience_only_and_its_lda_is_exact(scenario):
    s = build(FSA, epochs=2, batch_size=64, lr=0.01, milestones=[], dropout=0.2)
    initial = copy.deepcopy(s.model.backbone.state_dict())
    s.train(scenario.train_stream[0], eval_streams=[])
    adapted = copy.deepcopy(s.model.backbone.state_dict())
    assert not torch.equal(initial["1.weight"], adapted["1.weight"])
    assert s.num_trainable_parameters() == 0
    for e in (1, 2, 3):
        s.train(scenario.train_stream[e], eval_streams=[])
    final = s.model.backbone.state_dict()
    assert all(torch.equal(adapted[k], final[k]) for k in adapted)

    # the head against numpy: covariance of all seen features (+ I), class means, LDA
    x, y = data(scenario, "train_stream", range(4))
    f = features(s, x)
    cov = np.cov(f.T, ddof=1) + np.eye(DIM)
    means = np.stack([f[y.numpy() == c].mean(0) for c in range(8)])
    coef = np.linalg.solve(cov, means.T)
    bias = (coef * means.T).sum(0)
    xt, _ = data(scenario, "test_stream", range(5))
    expected = features(s, xt) @ coef - 0.5 * bias
    np.testing.assert_allclose(logits(s, xt), expected, rtol=1e-5, atol=1e-4)

    # statistics accumulated per experience == those of all the data in one update
    once = LDAHead(DIM, ridge=1.0)
    once.grow(8)
    once.update(torch.from_numpy(f), y)
    once.refresh()
    head = s.model.head
    for name in ("count", "total", "outer", "class_sums", "class_counts", "coef", "bias"):
        torch.testing.assert_close(getattr(head, name), getattr(once, name), rtol=1e-9, atol=1e-9)
    assert float(head.count) == len(y)


def test_fsa_without_adaptation_trains_nothing(scenario):
    s = build(FSA, adapt="none", epochs=3)
    before = copy.deepcopy(s.model.backbone.state_dict())
    s.train(scenario.train_stream[0], eval_streams=[])
    assert s.num_trainable_parameters() == 0
    assert all(torch.equal(before[k], v) for k, v in s.model.backbone.state_dict().items())
    assert float(s.model.head.count) == len(scenario.train_stream[0].dataset)


class LearningRates(SupervisedPlugin):
    def __init__(self) -> None:
        super().__init__()
        self.lrs: list[float] = []

    def before_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        self.lrs.append(strategy.optimizer.param_groups[0]["lr"])


def test_fsa_learning_rate_milestones(scenario):
    seen = LearningRates()
    cfg = FSA.Config(name="fsa", epochs=4, batch_size=256, lr=0.02, milestones=[1, 3], gamma=0.5)
    s = FSA(model=_model(), cfg=cfg, seed=0, plugins=[seen])
    s.train(scenario.train_stream[0], eval_streams=[])
    assert seen.lrs == pytest.approx([0.02, 0.01, 0.01, 0.005])
    s.train(scenario.train_stream[1], eval_streams=[])
    assert len(seen.lrs) == 4  # no training loop after the first experience


def test_fsa_checkpoint_round_trip(scenario, tmp_path):
    s = build(FSA, epochs=1)
    for e in range(2):
        s.train(scenario.train_stream[e], eval_streams=[])
    statefile.save(tmp_path / "state.safetensors", s.checkpoint_state())
    fresh = build(FSA, epochs=1)
    fresh.restore_checkpoint_state(statefile.load(tmp_path / "state.safetensors"))
    xt, _ = data(scenario, "test_stream", range(5))
    np.testing.assert_array_equal(logits(fresh, xt), logits(s, xt))
    assert fresh.num_trainable_parameters() == 0
    for e in (s, fresh):  # both go on identically (the body stays frozen)
        e.train(scenario.train_stream[2], eval_streams=[])
    np.testing.assert_array_equal(logits(fresh, xt), logits(s, xt))


def test_config_errors():
    with pytest.raises(ConfigError, match=r"strategy\.adapt"):
        FSA.Config(name="fsa", adapt="film")
    with pytest.raises(ConfigError, match="milestones"):
        FSA.Config(name="fsa", lr_schedule="cosine")
    with pytest.raises(ConfigError, match="pooled features"):
        SimpleCIL(model=nn.Linear(2, 2), cfg=SimpleCIL.Config(name="simplecil"))
    one_class = SCENARIOS.get("split_digits")
    first = one_class(one_class.Config(n_experiences=10)).train_stream[0]
    with pytest.raises(ConfigError, match="two or more classes"):
        build(FSA, epochs=1).train(first, eval_streams=[])
    build(FSA, epochs=1, adapt="none").train(first, eval_streams=[])  # nothing to adapt: fine


FAST = ["backbone.pretrained=none", "tracking=none", "progress=false", "checkpoint=false"]


@pytest.mark.parametrize(
    ("strategy", "extra", "runs"),
    # SimpleCIL draws no random number: one run; FSA's adaptation does: twice, same seed
    [("simplecil", [], 1), ("fsa", ["strategy.epochs=3", "strategy.milestones=[2]"], 2)],
)
def test_end_to_end_and_deterministic(tmp_path, strategy, extra, runs):
    records = []
    for run in range(runs):
        args = ["run", *FAST, f"strategy={strategy}", *extra, f"runs_dir={tmp_path / str(run)}"]
        assert run_cli(args) == 0
        records.append(results_of(only_run_dir(tmp_path / str(run))))
    a = records[0]
    assert all(r["accuracy_matrix"] == a["accuracy_matrix"] for r in records)
    matrix = np.array(a["accuracy_matrix"])
    assert matrix.shape == (5, 5) and np.all(np.triu(matrix, 1) == 0)  # never an unseen class
    assert a["metrics"]["final_accuracy"] > 0.2  # above chance on 10 classes
    steps = a["efficiency"]["train_steps"]
    if strategy == "simplecil":
        assert steps == 0 and a["efficiency"]["trainable_params"] == 0
    else:  # 3 epochs of one batch (<= 256 samples) on the first experience, none after
        assert steps == 3 and a["efficiency"]["trainable_params"] > 0
