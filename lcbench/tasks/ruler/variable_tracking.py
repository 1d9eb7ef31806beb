"""RULER's variable tracking (``scripts/data/synthetic/variable_tracking.py`` at NVIDIA/RULER@c3f5e3b;
spec §2.3): chains ``VAR X = 12345``, ``VAR Y = VAR X `` hidden in noise; the model lists every
variable that holds the queried value. A one-shot example (3-letter variables, value 12345, at
most 500 tokens) precedes the task template, renamed afresh for every sample.
"""

from __future__ import annotations

import random
import string
from typing import Any

from ...errors import UserError
from .protocol import PROTOCOL, Generator, Rendered, split_template
from .sizing import estimate_units, fit_units

_VT = PROTOCOL["variable_tracking"]


def var_names(rng: random.Random, count: int, letters: int) -> list[str]:
    """``count`` distinct random upper-case names of ``letters`` letters."""
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names:
            names.append(name)
    return names


def chain_statements(names: list[str], value: str) -> list[str]:
    """``VAR A = value``, then ``VAR B = VAR A `` (with upstream's trailing space) for each hop."""
    return [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(len(names) - 1)]


def hide_chains(rng: random.Random, chains: list[list[str]], sentences: list[str]) -> str:
    """Insert each chain's statements in order at sorted random positions among the noise
    sentences, join with newlines (upstream: then ``replace(". \\n", ".\\n")``)."""
    sentences = list(sentences)
    for chain in chains:
        positions = sorted(rng.sample(range(len(sentences)), len(chain)))
        for j, pos in enumerate(positions):
            sentences.insert(pos + j, chain[j])
    return "\n".join(sentences).replace(". \n", ".\n")


class VariableTrackingGenerator(Generator):
    def __init__(self, task: str, spec: dict[str, Any], length: int, seed: int, tokenizer: Any):
        super().__init__(task, spec, length, seed)
        inc = _VT["incremental"]
        self.probe = inc["short"] if length < inc["short_below"] else inc["noise"]
        self.num_chains, self.num_hops = int(self.args["num_chains"]), int(self.args["num_hops"])
        self.lower = self.num_hops + 1  # one position per link of a chain
        self.head, self.tail = split_template(self.template["template"])
        self.icl_text, self.icl_vars = self._icl_example(tokenizer)

    def _chains(self, rng: random.Random, icl: bool) -> tuple[list[list[str]], list[list[str]]]:
        letters = _VT["icl_var_letters"] if icl else _VT["var_letters"]
        hops = min(_VT["icl_max_hops"], self.num_hops) if icl else self.num_hops
        names = var_names(rng, (hops + 1) * self.num_chains, letters)
        var_sets, chains = [], []
        for c in range(self.num_chains):
            chain_vars = names[c * (hops + 1):(c + 1) * (hops + 1)]
            lo, hi = _VT["value_range"]
            value = _VT["icl_value"] if icl else str(rng.randint(lo, hi))
            var_sets.append(chain_vars)
            chains.append(chain_statements(chain_vars, value))
        return var_sets, chains

    def _context(self, rng: random.Random, chains: list[list[str]], n: int) -> str:
        return hide_chains(rng, chains, [_VT["noise"]] * n)

    def _icl_example(self, tokenizer: Any) -> tuple[str, list[str]]:
        """The one-shot example: task template + answer prefix (no chat wrapper), sized to at most
        500 tokens, followed by its answer: ``input + " " + " ".join(outputs) + "\\n"``."""
        hops = min(_VT["icl_max_hops"], self.num_hops)

        def text(n: int) -> tuple[str, list[str]]:
            rng = random.Random(f"ruler:{self.seed}:vt:icl")
            var_sets, chains = self._chains(rng, icl=True)
            context = self._context(rng, chains, n)
            value = chains[0][0].split("=")[-1].strip()
            prefix = self.template["answer_prefix"].format(num_v=hops + 1, query=value)
            return self.head + context + self.tail.format(query=value) + prefix, var_sets[0]

        def count(n: int) -> int:
            return len(tokenizer(text(n)[0], add_special_tokens=False)["input_ids"])

        budget, probe = _VT["icl_max_seq_length"], _VT["incremental"]["icl"]
        try:
            n = fit_units(count, budget, estimate_units(count, budget, probe), hops + 1, None, "ruler vt example")
        except UserError:  # upstream falls back to `incremental` noises when nothing fits
            n = max(hops + 1, probe)
        example, outputs = text(n)
        return example + " " + " ".join(outputs) + "\n", outputs

    def _randomized_icl(self, rng: random.Random) -> str:
        """Upstream ``randomize_icl``: fresh names for the example's answer variables (replaced
        everywhere they occur) and a fresh value for 12345."""
        icl = self.icl_text
        for name in self.icl_vars:
            icl = icl.replace(name, "".join(rng.choices(string.ascii_uppercase, k=len(name))))
        lo, hi = _VT["value_range"]
        return icl.replace(_VT["icl_value"], str(rng.randint(lo, hi)))

    def build(self, index: int, n: int) -> Rendered:
        rng = self.rng(index)
        var_sets, chains = self._chains(rng, icl=False)
        icl = self._randomized_icl(rng)
        context = self._context(rng, chains, n)
        value = chains[0][0].split("=")[-1].strip()
        prefix = self.template["answer_prefix"].format(num_v=self.num_hops + 1, query=value)
        # upstream inserts ``randomize_icl(icl_example) + '\n'`` before the task template, and the example
        # already ends in '\n': two newlines (variable_tracking.py sys_vartrack_w_noise_random)
        return Rendered(icl + "\n" + self.head, context, self.tail.format(query=value), prefix, list(var_sets[0]),
                        {"value": value})
