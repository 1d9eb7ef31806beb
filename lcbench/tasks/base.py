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
    the model's name and context limit, the seed and an optional local data folder."""

    tokenizer: Any
    model_name: str
    model_max_length: int
    seed: int = 0
    data_dir: Path | None = None


class Task(ABC):
    """Base class of every task suite.

    Subclasses set ``name``, ``suite``, ``version``, ``paper``/``source`` and ``params``, and
    implement :meth:`samples` and :meth:`score`. ``mode`` is ``"multi_request"`` (every turn starts
    from the same compressed context) or ``"multi_turn"`` (history grows, turns run in order).
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

    # --- provenance -----------------------------------------------------------------------
    def protocol_payload(self) -> Any:
        """The protocol constants this task depends on (templates, lengths); hashed into results."""
        return {"name": self.name, "version": self.version}

    def template_hash(self) -> str:
        blob = json.dumps(self.protocol_payload(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
