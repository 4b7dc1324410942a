"""OWLoRA, the orthogonal weighted LoRA of CoMEL (Lee et al., ICCV 2025; official code
Hyun1A/CoMEL, ``modules/cl_modules/cdatmil_owlora.py`` and the ``cdatmil_ppl_owlora``
trainers), built on :mod:`clbench.adapters.lora`'s blocks.

The whole aggregator trains on task 0. When task 1 starts:

1. every linear of the aggregator with more than one output (the official code's rule:
   the attention scorer ``Linear(D, 1)`` is left alone) has its weight replaced by its SVD
   truncated to ``energy`` (0.99) of the squared singular values (:func:`truncate_to_energy_`);
2. the base weights, biases and every other aggregator parameter freeze for good.

Every task from task 1 on adds to each such linear a LoRA block ``B diag(g) A`` (rank 16,
scale 1, per-rank learnable scales ``g`` = the block's ``gate``, ``A ~ N(0, std 1/r)``,
``B = 0``, the official initialisation; a linear named ``*qkv`` gets rank 3r, as in the
official model). Only the newest block of each linear and the bag classifier train; after
each backward pass :meth:`OWLoRA.project_gradients` removes from the new factors'
gradients their components in the spaces of the earlier ones, and :meth:`OWLoRA.penalty`
pulls the new factors towards orthonormality.

**The truncated basis.** The official code keeps, after the SVD, a rank-k slot in the
first place of each layer's LoRA list, skips it in the forward pass and includes it
among the "earlier LoRAs" of the gradient projection, but never fills it (it keeps its
random initialisation and a zero up matrix). What the paper describes, and what the slot
is for, is the task-0 knowledge as the first low-rank factor pair: its right singular
vectors ``V_k`` (input directions) and left singular vectors ``U_k`` (output directions).
With ``project_base=True`` they are the first "earlier" space, so new LoRAs live in the
orthogonal complement of the truncated weight's row and column spaces (the 1% of energy
the truncation freed, plus the null space). ``project_base=False`` (default) projects off
the earlier task LoRAs only, which is what the official code effectively does (its
unfilled slot has a zero up matrix and a small random down one); the truncation itself
is applied either way. On a small aggregator the complement is small (a 64 -> 512 input
layer keeps ~59 of its 64 input directions), so ``True`` leaves later tasks little room.

**Projection.** With ``Q_in`` an orthonormal basis of the span of the earlier down rows
(``V_k`` and each earlier ``A``, input space) and ``Q_out`` one of the earlier up columns
(``U_k`` and each earlier ``B``, output space):

- ``grad A <- grad A - (grad A Q_in) Q_in^T``: the rows of ``A`` are input directions, so
  the new block stops reading the input directions the earlier updates read;
- ``grad B <- grad B - Q_out (Q_out^T grad B)``: the columns of ``B`` are output directions,
  so the new block stops writing where the earlier updates write.

The official code multiplies by the Gram matrices ``A_old^T A_old`` and ``B_old B_old^T``
instead, which are projectors only for orthonormal factors (which its penalty pursues);
we use exact orthonormal bases. As in the official code the scales ``g`` are not
projected, the initial ``A`` is not projected and Adam (with weight decay) then steps on
the projected gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from clbench.adapters.inject import ALL_LINEAR
from clbench.adapters.lora import LoRABlock, LoRALinear, inject_lora
from clbench.precision import full_precision

#: the official model gives its fused q/k/v projections (names ending in ``qkv``) 3 x rank
QKV_RANK_FACTOR = 3


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest k whose top-k squared singular values hold ``energy`` of their sum
    (at least 1; all of them for ``energy`` 1 or a zero matrix)."""
    sq = singular_values.double() ** 2
    total = float(sq.sum())
    if total == 0.0:
        return 1
    cumulative = torch.cumsum(sq, 0) / total
    k = int((cumulative < energy).sum()) + 1
    return max(1, min(k, singular_values.numel()))


@torch.no_grad()
def truncate_to_energy_(weight: torch.Tensor, energy: float) -> int:
    """Replace ``weight`` (out, in) in place by its SVD truncated to ``energy``; returns k."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    k = energy_rank(s, energy)
    weight.copy_(((u[:, :k] * s[:k]) @ vh[:k]).to(weight.dtype))
    return k


def top_singular_spaces(weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k left (out, k) and right (in, k) singular vectors of ``weight``."""
    u, _, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    return u[:, :k], vh[:k].T


def orthonormal_basis(blocks: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """An orthonormal basis (d, m) of the span of the columns of ``blocks`` (each (d, *)),
    computed in float64; None when they span nothing. Directions with a singular value below the
    float32 rank tolerance (``s_max * max(shape) * eps``) are dropped."""
    mats = [b.detach().double() for b in blocks if b.numel() > 0]
    if not mats:
        return None
    m = torch.cat(mats, dim=1)
    u, s, _ = torch.linalg.svd(m, full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return None
    tol = float(s[0]) * max(m.shape) * torch.finfo(torch.float32).eps
    r = int((s > tol).sum())
    return u[:, :r]


def project_rows_off(grad: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """``grad`` (r, d) minus the components of its rows in ``basis`` (d, m)'s span
    (computed in the basis' precision, returned in the gradient's)."""
    if basis is None:
        return grad
    g = grad.to(basis.dtype)
    return (g - (g @ basis) @ basis.T).to(grad.dtype)


def project_columns_off(grad: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """``grad`` (d, r) minus the components of its columns in ``basis`` (d, m)'s span
    (computed in the basis' precision, returned in the gradient's)."""
    if basis is None:
        return grad
    g = grad.to(basis.dtype)
    return (g - basis @ (basis.T @ g)).to(grad.dtype)


def orthonormality_penalty(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(||A A^T - I||_F^2 + ||B^T B - I||_F^2) / r^2`` for down ``A`` (r, in) and up
    ``B`` (out, r): zero when A's rows and B's columns are orthonormal."""
    r = a.shape[0]
    eye = torch.eye(r, device=a.device, dtype=a.dtype)
    with full_precision():  # the Gram matrices of the float32 factors, in float32
        return (((a @ a.T - eye) ** 2).sum() + ((b.T @ b - eye) ** 2).sum()) / r**2


class OWLoRA:
    """The OWLoRA state of one aggregator (``root``); see the module docstring.

    Building it wraps every linear of ``root`` in a :class:`LoRALinear` (target
    ``linear``; no block yet, so outputs are unchanged) and freezes their base weights
    (LoRALinear's rule: the caller unfreezes what task 0 trains). ``layers`` are the
    wrapped linears OWLoRA adapts (more than one output); ``svd_ranks`` the truncation
    rank per layer once :meth:`truncate` ran (the state a checkpoint needs with the model).
    """

    def __init__(
        self, root: nn.Module, rank: int, energy: float = 0.99, project_base: bool = False
    ) -> None:
        wrapped = inject_lora(root, [ALL_LINEAR])
        self.layers: dict[str, LoRALinear] = {
            name: layer for name, layer in wrapped.items() if layer.out_features > 1
        }
        if not self.layers:
            raise ValueError("OWLoRA found no linear layer with more than one output")
        self.rank = rank
        self.energy = energy
        self.project_base = project_base
        self.svd_ranks: dict[str, int] = {}
        self.in_bases: dict[str, torch.Tensor | None] = {}
        self.out_bases: dict[str, torch.Tensor | None] = {}

    @property
    def truncated(self) -> bool:
        return bool(self.svd_ranks)

    def rank_of(self, name: str) -> int:
        """The block rank of layer ``name`` (``QKV_RANK_FACTOR`` x rank for a ``*qkv``)."""
        return self.rank * QKV_RANK_FACTOR if name.endswith("qkv") else self.rank

    def truncate(self) -> dict[str, int]:
        """Replace every adapted base weight by its SVD truncated to ``energy`` (once)."""
        if self.truncated:
            raise RuntimeError("OWLoRA's base weights are already truncated")
        for name, layer in self.layers.items():
            self.svd_ranks[name] = truncate_to_energy_(layer.base.weight, self.energy)
        return dict(self.svd_ranks)

    def add_task_blocks(self, generator: torch.Generator | None = None) -> list[LoRABlock]:
        """Freeze every block so far, add this task's block to each layer and compute the
        projection bases of the earlier spaces (:meth:`compute_bases`)."""
        blocks = []
        for name, layer in self.layers.items():
            layer.freeze_blocks()
            r = self.rank_of(name)
            block = layer.add_block(r, float(r), gated=True)  # scale alpha / r = 1
            with torch.no_grad():
                a = torch.randn(block.A.shape, generator=generator, dtype=block.A.dtype)
                block.A.copy_(a / r)  # N(0, std 1/r); B = 0 and scales = 1 already
            blocks.append(block)
        self.compute_bases()
        return blocks

    def newest_blocks(self) -> dict[str, LoRABlock]:
        return {name: layer.blocks[-1] for name, layer in self.layers.items() if layer.blocks}

    def compute_bases(self) -> None:
        """Orthonormal bases of the earlier down rows (input space) and up columns (output
        space) of every layer: the truncated weight's top singular vectors (with
        ``project_base``) and every block but the newest."""
        for name, layer in self.layers.items():
            ins: list[torch.Tensor] = []
            outs: list[torch.Tensor] = []
            if self.project_base and name in self.svd_ranks:
                u, v = top_singular_spaces(layer.base.weight, self.svd_ranks[name])
                outs.append(u)
                ins.append(v)
            for block in list(layer.blocks)[:-1]:
                ins.append(block.A.T)
                outs.append(block.B)
            self.in_bases[name] = orthonormal_basis(ins)
            self.out_bases[name] = orthonormal_basis(outs)

    @torch.no_grad()
    def project_gradients(self) -> None:
        """Project the newest blocks' gradients off the earlier spaces (after backward)."""
        for name, block in self.newest_blocks().items():
            if block.A.grad is not None:
                block.A.grad.copy_(project_rows_off(block.A.grad, self.in_bases.get(name)))
            if block.B.grad is not None:
                block.B.grad.copy_(project_columns_off(block.B.grad, self.out_bases.get(name)))

    def penalty(self) -> torch.Tensor:
        """The sum over layers of the newest blocks' :func:`orthonormality_penalty`."""
        terms = [orthonormality_penalty(b.A, b.B) for b in self.newest_blocks().values()]
        return torch.stack(terms).sum() if terms else torch.zeros(())
