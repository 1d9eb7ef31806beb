"""KV sharing (Gemma-3n, Gemma-4: engine/kv_sharing.py): the last layers reuse an earlier layer's keys
and values and cache none of their own. What a user relies on: `full` equals model.generate (the
architecture matrix, tests/test_architectures.py), the reusing layers hold no bytes, a compressing
prefill's output is the uncompressed one (the reusing layers saw what their producer saw), and on
later passes every layer attends over the kept tokens exactly as transformers does over a cache
cut to the same positions."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import DynamicCache

from lcbench.engine.attach import hybrid_refusal, use_lcbench_attention
from lcbench.engine.decode import forward
from lcbench.engine.state import QUESTION
from lcbench.methods.chain import Chain, resolve_chain
from lcbench.models.families import build, family
from lcbench.models.hook import geometry
from lcbench.models.tiny import tiny_tokenizer
from tests.conftest import engine_for

# only global layers, so that transformers' mask over a cut cache (every kept slot visible) is the reference
GLOBAL = dataclasses.replace(family("gemma4-text-kv-shared"), name="gemma4-global-kv-shared",
                             overrides={**family("gemma4-text-kv-shared").overrides,
                                        "layer_types": ["full_attention"] * 4})


def _ids(n: int = 120) -> list[int]:
    return torch.randint(5, len(tiny_tokenizer()) - 1, (n,), generator=torch.Generator().manual_seed(1)).tolist()


def _attached(fam):
    model = build(fam, "sdpa")
    use_lcbench_attention(model)
    return model


@pytest.mark.parametrize("name", ["gemma4-text-kv-shared", "gemma3n-text-kv-shared"])
def test_reusing_layers_hold_nothing_and_a_compressing_prefill_sees_the_whole_context(name):
    model, tok = _attached(family(name)), tiny_tokenizer()
    g = geometry(model)
    assert g.reused == (2, 3) and g.bytes_per_token[2:] == (0, 0) and all(g.bytes_per_token[:2])
    ids = _ids()
    full = engine_for(model, tok).prefill([ids])
    kept = engine_for(model, tok, "snapkv", 0.75, "window_size=8").prefill([ids])
    # the reusing layers of the compressing pass attended over the producers' whole KV, as in the
    # model: the pass's output is the uncompressed one, bit for bit
    assert torch.equal(full.logits, kept.logits)
    assert [layer.nbytes() for layer in kept.cache.layers[2:]] == [0, 0]
    assert kept.cache.layers[1].seq_len() < full.cache.layers[1].seq_len()


def test_later_passes_attend_over_the_kept_tokens_as_transformers_does():
    """After snapkv keeps a quarter of the context, a question pass through lcbench equals plain
    transformers (SDPA) over a DynamicCache cut to the positions lcbench kept per layer and head:
    the reusing layers see their producer's kept tokens, nothing else."""
    model, tok = _attached(GLOBAL), tiny_tokenizer()
    reference = build(GLOBAL, "sdpa")
    ids, question = _ids(), _ids(140)[-7:]
    engine = engine_for(model, tok, "snapkv", 0.75, "window_size=8")
    cache = engine.prefill([ids]).cache
    kept_slots = [cache.layers[i].positions for i in (0, 1)]  # (1, H, K): true positions (none dropped before)
    state = engine.forward_state(cache)
    state.phase = QUESTION
    n = len(ids)
    pos = torch.arange(n, n + len(question))[None]
    with torch.inference_mode():
        got = forward(model, torch.tensor([question]), pos, state)

        ref_cache = DynamicCache(config=reference.config)
        reference(input_ids=torch.tensor([ids]), cache=ref_cache, use_cache=True)
        for i, kept in enumerate(kept_slots):  # the layers with a cache of their own
            assert kept.shape[-1] < n // 2
            layer = ref_cache.layers[i]
            layer.keys = layer.keys.gather(2, kept[..., None].expand(-1, -1, -1, layer.keys.shape[-1]))
            layer.values = layer.values.gather(2, kept[..., None].expand(-1, -1, -1, layer.values.shape[-1]))
        want = reference(input_ids=torch.tensor([question]), position_ids=pos, cache=ref_cache,
                         use_cache=True).logits[:, -1]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    uncut = engine_for(model, tok).prefill([ids]).cache
    state = engine.forward_state(uncut)
    state.phase = QUESTION
    with torch.inference_mode():
        whole = forward(model, torch.tensor([question]), pos, state)
    assert not torch.allclose(whole, want, atol=1e-3)  # the cut is visible: the check can fail


def test_methods_that_walk_every_layer_are_refused_with_the_reason():
    model = _attached(family("gemma4-text-kv-shared"))
    stages = Chain.build(resolve_chain("duoattention", None, 0.5)).stages
    reason = hybrid_refusal(model, stages)
    assert reason and "KV sharing" in reason and "2 of" in reason and "Fix:" in reason
    assert hybrid_refusal(model, Chain.build(resolve_chain("snapkv", None, 0.5)).stages) is None


def test_multi_turn_goes_back_to_the_context_on_every_layer():
    """Turns over one context (SCBench-style): each turn's records equal the turn asked alone."""
    from lcbench import architectures as support

    model, tok = _attached(family("gemma4-text-kv-shared")), tiny_tokenizer()
    s = support.sample()
    together = engine_for(model, tok, "snapkv", 0.5, "window_size=8").run(s, True)
    for k, turn in enumerate(s.turns):
        alone = engine_for(model, tok, "snapkv", 0.5, "window_size=8").run(
            dataclasses.replace(s, turns=s.turns[:k + 1]), True)[-1]
        assert together[k]["prediction"] == alone["prediction"], k


def test_runs_sharing_a_prefill_equal_each_run_alone(tmp_path):
    """`lcbench run` of several methods on a KV-sharing checkpoint: one prefill per context, the runs'
    turns decoded as one batch (their layers side by side), every record equal to the run alone —
    and to the run prefilling its two contexts as one left-padded batch."""
    import shutil
    import subprocess
    import sys

    from lcbench.results import read_records

    folder = tmp_path / "gemma4"
    build(family("gemma4-text-kv-shared")).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    exe = shutil.which("lcbench")
    cmd = [exe] if exe else [sys.executable, "-m", "lcbench.cli"]
    args = ["run", "--model", str(folder), "--task", "niah", "--task-args",
            "lengths=320,depths=25;75,haystack=filler,max_new_tokens=6", "--device", "cpu",
            "--method", "snapkv,streamingllm,kivi", "--ratio", "0.5"]
    runs = {}
    for name, extra in (("shared", []), ("alone", ["--share-prefill", "off"]),
                        ("batched", ["--share-prefill", "off", "--batch-size", "2"])):
        proc = subprocess.run(cmd + args + extra + ["--output-path", str(tmp_path / name)], capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        runs[name] = {f.name: read_records(f) for f in (tmp_path / name).iterdir() if f.is_dir()}
    assert runs["shared"].keys() == runs["alone"].keys() and len(runs["shared"]) == 3
    for run, records in runs["alone"].items():
        for a, b, c in zip(runs["shared"][run], records, runs["batched"][run], strict=True):
            assert a.decoded_ids == b.decoded_ids == c.decoded_ids, run
            assert a.measured.kv_bytes == b.measured.kv_bytes == c.measured.kv_bytes, run
            assert a.measured.kv_bytes_full == b.measured.kv_bytes_full == c.measured.kv_bytes_full, run
            assert a.measured.shared_prefill is True, run
    snapkv = next(run for run in runs["batched"] if "snapkv" in run)
    assert [r.measured.batch_samples for r in runs["batched"][snapkv]] == [2, 2]  # the contexts were one batch
