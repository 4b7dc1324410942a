"""Sparse weights for dynamic sparse training: one mask abstraction for every sparse method.

- :class:`MaskedLayer` wraps an ``nn.Linear`` or ``nn.Conv2d`` (injected by target name
  through :mod:`clbench.adapters.inject`, see :func:`mask_layers`) and computes its output
  with ``base.weight * mask``: a weight outside the mask is exactly zero in the forward
  pass whatever is stored. Biases and norms are never masked. The gradient that reaches
  ``base.weight`` is the **dense** one (the gradient with respect to the masked weight,
  passed straight through the product): the official codes keep zeros in a dense tensor,
  so their gradient is dense too, and gradient growth (RigL), momentum growth and
  Taylor-FO read it. :meth:`MaskSet.mask_gradients` / :meth:`MaskSet.apply` confine an
  update to the mask when a method wants that.
- Layer densities: :func:`uniform_densities` (every layer at the target density) and
  :func:`erk_densities` (Erdos-Renyi-Kernel: layer density proportional to
  ``sum(shape) / prod(shape)``, layers whose density would exceed 1 made dense and the rest
  re-solved, so that the total non-zero count is the global budget).
- :class:`MaskSet`: the masks of a model's masked layers and their topology update:
  new random masks at given densities with an **exact** count per layer, prune (magnitude;
  SET; Taylor-FO) and regrow (random; random-unfired; momentum; gradient, as RigL) steps
  that keep each layer's non-zero count, the record of every position that was ever
  active (``fired``, for random-unfired growth), applying the masks to the weights and to
  the optimizer state, masking and freezing gradients, and the exact density reached.
- :class:`CosineDecay`: the death-rate schedule (cosine from ``start`` to ``end`` over
  ``steps`` calls).
- :func:`percentile_gradient_mask`: SparCL's dynamic gradient masking: per layer, zero
  the gradients whose magnitude lies below a percentile.

The rules follow the ``Masking`` class of the CL-with-DST code
(github.com/muratonuryildirim/CL-with-DST, itself derived from Dettmers' sparse-learning
code), with one deliberate departure: that code draws new masks and random regrowth as
Bernoulli samples (an *expected* count per layer) and prunes by thresholds (ties can remove
more); here every choice takes **exactly** the requested number of positions (a uniform
permutation from the :class:`MaskSet`'s generator, or a stable sort with ties broken by
position), so the density budget and "prune-and-grow keeps each layer's count" hold
exactly. Everything is deterministic given the generator, on CPU and CUDA tensors alike
(random draws happen on the generator's device and are moved to the weights').

The methods using it (``strategies/dst.py``: continual learning with dynamic sparse
training; ``strategies/sparcl.py``: SparCL) decide when each step happens. Masks and
``fired`` are bool tensors (checkpoints store them as data).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clbench.adapters.inject import replace_modules
from clbench.checks import check_choice, check_positive, check_range
from clbench.errors import ConfigError

#: layer-density initialisations
INITS = ("uniform", "erk")
#: prune (death) rules
PRUNE_RULES = ("magnitude", "set", "taylor_fo")
#: grow (regrowth) rules
GROW_RULES = ("random", "random_unfired", "momentum", "gradient")
#: Adam's epsilon in the momentum-growth score ``m / (sqrt(v) + eps)`` (the official code's)
MOMENTUM_EPS = 1e-8
#: per-weight optimizer state zeroed outside the mask by :meth:`MaskSet.apply`
_STATE_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


class _MaskedWeight(torch.autograd.Function):
    """``weight * mask`` forward; the gradient goes to ``weight`` unmasked (dense)."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return weight * mask

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class MaskedLayer(nn.Module):
    """A linear or 2-d convolution whose weight is multiplied by a 0/1 mask in the forward.

    ``base`` keeps the dense weight (its parameter names become ``<name>.base.weight``);
    ``mask`` is a bool buffer of ``base.weight``'s shape (all True at creation; in the
    state dict as ``<name>.mask``). ``weight`` / ``bias`` are ``base``'s (properties, so
    code reading ``layer.weight`` directly, e.g. ``nn.MultiheadAttention``'s ``out_proj``,
    still works; it reads the stored weight, which :meth:`MaskSet.apply` zeroes outside the
    mask). The gradient reaching ``base.weight`` is dense (see the module docstring).
    ``grad_density`` is the fraction of the weight's gradient entries the last update
    needed, read by the FLOP count: None (default) means the mask's density (only the
    active weights' gradients are used; the dense gradient that gradient-based regrowth
    reads at a topology update is not counted); SparCL's gradient masking sets it to the
    fraction it keeps.
    """

    def __init__(self, base: nn.Linear | nn.Conv2d) -> None:
        super().__init__()
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"MaskedLayer wraps nn.Linear or nn.Conv2d, got {type(base).__name__}")
        self.base = base
        weight = base.weight
        self.register_buffer(
            "mask", torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
        )
        self.grad_density: float | None = None
        self._conv = isinstance(base, nn.Conv2d)

    @property
    def weight(self) -> nn.Parameter:
        return self.base.weight

    @property
    def bias(self) -> nn.Parameter | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = _MaskedWeight.apply(self.base.weight, self.mask)
        if self._conv:
            return self.base._conv_forward(x, weight, self.base.bias)
        return F.linear(x, weight, self.base.bias)

    def nonzero(self) -> int:
        """Number of active (masked-in) weights."""
        return int(self.mask.count_nonzero())

    def density(self) -> float:
        """Active weights / all weights of this layer."""
        return self.nonzero() / self.mask.numel()

    def flop_density(self) -> tuple[float, float]:
        """(weight density, gradient density) for counting this layer's training FLOPs."""
        density = self.density()
        return density, density if self.grad_density is None else float(self.grad_density)


def mask_layers(
    model: nn.Module,
    *,
    targets: Sequence[str] | None = None,
    types: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d),
    tower: str | None = None,
    where: Callable[[str, nn.Module], bool] | None = None,
) -> dict[str, MaskedLayer]:
    """Wrap the selected layers of ``model`` in :class:`MaskedLayer` (all masks True).

    Selection as :func:`clbench.adapters.inject.replace_modules` (``targets``: target
    names such as ``qkv`` / ``fc1``, None: every layer of ``types``); ``where(name,
    module)`` narrows further (e.g. keep the first convolution dense). Layers already
    masked are kept as they are (and returned when selected; ``where`` then sees the
    :class:`MaskedLayer`). Returns ``{qualified name of the layer: MaskedLayer}``.
    """
    bad = [t.__name__ for t in types if not issubclass(t, (nn.Linear, nn.Conv2d))]
    if bad:
        raise ValueError(f"mask_layers masks nn.Linear / nn.Conv2d only, not {', '.join(bad)}")
    # a MaskedLayer's own ``base`` is never a candidate: the wrapper stands for it
    inside = [n + "." for n, m in model.named_modules() if isinstance(m, MaskedLayer)]
    chosen: set[int] = set()
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in inside):
            continue
        if isinstance(module, (*types, MaskedLayer)) and (where is None or where(name, module)):
            chosen.add(id(module))

    def wrap(module: nn.Module) -> nn.Module:
        return module if isinstance(module, MaskedLayer) else MaskedLayer(module)  # type: ignore[arg-type]

    replaced = replace_modules(
        model,
        wrap,
        targets=targets,
        types=(*types, MaskedLayer),
        tower=tower,
        where=lambda m: id(m) in chosen,
    )
    return {n: m for n, m in replaced.items() if isinstance(m, MaskedLayer)}


def masked_layers(model: nn.Module) -> dict[str, MaskedLayer]:
    """Every :class:`MaskedLayer` of ``model``, by qualified name."""
    return {n: m for n, m in model.named_modules() if n and isinstance(m, MaskedLayer)}


def unmask_layers(model: nn.Module) -> None:
    """Fold each mask into its weight (zeros outside it) and put the plain layer back."""
    with torch.no_grad():
        for layer in masked_layers(model).values():
            layer.base.weight.mul_(layer.mask)
    replace_modules(model, lambda m: m.base, types=(MaskedLayer,))


def _check_density(density: float) -> None:
    if not 0 < density <= 1:
        raise ConfigError(f"invalid value for density: {density!r}; must be in (0, 1]")


def uniform_densities(shapes: Mapping[str, Sequence[int]], density: float) -> dict[str, float]:
    """Every layer at ``density``."""
    _check_density(density)
    return {name: float(density) for name in shapes}


def erk_densities(
    shapes: Mapping[str, Sequence[int]], density: float, power: float = 1.0
) -> dict[str, float]:
    """Erdos-Renyi-Kernel layer densities for the global ``density``.

    Layer l gets ``eps * (sum(shape_l) / prod(shape_l)) ** power``; ``eps`` is solved so that
    ``sum_l d_l * numel_l = density * sum_l numel_l``; a layer whose density would exceed 1
    is made dense (1.0) and ``eps`` re-solved over the others (RigL's and the CL-with-DST
    code's rule: every layer sharing the largest raw score is made dense at once).
    """
    _check_density(density)
    numel = {n: math.prod(int(d) for d in s) for n, s in shapes.items()}
    raw = {n: (sum(int(d) for d in s) / numel[n]) ** power for n, s in shapes.items()}
    dense: set[str] = set()
    eps = 0.0
    while len(dense) < len(shapes):
        # eps * sum_sparse(raw_l n_l) = density * N_sparse - (1 - density) * N_dense
        rhs = sum(density * numel[n] for n in shapes if n not in dense)
        rhs -= sum((1 - density) * numel[n] for n in dense)
        divisor = sum(raw[n] * numel[n] for n in shapes if n not in dense)
        eps = rhs / divisor
        top = max(raw[n] for n in shapes if n not in dense)
        if top * eps <= 1:
            break
        dense |= {n for n in shapes if n not in dense and raw[n] == top}
    return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}


def layer_densities(
    shapes: Mapping[str, Sequence[int]], density: float, init: str
) -> dict[str, float]:
    """:func:`uniform_densities` or :func:`erk_densities` by name (``init`` in :data:`INITS`)."""
    check_choice("init", init, INITS)
    if init == "erk":
        return erk_densities(shapes, density)
    return uniform_densities(shapes, density)


def _stable_order(scores: torch.Tensor, descending: bool = False) -> torch.Tensor:
    """Indices sorting ``scores``; equal scores keep their position order (exact counts)."""
    return torch.sort(scores, descending=descending, stable=True).indices


def keep_largest(mask: torch.Tensor, importance: torch.Tensor, keep: int) -> torch.Tensor:
    """``mask`` narrowed to its ``keep`` active positions of largest ``importance`` (ties:
    the lower position), or ``mask`` itself (a copy) if it has no more than ``keep``: a
    pruning step by any importance score (SparCL's ``|w| + lambda |g|``)."""
    flat = mask.flatten()
    if int(flat.sum()) <= keep:
        return mask.clone()
    score = importance.flatten().float().masked_fill(~flat, float("-inf"))
    out = torch.zeros_like(flat)
    out[_stable_order(score, descending=True)[:keep]] = True
    return out.view_as(mask)


class MaskSet:
    """The masks of a model's masked layers and the steps that change them.

    ``layers``: ``{name: MaskedLayer}`` (:func:`mask_layers`); ``generator``: every random
    choice (new masks, random growth) draws from it, so a seed fixes the topology.
    ``fired[name]``: every position that was active at some time since :meth:`reset_fired`
    (at construction: the current masks).
    """

    def __init__(self, layers: Mapping[str, MaskedLayer], generator: torch.Generator) -> None:
        self.layers = dict(layers)
        self.generator = generator
        self.fired: dict[str, torch.Tensor] = {}
        if not self.layers:
            raise ConfigError(
                "no layer to mask: the sparse method's targets select no Linear / Conv2d "
                "layer of the model; check the targets"
            )
        self.reset_fired()

    # ------------------------------------------------------------------ masks
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Weight shape of each masked layer."""
        return {n: tuple(layer.mask.shape) for n, layer in self.layers.items()}

    def _perm(self, n: int, device: torch.device) -> torch.Tensor:
        """A uniform permutation of ``range(n)`` from the generator, on ``device``."""
        return torch.randperm(n, generator=self.generator, device=self.generator.device).to(device)

    def randomize(self, densities: Mapping[str, float]) -> None:
        """New random masks: layer l gets exactly ``round(densities[l] * numel_l)`` active
        positions, drawn uniformly; ``fired`` is set to the new masks."""
        missing = [n for n in self.layers if n not in densities]
        if missing:
            raise ValueError(f"no density given for masked layer {missing[0]!r}")
        for name, layer in self.layers.items():
            numel = layer.mask.numel()
            count = min(max(round(float(densities[name]) * numel), 0), numel)
            flat = torch.zeros(numel, dtype=torch.bool, device=layer.mask.device)
            flat[self._perm(numel, flat.device)[:count]] = True
            layer.mask.copy_(flat.view(layer.mask.shape))
        self.reset_fired()

    def get(self) -> dict[str, torch.Tensor]:
        """A copy of every mask (bool)."""
        return {n: layer.mask.clone() for n, layer in self.layers.items()}

    def set(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Put ``masks`` (bool, or 0/1 of any dtype) into the layers (those named). The new
        positions are added to ``fired`` (they are active now)."""
        for name, mask in masks.items():
            layer = self._layer(name)
            if tuple(mask.shape) != tuple(layer.mask.shape):
                raise ValueError(
                    f"mask for {name!r} has shape {tuple(mask.shape)}, the layer's weight "
                    f"{tuple(layer.mask.shape)}"
                )
            layer.mask.copy_(mask.to(layer.mask.device) != 0)
            self.fired[name] = self._fired(name) | layer.mask

    def reset_fired(self) -> None:
        """``fired`` := the current masks."""
        self.fired = {n: layer.mask.clone() for n, layer in self.layers.items()}

    def _fired(self, name: str) -> torch.Tensor:
        """``fired[name]`` as bool on its layer's device (a checkpoint may restore it
        elsewhere)."""
        mask = self.layers[name].mask
        return self.fired[name].to(device=mask.device, dtype=torch.bool)

    def _layer(self, name: str) -> MaskedLayer:
        if name not in self.layers:
            raise ValueError(f"{name!r} is not a masked layer; masked: {', '.join(self.layers)}")
        return self.layers[name]

    # ---------------------------------------------------------------- weights
    @torch.no_grad()
    def apply(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Zero every stored weight outside its mask, and the same positions of the
        optimizer's per-weight state (SGD ``momentum_buffer``; Adam ``exp_avg``,
        ``exp_avg_sq``, ``max_exp_avg_sq``)."""
        for layer in self.layers.values():
            weight = layer.weight
            weight.mul_(layer.mask)
            if optimizer is None:
                continue
            state = optimizer.state.get(weight, {})
            for key in _STATE_KEYS:
                value = state.get(key)
                if isinstance(value, torch.Tensor) and value.shape == weight.shape:
                    value.mul_(layer.mask)

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Multiply each weight's gradient by its mask."""
        for layer in self.layers.values():
            if layer.weight.grad is not None:
                layer.weight.grad.mul_(layer.mask)

    @torch.no_grad()
    def freeze_gradients(self, frozen: Mapping[str, torch.Tensor]) -> None:
        """Zero each weight's gradient where ``frozen[name]`` is True (weights of earlier
        tasks)."""
        for name, where in frozen.items():
            grad = self._layer(name).weight.grad
            if grad is not None:
                grad.masked_fill_(where.to(grad.device) != 0, 0)

    # --------------------------------------------------------------- topology
    @torch.no_grad()
    def prune(self, rate: float, rule: str) -> dict[str, torch.Tensor]:
        """Deactivate ``ceil(rate * nonzero_l)`` active positions of each layer by ``rule``
        (:data:`PRUNE_RULES`): ``magnitude``: smallest ``|w|``; ``set``: the smallest
        positive and the largest (closest to zero) negative weights, ``ceil(k / 2)`` of the
        ``k`` from the positives and the rest from the others (a sign with too few gives
        its share to the other; an active weight exactly 0 counts as the largest negative)
        (SET); ``taylor_fo``: smallest ``(w * grad) ** 2``. Ties go to the lower position.
        Returns the positions removed per layer (bool)."""
        check_choice("prune rule", rule, PRUNE_RULES)
        check_range("prune rate", rate, 0.0, 1.0)
        removed_all: dict[str, torch.Tensor] = {}
        for name, layer in self.layers.items():
            flat_mask = layer.mask.flatten()
            active = flat_mask.nonzero().squeeze(1)
            n = active.numel()
            # rounded first: 0.28 * 25 is 7.000000000000001 in floats, and must prune 7
            k = min(n, math.ceil(round(rate * n, 9)))
            removed = torch.zeros_like(flat_mask)
            if k > 0:
                w = layer.weight.detach().flatten()[active]
                removed[active[self._prune_order(name, layer, rule, w, active, k)]] = True
                layer.mask.copy_((flat_mask & ~removed).view(layer.mask.shape))
            removed_all[name] = removed.view(layer.mask.shape)
        return removed_all

    def _prune_order(
        self,
        name: str,
        layer: MaskedLayer,
        rule: str,
        w: torch.Tensor,
        active: torch.Tensor,
        k: int,
    ) -> torch.Tensor:
        """Indices into ``active`` of the ``k`` positions ``rule`` removes."""
        if rule == "magnitude":
            return _stable_order(w.abs())[:k]
        if rule == "taylor_fo":
            grad = layer.weight.grad
            if grad is None:
                raise RuntimeError(
                    f"taylor_fo pruning needs the weights' gradients; {name!r} has none "
                    "(prune after backward, before zero_grad)"
                )
            return _stable_order((w * grad.flatten()[active]).pow(2))[:k]
        positive = (w > 0).nonzero().squeeze(1)
        other = (w <= 0).nonzero().squeeze(1)
        k_pos = min(math.ceil(k / 2), positive.numel())
        k_other = min(k - k_pos, other.numel())
        k_pos = k - k_other
        smallest_pos = positive[_stable_order(w[positive])[:k_pos]]
        largest_neg = other[_stable_order(w[other], descending=True)[:k_other]]
        return torch.cat([smallest_pos, largest_neg])

    @torch.no_grad()
    def grow(
        self,
        counts: Mapping[str, int],
        rule: str,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> dict[str, torch.Tensor]:
        """Activate exactly ``counts[name]`` inactive positions of each layer by ``rule``
        (:data:`GROW_RULES`): ``random``: uniformly among the inactive; ``random_unfired``:
        uniformly among positions never active (``fired`` False), then uniformly among the
        other inactive ones if those run out; ``momentum``: largest ``|m / (sqrt(v) +
        1e-8)|`` (Adam) or ``|momentum_buffer|`` (SGD) from ``optimizer``; ``gradient``:
        largest ``|grad|`` (RigL). Ties go to the lower position. Grown weights are set to
        zero; ``fired`` is updated. Returns the positions grown per layer (bool)."""
        check_choice("grow rule", rule, GROW_RULES)
        unknown = [n for n in counts if n not in self.layers]
        if unknown:
            self._layer(unknown[0])
        grown_all: dict[str, torch.Tensor] = {}
        for name, layer in self.layers.items():
            flat_mask = layer.mask.flatten()
            inactive = (~flat_mask).nonzero().squeeze(1)
            count = int(counts.get(name, 0))
            if not 0 <= count <= inactive.numel():
                raise ValueError(
                    f"cannot grow {count} positions in {name!r}: it has {inactive.numel()} "
                    "inactive ones"
                )
            grown = torch.zeros_like(flat_mask)
            if count > 0:
                grown[self._grow_choice(name, layer, rule, inactive, count, optimizer)] = True
                layer.mask.copy_((flat_mask | grown).view(layer.mask.shape))
                shaped = grown.view(layer.mask.shape)
                layer.weight.masked_fill_(shaped, 0)
                self.fired[name] = self._fired(name) | shaped
            grown_all[name] = grown.view(layer.mask.shape)
        return grown_all

    def _grow_choice(
        self,
        name: str,
        layer: MaskedLayer,
        rule: str,
        inactive: torch.Tensor,
        count: int,
        optimizer: torch.optim.Optimizer | None,
    ) -> torch.Tensor:
        """Flat positions (a subset of ``inactive``) ``rule`` activates."""
        device = inactive.device
        if rule == "random":
            return inactive[self._perm(inactive.numel(), device)[:count]]
        if rule == "random_unfired":
            unfired = self._fired(name).flatten()[inactive].logical_not()
            fresh, seen = inactive[unfired], inactive[~unfired]
            if count <= fresh.numel():
                return fresh[self._perm(fresh.numel(), device)[:count]]
            extra = seen[self._perm(seen.numel(), device)[: count - fresh.numel()]]
            return torch.cat([fresh, extra])
        if rule == "momentum":
            score = _momentum(name, layer.weight, optimizer)
        else:
            if layer.weight.grad is None:
                raise RuntimeError(
                    f"gradient growth needs the weights' gradients; {name!r} has none "
                    "(update after backward, before zero_grad)"
                )
            score = layer.weight.grad
        return inactive[_stable_order(score.abs().flatten()[inactive], descending=True)[:count]]

    def update(
        self,
        rate: float,
        prune_rule: str,
        grow_rule: str,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        """One topology update: :meth:`prune` at ``rate``, :meth:`grow` the same counts,
        then :meth:`apply` (each layer's non-zero count is unchanged)."""
        check_choice("grow rule", grow_rule, GROW_RULES)
        removed = self.prune(rate, prune_rule)
        self.grow({n: int(r.count_nonzero()) for n, r in removed.items()}, grow_rule, optimizer)
        self.apply(optimizer)

    # ----------------------------------------------------------------- report
    def report(self) -> dict[str, Any]:
        """The density reached, counted: ``{"overall": float, "nonzero": int, "total": int,
        "layers": {name: float}}`` (masked layers only)."""
        nonzero = sum(layer.nonzero() for layer in self.layers.values())
        total = sum(layer.mask.numel() for layer in self.layers.values())
        return {
            "overall": nonzero / total if total else 0.0,
            "nonzero": int(nonzero),
            "total": int(total),
            "layers": {n: layer.density() for n, layer in self.layers.items()},
        }


def _momentum(
    name: str, weight: torch.Tensor, optimizer: torch.optim.Optimizer | None
) -> torch.Tensor:
    """The official momentum-growth score: Adam ``m / (sqrt(v) + 1e-8)`` (no bias
    correction), else SGD's ``momentum_buffer``."""
    state = optimizer.state.get(weight, {}) if optimizer is not None else {}
    if isinstance(state.get("exp_avg"), torch.Tensor) and "exp_avg_sq" in state:
        return state["exp_avg"] / (state["exp_avg_sq"].sqrt() + MOMENTUM_EPS)
    if isinstance(state.get("momentum_buffer"), torch.Tensor):
        return state["momentum_buffer"]
    raise RuntimeError(
        f"momentum growth needs the optimizer's Adam (exp_avg, exp_avg_sq) or SGD "
        f"momentum_buffer state of {name!r}; pass the optimizer after it has stepped"
    )


class CosineDecay:
    """Death rate at call i of ``steps``: ``end + (start - end) (1 + cos(pi i / steps)) / 2``
    (PyTorch's CosineAnnealingLR, as the CL-with-DST code schedules it); after ``steps``
    calls it stays at ``end`` (CosineAnnealingLR would rise again). ``calls`` (the calls
    made) is the whole state, for checkpoints."""

    def __init__(self, start: float, steps: int, end: float = 0.005) -> None:
        check_positive("death rate", start, allow_zero=True)
        check_positive("death rate end", end, allow_zero=True)
        check_positive("cosine decay steps", steps)
        self.start = float(start)
        self.end = float(end)
        self.steps = int(steps)
        self.calls = 0

    def step(self) -> float:
        """Advance one call and return the new rate."""
        self.calls += 1
        return self.rate

    @property
    def rate(self) -> float:
        if self.calls >= self.steps:
            return self.end
        cos = math.cos(math.pi * self.calls / self.steps)
        return self.end + (self.start - self.end) * (1 + cos) / 2


def _numpy_percentile(values: torch.Tensor, q: float) -> torch.Tensor:
    """``numpy.percentile(values, q)`` (default 'linear' method), in ``values``' dtype."""
    n = values.numel()
    pos = q / 100 * (n - 1)
    lo_i = math.floor(pos)
    hi_i = min(lo_i + 1, n - 1)
    t = pos - lo_i
    lo = float(torch.kthvalue(values, lo_i + 1).values)
    hi = float(torch.kthvalue(values, hi_i + 1).values) if hi_i != lo_i else lo
    diff = hi - lo  # numpy's _lerp: from the nearer end
    value = hi - diff * (1 - t) if t >= 0.5 else lo + diff * t
    return torch.tensor(value, dtype=values.dtype, device=values.device)


@torch.no_grad()
def percentile_gradient_mask(
    layers: Mapping[str, MaskedLayer], percentile: float
) -> dict[str, float]:
    """SparCL's dynamic gradient masking, per layer: the weight's gradient times its mask,
    then every entry whose ``|g|`` lies strictly below the ``percentile``-th percentile of
    the layer's ``|g|`` set to zero (entries equal to it are kept). The percentile is taken
    over **all** entries of the masked gradient, the masked-out zeros included, with numpy's
    default linear interpolation (as the official ``apply_masks_on_grads_mix`` does).
    Sets each layer's ``grad_density`` to the fraction of entries kept, counted as the
    official gradient mask is (non-zero entries of the result), and returns it by name
    (layers without a gradient are skipped)."""
    check_range("gradient percentile", percentile, 0.0, 100.0)
    densities: dict[str, float] = {}
    for name, layer in layers.items():
        grad = layer.weight.grad
        if grad is None:
            continue
        grad.mul_(layer.mask)
        magnitude = grad.abs()
        threshold = _numpy_percentile(magnitude.flatten(), percentile)
        grad.masked_fill_(magnitude < threshold, 0)
        layer.grad_density = int(grad.count_nonzero()) / grad.numel()
        densities[name] = layer.grad_density
    return densities
