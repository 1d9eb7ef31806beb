"""What the papers of lcbench's native kvpress methods promise, on constructed inputs: KeyDiff keeps
distinctive keys, LagKV keeps tokens that spread against the next partition (and its sinks and
tail), CurDKV keeps high-leverage tokens of each local window, CriticalKV prefers tokens whose value
moves the output, CriticalAdaKV gives heads different budgets. Ratios (0.25–0.9) and ratio-0
identity are checked for every dropping method in tests/test_dropping.py; kvpress position parity
in tests/test_kvpress_presses.py."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from test_dropping import model, tok  # noqa: F401  (fixtures)

from lcbench.cache.layer import DenseLayer
from lcbench.cache.ragged import RaggedLayer
from lcbench.methods.base import LayerObservation
from lcbench.methods.registry import METHODS


def dense(keys: torch.Tensor, values: torch.Tensor) -> DenseLayer:
    layer = DenseLayer()
    layer.append(keys, values, torch.arange(keys.shape[2])[None], None)
    return layer


def observe(n: int, groups: int = 1, **fields) -> LayerObservation:
    return LayerObservation(layer_idx=0, num_layers=1, num_groups=groups, context_length=n, **fields)


def kept(layer, head: int = 0) -> list[int]:
    pos = layer.positions[0, head]
    if layer.valid is not None:
        pos = pos[layer.valid[0, head]]
    return sorted(pos.tolist())


def test_keydiff_keeps_the_distinctive_keys():
    gen = torch.Generator().manual_seed(0)
    n, d = 64, 16
    keys = torch.ones(1, 1, n, d) + 0.05 * torch.randn(1, 1, n, d, generator=gen)  # all alike
    odd = [5, 20, 41, 60]
    for i, slot in enumerate(odd):  # four keys pointing elsewhere
        keys[0, 0, slot] = -torch.ones(d) if i % 2 else torch.nn.functional.one_hot(torch.tensor(i), d) * 3.0
    stage = METHODS.get("keydiff")(ratio=1 - 4 / n)
    out = stage.compress_layer(dense(keys, torch.randn(1, 1, n, d, generator=gen)), observe(n))
    assert kept(out) == odd


def test_lagkv_keeps_sinks_tail_and_the_token_that_spreads_against_its_reference():
    gen = torch.Generator().manual_seed(0)
    n_sink, lag, d = 4, 8, 8
    n = n_sink + 4 * lag  # three scored partitions and one reference-only tail partition
    keys = 0.5 + 0.01 * torch.randn(1, 1, n, d, generator=gen)
    values = keys.clone()
    keys[..., n_sink:, :] += torch.linspace(-0.4, 0.4, d)  # every partition spans the same channel range
    values[..., n_sink:, :] += torch.linspace(-0.4, 0.4, d)
    spread = n_sink + lag + 3  # in the second partition: a key and value far wider than its reference's range
    keys[0, 0, spread] = torch.linspace(-5, 5, d)
    values[0, 0, spread] = torch.linspace(5, -5, d)
    keep = n_sink + lag + 3  # the sinks, the tail (one partition) and the top-ranked token of each scored partition
    stage = METHODS.get("lagkv")(ratio=1 - keep / n, n_sink=n_sink, lag_size=lag)
    out = stage.compress_layer(dense(keys, values), observe(n))
    positions = kept(out)
    assert positions[:n_sink] == list(range(n_sink))
    assert positions[-lag:] == list(range(n - lag, n))  # the reference-less tail
    assert spread in positions  # top rank of its partition


def test_lagkv_on_a_short_context_keeps_sinks_then_the_most_recent():
    n = 20
    stage = METHODS.get("lagkv")(ratio=0.5, n_sink=4, lag_size=16)
    out = stage.compress_layer(dense(torch.randn(1, 1, n, 4), torch.randn(1, 1, n, 4)), observe(n))
    assert kept(out) == [0, 1, 2, 3] + list(range(14, 20))


def test_cur_keeps_each_windows_high_leverage_token_and_the_sinks():
    n, d, w = 64, 8, 16
    keys, values = torch.ones(1, 1, n, d), torch.ones(1, 1, n, d)
    heavy = [9, 23, 40, 57]  # one per window of 16
    for slot in heavy:
        keys[0, 0, slot] *= 4
        values[0, 0, slot] *= 4
    stage = METHODS.get("cur")(ratio=1 - 8 / n, n_sink=4, window_size=w)
    out = stage.compress_layer(dense(keys, values), observe(n))
    assert kept(out) == [0, 1, 2, 3] + heavy


def critical_module(hidden: int, d: int, heads: int, silent: list[int]):
    """An attention module whose o_proj maps value channels ``silent`` to nothing."""
    weight = torch.ones(hidden, heads * d)
    for h in range(heads):
        weight[:, [h * d + c for c in silent]] = 0.0
    return SimpleNamespace(o_proj=SimpleNamespace(weight=weight))


def test_criticalkv_prefers_tokens_whose_value_moves_the_output():
    """Equal attention everywhere: stage 1 keeps its share by position order of the tie, stage 2
    must take the tokens whose values survive W_o, not those living in its null space."""
    n, d, w = 40, 4, 4
    values = torch.zeros(1, 1, n, d)
    loud = list(range(3, n - w, 3))  # values in channels W_o reads
    values[0, 0, :, 0] = 1.0  # channel 0: W_o ignores it
    for slot in loud:
        values[0, 0, slot, 1] = 1.0
    attention = torch.full((1, 1, w, n), 1.0 / n)
    seen = observe(n, window_attention=attention, module=critical_module(8, d, 1, silent=[0]))
    stage = METHODS.get("criticalkv")(ratio=0.5, window_size=w, kernel_size=1, first_stage_ratio=0.0)
    out = stage.compress_layer(dense(torch.randn(1, 1, n, d), values), seen)
    positions = kept(out)
    assert len(positions) == n // 2
    assert set(range(n - w, n)) <= set(positions)  # SnapKV's window
    assert set(loud) <= set(positions)  # every output-moving token before any silent one


def test_criticaladakv_gives_heads_different_budgets_and_stores_them_ragged():
    n, d, w, heads = 48, 4, 4, 2
    attention = torch.full((1, heads, w, n), 1e-3)
    attention[0, 0, :, : n - w] = torch.linspace(0, 1, n - w)  # head 0 concentrated on a few tokens
    attention[0, 0, :, : n - w] = attention[0, 0, :, : n - w] ** 8
    attention[0, 1, :, : n - w] = 0.5  # head 1 spread evenly, high everywhere
    module = critical_module(8, d, heads, silent=[])
    seen = observe(n, window_attention=attention, module=module)
    stage = METHODS.get("criticaladakv")(ratio=0.5, window_size=w, kernel_size=1)
    gen = torch.Generator().manual_seed(0)
    out = stage.compress_layer(dense(torch.randn(1, heads, n, d, generator=gen),
                                     torch.rand(1, heads, n, d, generator=gen)), seen)
    assert isinstance(out, RaggedLayer)
    counts = out.kept_tokens()[0]
    assert int(counts.sum()) == heads * n // 2 and counts[1] > counts[0]
    assert counts[0] >= int(n // 2 * 0.2)  # the safeguard
    assert out.nbytes() == int(counts.sum()) * 2 * d * 4


def test_cli_runs_a_native_method_and_refuses_an_unmappable_press(tmp_path):
    """Real processes: `lcbench run --method criticalkv` writes its records at the requested ratio;
    `kvpress:ThinKPress` exits 2 with its reason, no traceback and no run folder."""
    import json

    from test_cli_errors import SMALL_NIAH, TINY, assert_user_error, lcbench

    out = tmp_path / "runs"
    proc = lcbench("run", *TINY, "--method", "criticalkv", "--method-args", "window_size=8", "--ratio", "0.5",
                   "--task", "niah", "--task-args", SMALL_NIAH, "--output-path", str(out))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    records = [json.loads(line) for f in out.rglob("samples.jsonl") for line in f.read_text().splitlines()]
    assert records and all(abs(r.get("measured", r)["achieved_ratio"] - 0.5) <= 0.05 for r in records)
    refused = tmp_path / "refused"
    assert_user_error(lcbench("run", *TINY, "--method", "kvpress:ThinKPress", "--task", "niah", "--task-args",
                              SMALL_NIAH, "--output-path", str(refused)), "prunes key channels")
    assert not refused.exists() or not any(refused.rglob("samples.jsonl"))


def test_think_keeps_the_channels_the_queries_use_and_stores_fewer():
    from lcbench.cache.channels import ChannelLayer

    gen = torch.Generator().manual_seed(0)
    n, d, w = 32, 8, 4
    keys, values = torch.randn(1, 1, n, d, generator=gen), torch.randn(1, 1, n, d, generator=gen)
    queries = 0.01 * torch.randn(1, 1, w, d, generator=gen)
    queries[..., [1, 5, 6]] = 3.0  # the window's queries read channels 1, 5 and 6
    keys[..., 6] *= 1e-3  # ... but channel 6 of the keys carries nothing
    layer = dense(keys, values)
    full_bytes = layer.nbytes()
    stage = METHODS.get("think")(ratio=0.25, window_size=w)  # 2·0.25·8 = 4 of 8 channels go
    out = stage.compress_layer(layer, observe(n, window_queries=queries))
    assert isinstance(out, ChannelLayer)
    kept_channels = out.channels[0, 0].tolist()
    assert len(kept_channels) == 4 and {1, 5} <= set(kept_channels) and 6 not in kept_channels
    assert out.nbytes() == full_bytes * 3 // 4 + out.channels.numel() * 8  # compact keys + the channel index
    k, v = out.dense()
    assert torch.equal(v, values) and torch.equal(k[..., kept_channels], keys[..., kept_channels])
    assert bool((k[..., [c for c in range(d) if c not in kept_channels]] == 0).all())


def test_think_chains_with_token_dropping_and_refuses_what_it_cannot_reach(model, tok):  # noqa: F811
    import pytest
    from test_dropping import run

    from lcbench.errors import UserError

    for method in ("think+snapkv", "snapkv+think"):
        rec = run(model, tok, method, 0.5, args="window_size=8")[0]
        assert abs(rec["achieved_ratio"] - 0.5) <= 0.05, (method, rec["achieved_ratio"])
        assert rec["kept_tokens"] < rec["context_tokens"]
    with pytest.raises(UserError, match="think.ratio"):
        run(model, tok, "think", 0.6)
