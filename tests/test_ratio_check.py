"""A method that achieves far less compression than requested fails the run, by name."""

import pytest

from lcbench.errors import CompressionShortfall
from lcbench.methods.base import Stage
from lcbench.methods.registry import METHODS
from tests.conftest import engine_for
from tests.helpers import make_sample


class MasksOnly(Stage):
    """Claims to compress but stores everything (what lcbench must catch)."""

    name = "masks_only_test"
    family = "kv_dropping"

    def compress_layer(self, layer, seen):
        return layer  # keeps every token


def test_shortfall_fails_the_run(tiny):
    METHODS.add("masks_only_test", MasksOnly)
    model, tok = tiny
    try:
        engine = engine_for(model, tok, "masks_only_test", 0.5)
        with pytest.raises(CompressionShortfall, match="achieved a KV memory compression ratio of 0.000 but 0.500"):
            engine.run(make_sample(1), False)
    finally:
        METHODS.remove("masks_only_test")


def test_chain_ratio_splits_multiplicatively():
    from lcbench.methods.chain import chain_ratio, resolve_chain

    spec = resolve_chain("snapkv+random", None, 0.75)
    assert [round(c["ratio"], 4) for c in spec] == [0.5, 0.5]
    assert chain_ratio(spec) == pytest.approx(0.75)
    spec = resolve_chain("snapkv+random", "snapkv.ratio=0.5", 0.75)
    assert [round(c["ratio"], 4) for c in spec] == [0.5, 0.5]
    assert resolve_chain("full", None, 0.75)[0]["ratio"] == 0.0


def test_sparse_components_take_the_ratio_as_attention_skipped():
    from lcbench.methods.chain import Chain, chain_ratio, resolve_chain

    spec = resolve_chain("ashape+snapkv", None, 0.5)
    assert [c["ratio"] for c in spec] == [0.5, 0.5]  # density 0.5 and half the KV memory
    assert chain_ratio(spec) == 0.5
    chain = Chain.build(spec)
    assert chain.memory_ratio == pytest.approx(0.5) and chain.attention_ratio == 0.5
    assert chain_ratio(resolve_chain("ashape", None, 0.9)) == 0.9


def test_sparse_plus_cache_chain_passes_both_checks(tiny):
    model, tok = tiny
    records = engine_for(model, tok, "ashape+snapkv", 0.5, method_args="snapkv.window_size=8").run(
        make_sample(1, repeat=40), False)
    assert abs(records[0]["achieved_ratio"] - 0.5) < 0.05
    assert records[0]["attention_density"] <= 0.55
