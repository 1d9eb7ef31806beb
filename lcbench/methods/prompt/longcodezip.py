"""LongCodeZip: function-level ranking by instruction perplexity, then block selection by knapsack.

Shi et al., "LongCodeZip: Compress Long Context for Code Language Models", ASE 2025
(arXiv:2510.00446); read against the official implementation github.com/YerbaPage/LongCodeZip
at commit 71248b737f7e44b1c24a02d47b51b3f0130f121a (``longcodezip/__init__.py``):

1. *Coarse*: the code is split into function/class chunks (a chunk starts at each line that opens
   a ``def``/``class`` — also ``function``/``fn``/``func`` with ``language=generic`` — the text
   before the first is a chunk of its own). Each chunk is ranked by its approximated mutual
   information with the instruction: how much it lowers the question's perplexity,
   ``ppl(q) − ppl(q | chunk)`` (mean surprisal in nats). Chunks are kept in rank order until their
   tokens pass the budget by ``coarse_slack`` tokens (upstream's ``context_budget="+100"``).
2. *Fine*: a kept function of at least ``min_lines`` non-empty lines is cut into blocks by
   perplexity: each line's perplexity given the function's lines before it; a line whose
   perplexity is no lower than both neighbours' and exceeds one of them by ``mean + k·std`` of the
   function's line perplexities ends a block (upstream's ``EntropyChunking``). Each block's
   importance is ``ppl(q) − ppl(q | block)``. The blocks opening with a definition, a comment or a
   ``return`` are always kept. Each function gets a share of the budget biased by its coarse score
   (``importance_beta``), and a 0/1 knapsack (exact dynamic programming; greedy by value/weight
   when the table would exceed ``MAX_DP_CELLS``) picks the blocks of greatest total importance
   within it. Smaller kept functions stay whole.
3. The kept chunks and blocks are concatenated in their original order and fitted to the budget in
   the target tokenizer (preserved and knapsack-chosen blocks first; room left by whole units that
   did not fit is filled with the next best blocks, then with whole functions the coarse stage left
   out, in rank order). Upstream writes ``# ...`` where code was left
   out; lcbench does not (each kept span is the author's text, and the budget counts only it).

It needs the instruction (the question): without ``--query-aware`` it refuses (upstream ranks
nothing without a question; its fine stage scores every block 0).
"""

from __future__ import annotations

import math
import re

import torch

from ...errors import UserError
from ...params import Param
from .base import PromptCompressor
from .llmlingua import KEPT_FIRST
from .lm import CompressorLM, load_compressor
from .selective_context import COMPRESSOR, WINDOW
from .units import Span, owner_of, render, select_within_budget, token_spans

DEFINITION = {"python": re.compile(r"^[ \t]*(?:async[ \t]+)?(?:def|class)[ \t]", re.MULTILINE),
              "generic": re.compile(r"^[ \t]*(?:[\w<>\[\]]+[ \t]+)*(?:def|class|function|fn|func)[ \t]", re.MULTILINE)}
OPENERS = ("def ", "class ", "function ", "fn ", "func ")
MAX_DP_CELLS = 4_000_000


def function_spans(code: str, language: str) -> list[Span]:
    """Chunks starting at each definition line (the text before the first is a chunk too)."""
    starts = [m.start() for m in DEFINITION[language].finditer(code)]
    if not starts or starts[0] > 0:
        starts = [0] + starts
    return [(s, e) for s, e in zip(starts, starts[1:] + [len(code)]) if e > s]


def line_spans(text: str, start: int, end: int) -> list[Span]:
    out, s = [], start
    while s < end:
        e = text.find("\n", s, end)
        e = end if e < 0 else e + 1
        out.append((s, e))
        s = e
    return out


def knapsack(weights: list[int], values: list[float], capacity: int) -> set[int]:
    """Indices maximising the total value within ``capacity`` (0/1 knapsack; items of value ≤ 0,
    nan or inf never help and are left out). Exact DP; greedy by value/weight when too large."""
    items = [i for i, v in enumerate(values) if math.isfinite(v) and v > 0 and weights[i] <= capacity]
    if capacity <= 0 or not items:
        return set()
    if len(items) * (capacity + 1) > MAX_DP_CELLS:
        chosen, room = set(), capacity
        for i in sorted(items, key=lambda i: -values[i] / max(1, weights[i])):
            if weights[i] <= room:
                chosen.add(i)
                room -= weights[i]
        return chosen
    best = torch.zeros(capacity + 1, dtype=torch.float64)
    took = torch.zeros(len(items), capacity + 1, dtype=torch.bool)
    for k, i in enumerate(items):
        w = weights[i]
        candidate = torch.full_like(best, -1.0)
        candidate[w:] = best[: capacity + 1 - w] + values[i]
        better = candidate > best
        took[k] = better
        best = torch.where(better, candidate, best)
    chosen, room = set(), capacity
    for k in range(len(items) - 1, -1, -1):
        if took[k, room]:
            chosen.add(items[k])
            room -= weights[items[k]]
    return chosen


def ppl_spikes(ppl: list[float], k: float) -> list[int]:
    """Lines ending a block: no lower than both neighbours and above one by mean + k·std of the
    valid (finite, positive) perplexities (upstream ``find_ppl_spikes_adaptive``, method ``std``)."""
    valid = [p for p in ppl if math.isfinite(p) and p > 0]
    threshold = (sum(valid) / len(valid) + k * float(torch.tensor(valid).std(unbiased=False))) if len(valid) >= 3 else 0.5
    out = []
    for i in range(1, len(ppl) - 1):
        cur = ppl[i]
        if not math.isfinite(cur):
            continue
        left = ppl[i - 1] if math.isfinite(ppl[i - 1]) else cur
        right = ppl[i + 1] if math.isfinite(ppl[i + 1]) else cur
        if cur - left >= 0 and cur - right >= 0 and (cur - left >= threshold or cur - right >= threshold):
            out.append(i)
    return out


class QuestionPerplexity:
    """``ppl(q) − ppl(q | text)`` (mean surprisal of the question tokens, nats), ``q`` unconditioned once."""

    def __init__(self, lm: CompressorLM, question: str):
        self.lm = lm
        self.ids, _ = lm.encode("\n\n" + question.strip())
        alone = lm.surprisal(self.ids)
        self.alone = float(alone[torch.isfinite(alone)].mean()) if torch.isfinite(alone).any() else 0.0

    def reduction(self, prefix: list[int]) -> float:
        if not prefix:
            return float("-inf")
        return self.alone - float(self.lm.surprisal(self.ids, prefix=prefix).mean())


class LongCodeZip(PromptCompressor):
    name = "longcodezip"
    family = "prompt_compression"
    paper = ("Shi et al., LongCodeZip: Compress Long Context for Code Language Models, ASE 2025 "
             "(arXiv:2510.00446)")
    summary = ("rank functions by instruction-perplexity reduction, cut kept ones into perplexity blocks, "
               "knapsack under the budget (needs --query-aware)")
    defaults = {"compressor": "target", "window": 4096, "language": "python", "coarse_slack": 100,
                "min_lines": 5, "importance_beta": 0.5, "spike_k": 0.2}
    params = (
        COMPRESSOR, WINDOW,
        Param("language", str, None, "definition syntax that starts a chunk", choices=tuple(DEFINITION)),
        Param("coarse_slack", int, None, "tokens past the budget the coarse stage may keep", min=0),
        Param("min_lines", int, None, "kept functions with fewer non-empty lines stay whole", min=1),
        Param("importance_beta", float, None, "how much a function's rank biases its share of the budget",
              min=0, max=1),
        Param("spike_k", float, None, "block boundary threshold: mean + k·std of the line perplexities", min=0),
    )

    def compress(self, text, budget):
        if not text.questions:
            raise UserError(
                "longcodezip ranks code by how much it explains the instruction (the question), which the text "
                "stage sees only with --query-aware. Fix: add --query-aware, or use a question-agnostic method "
                "(llmlingua, dspc).")
        context = text.context
        lm = load_compressor(self.args["compressor"], text, self.args["window"])
        ids, offsets = lm.encode(context)
        tok_spans = token_spans(offsets, len(context))
        funcs = function_spans(context, self.args["language"])
        owner = owner_of(funcs, tok_spans)
        members = [[t for t, f in enumerate(owner) if f == c] for c in range(len(funcs))]
        q = QuestionPerplexity(lm, "\n".join(text.questions))
        cap = max(1, lm.window // 2)
        ami = [q.reduction([ids[t] for t in m][-cap:]) for m in members]
        kept = self.coarse(members, ami, budget)
        spans, scores = [], []
        large = [c for c in kept if sum(1 for s, e in line_spans(context, *funcs[c]) if context[s:e].strip())
                 >= self.args["min_lines"]]
        rates = self.function_rates(members, ami, kept, large, budget)
        for c, (s, e) in enumerate(funcs):
            if c not in kept:  # the final fit may still take it whole, after everything kept
                spans.append((s, e))
                scores.append(ami[c] - KEPT_FIRST if math.isfinite(ami[c]) else -2 * KEPT_FIRST)
            elif c not in large:
                spans.append((s, e))
                scores.append(2 * KEPT_FIRST + ami[c])
            else:
                blocks, values = self.fine(lm, q, context, ids, tok_spans, funcs[c], members[c], rates[c])
                spans += blocks
                scores += values
        chosen = select_within_budget(context, spans, scores, text.tokenizer, budget)
        return render(context, spans, chosen)

    def coarse(self, members: list[list[int]], ami: list[float], budget: int) -> set[int]:
        """Functions in rank order until their tokens pass ``budget + coarse_slack``."""
        kept, room = set(), budget + self.args["coarse_slack"]
        for c in sorted(range(len(members)), key=lambda c: -ami[c]):
            kept.add(c)
            room -= len(members[c])
            if room < 0:
                break
        return kept

    def function_rates(self, members, ami, kept, large, budget) -> dict[int, float]:
        """Each large kept function's share of its tokens, biased by its normalised coarse score
        and rescaled so they sum to what the budget leaves after the small kept functions."""
        small_tokens = sum(len(members[c]) for c in kept if c not in large)
        large_tokens = sum(len(members[c]) for c in large)
        if not large_tokens:
            return {}
        rate = min(1.0, max(0.0, (budget - small_tokens) / large_tokens))
        finite = [ami[c] for c in large if math.isfinite(ami[c])]
        lo, hi = (min(finite), max(finite)) if finite else (0.0, 0.0)
        beta = self.args["importance_beta"]
        rates = {c: min(1.0, max(0.0, rate * (1 + beta * (2 * ((ami[c] - lo) / (hi - lo) if hi > lo and math.isfinite(ami[c]) else 0.5) - 1))))
                 for c in large}
        kept_tokens = sum(rates[c] * len(members[c]) for c in large)
        if kept_tokens > 0:
            scale = rate * large_tokens / kept_tokens
            rates = {c: min(1.0, r * scale) for c, r in rates.items()}
        return rates

    def fine(self, lm, q: QuestionPerplexity, context, ids, tok_spans, span: Span, members: list[int], rate: float):
        """One function's blocks and their final-fit scores: preserved and knapsack-chosen first."""
        lines = line_spans(context, *span)
        line_of = owner_of(lines, [tok_spans[t] for t in members])
        surprisal = lm.surprisal([ids[t] for t in members])
        per_line: list[list[float]] = [[] for _ in lines]
        for j, l in enumerate(line_of):
            if math.isfinite(float(surprisal[j])):
                per_line[l].append(float(surprisal[j]))
        ppl = [sum(v) / len(v) if v and context[s:e].strip() else 0.0 for v, (s, e) in zip(per_line, lines)]
        cuts = ppl_spikes(ppl, self.args["spike_k"])
        bounds = [0] + [i + 1 for i in cuts] + [len(lines)]
        blocks = [(lines[a][0], lines[b - 1][1]) for a, b in zip(bounds, bounds[1:]) if b > a]
        block_of = owner_of(blocks, [tok_spans[t] for t in members])
        block_tokens = [[members[j] for j, b in enumerate(block_of) if b == k] for k in range(len(blocks))]
        weights = [len(t) for t in block_tokens]
        cap = max(1, lm.window // 2)
        values = [q.reduction([ids[t] for t in toks][-cap:]) if context[s:e].strip() else float("-inf")
                  for toks, (s, e) in zip(block_tokens, blocks)]
        comment = "#" if self.args["language"] == "python" else "//"
        preserved = set()
        for k, (s, e) in enumerate(blocks):
            first = next((line for line in context[s:e].split("\n") if line.strip()), "")
            if any(o in first for o in OPENERS) or first.strip().startswith(comment) or "return " in first:
                preserved.add(k)
        capacity = int(rate * len(members)) - sum(weights[k] for k in preserved)
        rest = [k for k in range(len(blocks)) if k not in preserved]
        chosen = {rest[i] for i in knapsack([weights[k] for k in rest], [values[k] for k in rest], capacity)}
        spans, scores = [], []
        for k, block in enumerate(blocks):
            value = values[k] if math.isfinite(values[k]) else -1.0
            if k in preserved or k in chosen:
                spans.append(block)
                scores.append((2 * KEPT_FIRST if k in preserved else KEPT_FIRST) + value)
            else:  # left out by the knapsack: the final fit may still take its lines, after every chosen block
                pieces = line_spans(context, *block)
                spans += pieces
                scores += [value] * len(pieces)
        return spans, scores
