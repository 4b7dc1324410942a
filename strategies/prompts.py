"""Prompt learners on a frozen ViT (docs/methods.md, "Prompt learners").

Built from the shared prompt path in ``clbench.adapters.prompts``; each needs a query, the
frozen ViT's CLS feature of the input (one extra backbone pass per prediction, memoised
across epochs in training by :class:`~clbench.adapters.prompts.QueryCache`):

- ``l2p``: L2P (Wang et al., CVPR 2022): a pool of (key, prompt) pairs; the query picks
  the top-k prompts by key cosine, they are prepended at the input, the head reads the
  average of the prompt tokens' outputs, and a pull constraint draws the selected keys
  towards their queries. The prompt tokens get the CLS token's position embedding and, by
  default, every sample of a batch uses the batch's most frequent top-k ids (batch-wise
  selection), as in the official PyTorch code.
- ``dualprompt``: DualPrompt (Wang et al., ECCV 2022): a shared G-prompt in the first
  blocks and a pool of task E-prompts in the next ones, both as key/value prefixes; in
  training the E-prompt is the current task's (task-id bootstrap), at test the query's
  top-1 key picks it; the head reads the CLS token.
- ``coda_prompt``: CODA-Prompt (Smith et al., CVPR 2023): per prefixed block, a pool of
  components (key, attention vector, prompt); each task adds its share, initialised
  orthogonal to the earlier ones by Gram-Schmidt, earlier ones detached; the prompt is
  the sum of components weighted by ``cos(query * A_m, K_m)``, split into a key half and
  a value half.

L2P and DualPrompt follow the official recipe by default: the optimizer gets
``lr * batch_size / lr_scale_batch`` (base rate per 256 samples) and the gradient norm of
the trained parameters is clipped to ``clip_grad`` before every step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from clbench.strategies.base import CLStrategy, StrategyConfig
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from clbench.adapters.prompts import (
    Prefixes,
    PromptPool,
    QueryCache,
    cls_position_embedding,
    gram_schmidt_,
    prompted_tokens,
    query_features,
    usable_layers,
    vit_of,
)
from clbench.checks import check_choice, check_positive
from clbench.errors import ConfigError
from clbench.models import ClassifierModel
from clbench.precision import full_precision
from clbench.seeding import derived_generator


@dataclass
class PromptConfig(StrategyConfig):
    lr: float = 0.03
    # N > 0: ``lr`` is a base rate per N samples and the optimizer gets
    # lr * batch_size / N (the official L2P / DualPrompt rule, N = 256); 0: lr as given
    lr_scale_batch: int = 0
    # > 0: clip the gradient norm of the trained parameters to this before each step
    clip_grad: float = 0.0
    loss_mask: str = "current"
    # Memoise the frozen backbone's query features per training input: exact here (frozen
    # backbone, no augmentation); training then costs ~1 backbone pass per step instead of
    # 2 from the second epoch on. Test-time predictions always pay the query pass.
    query_cache: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("strategy.lr_scale_batch", self.lr_scale_batch, allow_zero=True)
        check_positive("strategy.clip_grad", self.clip_grad, allow_zero=True)

    @property
    def effective_lr(self) -> float:
        """The learning rate the optimizer gets."""
        if self.lr_scale_batch == 0:
            return self.lr
        return self.lr * self.batch_size / self.lr_scale_batch

    def resolved(self) -> PromptConfig:
        """This config with the batch scaling applied (lr = effective lr, lr_scale_batch 0)."""
        if self.lr_scale_batch == 0:
            return self
        return dataclasses.replace(self, lr=self.effective_lr, lr_scale_batch=0)


class PromptStrategy(CLStrategy):
    """Frozen timm ViT + learnable prompts chosen by a query; subclasses build and apply them.

    ``given_cfg`` is the config as given; ``cfg`` is what training uses: the same with the
    batch scaling applied (:meth:`PromptConfig.resolved`), so the optimizer and every lr
    schedule of the base class start from the effective rate.
    """

    Config = PromptConfig
    cfg: PromptConfig
    STATE = ("task",)

    def __init__(self, *, model: ClassifierModel, cfg: PromptConfig, **kwargs: Any) -> None:
        self.given_cfg = cfg
        super().__init__(model=model, cfg=cfg.resolved(), **kwargs)

    def optimizer_step(self) -> None:
        """Clip the gradient norm of the optimizer's parameters to ``clip_grad``, then step."""
        if self.cfg.clip_grad > 0:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            nn.utils.clip_grad_norm_(params, self.cfg.clip_grad)
        super().optimizer_step()

    def prepare_model(self, model: ClassifierModel) -> None:
        vit = vit_of(model)
        model.backbone.requires_grad_(False)
        self.aux_loss = torch.zeros(())
        self.query_cache = QueryCache()
        self.task = -1
        self.build_prompts(model, vit)

    def build_prompts(self, model: ClassifierModel, vit: VisionTransformer) -> None:
        """Attach the learnable prompt modules to ``model`` (so they move and count with it)."""
        raise NotImplementedError

    def adapt_to_experience(self) -> None:
        self.task += 1
        self.start_task(self.task)

    def start_task(self, task: int) -> None:
        """Called before each training experience with its 0-based index."""

    @property
    def vit(self) -> VisionTransformer:
        return vit_of(self.model)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) query features; memoised in training when ``query_cache`` is on."""
        vit = self.vit
        if self.is_training and self.cfg.query_cache:
            return self.query_cache(lambda b: query_features(vit, b), x)
        return query_features(vit, x)

    def features(self, x: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """(N, D) features the head reads; sets ``self.aux_loss`` in training."""
        raise NotImplementedError

    def forward(self) -> torch.Tensor:
        x = self.mb_x
        return self.model.head(self.features(x, self.query(x)))

    def criterion(self) -> torch.Tensor:
        loss = super().criterion()
        return loss + self.aux_loss if self.is_training else loss


# ---------------------------------------------------------------------------- L2P
PROMPT_POS = ("cls", "none")


@dataclass
class L2PConfig(PromptConfig):
    pool_size: int = 10
    prompt_length: int = 5
    top_k: int = 5
    # weight of the pull constraint: batch mean of sum over the top-k of 1 - cos(query, key)
    pull: float = 0.1
    # every sample uses the batch's k most frequent top-k ids, in training and at test
    batchwise: bool = True
    # position embedding of the prompt tokens: "cls" (the CLS token's) or "none"
    prompt_pos: str = "cls"
    lr_scale_batch: int = 256
    clip_grad: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("strategy.prompt_pos", self.prompt_pos, PROMPT_POS)
        check_positive("strategy.pool_size", self.pool_size)
        check_positive("strategy.prompt_length", self.prompt_length)
        check_positive("strategy.top_k", self.top_k)
        check_positive("strategy.pull", self.pull, allow_zero=True)


class L2P(PromptStrategy):
    """Frozen ViT + a key-matched prompt pool prepended at the input; prompts, keys, head train."""

    Config = L2PConfig
    cfg: L2PConfig

    def build_prompts(self, model: ClassifierModel, vit: VisionTransformer) -> None:
        c = self.cfg
        model.prompt_pool = PromptPool(c.pool_size, c.prompt_length, vit.embed_dim, c.top_k)
        self.last_selection: torch.Tensor | None = None

    @property
    def pool(self) -> PromptPool:
        return self.model.prompt_pool

    def features(self, x: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Average output of the prompt tokens."""
        selection = self.pool.select(query, batchwise=self.cfg.batchwise)
        self.aux_loss = self.cfg.pull * selection.pull
        self.last_selection = selection.index
        pos = cls_position_embedding(self.vit) if self.cfg.prompt_pos == "cls" else None
        tokens = prompted_tokens(self.vit, x, selection.prompts, prompt_pos=pos)
        n = self.vit.num_prefix_tokens
        return tokens[:, n : n + selection.prompts.shape[1]].mean(dim=1)


# ---------------------------------------------------------------------- DualPrompt
@dataclass
class DualPromptConfig(PromptConfig):
    g_length: int = 5
    g_layers: list[int] = field(default_factory=lambda: [0, 1])
    pool_size: int = 10
    e_length: int = 5
    e_layers: list[int] = field(default_factory=lambda: [2, 3, 4])
    top_k: int = 1
    pull: float = 1.0
    # at test every sample uses the batch's most frequent top-k ids (training uses the
    # task's E-prompt)
    batchwise: bool = True
    lr_scale_batch: int = 256
    clip_grad: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("strategy.g_length", self.g_length)
        check_positive("strategy.pool_size", self.pool_size)
        check_positive("strategy.e_length", self.e_length)
        check_positive("strategy.top_k", self.top_k)
        check_positive("strategy.pull", self.pull, allow_zero=True)


class DualPrompt(PromptStrategy):
    """G-prompt prefixes (shared) + E-prompt prefixes (one per task, picked by key at test)."""

    Config = DualPromptConfig
    cfg: DualPromptConfig

    def build_prompts(self, model: ClassifierModel, vit: VisionTransformer) -> None:
        c, d = self.cfg, vit.embed_dim
        depth = len(vit.blocks)
        self.g_layers = usable_layers(c.g_layers, depth, "strategy.g_layers")
        self.e_layers = usable_layers(c.e_layers, depth, "strategy.e_layers")
        if set(self.g_layers) & set(self.e_layers):
            raise ConfigError(
                f"strategy.g_layers {self.g_layers} and strategy.e_layers {self.e_layers} overlap"
            )
        if self.n_experiences is not None and self.n_experiences > c.pool_size:
            raise ConfigError(
                f"dualprompt keeps one E-prompt per task: strategy.pool_size={c.pool_size} "
                f"< {self.n_experiences} experiences"
            )
        # G-prompt: per layer a key prefix and a value prefix of g_length tokens, U(-1, 1)
        g = torch.empty(len(self.g_layers), 2, c.g_length, d).uniform_(-1.0, 1.0)
        model.g_prompt = nn.Parameter(g)
        # E-prompt pool: one prompt = (layers x key/value x e_length) tokens
        model.e_pool = PromptPool(c.pool_size, len(self.e_layers) * 2 * c.e_length, d, c.top_k)
        self.last_selection: torch.Tensor | None = None

    def features(self, x: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """The CLS token's output with G- and E-prefixes."""
        c, pool = self.cfg, self.model.e_pool
        if self.is_training:  # task-id bootstrap: the current task's E-prompt
            index = torch.full((x.shape[0], c.top_k), self.task, device=x.device)
            selection = pool.pick(query, index)
        else:
            selection = pool.select(query, batchwise=c.batchwise)
        self.aux_loss = c.pull * selection.pull
        self.last_selection = selection.index
        n = x.shape[0]
        e = selection.prompts.view(n, c.top_k, len(self.e_layers), 2, c.e_length, -1)
        e = e.permute(0, 2, 3, 1, 4, 5).flatten(3, 4)  # (N, layers, 2, top_k * e_length, D)
        prefixes: Prefixes = {
            layer: (self.model.g_prompt[i, 0][None], self.model.g_prompt[i, 1][None])
            for i, layer in enumerate(self.g_layers)
        }
        prefixes |= {layer: (e[:, i, 0], e[:, i, 1]) for i, layer in enumerate(self.e_layers)}
        return prompted_tokens(self.vit, x, prefixes=prefixes)[:, 0]

    def start_task(self, task: int) -> None:
        if task >= self.cfg.pool_size:
            raise ConfigError(
                f"dualprompt has {self.cfg.pool_size} E-prompts (strategy.pool_size), "
                f"experience {task + 1} needs one more"
            )


# --------------------------------------------------------------------- CODA-Prompt
@dataclass
class CodaPromptConfig(PromptConfig):
    epochs: int = 20
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    # components in all; each task adds pool_size // n_experiences of them
    pool_size: int = 100
    prompt_length: int = 8  # split into key / value halves of length 4
    layers: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    # weight of the official optional orthogonality penalty (0 in the released configs)
    ortho_mu: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("strategy.pool_size", self.pool_size)
        check_positive("strategy.prompt_length", self.prompt_length)
        check_positive("strategy.ortho_mu", self.ortho_mu, allow_zero=True)
        if self.prompt_length % 2:
            raise ConfigError(
                f"strategy.prompt_length must be even (key and value halves), got "
                f"{self.prompt_length}"
            )


class CodaComponents(nn.Module):
    """One prefixed block's components: keys K, attention vectors A, prompts P."""

    def __init__(self, pool_size: int, length: int, dim: int) -> None:
        super().__init__()
        self.K = nn.Parameter(torch.zeros(pool_size, dim))
        self.A = nn.Parameter(torch.zeros(pool_size, dim))
        self.P = nn.Parameter(torch.zeros(pool_size, length, dim))

    def prompt(self, query: torch.Tensor, start: int, stop: int, train: bool) -> torch.Tensor:
        """(N, length, D): sum over components < ``stop`` of cos(query * A_m, K_m) P_m;
        in training the components before ``start`` are detached."""
        K, A, P = self.K[:stop], self.A[:stop], self.P[:stop]
        if train and start > 0:
            K = torch.cat([K[:start].detach(), K[start:]])
            A = torch.cat([A[:start].detach(), A[start:]])
            P = torch.cat([P[:start].detach(), P[start:]])
        attended = F.normalize(query[:, None, :] * A[None], dim=-1)  # (N, M, D)
        alpha = (attended * F.normalize(K, dim=-1)[None]).sum(-1)  # (N, M)
        return torch.einsum("nm,mld->nld", alpha, P)

    def ortho_penalty(self, stop: int) -> torch.Tensor:
        """sum ||M M^T - I||^2 over K, A and flattened P (the official optional loss)."""
        total = self.K.new_zeros(())
        with full_precision():  # Gram matrices of the float32 parameters, in float32
            for w in (self.K[:stop], self.A[:stop], self.P[:stop].flatten(1)):
                gram = w @ w.T
                total = total + ((gram - torch.eye(stop, device=w.device)) ** 2).mean()
        return total


class CodaPrompt(PromptStrategy):
    """Attention-weighted, orthogonally initialised prompt components as prefixes."""

    Config = CodaPromptConfig
    cfg: CodaPromptConfig

    def build_prompts(self, model: ClassifierModel, vit: VisionTransformer) -> None:
        c, d = self.cfg, vit.embed_dim
        if self.n_experiences is None:
            raise ConfigError("coda_prompt splits its pool by task: it needs n_experiences")
        self.per_task = c.pool_size // self.n_experiences
        if self.per_task < 1:
            raise ConfigError(
                f"strategy.pool_size={c.pool_size} < {self.n_experiences} experiences: "
                "coda_prompt needs at least one component per task"
            )
        if c.pool_size > d:
            raise ConfigError(
                f"strategy.pool_size={c.pool_size} exceeds the backbone width {d}: Gram-Schmidt "
                f"cannot keep more than {d} keys orthogonal; use strategy.pool_size<={d}"
            )
        self.layers = usable_layers(c.layers, len(vit.blocks), "strategy.layers")
        model.coda = nn.ModuleDict(
            {str(i): CodaComponents(c.pool_size, c.prompt_length, d) for i in self.layers}
        )

    def span(self, task: int) -> tuple[int, int]:
        """Components [start, stop) owned by ``task``."""
        return task * self.per_task, (task + 1) * self.per_task

    def start_task(self, task: int) -> None:
        start, stop = self.span(task)
        g = derived_generator(self.seed, 7919 + task)
        for comp in self.model.coda.values():
            for w in (comp.K, comp.A, comp.P):
                gram_schmidt_(w, start, stop, g)

    def features(self, x: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """The CLS token's output with the assembled prefixes."""
        start, stop = self.span(max(self.task, 0))
        half = self.cfg.prompt_length // 2
        prefixes: Prefixes = {}
        for i in self.layers:
            p = self.model.coda[str(i)].prompt(query, start, stop, self.is_training)
            prefixes[i] = (p[:, :half], p[:, half:])
        if self.is_training and self.cfg.ortho_mu > 0:
            self.aux_loss = self.cfg.ortho_mu * sum(
                comp.ortho_penalty(stop) for comp in self.model.coda.values()
            )
        return prompted_tokens(self.vit, x, prefixes=prefixes)[:, 0]
