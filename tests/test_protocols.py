"""A scenario kind is a plug-in: a third-party kind runs end to end and gets its board."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

from helpers import clbench_with

TOY_KIND = '''
"""A third-party scenario kind: majority-vote chunks (a toy, for the plug-in test).

Its data side (Avalanche, clbench.scenarios.base) is imported where the scenario is built:
``leaderboard publish`` loads the kind for its board only, and needs none of it.
"""
from dataclasses import dataclass

import torch

from clbench.protocols.base import BoardSpec, Column, Protocol, RecordPart


class ChunkLearner:
    """Base of the toy kind's learners."""

    kind = "toy_chunks"
    uses_task_id = False

    def __init__(self, cfg, model):
        self.cfg = cfg
        self.model = model


@dataclass
class MajorityConfig:
    name: str = "majority"
    bias: int = 0


class Majority(ChunkLearner):
    """Toy learner: predicts the most frequent label seen so far (plus a bias)."""

    Config = MajorityConfig

    def __init__(self, cfg, model):
        super().__init__(cfg, model)
        self.counts = torch.zeros(4)

    def predict_and_learn(self, y):
        guess = int(self.counts.argmax()) if self.counts.sum() else self.cfg.bias
        self.counts += torch.bincount(y, minlength=4).float()
        return torch.full_like(y, (guess + self.cfg.bias) % 4)


@dataclass
class ToyChunksConfig:
    name: str = "toy_chunks"
    chunks: int = 3


def toy_chunks(cfg):
    """Toy scenario: chunks of labels, mostly of class 1."""
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.utils.classification_dataset import (
        _as_taskaware_supervised_classification_dataset as wrap,
    )

    from clbench.scenarios.base import LabelledTensors, Scenario

    g = torch.Generator().manual_seed(0)
    chunks = []
    for _ in range(cfg.chunks):
        y = torch.where(torch.rand(20, generator=g) < 0.7, 1, 2).long()
        chunks.append(wrap(LabelledTensors(torch.zeros(20, 1, 16, 16), y)))
    return Scenario(
        name="toy_chunks",
        kind="toy_chunks",
        benchmark=benchmark_from_datasets(test=chunks),
        class_names=["a", "b", "c", "d"],
        input_shape=(1, 16, 16),
    )


toy_chunks.Config = ToyChunksConfig


class ToyProtocol(Protocol):
    """Toy kind: score each chunk's predictions as they are made."""

    kind = "toy_chunks"
    learner = ChunkLearner
    record_fields = ("chunk_scores",)
    board = BoardSpec(
        primary=Column("mean_chunk_score", "mean chunk score"),
        higher_is_better=True,
        costs=(Column("labels_seen", "labels seen", "efficiency", "max", "count"),),
        curve="chunk_score",
        curve_title="Score per chunk",
        curve_x="chunk",
        curve_y="chunk score",
    )

    def build(self, ctx):
        model = ctx.backbone.classifier(ctx.scenario.class_names)
        return ctx.strategy_cls(ctx.typed["strategy"], model)

    def run(self, ctx, learner, resumed=None):
        scores = []
        for exp in ctx.scenario.test_stream:
            y = torch.tensor(exp.dataset.targets)
            scores.append(float((learner.predict_and_learn(y) == y).float().mean()))
        return scores

    def record(self, ctx, learner, result):
        return RecordPart(
            metrics={"mean_chunk_score": sum(result) / len(result)},
            steps=[{"chunk_score": s} for s in result],
            efficiency={"labels_seen": float(learner.counts.sum())},
            fields={"chunk_scores": result},
        )

    def plots(self, record, run_dir):
        path = run_dir / "chunks.txt"
        path.write_text(" ".join(f"{s:.3f}" for s in record["chunk_scores"]))
        return [path]

    def summary(self, record):
        return f"toy chunk scores: {record['chunk_scores']}"
'''


def _install(root: Path) -> None:
    """A dist-info folder with the kind's entry points, as pip would leave it."""
    (root / "toy_kind.py").write_text(textwrap.dedent(TOY_KIND))
    info = root / "toy_kind-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-kind\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[clbench.protocols]\ntoy_chunks = toy_kind:ToyProtocol\n\n"
        "[clbench.scenarios]\ntoy_chunks = toy_kind:toy_chunks\n\n"
        "[clbench.strategies]\nmajority = toy_kind:Majority\n"
    )


def _clbench(args: list[str], root: Path, cwd: Path) -> subprocess.CompletedProcess:
    return clbench_with(args, root, cwd)


def test_a_third_party_scenario_kind_runs_end_to_end_and_gets_its_board(tmp_path):
    root = tmp_path / "site"
    root.mkdir()
    _install(root)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    base = ["run", "scenario=toy_chunks", "strategy=majority", "backbone.pretrained=none"]
    base += [f"tracking.uri={uri}", f"runs_dir={tmp_path / 'runs'}"]

    listed = _clbench(["list"], root, tmp_path)
    assert listed.returncode == 0, listed.stderr
    kinds = [ln for ln in listed.stdout.splitlines() if " toy_chunks " in ln]
    assert any(ln.startswith("kind") and "(from toy-kind)" in ln for ln in kinds), kinds

    ran = _clbench([*base, "strategy.bias=0"], root, tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert "toy chunk scores: [" in ran.stdout  # the kind's own summary
    run_dir = Path(ran.stdout.strip().splitlines()[-1].removeprefix("run directory: "))
    record = json.loads((run_dir / "results.json").read_text())
    assert record["format"] == 2 and record["kind"] == "toy_chunks"
    assert record["tracking"]["status"] == "ok"  # tracked in MLflow
    scores = record["chunk_scores"]
    assert len(scores) == 3 and (run_dir / "chunks.txt").is_file()
    assert record["metrics"]["mean_chunk_score"] == sum(scores) / 3
    # no label 0 in the data at first, then the majority class 1 (70 % of the labels)
    assert scores[0] == 0.0 and scores[1] > 0.5

    out = tmp_path / "boards"
    pub = _clbench(
        ["leaderboard", "publish", "--tracking-uri", uri, "--out", str(out)], root, tmp_path
    )
    assert pub.returncode == 0, pub.stderr
    board = json.loads((out / "toy_chunks.json").read_text())
    assert board["kind"] == "toy_chunks" and board["primary_metric"] == "mean_chunk_score"
    (entry,) = board["entries"]
    assert entry["strategy"] == "majority" and entry["seeds"] == [0]
    assert entry["cost"]["labels_seen"] == 60.0
    assert entry["curve"] == [float(f"{v:.6g}") for v in scores]  # boards keep 6 digits
    md = (out / "toy_chunks.md").read_text()
    assert "mean chunk score" in md and "labels seen" in md
    page = (out / "index.html").read_text()
    assert "Score per chunk" in page and ">chunk</text>" in page and ">chunk score</text>" in page
