"""ConSlide's Breakup-Reorganize rehearsal (BuRo) on a MIL aggregator (``conslide``).

Huang et al., "ConSlide: Asynchronous Hierarchical Interaction Transformer with
Breakup-Reorganize Rehearsal for Continual Whole Slide Image Analysis", ICCV 2023;
official code github.com/HKU-MedAI/ConSlide (``models/conslide.py``,
``utils/buffer.py:Instance_Buffer``, ``utils/training.py``).

- **Breakup.** After training on a task, every training slide of the task is cut into
  regions and a random ``ceil(region_fraction * R)`` of its ``R`` regions (official 20%)
  are offered, each with the slide's label and the task id, to one reservoir of
  ``buffer_size`` regions (official 1100) shared by all tasks.
- **Reorganize.** At every training step after the first task: pick a past task ``t``
  uniformly and a size ``s ~ U[pseudo_bag_min, pseudo_bag_max)`` (official [100, 250)),
  and for each class ``c`` of task ``t`` build a pseudo-bag from ``min(s, n_c)`` distinct
  buffered regions of (task t, class c), chosen at random (official ``get_data``: ``s``
  counts regions, without replacement, clipped to what the buffer holds). The loss of the
  step is ``CE(bag) + replay_weight * sum_c CE(model(pseudo-bag c), c)``, one backward
  (official ``observe``, ``alpha`` = 0.2). In the official class-incremental setting the
  classes of task t are 2t and 2t+1; here they are whatever classes task t brought (so the
  binary setting replays classes 0 and 1 of the past task).

Regions on flat bags. ConSlide's bags are two-level (regions of 4096 px, each 8 x 8
patches of 512 px, aggregated by its HIT model); CLAM-style bags are flat: ``N`` instances
with level-0 top-left coordinates. A region is then the set of instances whose
coordinates fall in one cell of a ``region_size``-px grid (``coords // region_size``,
default 4096 px as ConSlide's regions); a bag without coordinates is cut into consecutive
chunks of ``region_instances`` instances (default 64: the 8 x 8 patches of a ConSlide
region). A pseudo-bag concatenates its regions' instances.

Differences from the official code, by necessity or by choice:

- the aggregator is any clbench MIL backbone (ABMIL by default), not HIT, so HIT's
  self-supervised warm-up on task 0 and its auxiliary loss term are not part of this
  method;
- regions are picked without replacement (the official ``np.random.randint`` may pick a
  region twice; the paper says a random 20%), and a one-region slide offers its region
  (the official code skips such slides; on small bags every bag is one region);
- training runs a fixed number of epochs (the official code runs up to 50 with early
  stopping on a validation split, which the protocol does not hold out);
- a past class with no buffered region gets no pseudo-bag (the official code would
  build an empty one);
- the optimiser (Adam 1e-4 for ABMIL instead of HIT's 1e-5) is rebuilt at each task, as
  for every clbench learner (the official one persists across tasks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from avalanche.benchmarks.utils import AvalancheDataset, DataAttribute
from avalanche.training.storage_policy import ReservoirSamplingBuffer
from clbench.scenarios.bags import Bags
from clbench.strategies.base import StrategyConfig
from clbench.strategies.mil import MILConfig, MILStrategy
from torch.utils.data import Dataset

from clbench.checks import check_positive
from clbench.errors import ConfigError
from clbench.seeding import derived_generator


@dataclass
class ConSlideConfig(MILConfig):
    """ConSlide's options on top of :class:`MILConfig` (see the module docstring)."""

    epochs: int = 4  # replay makes a step ~50x dearer on small bags (conf/strategy/conslide.yaml)
    lr_schedule: str = "constant"  # official: no scheduler (datasets/seq_wsi.py)
    buffer_size: int = 1100  # regions in the reservoir (official --buffer_size 1100)
    region_fraction: float = 0.2  # of a slide's regions offered after its task (official)
    region_size: int = 4096  # level-0 px of a region's grid cell (ConSlide's regions)
    region_instances: int = 64  # instances per region of a bag without coordinates (8 x 8)
    pseudo_bag_min: int = 100  # regions per pseudo-bag ~ U[min, max) (official [100, 250))
    pseudo_bag_max: int = 250
    replay_weight: float = 0.2  # weight of each pseudo-bag's CE (official --alpha 0.2)

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("buffer_size", "region_size", "region_instances", "pseudo_bag_min"):
            check_positive(f"strategy.{key}", getattr(self, key))
        if not 0.0 < self.region_fraction <= 1.0:
            raise ConfigError(
                f"invalid value for strategy.region_fraction: {self.region_fraction!r}; "
                "must be in (0, 1]"
            )
        if self.pseudo_bag_max <= self.pseudo_bag_min:
            raise ConfigError(
                f"invalid value for strategy.pseudo_bag_max: {self.pseudo_bag_max!r}; the "
                f"pseudo-bag size is drawn from [pseudo_bag_min, pseudo_bag_max), so it must "
                f"exceed strategy.pseudo_bag_min ({self.pseudo_bag_min})"
            )
        check_positive("strategy.replay_weight", self.replay_weight, allow_zero=True)


def slide_regions(
    features: torch.Tensor,
    coords: torch.Tensor | None,
    region_size: int,
    region_instances: int,
) -> list[torch.Tensor]:
    """Cut one bag ``(N, D)`` into regions: with ``coords`` ``(N, 2)`` (level-0 x, y) the
    instances of each ``region_size``-px grid cell (cells in (x, y) order, instances in bag
    order); without, consecutive chunks of ``region_instances``. Each region is a new
    tensor (no view keeps the whole bag alive)."""
    n = features.shape[0]
    if coords is None:
        return [features[i : i + region_instances].clone() for i in range(0, n, region_instances)]
    if coords.shape != (n, 2):
        raise ValueError(
            f"a bag of {n} instances needs coords of shape ({n}, 2); got {tuple(coords.shape)}"
        )
    cells = torch.div(coords.long(), region_size, rounding_mode="floor")
    _, region_of = torch.unique(cells, dim=0, return_inverse=True)
    order = torch.argsort(region_of, stable=True)
    counts = torch.bincount(region_of).tolist()
    return [part.clone() for part in torch.split(features[order], counts)]


class _Regions(Dataset):
    """Regions as a dataset: item ``i`` is ``(features (n_i, D),)``."""

    def __init__(self, regions: Sequence[torch.Tensor]) -> None:
        self.regions = list(regions)

    def __len__(self) -> int:
        return len(self.regions)

    def __getitem__(self, i: int) -> tuple[torch.Tensor]:
        return (self.regions[i],)


def _regions_dataset(
    regions: Sequence[torch.Tensor], labels: Sequence[int], tasks: Sequence[int]
) -> AvalancheDataset:
    return AvalancheDataset(
        [_Regions(regions)],
        data_attributes=[
            DataAttribute([int(v) for v in labels], "targets"),
            DataAttribute([int(v) for v in tasks], "targets_task_labels"),
        ],
    )


class RegionBuffer:
    """BuRo's memory: a uniform reservoir of at most ``size`` regions over every region
    offered so far, each kept with its slide's label and its task.

    The reservoir is Avalanche's :class:`ReservoirSamplingBuffer` (random keys, keep the
    ``size`` largest: a uniform sample of the stream, like the official sequential
    reservoir) over an :class:`AvalancheDataset` of regions. Two additions: its key draw
    (``torch.rand`` on the global generator) runs on a forked generator seeded from this
    buffer's own, so the buffer is reproducible and leaves the training RNG untouched; and
    after each offer the kept regions are re-wrapped in a fresh dataset, since Avalanche's
    concatenated subsets would otherwise keep every region ever offered alive.
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size = size
        self.reservoir = ReservoirSamplingBuffer(size)
        self.generator = derived_generator(seed, -1, 1)
        self.regions: list[torch.Tensor] = []
        self.labels: list[int] = []
        self.tasks: list[int] = []
        self.offered = 0

    def __len__(self) -> int:
        return len(self.regions)

    def offer(self, regions: Sequence[torch.Tensor], label: int, task: int) -> None:
        """Offer ``regions`` (each ``(n_i, D)``) of one slide of class ``label``, task ``task``."""
        if not regions:
            return
        kept = [r.detach().cpu() for r in regions]
        new = _regions_dataset(kept, [label] * len(kept), [task] * len(kept))
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            self.reservoir.update_from_dataset(new)
        self.offered += len(regions)
        self._compact()

    def _compact(self) -> None:
        kept = self.reservoir.buffer
        self.regions = [kept[i][0] for i in range(len(kept))]
        self.labels = [int(v) for v in kept.targets]
        self.tasks = [int(v) for v in kept.targets_task_labels]
        self.reservoir.buffer = _regions_dataset(self.regions, self.labels, self.tasks)

    def indices(self, task: int, label: int) -> list[int]:
        """Positions of the buffered regions of ``task`` with ``label``."""
        pairs = zip(self.tasks, self.labels, strict=True)
        return [i for i, (t, y) in enumerate(pairs) if t == task and y == label]

    def state(self) -> dict[str, Any]:
        """The buffer as data (tensors and ints), for a checkpoint."""
        return {
            "regions": list(self.regions),
            "labels": list(self.labels),
            "tasks": list(self.tasks),
            "weights": self.reservoir._buffer_weights.clone(),
            "offered": self.offered,
            "generator": self.generator.get_state(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state` returned."""
        self.regions = list(state["regions"])
        self.labels = [int(v) for v in state["labels"]]
        self.tasks = [int(v) for v in state["tasks"]]
        self.reservoir.buffer = _regions_dataset(self.regions, self.labels, self.tasks)
        self.reservoir._buffer_weights = state["weights"].clone()
        self.offered = int(state["offered"])
        self.generator.set_state(state["generator"])


def _source_bags(dataset: Any) -> Bags | None:
    """The :class:`Bags` an experience's dataset wraps one to one (as
    :func:`~clbench.scenarios.bags.mil_scenario` builds it), else None."""
    inner = getattr(dataset, "_datasets", None)
    if inner and len(inner) == 1 and isinstance(inner[0], Bags) and len(inner[0]) == len(dataset):
        return inner[0]
    return None


class ConSlide(MILStrategy):
    """A MIL learner with ConSlide's BuRo rehearsal (see the module docstring)."""

    Config: ClassVar[type[StrategyConfig]] = ConSlideConfig
    cfg: ConSlideConfig

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.buffer = RegionBuffer(self.cfg.buffer_size, self.seed)
        self.replay_generator = derived_generator(self.seed, -1, 2)
        #: the classes of every finished task, in task order (replay picks among them)
        self.task_classes: list[list[int]] = []

    # --------------------------------------------------------------- breakup
    def regions_of(self, features: torch.Tensor, coords: torch.Tensor | None) -> list:
        """One slide's regions under this strategy's ``region_size`` / ``region_instances``."""
        return slide_regions(features, coords, self.cfg.region_size, self.cfg.region_instances)

    def store_task(self, dataset: Any, task: int) -> None:
        """Offer a random ``region_fraction`` of every training slide's regions."""
        bags = _source_bags(dataset)
        n = len(bags) if bags is not None else len(dataset)
        for i in range(n):
            if bags is not None:
                features, coords = bags.bag(i)
                label = bags.targets[i]
            else:  # a dataset of (features, label, ...) items: no coordinates
                item = dataset[i]
                features, label, coords = item[0], int(item[1]), None
            regions = self.regions_of(features, coords)
            k = math.ceil(self.cfg.region_fraction * len(regions))
            chosen = torch.randperm(len(regions), generator=self.buffer.generator)[:k]
            self.buffer.offer([regions[j] for j in chosen.tolist()], int(label), task)

    def _after_training_exp(self, **kwargs: Any) -> None:
        task = len(self.task_classes)
        self.store_task(self.experience.dataset, task)
        self.task_classes.append(list(self.current_classes))
        super()._after_training_exp(**kwargs)

    # ----------------------------------------------------------- reorganize
    def pseudo_bags(
        self, task: int, size: int, generator: torch.Generator
    ) -> list[tuple[torch.Tensor, int]]:
        """One pseudo-bag ``(instances (M, D), class)`` per class of past ``task`` that the
        buffer holds: the instances of ``min(size, n_c)`` distinct random buffered regions
        of that task and class."""
        bags = []
        for label in self.task_classes[task]:
            idx = self.buffer.indices(task, label)
            if not idx:
                continue
            pick = torch.randperm(len(idx), generator=generator)[:size].tolist()
            bags.append((torch.cat([self.buffer.regions[idx[j]] for j in pick]), label))
        return bags

    def replay_loss(self) -> torch.Tensor | None:
        """``sum_c CE(model(pseudo-bag c), c)`` for a random past task and size (None
        before the first task is done or when the buffer holds none of its regions)."""
        if not self.task_classes:
            return None
        g = self.replay_generator
        task = int(torch.randint(len(self.task_classes), (1,), generator=g))
        size = int(
            torch.randint(self.cfg.pseudo_bag_min, self.cfg.pseudo_bag_max, (1,), generator=g)
        )
        losses = []
        for bag, label in self.pseudo_bags(task, size, g):
            logits = self.model(bag.to(self.device).unsqueeze(0))
            losses.append(F.cross_entropy(logits, torch.tensor([label], device=self.device)))
        return torch.stack(losses).sum() if losses else None

    def criterion(self) -> torch.Tensor:
        loss = super().criterion()
        if self.is_training and self.cfg.replay_weight > 0:
            replay = self.replay_loss()
            if replay is not None:
                loss = loss + self.cfg.replay_weight * replay
        return loss

    # ------------------------------------------------------------ checkpoint
    def extra_state(self) -> dict[str, Any]:
        return {
            "buffer": self.buffer.state(),
            "task_classes": [list(c) for c in self.task_classes],
            "replay_generator": self.replay_generator.get_state(),
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.buffer.load_state(state["buffer"])
        self.task_classes = [[int(c) for c in cs] for cs in state["task_classes"]]
        self.replay_generator.set_state(state["replay_generator"])
