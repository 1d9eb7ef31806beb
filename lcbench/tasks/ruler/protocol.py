"""RULER's protocol constants (``tasks/ruler.toml``) and the rendered prompt a generator returns."""

from __future__ import annotations

import random
import tomllib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from ... import protocol_file

PROTOCOL: dict[str, Any] = tomllib.loads(protocol_file("tasks", "ruler.toml").read_text(encoding="utf-8"))


@dataclass
class Rendered:
    """One generated prompt, split where the context ends.

    ``head`` is the template text before the context (and any in-context example), ``tail`` the
    template text after it (the question); the answer prefix follows the generation prompt.
    """

    head: str
    context: str
    tail: str
    answer_prefix: str
    answers: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def user(self) -> str:
        return self.head + self.context + self.tail


def split_template(template: str) -> tuple[str, str]:
    """A RULER template as (text before ``{context}``, text after it)."""
    head, sep, tail = template.partition("{context}")
    if not sep:
        raise ValueError(f"template has no {{context}}: {template[:60]!r}")
    return head, tail


class Generator(ABC):
    """Base of RULER's generators: a prompt for sample ``index`` with ``n`` haystack units.

    Every call draws from a fresh ``random.Random`` seeded by (run seed, task, length, index), so
    a sample's needles, keys and values do not change while its haystack is sized. ``shuffle_rng``
    is RULER's ``random.Random(random_seed)``: one fixed permutation source shared by all samples.
    """

    probe = 10           # units of the probe prompt for the tokens-per-unit estimate
    incremental: int | None = None  # upstream's step when a sample overflows (default: probe)
    lower = 1            # smallest haystack the generator can build
    upper: int | None = None

    def __init__(self, task: str, spec: dict[str, Any], length: int, seed: int):
        self.task, self.spec, self.length, self.seed = task, spec, length, seed
        self.args = dict(spec["args"])
        self.template = PROTOCOL["templates"][spec["generator"]]
        self.tokens_to_generate = int(self.template["tokens_to_generate"])

    def rng(self, index: int) -> random.Random:
        return random.Random(f"ruler:{self.seed}:{self.task}:{self.length}:{index}")

    def shuffle_rng(self) -> random.Random:
        return random.Random(self.seed)

    @abstractmethod
    def build(self, index: int, n: int) -> Rendered:
        """The prompt of sample ``index`` with a haystack of ``n`` units."""
