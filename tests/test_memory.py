"""Peak KV memory falls with compression: every layer is compressed right after its own prefill,
so the full cache of all layers never exists at once, and answering one question does not keep a
second copy of the context's cache. Measured as the KV bytes the cache holds at every layer's
update (deterministic; benchmarks/memory.py measures process memory)."""

import weakref

import pytest

from lcbench.cache import KVCache
from lcbench.engine.attach import use_lcbench_attention
from lcbench.models.tiny import tiny_llama, tiny_tokenizer
from tests.conftest import engine_for
from tests.helpers import make_sample

LAYERS = 4


@pytest.fixture(scope="module")
def deep():
    model = tiny_llama(layers=LAYERS)
    use_lcbench_attention(model)
    return model, tiny_tokenizer()


def _held_bytes(engine, sample, monkeypatch) -> tuple[list[int], list[dict]]:
    """KV bytes held by every live cache, sampled at each layer update, and the records."""
    engine.warm_up()  # its throwaway cache comes and goes before what is measured
    caches: weakref.WeakSet = weakref.WeakSet()  # live caches only
    held: list[int] = []
    original_init, original_update = KVCache.__init__, KVCache.update

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        caches.add(self)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        out = original_update(self, key_states, value_states, layer_idx, *args, **kwargs)
        held.append(sum(c.nbytes() for c in caches))
        return out

    monkeypatch.setattr(KVCache, "__init__", init)
    monkeypatch.setattr(KVCache, "update", update)
    records = engine.run(sample, False)
    return held, records


def test_prefill_never_holds_the_full_cache_of_every_layer(deep, monkeypatch):
    model, tok = deep
    sample = make_sample(1, repeat=14, max_new_tokens=4)
    held_full, full = _held_bytes(engine_for(model, tok), sample, monkeypatch)
    held_snap, snap = _held_bytes(engine_for(model, tok, "snapkv", 0.5, method_args="window_size=8"), sample, monkeypatch)
    kv_full, kv_snap = full[0]["kv_bytes"], snap[0]["kv_bytes"]
    per_layer = kv_full / LAYERS
    # the context prefill: layer i's update sees i compressed layers and its own full one
    prefill_peak = max(held_snap[:LAYERS])
    assert prefill_peak <= kv_snap * (LAYERS - 1) / LAYERS + per_layer + 1
    assert prefill_peak < 0.7 * kv_full
    assert max(held_full[:LAYERS]) == kv_full
    # the whole run (question and answer appended to the one cache, no copy kept beside it)
    assert max(held_full) - kv_full < 0.2 * kv_full
    # most of the KV bytes saved are saved at the peak too: all but the one layer that is full at a time
    assert (kv_full - max(held_snap)) / (kv_full - kv_snap) >= 1 - 1 / LAYERS - 0.01


def test_several_turns_release_the_shared_context_once_copied(deep, monkeypatch):
    model, tok = deep
    sample = make_sample(3, repeat=14, max_new_tokens=4)
    held, records = _held_bytes(engine_for(model, tok, decode_rows=2), sample, monkeypatch)
    kv = records[0]["kv_bytes"]
    # groups of 2 then 1 turn: at most the context + its 2 copies, then the last turn reuses the context
    assert max(held) < 3.3 * kv
    assert [r["batch_rows"] for r in records] == [2, 2, 1]
