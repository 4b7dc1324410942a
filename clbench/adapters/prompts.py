"""The shared prompt path for prompt learners (L2P; later DualPrompt, CODA-Prompt).

Everything works on a frozen timm ``VisionTransformer``:

- :func:`query_features`: the plain forward's pooled (CLS) feature, without prompts and
  without gradient: the "query" that selects prompts from a pool.
- :func:`prompted_tokens`: the ViT with prompt tokens inserted right after the prefix
  (CLS / register) tokens at the input: ``patch_embed -> _pos_embed -> concat prompts ->
  blocks -> norm``. Prompts carry no position embedding. Returns every token's output.
- :class:`PromptPool`: learnable keys and prompts; a query picks the top-k prompts by
  cosine similarity to the keys and yields the pull-constraint term: per query the sum
  over the k picks of ``1 - cos``, averaged over the batch (the official code's scale).

Prefix tuning (DualPrompt / CODA-Prompt) belongs here as well: it replaces the plain
``vit.blocks`` loop in :func:`prompted_tokens` by a per-block loop in which the chosen
blocks' attention gets extra key/value prefixes (a prompt of length ``2L`` split into a
key half and a value half, concatenated to that block's k and v only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from clbench.errors import ConfigError


def vit_of(model: nn.Module) -> VisionTransformer:
    """The timm ViT of ``model`` (itself or its ``.backbone``); ConfigError otherwise."""
    vit = getattr(model, "backbone", model)
    if not isinstance(vit, VisionTransformer):
        raise ConfigError(
            f"prompt learners need a timm VisionTransformer backbone, got {type(vit).__name__}"
        )
    return vit


@torch.no_grad()
def query_features(vit: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """(N, D) pooled features of the plain (unprompted) ViT, computed without gradient."""
    return vit.forward_head(vit.forward_features(x), pre_logits=True)


def prompted_tokens(
    vit: VisionTransformer, x: torch.Tensor, prompts: torch.Tensor | None = None
) -> torch.Tensor:
    """(N, prefix + P + patches, D) token outputs with ``prompts`` (N, P, D) after the prefix.

    With ``prompts=None`` (or P = 0) this is ``vit.forward_features(x)``.
    """
    tokens = vit.patch_drop(vit._pos_embed(vit.patch_embed(x)))
    if prompts is not None and prompts.shape[1] > 0:
        n = vit.num_prefix_tokens
        prompts = prompts.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([tokens[:, :n], prompts, tokens[:, n:]], dim=1)
    return vit.norm(vit.blocks(vit.norm_pre(tokens)))


@dataclass
class Selection:
    """The prompts a batch of queries picked from a :class:`PromptPool`."""

    index: torch.Tensor  # (N, top_k) pool indices
    prompts: torch.Tensor  # (N, top_k * length, D), in index order
    pull: torch.Tensor  # scalar: batch mean of sum over picks of 1 - cos(query, key)


class PromptPool(nn.Module):
    """``pool_size`` learnable (key, prompt) pairs; prompts are ``length`` tokens of ``dim``.

    Keys and prompts start uniform in [-1, 1] (the official L2P initialisation).
    """

    def __init__(self, pool_size: int, length: int, dim: int, top_k: int) -> None:
        super().__init__()
        if not 1 <= top_k <= pool_size:
            raise ConfigError(f"prompt top_k must be in [1, pool_size={pool_size}], got {top_k}")
        self.top_k = top_k
        self.length = length
        self.keys = nn.Parameter(torch.empty(pool_size, dim).uniform_(-1.0, 1.0))
        self.prompts = nn.Parameter(torch.empty(pool_size, length, dim).uniform_(-1.0, 1.0))

    def similarity(self, query: torch.Tensor) -> torch.Tensor:
        """(N, pool_size) cosine similarity between each query and each key."""
        return F.normalize(query, dim=-1) @ F.normalize(self.keys, dim=-1).T

    def select(self, query: torch.Tensor) -> Selection:
        """Top-k keys per query (by cosine), their prompts and the pull term."""
        sim = self.similarity(query.detach())
        top = sim.topk(self.top_k, dim=1)
        prompts = self.prompts[top.indices].flatten(1, 2)  # (N, k, L, D) -> (N, k L, D)
        return Selection(top.indices, prompts, (1.0 - top.values).sum(dim=1).mean())
