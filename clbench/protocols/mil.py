"""The continual multiple-instance-learning protocol (kind ``mil``): tasks of labelled bags.

An experience is a task of bags (a bag is a slide, its instances patch features; a batch
is one bag). After each task every task's test bags are scored, so each value below is a
matrix ``R[t][j]`` (after task t, on task j):

- bag accuracy, unmasked (argmax over every class the head has: the class-incremental
  number) and masked (argmax over task j's own classes: the task-aware number);
- bag AUC both ways (positive class: the task's second class; score: its softmax
  probability over all classes, or over the task's classes) and F1 of the masked
  prediction of that class;
- where instance labels exist, localisation from the aggregator's attention (min-max
  scaled per bag) on the bags that contain key instances: instance AUC, and accuracy,
  F1 and mean per-bag Dice at the threshold that maximises Youden's J.

A task whose classes the head does not have yet scores NaN (``null``). The headline
numbers are the accuracy-matrix metrics of :mod:`clbench.metrics` (task-averaged final
accuracy, average incremental accuracy, forgetting, BWT) on the unmasked and masked
matrices. Definitions and the papers' conventions: docs/protocols.md ("Continual MIL").
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from clbench import metrics
from clbench.errors import ClbenchError
from clbench.progress import ProgressPlugin, StepCounter
from clbench.protocols.base import (
    TRAIN_SECONDS,
    TRAINABLE_PARAMS,
    BoardSpec,
    Column,
    Protocol,
    RecordPart,
    RunContext,
    metric_lines,
)
from clbench.record import RunRecord
from clbench.scenarios.bags import Bags, MILStream
from clbench.seeding import seed_everything
from clbench.strategies.mil import BagLearner

NAN = float("nan")
#: the per-task values of one evaluation, each a matrix in the record
VALUES = (
    "accuracy",
    "accuracy_masked",
    "auc",
    "auc_masked",
    "f1",
    "instance_auc",
    "instance_accuracy",
    "instance_f1",
    "dice",
)
#: bags per task whose attention is kept for the heatmaps (after the last task)
ATTENTION_EXAMPLES = 2
ATTENTION_FILE = "attention_examples.json"


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    return float(roc_auc_score(labels, scores)) if 0 < labels.sum() < len(labels) else NAN


def bag_values(
    logits: list[torch.Tensor], labels: list[int], classes: tuple[int, ...]
) -> dict[str, float]:
    """Bag accuracy (unmasked / masked), AUC both ways and F1 of one task's test bags.

    ``logits``: per bag, over the head's classes; ``classes``: the task's classes (the
    second one is the positive class of the AUC and F1)."""
    n_out = int(logits[0].shape[0]) if logits else 0
    if not logits or max(classes) >= n_out:
        return {k: NAN for k in ("accuracy", "accuracy_masked", "auc", "auc_masked", "f1")}
    z = torch.stack([v.float().cpu() for v in logits])
    y = np.asarray(labels)
    keep = list(classes)
    full = torch.softmax(z, dim=1)
    masked = torch.softmax(z[:, keep], dim=1)
    pred = z.argmax(1).numpy()
    pred_masked = np.asarray(keep)[z[:, keep].argmax(1).numpy()]
    positive = y == classes[-1]
    hit = pred_masked == classes[-1]
    tp = float((hit & positive).sum())
    f1 = 2 * tp / (hit.sum() + positive.sum()) if hit.sum() + positive.sum() else NAN
    return {
        "accuracy": float((pred == y).mean()),
        "accuracy_masked": float((pred_masked == y).mean()),
        "auc": _auc(positive, full[:, classes[-1]].numpy()),
        "auc_masked": _auc(positive, masked[:, -1].numpy()),
        "f1": float(f1),
    }


def scaled(attention: torch.Tensor) -> np.ndarray:
    """Attention min-max scaled to [0, 1] within its bag (a one-instance bag: 1)."""
    a = attention.float().cpu().numpy()
    span = a.max() - a.min()
    return (a - a.min()) / span if span > 0 else np.ones_like(a)


def instance_values(
    attentions: list[torch.Tensor | None], instance_labels: list[torch.Tensor | None]
) -> dict[str, float]:
    """Localisation from attention on the bags with at least one key instance: instance
    AUC, and accuracy, F1 and mean per-bag Dice at the Youden-optimal threshold."""
    scores, truth = [], []
    for a, lab in zip(attentions, instance_labels, strict=True):
        if a is None or lab is None or int(lab.sum()) == 0:
            continue
        scores.append(scaled(a))
        truth.append(lab.cpu().numpy().astype(bool))
    out = {k: NAN for k in ("instance_auc", "instance_accuracy", "instance_f1", "dice")}
    if not scores:
        return out
    s, g = np.concatenate(scores), np.concatenate(truth)
    if g.all():
        return out
    out["instance_auc"] = float(roc_auc_score(g, s))
    fpr, tpr, thresholds = roc_curve(g, s)
    threshold = float(thresholds[int(np.argmax(tpr - fpr))])
    p = s >= threshold
    tp = float((p & g).sum())
    out["instance_accuracy"] = float((p == g).mean())
    out["instance_f1"] = 2 * tp / float(p.sum() + g.sum())
    out["dice"] = float(
        np.mean(
            [
                2
                * float(((si >= threshold) & gi).sum())
                / float((si >= threshold).sum() + gi.sum())
                for si, gi in zip(scores, truth, strict=True)
            ]
        )
    )
    return out


@dataclass
class MILResult:
    """Every task's values after each task, and what training and inference cost."""

    #: rows[t][j]: the VALUES of task j after training task t
    rows: list[list[dict[str, float]]] = field(default_factory=list)
    train_seconds: list[float] = field(default_factory=list)
    train_steps: list[int] = field(default_factory=list)
    trainable_params: list[int] = field(default_factory=list)
    eval_seconds: float = 0.0
    eval_bags: int = 0
    #: attention of a few test bags after the last task (for the heatmaps)
    examples: list[dict[str, Any]] = field(default_factory=list)


def evaluate_task(
    strategy: BagLearner, bags: Bags, classes: tuple[int, ...], keep: int = 0
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The VALUES of one task's test bags, and the attention of its first ``keep`` bags
    that have coordinates (for the heatmaps)."""
    logits, attentions, inst, examples = [], [], [], []
    for i in range(len(bags)):
        x, coords = bags.bag(i)  # one read of a file-backed bag: features and coordinates
        z, a = strategy.bag_outputs(x)
        if not bool(torch.isfinite(z).all()):
            raise ClbenchError(
                "logits became non-finite while evaluating; lower strategy.lr or check the data"
            )
        logits.append(z)
        attentions.append(a)
        inst.append(bags.instance_labels(i))
        if len(examples) < keep and a is not None and coords is not None:
            lab = bags.instance_labels(i)
            examples.append(
                {
                    "bag": bags.names[i],
                    "label": bags.targets[i],
                    "coords": coords.tolist(),
                    "attention": a.float().cpu().tolist(),
                    "instance_labels": lab.tolist() if lab is not None else None,
                }
            )
    values = bag_values(logits, bags.targets, classes) | instance_values(attentions, inst)
    return values, examples


def run_mil(
    stream: MILStream, train_stream: Any, strategy: BagLearner, on_task: Any = None
) -> MILResult:
    """Train task by task; after each, score every task's test bags."""
    result = MILResult()
    n = len(stream.task_names)
    strategy.loader_workers = stream.loader_workers
    for t, experience in enumerate(train_stream):
        steps = StepCounter(unit="task")
        strategy.plugins.append(steps)  # type: ignore[attr-defined]
        t0 = time.perf_counter()
        strategy.train(experience, eval_streams=[])  # type: ignore[attr-defined]
        result.train_seconds.append(time.perf_counter() - t0)
        strategy.plugins.remove(steps)  # type: ignore[attr-defined]
        result.train_steps.append(steps.count)
        result.trainable_params.append(steps.trainable)
        last = t == n - 1
        row = []
        t0 = time.perf_counter()
        for j in range(n):
            values, examples = evaluate_task(
                strategy, stream.test[j], stream.task_classes[j], ATTENTION_EXAMPLES if last else 0
            )
            row.append(values)
            result.eval_bags += len(stream.test[j])
            result.examples += [e | {"task": stream.task_names[j]} for e in examples]
        result.eval_seconds += time.perf_counter() - t0
        result.rows.append(row)
        if on_task is not None:
            on_task(t, row)
    return result


def matrix(result: MILResult, key: str) -> list[list[float]]:
    return [[v[key] for v in row] for row in result.rows]


def seen_mean(row: list[dict[str, float]], key: str, t: int) -> float:
    """Mean of ``key`` over tasks 0..t (NaN entries skipped)."""
    vals = [row[j][key] for j in range(t + 1) if math.isfinite(row[j][key])]
    return float(np.mean(vals)) if vals else NAN


def summary_metrics(result: MILResult) -> dict[str, float | None]:
    """The headline numbers of a run (NaN -> None)."""
    acc, masked = matrix(result, "accuracy"), matrix(result, "accuracy_masked")
    last = result.rows[-1]
    n = len(last)
    out: dict[str, float] = {
        "final_accuracy": metrics.final_accuracy_task_avg(acc),
        "final_accuracy_masked": metrics.final_accuracy_task_avg(masked),
        "average_incremental_accuracy": float(
            np.mean([seen_mean(result.rows[t], "accuracy", t) for t in range(n)])
        ),
        "forgetting": metrics.forgetting(acc),
        "forgetting_masked": metrics.forgetting(masked),
        "bwt": metrics.bwt(acc),
        "plasticity": metrics.plasticity(acc),
    }
    for key in ("auc", "auc_masked", "f1", "instance_auc", "instance_accuracy", "instance_f1"):
        out[f"final_{key}"] = seen_mean(last, key, n - 1)
    out["final_dice"] = seen_mean(last, "dice", n - 1)
    return {k: (v if math.isfinite(v) else None) for k, v in out.items()}


HEADLINE = (
    "final_accuracy",
    "final_accuracy_masked",
    "average_incremental_accuracy",
    "forgetting",
    "bwt",
    "final_auc",
    "final_auc_masked",
    "final_f1",
    "final_instance_auc",
    "final_dice",
)


class MultipleInstance(Protocol):
    """Continual MIL: tasks of bags, bag- and instance-level matrices."""

    kind = "mil"
    learner = BagLearner
    record_fields = ("setting", "task_names", "task_classes", "matrices")
    board = BoardSpec(
        primary=Column("final_accuracy", "bag accuracy (final)"),
        higher_is_better=True,
        secondary=(
            Column("final_accuracy_masked", "masked acc"),
            Column("final_auc", "AUC"),
            Column("forgetting", "forgetting"),
            Column("final_instance_auc", "instance AUC"),
        ),
        costs=(
            TRAINABLE_PARAMS,
            TRAIN_SECONDS,
            Column("seconds_per_bag", "s/bag", "efficiency", "mean", "ms"),
            Column("peak_rss_mb", "peak MB", "efficiency", "max", "rate"),
        ),
        details=(
            Column("average_incremental_accuracy", "A_bar"),
            Column("bwt", "BWT"),
            Column("final_auc_masked", "masked AUC"),
            Column("final_f1", "F1"),
            Column("final_dice", "Dice"),
        ),
        curve="accuracy",
        curve_title="Bag accuracy on the tasks seen so far",
        curve_x="after task",
        curve_y="bag accuracy",
    )

    def build(self, ctx: RunContext) -> BagLearner:
        scenario = ctx.scenario
        model = ctx.backbone.classifier(scenario.class_names)
        seed_everything(ctx.seed)
        return ctx.strategy_cls(
            model=model,
            cfg=ctx.typed["strategy"],
            seed=ctx.seed,
            device=ctx.device,
            plugins=[ProgressPlugin(scenario.num_experiences, enabled=ctx.progress)],
            in_memory=False,
            n_experiences=scenario.num_experiences,
        )

    def run(self, ctx: RunContext, learner: BagLearner, resumed: Any = None) -> MILResult:
        stream: MILStream = ctx.scenario.stream

        def on_task(t: int, row: list[dict[str, float]]) -> None:
            if ctx.progress:
                acc = seen_mean(row, "accuracy", t)
                masked = seen_mean(row, "accuracy_masked", t)
                inst = seen_mean(row, "instance_auc", t)
                print(
                    f"  after task {t + 1} ({stream.task_names[t]}): bag accuracy {acc:.3f}  "
                    f"masked {masked:.3f}  instance AUC {inst:.3f}",
                    file=sys.stderr,
                )

        return run_mil(stream, ctx.scenario.train_stream, learner, on_task)

    def record(self, ctx: RunContext, learner: BagLearner, result: MILResult) -> RecordPart:
        stream: MILStream = ctx.scenario.stream
        steps = []
        for t, row in enumerate(result.rows):
            step = {k: seen_mean(row, k, t) for k in VALUES}
            step["train_seconds"] = result.train_seconds[t]
            steps.append({k: (v if math.isfinite(v) else None) for k, v in step.items()})
        total_steps = sum(result.train_steps)
        total = sum(result.train_seconds)
        (ctx.run_dir / ATTENTION_FILE).write_text(json.dumps(result.examples))
        return RecordPart(
            metrics=summary_metrics(result),
            steps=steps,
            efficiency={
                "trainable_params": max(result.trainable_params),
                "inference_params": learner.num_inference_parameters(),  # type: ignore[attr-defined]
                "train_steps": total_steps,
                "train_seconds": total,
                "seconds_per_bag": total / max(total_steps, 1),
                "eval_seconds_per_bag": result.eval_seconds / max(result.eval_bags, 1),
            },
            fields={
                "setting": stream.setting,
                "task_names": list(stream.task_names),
                "task_classes": [list(c) for c in stream.task_classes],
                "matrices": {
                    k: [[_null(v) for v in row] for row in matrix(result, k)] for k in VALUES
                },
            },
        )

    def plots(self, record: RunRecord, run_dir: Path) -> list[Path]:
        from clbench import plots  # matplotlib: imported when a run plots

        title = f"{record.strategy} on {record.scenario} (seed {record.seed})"
        m = record.fields["matrices"]
        nan = [[NAN if v is None else v for v in row] for row in m["accuracy"]]
        out = [plots.accuracy_heatmap(nan, run_dir / "accuracy_matrix.png", title)]
        curve = [s["accuracy"] if s["accuracy"] is not None else NAN for s in record.steps]
        out.append(plots.accuracy_curve(curve, run_dir / "bag_accuracy.png", title))
        examples_file = run_dir / ATTENTION_FILE
        if examples_file.exists():
            examples = json.loads(examples_file.read_text())
            if examples:
                out.append(plots.attention_maps(examples, run_dir / "attention_maps.png", title))
        return out

    def summary(self, record: RunRecord) -> str:
        """Per task: bag accuracy (unmasked / masked) and instance AUC after the last task."""
        m = record.fields["matrices"]
        lines = ["task                       acc  masked     AUC  inst AUC"]
        for j, name in enumerate(record.fields["task_names"]):
            cells = " ".join(
                _cell(m[k][-1][j]) for k in ("accuracy", "accuracy_masked", "auc", "instance_auc")
            )
            lines.append(f"{name[:22]:<22} {cells}")
        lines += metric_lines(record.metrics, HEADLINE)
        e = record.efficiency
        lines.append(f"{'trainable params':>30}: {e['trainable_params']}")
        lines.append(f"{'train seconds':>30}: {e['train_seconds']:.1f}")
        return "\n".join(lines)


def _null(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _cell(v: float | None) -> str:
    return f"{v:7.3f}" if v is not None and math.isfinite(v) else "    n/a"
