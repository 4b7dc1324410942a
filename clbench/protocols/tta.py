"""The online continual test-time-adaptation protocol (PROTOCOLS.md).

One pass over the domain sequence. Each domain's samples are shuffled with a generator
seeded by the run's seed and cut into test batches; the strategy's prediction for a
batch is scored when it is made (before anything is learned from a later batch). In
``continual`` mode the model is reset only before the first domain, in
``reset_each_shift`` before every domain. Afterwards the adapted model predicts the
clean test set (if the scenario has one): how much of the source task is kept.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from clbench.adapters.tta import SavedTensorMeter, state_bytes
from clbench.data import materialise
from clbench.scenarios.base import Scenario


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


@torch.no_grad()
def clean_accuracy(strategy: Any, data: Dataset, batch_size: int, in_memory: bool) -> float:
    """Accuracy of the strategy's current predictions (no adaptation) on clean data."""
    hits = n = 0
    g = torch.Generator().manual_seed(0)
    for x, y in _batches(data, batch_size, g, in_memory):
        pred = strategy.predict(x.to(strategy.device)).argmax(1).cpu()
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
    """Adapt online along the scenario's domains; returns the scored result."""
    mode = mode or scenario.meta["mode"]
    batch_size = batch_size or int(scenario.meta["batch_size"])
    stream = list(scenario.test_stream)
    domains = list(scenario.meta["domains"])
    result = TTAResult(
        mode=mode, domains=domains, domain_sizes=[len(e.dataset) for e in stream]
    )
    clean = None
    if "clean" in scenario.benchmark.streams:
        clean = scenario.benchmark.streams["clean"][0].dataset
        result.clean_accuracy_before = clean_accuracy(
            strategy, clean, batch_size, scenario.in_memory
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
        for x, y in _batches(exp.dataset, batch_size, generator, scenario.in_memory):
            start = time.perf_counter()
            with meter.measure():
                logits = strategy.adapt(x.to(strategy.device))
            pred = logits.argmax(1).cpu()
            if cuda:
                torch.cuda.synchronize(strategy.device)
            result.adapt_seconds += time.perf_counter() - start
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
            strategy, clean, batch_size, scenario.in_memory
        )
    return result
