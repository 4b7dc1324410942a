"""Learners of the continual MIL kind (``mil``): one bag per batch, an aggregator backbone.

:class:`BagLearner` is the mixin that turns any supervised clbench strategy
(:class:`~clbench.strategies.base.CLStrategy` and its subclasses) into a bag learner:
batches of exactly one bag ``(1, N, D)`` in a seeded shuffled order, the bag's label,
and :meth:`BagLearner.bag_outputs` for the protocol (logits and the aggregator's
attention). It goes first among the parents: ``class MILLoRA(BagLearner, SequentialLoRA)``
is sequential LoRA on the aggregator's linears. :class:`MILStrategy` is the base for
methods written for MIL (ConSlide, CoMEL): a ``CLStrategy`` of kind ``mil``.

The model is the backbone's classifier: the aggregator (``model.backbone``, see
:mod:`clbench.backbones.mil`) and the growing linear head (``model.head``), the bag
classifier of every official MIL code.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from clbench.strategies.base import CLStrategy, StrategyConfig
from clbench.strategies.baselines import Joint, JointConfig
from torch.utils.data import DataLoader

from clbench.errors import ConfigError
from clbench.precision import to_float32
from clbench.seeding import derived_generator


def check_one_bag(batch_size: int) -> None:
    """A MIL batch is one bag: refuse any other ``strategy.batch_size``."""
    if batch_size != 1:
        raise ConfigError(
            f"invalid value for strategy.batch_size: {batch_size}; MIL strategies train on one "
            "bag per batch (bags differ in size): use strategy.batch_size=1"
        )


class OneBagBatches:
    """Iterate a dataset of ``(features (N, D), label, task)`` items one bag per batch,
    as ``[x (1, N, D), y (1,), t (1,)]``; reshuffled on every pass if ``shuffle``."""

    def __init__(
        self,
        dataset: Any,
        shuffle: bool,
        generator: torch.Generator | None = None,
        workers: int = 0,
    ) -> None:
        self.dataset = dataset
        self.shuffle = shuffle
        self.generator = generator
        self.workers = workers  # > 0: processes read the bags (file-backed bags)

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        n = len(self.dataset)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        items: Any = (self.dataset[i] for i in order.tolist())
        if self.workers > 0:  # the same order, read ahead by worker processes
            items = DataLoader(
                self.dataset, batch_size=None, sampler=order.tolist(), num_workers=self.workers
            )
        for item in items:
            x, y, t = item[:3]
            yield [x.unsqueeze(0), torch.tensor([int(y)]), torch.tensor([int(t)])]


class BagLearner:
    """Mixin: one bag per batch for a :class:`CLStrategy` (see the module docstring)."""

    kind: ClassVar[str] = "mil"
    cfg: Any
    seed: int
    model: torch.nn.Module
    device: torch.device
    #: processes reading file-backed bags (the protocol sets the scenario's value)
    loader_workers: int = 0

    def __init__(self, **kwargs: Any) -> None:
        check_one_bag(kwargs["cfg"].batch_size)
        super().__init__(**kwargs)

    def make_train_dataloader(self, shuffle: bool = True, **kwargs: Any) -> None:
        exp_id = int(self.experience.current_experience)  # type: ignore[attr-defined]
        self.dataloader = OneBagBatches(
            self.adapted_dataset,  # type: ignore[attr-defined]
            shuffle=shuffle,
            generator=derived_generator(self.seed, exp_id),
            workers=self.loader_workers,
        )

    def make_eval_dataloader(self, **kwargs: Any) -> None:
        self.dataloader = OneBagBatches(
            self.adapted_dataset,  # type: ignore[attr-defined]
            shuffle=False,
            workers=self.loader_workers,
        )

    @torch.no_grad()
    def bag_outputs(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits ``(C,)`` of one bag ``(N, D)`` over the head's classes, and the
        aggregator's attention ``(N,)`` (None if it has none), in eval mode, in the run's
        precision (both returned as float32)."""
        self.model.eval()
        with self.autocast():  # type: ignore[attr-defined]
            logits = to_float32(self.model(bag.to(self.device).unsqueeze(0))[0])
        attention = getattr(self.model.backbone, "attention", None)
        return logits, (to_float32(attention.detach()) if attention is not None else None)


@dataclass
class MILConfig(StrategyConfig):
    """Training options of a MIL strategy; the defaults are CoMEL's (Adam 1e-4, weight
    decay 1e-5, cosine per task, one bag per batch; 20 epochs instead of 100: the
    embedded scenario's)."""

    epochs: int = 20
    batch_size: int = 1
    eval_batch_size: int = 1
    optimizer: str = "adam"
    lr: float = 1e-4
    weight_decay: float = 1e-5
    lr_schedule: str = "cosine"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_one_bag(self.batch_size)


class MILStrategy(BagLearner, CLStrategy):
    """Base of the methods written for continual MIL; trains the aggregator and head."""

    Config: ClassVar[type[StrategyConfig]] = MILConfig
    kind: ClassVar[str] = "mil"


class MILFinetune(MILStrategy):
    """The aggregator and head fine-tuned on each task in turn (the lower bound)."""


@dataclass
class MILJointConfig(JointConfig):
    epochs: int = 20
    batch_size: int = 1
    eval_batch_size: int = 1
    lr: float = 1e-4
    weight_decay: float = 1e-5
    lr_schedule: str = "cosine"


class MILJoint(BagLearner, Joint):
    """Upper bound: at task t, train on the bags of tasks 0..t at once."""

    Config = MILJointConfig
    kind: ClassVar[str] = "mil"
