"""Every decoder family right or refused (issue #12): the support matrix of
:mod:`lcbench.architectures` over the tiny models of :mod:`lcbench.models.families`, plus the
semantics it rests on — sliding windows in true positions (transformers' ``sliding_window_overlay``),
what a window layer keeps, the full reference it is measured against, windowed sparse patterns,
and the probe that refuses models lcbench cannot take over."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from lcbench import architectures as support
from lcbench.engine.attach import use_lcbench_attention
from lcbench.errors import UserError
from lcbench.models.families import FAMILIES, WINDOW, build, family, tiny_config
from lcbench.models.loading import LoadedModel
from lcbench.models.tiny import tiny_tokenizer

warnings.filterwarnings("ignore", message=".*rope.*")

REFUSED = {"falcon-alibi": "ALiBi", "mamba": "no attention layer",
           "gpt-neo": "attention with its own code",
           "diffllama": "calls attention more than once per layer",
           "deepseek-v3.2": "indexed_attention", "dory": "calls attention more than once per layer",
           "glm-moe-dsa": "indexed_attention", "hy-v4": "indexed_attention",
           "bloom": "attention with its own code", "mpt": "attention with its own code",
           "deepseek-v4": "compressed_attention", "axk2": "indexed_attention", "qwen4-exp-text": "indexed_attention", "inkling-text": "position_bias",
           "hrm-text": "attention with its own code", "xglm": "attention with its own code",
           "openai-gpt": "attention with its own code"}
WINDOWED = [f.name for f in FAMILIES if f.overrides.get("sliding_window")]
AVAILABLE = [f.name for f in FAMILIES if f.available()]


@pytest.fixture(autouse=True, scope="module")
def _quiet():
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    yield
    logging.set_verbosity(level)


# --- the matrix ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", AVAILABLE)
def test_family_is_right_or_refused(name):
    """`full` equals model.generate (sdpa and eager) and snapkv, streamingllm, kivi, ashape and
    truncate reach ratio 0.5 — or the family is refused with its reason before anything runs."""
    result = support.check_family(family(name))
    if name in REFUSED:
        assert result.status == "refused" and REFUSED[name] in result.reason and "Fix:" in result.reason
        return
    assert result.status == "works", [c for c in result.checks if not c.ok]
    assert [c.what for c in result.checks] == ["full/sdpa", "full/eager"] + [m for m, _ in support.METHODS]
    shortfalls = [c.what for c in result.checks if c.detail.startswith("shortfall")]
    # only a prompt compressor may fall short, and only where layers have a window shorter than the
    # compressed context (it cannot shrink what those layers hold): every layer (a windowed variant),
    # or half of them with a window that is not the matrix's (MiMo-V2-Flash's own 129 tokens)
    assert shortfalls in ([], ["truncate"])
    if shortfalls:
        cfg = tiny_config(family(name))
        every = family(name).overrides.get("sliding_window") and "layer_types" not in family(name).overrides
        assert every or (cfg.sliding_window and cfg.sliding_window != WINDOW
                         and "sliding_attention" in (getattr(cfg, "layer_types", None) or [])), name
    # nothing is refused: the sparse method (it computes attention itself) applies a softcap, learned
    # sinks and chunked attention on the families that have them (tests/test_sparse_softcap_sinks.py)
    assert [c.what for c in result.checks if c.detail.startswith("refused")] == []


def _without(fam, feature: str):
    over = dict(fam.overrides)
    if feature == "window":
        over["sliding_window"] = 4096  # longer than the context: the same layers, no window effect
    elif feature == "softcap":
        over["attn_logit_softcapping"] = None
    elif feature == "chunk":
        over["attention_chunk_size"] = 4096  # longer than the context: the same layers, one chunk
    elif feature == "temperature":
        over["attn_temperature_tuning"] = False
    return dataclasses.replace(fam, overrides=over, strong_sinks=feature != "sinks" and fam.strong_sinks)


@pytest.mark.parametrize("name,feature", [(n, "window") for n in WINDOWED] + [
    ("gemma2", "softcap"), ("gpt-oss", "sinks"), ("llama4-text", "chunk"), ("llama4-text", "temperature")])
def test_the_matrix_context_makes_each_feature_matter(name, feature):
    """The feature changes model.generate's output at the matrix's context length, so `full`
    matching generate proves lcbench honours it (not that it never mattered)."""
    tok = tiny_tokenizer()
    s = support.sample()
    from lcbench.engine.prompt import render

    p = render(tok, s, s.context, multi_turn=False)
    prompt = p.context_ids + p.turn_ids[0]
    assert len(prompt) > 5 * WINDOW
    fam = family(name)
    with_it = support._generate(build(fam, "eager"), prompt)
    without = support._generate(build(_without(fam, feature), "eager"), prompt)
    assert with_it != without


@pytest.mark.parametrize("name", ["mistral-window", "gemma2", "gpt-oss", "cohere2", "llama4-text"])
def test_full_token_ids_equal_generate(name):
    """Token ids (not only text) of lcbench `full` equal model.generate's, for both turns."""
    from lcbench.engine.prompt import render
    from tests.conftest import engine_for
    from tests.helpers import decoded_ids

    tok = tiny_tokenizer()
    s = support.sample()
    p = render(tok, s, s.context, multi_turn=False)
    fam = family(name)
    refs = support.references(fam, [p.context_ids + t for t in p.turn_ids])
    ref = refs.get("sdpa", refs["eager"])
    model = support.lcbench_model(fam, "sdpa")
    ids, _ = decoded_ids(lambda: engine_for(model, tok).run(s, False))
    eos = tok.eos_token_id
    assert [ids[("arch", k)] for k in range(2)] == [r[: r.index(eos)] if eos in r else r for r in ref]


# --- window semantics ------------------------------------------------------------------------
def test_window_mask_follows_transformers_in_true_positions():
    """A query at true position p sees the keys at positions in (p - w, p] — transformers'
    causal + sliding_window_overlay on positions — even after tokens were dropped (gaps)."""
    from transformers.masking_utils import (
        and_masks,
        causal_mask_function,
        sliding_window_overlay,
    )

    from lcbench.cache import DenseLayer
    from lcbench.engine.attention import storage_mask

    w = 5
    positions = torch.tensor([0, 1, 2, 7, 8, 9, 13, 14, 15, 16, 17, 18])
    layer = DenseLayer()
    layer.append(torch.zeros(1, 2, 12, 4), torch.zeros(1, 2, 12, 4), positions[None], None)
    reference = and_masks(causal_mask_function, sliding_window_overlay(w))
    for q_len in (1, 4, 12):
        mask = storage_mask(layer, q_len, w)[0, 0]
        qpos = positions[12 - q_len:]
        zero = torch.tensor(0)
        want = torch.tensor([[bool(reference(zero, zero, qp, kp)) for kp in positions] for qp in qpos])
        assert torch.equal(mask, want)


def test_window_layer_keeps_what_transformers_sliding_cache_keeps():
    """After the context, a window layer holds the last w - 1 tokens, like transformers'
    DynamicSlidingWindowLayer; `full` holds exactly the reference bytes (achieved ratio 0), and that
    reference is transformers' own cache size."""
    from transformers import DynamicCache

    from lcbench.engine.prompt import render
    from tests.conftest import engine_for

    fam = family("gemma3-text")
    tok = tiny_tokenizer()
    s = support.sample()
    model = support.lcbench_model(fam, "sdpa")
    record = engine_for(model, tok).run(s, False)[0]
    ref = build(fam, "sdpa")
    ids = torch.tensor([render(tok, s, s.context, False).context_ids])
    cache = DynamicCache(config=ref.config)
    with torch.inference_mode():
        ref(ids, past_key_values=cache, use_cache=True)
    held = [layer.keys.shape[2] for layer in cache.layers]
    assert held == [WINDOW - 1, ids.shape[1]]
    theirs = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert record["kv_bytes"] == record["kv_bytes_full"] == theirs
    assert record["achieved_ratio"] == 0.0


def test_dropping_on_a_window_layer_counts_only_visible_tokens():
    """snapkv at 0.5 on a model whose every layer has a window keeps half of the w - 1 tokens
    each layer can still see, and the ratio is measured against those."""
    from tests.conftest import engine_for

    fam = family("mistral-window")
    model = support.lcbench_model(fam, "sdpa")
    record = engine_for(model, tiny_tokenizer(), "snapkv", 0.5, "window_size=8").run(support.sample(), False)[0]
    assert record["kept_tokens"] == round((WINDOW - 1) * 0.5)
    assert record["kv_bytes_full"] == model.lcbench_geometry.dense_bytes(record["context_tokens"])
    assert abs(record["achieved_ratio"] - 0.5) < 0.05


def test_quest_decode_on_window_layers():
    """Quest's decode stays inside the window (pages outside it never compete, hidden keys are
    masked) and reports the density over the tokens the window lets a query see."""
    from tests.conftest import engine_for

    model = support.lcbench_model(family("mistral-window"), "sdpa")
    records = engine_for(model, tiny_tokenizer(), "quest", 0.5, "page_size=4,dense_layers=0").run(support.sample(), False)
    assert all(0 < r["attention_density"] <= 0.55 for r in records)


# --- windowed sparse patterns ----------------------------------------------------------------
@pytest.mark.parametrize("length,bs,window", [(70, 16, 5), (70, 16, 16), (70, 16, 33), (64, 8, 100), (33, 8, 9)])
def test_window_block_pairs_count_the_pairs_the_window_lets_through(length, bs, window):
    from lcbench.methods.sparse.kernel import causal_block_pairs

    pairs = causal_block_pairs(length, bs, window=window)
    q = torch.arange(length)[:, None]
    k = torch.arange(length)[None, :]
    visible = (k <= q) & (k > q - window)
    blocks = torch.arange(length) // bs
    brute = torch.zeros_like(pairs)
    brute.index_put_((blocks[:, None].expand_as(visible)[visible], blocks[None, :].expand_as(visible)[visible]),
                     torch.ones(int(visible.sum()), dtype=torch.long), accumulate=True)
    assert torch.equal(pairs, brute)


@pytest.mark.parametrize("with_columns", [False, True])
def test_windowed_kernel_equals_dense_attention_on_its_mask(with_columns):
    from lcbench.methods.sparse.kernel import BlockPattern, block_sparse_attention

    torch.manual_seed(0)
    B, Hkv, g, L, D, bs, w = 1, 2, 2, 70, 8, 16, 20
    q, k, v = torch.randn(B, Hkv * g, L, D), torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, D)
    nb = -(-L // bs)
    blocks = torch.rand(B, Hkv, nb, nb) > 0.4
    cols = torch.tensor([[[1, 30], [5, 40]]]) if with_columns else None
    pattern = BlockPattern(blocks, bs, L, cols, window=w)
    out = block_sparse_attention(q, k, v, pattern, 0.3)
    mask = pattern.dense_mask().repeat_interleave(g, dim=1)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                                           attn_mask=mask, scale=0.3).transpose(1, 2)
    assert torch.allclose(out, ref, atol=1e-5)
    computed, total = pattern.pair_counts()
    assert int(computed.sum()) == int(pattern.dense_mask().sum())
    assert total == int(((torch.arange(L)[None] <= torch.arange(L)[:, None])
                         & (torch.arange(L)[None] > torch.arange(L)[:, None] - w)).sum())


# --- refusals and loading --------------------------------------------------------------------
def test_probe_refuses_a_model_that_keeps_its_own_attention():
    """Beyond the known configs: a model whose layers never call lcbench's attention is caught by
    counting the calls of a 2-token probe (GPT-Neo, which no config rule refuses)."""
    assert support.config_refusal(tiny_config(family("gpt-neo"))) is None
    with pytest.raises(UserError, match="layers 0, 1 of 2 never called lcbench's attention"):
        use_lcbench_attention(build(family("gpt-neo"), "eager"))


def test_a_model_call_carries_only_what_its_caller_set():
    """A model call made inside another's (a stage scoring with the model mid-forward) sees only its
    own values, and the outer call's come back when it ends, also after an exception."""
    from lcbench.engine.carried import carried, carrying

    with carrying(state="outer"):
        with carrying(readout="inner"):
            assert carried("state") is None and carried("readout") == "inner"
        assert carried("state") == "outer" and carried("readout") is None
        with pytest.raises(RuntimeError), carrying(state="failed"):
            raise RuntimeError
        assert carried("state") == "outer"
    assert carried("state") is None


def test_decoder_layers_that_pass_no_kwargs_still_reach_lcbench_attention():
    """StableLM's, Nemotron's and Falcon's decoder layers call self-attention with named arguments
    only, so nothing a forward passes as a keyword reaches the attention function; the engine's
    state travels beside the call (engine/carried.py): every layer's KV is lcbench's, and a cache
    stage compresses each of them."""
    from lcbench.engine.prompt import render
    from tests.conftest import engine_for

    tok = tiny_tokenizer()
    for name in ("stablelm", "nemotron", "falcon"):
        model = build(family(name), "eager")
        use_lcbench_attention(model)
        s = support.sample()
        p = render(tok, s, s.context, multi_turn=False)
        r = engine_for(model, tok, "snapkv", 0.5, "window_size=8").run(s, False)[0]
        assert r["context_tokens"] == len(p.context_ids)
        assert 0.45 <= r["achieved_ratio"] <= 0.55 and r["kv_bytes"] < r["kv_bytes_full"], (name, r)


def test_config_refusal_before_weights_load():
    import transformers

    assert "ALiBi" in support.config_refusal(transformers.FalconConfig(alibi=True))
    assert support.config_refusal(transformers.FalconConfig()) is None  # rotary Falcon runs
    assert support.config_refusal(transformers.DeepseekV3Config()) is None  # MLA runs (tests/test_mla.py)
    assert "indexed_attention" in support.config_refusal(  # a layer kind lcbench's attention does not implement
        transformers.LlamaConfig(layer_types=["full_attention", "indexed_attention"], num_hidden_layers=2))
    assert support.config_refusal(transformers.Qwen3NextConfig()) is None  # hybrids run (tests/test_hybrid.py)
    assert "no attention layer" in support.config_refusal(transformers.MambaConfig())
    assert support.config_refusal(transformers.FalconH1Config()) is None  # a state beside attention runs
    assert support.config_refusal(transformers.Gemma3nTextConfig()) is None  # KV sharing runs (test_kv_sharing.py)
    assert support.config_refusal(transformers.MistralConfig()) is None


def test_cli_refuses_alibi_falcon_with_exit_2(tmp_path):
    """What a user sees: `lcbench run --model <ALiBi Falcon folder>` exits 2 naming the reason, no traceback."""
    folder = tmp_path / "falcon"
    build(family("falcon-alibi")).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    exe = shutil.which("lcbench")
    cmd = [exe] if exe else [sys.executable, "-m", "lcbench.cli"]
    proc = subprocess.run(cmd + ["run", "--model", str(folder), "--method", "full", "--task", "niah",
                                 "--output-path", str(tmp_path / "out"), "--limit", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "alibi=True" in proc.stderr and "Traceback" not in proc.stderr


def test_gemma3_multimodal_checkpoint_max_length_and_hook():
    """Gemma-3 instruct checkpoints load as Gemma3ForConditionalGeneration: the context length is
    on the text config, and lcbench's hook takes over the text layers (probe passes, `full` equals
    generate on text)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    from lcbench.engine.prompt import render
    from lcbench.models.families import tiny_config_kwargs
    from tests.conftest import engine_for

    tok = tiny_tokenizer()
    text = {**tiny_config_kwargs(tok), **family("gemma3-text").overrides, "max_position_embeddings": 131072}
    cfg = Gemma3Config(text_config=text, vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                             num_attention_heads=2, image_size=28, patch_size=14),
                       mm_tokens_per_image=4, image_token_index=5, boi_token_index=6, eoi_token_index=7)
    torch.manual_seed(0)
    ref = Gemma3ForConditionalGeneration(cfg).eval()
    model = Gemma3ForConditionalGeneration(cfg).eval()
    model.load_state_dict(ref.state_dict())
    assert LoadedModel(model, tok, "gemma3", "config").max_length == 131072
    use_lcbench_attention(model)
    assert model.lcbench_geometry.windows == (WINDOW, None)
    s = support.sample()
    p = render(tok, s, s.context, False)
    want = support._text(tok, support._generate(ref, p.context_ids + p.turn_ids[0]))
    assert engine_for(model, tok).run(s, False)[0]["prediction"] == want


@pytest.mark.parametrize("method,args", [("full", None), ("snapkv", "window_size=8"), ("kivi", "group_size=8")])
def test_window_layers_batched_across_samples_as_alone(method, args):
    """Contexts of different lengths prefilled left-padded together (--batch-size N): each window
    layer keeps, per row, what that row can still see; predictions and bytes equal running alone."""
    from lcbench.engine.batching import run_batched
    from tests.conftest import engine_for
    from tests.helpers import make_sample

    tok = tiny_tokenizer()
    samples = [make_sample(2, repeat=r, sid=f"s{r}") for r in (9, 10, 12)]
    model = support.lcbench_model(family("gemma2"), "sdpa")
    ratio = 0.0 if method == "full" else 0.5

    def key(r):
        return r["sample_id"], r["turn"], r["prediction"], r["kv_bytes"], r["kv_bytes_full"]

    alone = sorted(key(r) for s in samples for r in engine_for(model, tok, method, ratio, args).run(s, False))
    batched = sorted(key(r) for _, recs in run_batched(engine_for(model, tok, method, ratio, args), samples, {}, 4)
                     for r in recs)
    assert batched == alone


def test_chunkkv_reuses_indices_only_between_layers_holding_the_same_tokens():
    """ChunkKV's index reuse copies the first layer's kept positions to the next; a global layer
    after a window layer holds other tokens, so it selects its own (else it kept ~12 of 241 tokens:
    ratio 0.91 for a requested 0.5), and a window layer holding only the question is left alone."""
    from tests.conftest import engine_for

    model = support.lcbench_model(family("gemma2"), "sdpa")
    for query_aware in (False, True):
        record = engine_for(model, tiny_tokenizer(), "chunkkv", 0.5, query_aware=query_aware).run(support.sample(), False)[0]
        assert 0.45 <= record["achieved_ratio"] <= 0.55


def test_llama4_attention_temperature_reads_true_positions_after_compression(monkeypatch):
    """Llama-4's NoPE layers scale their queries by a temperature of the query's position, which
    they read as `cache.get_seq_length(layer)`. After snapkv keeps half of a layer, that layer stores
    fewer slots than the tokens it has seen; lcbench's cache answers the true next position, so the
    question pass is scaled as the model would scale it uncompressed."""
    from lcbench.cache.kvcache import KVCache
    from lcbench.engine.prompt import render
    from tests.conftest import engine_for

    tok = tiny_tokenizer()
    s = support.sample()
    context_tokens = len(render(tok, s, s.context, multi_turn=False).context_ids)
    model = support.lcbench_model(family("llama4-text"), "eager")
    calls: list[tuple[int, int]] = []  # (returned, slots stored)
    real = KVCache.get_seq_length

    def spy(self, layer_idx=0):
        calls.append((real(self, layer_idx), self.layers[layer_idx].seq_len()))
        return calls[-1][0]

    monkeypatch.setattr(KVCache, "get_seq_length", spy)
    records = engine_for(model, tok, "snapkv", 0.5).run(s, False)
    assert records[0].measured.achieved_ratio > 0.4
    returned = [r for r, _ in calls]
    returned = returned[len(returned) - 1 - returned[::-1].index(0):]  # from the context pass on
    # the context pass starts at 0, the question pass at the context's length, each step one further
    assert returned[:2] == [0, context_tokens]
    assert all(b == a + 1 for a, b in zip(returned[2:], returned[3:]))
    stored = dict(calls)[context_tokens]
    assert stored < context_tokens  # what the layer stores after snapkv: its slots would have been wrong


def test_chunked_layer_forgets_what_no_later_query_sees_and_the_reference_agrees():
    """A chunked layer after its prefill keeps the tokens of the chunk the next position is in (the
    newest one when the context ends on a chunk boundary, masked), and Geometry.visible — the full
    cache a method is measured against — counts the same."""
    from lcbench.cache.layer import DenseLayer
    from lcbench.engine.attention import drop_unseeable, storage_mask
    from lcbench.models.hook import Geometry

    geometry = Geometry(windows=(None,), bytes_per_token=(1,), chunks=(24,))
    for n, kept in [(50, 2), (48, 1), (20, 20), (24, 1)]:
        layer = DenseLayer()
        layer.append(torch.zeros(1, 1, n, 4), torch.zeros(1, 1, n, 4), torch.arange(n)[None], None)
        drop_unseeable(layer, None, 24)
        assert layer.positions[0, 0].tolist() == list(range(n - kept, n)) and geometry.visible(0, n) == kept
        # the next token (position n) sees the kept tokens of its own chunk only
        layer.append(torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4), torch.tensor([[n]]), None)
        mask = storage_mask(layer, 1, None, 24)
        seen = layer.positions[0, 0][mask[0, 0, 0]] if mask is not None else layer.positions[0, 0]
        assert seen.tolist() == [p for p in range(n - kept, n + 1) if p >= n // 24 * 24]


def test_llama4_chunked_prefill_equals_one_pass():
    """`--prefill-chunk` on Llama-4: passes that cross chunk boundaries, each ending by forgetting
    what no later query sees, give the one-pass tokens."""
    from tests.conftest import engine_for

    tok = tiny_tokenizer()
    s = support.sample()
    model = support.lcbench_model(family("llama4-text"), "eager")
    one = engine_for(model, tok, "full").run(s, False)
    chunked = engine_for(model, tok, "full", prefill_chunk=40).run(s, False)
    assert [r.decoded_ids for r in chunked] == [r.decoded_ids for r in one]
    assert [r.measured.kv_bytes for r in chunked] == [r.measured.kv_bytes for r in one]


def test_llama4_multimodal_checkpoint_runs_from_the_cli(tmp_path):
    """Llama-4 instruct checkpoints are Llama4ForConditionalGeneration (text + vision): `lcbench run
    --model <folder>` takes over the text layers (chunked and NoPE ones), `full` predicts what
    model.generate does on the text, and snapkv reaches its ratio; exit 0."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    from lcbench.models.families import tiny_config_kwargs

    tok = tiny_tokenizer()
    text = {**tiny_config_kwargs(tok), **family("llama4-text").overrides}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32)
    torch.manual_seed(0)
    model = Llama4ForConditionalGeneration(Llama4Config(text_config=text, vision_config=vision)).eval()
    folder = tmp_path / "llama4"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    exe = shutil.which("lcbench")
    cmd = [exe] if exe else [sys.executable, "-m", "lcbench.cli"]
    proc = subprocess.run(cmd + ["run", "--model", str(folder), "--method", "full,snapkv", "--ratio", "0.5",
                                 "--task", "niah", "--task-args", "lengths=320,depths=50,max_new_tokens=6",
                                 "--limit", "1", "--share-prefill", "off", "--output-path", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = {p.parent.name.split("__")[1]: [json.loads(line) for line in p.read_text().splitlines()]
               for p in (tmp_path / "out").rglob("samples.jsonl")}
    assert sorted(records) == ["full", "snapkv"]
    assert records["snapkv"][0]["measured"]["achieved_ratio"] > 0.45
    # in process, loaded as the CLI loads it (the text model): lcbench's `full` predicts what
    # transformers' own generate does on that checkpoint
    from transformers import AutoModelForCausalLM

    from lcbench.engine.attach import attached
    from lcbench.engine.prompt import render
    from lcbench.models.loading import load_model
    from tests.conftest import engine_for

    ref = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    loaded = load_model(str(folder), None, "cpu")
    if not attached(loaded.model):
        use_lcbench_attention(loaded.model)
    assert loaded.model.lcbench_geometry.chunks == (WINDOW, None)
    sample = support.sample()
    p = render(tok, sample, sample.context, False)
    want = support._text(tok, support._generate(ref, p.context_ids + p.turn_ids[0]))
    assert engine_for(loaded.model, tok).run(sample, False)[0]["prediction"] == want
