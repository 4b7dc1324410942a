"""The class-incremental protocol (kind ``class_incremental``): train on each experience,
evaluate on every test experience.

After each training experience the strategy is evaluated on the whole test stream
(seen and unseen experiences) through Avalanche's eval loop; a plugin records the
logits so that task-agnostic and task-aware accuracy come from one forward pass. The
run checkpoints after every experience, so a killed run resumes. The training FLOPs
(:mod:`clbench.flops`, counted during ``train`` only) and the density of a sparse
strategy's masks are recorded beside the dense equivalent. Metric definitions
and the toolbox conventions they match: docs/protocols.md ("Class-incremental").
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from avalanche.training.plugins import SupervisedPlugin

from clbench import metrics, statefile
from clbench.config import to_container
from clbench.errors import ClbenchError, ConfigError, first_line
from clbench.flops import TrainingFlops
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
from clbench.record import RunRecord, write_text_atomic
from clbench.scenarios.base import Scenario
from clbench.seeding import rng_state, set_rng_state
from clbench.strategies.base import CLStrategy, mask_logits

NAN = float("nan")


class PredictionRecorder(SupervisedPlugin):
    """Collects, per evaluated experience, task-agnostic and task-aware hits, and whether
    the model had an output unit for any of the experience's classes."""

    def __init__(self, classes_per_experience: list[list[int]]) -> None:
        super().__init__()
        self.classes = classes_per_experience
        self.hits: dict[int, list[torch.Tensor]] = {}
        self.covered: dict[int, bool] = {}

    def reset(self) -> None:
        self.hits = {}
        self.covered = {}

    def after_eval_iteration(self, strategy: Any, **kwargs: Any) -> None:
        exp = int(strategy.experience.current_experience)
        logits, y = strategy.mb_output.detach(), strategy.mb_y
        n_out = logits.shape[1]
        if n_out == 0:
            agnostic = torch.zeros_like(y, dtype=torch.bool)
        else:
            agnostic = logits.argmax(1) == y
        known = [c for c in self.classes[exp] if c < n_out]
        self.covered[exp] = bool(known)
        if known:
            aware = mask_logits(logits, known).argmax(1) == y
        else:
            aware = torch.full_like(y, -1)  # cannot be computed: no unit for these classes
        self.hits.setdefault(exp, []).append(torch.stack([agnostic.long(), aware.long()]))

    def accuracies(
        self, n_experiences: int, initial: bool = False
    ) -> tuple[list[float], list[float]]:
        """Task-agnostic and task-aware accuracy per test experience. ``initial``: the
        evaluation before any training, where an experience with no output unit for any of
        its classes is no measurement (NaN) task-agnostic too (its 0 is by construction)."""
        agnostic, aware = [], []
        for e in range(n_experiences):
            h = torch.cat(self.hits[e], dim=1)
            n = h.shape[1]
            unmeasured = initial and not self.covered.get(e, True)
            agnostic.append(NAN if unmeasured else int(h[0].sum()) / n)
            aware.append(NAN if bool((h[1] < 0).any()) else int(h[1].sum()) / n)
        return agnostic, aware


@dataclass
class ClassIncrementalResult:
    """Everything the protocol measured."""

    accuracy_matrix: list[list[float]] = field(default_factory=list)
    accuracy_matrix_task_aware: list[list[float]] = field(default_factory=list)
    initial_accuracy: list[float] = field(default_factory=list)
    initial_accuracy_task_aware: list[float] = field(default_factory=list)
    test_sizes: list[int] = field(default_factory=list)
    classes_per_experience: list[list[int]] = field(default_factory=list)
    train_seconds: list[float] = field(default_factory=list)
    eval_seconds: list[float] = field(default_factory=list)
    train_steps: list[int] = field(default_factory=list)
    trainable_params: list[int] = field(default_factory=list)
    #: image-tower passes (samples through the patch embedding) per training sample seen
    #: and per prediction made; NaN when the backbone has no recognised stem
    passes_per_train_sample: float = NAN
    passes_per_prediction: float = NAN
    #: training FLOPs per experience, counted (:mod:`clbench.flops`: linear and convolution
    #: layers, forward and backward, at the densities of the masks) and their dense equivalent
    train_flops_per_experience: list[int] = field(default_factory=list)
    train_flops_dense_per_experience: list[int] = field(default_factory=list)
    #: the same summed over the run, per layer name
    train_flops_per_layer: dict[str, int] = field(default_factory=dict)
    train_flops_dense_per_layer: dict[str, int] = field(default_factory=dict)
    #: the density the model's masks reached after the latest experience
    #: (``Learner.sparsity_report()``: overall, nonzero, total, layers); None: a dense model
    sparsity: dict[str, Any] | None = None
    #: experiences finished before this run resumed from a checkpoint (None: not resumed)
    resumed_after: int | None = None

    @property
    def flops_counted(self) -> bool:
        """Whether every finished experience's FLOPs were counted (a checkpoint written
        before clbench counted them has none for the experiences it holds)."""
        return len(self.train_flops_per_experience) == len(self.accuracy_matrix)

    @property
    def train_flops(self) -> float:
        """Training FLOPs of the run (NaN if not every experience was counted)."""
        return float(sum(self.train_flops_per_experience)) if self.flops_counted else NAN

    @property
    def train_flops_dense(self) -> float:
        """The dense equivalent of :attr:`train_flops` (NaN if not counted)."""
        return float(sum(self.train_flops_dense_per_experience)) if self.flops_counted else NAN

    def metrics(self) -> dict[str, float]:
        out = metrics.class_incremental_summary(
            self.accuracy_matrix, self.test_sizes, self.initial_accuracy
        )
        aware = metrics.class_incremental_summary(
            self.accuracy_matrix_task_aware, self.test_sizes, self.initial_accuracy_task_aware
        )
        out.update({f"task_aware/{k}": v for k, v in aware.items()})
        return out


StepCallback = Callable[[int, list[float], list[float]], None]


def run_class_incremental(
    scenario: Scenario,
    strategy: CLStrategy,
    on_step: StepCallback | None = None,
    *,
    resume_from: ClassIncrementalResult | None = None,
    on_checkpoint: Callable[[int, ClassIncrementalResult], None] | None = None,
    stems: list[torch.nn.Module] | None = None,
) -> ClassIncrementalResult:
    """Run ``strategy`` over ``scenario`` and return the accuracy matrices.

    ``on_checkpoint(t, result)`` is called after experience ``t`` is trained and evaluated
    (the strategy's protocol plugins detached); ``resume_from`` is such a result: its
    finished experiences are skipped. ``stems`` are the modules whose forward counts one
    backbone pass per sample (``Backbone.pass_modules``); none: passes are not counted.
    """
    recorder = PredictionRecorder(scenario.classes_per_experience)
    test_stream = scenario.test_stream
    n = len(test_stream)
    res = resume_from or ClassIncrementalResult(
        test_sizes=[len(e.dataset) for e in test_stream],
        classes_per_experience=scenario.classes_per_experience,
    )
    start = len(res.accuracy_matrix)
    strategy.plugins.append(recorder)

    passes = BackbonePasses(stems or [])
    train_samples = eval_samples = train_passes = eval_passes = 0

    def evaluate(initial: bool = False) -> tuple[list[float], list[float]]:
        nonlocal eval_samples, eval_passes
        recorder.reset()
        before = passes.count
        strategy.eval(test_stream)
        eval_passes += passes.count - before
        eval_samples += sum(res.test_sizes)
        return recorder.accuracies(n, initial=initial)

    try:
        if start > 0:
            pass  # resumed: the initial evaluation is in ``res`` already
        elif strategy.model.head.num_classes > 0:
            res.initial_accuracy, res.initial_accuracy_task_aware = evaluate(initial=True)
        else:  # no output unit yet: nothing is predicted, so nothing is measured (FWT n/a)
            res.initial_accuracy, res.initial_accuracy_task_aware = [NAN] * n, [NAN] * n
        for t, experience in enumerate(scenario.train_stream):
            if t < start:
                continue
            steps = StepCounter()
            strategy.plugins.append(steps)
            t0 = time.perf_counter()
            before = passes.count
            # attached around the training only (not the evaluation); the layers are looked
            # up at each forward, so a head grown or a mask injected in train() is counted
            flops = TrainingFlops(strategy.model)
            try:
                strategy.train(experience, eval_streams=[])
            finally:
                flops.close()
            res.train_seconds.append(time.perf_counter() - t0)
            add_flops(res, flops)
            res.sparsity = strategy.sparsity_report()
            train_passes += passes.count - before
            train_samples += steps.samples
            strategy.plugins.remove(steps)
            res.train_steps.append(steps.count)
            res.trainable_params.append(steps.trainable)
            t0 = time.perf_counter()
            agnostic, aware = evaluate()
            res.eval_seconds.append(time.perf_counter() - t0)
            res.accuracy_matrix.append(agnostic)
            res.accuracy_matrix_task_aware.append(aware)
            if on_step is not None:
                on_step(t, agnostic, aware)
            if on_checkpoint is not None:
                strategy.plugins.remove(recorder)
                passes.close()
                try:  # the checkpoint holds no protocol hook or plugin
                    on_checkpoint(t, res)
                finally:
                    strategy.plugins.append(recorder)
                    passes.attach()
    finally:
        strategy.plugins.remove(recorder)
        passes.close()
    if passes.found:
        res.passes_per_train_sample = train_passes / max(train_samples, 1)
        res.passes_per_prediction = eval_passes / max(eval_samples, 1)
    return res


def add_flops(res: ClassIncrementalResult, flops: TrainingFlops) -> None:
    """Append one experience's counted training FLOPs to ``res``."""
    res.train_flops_per_experience.append(round(flops.flops))
    res.train_flops_dense_per_experience.append(round(flops.dense_flops))
    for name, v in flops.layers.items():
        res.train_flops_per_layer[name] = res.train_flops_per_layer.get(name, 0) + round(v)
    for name, v in flops.dense_layers.items():
        dense = res.train_flops_dense_per_layer
        dense[name] = dense.get(name, 0) + round(v)


class BackbonePasses:
    """Counts the samples that go through the backbone's stem (``Backbone.stem``: one pass
    of a ViT image tower = one sample through its patch embedding, so a prompt learner's
    query pass counts too)."""

    def __init__(self, stems: list[torch.nn.Module]) -> None:
        self.count = 0
        self.stems = stems
        self.found = bool(self.stems)
        self.handles: list[Any] = []
        self.attach()

    def _hook(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self.count += int(args[0].shape[0])

    def attach(self) -> None:
        self.handles = [m.register_forward_hook(self._hook) for m in self.stems]

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


HEADLINE = (
    "final_accuracy",
    "final_accuracy_task_avg",
    "average_incremental_accuracy",
    "forgetting",
    "forgetting_incl_final",
    "bwt",
    "fwt",
    "plasticity",
)
#: board labels of the two forgetting conventions (docs/protocols.md): Chaudhry's max over
#: the rows before the final one, and the PILOT / mammoth max that includes the final row
FORGETTING_LABEL = "forgetting (max excl. final row)"
FORGETTING_INCL_FINAL_LABEL = "forgetting (max incl. final row: PILOT, mammoth)"
CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_INFO = "checkpoint.json"
#: what clbench before the data-only checkpoint wrote (a pickle): refused, never loaded
LEGACY_CHECKPOINT = "checkpoint.pt"


class ClassIncremental(Protocol):
    """Class-incremental learning: the accuracy matrix over training experiences."""

    kind = "class_incremental"
    learner = CLStrategy
    resumable = True
    # required when a record is read; the FLOP and sparsity fields (train_flops_*, sparsity)
    # are written too but not required, so records written before them stay readable
    record_fields = (
        "classes_per_experience",
        "test_sizes",
        "accuracy_matrix",
        "accuracy_matrix_task_aware",
        "initial_accuracy",
        "initial_accuracy_task_aware",
    )
    board = BoardSpec(
        primary=Column("final_accuracy", "final accuracy"),
        higher_is_better=True,
        secondary=(
            Column("average_incremental_accuracy", "avg incr acc"),
            Column("forgetting", FORGETTING_LABEL),
            Column("forgetting_incl_final", FORGETTING_INCL_FINAL_LABEL),
            Column("task_aware/final_accuracy", "TA final acc"),
        ),
        costs=(
            TRAINABLE_PARAMS,
            Column("seconds_per_step", "s/step", "efficiency", "mean", "ms"),
            Column("passes_per_prediction", "passes/pred", "efficiency"),
            Column("density", "density", "efficiency"),
            Column("train_gflops", "train GFLOPs", "efficiency"),
            Column("flops_vs_dense", "FLOPs vs dense", "efficiency"),
            TRAIN_SECONDS,
        ),
        details=(
            Column("task_aware/forgetting", f"TA {FORGETTING_LABEL}"),
            INFERENCE_PARAMS,
            Column("passes_per_train_sample", "passes/train sample", "efficiency"),
            Column("train_gflops_dense", "dense-equivalent train GFLOPs", "efficiency"),
            Column("peak_rss_mb", "peak RSS MB", "efficiency", "max", "rate"),
        ),
        curve="accuracy_seen",
        curve_title="Accuracy on the seen experiences",
        curve_x="after experience",
        curve_y="accuracy on seen classes",
    )

    def build(self, ctx: RunContext) -> CLStrategy:
        scenario = ctx.scenario
        check_loss_mask(
            getattr(ctx.typed.get("strategy"), "loss_mask", None),
            scenario.classes_per_experience,
            scenario.name,
            "n_experiences" in ctx.cfg.scenario,
        )
        return ctx.strategy_cls(
            model=ctx.backbone.classifier(scenario.class_names),
            cfg=ctx.typed["strategy"],
            seed=ctx.seed,
            device=ctx.device,
            plugins=[ProgressPlugin(scenario.num_experiences, enabled=ctx.progress)],
            in_memory=scenario.in_memory,
            n_experiences=scenario.num_experiences,
        )

    def run(
        self,
        ctx: RunContext,
        learner: CLStrategy,
        resumed: ClassIncrementalResult | None = None,
    ) -> ClassIncrementalResult:
        def on_step(t: int, agnostic: list[float], aware: list[float]) -> None:
            if ctx.progress:
                seen = " ".join(f"{a:.3f}" for a in agnostic[: t + 1])
                print(
                    f"  after experience {t + 1}: accuracy on seen experiences {seen}",
                    file=sys.stderr,
                )

        def on_checkpoint(t: int, result: ClassIncrementalResult) -> None:
            save_checkpoint(ctx, learner, result)

        result = run_class_incremental(
            ctx.scenario,
            learner,
            on_step=on_step,
            resume_from=resumed,
            on_checkpoint=on_checkpoint if ctx.checkpoint else None,
            stems=ctx.backbone.pass_modules(learner.model),
        )
        result.resumed_after = None if resumed is None else resumed.resumed_after
        return result

    def resume(self, ctx: RunContext) -> tuple[CLStrategy, ClassIncrementalResult]:
        return load_checkpoint(ctx)

    def record(
        self, ctx: RunContext, learner: CLStrategy, result: ClassIncrementalResult
    ) -> RecordPart:
        steps_total = sum(result.train_steps)
        train_total = sum(result.train_seconds)
        per_step = []
        for t, row in enumerate(result.accuracy_matrix):
            sizes = result.test_sizes[: t + 1]
            seen = sum(a * n for a, n in zip(row[: t + 1], sizes, strict=True)) / sum(sizes)
            per_step.append(
                {
                    "accuracy_seen": seen,
                    "accuracy_current": row[t],
                    "train_seconds": result.train_seconds[t],
                    # not "train_gflops": in MLflow a step's value would hide the run's total
                    "experience_train_gflops": flops_at(result, t),
                }
            )
        fields: dict[str, Any] = {
            "classes_per_experience": result.classes_per_experience,
            "test_sizes": result.test_sizes,
            "accuracy_matrix": result.accuracy_matrix,
            "accuracy_matrix_task_aware": result.accuracy_matrix_task_aware,
            "initial_accuracy": result.initial_accuracy,
            "initial_accuracy_task_aware": result.initial_accuracy_task_aware,
        }
        if result.resumed_after is not None:
            fields["resumed_after_experience"] = result.resumed_after
        fields.update(
            {
                "train_flops_per_experience": result.train_flops_per_experience,
                "train_flops_dense_per_experience": result.train_flops_dense_per_experience,
                "train_flops_per_layer": result.train_flops_per_layer,
                "train_flops_dense_per_layer": result.train_flops_dense_per_layer,
                "sparsity": result.sparsity,
            }
        )
        dense = result.train_flops_dense
        efficiency: dict[str, float | int | None] = {
            "train_gflops": result.train_flops / 1e9,
            "train_gflops_dense": dense / 1e9,
            "flops_vs_dense": result.train_flops / dense if dense > 0 else NAN,
        }
        if result.sparsity is not None:
            efficiency["density"] = float(result.sparsity["overall"])
        return RecordPart(
            metrics=result.metrics(),
            steps=per_step,
            efficiency={
                "trainable_params": max(result.trainable_params),
                "inference_params": learner.num_inference_parameters(),
                "train_steps": steps_total,
                "seconds_per_step": train_total / max(steps_total, 1),
                "passes_per_train_sample": result.passes_per_train_sample,
                "passes_per_prediction": result.passes_per_prediction,
                "train_seconds": train_total,
                "eval_seconds": sum(result.eval_seconds),
                **efficiency,
            },
            fields=fields,
        )

    def plots(self, record: RunRecord, run_dir: Path) -> list[Path]:
        from clbench import plots  # matplotlib: imported when a run plots

        title = f"{record.strategy} on {record.scenario} (seed {record.seed})"
        heatmap, curve = run_dir / "accuracy_matrix.png", run_dir / "accuracy_curve.png"
        plots.accuracy_heatmap(record["accuracy_matrix"], heatmap, title)
        plots.accuracy_curve([s["accuracy_seen"] for s in record.steps], curve, title)
        return [heatmap, curve]

    def summary(self, record: RunRecord) -> str:
        """The accuracy matrix and the headline metrics as text."""
        a = record["accuracy_matrix"]
        n = len(a[0])
        lines = ["accuracy matrix R[t][i] (rows: after experience t, columns: test experience i)"]
        lines.append("      " + " ".join(f"{j + 1:>6}" for j in range(n)))
        for i, row in enumerate(a):
            lines.append(f"{i + 1:>5} " + " ".join(f"{v:6.3f}" for v in row))
        lines += metric_lines(record.metrics, HEADLINE)
        e = record.efficiency
        lines.append(f"{'trainable params':>30}: {e['trainable_params']}")
        lines.append(f"{'train seconds':>30}: {e['train_seconds']:.1f}")
        gflops, ratio = e.get("train_gflops"), e.get("flops_vs_dense")
        if isinstance(gflops, float) and math.isfinite(gflops):
            lines.append(f"{'train GFLOPs':>30}: {gflops:.3f} ({ratio:.3f} of dense)")
        if e.get("density") is not None:
            lines.append(f"{'density':>30}: {e['density']:.4f}")
        return "\n".join(lines)

    def finished(self, run_dir: Path) -> None:
        # finished: the record is the result
        for name in (CHECKPOINT, CHECKPOINT_INFO, LEGACY_CHECKPOINT):
            (run_dir / name).unlink(missing_ok=True)


def flops_at(result: ClassIncrementalResult, t: int) -> float:
    """Training GFLOPs of experience ``t`` (NaN if not counted)."""
    if not result.flops_counted:
        return NAN
    return result.train_flops_per_experience[t] / 1e9


def check_loss_mask(
    loss_mask: str | None,
    classes_per_experience: list[list[int]],
    scenario: str,
    has_n_experiences: bool = False,
) -> None:
    """One ConfigError line if ``loss_mask`` is ``current`` and an experience holds a single
    class: the cross-entropy over that one logit is 0, so the experience trains nothing."""
    if loss_mask != "current":
        return
    single = [t + 1 for t, c in enumerate(classes_per_experience) if len(c) == 1]
    if not single:
        return
    if len(single) == len(classes_per_experience):
        where = f"every experience of scenario {scenario!r} holds one class"
    else:
        where = f"experience {', '.join(map(str, single))} of scenario {scenario!r} holds one class"
    fewer = " (scenario.n_experiences)" if has_n_experiences else ""
    raise ConfigError(
        f"strategy.loss_mask=current trains nothing here: {where}, and a cross-entropy over "
        f"the current experience's one logit is 0; use strategy.loss_mask=seen, or fewer "
        f"experiences{fewer} so that each holds two or more classes"
    )


def save_checkpoint(ctx: RunContext, strategy: CLStrategy, result: ClassIncrementalResult) -> None:
    """Atomically write the run's state after an experience (then a small JSON beside it).

    The checkpoint is data (:mod:`clbench.statefile`: tensors in safetensors, the rest
    JSON): the strategy's :meth:`~CLStrategy.checkpoint_state`, the results so far,
    every RNG state and the run's config. Nothing in it is executed on resume.
    """
    done = len(result.accuracy_matrix)
    state = {
        "config": to_container(ctx.cfg),
        "experiences_done": done,
        "strategy": strategy.checkpoint_state(),
        "result": dataclasses.asdict(result),
        "rng": rng_state(),
        "sweep_id": ctx.sweep_id,
    }
    statefile.save(ctx.run_dir / CHECKPOINT, state)
    info = {"experiences_done": done, "of": len(result.test_sizes)}
    write_text_atomic(ctx.run_dir / CHECKPOINT_INFO, json.dumps(info) + "\n")


def load_checkpoint(ctx: RunContext) -> tuple[CLStrategy, ClassIncrementalResult]:
    """The strategy and results so far of ``ctx.run_dir``'s checkpoint; RNGs restored and
    ``ctx.sweep_id`` set from it.

    The strategy is rebuilt from the run's config, then given the checkpoint's state
    (:meth:`~CLStrategy.restore_checkpoint_state`).
    """
    run_dir = ctx.run_dir
    path = run_dir / CHECKPOINT
    if not path.is_file():
        if (run_dir / "results.json").is_file():
            raise ClbenchError(f"nothing to resume: {run_dir} has finished (results.json)")
        if (run_dir / LEGACY_CHECKPOINT).is_file():
            raise ClbenchError(
                f"{run_dir / LEGACY_CHECKPOINT} is a checkpoint of an older clbench (a pickle, "
                "which clbench no longer loads); start the run again"
            )
        raise ClbenchError(
            f"nothing to resume in {run_dir}: no checkpoint (the run stopped before its "
            "first experience ended); start it again"
        )
    state = statefile.load(path, device=ctx.device)
    try:
        if state.get("config") != to_container(ctx.cfg):
            raise ClbenchError(
                f"the checkpoint in {run_dir} was made with another configuration; "
                "resume with the run's own config (clbench resume RUN_DIR)"
            )
        strategy = ClassIncremental().build(ctx)
        strategy.restore_checkpoint_state(state["strategy"])
        result = ClassIncrementalResult(**state["result"])
        set_rng_state(state["rng"])
    except ClbenchError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise ClbenchError(
            f"{path} does not fit this run ({type(e).__name__}: {first_line(e)}); "
            "start the run again"
        ) from None
    ctx.sweep_id = state.get("sweep_id")
    result.resumed_after = len(result.accuracy_matrix)
    print(f"resuming {run_dir} after experience {state['experiences_done']}", file=sys.stderr)
    return strategy, result
