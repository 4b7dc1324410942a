"""One LoRA building block for every LoRA-family method.

``LoRALinear`` wraps a frozen ``nn.Linear`` and holds a list of rank blocks. Each
block is ``B @ A`` (A: in -> r down-projection, B: r -> out up-projection) scaled by
``alpha / r``, optionally with a per-rank gate vector and a scalar magnitude, and
optionally writing only a slice of the output (so a fused qkv projection can carry
LoRA on q, k or v alone). Past blocks are frozen, the current one trains; ``merge()``
folds every block into the base weight for zero inference overhead.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: target name -> (module name suffix, output slice index within a fused qkv or None)
_TIMM_VIT_TARGETS: dict[str, tuple[str, int | None]] = {
    "qkv": ("attn.qkv", None),
    "q": ("attn.qkv", 0),
    "k": ("attn.qkv", 1),
    "v": ("attn.qkv", 2),
    "proj": ("attn.proj", None),
    "fc1": ("mlp.fc1", None),
    "fc2": ("mlp.fc2", None),
}
VALID_TARGETS = tuple(_TIMM_VIT_TARGETS)


class LoRABlock(nn.Module):
    """One rank-r update ``scale * B diag(gate) A`` on (a slice of) a linear's output."""

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

    def _coef(self) -> torch.Tensor | float:
        return self.scale if self.magnitude is None else self.scale * self.magnitude

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


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """All LoRALinear modules of ``model`` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def inject_lora(model: nn.Module, targets: Sequence[str]) -> dict[str, LoRALinear]:
    """Wrap every linear named by ``targets`` in ``model`` (a timm ViT) with LoRALinear.

    Returns ``{module name: LoRALinear}`` for the wrapped modules (idempotent: layers
    already wrapped are reused). Blocks are added separately with :func:`add_blocks`.
    """
    bad = [t for t in targets if t not in _TIMM_VIT_TARGETS]
    if bad:
        raise ValueError(
            f"unknown LoRA target {bad[0]!r}; valid targets: {', '.join(VALID_TARGETS)}"
        )
    suffixes = {_TIMM_VIT_TARGETS[t][0] for t in targets}
    wrapped: dict[str, LoRALinear] = {}
    for name, module in list(model.named_modules()):
        for suffix in suffixes:
            if name == suffix or name.endswith("." + suffix):
                parent_name, _, attr = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                if isinstance(module, LoRALinear):
                    wrapped[name] = module
                elif isinstance(module, nn.Linear):
                    wrapped[name] = LoRALinear(module)
                    setattr(parent, attr, wrapped[name])
    if not wrapped:
        raise ValueError(f"no layer of the model matches LoRA targets {list(targets)}")
    return wrapped


def add_blocks(
    model: nn.Module, targets: Sequence[str], rank: int, alpha: float, **kwargs: object
) -> list[LoRABlock]:
    """Inject (if needed) and add one new block per target; q/k/v get output slices."""
    layers = inject_lora(model, targets)
    blocks: list[LoRABlock] = []
    for target in targets:
        suffix, part = _TIMM_VIT_TARGETS[target]
        for name, layer in layers.items():
            if not (name == suffix or name.endswith("." + suffix)):
                continue
            out_slice = None
            if part is not None:
                width = layer.out_features // 3
                out_slice = (part * width, (part + 1) * width)
            blocks.append(layer.add_block(rank, alpha, out_slice=out_slice, **kwargs))
    return blocks


def merge_all(layers: Iterable[LoRALinear]) -> None:
    for layer in layers:
        layer.merge_and_clear()
