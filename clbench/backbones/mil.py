"""MIL aggregators as backbones: a bag of instance features in, one pooled bag feature out.

For the ``mil`` kind the instance encoder is frozen and ran beforehand (the features are
the scenario's data), so the trainable network is the aggregator. Each one is a backbone
(``backbone=abmil|transmil|gdat``): ``module(bag)`` maps a bag ``(1, N, in_dim)`` (or
``(N, in_dim)``) to ``(1, hidden)``, and the usual growing linear head on top is the
method's bag classifier (``Linear(hidden, C)`` in every official code). Every forward
leaves, for the last bag:

- ``module.attention``: ``(N,)`` instance weights of the attention pooling, summing to 1
  (localisation, heatmaps, pseudo-labels, ConSlide's region choice);
- ``module.instances``: ``(N, hidden)`` instance embeddings, kept with their gradient
  (CoMEL's instance loss uses them): after the first layer for ABMIL and TransMIL, the
  transformer's outputs that the attention pooling weighs for GDAT.

``in_dim`` defaults to the scenario's ``feature_dim`` (conf/backbone/*.yaml interpolates
it), so ``backbone=abmil`` fits any MIL scenario.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from clbench.backbones.base import Backbone
from clbench.checks import check_positive, check_probability, check_range
from clbench.errors import ConfigError


class Aggregator(nn.Module):
    """Base of the MIL aggregators: ``forward(bag) -> (1, hidden)``; see the module doc."""

    in_dim: int
    hidden: int

    def __init__(self) -> None:
        super().__init__()
        self.attention: torch.Tensor | None = None
        self.instances: torch.Tensor | None = None

    def __getstate__(self) -> dict:
        """A copy (``copy.deepcopy``: LwF's old model, a joint restart) leaves the last bag's
        outputs behind: they hold the autograd graph, which cannot be copied."""
        state = self.__dict__.copy()
        state["attention"] = state["instances"] = None
        return state

    @staticmethod
    def as_bag(x: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` or ``(1, N, D)`` -> ``(N, D)`` (a batch is one bag)."""
        if x.dim() == 3:
            if x.shape[0] != 1:
                raise ValueError(f"a MIL batch is one bag; got {x.shape[0]} bags")
            return x[0]
        if x.dim() != 2:
            raise ValueError(f"a bag is (N, D) instance features; got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("a bag needs at least one instance; got an empty bag")
        return x


@dataclass
class ABMILConfig:
    """Gated-attention MIL (Ilse et al. 2018 as in CLAM's ``Attn_Net_Gated``)."""

    name: str = "abmil"
    in_dim: int = 1024  # the instance feature size (CLAM's ResNet-50 layer 3: 1024)
    hidden: int = 512  # fc in_dim -> hidden + ReLU + dropout (CLAM "small": 512)
    attn_dim: int = 256  # D of the attention net (CLAM "small": 256)
    dropout: float = 0.25
    gated: bool = True  # tanh(V h) * sigmoid(U h); False: tanh(V h) only

    def __post_init__(self) -> None:
        check_positive("backbone.in_dim", self.in_dim)
        check_positive("backbone.hidden", self.hidden)
        check_positive("backbone.attn_dim", self.attn_dim)
        check_range("backbone.dropout", self.dropout, 0.0, 1.0)


class ABMIL(Aggregator):
    """``h = dropout(relu(fc(x)))``; ``a = w^T (tanh(V h) * sigmoid(U h))``;
    ``A = softmax_N(a)``; returns ``z = sum_i A_i h_i``."""

    def __init__(self, cfg: ABMILConfig) -> None:
        super().__init__()
        self.in_dim, self.hidden, self.gated = cfg.in_dim, cfg.hidden, cfg.gated
        self.fc = nn.Linear(cfg.in_dim, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)
        self.attention_a = nn.Linear(cfg.hidden, cfg.attn_dim)  # V (tanh)
        self.attention_b = nn.Linear(cfg.hidden, cfg.attn_dim) if cfg.gated else None  # U
        self.attn_drop = nn.Dropout(cfg.dropout)
        self.attention_c = nn.Linear(cfg.attn_dim, 1)  # w

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """Unnormalised attention ``(N,)`` of instance embeddings ``h``."""
        a = torch.tanh(self.attention_a(h))
        if self.attention_b is not None:
            a = a * torch.sigmoid(self.attention_b(h))
        return self.attention_c(self.attn_drop(a)).squeeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(F.relu(self.fc(self.as_bag(x))))
        attention = torch.softmax(self.scores(h), dim=0)
        self.instances, self.attention = h, attention
        return (attention @ h).unsqueeze(0)


def abmil(cfg: ABMILConfig) -> Backbone:
    """Gated-attention MIL aggregator over bags of ``in_dim`` features (random init)."""
    return Backbone(
        name="abmil",
        module=ABMIL(cfg),
        feature_dim=cfg.hidden,
        input_shape=(None, cfg.in_dim),
        source="random init (the aggregator trains from scratch)",
    )


abmil.Config = ABMILConfig  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- TransMIL
@dataclass
class TransMILConfig:
    """TransMIL (Shao et al., NeurIPS 2021; github.com/szc19990412/TransMIL, TransMIL.py):
    two Nystrom-attention layers around a PPEG positional encoder, CLS-token output."""

    name: str = "transmil"
    in_dim: int = 1024  # the instance feature size (official: 1024)
    hidden: int = 512  # fc in_dim -> hidden + ReLU; the token size (official: 512)
    heads: int = 8  # attention heads; dim_head = hidden // heads (official: 8, 64)
    landmarks: int = 256  # Nystrom landmarks (official: hidden // 2 = 256)
    pinv_iterations: int = 6  # Moore-Penrose iterations (official: 6)
    residual: bool = True  # the depth-wise conv residual of the values (official: True)
    dropout: float = 0.1  # dropout after the attention's output projection (official: 0.1)

    def __post_init__(self) -> None:
        check_positive("backbone.in_dim", self.in_dim)
        check_positive("backbone.hidden", self.hidden)
        check_positive("backbone.heads", self.heads)
        check_positive("backbone.landmarks", self.landmarks)
        check_positive("backbone.pinv_iterations", self.pinv_iterations)
        check_probability("backbone.dropout", self.dropout)
        if self.hidden % self.heads:
            raise ConfigError(
                f"invalid value for backbone.heads: {self.heads!r}; must divide "
                f"backbone.hidden ({self.hidden})"
            )


def square_pad(h: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(N, C)`` -> ``(S*S, C)``, ``S = ceil(sqrt(N))``: TransMIL's padding to a square grid,
    which appends copies of the first ``S*S - N`` instances (never more than ``N``)."""
    side = math.isqrt(h.shape[0] - 1) + 1 if h.shape[0] else 0
    return torch.cat([h, h[: side * side - h.shape[0]]]), side


class TransLayer(nn.Module):
    """``x + NystromAttention(LayerNorm(x))`` (the ``nystrom-attention`` package's layer)."""

    def __init__(self, cfg: TransMILConfig) -> None:
        super().__init__()
        from nystrom_attention import NystromAttention

        self.norm = nn.LayerNorm(cfg.hidden)
        self.attn = NystromAttention(
            dim=cfg.hidden,
            dim_head=cfg.hidden // cfg.heads,
            heads=cfg.heads,
            num_landmarks=cfg.landmarks,
            pinv_iterations=cfg.pinv_iterations,
            residual=cfg.residual,
            dropout=cfg.dropout,
        )

    def forward(
        self, x: torch.Tensor, cls_row: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's output and, if ``cls_row``, the first token's (CLS) Nystrom attention
        row ``(heads, L)`` over the ``L`` input tokens, ``A1[cls] @ pinv(A2) @ A3``: it costs
        ``O(m^2 + m L)`` for ``m`` landmarks (the ``L x L`` matrix is never formed)."""
        if not cls_row:
            return x + self.attn(self.norm(x)), None
        out, (a1, a2_inv, a3) = self.attn(self.norm(x), return_attn_matrices=True)
        front = a1.shape[-2] - x.shape[1]  # the package pads the sequence at the front
        row = a1[0, :, front : front + 1] @ a2_inv[0] @ a3[0]  # (heads, 1, padded L)
        return x + out, row[:, 0, front:]


class PPEG(nn.Module):
    """Pyramid position encoding: depth-wise 7x7, 5x5 and 3x3 convolutions plus identity on
    the ``S x S`` grid of the instance tokens; the CLS token passes through."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 7, 1, 3, groups=dim)
        self.proj1 = nn.Conv2d(dim, dim, 5, 1, 2, groups=dim)
        self.proj2 = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        b, _, c = x.shape
        cls, grid = x[:, :1], x[:, 1:].transpose(1, 2).reshape(b, c, side, side)
        grid = grid + self.proj(grid) + self.proj1(grid) + self.proj2(grid)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)


class TransMIL(Aggregator):
    """``h = relu(fc(x))``; pad to ``S*S`` instances; prepend CLS; TransLayer; PPEG;
    TransLayer; LayerNorm; returns the CLS token. Linear in ``N`` (Nystrom attention).

    TransMIL has no attention pooling: ``attention`` is the CLS token's row of the last
    layer's Nystrom attention (the approximation of ``softmax(q_cls K^T / sqrt(d))`` the
    model actually uses), averaged over heads, restricted to the ``N`` real instances
    (not the CLS token, the repeated instances or the package's zero padding to a multiple
    of the landmarks), clipped at 0 (the approximation may dip below) and renormalised.
    """

    def __init__(self, cfg: TransMILConfig) -> None:
        super().__init__()
        self.in_dim, self.hidden = cfg.in_dim, cfg.hidden
        self.fc = nn.Linear(cfg.in_dim, cfg.hidden)
        self.cls_token = nn.Parameter(torch.randn(1, 1, cfg.hidden))
        self.layer1 = TransLayer(cfg)
        self.pos_layer = PPEG(cfg.hidden)
        self.layer2 = TransLayer(cfg)
        self.norm = nn.LayerNorm(cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc(self.as_bag(x)))
        n = h.shape[0]
        padded, side = square_pad(h)
        tokens = torch.cat([self.cls_token[0], padded]).unsqueeze(0)
        tokens = self.pos_layer(self.layer1(tokens)[0], side)
        tokens, row = self.layer2(tokens, cls_row=True)
        assert row is not None
        weights = row[:, 1 : n + 1].mean(0).clamp_min(0)
        total = weights.sum()
        normalised = weights / total.clamp_min(torch.finfo(weights.dtype).tiny)  # no 0/0 grads
        self.instances = h
        self.attention = torch.where(total > 0, normalised, torch.full_like(weights, 1 / n))
        return self.norm(tokens)[:, 0]


def transmil(cfg: TransMILConfig) -> Backbone:
    """TransMIL aggregator over bags of ``in_dim`` features (random init)."""
    return Backbone(
        name="transmil",
        module=TransMIL(cfg),
        feature_dim=cfg.hidden,
        input_shape=(None, cfg.in_dim),
        source="random init (the aggregator trains from scratch)",
    )


transmil.Config = TransMILConfig  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------- GDAT
@dataclass
class GDATConfig:
    """CoMEL's grouped double attention transformer (ICCV 2025; github.com/Hyun1A/CoMEL,
    ``CDATMIL`` in continual/modules/cl_modules/cdatmil_ft.py, with its shipped flags)."""

    name: str = "gdat"
    in_dim: int = 1024  # the instance feature size (official: 1024)
    hidden: int = 512  # Linear in_dim -> hidden + ReLU (official: 512)
    dropout: float = 0.25  # dropout after that embedding (official: 0.25)
    layers: int = 2  # pre-LN attention blocks (official: 2)
    heads: int = 8  # attention heads (official: 8)
    region_size: int = 16  # side of a region = of the agent grid: 16^2 agents (official: 16)
    shortcut: float = 0.1  # output += shortcut * V, the values' shortcut (official: 0.1)
    qkv_bias: bool = False  # bias of the qkv projection (official: off, no --qkv_bias)
    mlp_ratio: float = 4.0  # MLP hidden size / hidden (official: 4)
    block_dropout: float = 0.1  # dropout of the attention projection and MLP (official: 0.1)
    attn_dim: int = 256  # tanh attention pooling w^T tanh(V h), V: hidden -> 256 (official)

    def __post_init__(self) -> None:
        check_positive("backbone.in_dim", self.in_dim)
        check_positive("backbone.hidden", self.hidden)
        check_positive("backbone.layers", self.layers)
        check_positive("backbone.heads", self.heads)
        check_positive("backbone.region_size", self.region_size)
        check_positive("backbone.shortcut", self.shortcut, allow_zero=True)
        check_positive("backbone.mlp_ratio", self.mlp_ratio)
        check_positive("backbone.attn_dim", self.attn_dim)
        check_probability("backbone.dropout", self.dropout)
        check_probability("backbone.block_dropout", self.block_dropout)
        if self.hidden % self.heads:
            raise ConfigError(
                f"invalid value for backbone.heads: {self.heads!r}; must divide "
                f"backbone.hidden ({self.hidden})"
            )


#: bags smaller than this get one region of all their tokens (CoMEL's ``min_region_num``)
GDAT_MIN_REGION_INSTANCES = 10


def agent_grid(n: int, region_size: int) -> tuple[int, int]:
    """``(side, region)`` of GDAT's grid for ``n`` instances: ``side`` is ``ceil(sqrt(n))``
    rounded up to a multiple of ``region_size`` and ``region = region_size``; a bag of fewer
    than 10 instances gets an even ``side`` and one region of the whole grid (CoMEL's
    fallback). The ``side^2 - n`` extra tokens are zeros."""
    side = math.isqrt(n - 1) + 1 if n else 1
    if n < GDAT_MIN_REGION_INSTANCES:
        side += side % 2
        return side, side
    return side + (-side % region_size), region_size


class GroupedDoubleAttention(nn.Module):
    """Agent attention over a zero-padded ``side x side`` grid of tokens.

    The grid is cut into ``region x region`` regions; agent ``(i, j)`` is the mean over all
    regions of their token at offset ``(i, j)`` (``region^2`` agents, the official
    grouping: a strided, not a local, average). Agents attend to every token,
    ``V_a = softmax(Q_a K^T) V``; tokens attend to the agents, ``softmax(Q K_a^T) V_a``;
    plus ``shortcut * V``; then the output projection. Cost ``O(side^2 x region^2)``.
    ``an_bias``/``na_bias`` are the official learned per-head biases of the two logits;
    being constant along the softmax axis they leave the output unchanged (kept so the
    parameters match the official model).
    """

    def __init__(self, cfg: GDATConfig) -> None:
        super().__init__()
        self.heads, self.region_size, self.shortcut = cfg.heads, cfg.region_size, cfg.shortcut
        self.scale = (cfg.hidden // cfg.heads) ** -0.5
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.proj_drop = nn.Dropout(cfg.block_dropout)
        self.an_bias = nn.Parameter(torch.zeros(1, cfg.heads, 1, 1))
        self.na_bias = nn.Parameter(torch.zeros(1, cfg.heads, 1, 1))
        nn.init.trunc_normal_(self.an_bias, std=0.02)
        nn.init.trunc_normal_(self.na_bias, std=0.02)

    def split(self, t: torch.Tensor) -> list[torch.Tensor]:
        """``(L, 3C)`` -> q, k, v as ``(1, heads, L, C / heads)``."""
        return [u.unflatten(-1, (self.heads, -1)).transpose(0, 1)[None] for u in t.chunk(3, -1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[-2:]
        side, region = agent_grid(n, self.region_size)
        grid = torch.cat([x.reshape(n, c), x.new_zeros(side * side - n, c)])
        agents = grid.view(side // region, region, side // region, region, c).mean((0, 2))
        q, k, v = self.split(self.qkv(grid))
        agent_q, agent_k, _ = self.split(self.qkv(agents.reshape(region * region, c)))
        agent_attn = torch.softmax(agent_q * self.scale @ k.transpose(-2, -1) + self.an_bias, -1)
        agent_v = agent_attn @ v
        attn = torch.softmax(q * self.scale @ agent_k.transpose(-2, -1) + self.na_bias, -1)
        out = attn @ agent_v + self.shortcut * v  # (1, heads, side^2, C / heads)
        out = out[0, :, :n].transpose(0, 1).reshape(1, n, c)
        return self.proj_drop(self.proj(out))


class GDATBlock(nn.Module):
    """Pre-LN block: ``x + attn(LN x)``, then ``x + MLP(LN x)`` (GELU, ratio 4)."""

    def __init__(self, cfg: GDATConfig) -> None:
        super().__init__()
        mlp = int(cfg.hidden * cfg.mlp_ratio)
        self.norm1 = nn.LayerNorm(cfg.hidden, eps=1e-6)
        self.attn = GroupedDoubleAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.hidden, mlp),
            nn.GELU(),
            nn.Dropout(cfg.block_dropout),
            nn.Linear(mlp, cfg.hidden),
            nn.Dropout(cfg.block_dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GDAT(Aggregator):
    """``h = dropout(relu(fc(x)))``; GDAT blocks; tanh attention pooling
    ``A = softmax_N(w^T tanh(V h))`` (no biases, as in CoMEL); returns ``sum_i A_i h_i``.
    ``instances`` are the block outputs the pooling weighs (CoMEL's instance features).
    Linear weights start xavier-normal with zero biases, as in the official code."""

    def __init__(self, cfg: GDATConfig) -> None:
        super().__init__()
        self.in_dim, self.hidden = cfg.in_dim, cfg.hidden
        self.fc = nn.Linear(cfg.in_dim, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(GDATBlock(cfg) for _ in range(cfg.layers))
        self.attention_a = nn.Linear(cfg.hidden, cfg.attn_dim, bias=False)  # V (tanh)
        self.attention_c = nn.Linear(cfg.attn_dim, 1, bias=False)  # w
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(F.relu(self.fc(self.as_bag(x))))[None]
        for block in self.blocks:
            h = block(h)
        h = h[0]
        attention = torch.softmax(self.attention_c(torch.tanh(self.attention_a(h)))[:, 0], 0)
        self.instances, self.attention = h, attention
        return (attention @ h).unsqueeze(0)


def gdat(cfg: GDATConfig) -> Backbone:
    """CoMEL's GDAT aggregator over bags of ``in_dim`` features (random init)."""
    return Backbone(
        name="gdat",
        module=GDAT(cfg),
        feature_dim=cfg.hidden,
        input_shape=(None, cfg.in_dim),
        source="random init (the aggregator trains from scratch)",
    )


gdat.Config = GDATConfig  # type: ignore[attr-defined]
