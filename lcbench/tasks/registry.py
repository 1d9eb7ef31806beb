"""The task registry. Built-ins are listed lazily; plugins use the entry-point group
``lcbench.tasks`` (value ``"package.module:TaskClass"``)."""

from __future__ import annotations

from ..registry import Registry

TASKS: Registry = Registry("task", "lcbench.tasks")

_BUILTIN = {
    "niah": "lcbench.tasks.niah:NeedleInAHaystack",
}
for _name, _target in _BUILTIN.items():
    TASKS.add(_name, _target)
