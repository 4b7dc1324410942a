"""Our per-experience accuracies agree with Avalanche's own EvaluationPlugin."""

from __future__ import annotations

import pytest
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin

from clbench.models import ClassifierModel
from clbench.pretrain.train import load_micro_vit
from clbench.protocols.class_incremental import run_class_incremental
from clbench.registry import SCENARIOS, STRATEGIES
from clbench.seeding import seed_everything


def test_accuracy_matrix_matches_avalanche_evaluation_plugin(pretrained):
    seed_everything(0)
    build = SCENARIOS.get("split_digits")
    scenario = build(build.Config(n_experiences=5))
    vit = load_micro_vit(pretrained)
    strategy_cls = STRATEGIES.get("finetune")
    cfg = strategy_cls.Config(name="finetune", epochs=2, lr=1e-4)
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])
    strategy = strategy_cls(
        model=ClassifierModel(vit, vit.num_features), cfg=cfg, evaluator=evaluator
    )

    result = run_class_incremental(scenario, strategy)

    history = evaluator.get_all_metrics()
    n = scenario.num_experiences
    for i in range(n):
        key = f"Top1_Acc_Exp/eval_phase/test_stream/Exp{i:03d}"
        theirs = history[key][1]
        assert len(theirs) == n  # one evaluation after each training experience
        ours = [row[i] for row in result.accuracy_matrix]
        assert ours == pytest.approx(theirs, abs=1e-9)
    assert max(result.accuracy_matrix[i][i] for i in range(n)) > 0.9  # it learned something
