"""Deferred imports of heavy packages that Avalanche imports eagerly but clbench never uses.

Importing any part of Avalanche 0.6 runs ``avalanche/__init__``, which imports its whole
benchmark zoo, every metric and every training plugin. ``qpsolvers`` is one of them: GEM's
quadratic-program solver, about 1.3 s to import because it probes every solver installed
(JAX among them). Avalanche binds it once, with a plain ``import qpsolvers``, and does not
touch it while it loads, so it is made lazy with the standard library's
:class:`importlib.util.LazyLoader`: the module object exists at once and its code runs at
its first attribute access (a strategy that runs GEM gets the real package then).

This only works for a package imported once and not inspected: a second ``import NAME``
reads the module's ``__spec__`` and so loads it (``wandb``, which Avalanche and timm both
import, cannot be deferred this way), as does ``inspect.getmodule`` scanning every module.

What remains of Avalanche's import cost is measured and explained in docs/performance.md.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Iterable, Sequence
from types import ModuleType

#: top-level packages loaded at first use instead of at import
DEFERRED = ("qpsolvers",)


class _LazyFinder(importlib.abc.MetaPathFinder):
    """Finds the named top-level modules on sys.path and wraps their loader in
    :class:`importlib.util.LazyLoader`; any other name is left to the other finders."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = set(names)

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.names:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec  # a namespace package or an old-style loader: imported as usual
        spec.loader = importlib.util.LazyLoader(spec.loader)
        return spec


def defer(names: Iterable[str] = DEFERRED) -> None:
    """Make the top-level modules ``names`` load at first use (those not imported yet)."""
    pending = {n for n in names if n not in sys.modules}
    finder = next((f for f in sys.meta_path if isinstance(f, _LazyFinder)), None)
    if finder is None:
        sys.meta_path.insert(0, _LazyFinder(pending))
    else:
        finder.names |= pending


def is_loaded(name: str) -> bool:
    """Whether module ``name`` has run its code (a deferred one only after first use)."""
    module = sys.modules.get(name)
    return module is not None and not isinstance(module, importlib.util._LazyModule)
