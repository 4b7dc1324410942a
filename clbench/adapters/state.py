"""Module structure as data, so a checkpoint restores into a model rebuilt from its config.

Continual learners change their model's *shape* as they go: a head grows, LoRA blocks
are added, merged or pruned, routers and autoencoders are appended. A module whose shape
changes after it is built implements two methods:

- ``structure() -> dict``: its current shape as JSON-able values (no tensors);
- ``restore_structure(spec)``: rebuild itself to that shape (the values of any new
  parameters do not matter: the checkpoint's tensors are loaded afterwards).

:func:`structure_of` collects the specs of a model; :func:`restore_structure` applies
them parent before child (a parent may create the children whose specs follow), after
which ``model.load_state_dict(tensors, strict=True)`` fills in every value.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def structure_of(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{module name: spec}`` for every module of ``model`` that has a ``structure()``."""
    return {name: m.structure() for name, m in model.named_modules() if hasattr(m, "structure")}


def restore_structure(model: nn.Module, specs: dict[str, dict[str, Any]]) -> None:
    """Give ``model`` the shape ``specs`` (from :func:`structure_of`) describe."""

    def walk(module: nn.Module, name: str) -> None:
        if name in specs:
            if not hasattr(module, "restore_structure"):
                raise ValueError(f"module {name!r} ({type(module).__name__}) has no structure")
            module.restore_structure(specs[name])
        for child_name, child in list(module.named_children()):
            walk(child, f"{name}.{child_name}" if name else child_name)

    walk(model, "")


_MODULE, _PARAM, _FREE = "__module__", "__parameter__", "__free_parameter__"


def encode_refs(tree: Any, model: nn.Module) -> Any:
    """``tree`` with every submodule / parameter of ``model`` replaced by its name, and
    every other ``nn.Parameter`` by its value and ``requires_grad`` (so the tree is data:
    see :mod:`clbench.statefile`). Other values pass through."""
    modules = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    params = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}

    def walk(value: Any) -> Any:
        if isinstance(value, nn.Parameter):
            if id(value) in params:
                return {_PARAM: params[id(value)]}
            return {_FREE: value.detach(), "requires_grad": value.requires_grad}
        if isinstance(value, nn.Module):
            if id(value) not in modules:
                raise TypeError(f"a {type(value).__name__} outside the model is not data")
            return {_MODULE: modules[id(value)]}
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [walk(v) for v in value]
        return value

    return walk(tree)


def decode_refs(tree: Any, model: nn.Module) -> Any:
    """The inverse of :func:`encode_refs` on ``model`` (rebuilt and restored)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    params = dict(model.named_parameters(remove_duplicate=False))

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            if _MODULE in value:
                return modules[value[_MODULE]]
            if _PARAM in value:
                return params[value[_PARAM]]
            if _FREE in value:
                return nn.Parameter(value[_FREE], requires_grad=bool(value["requires_grad"]))
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    return walk(tree)
