"""Injection of layers by target name: the one place that finds and swaps a model's layers.

Every adapter that wraps or replaces existing layers (LoRA and its variants, MoRA's
experts, MoE-Adapters' mixtures, sparse masks) goes through this module, so they agree
on what a target name means and on the resulting module structure and parameter names.

- **Target names** (:data:`VALID_TARGETS`) name a layer of a transformer block in either
  backbone layout, and may be mixed in one model: timm ViT (``blocks[i].attn.qkv`` /
  ``attn.proj`` / ``mlp.fc1`` / ``mlp.fc2``) and open_clip towers (``resblocks[i].attn.
  in_proj`` once the attention is swapped, ``attn.out_proj``, ``mlp.c_fc``, ``mlp.c_proj``).
  ``proj``/``out_proj``, ``fc1``/``c_fc`` and ``fc2``/``c_proj`` are aliases; ``q``, ``k``,
  ``v`` are slices of the fused qkv projection (:func:`target_specs` gives the slice).
  ``linear`` names every linear layer (any architecture, e.g. a MIL aggregator).
- **Matching**: a qualified module name matches a suffix when it is the suffix or ends
  with ``"." + suffix`` (:func:`matches`); :func:`tower_filter` keeps one tower of a CLIP
  model (``"image"``: under ``.visual``, ``"text"``: the rest, ``"both"``/None: all).
- **Replacing**: :func:`find_modules` lists the modules that match (targets or raw
  suffixes, module types, tower, a predicate) in ``named_modules`` order, and
  :func:`replace_modules` swaps each for ``factory(module)`` under the same name, so the
  wrapper's own parameters appear below the original name (``...attn.qkv.base.weight``).

A masked layer (sparse training) would use it as LoRA does, on linears and convolutions
alike: ``MaskedLayer(base)`` keeps ``base`` (an ``nn.Linear`` or ``nn.Conv2d``) and a mask
buffer of ``base.weight``'s shape, computes ``base._conv_forward(x, base.weight * mask,
base.bias)`` / ``F.linear(x, base.weight * mask, base.bias)``, and exposes ``weight`` /
``bias`` as properties (an ``nn.MultiheadAttention`` reads ``out_proj.weight`` directly).
Then ``replace_modules(model, MaskedLayer, types=(nn.Linear, nn.Conv2d))`` masks every
linear and convolution, ``replace_modules(model, MaskedLayer, targets=["qkv", "fc1"],
types=(nn.Linear,), tower="image")`` only the named ones, and ``where=`` narrows further
(e.g. ``lambda m: m.weight.requires_grad``). Undoing it is ``replace_modules(model,
lambda m: m.base, types=(MaskedLayer,))`` after folding the mask into the weight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from torch import nn

#: per layout: target name -> (module name suffix, output slice index within a fused qkv or None)
TIMM_VIT_TARGETS: dict[str, tuple[str, int | None]] = {
    "qkv": ("attn.qkv", None),
    "q": ("attn.qkv", 0),
    "k": ("attn.qkv", 1),
    "v": ("attn.qkv", 2),
    "proj": ("attn.proj", None),
    "fc1": ("mlp.fc1", None),
    "fc2": ("mlp.fc2", None),
}
OPEN_CLIP_TARGETS: dict[str, tuple[str, int | None]] = {
    "qkv": ("attn.in_proj", None),
    "q": ("attn.in_proj", 0),
    "k": ("attn.in_proj", 1),
    "v": ("attn.in_proj", 2),
    "out_proj": ("attn.out_proj", None),
    "c_fc": ("mlp.c_fc", None),
    "c_proj": ("mlp.c_proj", None),
}
#: names that mean the same layer in the other layout
ALIASES = {"proj": "out_proj", "out_proj": "proj", "fc1": "c_fc", "c_fc": "fc1"}
ALIASES |= {"fc2": "c_proj", "c_proj": "fc2"}
LAYOUTS = {"timm": TIMM_VIT_TARGETS, "open_clip": OPEN_CLIP_TARGETS}
#: every linear layer of the model (MIL aggregators: CoMEL's OWLoRA and the LoRA baselines
#: of the MIL kind adapt all of them; the bag classifier, the head, lies outside the root)
ALL_LINEAR = "linear"
VALID_TARGETS = (*TIMM_VIT_TARGETS, "out_proj", "c_fc", "c_proj", ALL_LINEAR)
#: targets living in the attention (an open_clip MHA must be swapped for them)
ATTENTION_TARGETS = frozenset({"qkv", "q", "k", "v", "proj", "out_proj"})
TOWERS = ("image", "text", "both")


def check_targets(targets: Iterable[str], what: str = "") -> None:
    """ValueError naming the first unknown target (``what``: e.g. "LoRA", for the message)."""
    bad = [t for t in targets if t not in VALID_TARGETS]
    if bad:
        kind = f"{what} target" if what else "target"
        raise ValueError(f"unknown {kind} {bad[0]!r}; valid targets: {', '.join(VALID_TARGETS)}")


def target_specs(target: str) -> list[tuple[str, int | None]]:
    """(suffix, qkv part) of ``target`` in every layout, aliases resolved."""
    if target == ALL_LINEAR:
        return [("", None)]  # the empty suffix matches every name (see :func:`matches`)
    specs = []
    for table in LAYOUTS.values():
        name = target if target in table else ALIASES.get(target, target)
        if name in table:
            specs.append(table[name])
    return specs


def target_suffixes(targets: Iterable[str]) -> set[str]:
    """The module name suffixes ``targets`` name in either layout."""
    return {suffix for t in targets for suffix, _ in target_specs(t)}


def matches(name: str, suffix: str) -> bool:
    """Whether the qualified module name ``name`` is ``suffix`` or ends with ``.suffix``
    (the empty suffix, target ``linear``, matches every name)."""
    return not suffix or name == suffix or name.endswith("." + suffix)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the qualified name ``name`` of ``model`` (replacing what is there)."""
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def tower_filter(model: nn.Module, tower: str | None) -> Callable[[str], bool]:
    """Predicate on qualified module names selecting ``tower`` of a CLIP model."""
    if tower is None or tower == "both":
        return lambda name: True
    if tower not in TOWERS:
        raise ValueError(f"unknown tower {tower!r}; valid towers: {', '.join(TOWERS)}")
    if not isinstance(getattr(model, "visual", None), nn.Module):
        raise ValueError(f"tower={tower!r} needs a CLIP model with an image tower at .visual")

    def in_image(name: str) -> bool:
        return name == "visual" or name.startswith("visual.")

    return in_image if tower == "image" else (lambda name: not in_image(name))


def find_modules(
    model: nn.Module,
    *,
    targets: Sequence[str] | None = None,
    suffixes: Iterable[str] = (),
    types: type[nn.Module] | tuple[type[nn.Module], ...] | None = None,
    tower: str | None = None,
    where: Callable[[nn.Module], bool] | None = None,
) -> dict[str, nn.Module]:
    """The submodules of ``model`` selected by name, type, tower and predicate.

    A module is kept when its qualified name matches a suffix of ``targets`` (target
    names, see :data:`VALID_TARGETS`) or one of the raw ``suffixes`` (neither given:
    every name), it is an instance of ``types`` (None: any), it lies in ``tower``
    (:func:`tower_filter`) and ``where(module)`` holds. The root module itself is never
    selected. Returns ``{qualified name: module}`` in ``model.named_modules()`` order.
    """
    if targets is not None:
        check_targets(targets)
    in_tower = tower_filter(model, tower)
    wanted = set(suffixes) | (target_suffixes(targets) if targets is not None else set())
    by_name = targets is not None or bool(wanted)
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not name or not in_tower(name):
            continue
        if by_name and not any(matches(name, s) for s in wanted):
            continue
        if types is not None and not isinstance(module, types):
            continue
        if where is not None and not where(module):
            continue
        found[name] = module
    return found


def replace_modules(
    model: nn.Module,
    factory: Callable[[nn.Module], nn.Module],
    *,
    targets: Sequence[str] | None = None,
    suffixes: Iterable[str] = (),
    types: type[nn.Module] | tuple[type[nn.Module], ...] | None = None,
    tower: str | None = None,
    where: Callable[[nn.Module], bool] | None = None,
) -> dict[str, nn.Module]:
    """Replace every module :func:`find_modules` selects with ``factory(module)``.

    The selection is made before anything is replaced; a selected module inside one
    already handled (swapped or kept) is left alone (its parent's factory received it).
    ``factory`` may return the module itself to keep it (e.g. a layer wrapped by an earlier
    call).
    Returns ``{qualified name: new module}`` in ``named_modules`` order.
    """
    selected = find_modules(
        model, targets=targets, suffixes=suffixes, types=types, tower=tower, where=where
    )
    replaced: dict[str, nn.Module] = {}
    for name, module in selected.items():
        if any(name.startswith(done + ".") for done in replaced):
            continue
        new = factory(module)
        if new is not module:
            set_submodule(model, name, new)
        replaced[name] = new
    return replaced
