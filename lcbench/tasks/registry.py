"""The task registry. Built-in tasks are found, not listed: every concrete :class:`Task` subclass
with a ``name`` defined in a module under ``lcbench/tasks/`` is one (including classes a suite
module makes per sub-task, such as SCBench's ``scbench_kv``). Plugins use the entry-point group
``lcbench.tasks`` (value ``"package.module:TaskClass"``). Every class is checked when the registry
loads it (:func:`lcbench.tasks.base.declaration_errors`); a mistake is refused naming its file."""

from __future__ import annotations

from typing import Any

from ..registry import Registry, discover_subclasses, refuse_wrong_declaration


def builtin_tasks() -> dict[str, type]:
    """``name → class`` of every task defined under ``lcbench/tasks/`` (imports them all)."""
    from .base import Task

    return discover_subclasses(Task, "lcbench.tasks", "task")


def check_declaration(name: str, cls: Any) -> None:
    """Refuse a task class whose declaration is wrong, naming its file and every mistake."""
    from .base import declaration_errors

    refuse_wrong_declaration("task", name, cls, declaration_errors(cls))


TASKS: Registry = Registry("task", "lcbench.tasks", discover=builtin_tasks, validate=check_declaration)
