"""Lazy registries of methods, tasks and models, with did-you-mean errors and entry-point plugins.

Built-in entries name their implementation as ``"module:attr"`` and are imported only when used
(lm-evaluation-harness style). Third-party packages add entries through the entry-point groups
``lcbench.methods``, ``lcbench.tasks`` and ``lcbench.models`` without touching lcbench.
"""

from __future__ import annotations

import difflib
import importlib
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from .errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name → implementation, resolved lazily."""

    def __init__(self, kind: str, group: str):
        self.kind = kind
        self.group = group
        self._targets: dict[str, str] = {}
        self._loaded: dict[str, T] = {}
        self._plugins_scanned = False

    def add(self, name: str, target: str | T) -> None:
        """Register ``name`` as a ``"module:attr"`` string (lazy) or as the object itself."""
        if isinstance(target, str):
            self._targets[name] = target
            self._loaded.pop(name, None)
        else:
            self._loaded[name] = target
            self._targets[name] = f"{getattr(target, '__module__', '?')}:{getattr(target, '__qualname__', name)}"

    def _scan_plugins(self) -> None:
        if self._plugins_scanned:
            return
        self._plugins_scanned = True
        for ep in entry_points(group=self.group):
            if ep.name not in self._targets:
                self._targets[ep.name] = ep.value

    def names(self) -> list[str]:
        self._scan_plugins()
        return sorted(self._targets)

    def __contains__(self, name: str) -> bool:
        self._scan_plugins()
        return name in self._targets

    def get(self, name: str) -> T:
        """The implementation registered as ``name``; a UserError with a suggestion otherwise."""
        self._scan_plugins()
        if name in self._loaded:
            return self._loaded[name]
        if name not in self._targets:
            close = difflib.get_close_matches(name, self._targets, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise UserError(
                f"Unknown {self.kind} '{name}'.{hint} See `lcbench ls {self.kind}s` for the list"
                f" (plugins register through the entry-point group '{self.group}')."
            )
        module_name, _, attr = self._targets[name].partition(":")
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
        self._loaded[name] = obj
        return obj
