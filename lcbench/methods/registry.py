"""The method registry. Each family package lists its built-ins in a ``BUILTIN`` dict of
``name → "module:Class"`` (imported lazily); plugins use the entry-point group ``lcbench.methods``
(value ``"package.module:StageClass"``)."""

from __future__ import annotations

import importlib

from ..registry import Registry

METHODS: Registry = Registry("method", "lcbench.methods")
METHODS.add("full", "lcbench.methods.baseline:Full")

FAMILY_PACKAGES = ("dropping", "quantization", "prompt", "soft", "sparse")
for _family in FAMILY_PACKAGES:
    _module = importlib.import_module(f"lcbench.methods.{_family}")
    for _name, _target in getattr(_module, "BUILTIN", {}).items():
        METHODS.add(_name, _target)
