"""Sparse attention on models with an attention-logit softcap (Gemma-2) or learned sinks (gpt-oss).

A stage that computes attention itself applies the model's softcap and sink column where it lists
them in ``Stage.attention_terms``; the engine passes them and refuses a stage that would need one it
does not apply. Pinned here: the block-sparse kernel (exact loop and FlexAttention) equals
transformers' own eager attention of each family restricted to the pattern; Quest's picked pages
equal that attention over the same pages, and so do HyperAttention's exact pieces; on tiny Gemma-2
and gpt-oss models the block-sparse, Quest, retrieval and HyperAttention stages run (the term
reaching them changes what they compute), and RetroAttention revises its output cache with them.
A stage without them is refused (tests/test_declarations.py pins the declaration checks).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma2_eager
from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward as gpt_oss_eager

from lcbench.engine.attention import AttentionCall, dense_attention
from lcbench.errors import UserError
from lcbench.methods.sparse import flex
from lcbench.methods.sparse.kernel import BlockPattern, loop_block_sparse_attention
from tests.conftest import engine_for
from tests.test_shared_context import varied_sample

SOFTCAP = 2.0  # small enough that it bites on the test logits
SCALING = 0.3


def qkv(L=70, B=2, Hq=4, Hkv=2, D=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(B, Hq, L, D, generator=gen), 3 * torch.randn(B, Hkv, L, D, generator=gen),
            torch.randn(B, Hkv, L, D, generator=gen))


def pattern(L=70, B=2, window=None, columns=True, seed=1) -> BlockPattern:
    gen = torch.Generator().manual_seed(seed)
    nb = -(-L // 16)
    blocks = torch.rand(B, 2, nb, nb, generator=gen) < 0.4
    cols = torch.stack([torch.randperm(L, generator=gen)[:6].sort().values for _ in range(B * 2)]).view(B, 2, 6)
    return BlockPattern(blocks, 16, L, cols if columns else None, window=window)


def transformers_reference(term: str, q, k, v, allowed: torch.Tensor, sinks: torch.Tensor | None = None):
    """The family's own eager attention (transformers' code) over the keys ``allowed`` (B, Hkv, q, L)
    lets each query see, as (B, q, Hq, D)."""
    groups = q.shape[1] // k.shape[1]
    add = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf")).repeat_interleave(groups, 1)
    module = SimpleNamespace(num_key_value_groups=groups, training=False, sinks=sinks, head_dim=q.shape[-1])
    if term == "softcap":
        return gemma2_eager(module, q, k, v, add, scaling=SCALING, softcap=SOFTCAP)[0]
    return gpt_oss_eager(module, q, k, v, add, scaling=SCALING)[0]


def terms(term: str) -> dict:
    return {"softcap": SOFTCAP} if term == "softcap" else {"sinks": torch.tensor([0.5, -1.0, 2.0, 4.0])}


@pytest.mark.parametrize("term", ["softcap", "sinks"])
@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.filterwarnings("ignore::UserWarning")  # uncompiled FlexAttention warns off CUDA
def test_block_sparse_kernel_applies_the_term_like_transformers(term, window):
    q, k, v = qkv()
    p = pattern(window=window)
    extra = terms(term)
    want = transformers_reference(term, q, k, v, p.dense_mask(), extra.get("sinks"))
    loop = loop_block_sparse_attention(q, k, v, p, SCALING, **extra)
    assert torch.allclose(loop, want, atol=1e-5)
    assert not torch.allclose(loop, loop_block_sparse_attention(q, k, v, p, SCALING), atol=1e-3)  # it mattered
    if flex.available():
        out = flex.flex_block_sparse_attention(q, k, v, p, SCALING, compiled=False, **extra)
        assert torch.allclose(out, want, atol=1e-5)


@pytest.mark.parametrize("term", ["softcap", "sinks"])
def test_dense_attention_with_a_mask_applies_the_term_like_transformers(term):
    """What the retrieval stages (InfLLM, ClusterKV, Squeezed, ...) attend through: the engine's dense
    attention over their selected slots, with the call's softcap or sinks."""
    q, k, v = qkv(L=30)
    allowed = torch.rand(2, 2, 30, 30, generator=torch.Generator().manual_seed(3)) < 0.5
    allowed |= torch.eye(30, dtype=torch.bool)
    allowed &= torch.ones(30, 30, dtype=torch.bool).tril()
    extra = terms(term)
    module = SimpleNamespace(num_key_value_groups=2, config=None)
    out = dense_attention(module, q, k, v, allowed, SCALING, AttentionCall(SCALING, **extra))
    assert torch.allclose(out, transformers_reference(term, q, k, v, allowed, extra.get("sinks")), atol=1e-5)


@pytest.mark.parametrize("term", ["softcap", "sinks"])
def test_quest_attends_its_picked_pages_with_the_term(term):
    """Four pages of 4 slots at ratio 0.25 keep three; page 1's keys point away from the query, so
    its upper bound is the lowest and it is the page left out. Quest's output equals the family's
    eager attention over the other twelve slots."""
    from lcbench.cache.layer import DenseLayer
    from lcbench.methods.registry import METHODS

    gen = torch.Generator().manual_seed(5)
    B, Hq, Hkv, L, D = 1, 4, 2, 16, 8
    q = torch.randn(B, Hq, 1, D, generator=gen)
    keys = torch.randn(B, Hkv, L, D, generator=gen)
    direction = q.reshape(B, Hkv, 2, D).sum(2, keepdim=True)  # both query heads of each KV head
    keys[:, :, 4:8] = -5 * direction / direction.norm(dim=-1, keepdim=True)
    values = torch.randn(B, Hkv, L, D, generator=gen)
    layer = DenseLayer()
    layer.append(keys, values, torch.arange(L)[None], None)
    module = SimpleNamespace(num_key_value_groups=2, config=SimpleNamespace(num_hidden_layers=1))
    quest = METHODS.get("quest")(ratio=0.25, page_size=4, dense_layers=0)
    quest.begin_sample()
    extra = terms(term)
    out = quest.decode_attention(module, q, layer, SCALING, 0, **extra)
    allowed = torch.ones(B, Hkv, 1, L, dtype=torch.bool)
    allowed[..., 4:8] = False
    assert torch.allclose(out, transformers_reference(term, q, keys, values, allowed, extra.get("sinks")), atol=1e-5)
    assert quest.sample_stats()["attention_density"] == pytest.approx(0.75)


@pytest.mark.parametrize("term", ["softcap", "sinks"])
def test_hyperattention_exact_pieces_apply_the_term_like_transformers(term):
    """HyperAttention's exact leaves (a leaf as long as the sequence: no LSH piece) with the softcap
    on every logit and the sinks joining the final log-sum-exp equal the family's eager attention."""
    from lcbench.methods.sparse.hyperattention import HyperAttentionRun

    q, k, v = qkv(L=40, B=1)
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    extra = terms(term)
    run = HyperAttentionRun(block=8, leaf=64, bits=3, generator=torch.Generator().manual_seed(0), dim=16,
                            softcap=extra.get("softcap"))
    out, lse = run.causal(q, k, v, SCALING)
    if "sinks" in extra:
        out = out * torch.sigmoid(lse - extra["sinks"].reshape(1, 4, 1))[..., None]
    causal = torch.ones(40, 40, dtype=torch.bool).tril().expand(1, 4, 40, 40)
    want = transformers_reference(term, q, k, v, causal, extra.get("sinks"))
    assert torch.allclose(out.transpose(1, 2), want, atol=1e-5)


def _tiny(family_name: str):
    from lcbench.engine.attach import use_lcbench_attention
    from lcbench.models.families import FAMILIES, build
    from lcbench.models.tiny import tiny_tokenizer

    (fam,) = [f for f in FAMILIES if f.name == family_name]
    model, tok = build(fam, "eager"), tiny_tokenizer()
    use_lcbench_attention(model, "eager")
    return model, tok


@pytest.mark.parametrize("family_name", ["gemma2", "gpt-oss", "llama4-text"])
@pytest.mark.parametrize("method,args,ratio", [("ashape", "block_size=8", 0.5), ("quest", "page_size=4,dense_layers=0", 0.5),
                                               ("infllm", "block_size=8", 0.5),
                                               ("hyperattention", None, 0.1)])  # its window layers stay dense
def test_sparse_families_run_on_softcap_and_sink_models_and_apply_the_term(family_name, method, args, ratio,
                                                                            monkeypatch):
    """Each family of stages that computes attention itself runs on Gemma-2 (softcap), gpt-oss
    (sinks) and Llama-4 (chunked layers), its turns decoded together equal to each turn alone;
    withholding the model's term from the stage changes the attention outputs (so the stage gets it
    and uses it)."""
    import lcbench.engine.attention as attention

    model, tok = _tiny(family_name)
    sample = varied_sample()
    if family_name == "llama4-text":
        ratio /= 2  # its chunked layer stays dense: half the layers count every pair they attend
    records = engine_for(model, tok, method, ratio, method_args=args).run(sample, False)
    assert records and all(r.method_stats["attention_density"] < 1.0 for r in records)
    from lcbench.tasks.base import Sample

    alone = [engine_for(model, tok, method, ratio, method_args=args).run(Sample(sample.id, sample.context, [t]), False)[0]
             for t in sample.turns]
    assert [r.decoded_ids for r in records] == [r.decoded_ids for r in alone]

    seen: list[tuple[torch.Tensor, dict]] = []
    real = attention.attend_layer

    def spy(module, query, key, value, layer, state, call, idx, num_layers):
        out, layer = real(module, query, key, value, layer, state, call, idx, num_layers)
        seen.append(out)
        return out, layer

    monkeypatch.setattr(attention, "attend_layer", spy)
    engine_for(model, tok, method, ratio, method_args=args).run(sample, False)
    applied = list(seen)
    seen.clear()
    real_kwargs = attention._stage_kwargs
    monkeypatch.setattr(attention, "_stage_kwargs", lambda call, stage: {
        k: v for k, v in real_kwargs(call, stage).items() if k == "window"})
    try:
        withheld = engine_for(model, tok, method, ratio, method_args=args).run(sample, False)
    except UserError as exc:  # e.g. infllm learned a chunked layer that then forgot its context
        assert family_name == "llama4-text", exc
        return
    assert len(seen) == len(applied)
    differ = [not torch.allclose(a, b, atol=1e-6) for a, b in zip(applied, seen) if a.shape == b.shape]
    # a prefill stage leaves a chunked layer to the engine either way (its mask shows the chunk), but
    # then counts the pairs as if the layer attended every earlier key
    counted = [r.method_stats["attention_density"] for r in withheld] != [r.method_stats["attention_density"]
                                                                           for r in records]
    assert any(differ) or (family_name == "llama4-text" and counted)


@pytest.mark.parametrize("term", ["softcap", "sinks"])
def test_retroattention_merged_parts_with_the_term_equal_transformers(term):
    """The output cache's arithmetic: two disjoint parts attended with the softcap, merged by their
    log-sum-exps, then the sink column added (with_sinks), equal the family's eager attention over
    their union."""
    from lcbench.methods.sparse.retroattention import masked_attention, merge, with_sinks

    q, k, v = qkv(L=24, B=1)
    q = q[:, :, -1]  # one decoding query per head
    extra = terms(term)
    part = torch.rand(1, 2, 24, generator=torch.Generator().manual_seed(2)) < 0.5
    oa, la = masked_attention(q, k, v, part, SCALING, extra.get("softcap"))
    ob, lb = masked_attention(q, k, v, ~part, SCALING, extra.get("softcap"))
    out = with_sinks(*merge(oa, la, ob, lb), extra.get("sinks"))
    want = transformers_reference(term, q[:, :, None], k, v, torch.ones(1, 2, 1, 24, dtype=torch.bool),
                                  extra.get("sinks"))
    assert torch.allclose(out, want[:, 0], atol=1e-5)


@pytest.mark.parametrize("family_name", ["gemma2", "gpt-oss"])
def test_retroattention_revisions_apply_the_term(family_name):
    """RetroAttention on Gemma-2 / gpt-oss: its tokens are Quest's, and on the full-attention layers
    its output cache is revised with the model's softcap and sinks — the revised outputs come closer
    to the dense outputs (computed with the term) than Quest's own were."""
    from lcbench.tasks.base import Sample

    model, tok = _tiny(family_name)
    whole = varied_sample()
    sample = Sample(whole.id, whole.context, whole.turns[-1:])  # one row: no padding, revisions run
    args = "page_size=4,dense_layers=0"
    retro = engine_for(model, tok, "retroattention", 0.5, method_args=args + ",measure_error=true").run(sample, False)
    quest = engine_for(model, tok, "quest", 0.5, method_args=args).run(sample, False)
    assert [r.decoded_ids for r in retro] == [r.decoded_ids for r in quest]
    stats = retro[0].method_stats
    assert stats["retro_kv_exposure"] > 1.0
    assert stats["retro_error_after"] < stats["retro_error_before"]


def test_no_builtin_sparse_stage_is_refused_on_softcap_or_sink_models():
    """Every built-in stage that computes attention itself applies both terms (built-ins only: other
    tests register deliberately wrong classes)."""
    from lcbench.methods.base import ATTENTION_TERMS, computes_attention
    from lcbench.methods.registry import builtin_methods

    builtins = builtin_methods()
    attending = [n for n, cls in builtins.items() if computes_attention(cls)]
    assert len(attending) >= 17
    assert [n for n in attending if set(builtins[n].attention_terms) != set(ATTENTION_TERMS)] == []


@pytest.mark.parametrize("family_name,method,args", [("gemma2", "ashape", "block_size=8"),
                                                    ("gpt-oss", "quest", "page_size=4,dense_layers=0")])
def test_cli_runs_a_sparse_method_on_a_local_softcap_or_sink_checkpoint(tmp_path, family_name, method, args):
    """What a user runs: `lcbench run --model <folder>` on a Gemma-2 / gpt-oss checkpoint with a sparse
    method exits 0 and records its attention density (it was refused with exit 2 before)."""
    import json
    import shutil
    import subprocess
    import sys

    from lcbench.models.families import FAMILIES, build
    from lcbench.models.tiny import tiny_tokenizer

    (fam,) = [f for f in FAMILIES if f.name == family_name]
    folder = tmp_path / family_name
    build(fam, "eager").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    exe = shutil.which("lcbench")
    cmd = [exe] if exe else [sys.executable, "-m", "lcbench.cli"]
    proc = subprocess.run(cmd + ["run", "--model", str(folder), "--method", method, "--method-args", args, "--ratio", "0.2",
                                 "--task", "niah", "--task-args", "lengths=320,depths=50,max_new_tokens=4", "--limit", "1",
                                 "--output-path", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    (records,) = (tmp_path / "out").rglob("samples.jsonl")
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    assert rows and all(0 < r["method_stats"]["attention_density"] < 1 for r in rows)


def test_a_chunked_layer_stays_dense_under_a_sparse_prefill_and_counts_so():
    """On a chunked layer (Llama-4) a block-sparse prefill leaves attention to the engine (dense within
    chunks) and counts exactly those pairs as computed, so the density is over what the layer attends."""
    from lcbench.methods.registry import METHODS
    from lcbench.methods.sparse.kernel import chunk_pairs

    assert chunk_pairs(50, 24) == 2 * (24 * 25 / 2) + 2 * 3 / 2 and chunk_pairs(20, 24) == 20 * 21 / 2
    stage = METHODS.get("ashape")(ratio=0.5, block_size=8)
    q, k, v = qkv(L=200, B=1)
    module = SimpleNamespace(num_key_value_groups=2)
    assert stage.prefill_attention(module, q, k, v, None, SCALING, 0, chunk=24) is None
    assert stage.sample_stats()["attention_density"] == 1.0
    assert stage.prefill_attention(module, q, k, v, None, SCALING, 1) is not None  # a global layer: sparse
    global_pairs = 2 * 200 * 201 / 2
    computed = stage.sample_stats()["attention_density"] * (2 * chunk_pairs(200, 24) + global_pairs)
    assert 2 * chunk_pairs(200, 24) < computed < 2 * chunk_pairs(200, 24) + global_pairs


@pytest.mark.parametrize("family_name,named", [("gemma2", "softcap"), ("gpt-oss", "sinks"), ("llama4-text", "chunked")])
def test_a_stage_that_declares_no_terms_is_refused_on_such_models(family_name, named):
    """A plugin stage that computes attention itself but lists no `attention_terms` is refused, with
    the term it lacks named and a fix, on each kind of model; at ratio 0 it runs (dense throughout)."""
    from lcbench.engine.attach import attention_refusal
    from lcbench.methods.base import Stage

    class OwnAttention(Stage):
        name, family = "own_attention_test", "sparse_attention"

        def prefill_attention(self, module, query, key, value, mask, scaling, layer_idx, window=None):
            return None

    model, _ = _tiny(family_name)
    reason = attention_refusal(model, [OwnAttention(ratio=0.5)])
    assert reason and "computes attention itself" in reason and named in reason and "Fix:" in reason
    assert attention_refusal(model, [OwnAttention(ratio=0.0)]) is None
    assert attention_refusal(_tiny("llama")[0], [OwnAttention(ratio=0.5)]) is None
