"""Console progress for training: experience, epoch and running loss."""

from __future__ import annotations

import sys
from typing import Any

from avalanche.training.plugins import SupervisedPlugin
from tqdm import tqdm


class ProgressPlugin(SupervisedPlugin):
    """A tqdm bar per training experience showing epoch and running loss."""

    def __init__(self, n_experiences: int, enabled: bool = True) -> None:
        super().__init__()
        self.n_experiences = n_experiences
        self.enabled = enabled
        self.bar: tqdm | None = None
        self._loss_sum = 0.0
        self._loss_n = 0

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        if not self.enabled:
            return
        exp = int(strategy.experience.current_experience)
        total = strategy.train_epochs * len(strategy.dataloader)
        self.bar = tqdm(
            total=total,
            desc=f"experience {exp + 1}/{self.n_experiences}",
            file=sys.stderr,
            leave=True,
            dynamic_ncols=True,
            mininterval=0.5,
        )

    def before_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        self._loss_sum, self._loss_n = 0.0, 0

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        if self.bar is None:
            return
        self._loss_sum += float(strategy.loss.detach())
        self._loss_n += 1
        epoch = strategy.clock.train_exp_epochs + 1
        self.bar.set_postfix_str(
            f"epoch {epoch}/{strategy.train_epochs} loss {self._loss_sum / self._loss_n:.4f}",
            refresh=False,
        )
        self.bar.update(1)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
