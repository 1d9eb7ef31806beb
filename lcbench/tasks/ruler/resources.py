"""Word lists, essays and the sentence splitter RULER's generators draw on.

- Key words: RULER's ``words = sorted(set(f"{adj}-{noun}"))`` over wonderwords 2.2.0
  (912 adjectives of which 910 distinct × 6,786 nouns = 6,175,260 distinct strings) and
  ``random.choice(words)``. Building that list costs ~15 s and ~0.8 GB, so :class:`AdjNounWords`
  draws the same uniform distribution without it: a random pair of distinct adjective and noun,
  accepted with probability 1/multiplicity of the joined string (how many pairs join to it
  through hyphens; 1 for every string of wonderwords 2.2.0).
- CWE words: ``sorted(set(nouns + adjs + verbs))`` (8,169 words).
- Essays: RULER's ``PaulGrahamEssays.json`` (``{"text": ...}``; where it comes from:
  :mod:`lcbench.tasks.essays`), a folder of ``*.txt`` essays (sorted) or one text file, split as
  ``re.sub(r"\\s+", " ", text).split(" ")``.
- Sentences: ``nltk.sent_tokenize`` with the pretrained Punkt model when nltk's ``punkt_tab``
  data is installed (as upstream); otherwise Punkt with default parameters (no learned
  abbreviations), recorded as ``sentence_splitter`` in every sample's meta and warned about once
  per process.
"""

from __future__ import annotations

import functools
import json
import random
import re
import warnings
from pathlib import Path

from ...errors import UserError


def _wonderwords(name: str) -> list[str]:
    try:
        from wonderwords import random_word
    except ImportError:
        raise UserError("RULER needs the word lists of the PyPI package wonderwords (2.2.0, as upstream pins "
                        "nothing newer). Fix: pip install wonderwords==2.2.0") from None
    return list(random_word._get_words_from_text_file(name))


@functools.lru_cache(maxsize=1)
def word_lists() -> dict[str, list[str]]:
    return {kind: _wonderwords(f"{kind}list.txt") for kind in ("noun", "adjective", "verb")}


class AdjNounWords:
    """Uniform draws from ``sorted(set(f"{adj}-{noun}"))`` without building the 6M-string list."""

    def __init__(self) -> None:
        lists = word_lists()
        self._adj_set, self._noun_set = set(lists["adjective"]), set(lists["noun"])
        self.adjs, self.nouns = sorted(self._adj_set), sorted(self._noun_set)

    def multiplicity(self, word: str) -> int:
        """How many (adjective, noun) pairs join to ``word``."""
        return sum(1 for i, ch in enumerate(word)
                   if ch == "-" and word[:i] in self._adj_set and word[i + 1:] in self._noun_set)

    def choice(self, rng: random.Random) -> str:
        while True:
            word = f"{rng.choice(self.adjs)}-{rng.choice(self.nouns)}"
            k = self.multiplicity(word)
            if k == 1 or rng.random() < 1.0 / k:
                return word


@functools.lru_cache(maxsize=1)
def adj_noun_words() -> AdjNounWords:
    return AdjNounWords()


@functools.lru_cache(maxsize=1)
def cwe_words() -> tuple[str, ...]:
    lists = word_lists()
    return tuple(sorted(set(lists["noun"] + lists["adjective"] + lists["verb"])))


@functools.lru_cache(maxsize=4)
def essay_words(path: str) -> tuple[str, ...]:
    """The essay haystack as RULER splits it: ``re.sub(r"\\s+", " ", text).split(" ")``."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.txt"))
        if not files:
            raise UserError(f"ruler: haystack folder '{p}' has no .txt files. Fix: haystack=PATH to RULER's "
                            f"PaulGrahamEssays.json, a folder of .txt essays, or one text file.")
        text = "".join(f.read_text(encoding="utf-8") for f in files)
    elif p.is_file():
        text = p.read_text(encoding="utf-8")
        if p.suffix == ".json":
            try:
                text = json.loads(text)["text"]
            except (ValueError, KeyError, TypeError):
                raise UserError(f"ruler: '{p}' is not a JSON object with a 'text' field, as RULER's "
                                f"PaulGrahamEssays.json is. Fix: point haystack= at such a file or a .txt file.") from None
    else:
        raise UserError(f"ruler: haystack '{p}' does not exist. Fix: haystack=PATH to RULER's PaulGrahamEssays.json "
                        f"(e.g. ../shared/data/ruler/PaulGrahamEssays.json) or a folder of .txt essays.")
    return tuple(re.sub(r"\s+", " ", text).split(" "))


PUNKT_MISSING = (
    "ruler: nltk's 'punkt_tab' data is not installed, so essay haystacks are split into sentences by an "
    "untrained Punkt splitter (no learned abbreviations): sentence boundaries, and so needle positions, may "
    "differ from upstream RULER (samples record sentence_splitter='punkt_untrained'). Fix: run "
    "`python -m nltk.downloader punkt_tab` (needs network), or download it on a machine with network, copy the "
    "nltk_data folder here and set NLTK_DATA to its path."
)


@functools.lru_cache(maxsize=1)
def sentence_splitter():
    """(name, split function): pretrained Punkt when installed, else untrained Punkt (warned once)."""
    import nltk
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return "punkt_tab", nltk.sent_tokenize
    except LookupError:
        warnings.warn(PUNKT_MISSING, stacklevel=2)  # once per process: this function is cached
        return "punkt_untrained", PunktSentenceTokenizer().tokenize
