"""Every press kvpress 0.5.5 exports, classified (lcbench.methods.kvpress_bridge.PRESSES) and the
classification checked: a *native* press's lcbench method keeps exactly the positions kvpress keeps
(per layer and KV head) on a fixed input; a *bridged* press run as ``kvpress:<Press>`` keeps what
kvpress's own forward hook keeps — the same positions and the same values (MergingPress folds
evicted values into the kept ones: the bridge must keep those, not the originals); a *refused* press
stops with its reason before anything runs. The README's table is generated from the same list.

The reference is kvpress's ``forward_hook`` on a plain SDPA model (see tests/test_kvpress.py for
the two keyword renames transformers 5.24 needs); kept positions are found by matching kvpress's
cached key rows against an uncompressed run, and per-head masking (AdaKV-style presses) is read
from ``module.masked_key_indices``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_dropping import (  # noqa: F401  (fixtures)
    CONTEXT,
    chain,
    context_ids,
    kept_positions,
    model,
    prefill,
    tok,
)

from lcbench.errors import UserError
from lcbench.methods.chain import resolve_chain
from lcbench.models.tiny import tiny_llama

kvpress = pytest.importorskip("kvpress")
from transformers import DynamicCache

from lcbench.methods import kvpress_bridge
from lcbench.methods.kvpress_bridge import PRESSES, SUPPORT

REPO = Path(__file__).resolve().parents[1]
RATIO = 0.5
EXPORTED = [n for n in kvpress.__all__ if isinstance(getattr(kvpress, n), type)
            and issubclass(getattr(kvpress, n), kvpress.BasePress)]


@pytest.fixture(scope="module")
def sdpa_model():
    return tiny_llama(layers=2)  # same seed and config as the lcbench fixture model, plain SDPA


@pytest.fixture(scope="module")
def ids(tok):  # noqa: F811
    out = context_ids(tok, CONTEXT)
    return out[: len(out) // 4 * 4]


def build_press(name: str, ratio: float, kwargs: dict, inner: dict):
    cls = getattr(kvpress, name)
    kwargs = dict(kwargs)
    if inner:
        inner = dict(inner)
        inner_cls = getattr(kvpress, inner.pop("press"))
        kwargs["press"] = inner_cls(compression_ratio=ratio, **inner)
        press = cls(**kwargs)
        press.compression_ratio = ratio
        return press
    return cls(compression_ratio=ratio, **kwargs)


def bridge_kwargs(entry) -> tuple[dict, dict]:
    """The press kwargs (and inner press) that ``kvpress:<press> --method-args <args>`` builds."""
    kwargs, inner = {}, {}
    for part in (entry.args or "").split(","):
        if not part:
            continue
        key, value = part.split("=")
        if key == "press":
            inner = {"press": value}
        else:
            kwargs[key] = int(value) if value.lstrip("-").isdigit() else value
    return kwargs, inner


def kvpress_reference(model, ids: list[int], press) -> list[tuple[list[list[int]], torch.Tensor | None]]:  # noqa: F811
    """Per layer: kept positions per KV head (sorted), and the kept values (H, K, D) in that order
    (None for per-head masking, where kvpress keeps every value and masks keys)."""
    x = torch.tensor([ids])
    masks: dict[int, tuple] = {}

    def hook(module, args, kwargs, output):
        kwargs = {**kwargs, "past_key_values": kwargs["cache"], "cache_position": torch.arange(len(ids))}
        out = press.forward_hook(module, args, kwargs, output)
        if getattr(module, "masked_key_indices", None) is not None:
            masks[module.layer_idx] = module.masked_key_indices
            module.masked_key_indices = None
        return out

    press.post_init_from_model(model)
    with torch.no_grad():
        full = DynamicCache()
        model(input_ids=x, cache=full, use_cache=True)
        hooks = []
        for layer in model.model.layers:
            layer.self_attn.rotary_emb = model.model.rotary_emb
            hooks.append(layer.self_attn.register_forward_hook(hook, with_kwargs=True))
        compressed = DynamicCache()
        torch.manual_seed(0)  # presses that sketch at random (LeverageScorePress) draw the same numbers
        try:
            model(input_ids=x, cache=compressed, use_cache=True)
        finally:
            for h in hooks:
                h.remove()
    out = []
    for i, (layer_full, layer) in enumerate(zip(full.layers, compressed.layers)):
        if i in masks:
            keep = torch.ones(layer_full.keys.shape[1:3], dtype=torch.bool)
            _, heads, slots = masks[i]
            keep[heads, slots] = False
            out.append(([torch.nonzero(keep[h]).flatten().tolist() for h in range(keep.shape[0])], None))
            continue
        same = (layer_full.keys[0][:, :, None, :] == layer.keys[0][:, None, :, :]).all(-1)  # (H, n, K)
        assert bool((same.sum(1) == 1).all()), "every kept key is exactly one original key"
        slot = same.float().argmax(1)  # (H, K): position of each kept row
        order = slot.argsort(-1)
        values = layer.values[0].gather(1, order[..., None].expand(-1, -1, layer.values.shape[-1]))
        out.append((slot.gather(1, order).tolist(), values))
    return out


def assert_same(cache, reference, what: str, values: bool = True, exact: bool = True):
    for layer_idx, (layer, (positions, kv_values)) in enumerate(zip(cache.layers, reference)):
        for head, expect in enumerate(positions):
            got = kept_positions(layer, head=head)
            if not exact:  # the entry's note says why: ≥ 97% of the same tokens
                assert len(got) == len(expect) and len(set(got) & set(expect)) >= 0.97 * len(expect), (what, layer_idx)
                continue
            assert got == expect, (what, layer_idx, head)
        if values and exact and kv_values is not None:
            _, held = layer.dense()
            assert torch.allclose(held[0].float(), kv_values.float(), atol=1e-5), (what, layer_idx)


def test_every_exported_press_is_classified():
    assert len(EXPORTED) == 46  # kvpress 0.5.5: 44 presses and the two base classes
    assert sorted(SUPPORT) == sorted(EXPORTED), set(SUPPORT) ^ set(EXPORTED)
    assert len(PRESSES) == len(SUPPORT)
    for entry in PRESSES:
        assert entry.status in ("native", "bridged", "refused")
        assert bool(entry.reason) == (entry.status == "refused") or entry.press == "ThinKPress", entry.press


NATIVE = [p for p in PRESSES if p.status == "native" and p.method != "think"]
BRIDGED = [p for p in PRESSES if p.status == "bridged"]
REFUSED = [p for p in PRESSES if p.reason]


@pytest.mark.parametrize("entry", NATIVE, ids=lambda e: e.press)
def test_native_method_keeps_kvpress_positions(model, sdpa_model, ids, entry):  # noqa: F811
    reference = kvpress_reference(sdpa_model, ids, build_press(entry.press, RATIO, entry.press_kwargs, entry.inner))
    cache, _ = prefill(model, chain(entry.method, RATIO, entry.args), ids)
    assert_same(cache, reference, entry.method, values=False)


@pytest.mark.parametrize("entry", NATIVE, ids=lambda e: e.press)
def test_native_press_also_runs_through_the_bridge(model, sdpa_model, ids, entry):  # noqa: F811
    """What the table says of a native press: `kvpress:<press>` runs too, keeping kvpress's positions
    (a wrapper's inner press with its defaults: the bridge passes only its class)."""
    inner = {"press": entry.inner["press"]} if entry.inner else {}
    reference = kvpress_reference(sdpa_model, ids, build_press(entry.press, RATIO, entry.press_kwargs, inner))
    parts = [f"press={inner['press']}"] if inner else []
    args = ",".join(parts + [f"{k}={v}" for k, v in entry.press_kwargs.items()])
    cache, _ = prefill(model, chain(f"kvpress:{entry.press}", RATIO, args or None), ids)
    assert_same(cache, reference, entry.press, values=False)


@pytest.mark.parametrize("entry", BRIDGED, ids=lambda e: e.press)
def test_bridged_press_keeps_what_kvpress_keeps(model, sdpa_model, ids, entry):  # noqa: F811
    kwargs, inner = bridge_kwargs(entry)
    reference = kvpress_reference(sdpa_model, ids, build_press(entry.press, RATIO, kwargs, inner))
    torch.manual_seed(0)
    cache, _ = prefill(model, chain(f"kvpress:{entry.press}", RATIO, entry.args), ids)
    assert_same(cache, reference, entry.press, exact=entry.exact)


@pytest.mark.parametrize("entry", REFUSED, ids=lambda e: e.press)
def test_refused_press_stops_with_its_reason(entry):
    args = "press=KnormPress" if "press" in kvpress_bridge.constructor(getattr(kvpress, entry.press)) else None
    with pytest.raises(UserError) as error:
        resolve_chain(f"kvpress:{entry.press}", args, RATIO)
    assert entry.reason in str(error.value) and "Fix:" in str(error.value)


def test_think_prunes_the_key_channels_kvpress_prunes_and_stores_fewer(model, sdpa_model, ids):  # noqa: F811
    """ThinKPress zeroes key channels of the prefill cache; lcbench's think keeps the others, compact."""
    from lcbench.cache.channels import ChannelLayer

    press = kvpress.ThinKPress(key_channel_compression_ratio=0.5, window_size=32)
    x = torch.tensor([ids])
    zeroed = []

    def hook(module, args, kwargs, output):
        kwargs = {**kwargs, "past_key_values": kwargs["cache"], "cache_position": torch.arange(len(ids))}
        out = press.forward_hook(module, args, kwargs, output)
        zeroed.append((kwargs["cache"].layers[module.layer_idx].keys[0] == 0).all(1))  # (H, D)
        return out

    with torch.no_grad():
        hooks = []
        for layer in sdpa_model.model.layers:
            layer.self_attn.rotary_emb = sdpa_model.model.rotary_emb
            hooks.append(layer.self_attn.register_forward_hook(hook, with_kwargs=True))
        try:
            sdpa_model(input_ids=x, cache=DynamicCache(), use_cache=True)
        finally:
            for h in hooks:
                h.remove()
    cache, _ = prefill(model, chain("think", 0.25, "window_size=32"), ids)
    full, _ = prefill(model, chain("full", 0.0), ids)
    for layer, dense_layer, pruned in zip(cache.layers, full.layers, zeroed):
        assert isinstance(layer, ChannelLayer)
        for head in range(pruned.shape[0]):
            kept = layer.channels[0, head].tolist()
            assert kept == torch.nonzero(~pruned[head]).flatten().tolist(), head
            assert len(kept) == 8  # half of the 16 key channels
        keys, values = layer.dense()
        assert torch.equal(values, dense_layer.values)
        assert torch.equal(keys[..., layer.channels[0, 0]][0, 0], dense_layer.keys[0, 0][..., layer.channels[0, 0]])
        assert layer.nbytes() < dense_layer.nbytes() * 0.76


def test_merging_press_keeps_its_merged_values_not_snapkvs(model, ids):  # noqa: F811
    """The bug of issue #15: MergingPress ran and equalled its inner press, because the bridge kept
    the original values of the kept slots."""
    merged, _ = prefill(model, chain("kvpress:MergingPress", RATIO, "press=SnapKVPress"), ids)
    plain, _ = prefill(model, chain("kvpress:SnapKVPress", RATIO), ids)
    for a, b in zip(merged.layers, plain.layers):
        assert torch.equal(a.positions, b.positions) and torch.equal(a.keys, b.keys)
        assert not torch.allclose(a.values, b.values)
        assert a.nbytes() == b.nbytes()


def test_a_press_that_wraps_a_refused_press_is_refused():
    with pytest.raises(UserError, match="ThinKPress"):
        resolve_chain("kvpress:AdaKVPress", "press=ThinKPress", RATIO)


def test_readme_table_is_current():
    readme = (REPO / "README.md").read_text()
    begin, end = kvpress_bridge.BEGIN, kvpress_bridge.END
    assert begin in readme and end in readme
    current = readme.split(begin, 1)[1].split(end, 1)[0].strip()
    assert current == kvpress_bridge.markdown().strip(), "run: python -m lcbench.methods.kvpress_bridge --markdown"


def test_markdown_command_writes_between_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{kvpress_bridge.BEGIN}\nSTALE-ROW\n{kvpress_bridge.END}\nafter\n")
    out = subprocess.run([sys.executable, "-m", "lcbench.methods.kvpress_bridge", "--markdown", "--readme", str(readme)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    text = readme.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "STALE-ROW" not in text
    assert "| MergingPress | bridged |" in text


def test_adopt_keeps_returned_values_and_refuses_unmappable_keys():
    from lcbench.cache.layer import DenseLayer
    from lcbench.methods.kvpress_bridge import adopt

    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn((1, 2, 6, 4), generator=gen), torch.randn((1, 2, 6, 4), generator=gen)
    slots = torch.tensor([[[4, 1, 2], [5, 0, 3]]])  # kvpress's top-k order, not sorted
    pick = lambda t: t.gather(2, slots[..., None].expand(-1, -1, -1, 4))

    def layer():
        out = DenseLayer()
        out.append(keys.clone(), values.clone(), torch.arange(6)[None], None)
        return out

    merged = pick(values) + 1.0
    kept = adopt(layer(), keys, values, pick(keys), merged, "test")
    assert kept.positions[0].tolist() == [[1, 2, 4], [0, 3, 5]]
    assert torch.equal(kept.values[0, 0], merged[0, 0, [1, 2, 0]])
    with pytest.raises(UserError, match="changed the key vectors"):
        adopt(layer(), keys, values, pick(keys) * 2, pick(values), "test")
    twice = torch.tensor([[[4, 4, 2], [5, 0, 3]]])
    with pytest.raises(UserError, match="same cached token twice"):
        adopt(layer(), keys, values, keys.gather(2, twice[..., None].expand(-1, -1, -1, 4)),
              values.gather(2, twice[..., None].expand(-1, -1, -1, 4)), "test")
