"""GS-LoRA and GS-LoRA++: continual forgetting with group-sparse LoRA (docs/methods.md,
"Continual forgetting"; official code github.com/bjzhb666/GS-LoRA).

- ``gs_lora`` (Zhao et al., CVPR 2024, arXiv 2403.11530): rank-r LoRA on the two MLP
  linears (fc1, fc2) of every transformer block; everything else, the head too, frozen.
  Each mini-batch is a retained batch and a forget batch (:class:`ErasureStrategy`'s
  ``paired`` mode); the loss is ``CE(retained) + beta_t ReLU(BND - CE(forget)) + alpha
  sum_blocks ||LoRA of the block||_2`` (group lasso, one group per transformer block: A and
  B of fc1 and fc2). Between requests the LoRA is merged into the frozen weights and
  re-initialised (official ``reinitialize_lora_parameters``: A kaiming-uniform with
  a = sqrt(50), B = 0); the first request's LoRA starts as loralib's (a = sqrt(5), B = 0).
- ``gs_lora_pp`` (GS-LoRA++, Zhao et al., T-PAMI, arXiv 2501.09705): plus the prototype
  term. Prototypes are the per-class mean feature (``model.backbone(x)``, the input of the
  head) of the request's training data under the model at the start of the request; with
  ``KL = KL(softmax(prototype_y) || softmax(feature))`` (batch mean), the loss adds
  ``w_f ReLU(BND_pro - KL(forget rows)) + w_r KL(retained rows)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from clbench.strategies.erasure import ErasureConfig, ErasureStrategy
from torch import nn

from clbench.adapters.lora import (
    VALID_TARGETS,
    add_blocks,
    group_lasso,
    lora_groups_by_block,
    lora_layers,
)
from clbench.checks import check_choice, check_positive
from clbench.data import materialise, read_batches
from clbench.errors import ConfigError
from clbench.models import ClassifierModel


@dataclass
class GSLoRAConfig(ErasureConfig):
    epochs: int = 10
    batch_size: int = 48
    optimizer: str = "adamw"
    lr: float = 1.0e-2
    weight_decay: float = 0.05
    lr_schedule: str = "cosine"
    # cosine schedule floor and linear warm-up (timm's CosineLRScheduler, stepped per epoch)
    min_lr: float = 1.0e-5
    warmup_epochs: int = 0
    warmup_lr: float = 1.0e-6
    rank: int = 8
    # LoRA scale = lora_alpha / rank (loralib's default lora_alpha = 1)
    lora_alpha: float = 1.0
    targets: list[str] = field(default_factory=lambda: ["fc1", "fc2"])
    # between requests A is re-drawn kaiming-uniform with this a (official: sqrt(50))
    reinit_kaiming_a: float = math.sqrt(50.0)
    # beta of request t: beta_list[t] (the last value for later requests)
    beta_list: list[float] = field(default_factory=lambda: [0.2, 0.25, 0.25, 0.2])
    bnd: float = 105.0
    # group-lasso weight; 0 before epoch alpha_start_epoch of each request
    alpha: float = 1.0e-4
    alpha_start_epoch: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("strategy.min_lr", self.min_lr, allow_zero=True)
        check_positive("strategy.warmup_epochs", self.warmup_epochs, allow_zero=True)
        check_positive("strategy.warmup_lr", self.warmup_lr, allow_zero=True)
        check_positive("strategy.rank", self.rank)
        check_positive("strategy.lora_alpha", self.lora_alpha)
        if not self.targets:
            raise ConfigError("strategy.targets is empty: GS-LoRA needs LoRA targets")
        for t in self.targets:
            check_choice("strategy.targets", t, VALID_TARGETS)
        check_positive("strategy.reinit_kaiming_a", self.reinit_kaiming_a, allow_zero=True)
        if not self.beta_list:
            raise ConfigError("strategy.beta_list is empty: give one beta per request")
        for b in self.beta_list:
            check_positive("strategy.beta_list", b, allow_zero=True)
        check_positive("strategy.bnd", self.bnd, allow_zero=True)
        check_positive("strategy.alpha", self.alpha, allow_zero=True)
        check_positive("strategy.alpha_start_epoch", self.alpha_start_epoch, allow_zero=True)


def per_request(values: list[float], t: int) -> float:
    """``values[t]``, or the last value when there are fewer entries than requests."""
    return float(values[min(t, len(values) - 1)])


def timm_cosine_lr(
    epoch: int, epochs: int, lr: float, min_lr: float, warmup_epochs: int, warmup_lr: float
) -> float:
    """The learning rate of ``epoch`` (0-based) under timm's CosineLRScheduler stepped per
    epoch (t_initial = ``epochs``, one cycle, warm-up not a prefix): linear from
    ``warmup_lr`` over the first ``warmup_epochs``, else
    ``min_lr + (lr - min_lr) (1 + cos(pi epoch / epochs)) / 2``."""
    if epoch < warmup_epochs:
        return warmup_lr + epoch * (lr - warmup_lr) / warmup_epochs
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * epoch / epochs))


class GSLoRA(ErasureStrategy):
    """GS-LoRA: group-sparse LoRA on the MLPs, merged and renewed at every request."""

    Config = GSLoRAConfig
    cfg: GSLoRAConfig
    data_mode = "paired"
    STATE = ("requests_seen",)

    # ---------------------------------------------------------------- model
    def prepare_model(self, model: ClassifierModel) -> None:
        if not isinstance(model, ClassifierModel):
            raise ConfigError(
                f"{self.cfg.name} needs a ClassifierModel (backbone + head), "
                f"got {type(model).__name__}"
            )
        model.backbone.requires_grad_(False)
        self.requests_seen = 0
        self._add_blocks(model.backbone)

    def _add_blocks(self, root: nn.Module) -> None:
        add_blocks(root, self.cfg.targets, self.cfg.rank, self.cfg.lora_alpha)

    @torch.no_grad()
    def merge_and_reinit(self) -> None:
        """Fold every LoRA into its frozen weight and start a fresh one: A kaiming-uniform
        (a = ``reinit_kaiming_a``), B = 0, so the model's function is unchanged."""
        root = self.model.backbone
        for layer in lora_layers(root).values():
            layer.merge_and_clear()
        self._add_blocks(root)
        for layer in lora_layers(root).values():
            for block in layer.blocks:
                nn.init.kaiming_uniform_(block.A, a=self.cfg.reinit_kaiming_a)
                nn.init.zeros_(block.B)

    def adapt_to_experience(self) -> None:
        if self.requests_seen > 0:
            self.merge_and_reinit()
        self.requests_seen += 1

    def num_inference_parameters(self) -> int:
        """The bare model's parameters: the LoRA merges into the frozen weights."""
        layers = lora_layers(self.model).values()
        lora = sum(p.numel() for layer in layers for p in layer.blocks.parameters())
        return super().num_inference_parameters() - lora

    # ------------------------------------------------------------- schedule
    def _before_training_epoch(self, **kwargs: Any) -> None:
        super()._before_training_epoch(**kwargs)
        if self.cfg.lr_schedule == "cosine":  # with timm's floor and warm-up
            c, e = self.cfg, self.clock.train_exp_epochs
            lr = timm_cosine_lr(e, self.train_epochs, c.lr, c.min_lr, c.warmup_epochs, c.warmup_lr)
            self._set_lr(lr / c.lr)

    # ----------------------------------------------------------------- loss
    @property
    def request_index(self) -> int:
        return int(self.experience.current_experience)

    def beta(self) -> float:
        return per_request(self.cfg.beta_list, self.request_index)

    def current_alpha(self) -> float:
        return self.cfg.alpha if self.clock.train_exp_epochs >= self.cfg.alpha_start_epoch else 0.0

    def structure_loss(self) -> torch.Tensor:
        """Group lasso over the trainable LoRA, one group per transformer block."""
        return group_lasso(lora_groups_by_block(self.model.backbone).values())

    def forget_loss(self) -> torch.Tensor:
        """ReLU(BND - CE(forget rows)) (0 without forget rows)."""
        logits, y = self.forget_part()
        if len(y) == 0:
            return self.mb_output.new_zeros(())
        return F.relu(self.cfg.bnd - F.cross_entropy(logits, y))

    def criterion(self) -> torch.Tensor:
        loss = super().criterion()  # training: CE on the retained rows
        if not self.is_training:
            return loss
        loss = loss + self.beta() * self.forget_loss()
        alpha = self.current_alpha()
        if alpha > 0:
            loss = loss + alpha * self.structure_loss().to(loss.device)
        return loss


# ----------------------------------------------------------------- GS-LoRA++
@dataclass
class GSLoRAPPConfig(GSLoRAConfig):
    # w_f of request t: proto_forget_weights[t] (the last value for later requests)
    proto_forget_weights: list[float] = field(default_factory=lambda: [0.01])
    proto_retain_weight: float = 0.0
    proto_bnd: float = 18.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.proto_forget_weights:
            raise ConfigError("strategy.proto_forget_weights is empty: give one per request")
        for w in self.proto_forget_weights:
            check_positive("strategy.proto_forget_weights", w, allow_zero=True)
        check_positive("strategy.proto_retain_weight", self.proto_retain_weight, allow_zero=True)
        check_positive("strategy.proto_bnd", self.proto_bnd, allow_zero=True)


def prototype_kl(
    features: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor
) -> torch.Tensor:
    """KL(softmax(prototypes[labels]) || softmax(features)), summed over the feature
    dimension and averaged over the rows (engine_cl.get_prototype_loss: ``F.kl_div(
    log_softmax(feature), log_softmax(prototype), "batchmean", log_target=True)``)."""
    return F.kl_div(
        F.log_softmax(features, dim=1),
        F.log_softmax(prototypes[labels], dim=1),
        reduction="batchmean",
        log_target=True,
    )


@torch.no_grad()
def class_prototypes(
    backbone: nn.Module, batches: Iterable[Sequence[torch.Tensor]], num_classes: int
) -> torch.Tensor:
    """Per-class mean of ``backbone(x)`` over ``batches`` of ``(x, y, ...)`` (eval mode, as
    util/utils.calculate_prototypes); rows of classes without a sample are zero."""
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    sums: torch.Tensor | None = None
    counts = torch.zeros(num_classes)
    for batch in batches:
        x, y = batch[0].to(device), batch[1].long()
        f = backbone(x)
        if sums is None:
            sums = f.new_zeros(num_classes, f.shape[1])
        sums.index_add_(0, y.to(device), f)
        counts += torch.bincount(y.cpu(), minlength=num_classes).float()
    backbone.train(was_training)
    if sums is None:
        raise ValueError("no sample to compute prototypes from")
    return sums / counts.clamp(min=1).to(sums)[:, None]


class GSLoRAPP(GSLoRA):
    """GS-LoRA++: GS-LoRA plus prototype regularisation of the features."""

    Config = GSLoRAPPConfig
    cfg: GSLoRAPPConfig
    STATE = ("requests_seen", "prototypes")

    def prepare_model(self, model: ClassifierModel) -> None:
        super().prepare_model(model)
        self.prototypes = torch.zeros(0)
        self.mb_features = torch.zeros(0)

    def adapt_to_experience(self) -> None:
        super().adapt_to_experience()  # merged and renewed: B = 0, the request's start model
        self.prototypes = class_prototypes(
            self.model.backbone, self.experience_batches(), self.model.head.num_classes
        )

    def experience_batches(self) -> Iterator[Sequence[torch.Tensor]]:
        """The current experience's samples (forget and retained), ``eval_batch_size`` at a
        time, in dataset order; a lazy experience is read through a DataLoader."""
        size = self.cfg.eval_batch_size
        if self.in_memory:
            x, y = materialise(self.adapted_dataset)[:2]
            for i in range(0, len(x), size):
                yield x[i : i + size], y[i : i + size]
            return
        n = len(self.adapted_dataset)
        chunks = [list(range(i, min(i + size, n))) for i in range(0, n, size)]
        yield from read_batches(self.adapted_dataset, chunks, self.loader_workers)

    def forward(self) -> torch.Tensor:
        """The logits, keeping the features (the head's input) for the prototype term."""
        self.mb_features = self.model.backbone(self.mb_x)
        return self.model.head(self.mb_features)

    def prototype_terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """KL to the prototypes on the forget rows and on the retained rows (0 if none)."""
        out = []
        for rows in (self.forget_mask, ~self.forget_mask):
            if not bool(rows.any()):
                out.append(self.mb_features.new_zeros(()))
                continue
            out.append(prototype_kl(self.mb_features[rows], self.mb_y[rows], self.prototypes))
        return out[0], out[1]

    def prototype_loss(self, t: int) -> torch.Tensor:
        """``w_f ReLU(BND_pro - KL(forget rows)) + w_r KL(retained rows)`` at request ``t``."""
        kl_forget, kl_retain = self.prototype_terms()
        w_f = per_request(self.cfg.proto_forget_weights, t)
        return (
            w_f * F.relu(self.cfg.proto_bnd - kl_forget) + self.cfg.proto_retain_weight * kl_retain
        )

    def criterion(self) -> torch.Tensor:
        loss = super().criterion()
        if not self.is_training:
            return loss
        return loss + self.prototype_loss(self.request_index)
