"""Truncation, the baseline every prompt-compression paper compares with.

``side=middle`` is LongBench's truncation (THUDM/LongBench ``pred.py``: keep the first and the last
half of the budget in tokens, cut the middle); ``side=head`` cuts the beginning (keeps the end),
``side=tail`` cuts the end (keeps the beginning). Tokens are the target model's; the kept token
ranges are decoded, as LongBench does.
"""

from __future__ import annotations

from ...params import Param
from .base import PromptCompressor
from .units import count_tokens


class Truncate(PromptCompressor):
    name = "truncate"
    family = "prompt_compression"
    paper = ("Bai et al., LongBench: A Bilingual, Multitask Benchmark for Long Context Understanding, "
             "ACL 2024 (arXiv:2308.14508), pred.py truncation")
    summary = "cut the middle (LongBench), the head or the tail of the context in target tokens"
    defaults = {"side": "middle"}
    params = (Param("side", str, None, "which part is cut: middle (LongBench), head or tail",
                    choices=("middle", "head", "tail")),)

    def compress(self, text, budget):
        tok = text.tokenizer
        ids = tok(text.context, add_special_tokens=False)["input_ids"]
        for keep in range(budget, 0, -1):  # decoding can merge or split tokens: re-check the count
            head = {"middle": keep // 2, "head": 0, "tail": keep}[self.args["side"]]
            tail = keep - head
            out = tok.decode(ids[:head]) + (tok.decode(ids[len(ids) - tail:]) if tail else "")
            if count_tokens(tok, out) <= budget:
                return out
        return ""
