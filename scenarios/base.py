"""What a scenario builder returns: an Avalanche benchmark plus what the protocol needs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from avalanche.benchmarks.scenarios.generic_scenario import CLScenario
from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
from avalanche.benchmarks.utils.classification_dataset import (
    _as_taskaware_supervised_classification_dataset,
)
from torch.utils.data import TensorDataset

from clbench.errors import ConfigError


class InputPipeline(Protocol):
    """The image transforms of a scenario whose samples are read from files, set from the
    backbone's data configuration (``Backbone.data_config``: ``input_size``, ``mean``,
    ``std``, ``interpolation``, ``crop_pct``) before the run starts, so images reach the
    model resized and normalised the way its weights expect."""

    def configure(self, data_config: dict[str, Any]) -> tuple[int, ...]:
        """Adopt ``data_config``; returns the shape of one model input, e.g. (3, 224, 224)."""
        ...


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
    #: for images read from files: the transforms the backbone's data config sets
    #: (:meth:`configure_inputs`); None: the samples are model inputs as they are
    inputs: InputPipeline | None = None

    def configure_inputs(self, data_config: dict[str, Any] | None) -> bool:
        """Let the backbone's data configuration drive the image transforms (resize, crop,
        normalisation); True if it did. A scenario of stored tensors, or a backbone
        without one, is left as it is (False)."""
        if self.inputs is None or not data_config:
            return False
        self.input_shape = tuple(self.inputs.configure(data_config))
        return True

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


def class_split(
    n_classes: int, n_experiences: int = 0, init_cls: int = 0, increment: int = 0
) -> list[int]:
    """Classes per experience, PILOT's way: ``init_cls`` in the first experience, then
    ``increment`` per experience (the last one may hold fewer: PILOT's remainder rule),
    e.g. 100 classes, B50 Inc10 -> [50, 10, 10, 10, 10, 10]. ``init_cls`` 0: even split
    into ``n_experiences`` (which must divide ``n_classes``); ``increment`` 0: the rest of
    the classes split evenly into ``n_experiences - 1`` experiences (or ``init_cls``
    each if ``n_experiences`` is 0). One clear :class:`ConfigError` line otherwise."""
    if init_cls < 0 or increment < 0 or n_experiences < 0:
        raise ConfigError(
            f"invalid class split: init_cls={init_cls}, increment={increment}, "
            f"n_experiences={n_experiences}; none may be negative"
        )
    if init_cls == 0:
        if n_experiences <= 0 or n_classes % n_experiences:
            valid = [k for k in range(1, n_classes + 1) if n_classes % k == 0]
            raise ConfigError(
                f"invalid value for scenario.n_experiences: {n_experiences}; valid choices: "
                f"{', '.join(map(str, valid))} ({n_classes} classes split evenly), or set "
                "scenario.init_cls / scenario.increment for an uneven split"
            )
        return [n_classes // n_experiences] * n_experiences
    if init_cls > n_classes:
        raise ConfigError(
            f"invalid value for scenario.init_cls: {init_cls}; the scenario has {n_classes} classes"
        )
    rest = n_classes - init_cls
    if increment == 0:
        if rest == 0:
            return [init_cls]
        if n_experiences == 0:
            increment = init_cls
        elif n_experiences < 2 or rest % (n_experiences - 1):
            raise ConfigError(
                f"invalid class split: {rest} classes after init_cls={init_cls} do not split "
                f"evenly into n_experiences - 1 = {n_experiences - 1} experiences; set "
                "scenario.increment"
            )
        else:
            increment = rest // (n_experiences - 1)
    sizes = [init_cls] + [increment] * (rest // increment)
    if rest % increment:
        sizes.append(rest % increment)
    if n_experiences and len(sizes) != n_experiences:
        raise ConfigError(
            f"invalid class split: init_cls={init_cls}, increment={increment} give "
            f"{len(sizes)} experiences, scenario.n_experiences={n_experiences}; set "
            "n_experiences to that, or to 0 (taken from the split)"
        )
    return sizes


def class_incremental_from_tensors(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    class_order: Sequence[int],
    n_experiences: int | Sequence[int],
) -> CLScenario:
    """An Avalanche class-incremental benchmark whose labels are positions in ``class_order``.

    ``n_experiences``: a number of even experiences, or the classes of each experience
    (:func:`class_split`, e.g. [50, 10, 10, 10, 10, 10]). Relabelling makes the
    experiences hold consecutive labels in arrival order, so a growing head's units line
    up with it (the PILOT convention).
    """
    datasets = {
        "train": LabelledTensors(x_train, y_train),
        "test": LabelledTensors(x_test, y_test),
    }
    return class_incremental_from_datasets(datasets, class_order, n_experiences)


def class_incremental_from_datasets(
    datasets: dict[str, Any],
    class_order: Sequence[int],
    n_experiences: int | Sequence[int],
    transform_groups: dict[str, Any] | None = None,
) -> CLScenario:
    """:func:`class_incremental_from_tensors` for any datasets with ``targets`` (e.g. images
    read lazily from files): ``{"train": ..., "test": ...}``, labels relabelled to
    positions in ``class_order``, split by Avalanche's ``class_incremental_benchmark``.
    ``transform_groups``: Avalanche's ``{"train": (transform, None), "eval": (...)}``
    applied to every sample (``dataset.train()`` / ``.eval()`` pick the group)."""
    n_classes = len(class_order)
    if isinstance(n_experiences, int):
        if n_classes % n_experiences:
            raise ValueError(f"{n_classes} classes do not split into {n_experiences} experiences")
        sizes = [n_classes // n_experiences] * n_experiences
    else:
        sizes = [int(k) for k in n_experiences]
        if sum(sizes) != n_classes or min(sizes) < 1:
            raise ValueError(f"experience sizes {sizes} do not split {n_classes} classes")
    remap = torch.empty(max(class_order) + 1, dtype=torch.long)
    remap[torch.as_tensor(list(class_order))] = torch.arange(n_classes)
    wrapped = {
        name: _as_taskaware_supervised_classification_dataset(
            LabelledTensors(data.tensors[0], remap[data.tensors[1]])
            if isinstance(data, LabelledTensors)
            else Relabelled(data, remap),
            transform_groups=transform_groups,
        )
        for name, data in datasets.items()
    }
    return class_incremental_benchmark(
        wrapped, class_order=list(range(n_classes)), num_classes_per_exp=sizes
    )


class Relabelled(torch.utils.data.Dataset):
    """``dataset`` with each label ``y`` replaced by ``remap[y]`` (``targets`` too)."""

    def __init__(self, dataset: Any, remap: torch.Tensor) -> None:
        self.dataset = dataset
        self.remap = remap
        self.targets = remap[torch.as_tensor(list(dataset.targets))].tolist()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        x, _ = self.dataset[i]
        return x, self.targets[i]


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
