"""Declared, typed parameters for methods, tasks and models, parsed from ``k=v,k=v`` strings."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError


@dataclass(frozen=True)
class Param:
    """One parameter a component accepts: its name, type, default and a short help text."""

    name: str
    type: type
    default: Any
    help: str = ""
    choices: tuple | None = None

    def coerce(self, value: Any, owner: str) -> Any:
        """Convert a value (often a CLI string) to this parameter's type, or raise a UserError."""
        if value is None:
            return None
        try:
            if self.type is bool:
                if isinstance(value, bool):
                    out = value
                elif str(value).lower() in ("1", "true", "yes", "on"):
                    out = True
                elif str(value).lower() in ("0", "false", "no", "off"):
                    out = False
                else:
                    raise ValueError(value)
            elif self.type is int:
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError(value)
                out = int(value) if not isinstance(value, str) else int(value.strip())
            elif self.type is float:
                out = float(value)
            elif self.type is list:
                out = list(value) if not isinstance(value, str) else [v for v in value.split(";") if v]
            else:
                out = self.type(value)
        except (TypeError, ValueError):
            raise UserError(
                f"{owner}: parameter '{self.name}' expects {self.type.__name__}, got {value!r}. "
                f"Fix: pass {self.name}=<{self.type.__name__}> (default {self.default!r})."
            ) from None
        if self.choices is not None and out not in self.choices:
            raise UserError(
                f"{owner}: parameter '{self.name}' must be one of {list(self.choices)}, got {out!r}."
            )
        return out


def parse_kv(text: str | None, what: str) -> dict[str, str]:
    """Parse ``a=1,b=x`` into a dict of strings (lm-evaluation-harness style ``--model-args``)."""
    out: dict[str, str] = {}
    if not text:
        return out
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise UserError(
                f"{what}: '{part}' is not of the form key=value. Fix: write e.g. {what}=window_size=32,ratio=0.5"
            )
        key, value = part.split("=", 1)
        out[key.strip()] = value.strip()
    return out


@dataclass
class ParamSet:
    """The parameters of one component and helpers to resolve user values against them."""

    params: tuple[Param, ...] = field(default_factory=tuple)

    def resolve(self, values: dict[str, Any], owner: str) -> dict[str, Any]:
        """Fill every default and type-check given values; unknown names get a did-you-mean error."""
        by_name = {p.name: p for p in self.params}
        for key in values:
            if key not in by_name:
                close = difflib.get_close_matches(key, list(by_name), n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                known = ", ".join(by_name) or "none"
                raise UserError(f"{owner} has no parameter '{key}'.{hint} Its parameters: {known}.")
        return {p.name: p.coerce(values.get(p.name, p.default), owner) for p in self.params}
