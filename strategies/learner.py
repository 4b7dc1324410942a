"""The contract every clbench strategy shares, supervised or test-time.

:class:`Learner` is a plain mixin (no ``__init__``, no Avalanche import) that both bases
put first among their parents: :class:`~clbench.strategies.base.CLStrategy` (an Avalanche
``SupervisedTemplate``, ``kind = "class_incremental"``) and
:class:`~clbench.strategies.tta.TTAStrategy` (``kind = "test_time"``). It fixes what the
runner, the protocols and the leaderboards read from any strategy: its ``Config``
dataclass, the scenario ``kind`` it runs, whether it ``uses_task_id``, and its trainable /
inference parameter counts, and it owns the one optimizer factory, :func:`make_optimizer`,
and the run's numeric precision (:meth:`Learner.set_precision`, :mod:`clbench.precision`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from clbench.precision import FP32, Precision

#: every optimizer name a strategy config may give (each base narrows it in its config)
OPTIMIZERS = ("sgd", "adam", "adamw")


def make_optimizer(
    params: Iterable[nn.Parameter],
    cfg: Any,
    *,
    betas: tuple[float, float] | None = None,
) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` over ``params`` with the config's hyper-parameters.

    ``"sgd"``: ``SGD(lr, momentum, weight_decay)``; ``"adam"`` / ``"adamw"``:
    ``Adam`` / ``AdamW(lr, betas, weight_decay)``. ``betas`` defaults to
    ``(cfg.beta1, 0.999)``, and to PyTorch's default ``(0.9, 0.999)`` for a config without
    ``beta1`` (the supervised ones), so every config builds exactly the optimizer it did
    when each base had its own factory.
    """
    name = cfg.optimizer
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    if betas is None:
        betas = (getattr(cfg, "beta1", 0.9), 0.999)
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; valid optimizers: {', '.join(OPTIMIZERS)}")


class Learner:
    """What every strategy has; subclasses set ``Config`` and ``kind`` and hold ``cfg``
    (an instance of ``Config``) and ``model`` (the network it adapts)."""

    #: the options dataclass (schema of conf/strategy/NAME.yaml)
    Config: ClassVar[type]
    #: the scenario kind (protocol) the strategy runs: each base sets a string literal
    kind: ClassVar[str]
    #: True when predictions use the test sample's task id (task-incremental methods):
    #: their task-agnostic numbers are then not comparable, and boards mark them
    uses_task_id: ClassVar[bool] = False

    cfg: Any
    model: nn.Module
    device: torch.device
    #: how forward passes, backward and optimizer steps run (:mod:`clbench.precision`);
    #: float32 until the runner calls :meth:`set_precision`
    precision: Precision = FP32

    # ------------------------------------------------------------- precision
    def set_precision(self, name: str) -> None:
        """Run forward passes in ``name`` (``fp32``, ``bf16``, ``fp16``) from now on; the
        runner calls it once the protocol has built the learner. Each base decides where
        its forward passes are (:meth:`autocast`)."""
        self.precision = Precision(name, self.device)

    def autocast(self) -> Any:
        """The context of a forward pass in the learner's precision (nothing in fp32)."""
        return self.precision.autocast()

    # ------------------------------------------------------------ parameters
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer updates. Default: ``self.model``'s with grad."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def num_inference_parameters(self) -> int:
        """Parameters the deployed model needs at inference (after any merge).
        Default: every parameter of ``self.model``."""
        return sum(p.numel() for p in self.model.parameters())

    def sparsity_report(self) -> dict[str, Any] | None:
        """For a sparse method, the density its masks reached, counted
        (:meth:`clbench.adapters.sparse.MaskSet.report`); None (default): a dense model."""
        return None

    # ------------------------------------------------------------- optimizer
    def adam_betas(self) -> tuple[float, float] | None:
        """Adam / AdamW betas; None (default): :func:`make_optimizer`'s from the config."""
        return None

    def build_optimizer(
        self, params: Iterable[nn.Parameter] | None = None
    ) -> torch.optim.Optimizer:
        """:func:`make_optimizer` over ``params`` (default: :meth:`trainable_parameters`)."""
        params = self.trainable_parameters() if params is None else params
        return make_optimizer(params, self.cfg, betas=self.adam_betas())
