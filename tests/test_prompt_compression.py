"""Prompt compression: budgets in the target tokenizer, ratio-0 identity, each method's mechanism,
the compressor LM's surprisal, and the methods inside the engine (alone and chained)."""

from __future__ import annotations

import sys

import pytest
import torch

from lcbench.engine import runner
from lcbench.engine.runner import Engine, EngineConfig
from lcbench.errors import UserError
from lcbench.methods.base import TextInput
from lcbench.methods.chain import Chain, resolve_chain
from lcbench.methods.prompt.lm import CompressorLM, load_compressor
from lcbench.methods.prompt.llmlingua import iterative_scores
from lcbench.methods.prompt.units import (chunk_spans, count_tokens, phrase_spans, select_within_budget, sentence_spans,
                                          token_spans)
from lcbench.methods.registry import METHODS
from lcbench.models.tiny import tiny_llama
from lcbench.tasks.sample import Sample, Turn

torch.set_num_threads(1)  # steadier than 2 on a shared 2-core machine
NEEDLE = "The special magic number for Lisbon is 7421. "
QUESTION = "What is the special magic number for Lisbon?"
LM_METHODS = ("selective_context", "llmlingua", "longllmlingua")
PROMPT_METHODS = ("truncate", "extractive") + LM_METHODS


@pytest.fixture(scope="module")
def tok(tiny):
    return tiny[1]


@pytest.fixture(scope="module")
def model(tiny):
    return tiny[0]  # lcbench attention, as the engine hands it over: the compressor runs outside its state


@pytest.fixture(scope="module")
def essay(shared_data):
    text = (shared_data / "niah" / "PaulGrahamEssays" / "apple.txt").read_text()[:2400]
    cut = text.index(". ", 1200) + 2
    return text[:cut] + NEEDLE + text[cut:]


def within(stats, ratio, above=0.02) -> bool:
    """The achieved token ratio is the requested one (up to rounding the budget) or at most ``above`` more."""
    return ratio - 1 / stats["text_tokens_original"] <= stats["text_ratio"] <= ratio + above


def compress(name, ratio, context, tok, target, questions=(), **args):
    stage = METHODS.get(name)(ratio=ratio, **args)
    stage.begin_sample()
    out = stage.compress_text(TextInput(context, list(questions), tok, bool(questions), model=target))
    return out.context, stage.sample_stats()


# --- units and the budget -------------------------------------------------------------------
def test_units_partition_the_text(essay, tok):
    for spans in (sentence_spans(essay), phrase_spans(essay, 4)):
        assert "".join(essay[s:e] for s, e in spans) == essay
    assert all(len(essay[s:e].split()) <= 4 for s, e in phrase_spans(essay, 4))
    enc = tok(essay, add_special_tokens=False, return_offsets_mapping=True)
    spans = token_spans(enc["offset_mapping"], len(essay))
    assert len(spans) == len(enc["input_ids"]) and "".join(essay[s:e] for s, e in spans) == essay
    assert sentence_spans("One. Two! Three?\nFour") == [(0, 5), (5, 10), (10, 17), (17, 21)]


def test_select_within_budget_keeps_the_best_in_order(tok):
    text = "aa. bb. cc. dd. "
    spans = sentence_spans(text)
    chosen = select_within_budget(text, spans, [1.0, 4.0, float("-inf"), 3.0], tok, budget=count_tokens(tok, "bb. dd. "))
    assert chosen == [1, 3]
    assert select_within_budget(text, spans, [1.0, 4.0, 2.0, 3.0], tok, 100, keep_order=[3, 1, 0, 2]) == [3, 1, 0, 2]


@pytest.mark.parametrize("name", PROMPT_METHODS)
@pytest.mark.parametrize("ratio", [0.3, 0.7])
def test_methods_hit_the_requested_token_ratio(name, ratio, essay, tok, model):
    out, stats = compress(name, ratio, essay, tok, model, questions=[QUESTION])
    n = count_tokens(tok, essay)
    assert stats["text_tokens_original"] == n
    assert stats["text_tokens_kept"] == count_tokens(tok, out)
    assert within(stats, ratio), stats  # counted in the target tokenizer


@pytest.mark.parametrize("name", PROMPT_METHODS + ("llmlingua2",))
def test_ratio_zero_returns_the_context_unchanged(name, essay, tok, model):
    out, stats = compress(name, 0.0, essay, tok, model, questions=[QUESTION])
    assert out == essay and stats == {}


# --- truncate -------------------------------------------------------------------------------
def test_truncate_sides_follow_longbench(essay, tok, model):
    ids = tok(essay, add_special_tokens=False)["input_ids"]
    keep = round(len(ids) * 0.5)
    middle, _ = compress("truncate", 0.5, essay, tok, model)
    assert middle == tok.decode(ids[: keep // 2]) + tok.decode(ids[len(ids) - (keep - keep // 2):])
    head_cut, _ = compress("truncate", 0.5, essay, tok, model, side="head")
    tail_cut, _ = compress("truncate", 0.5, essay, tok, model, side="tail")
    assert essay.endswith(head_cut) and essay.startswith(tail_cut)


def wordpiece_tokenizer(corpus: str):
    """A small BERT WordPiece tokenizer trained offline on ``corpus`` (for tiny encoder models)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertTokenizerFast

    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=False)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.train_from_iterator([corpus], trainers.WordPieceTrainer(vocab_size=400, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    return BertTokenizerFast(tokenizer_object=wp, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]", do_lower_case=False)


# --- extractive -----------------------------------------------------------------------------
def test_bm25_keeps_the_sentence_that_answers(essay, tok, model):
    out, stats = compress("extractive", 0.9, essay, tok, model, questions=[QUESTION])
    assert NEEDLE.strip() in out and stats["text_ratio"] >= 0.9


def test_extractive_chunks_and_query_agnostic_centrality(essay, tok, model):
    out, stats = compress("extractive", 0.5, essay, tok, model, chunk_words=40)
    assert within(stats, 0.5, 0.06)  # whole chunks of ~100 tokens: coarser than the budget
    sentences = sentence_spans(essay)
    chunks = chunk_spans(essay, sentences, [len(essay[s:e].split()) for s, e in sentences], 40)
    assert "".join(essay[s:e] for s, e in chunks if essay[s:e] in out) == out  # whole chunks, in order


def test_extractive_with_an_embedding_model(tmp_path, essay, tok, model):
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertConfig, BertModel

    bert_tok = wordpiece_tokenizer(essay)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(bert_tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=256)).save_pretrained(tmp_path / "bert")
    bert_tok.save_pretrained(tmp_path / "bert")
    SentenceTransformer(modules=[Transformer(str(tmp_path / "bert")), Pooling(32)], device="cpu").save(str(tmp_path / "st"))
    out, stats = compress("extractive", 0.6, essay, tok, model, questions=[QUESTION], embedding_model=str(tmp_path / "st"))
    assert within(stats, 0.6, 0.02)


def test_extractive_embedding_model_missing_package_is_a_clear_error(monkeypatch, essay, tok, model):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    with pytest.raises(UserError, match=r"pip install 'lcbench\[embeddings\]'"):
        compress("extractive", 0.5, essay, tok, model, embedding_model="some/model")


# --- the compressor LM ----------------------------------------------------------------------
def test_surprisal_equals_one_full_forward(essay, tok, model):
    lm = load_compressor("target", TextInput(essay, [], tok, False, model=model), window=4096)
    ids = tok(essay, add_special_tokens=False)["input_ids"][:700]  # several cached chunks
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
    expected = -logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    got = lm.surprisal(ids)
    assert got[0] == float("inf")  # no BOS in the tiny tokenizer: the first token is unconditioned
    assert torch.allclose(got[1:], expected, atol=1e-4)


def test_surprisal_restarts_past_the_window(essay, tok, model):
    lm = CompressorLM(model, tok, "tiny", window=512)
    ids = tok(essay, add_special_tokens=False)["input_ids"][:1200]
    got = lm.surprisal(ids)
    assert got.shape == (1200,) and torch.isfinite(got[1:]).all()
    assert torch.allclose(got[:512], CompressorLM(model, tok, "tiny", window=4096).surprisal(ids[:512]), atol=1e-4)


def test_compressor_by_path_and_unknown_name(tmp_path, essay, tok, model):
    tiny_llama(seed=1).save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    out, stats = compress("selective_context", 0.5, essay, tok, model, compressor=str(tmp_path / "lm"))
    assert within(stats, 0.5, 0.02)
    with pytest.raises(UserError, match="compressor"):
        compress("selective_context", 0.5, essay, tok, model, compressor=str(tmp_path / "missing"))


# --- LLMLingua / LongLLMLingua / Selective Context mechanics --------------------------------
def test_iterative_pass_keeping_everything_is_plain_surprisal(essay, tok, model):
    lm = CompressorLM(model, tok, "tiny", window=4096)
    ids = tok(essay, add_special_tokens=False)["input_ids"][:300]
    scores, kept = iterative_scores(lm, ids, list(range(300)), [1.0] * 300, segment_size=64)
    assert all(kept)
    assert torch.allclose(torch.tensor(scores[1:]), lm.surprisal(ids)[1:], atol=1e-4)


def test_iterative_pass_conditions_on_the_compressed_text(essay, tok, model):
    lm = CompressorLM(model, tok, "tiny", window=4096)
    ids = tok(essay, add_special_tokens=False)["input_ids"][:128]
    scores, kept = iterative_scores(lm, ids, list(range(128)), [0.5] * 128, segment_size=64)
    assert sum(kept[:64]) == 32 and sum(kept[64:]) == 32
    kept_ids = [i for i, k in zip(ids[:64], kept[:64]) if k]
    second = lm.session(kept_ids).score(ids[64:])  # the second segment sees only what the first kept
    assert torch.allclose(torch.tensor(scores[64:]), second, atol=1e-4)


def test_contrastive_scores_are_question_explained_surprisal(essay, tok, model):
    lm = CompressorLM(model, tok, "tiny", window=4096)
    ids = tok(essay, add_special_tokens=False)["input_ids"][:100]
    question = tok(QUESTION, add_special_tokens=False)["input_ids"]
    scores, _ = iterative_scores(lm, ids, list(range(100)), [1.0] * 100, 50, question)
    expected = lm.surprisal(ids) - lm.surprisal(ids, prefix=question)
    assert torch.allclose(torch.tensor(scores[1:]), expected[1:], atol=1e-4)


def test_longllmlingua_needs_the_question(essay, tok, model):
    with pytest.raises(UserError, match="--query-aware"):
        compress("longllmlingua", 0.5, essay, tok, model)


def test_longllmlingua_sort_reorders_the_same_kept_text(essay, tok, model):
    out, _ = compress("longllmlingua", 0.3, essay, tok, model, questions=[QUESTION], reorder="sort", chunk_tokens=64)
    original, _ = compress("longllmlingua", 0.3, essay, tok, model, questions=[QUESTION], chunk_tokens=64)
    assert sorted(out) == sorted(original) and out != original  # the same kept text, chunks in rank order
    assert count_tokens(tok, out) <= round(count_tokens(tok, essay) * 0.7)


@pytest.mark.parametrize("unit", ["token", "sentence"])
def test_selective_context_units(unit, essay, tok, model):
    out, stats = compress("selective_context", 0.5, essay, tok, model, unit=unit)
    assert within(stats, 0.5, 0.02)
    if unit == "sentence":
        kept = [essay[s:e] for s, e in sentence_spans(essay) if essay[s:e] in out]
        assert "".join(kept) == out  # whole sentences only


# --- llmlingua2 (the llmlingua package) -----------------------------------------------------
def test_llmlingua2_without_the_package_names_what_to_install(monkeypatch, essay, tok, model):
    monkeypatch.setitem(sys.modules, "llmlingua", None)
    with pytest.raises(UserError, match=r"pip install 'lcbench\[llmlingua\]'"):
        compress("llmlingua2", 0.5, essay, tok, model)


def test_llmlingua2_offline_without_its_model_is_a_clear_error(tmp_path, essay, tok, model):
    pytest.importorskip("llmlingua")
    with pytest.raises(UserError, match="llmlingua2 could not load its model"):
        compress("llmlingua2", 0.5, essay, tok, model, model=str(tmp_path / "no-such-model"))


def test_llmlingua2_end_to_end_with_a_local_token_classifier(monkeypatch, tmp_path, essay, tok, model):
    """A random tiny BERT token classifier in a local folder (llmlingua recognises the model family
    by name). llmlingua downloads tiktoken's gpt-3.5 encoding only to report its own token savings;
    offline it is replaced by a whitespace counter."""
    pytest.importorskip("llmlingua")
    import tiktoken
    from transformers import BertConfig, BertForTokenClassification

    class Words:
        def encode(self, text):
            return text.split()

    monkeypatch.setattr(tiktoken, "encoding_for_model", lambda name: Words())
    bert_tok = wordpiece_tokenizer(essay)
    folder = tmp_path / "tiny-bert-base-multilingual-cased"
    torch.manual_seed(0)
    BertForTokenClassification(BertConfig(vocab_size=len(bert_tok), hidden_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, intermediate_size=64, max_position_embeddings=512,
                                          num_labels=2, architectures=["BertForTokenClassification"])).save_pretrained(folder)
    bert_tok.save_pretrained(folder)
    out, stats = compress("llmlingua2", 0.5, essay, tok, model, model=str(folder))
    assert within(stats, 0.45, 0.15) and out


# --- in the engine ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sample(essay):
    return Sample("s0", essay, [Turn(question=QUESTION + " Answer:", answers=["7421"], max_new_tokens=6, scorer="x")],
                  chat=False)


def run(model, tok, sample, method, ratio, args=None, query_aware=False, spec=None):
    """The engine's records, each with the token ids it decoded under ``_ids``."""
    chain = Chain.build(spec, ratio) if spec else Chain.build(resolve_chain(method, args, ratio), ratio)
    decoded, real = [], runner.greedy_decode
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "greedy_decode", lambda *a, **k: decoded.extend(real(*a, **k)) or decoded[-len(a[3]):])
        recs = Engine(model, tok, chain, EngineConfig(query_aware=query_aware)).run(sample, multi_turn=False)
    return [{**rec, "_ids": row.tokens} for rec, row in zip(recs, decoded)]


@pytest.mark.parametrize("name", PROMPT_METHODS)
def test_engine_ratio_zero_is_token_identical_to_full(name, model, tok, sample):
    aware = name == "longllmlingua"
    full = run(model, tok, sample, "full", 0.0, query_aware=aware)
    recs = run(model, tok, sample, name, 0.0, query_aware=aware)
    assert recs[0]["_ids"] == full[0]["_ids"] and recs[0]["kv_bytes"] == full[0]["kv_bytes"]


def test_engine_measures_the_text_stage(model, tok, sample):
    recs = run(model, tok, sample, "llmlingua", 0.5)
    rec = recs[0]
    assert rec["achieved_ratio"] == pytest.approx(0.5, abs=0.02)  # KV bytes of the shorter context
    assert within(rec, 0.5) and rec["text_s"] > 0 and rec["text_peak_memory_mb"] > 0
    assert rec["ttft_s"] >= rec["text_s"]


def test_prompt_compression_chains_with_a_cache_stage(model, tok, sample):
    recs = run(model, tok, sample, "llmlingua+snapkv", 0.75, args="window_size=16")
    rec = recs[0]
    assert within(rec, 0.5)  # each component gets 1 − √0.25 = 0.5
    assert rec["achieved_ratio"] == pytest.approx(0.75, abs=0.03)
