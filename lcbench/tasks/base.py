"""The task interface: a suite turns its protocol into samples and scores the answers.

A task never imports methods (DESIGN.md boundaries); the engine brings the two together.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..params import Param, ParamSet
from .sample import Sample, Turn


@dataclass
class TaskEnv:
    """What a task may know about the run: the target tokenizer (lengths are counted in it),
    the model's name and context limit and the seed. (A local copy of a suite's data is the task's
    own ``data_dir`` argument, recorded in the spec.)"""

    tokenizer: Any
    model_name: str
    model_max_length: int
    seed: int = 0


class Task(ABC):
    """Base class of every task suite.

    Subclasses set ``name``, ``suite``, ``version``, ``paper``/``source`` and ``params``, and
    implement :meth:`samples` and :meth:`score`. ``mode`` is ``"multi_request"`` (every turn starts
    from the same compressed context), ``"multi_turn"`` (history grows, turns run in order) or
    ``"loglik"`` (the turn's text is teacher-forced and scored by its tokens' log-likelihood:
    :mod:`lcbench.engine.loglik`; such a task implements ``score_tokens``; lower scores are better).
    """

    name: ClassVar[str] = ""
    suite: ClassVar[str] = ""
    version: ClassVar[str] = "0"
    source: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    params: ClassVar[tuple[Param, ...]] = ()
    mode: str = "multi_request"

    def __init__(self, **args: Any):
        self.args = ParamSet(self.params).resolve(args, f"task '{self.name}'")

    # --- protocol -------------------------------------------------------------------------
    @abstractmethod
    def samples(self, env: TaskEnv) -> list[Sample]:
        """The samples of this task, fully rendered (context part and question parts)."""

    @abstractmethod
    def score(self, sample: Sample, turn: Turn, prediction: str) -> dict[str, float]:
        """Scores of one prediction; the key ``"score"`` is the primary one (0..1 or 0..100 as the
        suite reports it). Extra keys hold variants such as an upstream-compatible score."""

    def aggregate(self, records: list[dict]) -> dict[str, float]:
        """Suite-level aggregates from per-turn records (default: mean of ``score``)."""
        scores = [r["score"] for r in records if r.get("score") is not None]
        return {"score": sum(scores) / len(scores)} if scores else {}

    def suite_score(self, records: list[dict]) -> float | None:
        """The suite's one headline number, as its authors report it (``aggregate``'s ``score``);
        the engine bootstraps it over samples for its confidence interval."""
        return self.aggregate(records).get("score")

    @classmethod
    def subtasks(cls) -> dict[str, str] | None:
        """The suite's sub-tasks (datasets) by name, with a few words each, for ``lcbench ls``;
        None for a task without them."""
        return None

    # --- provenance -----------------------------------------------------------------------
    def protocol_payload(self) -> Any:
        """The protocol constants this task depends on (templates, lengths); hashed into results.
        Suites override it with their protocol data; this default covers what a task written in
        code depends on: its name, version, arguments and the source of the module that holds its
        templates."""
        return {"name": self.name, "version": self.version, "args": self.args, "code": _module_digest(type(self))}

    def template_hash(self) -> str:
        blob = json.dumps(self.protocol_payload(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


MODES = ("multi_request", "multi_turn", "loglik")
LOGLIK = "loglik"  # scored by the log-likelihood of the text itself, not a prediction (engine/loglik.py)
LOWER_IS_BETTER_MODES = (LOGLIK,)  # their ``score`` is a perplexity


def unknown_subtask(task: str, what: str, name: str, known: list[str], fix: str) -> "UserError":
    """The error for a sub-task (dataset) name the suite does not have, with did-you-mean."""
    import difflib

    from ..errors import UserError

    close = difflib.get_close_matches(name, known, n=2, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return UserError(f"{task}: unknown {what} '{name}'.{hint} Known: {', '.join(known)} (`lcbench ls tasks {task}`). "
                     f"Fix: {fix}")


def _module_digest(cls: type) -> str | None:
    """sha256 of the source file of ``cls``'s module (None when it has none, e.g. built in a REPL)."""
    import inspect

    try:
        return hashlib.sha256(Path(inspect.getfile(cls)).read_bytes()).hexdigest()[:16]
    except (OSError, TypeError):
        return None


def declaration_errors(cls: Any) -> list[str]:
    """What is wrong with ``cls`` as a registered task (empty when nothing is)."""
    import inspect

    if not (isinstance(cls, type) and issubclass(cls, Task)):
        return [f"{cls!r} is not a subclass of lcbench.tasks.base.Task"]
    errors = []
    if not cls.name:
        errors.append("it sets no `name`")
    elif any(c in cls.name for c in "+,.: =;"):
        errors.append(f"its name {cls.name!r} contains one of '+,.: =;' (they separate lists and arguments)")
    if inspect.isabstract(cls):
        errors.append(f"it does not implement {', '.join(sorted(cls.__abstractmethods__))}")
    if cls.mode not in MODES:
        errors.append(f"its mode {cls.mode!r} is not one of {', '.join(MODES)}")
    if not str(cls.version):
        errors.append("it sets no `version` (results record it)")
    names = [p.name for p in cls.params]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        errors.append(f"it declares the parameter {dup!r} twice")
    return errors
