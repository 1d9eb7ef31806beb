"""Offline stand-ins for SCBench's synthetic tasks, in the released row format
(``{"id", "context", "multi_turns": [{"input", "answer"}]}``; spec §4.5). SCBench publishes no
generator, so these are format-compatible, not SCBench's data: they are registered under their own
names (``scbench_*_synth``) and go through the same templates, modes and scorers as the released
task they stand in for.

- kv: a JSON object of random UUID keys and values (InfiniteBench ``kv_retrieval`` style).
- prefix_suffix: random strings; find the one with a given prefix and suffix.
- vt: RULER-style variable chains in noise, one chain per turn.
- mf: a list of integers; largest / smallest / median (InfiniteBench ``math_find`` style).

Each row is sized so the first turn's prompt (context + first question, chat template included)
fills ``length`` tokens of the target tokenizer to within one unit (a pair, string, sentence or
two numbers).
"""

from __future__ import annotations

import json
import random
import statistics
import uuid
from collections.abc import Callable
from typing import Any

from ..ruler.sizing import PromptCounter, estimate_units, fit_units
from ..ruler.variable_tracking import chain_statements, hide_chains, var_names
from .prompts import parts
from .protocol import PROTOCOL

_SYN = PROTOCOL["synthetic"]


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def kv_row(rng: random.Random, n: int, turns: int) -> dict:
    cfg = _SYN["scbench_kv"]
    pairs = {_uuid(rng): _uuid(rng) for _ in range(n)}
    keys = list(pairs)
    asked = [keys[i] for i in rng.sample(range(n), turns)]
    return {"context": json.dumps(pairs, ensure_ascii=False),
            "multi_turns": [{"input": cfg["input"].format(key=k), "answer": pairs[k]} for k in asked]}


def prefix_suffix_row(rng: random.Random, n: int, turns: int) -> dict:
    cfg = _SYN["scbench_prefix_suffix"]
    width, affix = cfg["string_length"], cfg["affix_length"]
    strings: list[str] = []
    seen: set[tuple[str, str]] = set()
    while len(strings) < n:
        s = "".join(rng.choices(cfg["alphabet"], k=width))
        if (s[:affix], s[-affix:]) not in seen:  # every (prefix, suffix) names one string
            seen.add((s[:affix], s[-affix:]))
            strings.append(s)
    asked = [strings[i] for i in rng.sample(range(n), turns)]
    return {"context": "\n".join(strings),
            "multi_turns": [{"input": cfg["input"].format(prefix=s[:affix], suffix=s[-affix:]), "answer": s}
                            for s in asked]}


def vt_row(rng: random.Random, n: int, turns: int) -> dict:
    cfg = _SYN["scbench_vt"]
    hops = cfg["num_hops"]
    names = var_names(rng, (hops + 1) * turns, cfg["var_letters"])
    lo, hi = cfg["value_range"]
    values: list[str] = []
    while len(values) < turns:
        v = str(rng.randint(lo, hi))
        if v not in values:
            values.append(v)
    groups = [names[i * (hops + 1):(i + 1) * (hops + 1)] for i in range(turns)]
    context = hide_chains(rng, [chain_statements(g, v) for g, v in zip(groups, values)], [cfg["noise"]] * n)
    return {"context": context,
            "multi_turns": [{"input": cfg["input"].format(value=v, num_v=hops + 1), "answer": g}
                            for g, v in zip(groups, values)]}


def mf_row(rng: random.Random, n: int, turns: int) -> dict:
    cfg = _SYN["scbench_mf"]
    lo, hi = cfg["value_range"]
    numbers = [rng.randint(lo, hi) for _ in range(2 * n + 1)]  # odd: the median is one of them
    answer = {"largest": max(numbers), "smallest": min(numbers), "median": int(statistics.median(numbers))}
    kinds = [cfg["kinds"][i % len(cfg["kinds"])] for i in range(turns)]
    return {"context": numbers, "multi_turns": [{"input": cfg["input"].format(kind=k), "answer": answer[k]}
                                                for k in kinds]}


ROWS: dict[str, tuple[Callable[[random.Random, int, int], dict], int, int]] = {
    # task → (row builder, probe units for the size estimate, smallest size)
    "scbench_kv": (kv_row, 10, 1),
    "scbench_prefix_suffix": (prefix_suffix_row, 50, 1),
    "scbench_vt": (vt_row, 10, _SYN["scbench_vt"]["num_hops"] + 1),
    "scbench_mf": (mf_row, 100, 1),
}


def synthetic_rows(task: str, *, length: int, num_samples: int, num_turns: int, seed: int, tokenizer: Any,
                   chat: bool) -> list[dict]:
    """``num_samples`` rows of ``task``, each sized to ``length`` tokens of its first prompt."""
    build, probe, lower = ROWS[task]
    counter = PromptCounter(tokenizer, chat)
    rows, units = [], None
    for index in range(num_samples):
        def row_at(n: int, index: int = index) -> dict:
            rng = random.Random(f"scbench:{seed}:{task}:{length}:{index}")
            return {"id": index, **build(rng, n, num_turns)}

        def count(n: int) -> int:
            head, context, questions, _ = parts(task, row_at(n), False, counter.chat)
            return counter(head + context + questions[0])

        start = units if units is not None else estimate_units(count, length, probe)
        units = fit_units(count, length, start, max(lower, num_turns), None, f"{task}_synth at {length}")
        rows.append(row_at(units))
    return rows
