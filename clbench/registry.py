"""Name -> component registries for strategies, scenarios, backbones and protocols.

Every entry is a lazy reference ``"module:attribute"``, exactly as an entry point is:
nothing is imported until the component is built or its object is asked for
(:meth:`Registry.get`, :meth:`Entry.load`). Listing names, checking a name and reading a
component's summary import nothing (the summary is read from the module's source with
:mod:`ast`).

Built-ins are declared in one table per package, ``BUILTINS`` in ``clbench.strategies``,
``clbench.scenarios``, ``clbench.backbones`` and ``clbench.protocols`` (those ``__init__``
modules import no component). Third-party packages register through the entry-point
groups ``clbench.strategies``, ``clbench.scenarios``, ``clbench.backbones`` and
``clbench.protocols``; the entry-point name is the registered name. Code can also
register an object it already has with the ``@STRATEGIES.register("name")`` decorator.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import sys
import tokenize
from collections.abc import Callable, Iterator
from importlib.machinery import ModuleSpec
from typing import Any, Generic, TypeVar

from clbench.errors import ClbenchError, first_line, unknown_choice

T = TypeVar("T")

BUILTIN = "builtin"


class DuplicateNameError(ClbenchError, ValueError):
    """Two different components were registered under one name."""


class Entry(Generic[T]):
    """One registered component: its name, where it comes from, and its lazy reference.

    ``ref`` is ``"module:attribute"`` (``attribute`` may be dotted); the object is
    imported by :meth:`load` (or the :attr:`obj` property) on first use and kept.
    """

    def __init__(
        self,
        name: str,
        source: str,
        ref: str | None = None,
        *,
        kind: str = "component",
        obj: Any = None,
    ) -> None:
        if ref is None and obj is None:
            raise ValueError("an Entry needs a reference or an object")
        self.name = name
        self.source = source  # "builtin" or the distribution that provides it
        self.kind = kind
        self.ref = _normal_ref(ref) if ref is not None else _ref_of(obj)
        self._obj: Any = obj
        self._loaded = obj is not None

    def __repr__(self) -> str:
        state = "loaded" if self._loaded else "lazy"
        return f"Entry({self.name!r}, {self.source!r}, {self.ref!r}, {state})"

    @property
    def module(self) -> str:
        return self.ref.partition(":")[0]

    @property
    def attribute(self) -> str:
        return self.ref.partition(":")[2]

    @property
    def is_plugin(self) -> bool:
        return self.source != BUILTIN

    @property
    def loaded(self) -> bool:
        return self._loaded

    def load(self) -> T:
        """Import the component (once). A plugin that cannot be imported is a one-line
        :class:`ClbenchError`; a built-in that cannot be imported raises as it is (a bug)."""
        if self._loaded:
            return self._obj
        try:
            obj = _import_ref(self.ref)
        except Exception as e:
            if not self.is_plugin:
                raise
            raise ClbenchError(
                f"cannot load {self.kind} plugin {self.name!r} from {self.source} "
                f"({self.ref}): {type(e).__name__}: {first_line(e)}"
            ) from e
        self._obj, self._loaded = obj, True
        return obj

    @property
    def obj(self) -> T:
        return self.load()

    def _runtime(self) -> Any:
        """The object if it is already imported (never imports); else None."""
        if self._loaded:
            return self._obj
        module = sys.modules.get(self.module)
        if module is None:
            return None
        try:
            return _getattr_path(module, self.attribute)
        except AttributeError:
            return None

    @property
    def summary(self) -> str:
        """First line of the component's docstring (read from source if not imported)."""
        obj = self._runtime()
        if obj is not None:
            doc = inspect.getdoc(obj) or ""
        else:
            try:
                doc = _static_doc(self.module, self.attribute) or ""
            except Exception:  # a static look-up never fails a listing
                doc = ""
        doc = doc.strip()
        return doc.splitlines()[0] if doc else ""

    @property
    def scenario_kind(self) -> str | None:
        """For a strategy: the scenario kind it runs (its class attribute ``kind``, or its
        older ``protocols`` tuple), read from source if not imported; None if unknown."""
        obj = self._runtime()
        if obj is not None:
            kind = getattr(obj, "kind", None)
            if isinstance(kind, str):
                return kind
            protocols = getattr(obj, "protocols", None)
            if isinstance(protocols, tuple | list) and protocols:
                return ", ".join(str(p) for p in protocols)
            return None
        try:
            return _static_scenario_kind(self.module, self.attribute)
        except Exception:
            return None


class Registry(Generic[T]):
    """A registry of one kind of component: a built-in table plus entry-point plugins.

    ``get(name)`` imports that one component; ``names()``, ``name in registry``,
    iteration and ``entry(name)`` import nothing.
    """

    def __init__(self, kind: str, group: str, builtins: str | None = None) -> None:
        self.kind = kind
        self.group = group  # the entry-point group
        self.builtins = builtins  # the package whose BUILTINS table names the built-ins
        self._entries: dict[str, Entry[T]] = {}
        self._discovered = False

    # ------------------------------------------------------------ registration
    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering an object (a built-in of the calling code) as ``name``."""

        def deco(obj: T) -> T:
            self._add_builtin(Entry(name, BUILTIN, kind=self.kind, obj=obj))
            return obj

        return deco

    def add(self, name: str, ref: str, source: str = BUILTIN) -> Entry[T]:
        """Register the lazy reference ``ref`` (``"module:attribute"``) as ``name``;
        nothing is imported until the entry is loaded. A ``source`` other than
        ``"builtin"`` (a distribution name) makes it a plugin entry."""
        self.discover()
        entry: Entry[T] = Entry(name, source, ref, kind=self.kind)
        if source == BUILTIN:
            self._add_builtin(entry)
        elif name not in self._entries:
            self._entries[name] = entry
        elif self._entries[name].is_plugin and self._entries[name].ref != entry.ref:
            old = self._entries[name]
            raise DuplicateNameError(
                f"{self.kind} {name!r} is registered twice ({old.source}, {source})"
            )
        return self._entries[name]  # as for entry points, a built-in wins over a plugin

    def _add_builtin(self, entry: Entry[T]) -> None:
        old = self._entries.get(entry.name)
        if old is None:
            self._entries[entry.name] = entry
            return
        if old.is_plugin:  # a plugin read before this registration
            raise DuplicateNameError(
                f"{self.kind} {entry.name!r} is registered twice ({old.source}, {entry.source})"
            )
        if old.ref == entry.ref:  # the same object, by reference: keep the loaded one
            if entry.loaded and not old.loaded:
                self._entries[entry.name] = entry
            return
        if entry.loaded and old._runtime() is entry.obj:  # a re-export of the same object
            self._entries[entry.name] = entry
            return
        raise DuplicateNameError(
            f"{self.kind} {entry.name!r} is registered twice ({old.ref}, {entry.ref})"
        )

    def discover(self) -> None:
        """Read the built-in table and the entry points (once); imports no component."""
        if self._discovered:
            return
        self._discovered = True
        if self.builtins is not None:
            table = getattr(importlib.import_module(self.builtins), "BUILTINS", {})
            for name, ref in table.items():
                self._add_builtin(Entry(name, BUILTIN, ref, kind=self.kind))
        for ep in _entry_points(self.group):
            old = self._entries.get(ep.name)
            if old is not None and not old.is_plugin:
                continue  # a built-in wins over a plugin of the same name
            dist = ep.dist.name if getattr(ep, "dist", None) is not None else ep.value
            if old is not None:
                if old.ref == _normal_ref(ep.value):  # the same object found twice
                    continue
                raise DuplicateNameError(
                    f"{self.kind} {ep.name!r} is registered twice ({old.source}, {dist})"
                )
            self._entries[ep.name] = Entry(ep.name, dist, ep.value, kind=self.kind)

    # ------------------------------------------------------------------ access
    def entry(self, name: str) -> Entry[T]:
        """The entry registered as ``name`` (not loaded); a clear error if none."""
        self.discover()
        if name not in self._entries:
            raise unknown_choice(self.kind, name, self._entries)
        return self._entries[name]

    def get(self, name: str) -> T:
        """The component registered as ``name`` (imported now if it was not)."""
        return self.entry(name).load()

    def names(self) -> list[str]:
        self.discover()
        return sorted(self._entries)

    def __iter__(self) -> Iterator[Entry[T]]:
        self.discover()
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def __contains__(self, name: object) -> bool:
        self.discover()
        return name in self._entries

    def __len__(self) -> int:
        self.discover()
        return len(self._entries)


# --------------------------------------------------------------------- helpers
_ENTRY_POINTS: Any = None


def _entry_points(group: str) -> list[Any]:
    global _ENTRY_POINTS
    if _ENTRY_POINTS is None:
        from importlib.metadata import entry_points

        _ENTRY_POINTS = entry_points()  # every group at once: one scan of the installed dists
    return list(_ENTRY_POINTS.select(group=group))


def _normal_ref(ref: str) -> str:
    """``"module:attr"`` without spaces or entry-point extras (``"m : a [x]"`` -> ``"m:a"``)."""
    module, _, attr = ref.split("[", 1)[0].partition(":")
    return f"{module.strip()}:{attr.strip()}" if attr.strip() else module.strip()


def _ref_of(obj: Any) -> str:
    module = getattr(obj, "__module__", None) or "?"
    return f"{module}:{getattr(obj, '__qualname__', None) or getattr(obj, '__name__', '?')}"


def _getattr_path(obj: Any, path: str) -> Any:
    for part in path.split(".") if path else []:
        obj = getattr(obj, part)
    return obj


def _import_ref(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return _getattr_path(importlib.import_module(module), attr)


# --------------------------------------------- static look-up (ast, no imports)
_MAX_HOPS = 8  # how many modules a look-up may follow (imports, base classes)
_TREES: dict[str, tuple[ast.Module, str] | None] = {}


def _find_spec(name: str) -> ModuleSpec | None:
    """The spec of module ``name`` without importing it or any package above it."""
    parent = name.rpartition(".")[0]
    if not parent or parent in sys.modules:
        return importlib.util.find_spec(name)  # imports nothing: the parent is there
    parent_spec = _find_spec(parent)
    if parent_spec is None or parent_spec.submodule_search_locations is None:
        return None
    path = list(parent_spec.submodule_search_locations)
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        if find is None:
            continue
        try:
            spec = find(name, path)
        except Exception:
            continue
        if spec is not None:
            return spec
    return None


def _module_tree(name: str) -> tuple[ast.Module, str] | None:
    """(parsed source, package for relative imports) of module ``name``; None if unknown."""
    if name in _TREES:
        return _TREES[name]
    _TREES[name] = None
    try:
        spec = _find_spec(name)
    except Exception:
        spec = None
    origin = getattr(spec, "origin", None)
    if spec is not None and isinstance(origin, str) and origin.endswith(".py"):
        try:
            with tokenize.open(origin) as f:
                tree = ast.parse(f.read(), filename=origin)
        except Exception:
            tree = None
        if tree is not None:
            package = (
                name if spec.submodule_search_locations is not None else name.rpartition(".")[0]
            )
            _TREES[name] = (tree, package)
    return _TREES[name]


def _absolute(module: str | None, level: int, package: str) -> str:
    if level == 0:
        return module or ""
    base = package.rsplit(".", level - 1)[0] if level > 1 else package
    return f"{base}.{module}" if module else base


def _binding(name: str, tree: ast.Module, package: str) -> tuple[str, Any] | None:
    """What the top-level ``name`` of a module is bound to (the last binding wins):
    ("def", node), ("from", (module, name)) or ("module", module)."""
    found: tuple[str, Any] | None = None
    for stmt in tree.body:
        if isinstance(stmt, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            if stmt.name == name:
                found = ("def", stmt)
        elif isinstance(stmt, ast.ImportFrom):
            for alias in stmt.names:
                if (alias.asname or alias.name) == name:
                    found = ("from", (_absolute(stmt.module, stmt.level, package), alias.name))
        elif isinstance(stmt, ast.Import):
            for alias in stmt.names:
                if alias.asname == name:
                    found = ("module", alias.name)
                elif alias.asname is None and alias.name.partition(".")[0] == name:
                    found = ("module", name)
    return found


def _resolve(module: str, attr: str, hops: int = 0) -> tuple[str, Any] | None:
    """(module, ClassDef/FunctionDef node) defining ``module:attr``, following imports."""
    if hops > _MAX_HOPS:
        return None
    parsed = _module_tree(module)
    if parsed is None:
        return None
    tree, package = parsed
    head, _, rest = attr.partition(".")
    found = _binding(head, tree, package)
    if found is None:
        return None
    how, what = found
    if how == "from":
        src_module, src_name = what
        hit = _resolve(src_module, f"{src_name}.{rest}" if rest else src_name, hops + 1)
        if hit is None and rest:  # `from pkg import submodule`, then submodule.Name
            hit = _resolve(f"{src_module}.{src_name}", rest, hops + 1)
        return hit
    if how == "module":
        return _resolve(what, rest, hops + 1) if rest else None
    node = what
    for part in rest.split(".") if rest else []:  # a nested class
        node = next(
            (
                s
                for s in getattr(node, "body", [])
                if isinstance(s, ast.ClassDef | ast.FunctionDef) and s.name == part
            ),
            None,
        )
        if node is None:
            return None
    return module, node


def _base_refs(module: str, node: ast.ClassDef) -> Iterator[tuple[str, str]]:
    """(module, attribute) of each base class written as Name or dotted Attribute."""
    for base in node.bases:
        parts: list[str] = []
        while isinstance(base, ast.Attribute):
            parts.append(base.attr)
            base = base.value
        if isinstance(base, ast.Name):
            parts.append(base.id)
            yield module, ".".join(reversed(parts))


def _ancestors(module: str, attr: str) -> Iterator[tuple[str, ast.ClassDef]]:
    """The class and its bases, depth-first left to right (close to the MRO), each once."""
    seen: set[tuple[str, str]] = set()
    stack = [(module, attr, 0)]
    while stack:
        mod, name, hops = stack.pop()
        hit = _resolve(mod, name, hops)
        if hit is None or not isinstance(hit[1], ast.ClassDef):
            continue
        key = (hit[0], hit[1].name)
        if key in seen:
            continue
        seen.add(key)
        yield hit
        if hops < _MAX_HOPS:
            stack.extend((m, a, hops + 1) for m, a in reversed(list(_base_refs(*hit))))


def _static_doc(module: str, attr: str) -> str | None:
    hit = _resolve(module, attr)
    if hit is None:
        return None
    if not isinstance(hit[1], ast.ClassDef):
        return ast.get_docstring(hit[1])
    for _, node in _ancestors(module, attr):  # inspect.getdoc inherits a class docstring
        doc = ast.get_docstring(node)
        if doc:
            return doc
    return None


def _class_literal(node: ast.ClassDef, name: str) -> Any:
    """The literal value assigned to ``name`` in the class body (None if none)."""
    value = None
    for stmt in node.body:
        if isinstance(stmt, ast.Assign):
            targets = stmt.targets
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            targets = [stmt.target]
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            try:
                value = ast.literal_eval(stmt.value)
            except Exception:
                value = None
    return value


def _static_scenario_kind(module: str, attr: str) -> str | None:
    for _, node in _ancestors(module, attr):
        kind = _class_literal(node, "kind")
        if isinstance(kind, str):
            return kind
        protocols = _class_literal(node, "protocols")
        if isinstance(protocols, tuple | list) and protocols:
            return ", ".join(str(p) for p in protocols)
    return None


STRATEGIES: Registry[Any] = Registry("strategy", "clbench.strategies", "clbench.strategies")
SCENARIOS: Registry[Any] = Registry("scenario", "clbench.scenarios", "clbench.scenarios")
BACKBONES: Registry[Any] = Registry("backbone", "clbench.backbones", "clbench.backbones")
#: evaluation protocols by the scenario kind they run (not a config group)
PROTOCOLS: Registry[Any] = Registry("protocol", "clbench.protocols", "clbench.protocols")

#: the registries of the config groups (conf/strategy, conf/scenario, conf/backbone)
REGISTRIES = {"strategy": STRATEGIES, "scenario": SCENARIOS, "backbone": BACKBONES}
