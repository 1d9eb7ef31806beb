"""The task registry. Each suite module/package lists its built-ins in a ``BUILTIN`` dict of
``name → "module:Class"`` (imported lazily when used); plugins use the entry-point group
``lcbench.tasks`` (value ``"package.module:TaskClass"``)."""

from __future__ import annotations

import importlib

from ..registry import Registry

TASKS: Registry = Registry("task", "lcbench.tasks")

SUITE_MODULES = ("niah", "longbench", "ruler", "scbench")
for _suite in SUITE_MODULES:
    try:
        _module = importlib.import_module(f"lcbench.tasks.{_suite}")
    except ModuleNotFoundError as _exc:  # a suite not written yet in this checkout
        if _exc.name != f"lcbench.tasks.{_suite}":
            raise
        continue
    for _name, _target in getattr(_module, "BUILTIN", {}).items():
        TASKS.add(_name, _target)
