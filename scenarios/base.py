"""What a scenario builder returns: an Avalanche benchmark plus what the protocol needs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from avalanche.benchmarks.scenarios.generic_scenario import CLScenario
from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
from avalanche.benchmarks.utils.classification_dataset import (
    _as_taskaware_supervised_classification_dataset,
)
from torch.utils.data import TensorDataset


@dataclass
class Scenario:
    """A built scenario: the Avalanche benchmark and what its protocol needs.

    ``kind`` names the protocol that runs it (a key of ``clbench.registry.PROTOCOLS``);
    ``stream`` holds that protocol's typed inputs where it needs more than the benchmark
    (e.g. :class:`clbench.protocols.tta.DomainStream`: domains, reset mode, batch size).
    """

    name: str
    kind: str
    benchmark: CLScenario
    class_names: list[str]
    input_shape: tuple[int, ...]  # the shape of one model input, e.g. (C, H, W)
    in_memory: bool = True  # samples are stored tensors with no random transforms
    stream: Any = None

    @property
    def train_stream(self) -> Any:
        return self.benchmark.train_stream

    @property
    def test_stream(self) -> Any:
        return self.benchmark.test_stream

    @property
    def num_experiences(self) -> int:
        """Training experiences; without a training stream (test-time), test experiences."""
        streams = self.benchmark.streams
        return len(streams["train"] if "train" in streams else streams["test"])

    @property
    def classes_per_experience(self) -> list[list[int]]:
        return [sorted(int(c) for c in e.classes_in_this_experience) for e in self.train_stream]


class LabelledTensors(TensorDataset):
    """A TensorDataset of (x, y) exposing ``targets`` as Avalanche expects."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        super().__init__(x, y)
        self.targets = y.tolist()


def class_incremental_from_tensors(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    class_order: Sequence[int],
    n_experiences: int,
) -> CLScenario:
    """An Avalanche class-incremental benchmark whose labels are positions in ``class_order``.

    Relabelling makes experience t hold labels [t*k, (t+1)*k), so a growing head's
    units line up with arrival order (the PILOT convention).
    """
    n_classes = len(class_order)
    if n_classes % n_experiences:
        raise ValueError(f"{n_classes} classes do not split into {n_experiences} experiences")
    remap = torch.empty(max(class_order) + 1, dtype=torch.long)
    remap[torch.as_tensor(list(class_order))] = torch.arange(n_classes)
    datasets = {
        "train": _as_taskaware_supervised_classification_dataset(
            LabelledTensors(x_train, remap[y_train])
        ),
        "test": _as_taskaware_supervised_classification_dataset(
            LabelledTensors(x_test, remap[y_test])
        ),
    }
    return class_incremental_benchmark(
        datasets, class_order=list(range(n_classes)), num_experiences=n_experiences
    )


def _dataset(x: torch.Tensor, y: torch.Tensor) -> Any:
    return _as_taskaware_supervised_classification_dataset(LabelledTensors(x, y))


def tta_benchmark(
    domains: Sequence[tuple[torch.Tensor, torch.Tensor] | Any],
    source: tuple[torch.Tensor, torch.Tensor] | None = None,
    clean: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> CLScenario:
    """An Avalanche benchmark for continual test-time adaptation.

    ``test_stream``: one experience per domain (labels are for scoring only); a domain is
    an ``(x, y)`` pair of tensors or a dataset with ``targets`` (read lazily).
    ``source_stream`` (optional): labelled clean source data, for the source model and
    methods that use clean samples (EATA's Fisher, EcoTTA's warm-up).
    ``clean_stream`` (optional): the clean test set, to measure what is kept of the
    source task after adaptation.
    """
    wrap = _as_taskaware_supervised_classification_dataset
    streams: dict[str, list[Any]] = {
        "test": [_dataset(*d) if isinstance(d, tuple) else wrap(d) for d in domains]
    }
    if source is not None:
        streams["source"] = [_dataset(*source)]
    if clean is not None:
        streams["clean"] = [_dataset(*clean)]
    return benchmark_from_datasets(**streams)
