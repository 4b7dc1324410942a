"""LoRA-family learners on a frozen backbone (docs/methods.md, "LoRA family").

All of them are built from the shared blocks in ``clbench.adapters.lora``:

- ``lora``: sequential LoRA, the baseline: one LoRA trained on each experience in turn.
- ``olora``: O-LoRA (Wang et al. 2023): frozen past factors, a fresh rank-r pair per
  task, an L1 penalty on ``A_old A_new^T`` pushing the new subspace orthogonal to the old.
- ``sdlora``: SD-LoRA (ICLR 2025): past directions frozen and normalised, a learnable
  magnitude per task (shared by every layer and target, as in the official code).

On a CLIP backbone (:class:`~clbench.models.ClipClassifier`) ``tower`` picks where the
blocks go: the image tower, the text tower (the class-name classifier) or both. A
backbone with an image tower only (timm ViT) takes ``tower=image`` and refuses the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from clbench.strategies.base import CLStrategy, StrategyConfig
from torch import nn

from clbench.adapters.lora import (
    TOWERS,
    VALID_TARGETS,
    LoRABlock,
    LoRALinear,
    add_blocks,
    lora_layers,
    share_magnitude,
)
from clbench.checks import check_choice, check_positive
from clbench.errors import ConfigError
from clbench.models import ClassifierModel, ClipClassifier
from clbench.precision import full_precision


@dataclass
class LoRAConfig(StrategyConfig):
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["qkv", "proj", "fc1", "fc2"])
    # CLIP backbones: LoRA in the image tower, the text tower or both (others: image only)
    tower: str = "image"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("strategy.rank", self.rank)
        check_positive("strategy.alpha", self.alpha)
        for t in self.targets:
            check_choice("strategy.targets", t, VALID_TARGETS)
        check_choice("strategy.tower", self.tower, TOWERS)


class LoRAStrategy(CLStrategy):
    """Frozen backbone + LoRA blocks on the configured targets; the head trains."""

    Config = LoRAConfig
    cfg: LoRAConfig
    block_kwargs: ClassVar[dict[str, object]] = {}
    STATE = ("tasks_seen", "new_blocks")

    def prepare_model(self, model: ClassifierModel) -> None:
        self.check_tower(model)
        model.backbone.requires_grad_(False)
        self.tasks_seen = 0
        self.new_blocks: list[LoRABlock] = self._add_blocks(model)

    def check_tower(self, model: nn.Module) -> None:
        """Refuse a text / both tower on a backbone without a text tower."""
        if self.cfg.tower != "image" and not isinstance(model, ClipClassifier):
            raise ConfigError(
                f"strategy.tower={self.cfg.tower!r} needs a CLIP backbone (image and text "
                "towers); this backbone has an image tower only: use strategy.tower=image"
            )

    def lora_root(self, model: nn.Module) -> tuple[nn.Module, str | None]:
        """The module LoRA goes into and the tower argument of ``add_blocks``/``inject_lora``."""
        if isinstance(model, ClipClassifier):
            return model.backbone, self.cfg.tower
        return (model.backbone if isinstance(model, ClassifierModel) else model), None

    def _add_blocks(self, model: nn.Module) -> list[LoRABlock]:
        root, tower = self.lora_root(model)
        return add_blocks(
            root,
            self.cfg.targets,
            self.cfg.rank,
            self.cfg.alpha,
            dropout=self.cfg.dropout,
            tower=tower,
            **self.block_kwargs,
        )

    def lora_layers(self) -> dict[str, LoRALinear]:
        return lora_layers(self.model)

    def adapt_to_experience(self) -> None:
        if self.tasks_seen > 0:
            self.start_new_task()
        self.tasks_seen += 1

    def start_new_task(self) -> None:
        """Called before every experience but the first. Default: keep training."""

    def freeze_and_add_blocks(self) -> None:
        """Freeze every block so far and add a fresh trainable one per target
        (== concatenating A_old/A_new as rows and B_old/B_new as columns)."""
        for layer in self.lora_layers().values():
            layer.freeze_blocks()
        self.new_blocks = self._add_blocks(self.model)

    def num_inference_parameters(self) -> int:
        """Backbone + head parameters once every LoRA is merged into its base weight."""
        lora = {  # by identity: a parameter shared by blocks of several layers counts once
            id(p): p.numel()
            for layer in self.lora_layers().values()
            for p in layer.blocks.parameters()
        }
        return super().num_inference_parameters() - sum(lora.values())


@dataclass
class SequentialLoRAConfig(LoRAConfig):
    # After each experience: merge the LoRA into the frozen weights and start a fresh
    # one (True), or keep training the same LoRA on the next experience (False).
    merge_after_task: bool = False


class SequentialLoRA(LoRAStrategy):
    """One LoRA per target linear on a frozen backbone, trained on each experience in turn."""

    Config = SequentialLoRAConfig
    cfg: SequentialLoRAConfig

    def start_new_task(self) -> None:
        if self.cfg.merge_after_task:
            for layer in self.lora_layers().values():
                layer.merge_and_clear()
            self.new_blocks = self._add_blocks(self.model)


@dataclass
class OLoRAConfig(LoRAConfig):
    # weight of sum_layers ||A_old A_new^T||_1 (O-LoRA lamda_1) and of ||new params||_2
    l1: float = 0.5
    l2: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("strategy.l1", self.l1, allow_zero=True)
        check_positive("strategy.l2", self.l2, allow_zero=True)


class OLoRA(LoRAStrategy):
    """O-LoRA: a fresh LoRA per task kept orthogonal to the frozen past ones."""

    Config = OLoRAConfig
    cfg: OLoRAConfig

    def start_new_task(self) -> None:
        self.freeze_and_add_blocks()

    def orthogonality(self) -> torch.Tensor:
        """sum over layers and targets of the element-wise L1 norm of A_old A_new^T
        (in float32 under a mixed precision)."""
        total = torch.zeros(())
        with full_precision():
            for layer in self.lora_layers().values():
                new = [b for b in layer.blocks if b.A.requires_grad]
                old = [b for b in layer.blocks if not b.A.requires_grad]
                for n in new:
                    for o in old:
                        if o.out_slice == n.out_slice:  # same target (q with q, v with v)
                            total = total + (o.A @ n.A.T).abs().sum()
        return total

    def criterion(self) -> torch.Tensor:
        loss = super().criterion()
        if not self.is_training:
            return loss
        if self.cfg.l1 > 0:
            loss = loss + self.cfg.l1 * self.orthogonality()
        if self.cfg.l2 > 0:
            loss = loss + self.cfg.l2 * sum(
                torch.linalg.norm(p) for b in self.new_blocks for p in (b.A, b.B)
            )
        return loss


@dataclass
class SDLoRAConfig(LoRAConfig):
    # initial value of every magnitude a_i (SD-LoRA: 0.8)
    magnitude_init: float = 0.8
    # false (official code): one magnitude per task, shared by every layer and by q and v;
    # true (clbench's own variant): one magnitude per block (task, layer and target)
    magnitude_per_block: bool = False
    # true (official code): when a task starts, every past magnitude restarts at
    # magnitude_init; false: past magnitudes keep their learnt values
    reset_magnitudes: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("strategy.magnitude_init", self.magnitude_init)


class SDLoRA(LoRAStrategy):
    """SD-LoRA: frozen, normalised past directions with learnable magnitudes."""

    Config = SDLoRAConfig
    cfg: SDLoRAConfig
    STATE = ("tasks_seen", "new_blocks", "task_blocks")

    def prepare_model(self, model: ClassifierModel) -> None:
        self.block_kwargs = {"magnitude": self.cfg.magnitude_init}  # type: ignore[misc]
        super().prepare_model(model)
        self.task_blocks: list[list[LoRABlock]] = []
        self._track(self.new_blocks)

    def _track(self, blocks: list[LoRABlock]) -> None:
        """Record a task's blocks; share one magnitude among them (official layout)."""
        if not self.cfg.magnitude_per_block:
            share_magnitude(blocks)
        self.task_blocks.append(blocks)

    def magnitudes(self) -> list[nn.Parameter]:
        """The distinct magnitude parameters, oldest task first."""
        seen: dict[int, nn.Parameter] = {}
        for blocks in self.task_blocks:
            for b in blocks:
                assert b.magnitude is not None
                seen.setdefault(id(b.magnitude), b.magnitude)
        return list(seen.values())

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        if not self.cfg.magnitude_per_block:  # a restored model has one scalar per block
            for blocks in self.task_blocks:
                share_magnitude(blocks)

    def start_new_task(self) -> None:
        for b in self.new_blocks:
            # dW_i = a_i B_i A_i / (||B_i||_F ||A_i||_F): direction frozen, magnitude trains.
            # The switch to the normalised form is not function-preserving (the official
            # code rebuilds the model for each task and re-learns every a_i).
            b.A.requires_grad_(False)
            b.B.requires_grad_(False)
            b.normalized = True
        if self.cfg.reset_magnitudes:
            with torch.no_grad():
                for m in self.magnitudes():
                    m.fill_(self.cfg.magnitude_init)
        self.new_blocks = self._add_blocks(self.model)
        self._track(self.new_blocks)
