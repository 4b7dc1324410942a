"""Mixtures of experts for continual learning (docs/methods.md, "Expert mixtures").

- :class:`MoRALinear`: MoRA ("Little by Little"). A :class:`~clbench.adapters.lora.LoRALinear`
  whose rank-1 components ``B_i A_i`` (over every block, i.e. every task) are experts
  that score themselves: ``s_i = A_i x / sqrt(sum_j (A_j x)^2)``, ``w = softmax(s / tau)``;
  only the top-k scores (the activation budget) with ``s_i >= delta`` (rank pruning) stay,
  and ``dW x = sum_i w_i B_i A_i x`` (times the block's ``alpha / r``). No router.
- :class:`Adapter`, :class:`NoisyTopKRouter`, :class:`AdapterMixture`: MoE-Adapters4CL.
  Adapter experts run in parallel to a block's MLP on the block's residual stream:
  ``x <- x + MLP(LN x) + sum_topk g_e Adapter_e(x)``; the gate comes from a router (one
  per task, or one shared by all; noisy top-k on the CLS token, Shazeer et al. 2017) with
  the load-balancing loss
  ``cv^2(importance) + cv^2(load)``. :func:`add_adapter_mixtures` inserts them into a timm
  ViT or an open_clip transformer.
- :class:`TaskAutoencoders`: DDAS test-time task routing: one small autoencoder per task
  on the frozen backbone's features; the task with the lowest reconstruction error (per
  sample, or batch-mean for a whole batch) picks the router, and above a threshold the
  input falls back to the frozen model.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal

from clbench.adapters.inject import set_submodule
from clbench.adapters.lora import LoRALinear
from clbench.precision import full_precision


# ---------------------------------------------------------------------------- MoRA
class MoRALinear(LoRALinear):
    """A frozen linear whose LoRA ranks are self-activated rank-1 experts (MoRA)."""

    def __init__(self, base: nn.Linear, top_k: int = 8, tau: float = 1.0, delta: float = 0.0):
        super().__init__(base)
        self.top_k, self.tau, self.delta = top_k, tau, delta

    def expert_weights(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per block its rank activations ``A_i x`` (..., r_b), and the weights (..., E) of
        every rank-1 expert: softmax(s / tau) with all but the top-k and s < delta zeroed."""
        acts = [F.linear(b.dropout(x), b.A) for b in self.blocks]
        h = torch.cat(acts, dim=-1)
        s = h / h.pow(2).sum(-1, keepdim=True).sqrt().clamp_min(1e-12)
        w = torch.softmax(s / self.tau, dim=-1)
        keep = s >= self.delta
        if self.top_k < s.shape[-1]:
            top = s.topk(self.top_k, dim=-1).indices
            keep = keep & torch.zeros_like(keep).scatter(-1, top, True)
        return acts, w * keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.blocks:
            return y
        acts, w = self.expert_weights(x)
        weights = w.split([b.rank for b in self.blocks], dim=-1)
        for block, h, wb in zip(self.blocks, acts, weights, strict=True):
            y = y + block.project(wb * h)
        return y

    def merge(self) -> None:
        raise RuntimeError("MoRA's expert weights depend on the input: it cannot be merged")


# ----------------------------------------------------------------- MoE-Adapters
class Adapter(nn.Module):
    """AdaptFormer-style bottleneck: ``scale * up(dropout(relu(down(x))))``; up starts at 0."""

    def __init__(self, dim: int, bottleneck: int, scale: float, dropout: float) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.dropout = nn.Dropout(dropout)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(F.relu(self.down(x)))) * self.scale


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation (0 for a single value)."""
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.float().var() / (x.float().mean() ** 2 + 1e-10)


@dataclass
class Gating:
    gates: torch.Tensor  # (N, E), k non-zeros per row summing to 1
    balance: torch.Tensor  # cv^2(importance) + cv^2(load)


class NoisyTopKRouter(nn.Module):
    """One task's noisy top-k gate (Shazeer et al. 2017); weights start at zero."""

    def __init__(self, dim: int, experts: int, top_k: int, noisy: bool = True) -> None:
        super().__init__()
        if not 1 <= top_k <= experts:
            raise ValueError(f"router top_k must be in [1, {experts}], got {top_k}")
        self.top_k, self.noisy = top_k, noisy
        self.w_gate = nn.Parameter(torch.zeros(dim, experts))
        self.w_noise = nn.Parameter(torch.zeros(dim, experts))

    def forward(self, x: torch.Tensor) -> Gating:
        clean = x @ self.w_gate
        noisy = self.noisy and self.training
        std = F.softplus(x @ self.w_noise) + 1e-2 if noisy else None
        logits = clean + torch.randn_like(clean) * std if std is not None else clean
        k, e = self.top_k, clean.shape[1]
        top_logits, top_idx = logits.topk(min(k + 1, e), dim=1)
        gates = torch.zeros_like(logits).scatter(
            1, top_idx[:, :k], torch.softmax(top_logits[:, :k], dim=1)
        )
        if std is not None and k < e:
            load = self._prob_in_top_k(clean, logits, std, top_logits).sum(0)
        else:
            load = (gates > 0).sum(0).float()
        return Gating(gates, cv_squared(gates.sum(0)) + cv_squared(load))

    def _prob_in_top_k(
        self, clean: torch.Tensor, noisy: torch.Tensor, std: torch.Tensor, top: torch.Tensor
    ) -> torch.Tensor:
        """Differentiable P(expert in the top k) under fresh noise (the smooth load)."""
        k = self.top_k
        threshold_in = top[:, k : k + 1]  # the (k+1)-th value: what an expert in must beat
        threshold_out = top[:, k - 1 : k]  # the k-th value: what an expert out must beat
        normal = Normal(clean.new_zeros(()), clean.new_ones(()))
        prob_in = normal.cdf((clean - threshold_in) / std)
        prob_out = normal.cdf((clean - threshold_out) / std)
        return torch.where(noisy > threshold_in, prob_in, prob_out)


class AdapterMixture(nn.Module):
    """``experts`` adapters + one router per task; routes each sample by its CLS token.

    Set :attr:`task_ids` (N,) before a forward: the router of each sample's task is used;
    ``-1`` switches the experts off for that sample. :attr:`counts` adds up, per expert,
    the samples routed to it (for freezing the most-used ones after a task).
    """

    def __init__(
        self,
        dim: int,
        experts: int,
        top_k: int,
        bottleneck: int,
        scale: float,
        dropout: float,
        noisy: bool = True,
        batch_first: bool = True,
    ) -> None:
        super().__init__()
        self.dim, self.top_k, self.noisy = dim, top_k, noisy
        self.batch_first = batch_first
        self.experts = nn.ModuleList(
            Adapter(dim, bottleneck, scale, dropout) for _ in range(experts)
        )
        self.routers = nn.ModuleList()
        self.task_ids: torch.Tensor | None = None
        self.register_buffer("counts", torch.zeros(experts))
        self.balance = torch.zeros(())

    def structure(self) -> dict[str, object]:
        """How many task routers it has, for a checkpoint (``clbench.adapters.state``)."""
        return {"routers": len(self.routers)}

    def restore_structure(self, spec: dict[str, object]) -> None:
        while len(self.routers) < int(spec["routers"]):  # type: ignore[call-overload]
            self.add_router()
        del self.routers[int(spec["routers"]) :]  # type: ignore[call-overload]

    def add_router(self) -> NoisyTopKRouter:
        router = NoisyTopKRouter(self.dim, len(self.experts), self.top_k, self.noisy)
        self.routers.append(router.to(self.counts.device))
        return router

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The mixture's contribution for a residual stream ``x`` (N, L, D) or (L, N, D)."""
        xb = x if self.batch_first else x.transpose(0, 1)
        n = xb.shape[0]
        ids = self.task_ids
        if ids is None:
            raise RuntimeError("AdapterMixture.task_ids must be set before a forward")
        gates = xb.new_zeros(n, len(self.experts))
        balance = xb.new_zeros(())
        for task in ids.unique().tolist():
            if task < 0:
                continue
            rows = (ids == task).nonzero().flatten()
            g = self.routers[task](xb[rows, 0])
            gates = gates.index_copy(0, rows, g.gates)
            balance = balance + g.balance * rows.numel() / n
        self.balance = balance
        if self.training:
            self.counts += (gates > 0).sum(0).to(self.counts.dtype).detach()
        out = torch.zeros_like(xb)
        for e, expert in enumerate(self.experts):
            rows = (gates[:, e] > 0).nonzero().flatten()
            if rows.numel():
                contrib = gates[rows, e, None, None] * expert(xb[rows])
                out = out.index_add(0, rows, contrib)
        return out if self.batch_first else out.transpose(0, 1)

    def freeze_most_used(self, n: int) -> list[int]:
        """Freeze the ``n`` experts with the highest counts; reset the counts."""
        top = self.counts.topk(min(n, len(self.experts))).indices.tolist()
        for e in top:
            self.experts[e].requires_grad_(False)
        self.counts.zero_()
        return top


class ParallelExperts(nn.Module):
    """A block's MLP branch with the mixture beside it: ``mlp(norm(x)) + mixture(x)``."""

    def __init__(self, norm: nn.Module, mlp: nn.Module, mixture: AdapterMixture) -> None:
        super().__init__()
        self.norm, self.mlp, self.mixture = norm, mlp, mixture

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(x)) + self.mixture(x)


def _transformer_blocks(model: nn.Module) -> tuple[list[nn.Module], str, bool]:
    """The image tower's blocks, their pre-MLP norm's name and the token layout."""
    vit = getattr(model, "backbone", model)
    visual = getattr(vit, "visual", None)
    if visual is not None and hasattr(getattr(visual, "transformer", None), "resblocks"):
        tr = visual.transformer
        return list(tr.resblocks), "ln_2", bool(getattr(tr, "batch_first", True))
    if hasattr(vit, "blocks") and all(hasattr(b, "norm2") for b in vit.blocks):
        return list(vit.blocks), "norm2", True
    raise TypeError(
        f"adapter experts need a timm ViT or an open_clip image tower, got {type(vit).__name__}"
    )


def add_adapter_mixtures(model: nn.Module, **kwargs: object) -> list[AdapterMixture]:
    """Put an :class:`AdapterMixture` beside the MLP of every image-tower block.

    Each block's ``norm2``/``ln_2`` becomes an identity and its ``mlp`` a
    :class:`ParallelExperts` holding the norm, the MLP and the mixture, so the block
    computes ``x + ls(MLP(LN x) + mixture(x))`` (LayerScale, where a model has it, also
    scales the mixture). ``kwargs`` go to :class:`AdapterMixture`.
    """
    blocks, norm_name, batch_first = _transformer_blocks(model)
    mixtures = []
    for block in blocks:
        norm = block.get_submodule(norm_name)
        dim = norm.normalized_shape[0]
        mixture = AdapterMixture(dim, batch_first=batch_first, **kwargs)  # type: ignore[arg-type]
        set_submodule(block, norm_name, nn.Identity())
        set_submodule(block, "mlp", ParallelExperts(norm, block.mlp, mixture))
        mixtures.append(mixture)
    return mixtures


@contextmanager
def routed(mixtures: Sequence[AdapterMixture], task_ids: torch.Tensor) -> Iterator[None]:
    """Within the block, every mixture routes sample i with task ``task_ids[i]`` (-1: off)."""
    for m in mixtures:
        m.task_ids = task_ids
    try:
        yield
    finally:
        for m in mixtures:
            m.task_ids = None


# ------------------------------------------------------------------------ DDAS
class TaskAutoencoders(nn.Module):
    """One ``D -> hidden -> D`` autoencoder per task on frozen features (DDAS)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.dim, self.hidden = dim, hidden
        self.aes = nn.ModuleList()

    def _new_autoencoder(self) -> nn.Sequential:
        return nn.Sequential(
            nn.Linear(self.dim, self.hidden), nn.ReLU(), nn.Linear(self.hidden, self.dim)
        )

    def structure(self) -> dict[str, object]:
        """How many task autoencoders it has, for a checkpoint (``clbench.adapters.state``)."""
        return {"autoencoders": len(self.aes)}

    def restore_structure(self, spec: dict[str, object]) -> None:
        n = int(spec["autoencoders"])  # type: ignore[call-overload]
        device = next(self.parameters(), torch.zeros(())).device
        while len(self.aes) < n:
            self.aes.append(self._new_autoencoder().requires_grad_(False).to(device))
        del self.aes[n:]

    def errors(self, feats: torch.Tensor) -> torch.Tensor:
        """(N, tasks) mean squared reconstruction error of each input under each task's AE."""
        return torch.stack([(ae(feats) - feats).pow(2).mean(-1) for ae in self.aes], dim=1)

    def fit(
        self, feats: torch.Tensor, steps: int, lr: float, batch: int, generator: torch.Generator
    ) -> float:
        """Train a new task's autoencoder on ``feats`` (frozen); returns its final mean error."""
        ae = self._new_autoencoder().to(feats.device)
        opt = torch.optim.Adam(ae.parameters(), lr=lr)
        for _ in range(steps):
            idx = torch.randint(len(feats), (min(batch, len(feats)),), generator=generator)
            loss = (ae(feats[idx.to(feats.device)]) - feats[idx.to(feats.device)]).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        ae.requires_grad_(False)
        self.aes.append(ae)
        with torch.no_grad():
            return float((ae(feats) - feats).pow(2).mean())

    @torch.no_grad()
    def route(
        self, feats: torch.Tensor, threshold: float | None, per_batch: bool = False
    ) -> torch.Tensor:
        """(N,) the task of the lowest error; -1 where that error exceeds ``threshold``.
        ``per_batch``: one task for the whole batch, from the batch-mean errors (what the
        official MoE-Adapters code does). The errors are computed in float32."""
        with full_precision():
            err = self.errors(feats.float())
        if per_batch:
            err = err.mean(0, keepdim=True).expand_as(err)
        best, task = err.min(dim=1)
        if threshold is not None:
            task = torch.where(best > threshold, torch.full_like(task, -1), task)
        return task
