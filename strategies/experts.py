"""Mixtures of rank and adapter experts (docs/methods.md, "Expert mixtures"), built from
``clbench.adapters.experts``:

- ``mora``: MoRA ("Little by Little"): each task adds rank-1 LoRA experts to the target
  linears, earlier ones frozen; every expert scores itself from its own activation, and a
  top-k budget plus a threshold decide which ones act on a token. No router, no merge.
- ``moe_adapters``: MoE-Adapters4CL (Yu et al., CVPR 2024): adapter experts beside every
  image-tower block's MLP and a noisy top-k router, in either official recipe: the
  class-incremental one (2 experts, one shared router) or the MTIL one (a router per task,
  the most-used experts frozen after each task, DDAS task routing at test time: per-task
  autoencoders on frozen features, with a fallback to the frozen model above a
  threshold). On a timm ViT or an open_clip image tower.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from clbench.strategies.base import CLStrategy, StrategyConfig
from clbench.strategies.lora import LoRAConfig, LoRAStrategy
from torch import nn

from clbench.adapters.experts import (
    AdapterMixture,
    MoRALinear,
    TaskAutoencoders,
    add_adapter_mixtures,
    routed,
)
from clbench.adapters.lora import LoRABlock, add_blocks, lora_layers
from clbench.checks import check_choice, check_positive
from clbench.data import TensorBatches, materialise
from clbench.errors import ConfigError
from clbench.models import ClassifierModel, ClipClassifier
from clbench.seeding import derived_generator


# ---------------------------------------------------------------------------- MoRA
@dataclass
class MoRAConfig(LoRAConfig):
    rank: int = 8  # rank-1 experts added per task and target linear
    alpha: float = 16.0
    lr: float = 3e-3
    loss_mask: str = "current"
    # The paper does not publish k, tau, delta; ours (see conf/strategy/mora.yaml):
    top_k: int = 8  # activation budget: at most k rank-1 experts act on a token
    tau: float = 0.5  # softmax temperature on the self-activation scores s_i in [-1, 1]
    delta: float = 0.0  # rank pruning: experts with s_i < delta are dropped for the token

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("strategy.top_k", self.top_k)
        check_positive("strategy.tau", self.tau)


class MoRA(LoRAStrategy):
    """Self-activated rank-1 LoRA experts; a new set per task, old ones frozen."""

    Config = MoRAConfig
    cfg: MoRAConfig

    def _add_blocks(self, model: nn.Module) -> list[LoRABlock]:
        root, tower = self.lora_root(model)
        c = self.cfg
        blocks = add_blocks(
            root, c.targets, c.rank, c.alpha, dropout=c.dropout, tower=tower, layer_cls=MoRALinear
        )
        for layer in lora_layers(model).values():
            layer.top_k, layer.tau, layer.delta = c.top_k, c.tau, c.delta
        return blocks

    def start_new_task(self) -> None:
        self.freeze_and_add_blocks()

    def num_inference_parameters(self) -> int:
        return CLStrategy.num_inference_parameters(self)  # input-dependent: nothing merges


# ----------------------------------------------------------------- MoE-Adapters
#: The official code's two recipes: the values of the fields a config leaves null.
#: class_incremental: JiazuoYu/MoE-Adapters4CL cil/ (2 experts, one shared router, no
#: freezing, no DDAS, label smoothing 0, 30 warm-up steps); mtil: its mtil/ (22 experts,
#: a router per task with DDAS at test, the 2 most used experts frozen after each task,
#: label smoothing 0.2, 100 warm-up steps).
MOE_RECIPES: dict[str, dict[str, Any]] = {
    "class_incremental": {
        "experts": 2,
        "routers": "shared",
        "freeze_top": 0,
        "label_smoothing": 0.0,
        "warmup_steps": 30,
    },
    "mtil": {
        "experts": 22,
        "routers": "per_task",
        "freeze_top": 2,
        "label_smoothing": 0.2,
        "warmup_steps": 100,
    },
}
ROUTERS = ("shared", "per_task")
DDAS_ROUTING = ("batch", "sample")


@dataclass
class MoEAdaptersConfig(StrategyConfig):
    # which official recipe fills the fields left null (None): see MOE_RECIPES
    recipe: str = "class_incremental"
    epochs: int = 20
    optimizer: str = "adamw"
    lr: float = 1e-3
    lr_schedule: str = "warmup_cosine"
    loss_mask: str = "current"
    label_smoothing: float | None = None  # type: ignore[assignment]
    experts: int | None = None
    top_k: int = 2
    bottleneck: int = 64
    adapter_scale: float = 0.1
    adapter_dropout: float = 0.1
    noisy_gating: bool = True
    # "shared": one router trained on every task; "per_task": a router per task (earlier
    # ones frozen), chosen at test by DDAS
    routers: str | None = None
    # weight of sum over layers of cv^2(importance) + cv^2(load); the official code computes
    # the term but never adds it (0), the paper adds it with 0.01
    balance: float = 0.0
    freeze_top: int | None = None  # experts frozen per layer after each task (most selected)
    warmup_steps: int | None = None  # linear warm-up steps of lr_schedule=warmup_cosine
    # DDAS (routers=per_task): one router per test batch from the batch-mean reconstruction
    # error (official code) or one per sample
    ddas_routing: str = "batch"
    # DDAS: per-task autoencoder D -> ae_hidden -> D on the frozen backbone's features
    ae_hidden: int = 32
    ae_steps: int = 300
    ae_lr: float = 1e-3
    # above this reconstruction error the input goes to the frozen model; null: never
    ae_threshold: float | None = None

    def __post_init__(self) -> None:
        check_choice("strategy.recipe", self.recipe, tuple(MOE_RECIPES))
        for key, value in MOE_RECIPES[self.recipe].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        super().__post_init__()
        for key in ("experts", "top_k", "bottleneck", "ae_hidden", "ae_steps"):
            check_positive(f"strategy.{key}", getattr(self, key))
        check_positive("strategy.adapter_scale", self.adapter_scale)
        check_positive("strategy.balance", self.balance, allow_zero=True)
        check_positive("strategy.freeze_top", self.freeze_top, allow_zero=True)
        check_positive("strategy.warmup_steps", self.warmup_steps, allow_zero=True)
        check_positive("strategy.ae_lr", self.ae_lr)
        check_choice("strategy.routers", self.routers, ROUTERS)
        check_choice("strategy.ddas_routing", self.ddas_routing, DDAS_ROUTING)
        if self.top_k > self.experts:  # type: ignore[operator]
            raise ConfigError(
                f"invalid value for strategy.top_k: {self.top_k}; must be <= experts={self.experts}"
            )


class MoEAdapters(CLStrategy):
    """Frozen backbone + routed adapter experts: one shared router, or one per task with
    DDAS picking the task's router at test (``strategy.routers``)."""

    Config = MoEAdaptersConfig
    cfg: MoEAdaptersConfig
    STATE = ("task", "frozen_experts")

    def prepare_model(self, model: ClassifierModel) -> None:
        c = self.cfg
        model.backbone.requires_grad_(False)
        self.mixtures: list[AdapterMixture] = add_adapter_mixtures(
            model,
            experts=c.experts,
            top_k=c.top_k,
            bottleneck=c.bottleneck,
            scale=c.adapter_scale,
            dropout=c.adapter_dropout,
            noisy=c.noisy_gating,
        )
        self.per_task = c.routers == "per_task"
        if self.per_task:
            model.task_autoencoders = TaskAutoencoders(self._feature_dim(model), c.ae_hidden)
        self.task = -1
        self.frozen_experts: list[list[int]] = [[] for _ in self.mixtures]
        # a plain ``model(x)`` (deployment, other evaluators) routes itself like evaluation
        self._self_routed = False
        model.register_forward_pre_hook(self._route_plain_call)
        model.register_forward_hook(self._end_plain_call)

    def _route_plain_call(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self.mixtures[0].task_ids is None:
            ids = self.route(args[0])
            for m in self.mixtures:
                m.task_ids = ids
            self._self_routed = True

    def _end_plain_call(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._self_routed:
            for m in self.mixtures:
                m.task_ids = None
            self._self_routed = False

    @staticmethod
    def _feature_dim(model: nn.Module) -> int:
        if isinstance(model, ClipClassifier):
            return int(model.backbone.visual.output_dim)
        return int(model.head.in_features)

    @property
    def autoencoders(self) -> TaskAutoencoders:
        return self.model.task_autoencoders

    def warmup_steps(self) -> int:
        return int(self.cfg.warmup_steps or 0)

    def adapt_to_experience(self) -> None:
        self.task += 1
        for m in self.mixtures:
            if self.per_task:
                m.routers.requires_grad_(False)  # earlier tasks' routers stay as they are
                m.add_router()
            elif len(m.routers) == 0:  # shared: one router, trained on every task
                m.add_router()
            m.counts.zero_()

    # ----------------------------------------------------------------- routing
    @torch.no_grad()
    def frozen_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features of the backbone with every expert off (the DDAS input)."""
        off = torch.full((x.shape[0],), -1, device=x.device)
        with routed(self.mixtures, off):
            if isinstance(self.model, ClipClassifier):
                return self.model.image_features(x)
            return self.model.backbone(x)

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) the router of each input (-1: experts off): the shared router; with a router
        per task, the current task's in training and DDAS's choice at test."""
        n = x.shape[0]
        if len(self.mixtures[0].routers) == 0:  # nothing learnt yet: the frozen model
            return torch.full((n,), -1, device=x.device)
        if not self.per_task:
            return torch.zeros(n, dtype=torch.long, device=x.device)
        if self.is_training or len(self.autoencoders.aes) == 0:
            return torch.full((n,), max(self.task, 0), device=x.device)
        return self.autoencoders.route(
            self.frozen_features(x),
            self.cfg.ae_threshold,
            per_batch=self.cfg.ddas_routing == "batch",
        )

    def forward(self) -> torch.Tensor:
        x = self.mb_x
        with routed(self.mixtures, self.route(x)):
            return self.model(x)

    def criterion(self) -> torch.Tensor:
        loss = super().criterion()
        if self.is_training and self.cfg.balance > 0:
            loss = loss + self.cfg.balance * sum(m.balance for m in self.mixtures)
        return loss

    # ---------------------------------------------------------- after a task
    def _after_training_exp(self, **kwargs: Any) -> None:
        for i, m in enumerate(self.mixtures):
            if self.cfg.freeze_top:
                self.frozen_experts[i] = sorted(
                    set(self.frozen_experts[i]) | set(m.freeze_most_used(self.cfg.freeze_top))
                )
        if self.per_task:
            self.fit_autoencoder()
        super()._after_training_exp(**kwargs)

    def fit_autoencoder(self) -> None:
        """DDAS: a new autoencoder on this experience's frozen training features."""
        was_training = self.model.training
        self.model.eval()
        x = materialise(self.experience.dataset.eval())[0]
        feats = torch.cat(
            [
                self.frozen_features(b[0].to(self.device))
                for b in TensorBatches([x], self.eval_mb_size, shuffle=False)
            ]
        )
        self.model.train(was_training)
        g = derived_generator(self.seed, 104729 + self.task)
        self.autoencoders.fit(feats, self.cfg.ae_steps, self.cfg.ae_lr, 64, g)
