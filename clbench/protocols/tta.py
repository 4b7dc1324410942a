"""The online continual test-time-adaptation protocol (kind ``test_time``).

One pass over the domain sequence. Each domain's samples are shuffled with a generator
seeded by the run's seed and cut into test batches; the strategy's prediction for a
batch is scored when it is made (before anything is learned from a later batch). In
``continual`` mode the model is reset only before the first domain, in
``reset_each_shift`` before every domain. Afterwards the adapted model predicts the
clean test set (if the scenario has one): how much of the source task is kept.
Definitions of every reported value: docs/protocols.md ("Continual test-time adaptation").
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from clbench.adapters.tta import SavedTensorMeter, state_bytes
from clbench.data import materialise
from clbench.errors import ClbenchError
from clbench.pretrain.source import SourceRecipe
from clbench.protocols.base import (
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
from clbench.strategies.tta import TTAStrategy

MODES = ("continual", "reset_each_shift")
MB = 1024 * 1024
#: a logit beyond this magnitude means the model diverged: a classifier's logits are tens
#: (a source model's, CLIP's scaled cosines); far below it float32 softmax is already
#: exactly one-hot, so entropy gradients vanish while the weights keep growing (Tent at
#: lr 1e9 reaches 1e10 with every value finite)
LOGIT_LIMIT = 1e6


@dataclass(frozen=True)
class DomainStream:
    """What the online protocol and the test-time strategies need from a scenario."""

    domains: tuple[str, ...]  # the name of each test experience, in stream order
    mode: str = "continual"  # continual | reset_each_shift
    batch_size: int = 64  # test batch
    value_range: tuple[float, float] = (0.0, 1.0)  # of the model inputs (augmentations clamp)
    flip_preserves_label: bool = True  # whether a horizontal flip keeps an image's class
    source: SourceRecipe | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown test-time mode {self.mode!r}; valid: {', '.join(MODES)}")


@dataclass
class TTAResult:
    """Online errors per domain and what the adaptation cost."""

    mode: str
    domains: list[str]
    domain_sizes: list[int]
    online_error: list[float] = field(default_factory=list)
    clean_accuracy_before: float | None = None
    clean_accuracy_after: float | None = None
    adapt_seconds: float = 0.0
    steps: int = 0
    backward_cache_bytes: int = 0
    state_bytes: int = 0
    cuda_peak_bytes: int | None = None

    def metrics(self) -> dict[str, float | None]:
        """Headline metrics: the mean online error over domains, and clean accuracy kept."""
        before, after = self.clean_accuracy_before, self.clean_accuracy_after
        n = sum(self.domain_sizes)
        wrong = sum(e * s for e, s in zip(self.online_error, self.domain_sizes, strict=True))
        return {
            "mean_online_error": statistics.fmean(self.online_error),
            "online_error_all_samples": wrong / n,
            "clean_accuracy_before": before,
            "clean_accuracy_after": after,
            "clean_accuracy_drop": None if before is None or after is None else before - after,
        }


def _batches(
    data: Dataset, batch_size: int, generator: torch.Generator, in_memory: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The domain's samples in a seeded random order, in test batches."""
    order = torch.randperm(len(data), generator=generator)
    if in_memory:
        x, y = materialise(data)[:2]
        x, y = x[order], y[order]
        for i in range(0, len(order), batch_size):
            yield x[i : i + batch_size], y[i : i + batch_size]
        return
    loader = DataLoader(Subset(data, order.tolist()), batch_size=batch_size, shuffle=False)
    for batch in loader:
        yield batch[0], batch[1]


def check_logits(logits: torch.Tensor, strategy: Any, where: str) -> None:
    """One ClbenchError line if ``logits`` hold a NaN, an infinity or a value beyond
    :data:`LOGIT_LIMIT` (one reduction and one device sync per batch)."""
    if logits.numel() == 0:
        return
    peak = float(logits.detach().abs().amax())  # NaN propagates through amax
    if peak <= LOGIT_LIMIT:
        return
    adapts = getattr(strategy, "optimizer", None) is not None
    hint = "lower strategy.lr or check the data" if adapts else "check the data and the model"
    if not math.isfinite(peak):
        what = f"logits became {peak}"  # nan or inf
    else:
        what = f"logits reached {peak:.3g} (beyond {LOGIT_LIMIT:.0e}: diverged)"
    raise ClbenchError(f"{what} {where}; {hint}")


@torch.no_grad()
def clean_accuracy(
    strategy: Any, data: Dataset, batch_size: int, in_memory: bool, when: str = ""
) -> float:
    """Accuracy of the strategy's current predictions (no adaptation) on clean data;
    ``when`` (e.g. "after the stream") names the pass in a divergence error."""
    hits = n = 0
    g = torch.Generator().manual_seed(0)
    where = " ".join(filter(None, ("on the clean test set", when)))
    for b, (x, y) in enumerate(_batches(data, batch_size, g, in_memory), 1):
        logits = strategy.predict(x.to(strategy.device))
        check_logits(logits, strategy, f"{where}, batch {b}")
        pred = logits.argmax(1).cpu()
        hits += int((pred == y).sum())
        n += len(y)
    return hits / max(n, 1)


def run_tta(
    scenario: Scenario,
    strategy: Any,
    seed: int,
    mode: str | None = None,
    batch_size: int | None = None,
    on_domain: Callable[[int, str, float], None] | None = None,
) -> TTAResult:
    """Adapt online along the scenario's domains; returns the scored result.

    A NaN, infinite or diverged logit (see :func:`check_logits`) stops the run with one
    ClbenchError line naming the domain and the batch (1-based): a strategy's loss going
    non-finite shows in its logits on the next batch at the latest, or in the clean pass
    after the stream.
    """
    spec: DomainStream = scenario.stream
    mode = mode or spec.mode
    batch_size = batch_size or spec.batch_size
    stream = list(scenario.test_stream)
    domains = list(spec.domains)
    result = TTAResult(mode=mode, domains=domains, domain_sizes=[len(e.dataset) for e in stream])
    clean = None
    if "clean" in scenario.benchmark.streams:
        clean = scenario.benchmark.streams["clean"][0].dataset
        result.clean_accuracy_before = clean_accuracy(
            strategy, clean, batch_size, scenario.in_memory, "before the stream"
        )
    meter = SavedTensorMeter(*strategy.modules())
    cuda = strategy.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(strategy.device)
    generator = torch.Generator().manual_seed(seed)
    for t, exp in enumerate(stream):
        if t == 0 or mode == "reset_each_shift":
            strategy.reset()
        wrong = 0
        batches = _batches(exp.dataset, batch_size, generator, scenario.in_memory)
        for b, (x, y) in enumerate(batches, 1):
            start = time.perf_counter()
            with meter.measure():
                logits = strategy.adapt(x.to(strategy.device))
            pred = logits.argmax(1).cpu()
            if cuda:
                torch.cuda.synchronize(strategy.device)
            result.adapt_seconds += time.perf_counter() - start
            check_logits(logits, strategy, f"at domain {t + 1} ({domains[t]}), batch {b}")
            result.steps += 1
            wrong += int((pred != y).sum())
        result.online_error.append(wrong / result.domain_sizes[t])
        if on_domain is not None:
            on_domain(t, domains[t], result.online_error[-1])
    result.backward_cache_bytes = meter.peak
    result.state_bytes = state_bytes(*strategy.modules(), *strategy.state_tensors())
    if cuda:
        result.cuda_peak_bytes = int(torch.cuda.max_memory_allocated(strategy.device))
    if clean is not None:
        result.clean_accuracy_after = clean_accuracy(
            strategy, clean, batch_size, scenario.in_memory, "after the stream"
        )
    return result


class TestTimeAdaptation(Protocol):
    """Continual test-time adaptation: online error along a stream of shifted domains."""

    __test__ = False  # not a pytest test class
    kind = "test_time"
    learner = TTAStrategy
    record_fields = ("mode", "domains", "domain_sizes", "online_error", "method_stats")
    board = BoardSpec(
        primary=Column("mean_online_error", "mean online error"),
        higher_is_better=False,
        secondary=(Column("clean_accuracy_after", "clean acc after"),),
        costs=(
            TRAINABLE_PARAMS,
            Column("images_per_second", "images/s", "efficiency", "mean", "rate"),
            Column("adapt_memory_mb", "adapt memory MiB", "efficiency"),
        ),
        details=(
            Column("backward_cache_mb", "backward cache MiB", "efficiency"),
            Column("state_mb", "state MiB", "efficiency"),
        ),
        curve="online_error",
        curve_title="Online error per domain",
        curve_x="domain (stream order)",
        curve_y="online error",
    )

    def build(self, ctx: RunContext) -> TTAStrategy:
        from clbench.pretrain.source import source_classifier

        model = source_classifier(ctx.backbone, ctx.scenario, progress=ctx.progress)
        seed_everything(ctx.seed)  # a source model trained just now must not shift it
        strategy = ctx.strategy_cls(
            model=model,
            cfg=ctx.typed["strategy"],
            seed=ctx.seed,
            device=ctx.device,
            stream=ctx.scenario.stream,
        )
        t0 = time.perf_counter()
        source = ctx.scenario.benchmark.streams.get("source")
        strategy.setup(source[0].dataset if source is not None else None)
        strategy.setup_seconds = time.perf_counter() - t0
        return strategy

    def run(self, ctx: RunContext, learner: TTAStrategy, resumed: Any = None) -> TTAResult:
        def on_domain(t: int, domain: str, error: float) -> None:
            if ctx.progress:
                print(f"  domain {t + 1:>2} {domain:<22} online error {error:.3f}", file=sys.stderr)

        return run_tta(ctx.scenario, learner, seed=ctx.seed, on_domain=on_domain)

    def record(self, ctx: RunContext, learner: TTAStrategy, result: TTAResult) -> RecordPart:
        images = sum(result.domain_sizes)
        return RecordPart(
            metrics=result.metrics(),
            steps=[{"online_error": e} for e in result.online_error],
            efficiency={
                "trainable_params": learner.num_trainable_parameters(),
                "inference_params": learner.num_inference_parameters(),
                "adapt_steps": result.steps,
                "adapt_seconds": result.adapt_seconds,
                "seconds_per_step": result.adapt_seconds / max(result.steps, 1),
                "images_per_second": images / max(result.adapt_seconds, 1e-9),
                "setup_seconds": getattr(learner, "setup_seconds", 0.0),
                "backward_cache_mb": result.backward_cache_bytes / MB,
                "state_mb": result.state_bytes / MB,
                "adapt_memory_mb": (result.backward_cache_bytes + result.state_bytes) / MB,
                "cuda_peak_mb": None
                if result.cuda_peak_bytes is None
                else result.cuda_peak_bytes / MB,
            },
            fields={
                "mode": result.mode,
                "domains": result.domains,
                "domain_sizes": result.domain_sizes,
                "online_error": result.online_error,
                "method_stats": learner.stats(),
            },
        )

    def plots(self, record: RunRecord, run_dir: Path) -> list[Path]:
        from clbench import plots  # matplotlib: imported when a run plots

        title = f"{record.strategy} on {record.scenario} (seed {record.seed})"
        path = run_dir / "online_error.png"
        plots.online_error_bars(record["domains"], record["online_error"], path, title)
        return [path]

    def summary(self, record: RunRecord) -> str:
        """Online error per domain, the mean, clean accuracy kept, and the cost."""
        lines = [f"online error per domain ({record['mode']})"]
        for d, e in zip(record["domains"], record["online_error"], strict=True):
            lines.append(f"  {d:<24} {e:.4f}")
        lines += metric_lines(record.metrics)
        e = record.efficiency
        lines.append(f"{'images per second':>30}: {e['images_per_second']:.1f}")
        lines.append(f"{'adaptation memory (MiB)':>30}: {e['adapt_memory_mb']:.2f}")
        return "\n".join(lines)
