"""lcbench's own presses against NVIDIA kvpress's, and kvpress presses run by lcbench's engine.

The reference is kvpress itself: its ``press.forward_hook`` on every attention module of a plain
SDPA model with a transformers DynamicCache, as ``with press(model)`` installs it. kvpress 0.5
targets transformers < 5.3; under 5.24 the attention module's keyword arguments are ``cache``
(was ``past_key_values``) and carry no ``cache_position``, so the hook here renames one and adds
the other — nothing else of kvpress is changed. The positions it kept are recovered by matching
its cached key rows against an uncompressed run (bitwise equal: compression happens after each
layer's attention, so every layer sees the same inputs). Active when kvpress is installed.
"""

from __future__ import annotations

import sys

import pytest
import torch
from test_dropping import (  # noqa: F401  (fixtures)
    CONTEXT,
    chain,
    context_ids,
    kept_positions,
    model,
    prefill,
    run,
    tok,
)

from lcbench.errors import UserError
from lcbench.methods.chain import resolve_chain

kvpress = pytest.importorskip("kvpress")
from test_kvpress_presses import ids, kvpress_reference, sdpa_model  # noqa: F401  (fixtures)

# lcbench method + args ↔ kvpress press + kwargs, with matching settings
PAIRS = [
    ("snapkv", "window_size=16,kernel_size=5,pooling=avg", "SnapKVPress", {"window_size": 16, "kernel_size": 5}),
    ("streamingllm", "n_sink=4", "StreamingLLMPress", {"n_sink": 4}),
    ("knorm", None, "KnormPress", {}),
    ("tova", None, "TOVAPress", {}),
    ("expected_attention", "n_sink=4,n_future_positions=512", "ExpectedAttentionPress", {"n_sink": 4, "n_future_positions": 512}),
    ("pyramidkv", "window_size=8,kernel_size=5,beta=2", "PyramidKVPress", {"window_size": 8, "kernel_size": 5, "beta": 2}),
]


def native_kvpress_positions(model, ids: list[int], press) -> list[torch.Tensor]:  # noqa: F811
    """Per layer (H, K) positions kvpress keeps, run natively (tests/test_kvpress_presses.py)."""
    return [torch.tensor(positions) for positions, _ in kvpress_reference(model, ids, press)]


@pytest.mark.parametrize("ratio", [0.5, 0.75])
@pytest.mark.parametrize("method,args,press_name,kwargs", PAIRS)
def test_lcbench_methods_keep_what_kvpress_keeps(model, sdpa_model, ids, method, args, press_name, kwargs, ratio):  # noqa: F811
    press = getattr(kvpress, press_name)(compression_ratio=ratio, **kwargs)
    reference = native_kvpress_positions(sdpa_model, ids, press)
    cache, _ = prefill(model, chain(method, ratio, args), ids)
    for layer_idx, (layer, expect) in enumerate(zip(cache.layers, reference)):
        for head in range(expect.shape[0]):
            assert kept_positions(layer, head=head) == expect[head].tolist(), (method, layer_idx, head)


@pytest.mark.parametrize("press_name,kwargs", [(p, k) for _, _, p, k in PAIRS] + [("ExpectedAttentionPress", {})])
def test_bridge_runs_kvpress_presses_and_keeps_their_positions(model, sdpa_model, ids, press_name, kwargs):  # noqa: F811
    ratio = 0.5
    reference = native_kvpress_positions(sdpa_model, ids, getattr(kvpress, press_name)(compression_ratio=ratio, **kwargs))
    args = ",".join(f"{k}={v}" for k, v in kwargs.items()) or None
    cache, _ = prefill(model, chain(f"kvpress:{press_name}", ratio, args), ids)
    for layer, expect in zip(cache.layers, reference):
        for head in range(expect.shape[0]):
            assert kept_positions(layer, head=head) == expect[head].tolist()


def test_bridge_method_args_runs_and_measures(model, tok):  # noqa: F811
    spec = resolve_chain("kvpress:SnapKVPress", "window_size=32", 0.5)
    assert spec == [{"name": "kvpress:SnapKVPress", "ratio": 0.5, "args": {"window_size": 32, "kernel_size": 5}}]
    rec = run(model, tok, "kvpress:SnapKVPress", 0.5, args="window_size=32")[0]
    assert abs(rec["achieved_ratio"] - 0.5) <= 0.05 and rec["kv_bytes"] < rec["kv_bytes_full"]
    chained = run(model, tok, "kvpress:SnapKVPress+kivi", 0.6, args="window_size=32")[0]
    assert abs(chained["achieved_ratio"] - 0.6) <= 0.05


def test_bridge_wrapper_presses(model, tok, ids):  # noqa: F811
    cache, _ = prefill(model, chain("kvpress:AdaKVPress", 0.75, "press=SnapKVPress"), ids)
    counts = cache.layers[0].kept_tokens()[0]
    assert int(counts.sum()) == 2 * int(len(ids) * 0.25) and counts[0] != counts[1]  # ragged, really stored
    assert cache.layers[0].nbytes() == int(counts.sum()) * 2 * 16 * 4
    rec = run(model, tok, "kvpress:ChunkKVPress", 0.5, args="press=KnormPress,chunk_length=10")[0]
    assert abs(rec["achieved_ratio"] - 0.5) <= 0.06


def test_bridge_errors_are_user_errors(model, tok, monkeypatch):  # noqa: F811
    with pytest.raises(UserError, match="Did you mean SnapKVPress"):
        resolve_chain("kvpress:SnapKvPress", None, 0.5)
    with pytest.raises(UserError, match="press=SnapKVPress"):
        resolve_chain("kvpress:AdaKVPress", None, 0.5)
    with pytest.raises(UserError, match="re-rotates the kept keys"):
        run(model, tok, "kvpress:KeyRerotationPress", 0.5, args="press=KnormPress")
    from lcbench.methods import kvpress_bridge

    monkeypatch.setitem(sys.modules, "kvpress", None)
    kvpress_bridge.press_stage.cache_clear()
    try:
        with pytest.raises(UserError, match="lcbench\\[kvpress\\]"):
            resolve_chain("kvpress:TOVAPress", None, 0.5)
    finally:
        kvpress_bridge.press_stage.cache_clear()


def test_missing_kvpress_message_names_both_install_commands(monkeypatch):
    """kvpress pins transformers<5.3, so it goes in without its dependencies and the extra brings
    what it imports: the error must say both, in that order."""
    from lcbench.methods import kvpress_bridge

    monkeypatch.setitem(sys.modules, "kvpress", None)  # `import kvpress` now raises ImportError
    kvpress_bridge.press_stage.cache_clear()
    try:
        with pytest.raises(UserError) as error:
            resolve_chain("kvpress:SnapKVPress", None, 0.5)
    finally:
        kvpress_bridge.press_stage.cache_clear()
    message = str(error.value)
    no_deps, extra = "pip install --no-deps kvpress==0.5.5", "pip install 'lcbench[kvpress]'"
    assert no_deps in message and extra in message
    assert message.index(no_deps) < message.index(extra)
    assert "transformers<5.3" in message
