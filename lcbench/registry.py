"""Lazy registries of methods, tasks and models, with did-you-mean errors and entry-point plugins.

Entries are added as ``"module:attr"`` strings (imported only when used, lm-evaluation-harness
style) or objects, or found by a ``discover`` function the first time the registry is read
(built-in methods and tasks are found by walking their packages, so no list is kept by hand).
Third-party packages add entries through the entry-point groups ``lcbench.methods``,
``lcbench.tasks`` and ``lcbench.models`` without touching lcbench; a plugin that takes a
built-in's name is refused, not silently ignored. ``validate`` checks each entry when it is
first loaded (a declaration mistake fails loudly, naming its file).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
from importlib.metadata import entry_points
from typing import Any, Callable, Generic, TypeVar

from .errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name → implementation, resolved lazily."""

    def __init__(self, kind: str, group: str, discover: Callable[[], dict[str, T]] | None = None,
                 validate: Callable[[str, Any], None] | None = None):
        self.kind = kind
        self.group = group
        self._targets: dict[str, str] = {}
        self._loaded: dict[str, T] = {}
        self._plugins_scanned = False
        self._discover = discover
        self._validate = validate
        self._builtin: set[str] = set()
        self._checked: set[str] = set()

    def add(self, name: str, target: str | T) -> None:
        """Register ``name`` as a ``"module:attr"`` string (lazy) or as the object itself."""
        self._checked.discard(name)
        if isinstance(target, str):
            self._targets[name] = target
            self._loaded.pop(name, None)
        else:
            self._loaded[name] = target
            self._targets[name] = f"{getattr(target, '__module__', '?')}:{getattr(target, '__qualname__', name)}"

    def remove(self, name: str) -> None:
        """Forget ``name`` (a plugin or test entry; a built-in comes back only in a new process)."""
        for store in (self._targets, self._loaded):
            store.pop(name, None)
        self._checked.discard(name)
        self._builtin.discard(name)

    def _scan_plugins(self) -> None:
        if self._plugins_scanned:
            return
        self._plugins_scanned = True
        if self._discover is not None:
            for name, obj in self._discover().items():
                if name not in self._targets:
                    self.add(name, obj)
                    self._builtin.add(name)
        for ep in entry_points(group=self.group):
            if ep.name in self._builtin:
                dist = getattr(getattr(ep, "dist", None), "name", None) or "an installed package"
                raise UserError(f"{dist} registers the {self.kind} '{ep.name}' (entry point {ep.value} in group "
                                f"'{self.group}'), but lcbench has a built-in {self.kind} of that name. Fix: "
                                f"rename the plugin's entry point (and its class's name).")
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
            obj = self._loaded[name]
            if self._validate is not None and name not in self._checked:
                self._validate(name, obj)
                self._checked.add(name)
            return obj
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
        return self.get(name)


def origin(obj: Any) -> str:
    """The source file that defines ``obj`` (its module's name when there is none)."""
    try:
        return inspect.getsourcefile(obj) or obj.__module__
    except (TypeError, OSError):
        return getattr(obj, "__module__", "?")


def _subclasses(cls: type):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def discover_subclasses(base: type, package: str, kind: str) -> dict[str, type]:
    """``name → class`` of every concrete subclass of ``base`` with its own ``name`` defined in a
    module under ``package`` (all of which are imported): how built-in methods and tasks are found
    without a hand-kept list. A name declared twice is an error naming both files."""
    root = importlib.import_module(package)
    for info in pkgutil.walk_packages(root.__path__, package + "."):
        importlib.import_module(info.name)
    found: dict[str, type] = {}
    for cls in _subclasses(base):
        if not cls.__dict__.get("name") or not cls.__module__.startswith(package + ".") or inspect.isabstract(cls):
            continue
        if cls.name in found and found[cls.name] is not cls:
            raise UserError(f"{kind} name '{cls.name}' is declared twice: in {origin(found[cls.name])} and in "
                            f"{origin(cls)}. Fix: give one of them another name.")
        found[cls.name] = cls
    return found


def refuse_wrong_declaration(kind: str, name: str, cls: Any, errors: list[str]) -> None:
    """Raise one UserError naming ``cls``'s file and every mistake in ``errors`` (plus a registered
    name that differs from the class's own); nothing when there is none."""
    if isinstance(cls, type) and getattr(cls, "name", "") and cls.name != name:
        errors = [*errors, f"it is registered as '{name}' but its class says name = {cls.name!r} (runs record "
                           f"the class's name; make the two the same)"]
    if errors:
        raise UserError(f"{kind} '{name}' ({origin(cls)}) is declared wrongly: " + "; ".join(errors) + ".")
