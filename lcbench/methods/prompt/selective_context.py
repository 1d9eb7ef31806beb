"""Selective Context: drop the lexical units that carry the least self-information.

Li et al., "Compressing Context to Enhance Inference Efficiency of Large Language Models",
EMNLP 2023 (arXiv:2310.06201). Each token's self-information ``−log p(x_t | x_<t)`` comes from a
small causal LM; a unit's is the sum over its tokens; the highest units are kept (the paper
filters by a percentile of unit self-information; lcbench keeps the top units that fit the
token budget, which is that percentile chosen to meet ``--ratio``). Units: ``token``, ``phrase``
(punctuation-delimited runs of at most ``phrase_words`` words, standing in for the paper's spaCy
noun phrases) or ``sentence``.
"""

from __future__ import annotations

from ...params import Param
from .base import PromptCompressor
from .lm import load_compressor
from .units import owner_of, phrase_spans, select_within_budget, sentence_spans, token_spans, render

COMPRESSOR = Param("compressor", str, None, "causal LM that scores tokens: 'target' (the evaluated model), "
                   "a registered model name, a hub id or a local folder")
WINDOW = Param("window", int, None, "most tokens the compressor conditions on at once", min=1)


def unit_spans(text: str, unit: str, token_units: list[tuple[int, int]], phrase_words: int) -> list[tuple[int, int]]:
    if unit == "token":
        return token_units
    return sentence_spans(text) if unit == "sentence" else phrase_spans(text, phrase_words)


class SelectiveContext(PromptCompressor):
    name = "selective_context"
    family = "prompt_compression"
    paper = ("Li et al., Compressing Context to Enhance Inference Efficiency of Large Language Models, "
             "EMNLP 2023 (arXiv:2310.06201)")
    summary = "drop the phrases/sentences/tokens with the least self-information under a small LM"
    defaults = {"compressor": "target", "window": 4096, "unit": "phrase", "phrase_words": 4}
    params = (
        COMPRESSOR, WINDOW,
        Param("unit", str, None, "lexical unit that is kept or dropped", choices=("token", "phrase", "sentence")),
        Param("phrase_words", int, None, "most words per phrase unit", min=1),
    )

    def compress(self, text, budget):
        lm = load_compressor(self.args["compressor"], text, self.args["window"])
        ids, offsets = lm.encode(text.context)
        info = lm.surprisal(ids)
        tokens = token_spans(offsets, len(text.context))
        units = unit_spans(text.context, self.args["unit"], tokens, self.args["phrase_words"])
        scores = [0.0] * len(units)
        for t, u in enumerate(owner_of(units, tokens)):
            scores[u] += float(info[t])
        chosen = select_within_budget(text.context, units, scores, text.tokenizer, budget)
        return render(text.context, units, chosen)
