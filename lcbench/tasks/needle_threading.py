"""Needle Threading (Roberts, Han & Albanie, "Needle Threading: Can LLMs Follow Threads through
Near-Million-Scale Haystacks?", arXiv 2411.05000, ICLR 2025).

Upstream: github.com/jonathan-roberts1/needle-threading @ 006f8f57310cad9f84d5a8104c939abc86c96fa8
(read, not copied). That repository releases no generation code — only the README, which shows the
data (hub dataset ``jonathan-roberts1/needle-threading``: splits Single_Needle, Multiple_Needles,
Conditional_Needles, Single_Threads, Multi_Threads; fields ``needle_depth``, ``num_needles``,
``needle_placement``, ``conditional_character``, ``thread_length``, ``thread_direction``,
``num_threads``) and its scoring of the single-needle task. What lcbench follows from it:

* **Haystack**: a JSON object of key–value pairs whose keys and values are UUIDs, written as
  ``json.dumps`` writes a dict (``{"k": "v", "k": "v"}``). The README's example haystack starts
  ``{"e3e70682-c209-4cac-629f-6fbed82c07cd": "f728b4fa-4248-5e3a-0a5d-2f346baa9455", …`` — the
  first two 128-bit draws of ``random.Random(0)`` written as UUIDs without version bits, which is
  how lcbench draws them (from the run's seed). Upstream sizes haystacks in *characters*
  (``context_length``); lcbench sizes them in the **target tokenizer**: the random pairs are the
  largest object of whole pairs whose tokens do not exceed the length asked; writing the needles in
  (a thread's values become keys, a conditional key takes its character) moves that by a few
  tokens, so a haystack is within one pair's tokens of the length (``meta.context_tokens`` says).
* **Prompt** (README): ``haystack + "\\n" + question`` with the single-needle question
  ``Extract the value corresponding to the specified key in the JSON object. Key: "<key>"\\n
  Corresponding value: `` — kept verbatim. The other variants' questions could not be read here
  (the paper's appendix and the hub data are not reachable offline); lcbench words them in the same
  style and labels them ``prompt=lcbench`` in each sample's meta.
* **Scoring** (README): the reply is stripped and parsed with ``ast.literal_eval``, cut to the
  answer's length, and compared with the answer (exact match). (Upstream's ``model_response.strip()``
  discards its result; ``literal_eval`` strips leading spaces and tabs itself, so only a reply that
  starts with a space or tab before a newline differs: upstream's parse raises, lcbench's, on the
  stripped text, does not.) A reply that ``literal_eval`` cannot parse (an unquoted UUID) raises in
  upstream's loop; lcbench scores its stripped text instead, leading quotes removed (a labelled
  deviation). A list reply to a one-value question is
  wrong, as upstream (a list is not a string). Tasks with several answers are scored per needle:
  the share of the expected values found in the parsed list (or dict, for multi-threading: the
  share of threads whose final value is right); ``exact`` is 1 only when all are.

Variants (the paper's §3): ``single_needle`` (one key, the needle at a depth), ``multiple_needles``
(several keys, placed at random or clustered), ``conditional_needles`` (every value whose key
contains a character, placed at random or clustered; the character replaces one hex digit of each
such key), ``threading`` (a thread: each value is the next pair's key; the answer is the last value;
``forward``/``backward``/``random`` direction through the context), ``multi_threading`` (several
threads at once, one answer per thread). Depths of the single needle are percentages of the
object's pairs, as upstream's ``needle_depth``.
"""

from __future__ import annotations

import ast
import json
import random
import re
import uuid
from typing import Any

from ..errors import UserError
from ..params import Param
from .base import Task, TaskEnv
from .sample import Sample, Turn

VARIANTS = ("single_needle", "multiple_needles", "conditional_needles", "threading", "multi_threading")
PLACEMENTS = ("random", "clustered")
DIRECTIONS = ("forward", "backward", "random")

SOURCE = "jonathan-roberts1/needle-threading@006f8f57310cad9f84d5a8104c939abc86c96fa8"
# upstream's single-needle question, verbatim from the README's example
SINGLE_QUESTION = 'Extract the value corresponding to the specified key in the JSON object. Key: "{key}"\n Corresponding value: '
# lcbench's wording of the other variants, in the style of the single-needle question
QUESTIONS = {
    "multiple_needles": ("Extract the values corresponding to the specified keys in the JSON object. Return the values "
                         "as a Python list, in the order of the keys. Keys: {keys}\n Corresponding values: "),
    "conditional_needles": ('Extract the values corresponding to all keys in the JSON object that contain the character '
                            '"{char}". Return the values as a Python list. \n Corresponding values: '),
    "threading": ("The value of a key in the JSON object may itself be a key in the object. Starting from the specified "
                  "key, find its value, use that value as the next key, and repeat until the value is not a key. Return "
                  'the final value. Key: "{key}"\n Final value: '),
    "multi_threading": ("The value of a key in the JSON object may itself be a key in the object. For each specified "
                        "key, find its value, use that value as the next key, and repeat until the value is not a key. "
                        "Return a Python dictionary mapping each specified key to its final value. Keys: {keys}\n "
                        "Final values: "),
}
UUID_RE = re.compile(r"[0-9a-f*#@&$%]{8}-[0-9a-f*#@&$%]{4}-[0-9a-f*#@&$%]{4}-[0-9a-f*#@&$%]{4}-[0-9a-f*#@&$%]{12}")
MIN_PAIRS = 4


def draw_uuid(rng: random.Random) -> str:
    """One UUID as upstream's haystacks hold them: 128 random bits, no version bits set."""
    return str(uuid.UUID(int=rng.getrandbits(128)))


def haystack_text(pairs: list[tuple[str, str]]) -> str:
    """The JSON object of the pairs, in order, as ``json.dumps`` writes a dict."""
    return json.dumps(dict(pairs))


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in str(text).replace(",", ";").split(";") if x.strip()]
    except ValueError:
        raise UserError(f"needle_threading: {what} must be numbers separated by ';', got {text!r}.") from None


def _words(text: str, known: tuple[str, ...], what: str) -> list[str]:
    items = [x.strip() for x in str(text).replace(",", ";").split(";") if x.strip()]
    bad = [x for x in items if x not in known]
    if bad or not items:
        raise UserError(f"needle_threading: {what} {', '.join(map(repr, bad)) or '(none)'} not known; choose among "
                        f"{', '.join(known)}, ';'-separated. Fix: e.g. {what}={known[0]}.")
    return items


def sized_pairs(tokenizer, rng: random.Random, length: int) -> tuple[list[tuple[str, str]], int]:
    """The largest list of random pairs whose JSON object takes at most ``length`` target tokens
    (fewer than one pair's tokens short of it). Raises a UserError when not even a few pairs fit."""

    def count(n: int) -> int:
        return len(tokenizer(haystack_text(pairs[:n]), add_special_tokens=False)["input_ids"])

    pairs: list[tuple[str, str]] = []

    def grow(n: int) -> None:
        while len(pairs) < n:
            pairs.append((draw_uuid(rng), draw_uuid(rng)))

    grow(16)
    per_pair = max(1.0, count(16) / 16)
    # the count grows with every pair (each adds its tokens): bracket the largest n that fits, then bisect
    n = max(1, int(length / per_pair))
    step = max(2, n // 50)
    grow(n)
    if count(n) <= length:
        lo, hi = n, n + step
        while grow(hi) or count(hi) <= length:
            lo, hi, step = hi, hi + 2 * step, 2 * step
    else:
        lo, hi = max(0, n - step), n
        while lo > 0 and count(lo) > length:
            lo, hi, step = max(0, lo - 2 * step), lo, 2 * step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) <= length else (lo, mid)
    n = lo
    if n < MIN_PAIRS or count(n) > length:
        raise UserError(f"needle_threading: a length of {length} tokens holds fewer than {MIN_PAIRS} UUID pairs in "
                        f"this tokenizer (about {per_pair:.0f} tokens a pair). Fix: pass larger lengths=, e.g. "
                        f"lengths={int(per_pair * 25)}.")
    return pairs[:n], count(n)


def _positions(rng: random.Random, n_pairs: int, k: int, placement: str) -> list[int]:
    """``k`` distinct pair indices: anywhere (``random``) or consecutive at a random start (``clustered``)."""
    if placement == "clustered":
        start = rng.randrange(0, n_pairs - k + 1)
        return list(range(start, start + k))
    return sorted(rng.sample(range(n_pairs), k))


def _with_char(key: str, char: str, rng: random.Random) -> str:
    """``key`` with one of its hex digits (not a dash) replaced by ``char``."""
    spots = [i for i, c in enumerate(key) if c != "-"]
    i = rng.choice(spots)
    return key[:i] + char + key[i + 1:]


def thread_positions(rng: random.Random, spots: list[int], direction: str) -> list[int]:
    """The order in which a thread's hops sit in the context: ``forward`` (each next hop later),
    ``backward`` (each next hop earlier) or ``random``."""
    spots = sorted(spots)
    if direction == "backward":
        return spots[::-1]
    if direction == "random":
        rng.shuffle(spots)
    return spots


def write_thread(pairs: list[tuple[str, str]], order: list[int], rng: random.Random) -> tuple[str, str]:
    """Rewrite the pairs at ``order`` into one thread: hop i's value is hop i+1's key. Returns the
    start key and the final value (a fresh UUID)."""
    keys = [pairs[i][0] for i in order]
    final = draw_uuid(rng)
    for hop, idx in enumerate(order):
        pairs[idx] = (keys[hop], keys[hop + 1] if hop + 1 < len(keys) else final)
    return keys[0], final


def follow(lookup: dict[str, str], key: str, limit: int = 10_000) -> list[str]:
    """The keys and final value met following ``key`` through ``lookup`` (for checking threads)."""
    seen = [key]
    while seen[-1] in lookup and len(seen) <= limit:
        seen.append(lookup[seen[-1]])
    return seen


# --- scoring ---------------------------------------------------------------------------------------
def parse_reply(prediction: str) -> Any:
    """Upstream's parse: ``ast.literal_eval`` of the stripped reply; where it fails (upstream raises),
    lcbench keeps the stripped text, leading quote characters removed."""
    text = prediction.strip()
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text.lstrip("'\"")


def exact_value(prediction: str, answer: str) -> float:
    """Upstream's single-answer check: the parsed reply cut to the answer's length equals it."""
    parsed = parse_reply(prediction)
    return float(parsed[0:len(answer)] == answer) if isinstance(parsed, str) else 0.0


def _values(parsed: Any, raw: str) -> list[str]:
    """The values a reply names: the items of a parsed list/tuple/set, else every UUID in the text."""
    if isinstance(parsed, (list, tuple, set)):
        return [str(v).strip() for v in parsed]
    return UUID_RE.findall(raw)


def needle_share(prediction: str, answers: list[str]) -> float:
    """Share of the expected values the reply contains (per-needle accuracy)."""
    got = set(_values(parse_reply(prediction), prediction))
    return sum(a in got for a in answers) / len(answers) if answers else 0.0


def thread_share(prediction: str, starts: list[str], finals: list[str]) -> float:
    """Share of threads whose final value is right: from a parsed dict ``{start: final}``, else the
    final values named anywhere in the reply."""
    parsed = parse_reply(prediction)
    if isinstance(parsed, dict):
        got = {str(k).strip(): str(v).strip() for k, v in parsed.items()}
        return sum(got.get(s, "")[0:len(f)] == f for s, f in zip(starts, finals)) / len(finals)
    return needle_share(prediction, finals)


class NeedleThreading(Task):
    name = "needle_threading"
    suite = "needle_threading"
    version = "1"
    source = SOURCE
    summary = ("Needle Threading (arXiv 2411.05000): UUID key-value haystacks at any token length; single, multiple and "
               "conditional needles, threads and multi-threads; exact match / per-needle accuracy")
    params = (
        Param("variants", str, ";".join(VARIANTS), f"';'-separated among {', '.join(VARIANTS)}", nonempty=True),
        Param("lengths", str, "2000;4000", "haystack lengths in target tokens, ';'-separated", numbers=True,
              nonempty=True, min=64),
        Param("depths", str, "0;25;50;75;100", "single-needle depths in percent of the pairs, ';'-separated",
              numbers=True, nonempty=True, min=0, max=100),
        Param("needles", str, "2;5", "needles per multiple/conditional question, ';'-separated", numbers=True,
              nonempty=True, min=1),
        Param("placements", str, "random;clustered", "where multiple/conditional needles sit: random;clustered"),
        Param("char", str, "*", "the character conditional needles' keys contain"),
        Param("thread_lengths", str, "3;5", "pairs per thread (threading, multi_threading), ';'-separated",
              numbers=True, nonempty=True, min=1),
        Param("directions", str, "forward;backward;random", "thread directions through the context"),
        Param("threads", str, "2;3", "threads per multi-threading question, ';'-separated", numbers=True,
              nonempty=True, min=1),
        Param("repeats", int, 1, "samples per grid cell (different haystacks)", min=1),
        Param("max_new_tokens", int, 0, "tokens to generate (0: 48 per expected value + 16)", min=0),
    )

    def protocol_payload(self) -> Any:
        return {"version": self.version, "args": self.args, "single": SINGLE_QUESTION, "questions": QUESTIONS,
                "source": SOURCE}

    def _grid(self) -> dict[str, Any]:
        a = self.args
        char = str(a["char"])
        if len(char) != 1 or char in '0123456789abcdef-"\\' or char.isspace():
            raise UserError(f"needle_threading: char={char!r} must be one character that no UUID holds (not a hex "
                            f"digit, '-', a quote, a backslash or a space). Fix: char=*.")
        ints = {k: [int(x) for x in _floats(a[k], k)] for k in ("lengths", "needles", "thread_lengths", "threads")}
        for k, xs in ints.items():
            if any(x != y for x, y in zip(xs, _floats(a[k], k))):
                raise UserError(f"needle_threading: {k} must be whole numbers, got {a[k]!r}. Fix: e.g. {k}=2;5.")
        return {"variants": _words(a["variants"], VARIANTS, "variants"),
                "placements": _words(a["placements"], PLACEMENTS, "placements"),
                "directions": _words(a["directions"], DIRECTIONS, "directions"),
                "depths": _floats(a["depths"], "depths"), "char": char, **ints}

    def _max_new(self, n_values: int) -> int:
        return self.args["max_new_tokens"] or 48 * n_values + 16

    def samples(self, env: TaskEnv) -> list[Sample]:
        g = self._grid()
        rng = random.Random(env.seed)
        out: list[Sample] = []
        for length in g["lengths"]:
            for variant in g["variants"]:
                for cell in self._cells(variant, g):
                    for r in range(self.args["repeats"]):
                        pairs, _ = sized_pairs(env.tokenizer, rng, length)
                        out.append(self._sample(variant, cell, pairs, length, r, rng, env.tokenizer))
        return out

    @staticmethod
    def _cells(variant: str, g: dict[str, Any]) -> list[dict[str, Any]]:
        if variant == "single_needle":
            return [{"depth": d} for d in g["depths"]]
        if variant in ("multiple_needles", "conditional_needles"):
            return [{"num_needles": n, "placement": p} for n in g["needles"] for p in g["placements"]]
        if variant == "threading":
            return [{"thread_length": t, "direction": d} for t in g["thread_lengths"] for d in g["directions"]]
        return [{"num_threads": k, "thread_length": t, "direction": d} for k in g["threads"]
                for t in g["thread_lengths"] for d in g["directions"]]

    def _sample(self, variant: str, cell: dict[str, Any], pairs: list[tuple[str, str]], length: int, r: int,
                rng: random.Random, tokenizer) -> Sample:
        n = len(pairs)
        need = {"single_needle": 1, "multiple_needles": cell.get("num_needles", 1),
                "conditional_needles": cell.get("num_needles", 1), "threading": cell.get("thread_length", 1),
                "multi_threading": cell.get("num_threads", 1) * cell.get("thread_length", 1)}[variant]
        if need > n:
            raise UserError(f"needle_threading: {variant} with {cell} needs {need} pairs, but a {length}-token haystack "
                            f"holds {n} in this tokenizer. Fix: pass larger lengths= or fewer needles/threads.")
        meta: dict[str, Any] = {"dataset": variant, "length": length, "length_bucket": length, "num_kv_pairs": n,
                                "prompt": "upstream" if variant == "single_needle" else "lcbench", **cell}
        if variant == "single_needle":
            idx = round(cell["depth"] / 100 * (n - 1))
            key, value = pairs[idx]
            answers, question, scorer = [value], SINGLE_QUESTION.format(key=key), "exact"
            meta["needle_index"] = idx
        elif variant == "multiple_needles":
            spots = _positions(rng, n, cell["num_needles"], cell["placement"])
            order = list(spots)
            rng.shuffle(order)  # keys asked in an order of their own, answers in that order
            keys = [pairs[i][0] for i in order]
            answers, scorer = [pairs[i][1] for i in order], "needles"
            question = QUESTIONS[variant].format(keys=json.dumps(keys))
        elif variant == "conditional_needles":
            spots = _positions(rng, n, cell["num_needles"], cell["placement"])
            for i in spots:
                pairs[i] = (_with_char(pairs[i][0], self.args["char"], rng), pairs[i][1])
            answers, scorer = [pairs[i][1] for i in spots], "needles"
            question = QUESTIONS[variant].format(char=self.args["char"])
            meta["conditional_character"] = self.args["char"]
        elif variant == "threading":
            spots = rng.sample(range(n), cell["thread_length"])
            start, final = write_thread(pairs, thread_positions(rng, spots, cell["direction"]), rng)
            answers, scorer = [final], "exact"
            question = QUESTIONS[variant].format(key=start)
            meta["start_key"] = start
        else:
            k, t = cell["num_threads"], cell["thread_length"]
            spots = rng.sample(range(n), k * t)
            starts, finals = [], []
            for j in range(k):
                s, f = write_thread(pairs, thread_positions(rng, spots[j * t:(j + 1) * t], cell["direction"]), rng)
                starts.append(s)
                finals.append(f)
            answers, scorer = finals, "threads"
            question = QUESTIONS[variant].format(keys=json.dumps(starts))
            meta["start_keys"] = starts
        haystack = haystack_text(pairs)
        meta["context_tokens"] = len(tokenizer(haystack, add_special_tokens=False)["input_ids"])
        sid = "nt-" + "-".join([variant, f"L{length}", *(f"{k}{v:g}" if isinstance(v, (int, float)) else f"{v}"
                                                        for k, v in cell.items())]) + (f"-r{r}" if r else "")
        turn = Turn(question="\n" + question, answers=answers, max_new_tokens=self._max_new(len(answers)),
                    scorer=scorer, meta={"starts": meta.get("start_keys", [])})
        return Sample(sid, haystack, [turn], meta=meta)

    def score(self, sample: Sample, turn: Turn, prediction: str) -> dict[str, float]:
        if turn.scorer == "exact":
            s = exact_value(prediction, turn.answers[0])
        elif turn.scorer == "threads":
            s = thread_share(prediction, list(turn.meta.get("starts") or []), list(turn.answers))
        else:
            s = needle_share(prediction, list(turn.answers))
        return {"score": s, "exact": float(s == 1.0)}

    @classmethod
    def subtasks(cls) -> dict[str, str]:
        return {"single_needle": "one key's value, the needle at a depth (upstream's question)",
                "multiple_needles": "several keys' values, placed at random or clustered",
                "conditional_needles": "every value whose key contains a character",
                "threading": "follow a thread of values that are keys to its end (forward, backward, random)",
                "multi_threading": "several threads at once, one final value each"}
