"""One LoRA building block for every LoRA-family method.

``LoRALinear`` wraps a frozen ``nn.Linear`` and holds a list of rank blocks. Each
block is ``B @ A`` (A: in -> r down-projection, B: r -> out up-projection) scaled by
``alpha / r``, optionally with a per-rank gate vector and a scalar magnitude, and
optionally writing only a slice of the output (so a fused qkv projection can carry
LoRA on q, k or v alone). Past blocks are frozen, the current one trains; ``merge()``
folds every block into the base weight for zero inference overhead.

Two backbone layouts are understood, and may be mixed in one model:

- timm ViT: ``blocks[i].attn.qkv`` / ``attn.proj`` / ``mlp.fc1`` / ``mlp.fc2`` are plain
  linears and are wrapped in place.
- open_clip towers: ``resblocks[i].attn`` is an ``nn.MultiheadAttention`` whose forward reads
  the fused ``in_proj_weight`` directly, so it is first swapped for
  :class:`LoRAMultiheadAttention` (same call signature, the same parameter objects, the
  projections called as modules); its ``in_proj`` / ``out_proj`` and ``mlp.c_fc`` /
  ``mlp.c_proj`` are then wrapped like any linear.

Target names are shared (``proj``/``out_proj``, ``fc1``/``c_fc``, ``fc2``/``c_proj`` are
aliases), so one strategy config applies to either backbone; the target tables, name
matching, tower selection and the module swap are :mod:`clbench.adapters.inject`'s.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clbench.adapters.inject import (
    ATTENTION_TARGETS,
    check_targets,
    matches,
    replace_modules,
    target_specs,
    target_suffixes,
)
from clbench.adapters.inject import TOWERS as TOWERS  # re-exported
from clbench.adapters.inject import VALID_TARGETS as VALID_TARGETS  # re-exported


class LoRABlock(nn.Module):
    """One rank-r update ``scale * m * B diag(gate) A`` on (a slice of) a linear's output.

    ``m`` is the optional learnable magnitude; with ``normalized`` the direction is
    divided by ``||B||_F ||A||_F`` (SD-LoRA).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        out_slice: tuple[int, int] | None = None,
        gated: bool = False,
        magnitude: float | None = None,
        normalized: bool = False,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.rank = rank
        self.scale = alpha / rank
        self.out_slice = out_slice
        self.out_features = out_features
        width = out_features if out_slice is None else out_slice[1] - out_slice[0]
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(width, rank))
        # PEFT / O-LoRA initialisation: A kaiming-uniform(a=sqrt(5)), B = 0.
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.gate = nn.Parameter(torch.ones(rank)) if gated else None
        self.magnitude = (
            nn.Parameter(torch.tensor(float(magnitude))) if magnitude is not None else None
        )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # SD-LoRA: the direction B A enters divided by ||B||_F ||A||_F
        self.normalized = normalized

    def spec(self) -> dict[str, object]:
        """The block's constructor arguments (its shape and form, no values)."""
        return {
            "rank": self.rank,
            "alpha": self.scale * self.rank,
            "dropout": float(self.dropout.p) if isinstance(self.dropout, nn.Dropout) else 0.0,
            "out_slice": None if self.out_slice is None else list(self.out_slice),
            "gated": self.gate is not None,
            "magnitude": None if self.magnitude is None else float(self.magnitude.detach()),
            "normalized": self.normalized,
        }

    def _coef(self) -> torch.Tensor | float:
        coef = self.scale if self.magnitude is None else self.scale * self.magnitude
        if self.normalized:
            coef = coef / (torch.linalg.norm(self.B) * torch.linalg.norm(self.A)).clamp_min(1e-12)
        return coef

    def delta_weight(self) -> torch.Tensor:
        """The (out_features, in_features) update this block adds to the base weight."""
        a = self.A if self.gate is None else self.A * self.gate[:, None]
        d = (self.B @ a) * self._coef()
        if self.out_slice is None:
            return d
        lo, hi = self.out_slice
        return F.pad(d, (0, 0, lo, self.out_features - hi))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's contribution to the (full-width) output for input ``x``."""
        h = F.linear(self.dropout(x), self.A)
        if self.gate is not None:
            h = h * self.gate
        return self.project(h)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """Rank activations (..., rank) -> the scaled full-width output ``coef * B h``."""
        d = F.linear(h, self.B) * self._coef()
        if self.out_slice is None:
            return d
        lo, hi = self.out_slice
        return F.pad(d, (lo, self.out_features - hi))


class LoRALinear(nn.Module):
    """A frozen linear layer plus a list of LoRA rank blocks."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.blocks = nn.ModuleList()
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def add_block(self, rank: int, alpha: float, **kwargs: object) -> LoRABlock:
        """Append a new trainable block (earlier blocks keep their requires_grad)."""
        if self.merged:
            raise RuntimeError("unmerge() before adding a block to a merged LoRALinear")
        w = self.base.weight
        block = LoRABlock(self.in_features, self.out_features, rank, alpha, **kwargs)  # type: ignore[arg-type]
        self.blocks.append(block.to(device=w.device, dtype=w.dtype))
        return block

    def structure(self) -> dict[str, object]:
        """Its blocks' shapes and the merge flag, for a checkpoint (``adapters.state``)."""
        return {"merged": self.merged, "blocks": [b.spec() for b in self.blocks]}

    def restore_structure(self, spec: dict[str, object]) -> None:
        """Rebuild the block list to ``spec`` (values come from the checkpoint's tensors)."""
        blocks = list(spec["blocks"])  # type: ignore[call-overload]
        if [b.spec() for b in self.blocks] != blocks or self.merged != spec["merged"]:
            self.blocks = nn.ModuleList()
            self.merged = False
            for b in blocks:
                kw = dict(b)
                out_slice = kw.pop("out_slice")
                self.add_block(
                    int(kw.pop("rank")),
                    float(kw.pop("alpha")),
                    out_slice=None if out_slice is None else tuple(out_slice),
                    **kw,
                )
            self.merged = bool(spec["merged"])

    def freeze_blocks(self) -> None:
        for b in self.blocks:
            b.requires_grad_(False)

    def delta_weight(self) -> torch.Tensor:
        d = torch.zeros_like(self.base.weight)
        for b in self.blocks:
            d = d + b.delta_weight()
        return d

    @torch.no_grad()
    def merge(self) -> None:
        """Fold every block into the base weight; forward then costs one plain linear."""
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False

    @torch.no_grad()
    def merge_and_clear(self) -> None:
        """Merge every block into the base weight for good and drop the blocks."""
        self.merge()
        self.blocks = nn.ModuleList()
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        for b in self.blocks:
            y = y + b(x)
        return y


class LoRAMultiheadAttention(nn.Module):
    """Drop-in for a fused ``nn.MultiheadAttention`` whose projections are called as modules.

    ``in_proj`` is an ``nn.Linear`` over the original ``in_proj_weight`` / ``in_proj_bias``
    parameter objects (rows q, k, v) and ``out_proj`` is the original module, so either can be
    wrapped in a :class:`LoRALinear` and ``merge()`` folds the update into the very weight
    inference uses. Call signature and return value are ``nn.MultiheadAttention.forward``'s
    (masks, ``batch_first``, unbatched input, dropout); attention runs through
    ``F.scaled_dot_product_attention``, or an explicit softmax when ``need_weights``.
    """

    _qkv_same_embed_dim = True
    bias_k = None
    bias_v = None
    add_zero_attn = False

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        if not self.supports(mha):
            raise ValueError(
                "LoRA needs a fused-in-projection nn.MultiheadAttention "
                "(kdim = vdim = embed_dim, no bias_k/bias_v, no add_zero_attn)"
            )
        self.embed_dim = mha.embed_dim
        self.kdim = self.vdim = mha.embed_dim
        self.num_heads = mha.num_heads
        self.head_dim = mha.head_dim
        self.dropout = mha.dropout
        self.batch_first = mha.batch_first
        has_bias = mha.in_proj_bias is not None
        in_proj = nn.Linear(self.embed_dim, 3 * self.embed_dim, bias=has_bias, device="meta")
        in_proj.weight = mha.in_proj_weight
        if has_bias:
            in_proj.bias = mha.in_proj_bias
        self.in_proj: nn.Linear | LoRALinear = in_proj
        self.out_proj: nn.Linear | LoRALinear = mha.out_proj
        self.train(mha.training)

    @staticmethod
    def supports(mha: nn.MultiheadAttention) -> bool:
        """Whether ``mha`` has the fused layout this module reproduces exactly."""
        return mha._qkv_same_embed_dim and mha.bias_k is None and not mha.add_zero_attn

    @property
    def in_proj_weight(self) -> torch.Tensor:
        return self.in_proj.weight

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        return self.in_proj.bias

    def to_multihead_attention(self) -> nn.MultiheadAttention:
        """An ``nn.MultiheadAttention`` on the same parameter objects (LoRA unloaded first)."""
        if isinstance(self.in_proj, LoRALinear) or isinstance(self.out_proj, LoRALinear):
            raise RuntimeError("unload the LoRALinear projections first (see unload_lora)")
        mha = nn.MultiheadAttention(
            self.embed_dim,
            self.num_heads,
            dropout=self.dropout,
            bias=self.in_proj.bias is not None,
            batch_first=self.batch_first,
            device="meta",
        )
        mha.in_proj_weight = self.in_proj.weight
        mha.in_proj_bias = self.in_proj.bias
        mha.out_proj = self.out_proj
        return mha.train(self.training)

    def _project(self, x: torch.Tensor, part: int) -> torch.Tensor:
        """Rows ``part`` (0 q, 1 k, 2 v) of the in-projection of ``x`` (cross-attention)."""
        lo, hi = part * self.embed_dim, (part + 1) * self.embed_dim
        proj = self.in_proj
        if isinstance(proj, LoRALinear) and not proj.merged and len(proj.blocks) > 0:
            return proj(x)[..., lo:hi]
        bias = proj.bias
        return F.linear(x, proj.weight[lo:hi], None if bias is None else bias[lo:hi])

    def _additive_mask(
        self,
        attn_mask: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None,
        is_causal: bool,
        shape: tuple[int, int, int],
        like: torch.Tensor,
    ) -> torch.Tensor | None:
        """One float mask broadcastable to (N, H, L, S); bool entries True mean "masked"."""
        n, length, src = shape

        def additive(m: torch.Tensor) -> torch.Tensor:
            if m.dtype != torch.bool:
                return m.to(like.dtype)
            return torch.zeros(m.shape, dtype=like.dtype, device=like.device).masked_fill_(
                m, float("-inf")
            )

        if attn_mask is None and is_causal:
            attn_mask = torch.ones(length, src, dtype=torch.bool, device=like.device).triu_(1)
        mask = None
        if attn_mask is not None:
            mask = additive(attn_mask)
            if mask.dim() == 3:  # (N * H, L, S)
                mask = mask.view(n, self.num_heads, length, src)
        if key_padding_mask is not None:
            pad = additive(key_padding_mask).view(n, 1, 1, src)
            mask = pad if mask is None else mask + pad
        return mask

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        self_attention = query is key and key is value
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        if self_attention:  # one fused matmul, as in nn.MultiheadAttention
            q, k, v = self.in_proj(query).chunk(3, dim=-1)
        else:
            q, k, v = self._project(query, 0), self._project(key, 1), self._project(value, 2)
        n, length, _ = q.shape
        src = k.shape[1]
        h, d = self.num_heads, self.head_dim
        q = q.reshape(n, length, h, d).transpose(1, 2)
        k = k.reshape(n, src, h, d).transpose(1, 2)
        v = v.reshape(n, src, h, d).transpose(1, 2)
        mask = self._additive_mask(attn_mask, key_padding_mask, is_causal, (n, length, src), q)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * d**-0.5) @ k.transpose(-2, -1)
            attn = (scores if mask is None else scores + mask).softmax(dim=-1)
            out = F.dropout(attn, p) @ v if p > 0 else attn @ v
            weights = attn.mean(dim=1) if average_attn_weights else attn
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, self.embed_dim))
        if unbatched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}"


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """All LoRALinear modules of ``model`` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def inject_lora(
    model: nn.Module,
    targets: Sequence[str],
    tower: str | None = None,
    layer_cls: type[LoRALinear] = LoRALinear,
) -> dict[str, LoRALinear]:
    """Wrap every linear named by ``targets`` in ``model`` with LoRALinear.

    ``model`` is a timm ViT, an open_clip CLIP model or tower, or any module holding their
    blocks. ``tower`` restricts a CLIP model to ``"image"`` (``model.visual``), ``"text"``
    (everything outside ``model.visual``) or ``"both"``; ``None`` means the whole model.
    Attention targets first swap each open_clip ``*.attn`` ``nn.MultiheadAttention`` for a
    :class:`LoRAMultiheadAttention` (a non-fused one, e.g. a cross-attention pooler with
    another key width, is left alone). Returns ``{module name: LoRALinear}`` for the wrapped
    modules (idempotent: layers already wrapped are reused). ``layer_cls`` is the wrapper
    (a LoRALinear subclass that combines its blocks differently, e.g. MoRA). Blocks are
    added separately with :func:`add_blocks`.
    """
    check_targets(targets, "LoRA")
    if any(t in ATTENTION_TARGETS for t in targets):
        replace_modules(
            model,
            LoRAMultiheadAttention,
            suffixes=["attn"],
            types=nn.MultiheadAttention,
            tower=tower,
            where=LoRAMultiheadAttention.supports,
        )

    def wrap(module: nn.Module) -> LoRALinear:
        return module if isinstance(module, LoRALinear) else layer_cls(module)

    wrapped: dict[str, LoRALinear] = replace_modules(  # type: ignore[assignment]
        model, wrap, suffixes=target_suffixes(targets), types=(LoRALinear, nn.Linear), tower=tower
    )
    if not wrapped:
        raise ValueError(f"no layer of the model matches LoRA targets {list(targets)}")
    return wrapped


def add_blocks(
    model: nn.Module,
    targets: Sequence[str],
    rank: int,
    alpha: float,
    *,
    tower: str | None = None,
    layer_cls: type[LoRALinear] = LoRALinear,
    **kwargs: object,
) -> list[LoRABlock]:
    """Inject (if needed) and add one new block per target; q/k/v get output slices.

    ``tower`` and ``layer_cls`` are :func:`inject_lora`'s; ``kwargs`` go to
    :meth:`LoRALinear.add_block`.
    """
    layers = inject_lora(model, targets, tower, layer_cls)
    blocks: list[LoRABlock] = []
    for target in targets:
        for suffix, part in target_specs(target):
            for name, layer in layers.items():
                if not matches(name, suffix):
                    continue
                out_slice = None
                if part is not None:
                    width = layer.out_features // 3
                    out_slice = (part * width, (part + 1) * width)
                blocks.append(layer.add_block(rank, alpha, out_slice=out_slice, **kwargs))
    return blocks


def share_magnitude(blocks: Sequence[LoRABlock]) -> nn.Parameter:
    """Make every block of ``blocks`` use the first one's magnitude: one learnable scalar
    for all of them (SD-LoRA's one magnitude per task, shared by every layer and target).

    The parameter is registered in each block, so ``model.parameters()`` yields it once
    and dropping the blocks (``merge_and_clear``) drops it. It trains if any block's did.
    """
    if not blocks or any(b.magnitude is None for b in blocks):
        raise ValueError("share_magnitude needs blocks built with a magnitude")
    shared = blocks[0].magnitude
    assert shared is not None
    shared.requires_grad_(any(b.magnitude.requires_grad for b in blocks))  # type: ignore[union-attr]
    for b in blocks[1:]:
        b.magnitude = shared
    return shared


def merge_all(layers: Iterable[LoRALinear]) -> None:
    for layer in layers:
        layer.merge_and_clear()


@torch.no_grad()
def unload_lora(model: nn.Module) -> None:
    """Merge every LoRA into its weight for good and restore the bare backbone's modules.

    Each LoRALinear becomes its (merged) base ``nn.Linear`` and each
    LoRAMultiheadAttention an ``nn.MultiheadAttention`` on the same parameters, so
    ``model`` has the original architecture, parameter names and inference cost again.
    """
    for layer in lora_layers(model).values():
        layer.merge_and_clear()  # a bare LoRALinear passed as ``model`` stays, merged
    replace_modules(model, lambda layer: layer.base, types=LoRALinear)
    replace_modules(
        model, LoRAMultiheadAttention.to_multihead_attention, types=LoRAMultiheadAttention
    )


@torch.no_grad()
def prune_zero_ranks(block: LoRABlock) -> int:
    """Drop the ranks of a gated block whose gate is exactly zero; returns the ranks kept.

    A zero-gate rank contributes nothing, so the block's output is unchanged. A block
    whose every gate is zero keeps one (zero) rank so that its shapes stay valid.
    """
    if block.gate is None:
        return block.rank
    keep = (block.gate != 0).nonzero().flatten()
    if keep.numel() == 0:
        keep = torch.zeros(1, dtype=torch.long, device=block.gate.device)
    if keep.numel() < block.rank:
        grads = block.A.requires_grad
        block.A = nn.Parameter(block.A[keep].clone(), requires_grad=grads)
        block.B = nn.Parameter(block.B[:, keep].clone(), requires_grad=grads)
        block.gate = nn.Parameter(block.gate[keep].clone(), requires_grad=grads)
        block.rank = int(keep.numel())
    return block.rank


#: the transformer block a qualified module name lies in: ``...blocks.3.`` (timm ViT) or
#: ``...resblocks.3.`` (open_clip); the match up to the index names the block
_BLOCK_PREFIX = re.compile(r"^(.*?(?:^|\.)(?:res)?blocks\.\d+)\.")


def lora_groups_by_block(
    model: nn.Module, trainable_only: bool = True
) -> dict[str, list[torch.Tensor]]:
    """The LoRA factors (A and B of every block) of ``model`` grouped by transformer block.

    Keys are the blocks' qualified names (``blocks.0``, ``visual.transformer.resblocks.3``;
    in ``named_modules`` order); values the A and B of every LoRA block of every wrapped
    linear inside that transformer block (GS-LoRA's group: fc1's and fc2's A and B).
    ``trainable_only`` keeps the factors that require grad. A wrapped linear outside any
    transformer block is refused (it belongs to no group).
    """
    groups: dict[str, list[torch.Tensor]] = {}
    for name, layer in lora_layers(model).items():
        found = _BLOCK_PREFIX.match(name + ".")
        if found is None:
            raise ValueError(f"LoRA layer {name!r} is in no transformer block (blocks.N)")
        for block in layer.blocks:
            for p in (block.A, block.B):
                if p.requires_grad or not trainable_only:
                    groups.setdefault(found.group(1), []).append(p)
    return groups


def group_lasso(groups: Iterable[Sequence[torch.Tensor]]) -> torch.Tensor:
    """Group lasso: the sum over groups of the L2 norm of the group's entries,
    ``sum_g sqrt(sum_{p in g} sum p**2)`` (GS-LoRA's L_structure).

    Computed as a norm of per-tensor norms: the same value, and a zero gradient (not NaN)
    for a group that is exactly zero. An empty ``groups`` gives 0.
    """
    total: torch.Tensor | None = None
    for group in groups:
        if len(group) == 0:
            continue
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p) for p in group]))
        total = norm if total is None else total + norm
    return torch.zeros(()) if total is None else total
