"""RULER's needle tasks (``scripts/data/synthetic/niah.py`` at NVIDIA/RULER@c3f5e3b; spec §2.3).

Needles ``"One of the special magic {type_needle_v} for {key} is: {value}."`` go into a noise,
needle (distractor needles) or essay haystack; the question asks for the values of ``Q`` keys.
"""

from __future__ import annotations

import random
import uuid
from typing import Any

import numpy as np

from .protocol import PROTOCOL, Generator, Rendered, split_template
from .resources import adj_noun_words, sentence_splitter

_NIAH = PROTOCOL["niah"]
DEPTHS: list[int] = [int(d) for d in np.round(np.linspace(0, 100, num=_NIAH["num_depths"], endpoint=True)).astype(int)]


def singularize(text: str) -> str:
    """RULER's rewrite of template + answer prefix when one value is asked for (``Q * V == 1``)."""
    for old, new in _NIAH["singular_replacements"]:
        text = text.replace(old, new)
    return text


class NiahGenerator(Generator):
    """One RULER NIAH task; ``essay`` is the essay word list when the haystack is ``essay``."""

    def __init__(self, task: str, spec: dict[str, Any], length: int, seed: int,
                 essay: tuple[str, ...] | None = None):
        super().__init__(task, spec, length, seed)
        a = self.args
        self.haystack = a["type_haystack"]
        self.num_k = max(a["num_needle_k"], a["num_needle_q"])  # upstream: K = max(K, Q)
        self.num_v, self.num_q = a["num_needle_v"], a["num_needle_q"]
        self.type_k, self.type_v = a["type_needle_k"], a["type_needle_v"]
        if self.haystack == "essay" and essay is None:
            raise ValueError("the essay haystack needs its word list")
        self.essay = essay
        inc = _NIAH["incremental"]
        if self.haystack == "essay":
            self.probe = inc["essay"]
        else:
            self.probe = inc["short"] if length < inc["short_below"] else inc[self.haystack]
            self.lower = self.num_k * self.num_v  # room for every needle among the sentences
        template, prefix = self.template["template"], self.template["answer_prefix"]
        shown_v = self.type_v
        if self.num_q * self.num_v == 1:
            template, prefix = singularize(template), singularize(prefix)
            shown_v = self.type_v[:-1]
        self.head, self.tail = split_template(template)
        self.answer_prefix = prefix
        self.shown_v = shown_v
        self.words = adj_noun_words() if "words" in (self.type_k, self.type_v) else None

    def _random(self, rng: random.Random, kind: str) -> str:
        if kind == "numbers":
            digits = _NIAH["number_digits"]
            return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))
        if kind == "words":
            return self.words.choice(rng)
        if kind == "uuids":
            return str(uuid.UUID(int=rng.getrandbits(128), version=4))
        raise ValueError(f"unknown needle type {kind!r}")

    def _needle(self, key: str, value: str) -> str:
        return _NIAH["needle"].format(type_needle_v=self.type_v, key=key, value=value)

    def _essay_context(self, rng: random.Random, needles: list[str], n: int) -> tuple[str, list[float]]:
        words = self.essay
        reps = -(-n // len(words))
        text = " ".join((words * reps)[:n] if reps > 1 else words[:n])
        _, split = sentence_splitter()
        sents = split(text.strip())
        depths = rng.sample(DEPTHS, len(needles))
        cuts = [0] + sorted(int(len(sents) * (d / 100)) for d in depths) + [len(sents)]
        parts: list[str] = []
        for i in range(1, len(cuts)):
            parts.append(" ".join(sents[cuts[i - 1]:cuts[i]]))
            if i - 1 < len(needles):
                parts.append(needles[i - 1])
        return " ".join(parts), [float(d) for d in sorted(depths)]

    def _line_context(self, rng: random.Random, needles: list[str], n: int) -> tuple[str, list[float]]:
        if self.haystack == "noise":
            sentences = [_NIAH["noise"]] * n
        else:
            sentences = [self._needle(self._random(rng, self.type_k), self._random(rng, self.type_v))
                         for _ in range(n)]
        indexes = sorted(rng.sample(range(n), len(needles)), reverse=True)
        for index, needle in zip(indexes, needles):
            sentences.insert(index, needle)
        return "\n".join(sentences), sorted(100.0 * i / n for i in indexes)

    def build(self, index: int, n: int) -> Rendered:
        rng = self.rng(index)
        keys: list[str] = []
        values: list[list[str]] = []
        needles: list[str] = []
        for _ in range(self.num_k):
            keys.append(self._random(rng, self.type_k))
            vals = []
            for _ in range(self.num_v):
                vals.append(self._random(rng, self.type_v))
                needles.append(self._needle(keys[-1], vals[-1]))
            values.append(vals)
        self.shuffle_rng().shuffle(needles)
        if self.haystack == "essay":
            context, depths = self._essay_context(rng, needles, n)
        else:
            context, depths = self._line_context(rng, needles, n)
        picked = rng.sample(range(self.num_k), self.num_q)
        queries = [keys[i] for i in picked]
        answers = [v for i in picked for v in values[i]]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        fmt = {"type_needle_v": self.shown_v, "query": query}
        meta = {"depths": depths, "depth": depths[0] if len(depths) == 1 else None, "haystack": self.haystack}
        if self.haystack == "essay":
            meta["sentence_splitter"] = sentence_splitter()[0]
        return Rendered(self.head.format(**fmt), context, self.tail.format(**fmt),
                        self.answer_prefix.format(**fmt), answers, meta)
