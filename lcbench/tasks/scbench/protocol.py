"""SCBench's protocol constants (``tasks/scbench.toml``)."""

from __future__ import annotations

import tomllib
from typing import Any

from ... import protocol_file

PROTOCOL: dict[str, Any] = tomllib.loads(protocol_file("tasks", "scbench.toml").read_text(encoding="utf-8"))
TASKS: tuple[str, ...] = tuple(PROTOCOL["tasks"])
MIXED = frozenset(name for name, spec in PROTOCOL["tasks"].items() if isinstance(spec["metric"], dict))
