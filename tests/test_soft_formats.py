"""Released formats of trained context compressors behind ``soft_compressor``: gist models (Mu et
al. 2023) and ICAE LoRA + memory-token checkpoints (Ge et al. 2024). Each test builds a tiny
checkpoint in the released layout (a tiny random llama as the base) and loads it through the
adapter's format detection; the math is checked against the paper's computation done by hand."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from helpers import make_sample
from hubserver import HubRepo, StandIn

from lcbench.engine import runner
from lcbench.engine.attach import use_lcbench_attention
from lcbench.engine.prompt import render
from lcbench.engine.runner import Engine, EngineConfig
from lcbench.errors import UserError
from lcbench.methods.chain import Chain, resolve_chain
from lcbench.methods.soft.formats import AutoCompressor, GistCompressor, ICAECompressor, detect, load_compressor
from lcbench.methods.soft.formats.source import resolve
from lcbench.models.tiny import tiny_llama, tiny_tokenizer

ARGS = {"format": "auto", "trust_code": False, "gist_tokens": 0, "lora_alpha": 32.0, "icae_token": "ft", "icae_rate": 0.0, "retriever": ""}


@pytest.fixture(scope="module")
def sample():
    return make_sample(n_turns=2, max_new_tokens=6)


def run(model, tok, sample, method, ratio, args=None, check=True):
    """The engine's records, each with the token ids it decoded under ``_ids``."""
    chain = Chain.build(resolve_chain(method, args, ratio), ratio)
    decoded, real = [], runner.greedy_decode
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "greedy_decode", lambda *a, **k: decoded.extend(real(*a, **k)) or decoded[-len(a[3]):])
        recs = Engine(model, tok, chain, EngineConfig(check_ratio=check)).run(sample, multi_turn=False)
    return [{**rec, "_ids": row.tokens} for rec, row in zip(recs, decoded)]


def context_ids(tok, sample) -> torch.Tensor:
    return torch.tensor([render(tok, sample, sample.context, False).context_ids])


# --- gist: a causal LM fine-tuned with <GIST>, saved by save_pretrained ---------------------------
def build_gist(folder, diff=False):
    """gisting's layout: the tokenizer gains the additional special token <GIST>, the model one
    embedding row (``weight_diff.add_zero_embedding_``, then trained: random here)."""
    tok = copy.deepcopy(tiny_tokenizer())
    tok.add_special_tokens({"additional_special_tokens": ["<GIST>"]})
    model = tiny_llama(seed=3)
    model.resize_token_embeddings(len(tok))
    with torch.no_grad():
        model.get_input_embeddings().weight[-1] = torch.randn(64, generator=torch.Generator().manual_seed(1)) * 0.2
        if diff:  # a weight diff against the base: every tensor ~0
            for p in model.parameters():
                p.mul_(1e-3)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def gist(tmp_path_factory):
    """(folder, model with lcbench attention, tokenizer) of a tiny gist checkpoint loaded from disk."""
    folder = build_gist(tmp_path_factory.mktemp("fmt") / "tiny-gist-1")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    use_lcbench_attention(model)
    return folder, model, AutoTokenizer.from_pretrained(folder)


def test_gist_kv_is_the_gist_positions_kv_of_context_then_gist_tokens(gist, sample):
    folder, model, tok = gist
    comp = load_compressor({**ARGS, "path": folder})
    assert isinstance(comp, GistCompressor) and comp.tokens == 1 and detect(resolve(folder)) == "gist"
    ids = context_ids(tok, sample)
    n = ids.shape[1]
    soft = comp.compress(model, ids, 0.5)
    assert soft.embeds is None and soft.positions.tolist() == [[n - 1]]
    gist_id = tok.convert_tokens_to_ids("<GIST>")
    with torch.no_grad():  # upstream's pass: context + <GIST>, plain causal mask, positions 0..n
        cache = DynamicCache()
        model(input_ids=torch.cat([ids, torch.tensor([[gist_id]])], 1), cache=cache, use_cache=True)
    for (k, v), layer in zip(soft.kv, cache.layers):
        assert k.shape == (1, 2, 1, 16)
        assert torch.allclose(v, layer.values[:, :, n:], atol=1e-5)  # values: RoPE-shift invariant
        assert not torch.allclose(k, layer.keys[:, :, n:], atol=1e-3)  # keys: rotated one place earlier
    two = load_compressor({**ARGS, "path": folder, "gist_tokens": 2}).compress(model, ids, 0.5)
    assert two.positions.tolist() == [[n - 2, n - 1]] and two.kv[0][0].shape[2] == 2


def test_gist_in_the_engine_the_question_reads_only_the_gist_slots(gist, sample):
    folder, model, tok = gist
    recs = run(model, tok, sample, "soft_compressor", 0.5, f"path={folder}")
    ids = context_ids(tok, sample)
    n = ids.shape[1]
    full = run(model, tok, sample, "full", 0.0)
    assert recs[0]["kv_bytes"] * n == full[0]["kv_bytes"]  # one slot of n: KV bytes measured
    assert recs[0]["achieved_ratio"] == pytest.approx(1 - 1 / n)
    soft = load_compressor({**ARGS, "path": folder}).compress(model, ids, 0.5)
    cache = DynamicCache()
    for i, (k, v) in enumerate(soft.kv):
        cache.update(k, v, i)
    q = torch.tensor([render(tok, sample, sample.context, False).turn_ids[0]])
    with torch.no_grad():
        logits = model(input_ids=q, position_ids=torch.arange(n, n + q.shape[1])[None], cache=cache).logits
    assert recs[0]["_ids"][0] == int(logits[0, -1].argmax())
    assert [r["_ids"] for r in run(model, tok, sample, "soft_compressor", 0.0, f"path={folder}")] == \
        [r["_ids"] for r in full]


def test_gist_refuses_another_target_and_a_weight_diff(gist, tiny, sample, tmp_path):
    folder, _, _ = gist
    model, tok = tiny
    with pytest.raises(UserError, match="not the gist model"):
        run(model, tok, sample, "soft_compressor", 0.5, f"path={folder}")
    diff = build_gist(tmp_path / "llama-7b-gist-1", diff=True)
    with pytest.raises(UserError, match="weight diff"):
        load_compressor({**ARGS, "path": diff})


def test_cli_runs_checkpoints_by_hub_id(gist, icae, tmp_path):
    """What a user runs: ``path=<hub id>`` through huggingface_hub (snapshot_download for the gist
    model's repo, hf_hub_download for one ICAE file of a repo), against the loopback stand-in;
    the format is detected from the downloaded files."""
    folder, _, _ = gist
    files = {p.name: p.read_bytes() for p in Path(folder).iterdir()}
    server = StandIn(repos={"standin/tiny-gist-1": HubRepo(files, "a" * 40),
                             "standin/icae": HubRepo({"tiny_ft_icae.safetensors": Path(icae[0]).read_bytes()}, "b" * 40)})
    server.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=server.endpoint, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_PROGRESS_BARS="1",
               OMP_NUM_THREADS="2")
    exe = shutil.which("lcbench")
    cmd = [exe] if exe else [sys.executable, "-m", "lcbench.cli"]
    from lcbench.results import read_records

    try:
        for name, model, path in (("gist", folder, "standin/tiny-gist-1"),
                                  ("icae", "tiny-random-llama", "standin/icae/tiny_ft_icae.safetensors")):
            proc = subprocess.run(cmd + ["run", "--model", model, "--method", "soft_compressor", "--method-args",
                                         f"path={path}", "--ratio", "0.5", "--task", "niah",
                                         "--task-args", "lengths=600,depths=50,max_new_tokens=2,haystack=filler",
                                         "--limit", "1", "--device", "cpu", "--output-path", str(tmp_path / name)],
                                  capture_output=True, text=True, env=env, timeout=300)
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert "Traceback" not in proc.stderr
            rec = read_records(next((tmp_path / name).glob("*/samples.jsonl")).parent)[0]
            assert rec["achieved_ratio"] > 0.99 if name == "gist" else rec["achieved_ratio"] == pytest.approx(0.5, abs=0.05)
            print(f"{name} via hub: achieved {rec['achieved_ratio']:.4f}")
    finally:
        server.stop()
    assert ("GET", "/api/models/standin/tiny-gist-1/revision/main") in server.log
    assert ("HEAD", "/standin/icae/resolve/main/tiny_ft_icae.safetensors") in server.log


# --- ICAE: LoRA (peft names) + memory-token embeddings in one safetensors file --------------------
MEM, RANK, ALPHA = 4, 4, 32.0


def build_icae(path, model):
    """The v2 release's tensors: peft's LoRA on q_proj/v_proj of every layer, and
    memory_token_embed (MEM memory tokens + AE, LM, FT)."""
    gen = torch.Generator().manual_seed(7)
    state = {"memory_token_embed.weight": torch.randn(MEM + 3, 64, generator=gen)}
    for i in range(len(model.model.layers)):
        for proj, out in (("q_proj", 64), ("v_proj", 32)):
            key = f"icae.base_model.model.model.layers.{i}.self_attn.{proj}"
            state[f"{key}.lora_A.default.weight"] = torch.randn(RANK, 64, generator=gen) * 0.1
            state[f"{key}.lora_B.default.weight"] = torch.randn(out, RANK, generator=gen) * 0.1
    save_file(state, str(path))
    return state


@pytest.fixture(scope="module")
def icae(tmp_path_factory, tiny):
    path = tmp_path_factory.mktemp("icae") / "tiny_ft_icae.safetensors"
    return str(path), build_icae(path, tiny[0])


def merged(state):
    """The tiny base with the LoRA merged by hand: W + alpha/r · B A."""
    model = tiny_llama()
    with torch.no_grad():
        for name, module in model.named_modules():
            key = f"icae.base_model.model.{name}.lora_A.default.weight"
            if key in state:
                module.weight += ALPHA / RANK * state[key.replace("lora_A", "lora_B")] @ state[key]
    return model


def test_icae_slots_are_the_lora_models_last_states_at_the_memory_tokens(icae, tiny, sample):
    path, state = icae
    model, tok = tiny
    comp = load_compressor({**ARGS, "path": path})
    assert isinstance(comp, ICAECompressor) and comp.mem_size == MEM and comp.scaling == ALPHA / RANK
    ids = context_ids(tok, sample)[:, :40]
    soft = comp.compress(model, ids, 0.5)  # keep 20: (20 - 1 FT) // 4 = 4 segments of 10 tokens
    assert soft.embeds.shape == (1, 4 * MEM + 1, 64) and soft.positions.tolist() == [list(range(40 - 17, 40))]
    ref, memory = merged(state), state["memory_token_embed.weight"]
    with torch.no_grad():
        for s in range(4):
            x = torch.cat([ref.get_input_embeddings()(ids[:, 10 * s:10 * s + 10]), memory[None, :MEM]], 1)
            want = ref(inputs_embeds=x, output_hidden_states=True).hidden_states[-1][0, -MEM:]
            assert torch.allclose(soft.embeds[0, MEM * s:MEM * s + MEM], want, atol=1e-4)
        assert torch.equal(soft.embeds[0, -1], memory[MEM + 2])  # the FT token closes the slots
        # the hooks are gone: the target (the frozen decoder) is the base model again
        plain = tiny_llama()(input_ids=ids).logits
        assert torch.allclose(model(input_ids=ids).logits, plain, atol=1e-5)
    upstream = load_compressor({**ARGS, "path": path, "icae_rate": 4.0}).compress(model, ids, 0.0)
    assert upstream.embeds.shape[1] == 3 * MEM + 1  # ceil(40 / (4 · 4)) = 3 segments


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 0.9])
def test_icae_in_the_engine_meets_the_ratio(icae, tiny, sample, ratio):
    path, _ = icae
    model, tok = tiny
    recs = run(model, tok, sample, "soft_compressor", ratio, f"path={path}")
    assert ratio - 0.05 <= recs[0]["achieved_ratio"] <= ratio + MEM / len(context_ids(tok, sample)[0]) + 0.01
    print(f"icae ratio {ratio}: achieved {recs[0]['achieved_ratio']:.4f}")


def test_icae_decoder_reads_slots_then_question_without_the_lora(icae, tiny, sample):
    path, _ = icae
    model, tok = tiny
    recs = run(model, tok, sample, "soft_compressor", 0.75, f"path={path}")
    ids = context_ids(tok, sample)
    n = ids.shape[1]
    soft = load_compressor({**ARGS, "path": path}).compress(model, ids, 0.75)
    q = torch.tensor([render(tok, sample, sample.context, False).turn_ids[0]])
    embeds = torch.cat([soft.embeds, model.get_input_embeddings()(q)], 1)
    pos = torch.cat([soft.positions, torch.arange(n, n + q.shape[1])[None]], 1)
    with torch.no_grad():
        first = model(inputs_embeds=embeds, position_ids=pos).logits[0, -1].argmax()
    assert recs[0]["_ids"][0] == int(first)
    full = run(model, tok, sample, "full", 0.0)
    assert [r["_ids"] for r in run(model, tok, sample, "soft_compressor", 0.0, f"path={path}")] == \
        [r["_ids"] for r in full]


def test_icae_refuses_a_mismatched_target_and_ambiguous_folders(icae, tmp_path, sample):
    path, state = icae
    other = tiny_llama(hidden_size=32, head_dim=8)
    use_lcbench_attention(other)
    with pytest.raises(UserError, match="hidden size|matching base model"):
        load_compressor({**ARGS, "path": path}).compress(other, torch.arange(3, 60)[None], 0.5)
    shutil.copy(path, tmp_path / "a.safetensors")
    shutil.copy(path, tmp_path / "b.safetensors")
    with pytest.raises(UserError, match="several ICAE checkpoints"):
        load_compressor({**ARGS, "path": str(tmp_path)})


def test_source_errors_name_the_fix(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="neither an existing"):
        resolve(str(tmp_path / "missing"))
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)  # the released checkpoints, offline with an empty cache
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf"))
    for released in ("sggetao/icae/mistral_7b_ft_icae.safetensors", "jayelm/llama-7b-gist-1"):
        with pytest.raises(UserError, match="not in the Hugging Face cache"):
            resolve(released)


# --- xRAG: an XMistral folder (frozen LLM + <xRAG> token + projector) and a retriever ---------------
@pytest.fixture(scope="module")
def xrag(tmp_path_factory, tiny):
    """(folder, retriever folder, projector tensors): the target's own weights (xRAG's LLM is
    frozen) plus ``projector.projector.{0,2}`` (mlp2x_gelu) in one safetensors, the config naming
    projector_type / retriever_hidden_size, a tokenizer with <xRAG>; a 32-wide tiny retriever."""
    root = tmp_path_factory.mktemp("xrag")
    retriever = tiny_llama(seed=5, hidden_size=32, head_dim=8, intermediate_size=64)
    retriever.save_pretrained(root / "retriever")
    base = tiny_llama()
    gen = torch.Generator().manual_seed(11)
    proj = {"projector.projector.0.weight": torch.randn(64, 32, generator=gen) * 0.3,
            "projector.projector.0.bias": torch.randn(64, generator=gen) * 0.1,
            "projector.projector.2.weight": torch.randn(64, 64, generator=gen) * 0.2,
            "projector.projector.2.bias": torch.randn(64, generator=gen) * 0.1}
    folder = root / "xrag-tiny"
    base.config.projector_type, base.config.retriever_hidden_size = "mlp2x_gelu", 32
    base.config.architectures = ["XMistralForCausalLM"]
    base.config.save_pretrained(folder)
    save_file({**{k: v.contiguous() for k, v in base.state_dict().items()}, **proj}, str(folder / "model.safetensors"))
    tok = copy.deepcopy(tiny_tokenizer())
    tok.add_special_tokens({"additional_special_tokens": ["<xRAG>"]})
    tok.save_pretrained(folder)
    return str(folder), str(root / "retriever"), proj


def test_xrag_one_token_per_passage_is_the_projected_retriever_embedding(xrag, tiny, sample):
    folder, retriever, proj = xrag
    model, tok = tiny
    comp = load_compressor({**ARGS, "path": folder, "retriever": retriever})
    assert detect(resolve(folder)) == "xrag"
    ids = context_ids(tok, sample)
    n = ids.shape[1]
    soft = comp.compress(model, ids, 0.9)
    m = round(n * 0.1)
    assert soft.embeds.shape == (1, m, 64) and soft.positions.tolist() == [list(range(n - m, n))]
    ret = AutoModelForCausalLM.from_pretrained(retriever).model.eval()
    with torch.no_grad():
        for i in (0, m - 1):
            last = ret(input_ids=ids[:, i * n // m:(i + 1) * n // m]).last_hidden_state[0, -1]
            h = torch.nn.functional.gelu(last @ proj["projector.projector.0.weight"].T + proj["projector.projector.0.bias"])
            want = h @ proj["projector.projector.2.weight"].T + proj["projector.projector.2.bias"]
            assert torch.allclose(soft.embeds[0, i], want, atol=1e-4)
    capped = comp.compress(model, ids, 0.999)  # no passage longer than upstream's 180 retriever tokens
    assert capped.embeds.shape[1] == math.ceil(n / 180)


@pytest.mark.parametrize("ratio", [0.5, 0.9])
def test_xrag_in_the_engine_meets_the_ratio(xrag, tiny, sample, ratio):
    folder, retriever, _ = xrag
    model, tok = tiny
    recs = run(model, tok, sample, "soft_compressor", ratio, f"path={folder},retriever={retriever}")
    assert recs[0]["achieved_ratio"] == pytest.approx(ratio, abs=0.01)
    print(f"xrag ratio {ratio}: achieved {recs[0]['achieved_ratio']:.4f}")
    if ratio == 0.5:
        full = run(model, tok, sample, "full", 0.0)
        zero = run(model, tok, sample, "soft_compressor", 0.0, f"path={folder},retriever={retriever}")
        assert [r["_ids"] for r in zero] == [r["_ids"] for r in full]


def test_xrag_refuses_a_retriever_with_another_vocabulary(xrag, tiny, sample, tmp_path):
    folder, _, _ = xrag
    model, tok = tiny
    tiny_llama(seed=5, hidden_size=32, head_dim=8, intermediate_size=64, vocab_size=100).save_pretrained(tmp_path / "r")
    with pytest.raises(UserError, match="tokenizer"):
        load_compressor({**ARGS, "path": folder, "retriever": str(tmp_path / "r")}).compress(model, context_ids(tok, sample), 0.5)


# --- AutoCompressor: a fine-tuned llama + embed_summary, summary_length in config.json ------------
SUMMARY = 3


@pytest.fixture(scope="module")
def autocompressor(tmp_path_factory):
    """(folder, target with lcbench attention, plain reference model): LlamaAutoCompressorModel's
    layout (the llama weights + ``embed_summary.weight``; summary_length / accumulate_summary in the config)."""
    folder = tmp_path_factory.mktemp("ac") / "autocompressor-tiny"
    model = tiny_llama(seed=4)
    model.config.summary_length, model.config.accumulate_summary = SUMMARY, True
    model.config.architectures = ["LlamaAutoCompressorModel"]
    model.config.save_pretrained(folder)
    summary = torch.randn(SUMMARY, 64, generator=torch.Generator().manual_seed(2)) * 0.2
    save_file({**{k: v.contiguous() for k, v in model.state_dict().items()}, "embed_summary.weight": summary},
              str(folder / "model.safetensors"))
    tiny_tokenizer().save_pretrained(folder)
    target = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    use_lcbench_attention(target)
    return str(folder), target, model, summary


def test_autocompressor_summaries_accumulate_over_segments(autocompressor, tiny, sample):
    folder, target, ref, summary = autocompressor
    _, tok = tiny
    comp = load_compressor({**ARGS, "path": folder})
    assert isinstance(comp, AutoCompressor) and comp.accumulate and detect(resolve(folder)) == "autocompressor"
    ids = context_ids(tok, sample)[:, :40]
    soft = comp.compress(target, ids, 0.7)  # keep 12 = 4 segments × 3 summary vectors
    assert soft.embeds.shape == (1, 4 * SUMMARY, 64) and soft.positions.tolist() == [list(range(40 - 12, 40))]
    prompt = torch.zeros(1, 0, 64)
    with torch.no_grad():  # upstream's recurrence: [summaries so far, segment, summary tokens] → last states
        for s in range(4):
            x = torch.cat([prompt, ref.get_input_embeddings()(ids[:, 10 * s:10 * s + 10]), summary[None]], 1)
            prompt = torch.cat([prompt, ref(inputs_embeds=x, output_hidden_states=True).hidden_states[-1][:, -SUMMARY:]], 1)
    assert torch.allclose(soft.embeds, prompt, atol=1e-4)


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_autocompressor_in_the_engine_meets_the_ratio_and_refuses_another_target(autocompressor, tiny, sample, ratio):
    folder, target, _, _ = autocompressor
    _, tok = tiny
    recs = run(target, tok, sample, "soft_compressor", ratio, f"path={folder}")
    assert ratio - 0.05 <= recs[0]["achieved_ratio"] <= ratio + SUMMARY / len(context_ids(tok, sample)[0]) + 0.01
    print(f"autocompressor ratio {ratio}: achieved {recs[0]['achieved_ratio']:.4f}")
    if ratio == 0.5:
        assert [r["_ids"] for r in run(target, tok, sample, "soft_compressor", 0.0, f"path={folder}")] == \
            [r["_ids"] for r in run(target, tok, sample, "full", 0.0)]
        with pytest.raises(UserError, match="not the AutoCompressor"):
            run(tiny[0], tok, sample, "soft_compressor", 0.5, f"path={folder}")
