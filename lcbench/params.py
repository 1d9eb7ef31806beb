"""Declared, typed parameters for methods, tasks and models, parsed from ``k=v,k=v`` strings."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError


@dataclass(frozen=True)
class Param:
    """One parameter a component accepts: its name, type, default, a short help text and the
    values it accepts, checked when the component is resolved (before anything runs):

    ``choices``  the allowed values;
    ``min``/``max``  bounds (inclusive) of a number, or of every item of a list of numbers;
    ``numbers``  a ``str`` parameter holding ``;``-separated numbers (e.g. NIAH's ``lengths``),
                 each checked against ``min``/``max``;
    ``nonempty``  a list (or list of numbers) needs at least one item;
    ``arity``  a list (or list of numbers) needs exactly this many items.
    """

    name: str
    type: type
    default: Any
    help: str = ""
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    numbers: bool = False
    nonempty: bool = False
    arity: int | None = None

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
                f"{owner}: parameter '{self.name}' must be one of {list(self.choices)}, got {out!r}. "
                f"Fix: {self.name}={self.choices[0]!s}."
            )
        self.check(out, owner)
        return out

    def _fix(self) -> str:
        return f"Fix: pass {self.name}=<value> or leave it out (default {self.default!r}); see `lcbench ls`."

    def check(self, value: Any, owner: str) -> None:
        """Range, arity and emptiness constraints of a coerced value (a UserError names the fix)."""
        if self.numbers and isinstance(value, str):
            try:
                items: list | None = [float(x) for x in value.replace(",", ";").split(";") if x.strip()]
            except ValueError:
                raise UserError(f"{owner}: parameter '{self.name}' must be numbers separated by ';', got {value!r}. "
                                + self._fix()) from None
        elif isinstance(value, list):
            items = value
        else:
            items = None
        if items is not None:
            if (self.nonempty or self.arity) and not items:
                raise UserError(f"{owner}: parameter '{self.name}' is empty. " + self._fix())
            if self.arity is not None and len(items) != self.arity:
                raise UserError(f"{owner}: parameter '{self.name}' needs exactly {self.arity} values separated by "
                                f"';', got {len(items)} ({value!r}). " + self._fix())
            values = items if self.numbers else []
        else:
            values = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []
        for v in values:
            if v != v:  # NaN
                raise UserError(f"{owner}: parameter '{self.name}' is NaN. " + self._fix())
            if self.min is not None and v < self.min:
                raise UserError(f"{owner}: parameter '{self.name}' must be ≥ {self.min:g}, got {v:g}. " + self._fix())
            if self.max is not None and v > self.max:
                raise UserError(f"{owner}: parameter '{self.name}' must be ≤ {self.max:g}, got {v:g}. " + self._fix())


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
