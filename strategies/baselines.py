"""Reference points: full fine-tuning, linear probing and the joint upper bound."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from clbench.strategies.base import CLStrategy, StrategyConfig

from clbench.models import ClassifierModel


class Finetune(CLStrategy):
    """Full fine-tuning of backbone and head on each experience in turn (naive lower bound)."""


class LinearProbe(CLStrategy):
    """Frozen pretrained backbone; only the growing linear head trains.

    On a CLIP backbone the head is the text embedding of the class names, which has no
    parameter of its own: nothing trains and the run measures the frozen (zero-shot
    style) CLIP classifier over the classes seen so far.
    """

    def prepare_model(self, model: ClassifierModel) -> None:
        model.backbone.requires_grad_(False)

    def make_optimizer(self, **kwargs: Any) -> None:
        if self.trainable_parameters():  # else keep the placeholder: nothing to train
            super().make_optimizer(**kwargs)

    def training_epoch(self, **kwargs: Any) -> None:
        if self.trainable_parameters():
            super().training_epoch(**kwargs)


@dataclass
class JointConfig(StrategyConfig):
    # Retrain from the initial model at every step on all data seen so far, so each
    # row of the accuracy matrix is the joint upper bound for the classes seen up to
    # then (False: keep training the current model on the union, Avalanche-style).
    reset_each_step: bool = True


class Joint(CLStrategy):
    """Upper bound: at step t, train on the union of experiences 0..t at once."""

    Config = JointConfig
    cfg: JointConfig

    # the initial weights each step restarts from, and the ids of the experiences seen
    STATE = ("_initial_state", "_seen_experiences")

    def __init__(self, *, model: ClassifierModel, cfg: JointConfig, **kwargs: Any) -> None:
        super().__init__(model=model, cfg=cfg, **kwargs)
        self._initial_state = copy.deepcopy(dict(model.state_dict()))
        self._seen_experiences: list[int] = []

    def train_dataset_adaptation(self, **kwargs: Any) -> None:
        stream = self.experience.origin_stream
        self._seen_experiences.append(int(self.experience.current_experience))
        data = stream[self._seen_experiences[0]].dataset
        for i in self._seen_experiences[1:]:
            data = data.concat(stream[i].dataset)
        self.adapted_dataset = data.train()

    def adapt_to_experience(self) -> None:
        self.current_classes = list(self.seen_classes)  # the "current" data is all seen data
        if self.cfg.reset_each_step:
            head_size = self.model.head.num_classes
            self.model.head.reset()
            self.model.load_state_dict(self._initial_state)
            self.model.head.grow(head_size)
            self.model.to(self.device)
