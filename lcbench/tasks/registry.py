"""The task registry. Built-in tasks are found, not listed: every concrete :class:`Task` subclass
with a ``name`` defined in a module under ``lcbench/tasks/`` is one (including classes a suite
module makes per sub-task, such as SCBench's ``scbench_kv``). Plugins use the entry-point group
``lcbench.tasks`` (value ``"package.module:TaskClass"``). Every class is checked when the registry
loads it (:func:`lcbench.tasks.base.declaration_errors`); a mistake is refused naming its file."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any

from ..errors import UserError
from ..registry import Registry


def _origin(obj: Any) -> str:
    try:
        return inspect.getsourcefile(obj) or obj.__module__
    except (TypeError, OSError):
        return getattr(obj, "__module__", "?")


def _subclasses(cls: type):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def builtin_tasks() -> dict[str, type]:
    """``name → class`` of every task defined under ``lcbench/tasks/`` (imports them all)."""
    from . import __path__ as package_path
    from .base import Task

    for info in pkgutil.walk_packages(package_path, __name__.rpartition(".")[0] + "."):
        importlib.import_module(info.name)
    found: dict[str, type] = {}
    for cls in _subclasses(Task):
        if (not cls.__dict__.get("name") or not cls.__module__.startswith("lcbench.tasks.")
                or inspect.isabstract(cls)):
            continue
        if cls.name in found and found[cls.name] is not cls:
            raise UserError(f"task name '{cls.name}' is declared twice: in {_origin(found[cls.name])} and in "
                            f"{_origin(cls)}. Fix: give one of them another name.")
        found[cls.name] = cls
    return found


def check_declaration(name: str, cls: Any) -> None:
    """Refuse a task class whose declaration is wrong, naming its file and every mistake."""
    from .base import declaration_errors

    errors = declaration_errors(cls)
    if isinstance(cls, type) and getattr(cls, "name", "") and cls.name != name:
        errors.append(f"it is registered as '{name}' but its class says name = {cls.name!r} (runs record the "
                      f"class's name; make the two the same)")
    if errors:
        raise UserError(f"task '{name}' ({_origin(cls)}) is declared wrongly: " + "; ".join(errors) + ".")


TASKS: Registry = Registry("task", "lcbench.tasks", discover=builtin_tasks, validate=check_declaration)
