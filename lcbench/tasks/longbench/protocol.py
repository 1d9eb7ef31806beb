"""LongBench's protocol constants, read from the data files ``tasks/longbench.json`` (templates,
generation lengths, metric map, categories, the no-chat list; copied from THUDM/LongBench@2e00731)
and ``tasks/minilongbench_ids.json`` (MiniLongBench's 237-item table and its category map)."""

from __future__ import annotations

import functools
import json
from typing import Any

from ... import protocol_file


@functools.lru_cache(maxsize=None)
def longbench_protocol() -> dict[str, Any]:
    """The parsed ``tasks/longbench.json``."""
    return json.loads(protocol_file("tasks", "longbench.json").read_text(encoding="utf-8"))


@functools.lru_cache(maxsize=None)
def minilongbench_protocol() -> dict[str, Any]:
    """The parsed ``tasks/minilongbench_ids.json``."""
    return json.loads(protocol_file("tasks", "minilongbench_ids.json").read_text(encoding="utf-8"))


def length_bucket(length: int | None) -> str | None:
    """LongBench-E's bucket of a row's ``length`` field (words, or characters for Chinese):
    ``eval.py`` ``scorer_e`` uses ``< 4000`` → 0-4k, ``< 8000`` → 4-8k, else 8k+."""
    if length is None:
        return None
    for bucket in longbench_protocol()["length_buckets"]:
        if bucket["below"] is None or length < bucket["below"]:
            return bucket["name"]
    raise ValueError("tasks/longbench.json: the last length bucket must have below=null")
