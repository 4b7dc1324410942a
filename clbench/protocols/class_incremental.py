"""The class-incremental protocol: train on each experience, evaluate on every test experience.

After each training experience the strategy is evaluated on the whole test stream
(seen and unseen experiences) through Avalanche's eval loop; a plugin records the
logits so that task-agnostic and task-aware accuracy come from one forward pass.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from avalanche.training.plugins import SupervisedPlugin

from clbench import metrics
from clbench.errors import ClbenchError
from clbench.scenarios.base import Scenario
from clbench.strategies.base import CLStrategy, mask_logits

NAN = float("nan")


class PredictionRecorder(SupervisedPlugin):
    """Collects, per evaluated experience, task-agnostic and task-aware hits."""

    def __init__(self, classes_per_experience: list[list[int]]) -> None:
        super().__init__()
        self.classes = classes_per_experience
        self.hits: dict[int, list[torch.Tensor]] = {}

    def reset(self) -> None:
        self.hits = {}

    def after_eval_iteration(self, strategy: Any, **kwargs: Any) -> None:
        exp = int(strategy.experience.current_experience)
        logits, y = strategy.mb_output.detach(), strategy.mb_y
        n_out = logits.shape[1]
        if n_out == 0:
            agnostic = torch.zeros_like(y, dtype=torch.bool)
        else:
            agnostic = logits.argmax(1) == y
        known = [c for c in self.classes[exp] if c < n_out]
        if known:
            aware = mask_logits(logits, known).argmax(1) == y
        else:
            aware = torch.full_like(y, -1)  # cannot be computed: no unit for these classes
        self.hits.setdefault(exp, []).append(torch.stack([agnostic.long(), aware.long()]))

    def accuracies(self, n_experiences: int) -> tuple[list[float], list[float]]:
        agnostic, aware = [], []
        for e in range(n_experiences):
            h = torch.cat(self.hits[e], dim=1)
            n = h.shape[1]
            agnostic.append(int(h[0].sum()) / n)
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
) -> ClassIncrementalResult:
    """Run ``strategy`` over ``scenario`` and return the accuracy matrices.

    ``on_checkpoint(t, result)`` is called after experience ``t`` is trained and evaluated
    (the strategy's protocol plugins detached); ``resume_from`` is such a result: its
    finished experiences are skipped.
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

    passes = BackbonePasses(strategy.model)
    train_samples = eval_samples = train_passes = eval_passes = 0

    def evaluate() -> tuple[list[float], list[float]]:
        nonlocal eval_samples, eval_passes
        recorder.reset()
        before = passes.count
        strategy.eval(test_stream)
        eval_passes += passes.count - before
        eval_samples += sum(res.test_sizes)
        return recorder.accuracies(n)

    try:
        if start > 0:
            pass  # resumed: the initial evaluation is in ``res`` already
        elif strategy.model.head.num_classes > 0:
            res.initial_accuracy, res.initial_accuracy_task_aware = evaluate()
        else:  # no output unit yet: nothing can be predicted
            res.initial_accuracy, res.initial_accuracy_task_aware = [0.0] * n, [NAN] * n
        for t, experience in enumerate(scenario.train_stream):
            if t < start:
                continue
            steps = StepCounter()
            strategy.plugins.append(steps)
            t0 = time.perf_counter()
            before = passes.count
            strategy.train(experience, eval_streams=[])
            res.train_seconds.append(time.perf_counter() - t0)
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


class BackbonePasses:
    """Counts the samples that go through the image tower's stem: every timm
    ``patch_embed`` and open_clip ``visual.conv1`` of ``model`` (one pass of a ViT image
    tower = one sample through its stem, so a prompt learner's query pass counts too)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.count = 0
        self.stems = [
            m
            for name, m in model.named_modules()
            if name.endswith("patch_embed") or name.endswith("visual.conv1")
        ]
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


class StepCounter(SupervisedPlugin):
    """Counts optimiser steps, notes the trainable parameters, guards against a diverging loss."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.samples = 0
        self.trainable = 0

    def before_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        self.trainable = max(self.trainable, strategy.num_trainable_parameters())

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        self.count += 1
        self.samples += int(strategy.mb_y.shape[0])
        loss = float(strategy.loss.detach())
        if not math.isfinite(loss):
            raise ClbenchError(
                f"training loss became {loss} at experience "
                f"{strategy.experience.current_experience}, step {self.count}; "
                "lower strategy.lr or check the data"
            )
