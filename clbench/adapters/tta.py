"""Building blocks of the test-time adapters (Tent, CoTTA, EATA, PSMT, EcoTTA).

Normalisation handling, the entropy losses, teacher EMA, stochastic restore, the
diagonal Fisher, exact source snapshots, EcoTTA's meta networks on a WideResNet's
stages, CoTTA's augmentation and a meter for the memory an adaptation step keeps for
backward. Strategies in ``clbench.strategies.tta``
compose these; nothing here knows about a strategy.

Normalisation on the two backbone families:

- BatchNorm networks: "batch statistics" means every BatchNorm layer normalises with the
  current test batch's mean and variance (running statistics are dropped, as Tent's
  ``configure_model`` does); the adapted parameters are the BN scale and shift.
- ViTs: LayerNorm normalises each token by itself and has no running statistics, so
  there is nothing for BN-adapt to re-estimate; the "normalisation affine parameters"
  Tent and EATA train are the LayerNorm weights and biases.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import nn

if TYPE_CHECKING:
    from clbench.backbones.wideresnet import WideResNet

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
NORMS = (*BATCH_NORMS, nn.LayerNorm, nn.GroupNorm)


def use_batch_statistics(model: nn.Module) -> int:
    """Make every BatchNorm normalise with test-batch statistics; returns how many.

    Running statistics are removed (``track_running_stats=False``), so a forward pass
    neither uses nor updates them, in train and eval mode alike.
    """
    n = 0
    for m in model.modules():
        if isinstance(m, BATCH_NORMS):
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
            m.num_batches_tracked = None
            n += 1
    return n


def norm_affine_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The scale and shift of every normalisation layer (BN, LayerNorm, GroupNorm), by name."""
    out: dict[str, nn.Parameter] = {}
    for mod_name, m in model.named_modules():
        if isinstance(m, NORMS):
            for p_name, p in m.named_parameters(recurse=False):
                out[f"{mod_name}.{p_name}" if mod_name else p_name] = p
    return out


def weight_bias_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every module's own ``weight`` and ``bias``, by name (CoTTA's ``collect_params``).

    The official loop ``for nm, m in model.named_modules(): for npp, p in
    m.named_parameters(): if npp in ['weight', 'bias']`` keeps exactly the parameters whose
    name ends in ``weight`` or ``bias``; a ViT's ``cls_token``, ``pos_embed`` and register
    tokens (direct parameters of the transformer, named otherwise) are left out.
    """
    return {n: p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in ("weight", "bias")}


def train_only(model: nn.Module, params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """Freeze every parameter of ``model`` except ``params``; returns them as a list."""
    keep = list(params)
    model.requires_grad_(False)
    for p in keep:
        p.requires_grad_(True)
    return keep


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy of softmax(logits): ``-sum p log p``."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def entropy_margin(num_classes: int, fraction: float = 0.4) -> float:
    """The reliability threshold of EATA and EcoTTA: E0 = fraction * ln C."""
    return fraction * math.log(num_classes)


def soft_cross_entropy(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy of softmax(logits) to the soft labels softmax(target_logits)."""
    return -(target_logits.softmax(1) * logits.log_softmax(1)).sum(1)


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher <- momentum * teacher + (1 - momentum) * student`` over every parameter."""
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)


@torch.no_grad()
def stochastic_restore_(
    params: dict[str, nn.Parameter],
    source: dict[str, torch.Tensor],
    p: float,
    generator: torch.Generator,
) -> float:
    """Reset each element of ``params`` to its ``source`` value with probability ``p``.

    Returns the fraction of elements restored (CoTTA's stochastic restore).
    """
    restored = total = 0
    for name, w in params.items():
        mask = torch.rand(w.shape, generator=generator, device=generator.device) < p
        mask = mask.to(w.device)
        w.copy_(torch.where(mask, source[name].to(w.device), w))
        restored += int(mask.sum())
        total += mask.numel()
    return restored / max(total, 1)


def seeded_subset(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of ``min(size, n)`` of ``n`` samples drawn without replacement, in random
    order (a random subset read through a shuffled loader, as EATA's and PSMT's Fisher)."""
    return torch.randperm(n, generator=generator)[:size]


def fisher_diagonal(
    model: nn.Module, batches: Iterable[torch.Tensor], params: dict[str, nn.Parameter]
) -> dict[str, torch.Tensor]:
    """EATA's Fisher: the mean over batches of the squared gradient of the CE to the argmax.

    Each batch's loss is the cross-entropy of the model's predictions to its own argmax
    labels (no ground truth is used); the gradient is taken w.r.t. ``params``.
    """
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    n_batches = 0
    for x in batches:
        logits = model(x)
        loss = F.cross_entropy(logits, logits.argmax(1))
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (name, _), g in zip(params.items(), grads, strict=True):
            if g is not None:
                fisher[name] += g.detach() ** 2
        n_batches += 1
    return {n: f / max(n_batches, 1) for n, f in fisher.items()}


class Snapshot:
    """An exact copy of modules' and optimizers' states, restorable any number of times."""

    def __init__(self, modules: dict[str, nn.Module], optimizers: dict[str, Any]) -> None:
        self.modules = modules
        self.optimizers = optimizers
        self._states = {k: copy.deepcopy(m.state_dict()) for k, m in modules.items()}
        self._opt_states = {k: copy.deepcopy(o.state_dict()) for k, o in optimizers.items()}

    @torch.no_grad()
    def restore(self) -> None:
        for k, m in self.modules.items():
            m.load_state_dict(self._states[k], strict=True)
        for k, o in self.optimizers.items():
            o.load_state_dict(copy.deepcopy(self._opt_states[k]))


def state_bytes(*objs: Any) -> int:
    """Bytes of the distinct tensors held by modules, optimizers and tensor dicts."""
    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key not in seen and t.numel():
            seen.add(key)
            total += t.untyped_storage().nbytes()

    def walk(o: Any) -> None:
        if isinstance(o, torch.Tensor):
            add(o)
        elif isinstance(o, nn.Module):
            for t in (*o.parameters(), *o.buffers()):
                add(t)
        elif isinstance(o, torch.optim.Optimizer):
            walk(o.state_dict()["state"])
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, list | tuple):
            for v in o:
                walk(v)

    for o in objs:
        walk(o)
    return total


class SavedTensorMeter:
    """Bytes autograd keeps for backward (activations, masks) inside :meth:`measure`.

    This is the memory a gradient step needs beyond the weights, the quantity EcoTTA and
    MECTA reduce; it does not depend on the device. Storages are counted once.
    """

    def __init__(self, *modules: nn.Module) -> None:
        self.modules = modules
        self.peak = 0

    @contextmanager
    def measure(self) -> Iterator[None]:
        """Count what is saved for backward inside the block (weights excluded)."""
        weights = {
            t.untyped_storage().data_ptr()
            for m in self.modules
            for t in (*m.parameters(), *m.buffers())
        }
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in weights:
                seen[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
        self.peak = max(self.peak, sum(seen.values()))


# --------------------------------------------------- memory-lean frozen layers (EcoTTA)
class _InputGradConv2d(torch.autograd.Function):
    """A convolution whose weight is frozen: backward needs the weight, not the input."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:  # type: ignore[override]
        ctx.conv, ctx.shape = conv, x.shape
        c = conv
        return F.conv2d(x, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        c = ctx.conv
        gx = torch.nn.grad.conv2d_input(
            ctx.shape, c.weight, grad, c.stride, c.padding, c.dilation, c.groups
        )
        return gx, None


class LeanFrozenConv2d(nn.Conv2d):
    """A frozen Conv2d that keeps nothing for backward (PyTorch's keeps its input)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad or not torch.is_grad_enabled():
            return super().forward(x)
        return _InputGradConv2d.apply(x, self)


class _MaskReLU(torch.autograd.Function):
    """ReLU keeping a one-byte mask for backward instead of its float output."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y = x.clamp_min(0)
        ctx.save_for_backward(y > 0)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        return grad * mask


class LeanReLU(nn.ReLU):
    """nn.ReLU whose backward keeps a bool mask (a quarter of the float output's bytes)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return super().forward(x)
        return _MaskReLU.apply(x)


class FoldedBatchNorm2d(nn.BatchNorm2d):
    """A frozen BatchNorm with source statistics as one per-channel affine map.

    ``x * scale + shift`` with constant scale and shift keeps only the scale for backward
    (nn.BatchNorm2d keeps its input). Used where the statistics are not re-estimated.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad or self.running_var is None:
            return super().forward(x)
        scale = self.weight / torch.sqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1).detach() + shift.view(1, -1, 1, 1).detach()


def make_frozen_layers_lean(module: nn.Module) -> int:
    """Swap frozen Conv2d, eval-statistics BatchNorm2d and ReLU for memory-lean versions.

    Same parameters, buffers and outputs; only what autograd stores changes. Returns the
    number of layers swapped.
    """
    n = 0
    for m in module.modules():
        if type(m) is nn.Conv2d and not m.weight.requires_grad:
            m.__class__ = LeanFrozenConv2d
            n += 1
        elif type(m) is nn.BatchNorm2d and m.running_var is not None and not m.weight.requires_grad:
            m.__class__ = FoldedBatchNorm2d
            n += 1
        elif type(m) is nn.ReLU:
            m.__class__ = LeanReLU
            n += 1
    return n


# ------------------------------------------------------------- EcoTTA's meta networks
class MetaPart(nn.Module):
    """A frozen partition of the encoder and its meta network (EcoTTA).

    ``out = meta_bn(part(x)) + conv_block(x)``, the conv block being a 3x3 convolution
    (stride matching the partition's), BatchNorm and ReLU. The last forward's meta output
    and (detached) frozen output are kept for the self-distilled regulariser.
    """

    def __init__(self, part: nn.Sequential, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.part = part
        self.meta_bn = nn.BatchNorm2d(c_out)
        self.conv_block = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frozen = self.part(x)
        out = self.meta_bn(frozen) + self.conv_block(x)
        self.last = (out, frozen.detach())
        return out

    def meta_parameters(self) -> list[nn.Parameter]:
        return [*self.meta_bn.parameters(), *self.conv_block.parameters()]


def attach_meta_parts(wrn: WideResNet, split: list[bool]) -> list[MetaPart]:
    """Cut the WRN's stages into partitions (a stage in two halves where ``split``) and
    wrap each with a meta network; [True, True, False] gives EcoTTA's K=5 for WRN-28."""
    parts = []
    for stage, halve in zip((wrn.block1, wrn.block2, wrn.block3), split, strict=True):
        blocks = list(stage.layer)
        cut = len(blocks) // 2 if halve and len(blocks) > 1 else len(blocks)
        groups = [g for g in (blocks[:cut], blocks[cut:]) if g]
        wrapped = []
        for g in groups:
            first = g[0]
            c_in, c_out = first.conv1.in_channels, g[-1].conv2.out_channels
            wrapped.append(MetaPart(nn.Sequential(*g), c_in, c_out, first.conv1.stride[0]))
        stage.layer = nn.Sequential(*wrapped)
        parts += wrapped
    return parts


# --------------------------------------------------------------- CoTTA's augmentation
def cotta_augment(
    x: torch.Tensor,
    generator: torch.Generator,
    value_range: tuple[float, float] = (0.0, 1.0),
    flip: bool = True,
    noise_std: float = 0.005,
) -> torch.Tensor:
    """One draw of CoTTA's CIFAR test-time augmentation, applied to the whole batch.

    As ``cotta_transforms`` (applied to a batch tensor, so one set of random parameters
    per call): colour jitter in random order (brightness 0.6-1.4, contrast 0.7-1.3,
    saturation 0.5-1.5 and hue +-0.06 on RGB only, gamma 0.7-1.3), edge padding by half
    the image size, a random affine (+-15 degrees, translate 1/16, scale 0.9-1.1,
    bilinear), a Gaussian blur (kernel 5, sigma 0.001-0.5), a centre crop back, a
    horizontal flip with p = 0.5 (only if ``flip``: not for data whose labels a flip
    changes, such as digits), Gaussian noise (std 0.005) and clipping. ``value_range``
    is the range of the model's inputs; the transforms run in [0, 1]. ``generator`` is a
    CPU generator (the noise is drawn on the CPU and moved).
    """
    lo, hi = value_range
    h, w = x.shape[-2:]

    def u(a: float, b: float) -> float:
        return a + (b - a) * float(torch.rand((), generator=generator))

    img = ((x - lo) / (hi - lo)).clamp(0.0, 1.0)
    jitters = [
        lambda t: TF.adjust_brightness(t, u(0.6, 1.4)),
        lambda t: TF.adjust_contrast(t, u(0.7, 1.3)),
        lambda t: TF.adjust_gamma(t, u(0.7, 1.3)),
    ]
    if img.shape[1] == 3:
        jitters += [
            lambda t: TF.adjust_saturation(t, u(0.5, 1.5)),
            lambda t: TF.adjust_hue(t, u(-0.06, 0.06)),
        ]
    for i in torch.randperm(len(jitters), generator=generator).tolist():
        img = jitters[i](img).clamp(0.0, 1.0)
    pad = h // 2
    img = F.pad(img, (pad, pad, pad, pad), mode="replicate")
    size = img.shape[-1]
    max_shift = size / 16
    img = TF.affine(
        img,
        angle=u(-15.0, 15.0),
        translate=[round(u(-max_shift, max_shift)), round(u(-max_shift, max_shift))],
        scale=u(0.9, 1.1),
        shear=[0.0, 0.0],
        interpolation=TF.InterpolationMode.BILINEAR,
    )
    img = TF.gaussian_blur(img, kernel_size=[5, 5], sigma=[u(0.001, 0.5)] * 2)
    img = TF.center_crop(img, [h, w])
    if flip and float(torch.rand((), generator=generator)) < 0.5:
        img = TF.horizontal_flip(img)
    noise = torch.randn(img.shape, generator=generator)
    img = (img + noise_std * noise.to(img.device)).clamp(0.0, 1.0)
    return img * (hi - lo) + lo
