"""Sequential LoRA: the baseline of the LoRA family (METHODS.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

from clbench.strategies.base import CLStrategy, StrategyConfig

from clbench.adapters.lora import VALID_TARGETS, add_blocks, lora_layers
from clbench.checks import check_choice, check_positive
from clbench.models import ClassifierModel
from clbench.registry import STRATEGIES


@dataclass
class LoRAConfig(StrategyConfig):
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["qkv", "proj", "fc1", "fc2"])
    # After each experience: merge the LoRA into the frozen weights and start a fresh
    # one (True), or keep training the same LoRA on the next experience (False).
    merge_after_task: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("strategy.rank", self.rank)
        check_positive("strategy.alpha", self.alpha)
        for t in self.targets:
            check_choice("strategy.targets", t, VALID_TARGETS)


@STRATEGIES.register("lora")
class SequentialLoRA(CLStrategy):
    """One LoRA per target linear on a frozen backbone, trained on each experience in turn."""

    Config = LoRAConfig
    cfg: LoRAConfig

    def prepare_model(self, model: ClassifierModel) -> None:
        model.backbone.requires_grad_(False)
        self._add_lora(model)

    def _add_lora(self, model: ClassifierModel) -> None:
        add_blocks(
            model.backbone,
            self.cfg.targets,
            self.cfg.rank,
            self.cfg.alpha,
            dropout=self.cfg.dropout,
        )

    def _after_training_exp(self, **kwargs: object) -> None:
        if self.cfg.merge_after_task:
            for layer in lora_layers(self.model).values():
                layer.merge_and_clear()
            self._add_lora(self.model)
        super()._after_training_exp(**kwargs)

    def num_inference_parameters(self) -> int:
        """Backbone + head parameters once every LoRA is merged into its base weight."""
        lora = sum(
            p.numel()
            for layer in lora_layers(self.model).values()
            for p in layer.blocks.parameters()
        )
        return super().num_inference_parameters() - lora
