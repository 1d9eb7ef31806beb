"""Native lcbench methods for kvpress presses the bridge refuses (issue #15): simlayerkv,
duoattention, dms, kvzip. Each: a behavioural test on a constructed input (what the paper promises
to keep) and, where kvpress's press can run on a fixed input, a parity test that the native method
keeps kvpress's exact positions (kvpress's forward hook on the plain SDPA tiny model, kept positions
read as in tests/test_kvpress_presses.py). test_dropping.py checks the ratio knob and ratio 0 == full.
"""

from __future__ import annotations

import pytest
import torch
from test_dropping import chain, kept_positions, model, prefill, tok  # noqa: F401  (fixtures)
from test_kvpress_presses import ids, kvpress_reference, sdpa_model  # noqa: F401  (fixtures)

from lcbench.cache.layer import DenseLayer
from lcbench.engine.decode import forward
from lcbench.engine.state import DECODE, QUESTION, ForwardState
from lcbench.engine.timing import Stopwatch
from lcbench.errors import UserError
from lcbench.methods.base import LayerObservation
from lcbench.methods.chain import resolve_chain

kvpress = pytest.importorskip("kvpress")
torch.set_num_threads(1)


def dense_layer(b: int, h: int, n: int, d: int = 4, seed: int = 0) -> DenseLayer:
    gen = torch.Generator().manual_seed(seed)
    layer = DenseLayer()
    layer.append(torch.randn((b, h, n, d), generator=gen), torch.randn((b, h, n, d), generator=gen),
                 torch.arange(n)[None].expand(b, -1), None)
    return layer


# --- simlayerkv ---------------------------------------------------------------------------------
def sink_recent_attention(n: int, lazy: bool, hq: int = 2, w: int = 1) -> torch.Tensor:
    """(1, hq, w, n) attention of the last queries: on sinks + recent tokens (lazy) or spread evenly."""
    attn = torch.full((1, hq, w, n), 1.0 / n)
    if lazy:
        attn.zero_()
        attn[..., :4] = 0.1
        attn[..., n - 9: n - 1] = 0.6 / 8
    return attn


def test_simlayerkv_ratio_mode_cuts_the_most_lazy_layer_to_sinks_and_recent():
    stage = chain("simlayerkv", 0.25, "n_recent=9,n_last=1").stages[0]
    stage.begin_sample()
    n, layers = 100, []
    for idx, lazy in enumerate((False, True, False)):
        layer = dense_layer(1, 2, n, seed=idx)
        seen = LayerObservation(idx, 3, 1, n, window_attention=sink_recent_attention(n, lazy))
        layers.append(stage.compress_layer(layer, seen))
        if idx < 2:  # nothing is cut before every layer was scored
            assert layers[-1].seq_len() == n
    assert stage.lazy_layers == [1]
    assert stage.layer_scores[1] == pytest.approx(1.0) and stage.layer_scores[0] < 0.2
    assert [layers[0].seq_len(), layers[2].seq_len()] == [n, n]
    kept = kept_positions(layers[1], head=1)
    drop = 300 - 3 * 75  # the layers' total drop, all taken from the one lazy layer
    assert len(kept) == n - drop and kept[:4] == [0, 1, 2, 3]
    assert kept[4:] == list(range(n - len(kept) + 4, n))  # sinks, then the latest tokens


def test_simlayerkv_ratio_mode_adds_lazy_layers_in_laziness_order():
    from lcbench.methods.dropping.simlayerkv import lazy_allocation

    # window 40: each layer can give up 100 - 4 - 40 = 56 tokens; the most lazy go first
    assert lazy_allocation([0.2, 0.9, 0.5], [100] * 3, 0, 0.15, 4, 40) == {1: 55}
    assert sorted(lazy_allocation([0.2, 0.9, 0.5], [100] * 3, 0, 0.3, 4, 40)) == [1, 2]
    allocation = lazy_allocation([0.2, 0.9, 0.5], [100] * 3, 0, 0.5, 4, 40)
    assert sorted(allocation) == [0, 1, 2] and sum(100 - k for k in allocation.values()) == 150
    narrowed = lazy_allocation([0.2, 0.9, 0.5], [100] * 3, 0, 0.9, 4, 40)  # the window must shrink
    assert sum(100 - k for k in narrowed.values()) == 270 and all(k >= 5 for k in narrowed.values())


def test_simlayerkv_threshold_mode_keeps_kvpress_positions(model, sdpa_model, ids):  # noqa: F811
    args = "mode=threshold,n_recent=48,n_initial=4,n_last=1"
    ch = chain("simlayerkv", 0.0, args + ",lazy_threshold=0.0")  # every layer lazy: their scores
    prefill(model, ch, ids)
    scores = ch.stages[0].layer_scores
    assert len(scores) == 2 and scores[0] != scores[1]
    threshold = (scores[0] + scores[1]) / 2  # one layer lazy, the other not
    press = kvpress.SimLayerKVPress(lazy_threshold=threshold, n_recent=48, n_initial=4, n_last=1)
    reference = kvpress_reference(sdpa_model, ids, press)
    ch = chain("simlayerkv", 0.0, args + f",lazy_threshold={threshold}")
    cache, _ = prefill(model, ch, ids)
    lazy = max(scores, key=scores.get)
    assert ch.stages[0].lazy_layers == [lazy]
    for layer_idx, (layer, (positions, _)) in enumerate(zip(cache.layers, reference)):
        for head, expect in enumerate(positions):
            assert kept_positions(layer, head=head) == expect, (layer_idx, head)
    assert len(reference[lazy][0][0]) == 4 + 47 and len(reference[1 - lazy][0][0]) == len(ids)


def test_simlayerkv_refuses_a_window_not_longer_than_n_last():
    with pytest.raises(UserError, match="n_recent"):
        resolve_chain("simlayerkv", "n_recent=4,n_last=4", 0.5)


def test_simlayerkv_ratio_mode_must_be_the_last_cache_stage():
    """Its cut waits for the last layer, so a cache stage after it would act on uncut layers."""
    from lcbench.methods.chain import Chain

    with pytest.raises(UserError, match="last among the cache stages.*kivi\\+simlayerkv"):
        Chain.build(resolve_chain("simlayerkv+kivi", None, 0.5))
    assert [s.name for s in Chain.build(resolve_chain("kivi+simlayerkv", None, 0.5)).stages] == ["kivi", "simlayerkv"]
    Chain.build(resolve_chain("simlayerkv+kivi", "simlayerkv.mode=threshold", 0.5))  # threshold mode cuts at once


# --- duoattention --------------------------------------------------------------------------------
CALIBRATION_TEXTS = ["The quick brown fox jumps over the lazy dog. " * 12,
                     "Read the following text carefully. The special magic number is 4217. " * 8,
                     "A long time ago the river ran past the mill and the town grew around it. " * 6]


@pytest.fixture(scope="module")
def texts_file(tmp_path_factory):
    import json

    path = tmp_path_factory.mktemp("duo") / "samples.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in CALIBRATION_TEXTS))
    return path


@pytest.fixture(scope="module")
def kvpress_duo_scores(sdpa_model, tok):  # noqa: F811
    """kvpress's on-the-fly DuoAttention scores on CALIBRATION_TEXTS (its hub loaders stood in for)."""
    import pandas as pd
    from kvpress.presses import duo_attention_press as duo

    class Frame:
        def to_pandas(self):
            return pd.DataFrame({"chapter": CALIBRATION_TEXTS})

    mp = pytest.MonkeyPatch()
    mp.setattr(duo, "load_dataset", lambda *a, **k: Frame())
    mp.setattr(duo.AutoTokenizer, "from_pretrained", lambda *a, **k: tok)
    try:
        return duo.duo_attention_on_the_fly.__wrapped__(sdpa_model, num_samples=len(CALIBRATION_TEXTS), q_len=500)
    finally:
        mp.undo()


DUO_ARGS = "mode=heads,head_fraction=0.5,sink_size=8,recent_size=32,num_samples=3,sample_tokens=0,texts="


def test_duoattention_calibration_equals_kvpress_on_the_fly_scores(model, tok, texts_file, kvpress_duo_scores):  # noqa: F811
    stage = chain("duoattention", 0.0, DUO_ARGS + str(texts_file)).stages[0]
    scores = stage.calibrate(model, tok)["scores"]
    assert scores.shape == (2, 2)
    assert torch.allclose(scores, torch.from_numpy(kvpress_duo_scores).float(), atol=1e-6)


def test_duoattention_heads_mode_keeps_kvpress_positions(model, sdpa_model, tok, ids, texts_file,  # noqa: F811
                                                        kvpress_duo_scores, monkeypatch):
    from kvpress.presses import duo_attention_press as duo

    monkeypatch.setattr(duo, "duo_attention_on_the_fly", lambda m: kvpress_duo_scores)
    press = kvpress.DuoAttentionPress(head_compression_ratio=0.5, on_the_fly_scoring=True)
    press.post_init_from_model(sdpa_model)
    press.sink_size, press.recent_size = 8, 32  # kvpress fixes 128 + 256: longer than this context
    press.post_init_from_model = lambda m: None  # kvpress_reference must not reset them
    reference = kvpress_reference(sdpa_model, ids, press)
    ch = chain("duoattention", 0.0, DUO_ARGS + str(texts_file))
    ch.stages[0].calibration = ch.stages[0].calibrate(model, tok)
    cache, _ = prefill(model, ch, ids)
    streaming = 0
    for layer_idx, (layer, (positions, _)) in enumerate(zip(cache.layers, reference)):
        for head, expect in enumerate(positions):
            assert kept_positions(layer, head=head) == expect, (layer_idx, head)
            streaming += len(expect) == 40
    assert streaming == 2  # half of the 4 KV heads


def test_duoattention_ratio_mode_streams_the_lowest_scoring_heads():
    stage = chain("duoattention", 0.3, "sink_size=4,recent_size=16").stages[0]
    stage.calibration = {"scores": torch.tensor([[0.9, 0.2, 0.8], [0.1, 0.7, 0.6]])}  # 2 layers × 3 KV heads
    stage.begin_sample()
    n = 100
    kept = {}
    for idx in range(2):
        layer = stage.compress_layer(dense_layer(1, 3, n, seed=idx), LayerObservation(idx, 2, 1, n))
        kept.update({(idx, h): kept_positions(layer, head=h) for h in range(3)})
    # 0.3 of 6 × 100 = 180 tokens: two heads can give 80 each, so three stream: (1,0), (0,1), (1,2)
    streaming = {unit for unit, pos in kept.items() if len(pos) < n}
    assert streaming == {(1, 0), (0, 1), (1, 2)}
    assert sum(n - len(kept[u]) for u in streaming) == 180
    for unit in streaming:
        assert kept[unit][:4] == [0, 1, 2, 3] and kept[unit][4:] == list(range(n - len(kept[unit]) + 4, n))
    assert all(kept[u] == list(range(n)) for u in kept if u not in streaming)


def test_duoattention_reads_a_trained_pattern(model, tok, tmp_path):  # noqa: F811
    import json

    (tmp_path / "full_attention_heads.tsv").write_text("0.9\t-0.5\n1.7\t0.3\n")
    (tmp_path / "config.json").write_text(json.dumps({"sink_size": 16, "recent_size": 64}))
    stage = chain("duoattention", 0.5, f"pattern={tmp_path}").stages[0]
    stage.calibration = stage.calibrate(model, tok)
    assert stage.calibration["scores"].tolist() == [[pytest.approx(0.9), 0.0], [1.0, pytest.approx(0.3)]]
    assert stage.window() == (16, 64) and stage.streaming_order()[0] == (0, 1)
    (tmp_path / "full_attention_heads.tsv").write_text("0.9\t0.5\t0.1\n")
    with pytest.raises(UserError, match="KV heads"):
        stage.calibrate(model, tok)


# --- dms -------------------------------------------------------------------------------------
def test_dms_threshold_mode_keeps_kvpress_positions(model, sdpa_model, ids):  # noqa: F811
    full, _ = prefill(model, chain("full", 0.0), ids)
    norms = torch.linalg.vector_norm(full.layers[0].keys[0, :, :-64].float(), dim=-1)
    threshold = float(-norms.median())  # layer 0 loses about half its old tokens
    press = kvpress.DMSPress(press=kvpress.KnormPress(), threshold=threshold, sliding_window_size=64)
    reference = kvpress_reference(sdpa_model, ids, press)
    cache, _ = prefill(model, chain("dms", 0.0, f"mode=threshold,threshold={threshold},sliding_window_size=64"), ids)
    sizes = set()
    for layer_idx, (layer, (positions, _)) in enumerate(zip(cache.layers, reference)):
        for head, expect in enumerate(positions):
            got = kept_positions(layer, head=head)
            assert got == expect, (layer_idx, head)
            assert got[-64:] == list(range(len(ids) - 64, len(ids)))  # the sliding window is kept
            sizes.add(len(got))
    assert len(sizes) > 1 and min(sizes) < len(ids)  # heads keep different numbers of tokens


def test_dms_ratio_mode_shares_one_threshold_over_the_heads_and_keeps_the_window():
    stage = chain("dms", 0.5, "sliding_window_size=10").stages[0]
    layer = dense_layer(1, 2, 60)
    keys = torch.ones((1, 2, 60, 4))
    keys[0, 0] *= 3.0  # head 0: large key norms (low knorm scores) everywhere...
    keys[0, 0, 5] = 0.1  # ...but one token
    layer.keys = keys
    kept = stage.compress_layer(layer, LayerObservation(0, 1, 1, 60))
    head0, head1 = kept_positions(kept, head=0), kept_positions(kept, head=1)
    # 60 of the 120 tokens go: head 0's 49 evictable low scorers first, then 11 of head 1's
    assert head0 == [5] + list(range(50, 60))
    assert len(head1) == 60 - 11 and head1[-10:] == list(range(50, 60))
    assert len(head0) + len(head1) == 60


def test_dms_decoding_needs_threshold_mode_and_knorm():
    for args in ("decoding=true", "decoding=true,mode=threshold,scorer=snapkv"):
        with pytest.raises(UserError, match="decoding=true .* needs mode=threshold and scorer=knorm"):
            chain("dms", 0.5, args)
    assert chain("dms", 0.5).stages[0].stages == ("cache",)  # prefill-only: no decode stage
    assert chain("dms", 0.0, "decoding=true,mode=threshold").stages[0].stages == ("cache", "decode")


def kvpress_dms_evicted(model, parts: list[list[int]], press) -> list[list[set[int]]]:
    """kvpress's DMSPress(decoding=True) hooked on the plain SDPA model, fed ``parts`` one pass
    each (the context, the question, then one token per step), its masked keys used in attention
    by kvpress's own attention patch: per layer, per KV head, the evicted positions."""
    def hook(module, args, kwargs, output):
        q = kwargs["hidden_states"].shape[1]
        past = kwargs["cache"].get_seq_length(module.layer_idx) - q
        kwargs = {**kwargs, "past_key_values": kwargs["cache"], "cache_position": torch.arange(past, past + q)}
        return press.forward_hook(module, args, kwargs, output)

    from transformers import DynamicCache

    press.post_init_from_model(model)
    hooks = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in model.model.layers]
    cache, start = DynamicCache(), 0
    try:
        with torch.no_grad():
            for part in parts:
                model(input_ids=torch.tensor([part]), position_ids=torch.arange(start, start + len(part))[None],
                      cache=cache, use_cache=True)
                start += len(part)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for layer in model.model.layers:
        heads = [set() for _ in range(model.config.num_key_value_heads)]
        masked = layer.self_attn.masked_key_indices
        for head, slot in zip(masked[1].tolist(), masked[2].tolist()):
            heads[head].add(slot)
        layer.self_attn.masked_key_indices = None
        out.append(heads)
    return out


def test_dms_decoding_evicts_kvpress_positions(model, sdpa_model, tok, ids):  # noqa: F811
    """Context, question and 20 fed tokens with a 16-token window: every token that leaves the
    window (the context's protected tail, the question, the first generated ones) is judged on its
    own key; lcbench evicts exactly kvpress's positions in every layer and head, and its end cache
    holds only the survivors."""
    window = 16
    question = tok(" What is the special magic number?", add_special_tokens=False)["input_ids"]
    fed = ids[5:25]
    full, _ = prefill(model, chain("full", 0.0), ids)
    threshold = float(-torch.linalg.vector_norm(full.layers[0].keys[0].float(), dim=-1).median())
    press = kvpress.DMSPress(press=kvpress.KnormPress(), threshold=threshold, sliding_window_size=window,
                             decoding=True)
    reference = kvpress_dms_evicted(sdpa_model, [ids, question, *([t] for t in fed)], press)

    ch = chain("dms", 0.0, f"mode=threshold,threshold={threshold},sliding_window_size={window},decoding=true")
    cache, _ = prefill(model, ch, ids)
    prefill_kept = [[len(kept_positions(layer, head=h)) for h in range(2)] for layer in cache.layers]
    state = ForwardState(cache=cache, stages=ch.stages, needs=ch.needs, timer=Stopwatch("cpu"))
    n = len(ids)
    with torch.inference_mode():
        state.phase = QUESTION
        forward(model, torch.tensor([question]), torch.arange(n, n + len(question))[None], state)
        state.phase = DECODE
        for i, t in enumerate(fed):
            forward(model, torch.tensor([[t]]), torch.tensor([[n + len(question) + i]]), state)
    total = n + len(question) + len(fed)
    judged_late = set(range(n - window, total - window))  # left the window after the prefill
    late_evictions = 0
    for layer_idx, (layer, heads) in enumerate(zip(cache.layers, reference)):
        for head, evicted in enumerate(heads):
            kept = kept_positions(layer, head=head)
            assert set(range(total)) - set(kept) == evicted, (layer_idx, head)
            assert kept[-window:] == list(range(total - window, total))  # the window is never judged
            late_evictions += len(evicted & judged_late)
        assert [len(kept_positions(layer, head=h)) for h in range(2)] != prefill_kept[layer_idx]
    assert late_evictions > 0 and cache.nbytes() < full.nbytes()


@pytest.mark.parametrize("multi_turn", [False, True])
def test_dms_decoding_with_a_zero_threshold_keeps_a_rolling_window(model, tok, multi_turn):  # noqa: F811
    """Every knorm score is below 0: each token goes as it leaves the window, so after the
    prefill, the question and every generated token the cache holds exactly the latest
    ``sliding_window_size`` tokens per head (a run, multi-turn crops included)."""
    from helpers import make_sample

    from test_dropping import run

    records = run(model, tok, "dms", 0.0, "mode=threshold,threshold=0,sliding_window_size=8,decoding=true",
                  sample=make_sample(n_turns=2, max_new_tokens=6), multi_turn=multi_turn, check=False)
    assert len(records) == 2
    for r in records:
        assert r["kept_tokens"] == 8.0 and r["kept_tokens_end"] == 8.0
        assert r["kv_bytes_end"] == r["kv_bytes"]


def test_dms_decoding_forgets_a_turns_answer_exactly():
    """Multi-turn mode crops a turn's generated answer by slot counts as they were before the turn:
    after decode-time evictions (per head, so the layer is ragged) the crop keeps exactly the
    context and question tokens that survived and drops every generated one."""
    stage = chain("dms", 0.0, "mode=threshold,threshold=-2.5,sliding_window_size=3,decoding=true").stages[0]
    layer = dense_layer(1, 2, 8)
    layer.keys = torch.ones((1, 2, 8, 4))  # norm 2: score -2 (kept)
    start = layer.seq_len()
    loud = torch.full((1, 2, 1, 4), 2.0)  # norm 4: score -4 (evicted when it leaves the window)
    quiet = torch.ones((1, 2, 1, 4))
    question = torch.cat([loud, quiet], dim=2)
    question[0, 1, 0] = 1.0  # head 1's first question token is quiet: heads judge apart
    layer.append(question, question.clone(), torch.tensor([[8, 9]]), None)
    layer = stage.after_question(layer, 0, torch.zeros((1, 2, 2, 4)))
    for step in range(4):
        token = loud if step % 2 == 0 else quiet
        layer.append(token, token.clone(), torch.tensor([[10 + step]]), None)
        layer = stage.after_decode_step(layer, 0, torch.zeros((1, 2, 1, 4)))
    # head 0: position 8 (loud question token) and 10 (loud answer token) left the window and went
    assert kept_positions(layer, head=0) == [0, 1, 2, 3, 4, 5, 6, 7, 9, 11, 12, 13]
    assert kept_positions(layer, head=1) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13]
    layer.crop_to(start + 2)  # forget the answer (positions 10..13)
    assert kept_positions(layer, head=0) == [0, 1, 2, 3, 4, 5, 6, 7, 9]
    assert kept_positions(layer, head=1) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]


# --- kvzip -------------------------------------------------------------------------------------
def prefill_with_context_inputs(model, ch, ids: list[int]):  # noqa: F811
    """What Engine.prefill does for a chain with a context_inputs stage: begin, context_inputs, prefill."""
    from lcbench.cache import KVCache
    from lcbench.engine.decode import forward
    from lcbench.engine.state import ForwardState
    from lcbench.engine.timing import Stopwatch

    for stage in ch.stages:
        stage.begin_sample()
    cache = KVCache(model.config.num_hidden_layers)
    x = torch.tensor([ids])
    for stage in ch.stages:
        assert stage.context_inputs(model, x, len(ids), cache) is None
    state = ForwardState(cache=cache, stages=ch.stages, needs=ch.needs, timer=Stopwatch("cpu"))
    state.compressing = True
    with torch.inference_mode():
        forward(model, x, torch.arange(len(ids))[None], state)
    return cache


def kvpress_kvzip_positions(model, tok, ids: list[int], press) -> list[list[list[int]]]:  # noqa: F811
    """Per layer and KV head, the positions kvpress's KVzipPress keeps: its own prepare / forward_hook /
    compress_post, driven as its __call__ drives them (the template's prefix and suffix found as its
    __call__ finds them), with the ``cache`` keyword of transformers 5.24 renamed for its hook."""
    from transformers import DynamicCache

    dummy = "dummy context"
    separator = "\n" + "#" * len(dummy)
    text = tok.apply_chat_template([{"role": "user", "content": dummy + separator}], add_generation_prompt=True,
                                   tokenize=False, enable_thinking=False)
    before, suffix = text.split(separator)
    x = torch.tensor([ids])
    layers = model.model.layers
    with torch.no_grad():
        cache = DynamicCache()
        model(input_ids=x, cache=cache, use_cache=True)
        press._context_ids, press._cache = x, cache
        press.prefix_length = tok.encode(before.split(dummy)[0], return_tensors="pt", add_special_tokens=False).shape[-1]
        press._suffix_ids = tok.encode(suffix, return_tensors="pt", add_special_tokens=False)
        press.context_length = len(ids)
        pairs = press.prepare(model, tok)
        for layer in layers:
            layer.self_attn.rotary_emb = model.model.rotary_emb
        hook = lambda m, a, k, o: press.forward_hook(m, a, {**k, "past_key_values": k["cache"]}, o)  # noqa: E731
        hooks = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in layers]
        try:
            press.start_idx = press.prefix_length
            for prefill_ids, repeat_ids in pairs:
                press.end_idx = press.start_idx + prefill_ids.shape[1]
                model.model(input_ids=repeat_ids, cache=cache, use_cache=True)
                press.start_idx = press.end_idx
        finally:
            for h in hooks:
                h.remove()
        assert all(layer.keys.shape[2] == len(ids) for layer in cache.layers)  # the prompts' KV dropped again
        press.compress_post(model)
    out = []
    for layer in layers:
        _, heads, slots = layer.self_attn.masked_key_indices
        layer.self_attn.masked_key_indices = None
        keep = torch.ones((model.config.num_key_value_heads, len(ids)), dtype=torch.bool)
        keep[heads, slots] = False
        out.append([torch.nonzero(k).flatten().tolist() for k in keep])
    return out


@pytest.mark.parametrize("layerwise", [False, True])
def test_kvzip_keeps_kvpress_positions(model, sdpa_model, tok, ids, layerwise):  # noqa: F811
    prefix = tok.encode("<|im_start|>user\n", add_special_tokens=False)  # the chat template's, as tasks build it
    ids = (prefix + ids)[:-len(prefix)]
    press = kvpress.KVzipPress(compression_ratio=0.5, chunk_size=300, layerwise=layerwise)
    reference = kvpress_kvzip_positions(sdpa_model, tok, ids, press)
    ch = chain("kvzip", 0.5, f"chunk_size=300,layerwise={str(layerwise).lower()}")
    ch.stages[0].calibration = ch.stages[0].calibrate(model, tok)
    assert ch.stages[0].prefix_length(torch.tensor([ids])) == len(prefix) > 0
    cache = prefill_with_context_inputs(model, ch, ids)
    sizes = []
    for layer_idx, (layer, positions) in enumerate(zip(cache.layers, reference)):
        for head, expect in enumerate(positions):
            assert kept_positions(layer, head=head) == expect, (layer_idx, head)
            assert expect[:4] == [0, 1, 2, 3]  # the sinks
            sizes.append(len(expect))
    assert sum(sizes) == len(ids) * len(sizes) // 2 and len(set(sizes)) > 1  # ragged, half kept overall


def test_kvzip_keeps_the_tokens_the_reconstruction_attends_to(model, tok):  # noqa: F811
    """A constructed reconstruction pass: the query heads of KV head 0 look at context slot 7, those of
    KV head 1 at slot 3: those slots score highest (a max over the queries, not a mean)."""
    from lcbench.methods.dropping.kvzip import _Reconstruction

    n, r, d = 12, 3, 4
    layer = dense_layer(1, 2, n + r, d=d)
    keys = torch.zeros((1, 2, n + r, d))
    keys[0, 0, 7, 0] = keys[0, 1, 3, 1] = 5.0
    layer.keys = keys
    q = torch.zeros((1, 4, r, d))
    q[0, :2, 0, 0] = 2.0  # only the first reconstruction query of KV head 0's query heads looks at slot 7
    q[0, 2:, :, 1] = 2.0
    scorer = _Reconstruction(torch.zeros((1, 2, n)), n_sink=4)
    scorer.start, scorer.end = 0, n
    out = scorer.compress_layer(layer, LayerObservation(0, 1, 2, n, protected=r, queries=q))
    assert out.seq_len() == n  # the prompt's KV is dropped again
    assert scorer.scores[0, 0].argmax() == 7 and scorer.scores[0, 1].argmax() == 3
    assert scorer.scores[0, 0, 7] > 0.9


# --- every method on alternating sliding-window layers ----------------------------------------
@pytest.mark.parametrize("method,args", [
    ("simlayerkv", "n_recent=16"), ("duoattention", "sink_size=4,recent_size=8,num_samples=2,sample_tokens=64"),
    ("dms", "sliding_window_size=8"), ("kvzip", None)])
def test_window_layers_reach_the_ratio(method, args):
    """On Gemma-3's alternating layers (window layers hold only their last w - 1 tokens) the ratio is
    reached against the cache they can hold, as for every dropping method (test_architectures)."""
    from conftest import engine_for

    from lcbench import architectures as support
    from lcbench.models.families import family
    from lcbench.models.tiny import tiny_tokenizer

    model = support.lcbench_model(family("gemma3-text"), "sdpa")
    record = engine_for(model, tiny_tokenizer(), method, 0.5, args).run(support.sample(), False)[0]
    assert abs(record["achieved_ratio"] - 0.5) <= 0.05, record["achieved_ratio"]
    assert record["kv_bytes"] < record["kv_bytes_full"]


# --- cross-sample batches ------------------------------------------------------------------------
def test_simlayerkv_ratio_mode_runs_samples_one_at_a_time(model, tok):  # noqa: F811
    """Its cross-layer cut cannot act on the per-row copies of a cross-sample batch (engine/per_row.py)."""
    from conftest import engine_for

    from lcbench.engine.batching import batch_refusal

    assert batch_refusal(engine_for(model, tok, "simlayerkv", 0.5).chain, False, False)
    assert batch_refusal(engine_for(model, tok, "simlayerkv", 0.0, "mode=threshold").chain, False, False) is None
