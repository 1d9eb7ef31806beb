"""The task registry. Each suite module/package lists its built-ins in a ``BUILTIN`` dict of
``name → "module:Class"`` (imported lazily when used); plugins use the entry-point group
``lcbench.tasks`` (value ``"package.module:TaskClass"``)."""

from __future__ import annotations

import importlib

from ..registry import Registry

TASKS: Registry = Registry("task", "lcbench.tasks")

SUITE_MODULES = ("niah", "longbench", "ruler", "scbench")
for _suite in SUITE_MODULES:
    _module = importlib.import_module(f"lcbench.tasks.{_suite}")
    for _name, _target in getattr(_module, "BUILTIN", {}).items():
        TASKS.add(_name, _target)
