"""The shared prompt path for prompt learners (L2P, DualPrompt, CODA-Prompt).

Everything works on a frozen timm ``VisionTransformer``:

- :func:`query_features`: the plain forward's pooled (CLS) feature, without prompts and
  without gradient: the "query" that selects prompts from a pool. :class:`QueryCache`
  memoises it per input, so a frozen backbone's query pass runs once per training
  sample rather than once per epoch.
- :func:`prompted_tokens`: the ViT with **prompt tuning** (tokens inserted right after the
  prefix (CLS / register) tokens at the input: ``patch_embed -> _pos_embed -> concat
  prompts -> blocks -> norm``; the prompts get ``prompt_pos`` added, none by default;
  L2P passes :func:`cls_position_embedding`) and/or **prefix tuning** (per chosen block,
  extra key and value tokens concatenated to that block's attention keys and values only;
  the sequence length is unchanged). Returns every token's output.
- :class:`PromptPool`: learnable keys and prompts; a query picks the top-k prompts by
  cosine similarity to the keys (or, batch-wise, every query gets the k ids most often
  picked in its batch: :func:`batch_vote`) and yields the pull-constraint term: per query
  the sum over the k picks of ``1 - cos``, averaged over the batch (the official code's
  scale).
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import nn

from clbench.errors import ConfigError
from clbench.precision import full_precision


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
    """(N, D) pooled features of the plain (unprompted) ViT, without gradient, in eval mode
    (the official codes query a separate frozen model in eval mode)."""
    was_training = vit.training
    vit.eval()
    try:
        return vit.forward_head(vit.forward_features(x), pre_logits=True)
    finally:
        vit.train(was_training)


#: per block index: (key prefix, value prefix), each (N or 1, L, D)
Prefixes = Mapping[int, tuple[torch.Tensor, torch.Tensor]]


def prefix_attention(
    attn: Attention, x: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor
) -> torch.Tensor:
    """timm ``Attention.forward`` with ``prefix_k`` / ``prefix_v`` (N or 1, L, D) prepended
    to the keys and values of every head (queries and output length are unchanged)."""
    b, n, _ = x.shape
    h, d = attn.num_heads, attn.head_dim
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn.qkv(x).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)

    def heads(p: torch.Tensor) -> torch.Tensor:
        p = p.to(x.dtype).expand(b, -1, -1)
        return p.reshape(b, p.shape[1], h, d).transpose(1, 2)

    k = torch.cat([heads(prefix_k), k], dim=2)
    v = torch.cat([heads(prefix_v), v], dim=2)
    drop = attn.attn_drop.p if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
    out = attn.norm(out.transpose(1, 2).reshape(b, n, -1))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def prefixed_block(
    block: Block, x: torch.Tensor, prefix: tuple[torch.Tensor, torch.Tensor] | None
) -> torch.Tensor:
    """timm ``Block.forward`` whose attention takes ``prefix`` (plain forward for None)."""
    if prefix is None:
        return block(x)
    x = x + block.drop_path1(block.ls1(prefix_attention(block.attn, block.norm1(x), *prefix)))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def cls_position_embedding(vit: VisionTransformer) -> torch.Tensor | None:
    """(D,) the position embedding the ViT adds to its CLS token; None when it adds none
    (no CLS token, no position embedding, or ``no_embed_class``)."""
    if vit.cls_token is None or vit.pos_embed is None or vit.no_embed_class:
        return None
    return vit.pos_embed[0, 0]


def prompted_tokens(
    vit: VisionTransformer,
    x: torch.Tensor,
    prompts: torch.Tensor | None = None,
    prefixes: Prefixes | None = None,
    prompt_pos: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N, prefix + P + patches, D) token outputs with ``prompts`` (N, P, D) after the
    prefix tokens, each prompt token plus ``prompt_pos`` (D,) when given, and
    ``prefixes`` in the attention of the given blocks.

    With neither (or P = 0 and no prefixes) this is ``vit.forward_features(x)``.
    """
    tokens = vit.patch_drop(vit._pos_embed(vit.patch_embed(x)))
    if prompts is not None and prompts.shape[1] > 0:
        n = vit.num_prefix_tokens
        prompts = prompts.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        if prompt_pos is not None:
            prompts = prompts + prompt_pos.to(tokens.dtype)
        tokens = torch.cat([tokens[:, :n], prompts, tokens[:, n:]], dim=1)
    tokens = vit.norm_pre(tokens)
    if not prefixes:
        return vit.norm(vit.blocks(tokens))
    bad = [i for i in prefixes if not 0 <= i < len(vit.blocks)]
    if bad:
        raise ConfigError(
            f"prefix layer {bad[0]} out of range: the ViT has {len(vit.blocks)} blocks"
        )
    for i, block in enumerate(vit.blocks):
        tokens = prefixed_block(block, tokens, prefixes.get(i))
    return vit.norm(tokens)


def usable_layers(layers: list[int], depth: int, what: str) -> list[int]:
    """``layers`` within a ``depth``-block ViT; the official ViT-B/16 lists (up to block 4)
    are cut to the blocks the backbone has, with one warning line. Negative: ConfigError."""
    if any(i < 0 for i in layers):
        raise ConfigError(f"{what} must be block indices >= 0, got {layers}")
    kept = sorted({i for i in layers if i < depth})
    if len(kept) < len(set(layers)):
        dropped = sorted({i for i in layers if i >= depth})
        print(
            f"warning: {what} {dropped} dropped: the backbone has {depth} blocks", file=sys.stderr
        )
    return kept


class QueryCache:
    """Memo of a frozen backbone's query features, keyed by a hash of each input's bytes.

    Valid only while the function is a pure function of the input (a frozen backbone in
    eval mode); inputs repeated across epochs then cost one query pass in all. Holds at
    most ``max_items`` features (then it stops adding). ``passes`` counts the samples the
    function actually ran on, ``hits`` those served from the memo.
    """

    def __init__(self, max_items: int = 200_000) -> None:
        self.max_items = max_items
        self.store: dict[bytes, torch.Tensor] = {}
        self.passes = 0
        self.hits = 0

    @staticmethod
    def keys(x: torch.Tensor) -> list[bytes]:
        rows = x.detach().to("cpu").contiguous().flatten(1).numpy()
        return [hashlib.blake2b(r.tobytes(), digest_size=16).digest() for r in rows]

    def __call__(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        keys = self.keys(x)
        missing = [i for i, k in enumerate(keys) if k not in self.store]
        self.passes += len(missing)
        self.hits += len(keys) - len(missing)
        fresh: dict[bytes, torch.Tensor] = {}
        if missing:
            feats = fn(x[missing]).detach()
            fresh = {keys[i]: f for i, f in zip(missing, feats, strict=True)}
            if len(self.store) + len(fresh) <= self.max_items:
                self.store.update(fresh)
        return torch.stack([fresh[k] if k in fresh else self.store[k] for k in keys])


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
        """(N, pool_size) cosine similarity between each query and each key, in float32
        (the top-k choice must not turn on half-precision rounding)."""
        with full_precision():
            return F.normalize(query.float(), dim=-1) @ F.normalize(self.keys, dim=-1).T

    def select(self, query: torch.Tensor, batchwise: bool = False) -> Selection:
        """Top-k keys per query (by cosine), their prompts and the pull term; with
        ``batchwise`` every query gets the batch's :func:`batch_vote` instead."""
        sim = self.similarity(query.detach())
        index = sim.topk(self.top_k, dim=1).indices
        if batchwise:
            index = batch_vote(index, sim.shape[1]).expand(index.shape[0], -1).contiguous()
        return self._selection(index, sim.gather(1, index))

    def pick(self, query: torch.Tensor, index: torch.Tensor) -> Selection:
        """The prompts at ``index`` (N, k) whatever the keys say (DualPrompt's task-id
        bootstrap in training), with the pull term towards those keys."""
        sim = self.similarity(query.detach()).gather(1, index)
        return self._selection(index, sim)

    def _selection(self, index: torch.Tensor, cos: torch.Tensor) -> Selection:
        prompts = self.prompts[index].flatten(1, 2)  # (N, k, L, D) -> (N, k L, D)
        return Selection(index, prompts, (1.0 - cos).sum(dim=1).mean())


def batch_vote(index: torch.Tensor, pool_size: int) -> torch.Tensor:
    """(k,) the k pool ids most frequent in ``index`` (N, k), most frequent first, ties to
    the lower id: the official L2P / DualPrompt ``batchwise_prompt``, whose ids every
    sample of the batch then uses (the official code leaves ties to ``torch.topk``)."""
    counts = torch.bincount(index.flatten(), minlength=pool_size)
    return torch.sort(counts, descending=True, stable=True).indices[: index.shape[1]]


@torch.no_grad()
def gram_schmidt_(weight: torch.Tensor, start: int, stop: int, generator: torch.Generator) -> None:
    """In place: rows ``start:stop`` of ``weight`` (flattened per row) become random unit
    vectors orthogonal to every earlier row and to each other (CODA-Prompt's initialisation
    of a task's new components). Needs ``stop <= row width``."""
    flat = weight.view(weight.shape[0], -1)
    if stop > flat.shape[1]:
        raise ConfigError(
            f"cannot keep {stop} components of width {flat.shape[1]} orthogonal: "
            f"use at most {flat.shape[1]} components"
        )
    # an orthonormal basis of the span of the earlier rows (trained, so no longer
    # orthogonal to each other): QR, then each new vector is projected off it
    basis = torch.zeros(flat.shape[1], 0, dtype=torch.float64)
    if start > 0:
        basis = torch.linalg.qr(flat[:start].double().cpu().T).Q
    for i in range(start, stop):
        while True:
            v = torch.randn(flat.shape[1], generator=generator, dtype=torch.float64)
            for _ in range(2):  # projecting twice is numerically orthogonal
                v = v - basis @ (basis.T @ v)
            if v.norm() > 1e-6:
                break
        v = v / v.norm()
        basis = torch.cat([basis, v[:, None]], dim=1)
        flat[i] = v.to(flat.dtype)
