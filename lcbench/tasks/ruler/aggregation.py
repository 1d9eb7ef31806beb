"""RULER's aggregation tasks (NVIDIA/RULER@c3f5e3b ``common_words_extraction.py`` and
``freq_words_extraction.py``; spec §2.3).

- CWE: a numbered list where 10 "common" words repeat ``freq_cw`` times and the rest ``freq_ucw``
  times, after one solved example; the model names the 10 common words.
- FWE: coded 6-letter words with Zipf counts ``int(N k^-alpha / zeta(alpha))``; rank 1 is the noise
  word ``...``; the model names ranks 2–4.
"""

from __future__ import annotations

import random
import string
from typing import Any

import mpmath
import numpy as np

from ...errors import UserError
from .protocol import PROTOCOL, Generator, Rendered, split_template
from .resources import cwe_words

_CWE = PROTOCOL["common_words_extraction"]
_FWE = PROTOCOL["freq_words_extraction"]


def numbered(words: list[str]) -> str:
    """``"1. w 2. w ..."``."""
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


class CommonWordsGenerator(Generator):
    """``extra_words`` replaces RULER's ``english_words.json`` (Git-LFS only upstream) for lists
    longer than the 8,169 wonderwords words (contexts of roughly 100K tokens and more)."""

    probe = 100
    incremental = _CWE["incremental"]

    def __init__(self, task: str, spec: dict[str, Any], length: int, seed: int,
                 extra_words: list[str] | None = None):
        super().__init__(task, spec, length, seed)
        a = self.args
        self.num_cw, self.num_fewshot = int(a["num_cw"]), int(a["num_fewshot"])
        if length < _CWE["short"]["below"]:
            self.example = tuple(_CWE["short"]["example"])
            self.repeats = tuple(_CWE["short"]["main"])
        else:
            self.example = tuple(_CWE["long"]["example"])
            self.repeats = (int(a["freq_cw"]), int(a["freq_ucw"]))
        words = list(cwe_words())
        self.shuffle_rng().shuffle(words)
        self.words = words
        self.extra_words = extra_words
        self.lower = self.num_cw
        self.upper = len(extra_words) if extra_words else len(words)
        self.head, self.tail = split_template(self.template["template"])

    def _example(self, rng: random.Random, num_words: int, common: int, uncommon: int) -> tuple[str, list[str]]:
        pool = self.words if num_words <= len(self.words) else self.extra_words
        if pool is None or num_words > len(pool):
            raise UserError(f"ruler cwe: {num_words} distinct words are needed but only {len(self.words)} wonderwords "
                            f"words exist. Fix: pass cwe_words=PATH (a JSON list/object or a text file of English "
                            f"words, like RULER's english_words.json), or use a shorter length.")
        full = rng.sample(pool, num_words)
        head, rest = full[:self.num_cw], full[self.num_cw:]
        word_list = head * common + rest * uncommon
        self.shuffle_rng().shuffle(word_list)
        return numbered(word_list), head

    def build(self, index: int, n: int) -> Rendered:
        rng = self.rng(index)
        full_template = self.template["template"] + self.template["answer_prefix"]
        shots, parts = [], []
        for _ in range(self.num_fewshot):
            ctx, answer = self._example(rng, *self.example)
            shots.append(full_template.format(context=ctx, query="") + " " + numbered(answer))
            parts.append((self.template["template"].format(context=ctx, query=""), numbered(answer)))
        context, answer = self._example(rng, n, *self.repeats)
        head = "\n".join(shots) + "\n" + self.head
        # the pieces again, for upstream's layout with a model template (layout.py: example_turn)
        return Rendered(head, context, self.tail, self.template["answer_prefix"], answer,
                        {"shots": parts, "task_head": self.head})


class FreqWordsGenerator(Generator):
    probe = 1000

    def __init__(self, task: str, spec: dict[str, Any], length: int, seed: int):
        super().__init__(task, spec, length, seed)
        a = self.args
        self.alpha = float(a["alpha"])
        self.wordlen = int(a["coded_wordlen"])
        max_len = length - self.tokens_to_generate
        self.vocab_size = max_len // _FWE["vocab_divisor"] if int(a["vocab_size"]) == -1 else int(a["vocab_size"])
        if self.vocab_size < _FWE["answer_ranks"][1]:
            raise UserError(f"ruler fwe: length {length} gives a vocabulary of {self.vocab_size} coded words; at least "
                            f"{_FWE['answer_ranks'][1]} are needed. Fix: request a length of 512 tokens or more.")
        self.zeta = float(mpmath.zeta(self.alpha))
        self.head, self.tail = split_template(self.template["template"])

    def _vocab(self, rng: random.Random) -> list[str]:
        vocab = ["".join(rng.choices(string.ascii_lowercase, k=self.wordlen)) for _ in range(self.vocab_size)]
        while len(set(vocab)) < self.vocab_size:
            vocab.append("".join(rng.choices(string.ascii_lowercase, k=self.wordlen)))
        vocab = sorted(set(vocab))
        self.shuffle_rng().shuffle(vocab)
        vocab[0] = _FWE["noise_word"]
        return vocab

    def build(self, index: int, n: int) -> Rendered:
        vocab = self._vocab(self.rng(index))
        k = np.arange(1, len(vocab) + 1)
        counts = (n * (k ** -self.alpha) / self.zeta).astype(int)
        words = [w for w, c in zip(vocab, counts) for _ in range(int(c))]
        self.shuffle_rng().shuffle(words)
        lo, hi = _FWE["answer_ranks"]
        return Rendered(self.head, " ".join(words), self.tail, self.template["answer_prefix"], vocab[lo:hi], {})
