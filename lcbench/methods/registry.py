"""The method registry. Built-ins are listed here lazily; plugins use the entry-point group
``lcbench.methods`` (value ``"package.module:StageClass"``)."""

from __future__ import annotations

from ..registry import Registry

METHODS: Registry = Registry("method", "lcbench.methods")

_BUILTIN = {
    "full": "lcbench.methods.baseline:Full",
    "random": "lcbench.methods.dropping.random:RandomDrop",
    "streamingllm": "lcbench.methods.dropping.streamingllm:StreamingLLM",
    "snapkv": "lcbench.methods.dropping.snapkv:SnapKV",
}
for _name, _target in _BUILTIN.items():
    METHODS.add(_name, _target)
