"""Name -> component registries for strategies, scenarios and backbones.

Built-ins register with a decorator (``@STRATEGIES.register("lora")``); third-party
packages register through the entry-point groups ``clbench.strategies``,
``clbench.scenarios`` and ``clbench.backbones``. An entry point names the object to
register; its entry-point name is the registered name.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from clbench.errors import unknown_choice

T = TypeVar("T")

#: The packages whose import registers the built-ins of each kind.
_BUILTIN_MODULES = {
    "strategy": "clbench.strategies",
    "scenario": "clbench.scenarios",
    "backbone": "clbench.backbones.embedded",
}


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered component."""

    name: str
    obj: T
    source: str  # "builtin" or the distribution that provides it

    @property
    def summary(self) -> str:
        """First line of the component's docstring."""
        doc = inspect.getdoc(self.obj) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""


class Registry(Generic[T]):
    """A registry of one kind of component, filled lazily from built-ins and entry points."""

    def __init__(self, kind: str, group: str) -> None:
        self.kind = kind
        self.group = group
        self._entries: dict[str, Entry[T]] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering a built-in component under ``name``."""

        def deco(obj: T) -> T:
            self._add(Entry(name, obj, "builtin"))
            return obj

        return deco

    def _add(self, entry: Entry[T]) -> None:
        old = self._entries.get(entry.name)
        if old is not None and old.obj is not entry.obj:
            raise ValueError(
                f"{self.kind} {entry.name!r} is registered twice ({old.source}, {entry.source})"
            )
        self._entries[entry.name] = entry

    def load(self) -> None:
        """Import the built-ins and the entry-point plugins (once)."""
        if self._loaded:
            return
        self._loaded = True
        importlib.import_module(_BUILTIN_MODULES[self.kind])
        for ep in entry_points(group=self.group):
            if ep.name in self._entries:
                continue
            dist = ep.dist.name if ep.dist is not None else ep.value
            try:
                obj = ep.load()
            except Exception as e:  # a broken plugin must not take the built-ins down
                print(
                    f"warning: skipping {self.kind} plugin {ep.name!r} from {dist}: "
                    f"{type(e).__name__}: {e}",
                    file=sys.stderr,
                )
                continue
            self._add(Entry(ep.name, obj, dist))

    def get(self, name: str) -> T:
        """The component registered as ``name``; a clear error listing the choices if none."""
        self.load()
        if name not in self._entries:
            raise unknown_choice(self.kind, name, self._entries)
        return self._entries[name].obj

    def names(self) -> list[str]:
        self.load()
        return sorted(self._entries)

    def __iter__(self) -> Iterator[Entry[T]]:
        self.load()
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def __contains__(self, name: str) -> bool:
        self.load()
        return name in self._entries


STRATEGIES: Registry[Any] = Registry("strategy", "clbench.strategies")
SCENARIOS: Registry[Any] = Registry("scenario", "clbench.scenarios")
BACKBONES: Registry[Any] = Registry("backbone", "clbench.backbones")

REGISTRIES = {"strategy": STRATEGIES, "scenario": SCENARIOS, "backbone": BACKBONES}
