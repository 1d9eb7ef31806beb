"""Method presets as data (DESIGN.md layout: ``methods/`` holds one file per family).

Each top-level ``methods/<family>.toml`` has one table per method name with its ``family``,
``paper`` (citation), ``summary``, optional ``tolerance`` (how far the achieved ratio may fall
short of the requested one) and a ``defaults`` table. The Stage class declares each parameter's
name, type and help text; :func:`from_preset` fills the rest from the data file, so
``lcbench ls methods`` and the code read the same numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import tomllib
from typing import Any, Callable, TypeVar

from .. import protocol_file

T = TypeVar("T")


@functools.lru_cache(maxsize=None)
def load_presets(file_name: str) -> dict[str, Any]:
    """The parsed ``methods/<file_name>`` (cached)."""
    with protocol_file("methods", file_name).open("rb") as f:
        return tomllib.load(f)


def from_preset(file_name: str) -> Callable[[T], T]:
    """Class decorator: set ``family``, ``paper``, ``summary``, ``tolerance`` and parameter defaults
    of a Stage subclass from its table (keyed by the class's ``name``) in ``methods/<file_name>``."""

    def apply(cls: T) -> T:
        table = load_presets(file_name).get(cls.name)
        if table is None:
            raise KeyError(f"methods/{file_name} has no table [{cls.name}]")
        cls.family = table["family"]
        cls.paper = table["paper"]
        cls.summary = table["summary"]
        if "tolerance" in table:
            cls.tolerance = float(table["tolerance"])
        defaults = table.get("defaults", {})
        declared = {p.name for p in cls.params}
        unknown = set(defaults) - declared
        missing = {p.name for p in cls.params if p.default is None} - set(defaults)
        if unknown or missing:
            raise KeyError(f"methods/{file_name} [{cls.name}.defaults]: unknown {sorted(unknown)}, missing {sorted(missing)}")
        cls.params = tuple(dataclasses.replace(p, default=defaults[p.name]) if p.name in defaults else p
                           for p in cls.params)
        return cls

    return apply
