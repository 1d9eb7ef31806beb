"""The method registry. Built-in methods are found, not listed: every :class:`Stage` subclass with
a ``name`` defined in a module under ``lcbench/methods/`` is one (a method is one file). Plugins
use the entry-point group ``lcbench.methods`` (value ``"package.module:StageClass"``). Names
``kvpress:<PressClass>`` resolve to a stage running that kvpress press
(:mod:`lcbench.methods.kvpress_bridge`).

Every class is checked when the registry loads it (:func:`lcbench.methods.base.declaration_errors`):
a method without a family, with a stage it has no hook for, a hook outside its stages, or a name
taken twice is refused with an error that names its file.
"""

from __future__ import annotations

from typing import Any

from ..errors import UserError
from ..registry import Registry, discover_subclasses, refuse_wrong_declaration

KVPRESS_PREFIX = "kvpress:"


def builtin_methods() -> dict[str, type]:
    """``name → class`` of every method defined under ``lcbench/methods/`` (imports them all)."""
    from .base import Stage

    return discover_subclasses(Stage, "lcbench.methods", "method")


def check_declaration(name: str, cls: Any) -> None:
    """Refuse a method class whose declaration is wrong, naming its file and every mistake."""
    from .base import declaration_errors

    refuse_wrong_declaration("method", name, cls, declaration_errors(cls))


class MethodRegistry(Registry):
    """The registry of methods, plus ``kvpress:<PressClass>`` names made on demand."""

    def get(self, name: str):
        if name.startswith(KVPRESS_PREFIX):
            from .kvpress_bridge import press_stage

            return press_stage(name[len(KVPRESS_PREFIX):])
        return super().get(name)

    def __contains__(self, name: str) -> bool:
        return name.startswith(KVPRESS_PREFIX) or super().__contains__(name)


METHODS: Registry = MethodRegistry("method", "lcbench.methods", discover=builtin_methods,
                                   validate=check_declaration)


def describe_component(name: str) -> dict[str, Any]:
    """What a run stores about one component of its chain (spec.json ``methods``), so reports and
    the leaderboard describe it from the stored run, never from the installation that reads it:
    family, paper, summary and declared parameters — or ``registered: False`` when this
    installation does not know it."""
    try:
        cls = METHODS.get(name)
    except (UserError, ImportError, AttributeError):
        return {"name": name, "registered": False}
    return {"name": name, "registered": True, "family": cls.family, "paper": cls.paper, "summary": cls.summary,
            "reference_latency": bool(getattr(cls, "reference_latency", False)),
            "params": [{"name": p.name, "type": p.type.__name__, "default": repr(p.default), "help": p.help}
                       for p in cls.params]}
