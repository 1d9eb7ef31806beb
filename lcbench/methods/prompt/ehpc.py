"""EHPC: prompt compression by evaluator heads, read from a partial-depth forward.

Fei, Niu, Xie, Liu, Bai and Han, "Efficient Prompt Compression with Evaluator Heads for
Long-Context Transformer Inference", NeurIPS 2025 (arXiv:2501.12959). No official implementation
was found to read; this follows the paper's description, with lcbench's constants:

1. *Evaluator heads*, found once per model (cached per process, recorded in the records as
   ``ehpc_layer``): needle-in-a-haystack probes (a number sentence hidden at 25/50/75 % depth of
   ``probe_tokens`` tokens of filler, followed by the question that asks for it) run through the
   model; each head scores the attention its question queries pay to the needle's tokens; the
   layer whose ``heads`` best heads score highest is chosen, and those heads are the evaluator
   heads (the paper picks heads of the highest-scoring layer, which lies early in the network).
2. *Skimming*: the context (and, in ``--query-aware`` mode, the question after it) runs through
   the first layers only, up to the evaluator layer (:func:`~.attend.head_attention`, a
   partial-depth forward: the later layers never run); each context token scores the attention it
   receives from the last ``window`` queries through the evaluator heads, max-pooled over
   ``pool`` neighbouring tokens.
3. The top-scoring tokens within the budget are kept in their order, and the target model prefills
   them (the text stage returns their text; the ratio is counted in the target tokenizer).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...params import Param
from .attend import head_attention
from .base import PromptCompressor
from .lm import load_compressor
from .units import select_within_budget, token_spans

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The special magic number is {number}. "
QUESTION = " What is the special magic number mentioned in the text above? The special magic number is"


@dataclass(frozen=True)
class EvaluatorHeads:
    """The evaluator heads of one model: their layer, the query heads, and each head's probe score."""

    layer: int
    heads: tuple[int, ...]
    scores: torch.Tensor  # (layers, query heads): mean attention of the question on the needle


_FOUND: dict[tuple, EvaluatorHeads] = {}


def probe_inputs(tokenizer, tokens: int, depth: float, seed: int) -> tuple[list[int], tuple[int, int], int]:
    """One probe: ids of filler with a needle at ``depth`` and the question; the needle's token
    span; the question's length in tokens."""
    number = random.Random(seed).randint(1_000_000, 9_999_999)
    unit = tokenizer(FILLER, add_special_tokens=False)["input_ids"]
    haystack = (unit * (tokens // max(1, len(unit)) + 1))[:tokens]
    needle = tokenizer(NEEDLE.format(number=number), add_special_tokens=False)["input_ids"]
    question = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    at = int(len(haystack) * depth)
    ids = haystack[:at] + needle + haystack[at:] + question
    return ids, (at, at + len(needle)), len(question)


PROBE_DEPTHS = (0.25, 0.5, 0.75)


def needle_probes(tokenizer, tokens: int, seed: int = 0):
    """The calibration probes (:func:`probe_inputs`) at depths 25/50/75 %, seeds ``seed``, ``seed + 1``, ...
    (EHPC's evaluator heads, ILRe's retrieval layer, REFORM's embedding heads)."""
    for k, depth in enumerate(PROBE_DEPTHS):
        yield probe_inputs(tokenizer, tokens, depth, seed + k)


def find_evaluator_heads(lm, heads: int, probe_tokens: int, seed: int = 0) -> EvaluatorHeads:
    """Score every head of every layer on the needle probes; the layer whose ``heads`` best heads
    score highest, and those heads (cached per model and setting)."""
    key = (id(lm.model), getattr(lm.model.config, "_name_or_path", ""), heads, probe_tokens, seed)
    if key in _FOUND:
        return _FOUND[key]
    layers = lm.model.config.get_text_config().num_hidden_layers
    total = None
    for ids, (a, b), q in needle_probes(lm.tokenizer, probe_tokens, seed):
        probs = head_attention(lm, ids, range(layers), q)  # layer → (Hq, q, L)
        scores = torch.stack([probs[i][:, :, a:b].sum(-1).mean(-1) for i in range(layers)])  # (layers, Hq)
        total = scores if total is None else total + scores
    total = total / len(PROBE_DEPTHS)
    n = min(heads, total.shape[1])
    best = total.topk(n, dim=1)
    layer = int(best.values.sum(1).argmax())
    found = EvaluatorHeads(layer, tuple(sorted(int(h) for h in best.indices[layer])), total)
    _FOUND[key] = found
    return found


class EHPC(PromptCompressor):
    name = "ehpc"
    hybrid_layers = False  # it reads every model layer's attention to find its evaluator heads
    family = "prompt_compression"
    paper = ("Fei et al., Efficient Prompt Compression with Evaluator Heads for Long-Context Transformer "
             "Inference, NeurIPS 2025 (arXiv:2501.12959)")
    summary = "tokens ranked by evaluator heads' attention in a forward through the first layers only"
    defaults = {"compressor": "target", "heads": 8, "window": 8, "pool": 5, "probe_tokens": 512, "context_window": 8192}
    params = (
        Param("compressor", str, None, "the model whose heads score tokens: 'target' or a causal LM by name"),
        Param("heads", int, None, "evaluator heads (of one layer)", min=1),
        Param("window", int, None, "last queries whose attention scores the context", min=1),
        Param("pool", int, None, "max-pooling width over neighbouring tokens' scores (1: none)", min=1),
        Param("probe_tokens", int, None, "filler tokens of each needle probe that finds the heads", min=16),
        Param("context_window", int, None, "most tokens the scoring forward reads (longer contexts: their end)",
              min=1),
    )

    def compress(self, text, budget):
        lm = load_compressor(self.args["compressor"], text, self.args["context_window"])
        found = find_evaluator_heads(lm, self.args["heads"], self.args["probe_tokens"])
        ids, offsets = lm.encode(text.context)
        question = lm.encode(" " + " ".join(text.questions))[0] if text.questions else []
        limit = max(1, lm.window - len(question))
        start = max(0, len(ids) - limit)  # a context longer than the scoring window is read from its end
        scored = ids[start:] + question
        probs = head_attention(lm, scored, [found.layer], self.args["window"])[found.layer]  # (Hq, w, L)
        score = probs[list(found.heads)].sum((0, 1))[: len(ids) - start].float()
        if self.args["pool"] > 1:
            k = self.args["pool"]
            score = F.max_pool1d(score[None, None], k, stride=1, padding=k // 2)[0, 0][: len(ids) - start]
        scores = [float("-inf")] * start + score.tolist() if start else score.tolist()
        if lm.tokenizer is not text.tokenizer:  # units are the target tokenizer's; map scores by characters
            scores, offsets = _rescore(text, offsets, scores)
        spans = token_spans(offsets, len(text.context))
        self._ehpc = {"ehpc_layer": float(found.layer), "ehpc_heads": float(len(found.heads))}
        chosen = select_within_budget(text.context, spans, scores, text.tokenizer, budget)
        return "".join(text.context[spans[i][0]:spans[i][1]] for i in chosen)

    def sample_stats(self) -> dict[str, float]:
        return {**super().sample_stats(), **getattr(self, "_ehpc", {})}


def _rescore(text, offsets, scores: list[float]) -> tuple[list[float], list[tuple[int, int]]]:
    """Scores of the compressor's tokens carried to the target tokenizer's, and the target tokens'
    offsets: each target token takes the highest score among the compressor tokens it overlaps."""
    enc = text.tokenizer(text.context, add_special_tokens=False, return_offsets_mapping=True)
    target = [tuple(o) for o in enc["offset_mapping"]]
    out = []
    for s, e in target:
        hits = [sc for (a, b), sc in zip(offsets, scores) if a < max(e, s + 1) and b > s]
        out.append(max(hits) if hits else float("-inf"))
    return out, target
