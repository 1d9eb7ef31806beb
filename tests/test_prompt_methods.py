"""The newer prompt compressors (dspc, attentionrag, longcodezip, perception): token budgets in the
target tokenizer, ratio-0 identity, refusals without the question, the attention readout they
share, and what each paper promises on constructed inputs."""

from __future__ import annotations

import itertools
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

from lcbench.errors import UserError
from lcbench.methods.base import TextInput
from lcbench.methods.prompt import dspc as dspc_mod
from lcbench.methods.prompt import longcodezip as lcz
from lcbench.methods.prompt.attend import attention_pass
from lcbench.methods.prompt.attentionrag import TEMPLATE_HINT, answer_hint
from lcbench.methods.prompt.llmlingua import iterative_scores
from lcbench.methods.prompt.lm import CompressorLM
from lcbench.methods.prompt.perception import linear_deltas, semi_guided_scores
from lcbench.methods.prompt.semantic import Semantic, neighbour_similarity, topic_chunks
from lcbench.methods.prompt.units import count_tokens, sentence_spans
from lcbench.models.tiny import tiny_llama
from test_prompt_compression import NEEDLE, QUESTION, compress, run, within

FAST = {"dspc": {}, "attentionrag": {"hint_tokens": 8},
        "perception": {"guiding_questions": 1, "guide_tokens": 12, "chunk_tokens": 96}}
AWARE = ("attentionrag", "longcodezip", "perception")


@pytest.fixture(scope="module")
def tok(tiny):
    return tiny[1]


@pytest.fixture(scope="module")
def model(tiny):
    return tiny[0]


@pytest.fixture(scope="module")
def essay(shared_data):
    text = (shared_data / "niah" / "PaulGrahamEssays" / "apple.txt").read_text()[:2000]
    cut = text.index(". ", 1000) + 2
    return text[:cut] + NEEDLE + text[cut:]


def make_code(n: int = 8) -> str:
    """Python source: an import, ``n`` functions of 8–14 lines, a class with two methods."""
    parts = ["import math\n\n"]
    for i in range(n):
        body = "".join(f"    x{j} = x{j - 1} * {i + j} + {j}\n" for j in range(1, 3 + 2 * (i % 4)))
        parts.append(f"def func_{i}(a, b):\n    # helper number {i}\n    x0 = a + {i}\n{body}"
                     f"    if b > {i}:\n        x0 = x0 - b\n    return x0\n\n")
    parts.append("class Box:\n    def __init__(self, v):\n        self.v = v\n\n    def get(self):\n        return self.v\n")
    return "".join(parts)


CODE = make_code()
CODE_QUESTION = "Complete the function that adds func_3 to the value of a Box."


# --- budgets and the ratio-0 identity -------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("name", ["dspc", "attentionrag", "perception"])
def test_text_methods_hit_the_requested_token_ratio(name, ratio, essay, tok, model):
    out, stats = compress(name, ratio, essay, tok, model, questions=[QUESTION], **FAST[name])
    assert stats["text_tokens_original"] == count_tokens(tok, essay)
    assert stats["text_tokens_kept"] == count_tokens(tok, out)
    assert within(stats, ratio), stats


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_longcodezip_hits_the_requested_ratio_within_its_tolerance(ratio, tok, model):
    out, stats = compress("longcodezip", ratio, CODE, tok, model, questions=[CODE_QUESTION])
    assert within(stats, ratio, above=lcz.LongCodeZip.tolerance), stats  # whole functions and blocks


def test_longcodezip_on_text_without_definitions_meets_the_budget(essay, tok, model):
    out, stats = compress("longcodezip", 0.5, essay, tok, model, questions=[QUESTION])
    assert within(stats, 0.5, above=lcz.LongCodeZip.tolerance), stats  # one chunk: its lines fill the budget


def test_dspc_query_agnostic_hits_the_ratio(essay, tok, model):
    out, stats = compress("dspc", 0.5, essay, tok, model)
    assert within(stats, 0.5), stats


@pytest.mark.parametrize("name", ["dspc", "attentionrag", "longcodezip", "perception", "semantic", "scope"])
def test_ratio_zero_returns_the_context_unchanged(name, essay, tok, model):
    out, stats = compress(name, 0.0, essay, tok, model, questions=[QUESTION])
    assert out == essay and stats == {}


@pytest.mark.parametrize("name", AWARE)
def test_question_aware_methods_refuse_without_the_question(name, essay, tok, model):
    with pytest.raises(UserError, match="--query-aware"):
        compress(name, 0.5, essay, tok, model)


# --- the attention readout (attend.py) -----------------------------------------------------
def test_attention_pass_matches_eager_attention(tok, model):
    ids = tok("The quick brown fox jumps over the lazy dog. A needle hides in a haystack.", add_special_tokens=False)["input_ids"]
    p = attention_pass(CompressorLM(model, tok, "tiny", 4096), ids, received=True, focus=True)
    assert model.config._attn_implementation == "lcbench"  # restored after the readout
    eager = tiny_llama(attn_implementation="eager")  # same seed: same weights
    with torch.no_grad():
        out = eager(input_ids=torch.tensor([ids]), output_attentions=True)
    att = torch.stack(out.attentions)[:, 0]  # (layers, heads, L, L)
    assert torch.allclose(p.focus, att[:, :, -1].mean((0, 1)), atol=1e-5)
    assert torch.allclose(p.received, att.sum(2).mean((0, 1)) / torch.arange(len(ids), 0, -1), atol=1e-5)
    logp = out.logits[0].log_softmax(-1)
    assert torch.allclose(p.surprisal[1:], -logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0], atol=1e-4)


# --- DSPC ------------------------------------------------------------------------------------
RELEVANT = ["The lighthouse keeper in Lisbon counted ships every night. ",
            "Ships passing the Lisbon lighthouse were counted by its keeper. "]
FILLER = ["A red apple fell from the tall tree in autumn. ", "Children played football in the sunny park. ",
          "The bakery sold warm bread before dawn. ", "Rain kept the farmers indoors all week. "]


def test_dspc_stage_one_drops_the_sentences_least_tfidf_similar_to_the_question(tok):
    context = FILLER[0] + RELEVANT[0] + FILLER[1] + FILLER[2] + RELEVANT[1] + FILLER[3]
    question = "Who counted the ships at the Lisbon lighthouse?"
    scores = dspc_mod.tfidf_similarity([context[s:e] for s, e in sentence_spans(context)], question)
    assert min(scores[1], scores[4]) > max(scores[i] for i in (0, 2, 3, 5))
    kept = dspc_mod.sentence_filter(context, question, tok, count_tokens(tok, RELEVANT[0] + RELEVANT[1]))
    assert kept == RELEVANT[0] + RELEVANT[1]


def test_dspc_positional_importance_keeps_the_ends(essay, tok, model):
    out, stats = compress("dspc", 0.5, essay, tok, model, coarse_factor=3.0, w_attention=0.0, w_loss=0.0, w_position=1.0)
    assert within(stats, 0.5)
    head = next(i for i in range(len(out)) if out[i] != essay[i])  # the kept text is a head and a tail
    assert essay.endswith(out[head:]) and out[:head] == essay[:head]


def test_dspc_reference_loss_of_the_same_model_is_its_own_loss(essay, tok, model):
    stage = dspc_mod.DSPC(ratio=0.5, reference="target")
    text = TextInput(essay[:600], [], tok, False, model=model)
    lm = CompressorLM(model, tok, "tiny", 4096)
    ids, offsets = lm.encode(text.context)
    mapped = stage.reference_loss(text, text.context, offsets)
    assert torch.allclose(mapped[1:], lm.surprisal(ids)[1:], atol=1e-4)
    assert torch.allclose(stage.token_scores(text, lm, ids, offsets, text.context),
                          dspc_mod.minmax(attention_pass(lm, ids, received=True).received)
                          + 0.5 * dspc_mod.minmax(dspc_mod.position_importance(len(ids))), atol=1e-4)  # the loss term is 0


def test_dspc_with_a_second_model(tmp_path, essay, tok, model):
    tiny_llama(seed=1).save_pretrained(tmp_path / "ref")
    tok.save_pretrained(tmp_path / "ref")
    out, stats = compress("dspc", 0.5, essay, tok, model, reference=str(tmp_path / "ref"))
    assert within(stats, 0.5)


# --- AttentionRAG ----------------------------------------------------------------------------
def test_attentionrag_keeps_the_sentence_its_focus_token_attends_most(tok, model):
    context = "".join(FILLER + RELEVANT)
    lm = CompressorLM(model, tok, "tiny", 4096)
    ids, offsets = lm.encode(context)
    tail, _ = lm.encode("\n\n" + QUESTION + "\n" + TEMPLATE_HINT)
    eager = tiny_llama(attn_implementation="eager")
    with torch.no_grad():
        att = torch.stack(eager(input_ids=torch.tensor([ids + tail]), output_attentions=True).attentions)
    focus = att[:, 0, :, -1, : len(ids)].mean((0, 1))  # the focus token over the context, as the paper reads it
    sentences = sentence_spans(context)
    best = max(range(len(sentences)), key=lambda k: max(float(focus[t]) for t, (s, _) in enumerate(offsets)
                                                        if sentences[k][0] <= s < sentences[k][1]))
    out, stats = compress("attentionrag", 0.6, context, tok, model, questions=[QUESTION], hint="template",
                          chunk_tokens=4096)
    assert context[slice(*sentences[best])] in out
    assert "".join(context[s:e] for s, e in sentences if context[s:e] in out) == out  # whole sentences only


def test_attentionrag_hint_is_one_generated_line_or_the_template(tok, model):
    lm = CompressorLM(model, tok, "tiny", 4096)
    hint = answer_hint(lm, QUESTION, "generate", 8)
    assert "\n" not in hint and hint
    assert answer_hint(lm, QUESTION, "template", 8) == TEMPLATE_HINT


# --- LongCodeZip -----------------------------------------------------------------------------
def test_function_spans_split_at_definitions():
    spans = lcz.function_spans(CODE, "python")
    assert "".join(CODE[s:e] for s, e in spans) == CODE
    heads = [CODE[s:e].lstrip().split("\n")[0] for s, e in spans]
    assert heads[0] == "import math" and heads[1] == "def func_0(a, b):"
    assert heads[-3:] == ["class Box:", "def __init__(self, v):", "def get(self):"]  # methods split from the class


def test_knapsack_is_optimal():
    rng = random.Random(0)
    for _ in range(30):
        n = rng.randint(1, 8)
        w = [rng.randint(1, 12) for _ in range(n)]
        v = [rng.uniform(-1, 5) for _ in range(n)]
        cap = rng.randint(0, 30)
        best = max((sum(v[i] for i in c) for k in range(n + 1) for c in itertools.combinations(range(n), k)
                    if sum(w[i] for i in c) <= cap), default=0.0)
        got = lcz.knapsack(w, v, cap)
        assert sum(w[i] for i in got) <= cap and sum(v[i] for i in got) == pytest.approx(max(best, 0.0))


def test_longcodezip_small_functions_are_kept_whole_in_rank_order(tok, model):
    out, stats = compress("longcodezip", 0.5, CODE, tok, model, questions=[CODE_QUESTION], min_lines=100)
    spans = lcz.function_spans(CODE, "python")
    kept = [CODE[s:e] for s, e in spans if CODE[s:e] in out]
    assert "".join(kept) == out  # whole functions, in their original order


def test_longcodezip_keeps_whole_blocks_and_every_kept_functions_definition(tok, model, monkeypatch):
    chosen = []
    real = lcz.knapsack
    monkeypatch.setattr(lcz, "knapsack", lambda *a: chosen.append(real(*a)) or chosen[-1])
    out, stats = compress("longcodezip", 0.6, CODE, tok, model, questions=[CODE_QUESTION], spike_k=0.0)
    assert chosen  # the fine stage ran a knapsack
    lines, pos = CODE.split("\n"), 0
    for line in out.rstrip("\n").split("\n"):  # every kept line is a line of the code, in order
        pos = lines.index(line, pos) + 1
    functions = [CODE[s:e].split("\n") for s, e in lcz.function_spans(CODE, "python")]
    kept_lines = set(out.split("\n"))
    for k, body in enumerate(functions):
        others = {line for j, f in enumerate(functions) if j != k for line in f}
        unique = [line for line in body if line.strip() and line not in others]
        if body[0].startswith("def ") and kept_lines & set(unique):
            assert body[0] in kept_lines  # a kept function keeps its definition block


# --- Perception ------------------------------------------------------------------------------
def test_dual_slopes_fall_and_rise_linearly():
    assert linear_deltas(5, 0.2) == pytest.approx([0.2, 0.1, 0.0, -0.1, -0.2]) and linear_deltas(1, 0.2) == [0.0]


@pytest.mark.parametrize("open_book", [0.0, 1.0])
def test_semi_guided_pass_at_the_open_book_extremes_is_llmlingua(open_book, essay, tok, model):
    """Open-book share 0: LLMLingua's plain iterative pass; share 1: LongLLMLingua's contrastive pass."""
    lm = CompressorLM(model, tok, "tiny", 4096)
    ids = tok(essay, add_special_tokens=False)["input_ids"][:128]
    question = tok(QUESTION, add_special_tokens=False)["input_ids"]
    _, kept = semi_guided_scores(lm, ids, list(range(128)), [0.5, 0.5], [open_book] * 2, 64, question)
    _, expected = iterative_scores(lm, ids, list(range(128)), [0.5] * 128, 64, question if open_book else None)
    assert kept[1:] == expected[1:]  # the first token is unconditioned (inf) in both


def test_perception_reorders_chunks_by_relevance(essay, tok, model):
    out, stats = compress("perception", 0.3, essay, tok, model, questions=[QUESTION], reorder="sort", **FAST["perception"])
    original, _ = compress("perception", 0.3, essay, tok, model, questions=[QUESTION], reorder="original", **FAST["perception"])
    assert within(stats, 0.3) and out != original  # the same retrieval, chunks in rank order


# --- Semantic compression -------------------------------------------------------------------
APPLES = ["The apple orchard grows red apple trees. ", "Red apple trees fill the apple orchard. ",
          "Every apple tree in the orchard is red. ", "The orchard sells red apple juice. "]
SHIPS = ["Ships sail past the harbour lighthouse. ", "The harbour lighthouse guides the ships. ",
         "Harbour ships follow the lighthouse light. ", "The lighthouse keeper counts harbour ships. "]


def test_semantic_chunks_are_cut_at_the_topic_boundary(tok):
    context = "".join(APPLES[:3] + SHIPS[:4] + APPLES[3:])
    sentences = sentence_spans(context)
    pieces = [context[s:e] for s, e in sentences]
    sizes = [count_tokens(tok, p) for p in pieces]
    chunks = topic_chunks(sentences, sizes, neighbour_similarity(pieces, ""), sum(sizes[:3]))
    assert "".join(context[s:e] for s, e in chunks) == context
    assert chunks[0] == (0, sentences[2][1])  # the apples end the first chunk, not its size
    assert context[slice(*chunks[1])] == "".join(SHIPS[:4])


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_semantic_summaries_meet_the_budget(ratio, tok, model):
    text = "".join(APPLES + SHIPS) * 2
    out, stats = compress("semantic", ratio, text, tok, model, chunk_tokens=48)
    assert within(stats, ratio, above=Semantic.tolerance), stats  # the random generator never stops early


def test_semantic_rewrites_each_chunk_with_a_seq2seq_generator_in_order(tmp_path, tok, model, monkeypatch):
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    BartForConditionalGeneration(BartConfig(
        vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=512,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.eos_token_id, forced_eos_token_id=None)).save_pretrained(tmp_path / "bart")
    tok.save_pretrained(tmp_path / "bart")
    seen, real = [], Semantic.summarise
    monkeypatch.setattr(Semantic, "summarise", lambda self, t, chunk, n: seen.append((chunk, real(self, t, chunk, n)))
                        or seen[-1][1])
    text = "".join(APPLES + SHIPS)
    out, stats = compress("semantic", 0.5, text, tok, model, generator=str(tmp_path / "bart"), chunk_tokens=30)
    assert "".join(chunk for chunk, _ in seen) == text and len(seen) >= 2  # every chunk rewritten once, in order
    assert out.startswith(seen[0][1].strip()[:5]) and within(stats, 0.5, above=Semantic.tolerance)


# --- in the engine and from the command line ------------------------------------------------
@pytest.mark.parametrize("name", ["dspc", "attentionrag", "longcodezip", "perception", "semantic", "scope"])
def test_engine_ratio_zero_is_token_identical_to_full(name, model, tok, sample_qa):
    full = run(model, tok, sample_qa, "full", 0.0, query_aware=True)
    recs = run(model, tok, sample_qa, name, 0.0, query_aware=True)
    assert recs[0]["_ids"] == full[0]["_ids"]


@pytest.fixture(scope="module")
def sample_qa(essay):
    from lcbench.tasks.sample import Sample, Turn

    return Sample("s0", essay, [Turn(question=QUESTION + " Answer:", answers=["7421"], max_new_tokens=4, scorer="x")],
                  chat=False)


def test_cli_run_of_a_question_aware_method(tmp_path):
    exe = shutil.which("lcbench")
    cmd = [exe] if exe else [sys.executable, "-m", "lcbench.cli"]
    proc = subprocess.run(cmd + ["run", "--model", "tiny-random-llama", "--method", "attentionrag", "--ratio", "0.5",
                                 "--task", "niah", "--task-args", "lengths=1200,depths=50,max_new_tokens=2,haystack=filler",
                                 "--limit", "1", "--device", "cpu", "--query-aware", "--output-path", str(tmp_path)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and len(list(tmp_path.glob("*/samples.jsonl"))) == 1
    proc = subprocess.run(cmd + ["run", "--model", "tiny-random-llama", "--method", "attentionrag", "--ratio", "0.5",
                                 "--task", "niah", "--limit", "1", "--device", "cpu", "--output-path", str(tmp_path / "no")],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"}, timeout=300)
    assert proc.returncode == 2 and "--query-aware" in proc.stderr and "Traceback" not in proc.stderr
