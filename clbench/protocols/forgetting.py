"""The continual-forgetting protocol (kind ``forgetting``): a stream of erasure requests.

The learner starts from a classifier trained on every class. Each experience is an
erasure request: forget some classes, keep the rest (classes forgotten by earlier
requests must stay forgotten). After each request the whole test set is predicted once
and scored per class group:

- Acc_r: accuracy on the retained classes;
- Acc_f: accuracy on the classes this request forgets (wanted: about 0);
- Acc_o: accuracy on the classes earlier requests forgot (wanted: about 0, no relapse);
- Drop_f = Acc_f before the request - Acc_f after it;
- H = 2 Drop_f Acc_r / (Drop_f + Acc_r) (0 when nothing was forgotten, Drop_f <= 0);
- the drop of Acc_r against the original model on the same retained classes.

Requests follow GS-LoRA's split (:func:`gs_lora_split`). Definitions and the papers'
conventions: docs/protocols.md ("Continual forgetting").
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from clbench.data import materialise, read_batches
from clbench.errors import ClbenchError
from clbench.progress import ProgressPlugin, StepCounter
from clbench.protocols.base import (
    INFERENCE_PARAMS,
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
from clbench.scenarios.base import Scenario
from clbench.seeding import seed_everything
from clbench.strategies.erasure import ErasureRequest, ErasureStrategy

NAN = float("nan")
#: GS-LoRA's class-order seed (its split shuffles range(C) with it)
GS_LORA_ORDER_SEED = 1337


def gs_lora_split(
    num_classes: int,
    first: int,
    per_request: int,
    n_requests: int,
    seed: int = GS_LORA_ORDER_SEED,
    n_missing: int = 0,
) -> tuple[list[int], list[ErasureRequest]]:
    """GS-LoRA's erasure requests: the class order and one request per step.

    ``order`` = range(``num_classes``) shuffled by Python's ``random`` seeded with
    ``seed``. With P = ``per_request``, request t (0-based) forgets
    ``order[first - t P : first - t P + P]``, keeps ``order[0 : first - t P]`` and has
    ``order[first - t P + P :]`` forgotten earlier; so ``first + P == num_classes`` (the
    first request forgets the last P classes of the order). ``n_missing`` (GS-LoRA++'s
    missing-class setting): the last ``n_missing`` retained classes of each request (in
    class order) have no training data.
    """
    if first + per_request != num_classes or per_request < 1:
        raise ValueError(
            f"first ({first}) + per_request ({per_request}) must equal the number of classes "
            f"({num_classes}): the first request forgets the last per_request classes"
        )
    if not (n_requests > 0 and (n_requests - 1) * per_request < first):
        raise ValueError(
            f"{n_requests} requests of {per_request} classes leave no retained class out of "
            f"{num_classes}: at most {(first - 1) // per_request + 1} requests"
        )
    order = list(range(num_classes))
    random.Random(seed).shuffle(order)  # the official code: random.seed(SEED); random.shuffle
    requests = []
    for t in range(n_requests):
        start = first - t * per_request
        remain = order[:start]
        if n_missing >= len(remain):
            raise ValueError(
                f"{n_missing} missing classes leave no retained class with data at request "
                f"{t + 1} ({len(remain)} retained)"
            )
        requests.append(
            ErasureRequest(
                forget=tuple(order[start : start + per_request]),
                remain=tuple(remain),
                old=tuple(order[start + per_request :]),
                missing=tuple(remain[len(remain) - n_missing :]) if n_missing else (),
            )
        )
    return order, requests


def harmonic(drop_f: float, acc_r: float) -> float:
    """H = 2 Drop_f Acc_r / (Drop_f + Acc_r); 0 when nothing was forgotten (Drop_f <= 0)."""
    if not (math.isfinite(drop_f) and math.isfinite(acc_r)):
        return NAN
    if drop_f <= 0 or acc_r <= 0:
        return 0.0
    return 2 * drop_f * acc_r / (drop_f + acc_r)


@dataclass(frozen=True)
class ErasureStream:
    """What the protocol needs beyond the benchmark: the requests and the start model.

    The benchmark's train stream has one experience per request (its training data); its
    test stream one experience, the whole test set; its ``source`` stream (optional) the
    data the start model is trained on when the backbone comes without one
    (``source``: a :class:`clbench.protocols.tta.SourceRecipe`), unless ``start_checkpoint``
    names a classifier file. ``loader_workers``: processes reading a lazy scenario's
    samples (``Scenario.in_memory`` false).
    """

    requests: tuple[ErasureRequest, ...]
    class_order: tuple[int, ...]
    source: Any = None  # SourceRecipe
    start_checkpoint: str | None = None
    loader_workers: int = 0


@dataclass
class ForgettingResult:
    """Per-class accuracy after each request, and what training cost."""

    #: row 0: the original model; row t: after request t; one column per class
    class_accuracy: list[list[float]] = field(default_factory=list)
    class_sizes: list[int] = field(default_factory=list)
    train_seconds: list[float] = field(default_factory=list)
    train_steps: list[int] = field(default_factory=list)
    trainable_params: list[int] = field(default_factory=list)


def group_accuracy(row: Sequence[float], sizes: Sequence[int], classes: Sequence[int]) -> float:
    """Sample-weighted accuracy over ``classes`` (NaN if they have no test sample)."""
    n = sum(sizes[c] for c in classes)
    if n == 0:
        return NAN
    return sum(row[c] * sizes[c] for c in classes) / n


def request_values(
    result: ForgettingResult, requests: Sequence[ErasureRequest]
) -> list[dict[str, float]]:
    """Acc_r, Acc_f, Acc_o, Drop_f, H and the retained-accuracy drop of every request."""
    rows, sizes = result.class_accuracy, result.class_sizes
    out = []
    for t, req in enumerate(requests[: len(rows) - 1]):
        before, after, original = rows[t], rows[t + 1], rows[0]
        acc_r = group_accuracy(after, sizes, req.remain)
        acc_f = group_accuracy(after, sizes, req.forget)
        acc_f_before = group_accuracy(before, sizes, req.forget)
        drop_f = acc_f_before - acc_f
        original_r = group_accuracy(original, sizes, req.remain)
        out.append(
            {
                "acc_r": acc_r,
                "acc_f": acc_f,
                "acc_o": group_accuracy(after, sizes, req.old),
                "acc_f_before": acc_f_before,
                "drop_f": drop_f,
                "H": harmonic(drop_f, acc_r),
                "acc_r_original": original_r,
                "acc_r_drop": original_r - acc_r,
                "acc_missing": group_accuracy(after, sizes, req.missing),
                "train_seconds": result.train_seconds[t],
            }
        )
    return out


def group_matrix(
    result: ForgettingResult, requests: Sequence[ErasureRequest]
) -> tuple[list[str], list[list[float]]]:
    """Accuracy per class group (columns: the classes of each request's forget set, then
    those no request forgets) after each request (rows; row 0 the original model)."""
    groups = [list(r.forget) for r in requests]
    kept = list(requests[-1].remain)
    names = [f"forget {t + 1}" for t in range(len(requests))]
    if kept:
        groups.append(kept)
        names.append("retained")
    matrix = [
        [group_accuracy(row, result.class_sizes, g) for g in groups]
        for row in result.class_accuracy
    ]
    return names, matrix


def summary_metrics(steps: Sequence[dict[str, float]]) -> dict[str, float | None]:
    """The final request's values, and H and Acc_o averaged over requests."""
    last = steps[-1]
    out: dict[str, float | None] = {
        k: last[k] for k in ("H", "acc_r", "acc_f", "acc_o", "drop_f", "acc_r_drop")
    }
    out["mean_H"] = float(np.mean([s["H"] for s in steps]))
    olds = [s["acc_o"] for s in steps if math.isfinite(s["acc_o"])]
    out["max_acc_o"] = max(olds) if olds else None
    for k, v in out.items():
        if v is not None and not math.isfinite(v):
            out[k] = None
    return out


@torch.no_grad()
def class_accuracy(
    strategy: ErasureStrategy,
    x: torch.Tensor | Dataset,
    y: torch.Tensor,
    num_classes: int,
    batch: int,
) -> list[float]:
    """Accuracy of ``strategy.predict`` per class (NaN for a class with no sample).

    ``x``: the inputs, or a lazy dataset (labels ``y``) read batch by batch with
    ``strategy.loader_workers`` processes."""
    hits = torch.zeros(num_classes)
    counts = torch.bincount(y, minlength=num_classes).float()
    starts = range(0, len(y), batch)
    if isinstance(x, torch.Tensor):
        inputs: Any = (x[i : i + batch] for i in starts)
    else:
        plan = [range(i, min(i + batch, len(y))) for i in starts]
        inputs = (b[0] for b in read_batches(x, plan, strategy.loader_workers))
    for i, xb in zip(starts, inputs, strict=True):
        logits = strategy.predict(xb.to(strategy.device))
        if not bool(torch.isfinite(logits).all()):
            raise ClbenchError(
                "logits became non-finite while evaluating; lower strategy.lr or check the data"
            )
        ok = (logits.argmax(1).cpu() == y[i : i + batch]).float()
        hits.index_add_(0, y[i : i + batch], ok)
    acc = hits / counts.clamp(min=1)
    acc[counts == 0] = NAN
    return acc.tolist()


def run_forgetting(
    scenario: Scenario,
    strategy: ErasureStrategy,
    on_request: Callable[[int, dict[str, float]], None] | None = None,
) -> ForgettingResult:
    """Serve every erasure request of ``scenario`` with ``strategy``; returns the scores."""
    stream: ErasureStream = scenario.stream
    test = scenario.test_stream[0].dataset
    if scenario.in_memory:
        x, y = materialise(test)[:2]
    else:  # read lazily at every evaluation (a real test set need not fit in memory)
        x, y = test, torch.as_tensor(list(test.targets), dtype=torch.long)
    strategy.loader_workers = stream.loader_workers  # lazy samples: reading processes
    c = len(scenario.class_names)
    batch = strategy.cfg.eval_batch_size
    result = ForgettingResult(class_sizes=torch.bincount(y, minlength=c).tolist())
    result.class_accuracy.append(class_accuracy(strategy, x, y, c, batch))
    for t, experience in enumerate(scenario.train_stream):
        strategy.request = stream.requests[t]
        steps = StepCounter(unit="request")
        strategy.plugins.append(steps)
        t0 = time.perf_counter()
        strategy.train(experience, eval_streams=[])
        result.train_seconds.append(time.perf_counter() - t0)
        strategy.plugins.remove(steps)
        result.train_steps.append(steps.count)
        result.trainable_params.append(steps.trainable)
        result.class_accuracy.append(class_accuracy(strategy, x, y, c, batch))
        if on_request is not None:
            on_request(t, request_values(result, stream.requests)[t])
    return result


HEADLINE = ("H", "acc_r", "acc_f", "acc_o", "drop_f", "acc_r_drop", "mean_H", "max_acc_o")


class Forgetting(Protocol):
    """Continual forgetting: erasure requests scored by Acc_r, Acc_f, Acc_o and H."""

    kind = "forgetting"
    learner = ErasureStrategy
    record_fields = (
        "class_order",
        "requests",
        "class_accuracy",
        "class_sizes",
        "group_names",
        "group_accuracy",
    )
    board = BoardSpec(
        primary=Column("H", "H (final request)"),
        higher_is_better=True,
        secondary=(
            Column("acc_r", "Acc_r"),
            Column("acc_f", "Acc_f"),
            Column("acc_o", "Acc_o"),
            Column("mean_H", "mean H"),
        ),
        costs=(
            TRAINABLE_PARAMS,
            TRAIN_SECONDS,
            INFERENCE_PARAMS,
        ),
        details=(
            Column("acc_r_drop", "Acc_r drop vs original"),
            Column("max_acc_o", "max Acc_o"),
            Column("seconds_per_step", "s/step", "efficiency", "mean", "ms"),
        ),
        curve="H",
        curve_title="H after each erasure request",
        curve_x="after request",
        curve_y="H",
    )

    def build(self, ctx: RunContext) -> ErasureStrategy:
        from clbench.pretrain.source import source_classifier, start_classifier

        scenario = ctx.scenario
        stream: ErasureStream = scenario.stream
        if stream.start_checkpoint:
            model = start_classifier(ctx.backbone, stream.start_checkpoint, scenario.class_names)
        else:
            model = source_classifier(ctx.backbone, scenario, progress=ctx.progress)
        seed_everything(ctx.seed)  # a start model trained just now must not shift the run
        return ctx.strategy_cls(
            model=model,
            cfg=ctx.typed["strategy"],
            seed=ctx.seed,
            device=ctx.device,
            plugins=[ProgressPlugin(scenario.num_experiences, enabled=ctx.progress)],
            in_memory=scenario.in_memory,
            n_experiences=scenario.num_experiences,
        )

    def run(self, ctx: RunContext, learner: ErasureStrategy, resumed: Any = None) -> Any:
        def on_request(t: int, v: dict[str, float]) -> None:
            if ctx.progress:
                print(
                    f"  after request {t + 1}: Acc_r {v['acc_r']:.3f}  Acc_f {v['acc_f']:.3f}  "
                    f"Acc_o {v['acc_o']:.3f}  H {v['H']:.3f}",
                    file=sys.stderr,
                )

        return run_forgetting(ctx.scenario, learner, on_request)

    def record(
        self, ctx: RunContext, learner: ErasureStrategy, result: ForgettingResult
    ) -> RecordPart:
        stream: ErasureStream = ctx.scenario.stream
        steps = request_values(result, stream.requests)
        names, matrix = group_matrix(result, stream.requests)
        total_steps = sum(result.train_steps)
        total = sum(result.train_seconds)
        return RecordPart(
            metrics=summary_metrics(steps),
            steps=[{k: (v if math.isfinite(v) else None) for k, v in s.items()} for s in steps],
            efficiency={
                "trainable_params": max(result.trainable_params),
                "inference_params": learner.num_inference_parameters(),
                "train_steps": total_steps,
                "train_seconds": total,
                "seconds_per_step": total / max(total_steps, 1),
            },
            fields={
                "class_order": list(stream.class_order),
                "requests": [r.as_dict() for r in stream.requests],
                "class_accuracy": [_nulls(r) for r in result.class_accuracy],
                "class_sizes": result.class_sizes,
                "group_names": names,
                "group_accuracy": [_nulls(r) for r in matrix],
            },
        )

    def plots(self, record: RunRecord, run_dir: Path) -> list[Path]:
        from clbench import plots  # matplotlib: imported when a run plots

        title = f"{record.strategy} on {record.scenario} (seed {record.seed})"
        path = run_dir / "forgetting_accuracies.png"
        series = {
            "Acc_r (retained)": [s["acc_r"] for s in record.steps],
            "Acc_f (this request)": [s["acc_f"] for s in record.steps],
            "Acc_o (earlier requests)": [s["acc_o"] for s in record.steps],
        }
        plots.request_curves(series, path, title)
        return [path]

    def summary(self, record: RunRecord) -> str:
        """Per-request Acc_r, Acc_f, Acc_o, Drop_f and H, then the headline metrics."""
        lines = ["request   Acc_r   Acc_f   Acc_o  Drop_f       H"]
        for t, s in enumerate(record.steps, 1):
            cells = " ".join(_cell(s[k]) for k in ("acc_r", "acc_f", "acc_o", "drop_f", "H"))
            lines.append(f"{t:>7} {cells}")
        lines += metric_lines(record.metrics, HEADLINE)
        e = record.efficiency
        lines.append(f"{'trainable params':>30}: {e['trainable_params']}")
        lines.append(f"{'train seconds':>30}: {e['train_seconds']:.1f}")
        return "\n".join(lines)


def _nulls(row: Sequence[float]) -> list[float | None]:
    return [v if math.isfinite(v) else None for v in row]


def _cell(v: float | None) -> str:
    return f"{v:7.3f}" if v is not None and math.isfinite(v) else "    n/a"
