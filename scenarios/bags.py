"""Bags of instances: the data of the continual multiple-instance-learning kind (``mil``).

A bag is a slide (or any set of instances) with one label; its instances are feature
vectors from a frozen encoder, ``(N, D)`` float32, with optional instance labels (which
instances are the key ones: tumour patches, planted digits) and level-0 coordinates.
:class:`Bags` holds one task's bags, in memory or as files read on access (the CLAM
layout's ``h5_files/<slide>.h5`` / ``pt_files/<slide>.pt``); :class:`MILStream` holds
what the protocol needs beyond the Avalanche benchmark; :func:`mil_scenario` builds both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
from avalanche.benchmarks.utils.classification_dataset import (
    _as_taskaware_supervised_classification_dataset,
)
from clbench.scenarios.base import Scenario
from torch.utils.data import Dataset

from clbench.errors import ConfigError

#: the two continual MIL settings: one growing head over every task's bag classes
#: (ConSlide), or the same classes in every task (normal vs tumour over organs: CoMEL)
NEW_CLASSES, BINARY = "new_classes", "binary"
SETTINGS = (NEW_CLASSES, BINARY)


def task_class_ids(setting: str, seen: int, k: int) -> tuple[int, ...]:
    """The label ids of a task with ``k`` classes after ``seen`` classes of earlier tasks:
    the next ``k`` ids (``new_classes``: one head grows over every task) or ``0..k-1``
    (``binary``: every task has the same classes)."""
    start = seen if setting == NEW_CLASSES else 0
    return tuple(range(start, start + k))


#: reads one bag's file: path -> (features (N, D) float32, coords (N, 2) or None)
Reader = Callable[[str], tuple[torch.Tensor, torch.Tensor | None]]


class Bags(Dataset):
    """One task's bags; item ``i`` is ``(features (N_i, D) float32, label)``.

    ``features``: one tensor per bag, or one path per bag read by ``reader`` on every
    access (a module-level function, so DataLoader workers can pickle it).
    ``instance_labels``: per bag a ``(N_i,)`` 0/1 tensor (1: a key instance) or None;
    ``coords``: per bag a ``(N_i, 2)`` tensor of level-0 top-left (x, y) or None (a
    file-backed bag takes its coordinates from the file when its entry is None).
    """

    def __init__(
        self,
        features: Sequence[torch.Tensor | str],
        targets: Sequence[int],
        *,
        names: Sequence[str] | None = None,
        instance_labels: Sequence[torch.Tensor | None] | None = None,
        coords: Sequence[torch.Tensor | None] | None = None,
        reader: Reader | None = None,
    ) -> None:
        n = len(features)
        if len(targets) != n:
            raise ValueError(f"{n} bags but {len(targets)} labels")
        if any(isinstance(f, str) for f in features) and reader is None:
            raise ValueError("file-backed bags need a reader")
        self.features = list(features)
        self.targets = [int(t) for t in targets]
        self.names = list(names) if names is not None else [f"bag{i}" for i in range(n)]
        self._instance_labels = list(instance_labels) if instance_labels is not None else [None] * n
        self._coords = list(coords) if coords is not None else [None] * n
        self.reader = reader
        if not (len(self.names) == len(self._instance_labels) == len(self._coords) == n):
            raise ValueError("names, instance_labels and coords need one entry per bag")

    def __len__(self) -> int:
        return len(self.features)

    def bag(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Bag ``i``'s features and coordinates (read from its file if file-backed)."""
        f = self.features[i]
        if isinstance(f, str):
            assert self.reader is not None
            x, c = self.reader(f)
            return x.float(), c if self._coords[i] is None else self._coords[i]
        return f, self._coords[i]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.bag(i)[0], self.targets[i]

    def instance_labels(self, i: int) -> torch.Tensor | None:
        return self._instance_labels[i]

    def coords(self, i: int) -> torch.Tensor | None:
        """Bag ``i``'s coordinates (a file-backed bag's file is read: prefer :meth:`bag`)."""
        return self.bag(i)[1]

    @property
    def has_instance_labels(self) -> bool:
        return any(v is not None for v in self._instance_labels)

    def sizes(self) -> list[int]:
        """Instances per bag (reads every file of a file-backed task)."""
        return [int(self.bag(i)[0].shape[0]) for i in range(len(self))]


@dataclass(frozen=True)
class MILStream:
    """What the ``mil`` protocol needs beyond the benchmark.

    ``setting``: ``new_classes`` (task t brings its own bag classes, one head grows
    over all of them) or ``binary`` (every task has the same classes, e.g. normal /
    tumour, over organs or cohorts: task/domain-incremental). ``task_classes[t]``: the
    labels of task t. ``train`` / ``test`` (and optional ``val``): each task's bags, the
    same objects the benchmark's experiences wrap. ``loader_workers``: processes reading
    file-backed bags.
    """

    setting: str
    task_names: tuple[str, ...]
    task_classes: tuple[tuple[int, ...], ...]
    train: tuple[Bags, ...]
    test: tuple[Bags, ...]
    val: tuple[Bags, ...] | None = None
    loader_workers: int = 0

    def __post_init__(self) -> None:
        if self.setting not in SETTINGS:
            raise ConfigError(
                f"invalid MIL setting {self.setting!r}; valid choices: {', '.join(SETTINGS)}"
            )
        n = len(self.task_names)
        if not (len(self.task_classes) == len(self.train) == len(self.test) == n):
            raise ValueError("task_names, task_classes, train and test need one entry per task")


def _wrap(bags: Bags) -> Any:
    return _as_taskaware_supervised_classification_dataset(bags)


def mil_scenario(
    name: str,
    stream: MILStream,
    class_names: Sequence[str],
    feature_dim: int,
) -> Scenario:
    """The ``mil`` scenario of ``stream``: one Avalanche experience per task (train and
    test), inputs ``(N, feature_dim)`` bags of any size."""
    for t, bags in enumerate(stream.train):
        if len(bags) == 0 or len(stream.test[t]) == 0:
            raise ConfigError(
                f"task {stream.task_names[t]!r} of scenario {name!r} has no training or test "
                "bag; check the split files"
            )
    streams: dict[str, list[Any]] = {
        "train": [_wrap(b) for b in stream.train],
        "test": [_wrap(b) for b in stream.test],
    }
    return Scenario(
        name=name,
        kind="mil",
        benchmark=with_classes_timeline(benchmark_from_datasets(**streams)),
        class_names=list(class_names),
        input_shape=(None, feature_dim),  # type: ignore[arg-type]
        in_memory=False,
        stream=stream,
    )
