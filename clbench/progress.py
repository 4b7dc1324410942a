"""Training-loop plugins every protocol shares: console progress (experience, epoch,
running loss) and the step counter with its divergence guard."""

from __future__ import annotations

import math
import sys
from typing import Any

from avalanche.training.plugins import SupervisedPlugin
from tqdm import tqdm

from clbench.errors import ClbenchError


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


class StepCounter(SupervisedPlugin):
    """Counts optimiser steps, notes the trainable parameters, guards against a diverging
    loss; ``unit`` names a training experience in the error (an experience, a request)."""

    def __init__(self, unit: str = "experience") -> None:
        super().__init__()
        self.unit = unit
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
                f"training loss became {loss} at {self.unit} "
                f"{strategy.experience.current_experience + 1}, step {self.count}; "
                "lower strategy.lr or check the data"
            )
