"""Training FLOPs of a model, counted per layer from the calls actually made.

Only linear and 2-d convolution layers count (``nn.Linear``, ``nn.Conv2d`` and a
:class:`~clbench.adapters.sparse.MaskedLayer` around one): they hold nearly all the
arithmetic of the CNNs and ViTs used here. Not counted: bias additions, norms,
activations, pooling, the attention score and value products of a transformer (and the
projections of ``nn.MultiheadAttention``, which calls them functionally), the optimizer
update. One call of a layer costs ``2 * MACs`` FLOPs (a multiply and an add), with
``MACs = output elements * in_features`` (linear) or ``output elements * in_channels /
groups * kh * kw`` (convolution): :func:`layer_forward_flops`.

Training (:class:`TrainingFlops`), per call of a layer with weight density ``d_w`` and
gradient density ``d_g`` (a :class:`MaskedLayer`'s ``flop_density()``; 1 and 1 for a plain
layer), with ``F`` its dense forward FLOPs:

- forward: ``F * d_w`` (only the active weights multiply);
- backward, counted when autograd actually computes the gradient of the layer's output:
  the input gradient ``F * d_w`` if the layer's input requires grad (not for the first
  layer, whose input is the data) and the weight gradient ``F * d_g`` if its weight is
  trained. A layer of a fully trained dense net thus costs ``3 F`` (``2 F`` for the first
  one), a masked one ``F (2 d_w + d_g)``, the usual count of sparse-training papers (RigL,
  SparCL), and a call without backward (under ``no_grad``: buffer logits, a frozen part)
  costs its forward only.

The dense equivalent is the same calls with every density 1. Densities are read at the
forward (a method that sets the gradient density after its backward, as SparCL's
gradient masking does, is counted with the density of its previous update). Removed
examples cost nothing because they never reach a forward.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from clbench.adapters.sparse import MaskedLayer

#: the plain layer types that are counted
COUNTED = (nn.Linear, nn.Conv2d)


def layer_forward_flops(module: nn.Module, output: torch.Tensor) -> int:
    """Dense forward FLOPs (``2 * MACs``, biases not counted) of one call of ``module`` (a
    Linear, Conv2d or MaskedLayer around one) that produced ``output``."""
    base = module.base if isinstance(module, MaskedLayer) else module
    if isinstance(base, nn.Linear):
        macs = output.numel() * base.in_features
    elif isinstance(base, nn.Conv2d):
        kh, kw = base.kernel_size
        macs = output.numel() * (base.in_channels // base.groups) * kh * kw
    else:
        raise TypeError(f"FLOPs are counted for Linear and Conv2d layers, not {type(base)}")
    return 2 * macs


def flop_densities(module: nn.Module) -> tuple[float, float]:
    """(weight density, gradient density) of a counted layer: a MaskedLayer's own, else 1."""
    if isinstance(module, MaskedLayer):
        d_w, d_g = module.flop_density()
        return float(d_w), float(d_g)
    return 1.0, 1.0


def counted_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers of ``model`` whose calls are counted, by qualified name: every
    MaskedLayer and every Linear / Conv2d that is not the ``base`` of a MaskedLayer (its
    calls are the MaskedLayer's)."""
    modules = dict(model.named_modules())
    bases = {id(m.base) for m in modules.values() if isinstance(m, MaskedLayer)}
    return {
        name: m
        for name, m in modules.items()
        if isinstance(m, MaskedLayer) or (isinstance(m, COUNTED) and id(m) not in bases)
    }


class TrainingFlops:
    """Counts the training FLOPs of ``model`` (see the module docstring) while attached.

    ``flops`` / ``dense_flops``: totals (actual and dense equivalent); ``layers`` /
    ``dense_layers``: the same per layer name. The layers are looked up again before every
    forward of ``model`` itself, so a layer created while attached (a grown head, a layer
    wrapped in a mask) is counted from its first call. Only ``model``'s own layers count:
    a deep copy of it (which keeps the hooks) counts nothing.
    """

    def __init__(self, model: nn.Module, attach: bool = True) -> None:
        self.model = model
        self.flops = 0.0
        self.dense_flops = 0.0
        self.layers: dict[str, float] = {}
        self.dense_layers: dict[str, float] = {}
        self._names: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()
        self._hooked: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self._handles: list[Any] = []
        # hooks are plain functions (a deep copy of the model shares them, never this object)
        self._hook = self._make_hook()
        if attach:
            self.attach()

    # ----------------------------------------------------------------- hooks
    def attach(self) -> None:
        """Start counting."""
        self.close()
        root = self.model

        def before_forward(module: nn.Module, args: tuple[Any, ...]) -> None:
            if module is root:  # a copy of the model keeps this hook: not ours
                self._scan()

        self._handles.append(root.register_forward_pre_hook(before_forward))
        self._scan()

    def close(self) -> None:
        """Stop counting (the totals stay)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._names = weakref.WeakKeyDictionary()
        self._hooked = weakref.WeakSet()

    def _scan(self) -> None:
        names: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()
        for name, m in counted_layers(self.model).items():
            names[m] = name
            if m not in self._hooked:
                self._handles.append(m.register_forward_hook(self._hook))
                self._hooked.add(m)
        self._names = names

    def _make_hook(self) -> Any:
        def after_forward(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            self._count(module, args, output)

        return after_forward

    def _count(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        name = self._names.get(module)
        if name is None or not isinstance(output, torch.Tensor):
            return  # no longer (or never) a layer of the model: a replaced layer, a copy
        dense = float(layer_forward_flops(module, output))
        d_w, d_g = flop_densities(module)
        self._add(name, dense * d_w, dense)
        if not (torch.is_grad_enabled() and output.requires_grad):
            return
        x = args[0] if args else None
        input_grad = isinstance(x, torch.Tensor) and x.requires_grad
        weight_grad = bool(module.weight.requires_grad)
        actual = dense * ((d_w if input_grad else 0.0) + (d_g if weight_grad else 0.0))
        equivalent = dense * (int(input_grad) + int(weight_grad))
        if equivalent == 0:
            return  # only the bias is trained: its gradient is a sum, not counted

        def on_backward(grad: torch.Tensor) -> None:
            self._add(name, actual, equivalent)

        output.register_hook(on_backward)

    def _add(self, name: str, actual: float, dense: float) -> None:
        self.flops += actual
        self.dense_flops += dense
        self.layers[name] = self.layers.get(name, 0.0) + actual
        self.dense_layers[name] = self.dense_layers.get(name, 0.0) + dense

    def __enter__(self) -> TrainingFlops:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
