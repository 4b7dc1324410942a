"""Prompt learners on a frozen ViT (METHODS.md, "Prompt learners").

Built from the shared prompt path in ``clbench.adapters.prompts``:

- ``l2p``: L2P (Wang et al., CVPR 2022): a pool of (key, prompt) pairs; the frozen ViT's
  CLS feature of an input (the query) picks the top-k prompts by key cosine, they are
  prepended at the input, the head reads the average of the prompt tokens' outputs, and
  a pull constraint draws the selected keys towards their queries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from clbench.strategies.base import CLStrategy, StrategyConfig

from clbench.adapters.prompts import PromptPool, prompted_tokens, query_features, vit_of
from clbench.checks import check_positive
from clbench.models import ClassifierModel
from clbench.registry import STRATEGIES


@dataclass
class L2PConfig(StrategyConfig):
    lr: float = 0.03
    loss_mask: str = "current"
    pool_size: int = 10
    prompt_length: int = 5
    top_k: int = 5
    # weight of the pull constraint: batch mean of sum over the top-k of 1 - cos(query, key)
    pull: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("strategy.pool_size", self.pool_size)
        check_positive("strategy.prompt_length", self.prompt_length)
        check_positive("strategy.top_k", self.top_k)
        check_positive("strategy.pull", self.pull, allow_zero=True)


@STRATEGIES.register("l2p")
class L2P(CLStrategy):
    """Frozen ViT + a key-matched prompt pool prepended at the input; prompts, keys, head train."""

    Config = L2PConfig
    cfg: L2PConfig

    def prepare_model(self, model: ClassifierModel) -> None:
        vit = vit_of(model)
        model.backbone.requires_grad_(False)
        c = self.cfg
        # a submodule of the model: it moves with it and counts in its parameters
        model.prompt_pool = PromptPool(c.pool_size, c.prompt_length, vit.embed_dim, c.top_k)
        self.pull_term = torch.zeros(())
        self.last_selection: torch.Tensor | None = None

    @property
    def pool(self) -> PromptPool:
        return self.model.prompt_pool

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Average output of the prompt tokens; notes the selection and the pull term."""
        vit = vit_of(self.model)
        selection = self.pool.select(query_features(vit, x))  # the one query pass
        self.pull_term = selection.pull
        self.last_selection = selection.index
        tokens = prompted_tokens(vit, x, selection.prompts)
        n = vit.num_prefix_tokens
        return tokens[:, n : n + selection.prompts.shape[1]].mean(dim=1)

    def forward(self) -> torch.Tensor:
        return self.model.head(self.features(self.mb_x))

    def criterion(self) -> torch.Tensor:
        loss = super().criterion()
        if self.is_training and self.cfg.pull > 0:
            loss = loss + self.cfg.pull * self.pull_term
        return loss
