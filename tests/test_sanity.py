"""Sanity that can fail: pretraining helps, fine-tuning forgets, joint learns, LoRA forgets less.

These run the embedded default (split_digits, pretrained micro ViT, shipped strategy
defaults) exactly as `clbench run strategy=NAME` does.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from clbench.backbones.micro_vit import build_micro_vit
from clbench.pretrain.train import load_micro_vit
from clbench.registry import SCENARIOS
from helpers import only_run_dir, results_of, run_cli

LORA_FAMILY = ("lora", "olora", "sdlora", "inflora", "dyrank", "inc_rank")


def _probe_accuracy(vit) -> float:
    """Linear probe on frozen CLS features over all 10 digits (the scenario's split)."""
    build = SCENARIOS.get("split_digits")
    scenario = build(build.Config(n_experiences=1))
    feats = {}
    for name, stream in (("train", scenario.train_stream), ("test", scenario.test_stream)):
        ds = stream[0].dataset
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        y = np.array([int(ds[i][1]) for i in range(len(ds))])
        with torch.no_grad():
            feats[name] = (vit.eval()(x).numpy(), y)
    scaler = StandardScaler().fit(feats["train"][0])
    clf = LogisticRegression(max_iter=3000).fit(
        scaler.transform(feats["train"][0]), feats["train"][1]
    )
    return float(clf.score(scaler.transform(feats["test"][0]), feats["test"][1]))


def test_pretrained_features_beat_random_init(pretrained):
    torch.manual_seed(0)
    random_acc = _probe_accuracy(build_micro_vit())
    pre_acc = _probe_accuracy(load_micro_vit(pretrained))
    print(f"linear probe on 10 digits: pretrained {pre_acc:.3f}, random init {random_acc:.3f}")
    assert pre_acc >= 0.85
    assert pre_acc >= random_acc + 0.10


@pytest.fixture(scope="module")
def default_runs(pretrained, tmp_path_factory):
    root = tmp_path_factory.mktemp("sanity")
    out = {}
    for name in ("finetune", "joint", *LORA_FAMILY):
        args = [
            "run",
            f"strategy={name}",
            "tracking=none",
            "progress=false",
            f"runs_dir={root / name}",
        ]
        assert run_cli(args) == 0
        out[name] = results_of(only_run_dir(root / name))["metrics"]
    return out


def test_finetune_forgets_heavily(default_runs):
    assert default_runs["finetune"]["forgetting"] >= 0.5


def test_joint_reaches_high_final_accuracy(default_runs):
    assert default_runs["joint"]["final_accuracy"] >= 0.9


def test_lora_forgets_less_than_finetune(default_runs):
    assert default_runs["lora"]["forgetting"] < default_runs["finetune"]["forgetting"]


@pytest.mark.parametrize("name", LORA_FAMILY[1:])
def test_lora_family_forgets_less_than_finetune(default_runs, name):
    # inc_rank is task-incremental (the task id picks its selector): compare task-aware
    key = "task_aware/forgetting" if name == "inc_rank" else "forgetting"
    assert default_runs[name][key] < default_runs["finetune"][key]
