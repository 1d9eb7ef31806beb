"""AttentionRAG: the question's focus token chooses, by its attention, the sentences to keep.

Fang et al., "AttentionRAG: Attention-Guided Context Pruning in Retrieval-Augmented Generation",
2025 (arXiv:2503.10720). No official implementation was found to read; this follows the paper:

1. *Attention focus*: the question is rewritten as the beginning of its answer (an *answer hint
   prefix*, e.g. "Where was Ada born?" → "Ada was born in"), so that the next token to predict —
   the *focus token*, here the last position of ``chunk + question + hint`` — carries the
   question's semantic focus. ``hint=generate`` has the compressor LM write the prefix from a
   few-shot prompt (greedy, at most ``hint_tokens`` tokens, one line); ``hint=template`` uses the
   fixed ``"Answer:"`` cue.
2. The context is cut into chunks of about ``chunk_tokens`` compressor tokens (whole sentences);
   each chunk is read with the question and hint after it, and the focus token's attention over
   the chunk's tokens (mean over heads and layers, :mod:`.attend`) is normalised per chunk
   (a uniform spread scores 1 everywhere, so chunks of different lengths compare).
3. Sentences are kept by their most-attended token (the paper keeps the sentences that contain
   the top-attended tokens), the best that fit the budget in the target tokenizer, in order.

The method needs the question; without ``--query-aware`` it refuses (the paper has no
question-agnostic setting: the focus token *is* the question's).
"""

from __future__ import annotations

import torch

from ...errors import UserError
from ...params import Param
from .attend import attention_pass
from .base import PromptCompressor
from .llmlingua import Tokens
from .lm import CompressorLM, load_compressor
from .selective_context import COMPRESSOR, WINDOW
from .units import owner_of, render, select_within_budget, sentence_spans

HINT_PROMPT = (
    "Rewrite each question as the beginning of its answer, leaving the answer out.\n"
    "Question: What is the capital of France?\nAnswer beginning: The capital of France is\n"
    "Question: Who wrote the novel Hamlet?\nAnswer beginning: Hamlet was written by\n"
    "Question: {question}\nAnswer beginning:"
)
TEMPLATE_HINT = "Answer:"


def answer_hint(lm: CompressorLM, question: str, mode: str, max_tokens: int) -> str:
    """The answer hint prefix that follows the question (falls back to the template cue)."""
    if mode == "generate":
        hint = lm.generate(HINT_PROMPT.format(question=question.strip()), max_tokens, stop="\n").strip()
        if hint:
            return hint
    return TEMPLATE_HINT


class AttentionRAG(PromptCompressor):
    name = "attentionrag"
    family = "prompt_compression"
    paper = ("Fang et al., AttentionRAG: Attention-Guided Context Pruning in Retrieval-Augmented Generation, "
             "2025 (arXiv:2503.10720)")
    summary = ("the question as an answer-hint prefix; its focus token's attention picks the sentences "
               "(needs --query-aware)")
    defaults = {"compressor": "target", "window": 4096, "chunk_tokens": 512, "hint": "generate", "hint_tokens": 24}
    params = (
        COMPRESSOR, WINDOW,
        Param("chunk_tokens", int, None, "compressor tokens per chunk read with the question (whole sentences)", min=1),
        Param("hint", str, None, "answer hint prefix: generate (the compressor writes it) or template ('Answer:')",
              choices=("generate", "template")),
        Param("hint_tokens", int, None, "most tokens of a generated hint", min=1),
    )

    def compress(self, text, budget):
        if not text.questions:
            raise UserError(
                "attentionrag is question-aware: its focus token is the question's answer position, and the text "
                "stage sees the question only with --query-aware. Fix: add --query-aware, or use a question-agnostic "
                "method (llmlingua, dspc, selective_context).")
        lm = load_compressor(self.args["compressor"], text, self.args["window"])
        question = "\n".join(text.questions)
        hint = answer_hint(lm, question, self.args["hint"], self.args["hint_tokens"])
        tail, _ = lm.encode("\n\n" + question.strip() + "\n" + hint)
        tokens = Tokens(lm, text.context, self.args["chunk_tokens"])
        attention = self.focus_attention(lm, tokens, tail)
        sentences = sentence_spans(text.context)
        scores = [float("-inf")] * len(sentences)
        for t, s in enumerate(owner_of(sentences, tokens.spans)):
            scores[s] = max(scores[s], float(attention[t]))
        chosen = select_within_budget(text.context, sentences, scores, text.tokenizer, budget)
        return render(text.context, sentences, chosen)

    def focus_attention(self, lm: CompressorLM, tokens: Tokens, tail: list[int]) -> torch.Tensor:
        """Per context token: the focus token's attention to it in its chunk's forward, normalised
        so that a uniform spread over the chunk scores 1."""
        out = torch.zeros(len(tokens.ids))
        room = max(1, lm.window - len(tail) - 1)
        for c in range(len(tokens.chunks)):
            members = tokens.chunk_tokens(c)
            for k in range(0, len(members), room):  # a chunk longer than the window is read in pieces
                piece = members[k: k + room]
                p = attention_pass(lm, [tokens.ids[t] for t in piece] + tail, focus=True)
                a = p.focus[: len(piece)]
                out[piece] = a * len(piece) / a.sum().clamp_min(1e-12)
        return out
