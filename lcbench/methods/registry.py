"""The method registry. Each family package lists its built-ins in a ``BUILTIN`` dict of
``name → "module:Class"`` (imported lazily); plugins use the entry-point group ``lcbench.methods``
(value ``"package.module:StageClass"``). Names ``kvpress:<PressClass>`` resolve to a stage running
that kvpress press (:mod:`lcbench.methods.kvpress_bridge`)."""

from __future__ import annotations

import importlib

from ..registry import Registry

KVPRESS_PREFIX = "kvpress:"


class MethodRegistry(Registry):
    """The registry of methods, plus ``kvpress:<PressClass>`` names made on demand."""

    def get(self, name: str):
        if name.startswith(KVPRESS_PREFIX):
            from .kvpress_bridge import press_stage

            return press_stage(name[len(KVPRESS_PREFIX):])
        return super().get(name)

    def __contains__(self, name: str) -> bool:
        return name.startswith(KVPRESS_PREFIX) or super().__contains__(name)


METHODS: Registry = MethodRegistry("method", "lcbench.methods")
METHODS.add("full", "lcbench.methods.baseline:Full")

FAMILY_PACKAGES = ("dropping", "quantization", "prompt", "soft", "sparse")
for _family in FAMILY_PACKAGES:
    _module = importlib.import_module(f"lcbench.methods.{_family}")
    for _name, _target in getattr(_module, "BUILTIN", {}).items():
        METHODS.add(_name, _target)
