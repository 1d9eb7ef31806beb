"""FlexPrefill, XAttention, TriangleMix and the dilated/strided patterns: each meets its density
target (or refuses it, naming the fix), computes exactly dense attention on its own blocks, is
token-identical to ``full`` at ratio 0, and does what its paper promises on a constructed input."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lcbench.errors import CompressionShortfall, UserError
from lcbench.methods.sparse.flexprefill import sqrt_js_divergence
from lcbench.methods.sparse.select import cover_threshold
from lcbench.methods.sparse.xattention import antidiagonal_block_scores
from helpers import make_sample
from test_sparse import qkv, reference, run, stage

ARGS = {
    "xattention": "block_size=16,stride=4",
    "flexprefill": "block_size=16,min_budget=16",
    "dilated": "block_size=16,sink_tokens=16",
    "dilated_strided": "block_size=16,sink_tokens=16,variant=strided",
    "tri_mix": "block_size=16,sink_tokens=16,last_queries=16,starting_layer=1",
}
MODULE4 = SimpleNamespace(num_key_value_groups=2, config=SimpleNamespace(num_hidden_layers=4))


def method(key: str, ratio: float):
    return stage(key.split("_strided")[0], ratio, ARGS[key])


def prefill_all_layers(s, q, k, v):
    """Run ``s`` over the 4 layers of MODULE4; the outputs per layer (None where dense)."""
    s.begin_sample()
    return [s.prefill_attention(MODULE4, q, k, v, None, 0.25, layer) for layer in range(4)]


# --- density targets and the exact CPU path -------------------------------------------------------
REFUSED = {("dilated", 0.75), ("tri_mix", 0.25)}  # beyond what the pattern can express


@pytest.mark.parametrize("key", sorted(ARGS))
@pytest.mark.parametrize("target", [0.75, 0.5, 0.25])
def test_density_meets_target_and_output_is_dense_on_its_blocks(key, target):
    q, k, v = qkv(L=1024)
    s = method(key, 1 - target)
    if (key, target) in REFUSED:
        with pytest.raises(UserError, match="Fix: "):
            prefill_all_layers(s, q, k, v)
        return
    outs = prefill_all_layers(s, q, k, v)
    density = s.sample_stats()["attention_density"]
    assert target - s.tolerance <= density <= target + 1e-9
    pattern = s.pattern(q, k, 2, 0.25)  # the last layer's pattern (the patterns are per input)
    assert torch.allclose(outs[-1], reference(q, k, v, pattern.dense_mask(), 0.25), atol=1e-5)
    if key == "tri_mix":
        assert outs[0] is None and all(o is not None for o in outs[1:])  # layer 0 dense, 1–3 Triangle


@pytest.fixture(scope="module")
def sample():
    return make_sample(n_turns=2, max_new_tokens=8)


@pytest.mark.parametrize("key", sorted(ARGS))
def test_ratio_zero_is_token_identical_to_full(tiny, sample, key):
    full = run(tiny, sample, "full", 0.0)
    recs = run(tiny, sample, key.split("_strided")[0], 0.0, ARGS[key])
    assert [r["_ids"] for r in recs] == [r["_ids"] for r in full]
    assert recs[0]["attention_density"] == 1.0


@pytest.mark.parametrize("key,ratio", [("xattention", 0.5), ("flexprefill", 0.5), ("dilated", 0.5),
                                       ("tri_mix", 0.25)])
def test_engine_records_density_next_to_the_full_cache(tiny, sample, key, ratio):
    """Through the engine on the 2-layer tiny model (tri_mix: layer 0 dense, layer 1 Triangle)."""
    full = run(tiny, sample, "full", 0.0)
    rec = run(tiny, sample, key, ratio, ARGS[key].replace("starting_layer=1", "starting_layer=-1"))[0]
    assert 1 - ratio - 0.05 <= rec["attention_density"] <= 1 - ratio + 1e-9
    assert rec["kv_bytes"] == full[0]["kv_bytes"]


def test_tri_mix_refusal_is_a_failed_run_in_the_engine(tiny, sample):
    with pytest.raises(CompressionShortfall, match="layers attend densely"):
        run(tiny, sample, "tri_mix", 0.5, ARGS["tri_mix"].replace("starting_layer=1", "starting_layer=-1"))


def test_cli_runs_the_new_methods_and_fails_only_the_refused_one(tmp_path):
    """The installed console script: flexprefill at r=0.6 runs; tri_mix at r=0.6 on the 2-layer
    model (one dense layer) is a failed run with its reason, the other run still completes."""
    exe = shutil.which("lcbench")
    cmd = [exe] if exe else [sys.executable, "-m", "lcbench.cli"]
    proc = subprocess.run(cmd + ["run", "--model", "tiny-random-llama", "--method", "tri_mix,flexprefill",
                                 "--method-args", "block_size=16", "--task", "niah", "--limit", "1",
                                 "--ratio", "0.6", "--output-path", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "largest ratio it can approach is" in " ".join(proc.stderr.split())
    status = {p.parent.name.split("__")[1]: json.loads(p.read_text())["state"] for p in tmp_path.glob("*/status.json")}
    assert status == {"tri_mix": "failed", "flexprefill": "complete"}
    rec = json.loads((next(tmp_path.glob("*flexprefill*")) / "samples.jsonl").read_text().splitlines()[0])
    assert 0.35 <= rec["method_stats"]["attention_density"] <= 0.4 + 1e-9


# --- the threshold rule both papers share ---------------------------------------------------------
def test_cover_threshold_keeps_the_smallest_set_reaching_the_threshold():
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(50, 12, generator=gen) ** 3
    forced = torch.zeros(12, dtype=torch.bool)
    forced[[0, 5]] = True
    for t in (0.3, 0.6, 0.9):
        keep = cover_threshold(scores, t, forced)
        for row, mask in zip(scores, keep):
            assert bool(mask[forced].all())
            need = t * row.sum()
            assert row[mask].sum() >= need - 1e-9  # it reaches the threshold ...
            free = sorted(row[~forced].tolist(), reverse=True)
            # ... with the fewest entries: forced plus the largest others, none fewer would do
            n = int(mask.sum()) - 2
            assert sorted(row[mask & ~forced].tolist(), reverse=True) == free[:n]
            if n:
                assert row[forced].sum() + sum(free[:n - 1]) < need


# --- XAttention -----------------------------------------------------------------------------------
def test_antidiagonal_scores_equal_a_brute_force_tile_walk():
    q, k, _ = qkv(L=40, Hq=2, Hkv=1, D=8)
    S, bs = 4, 8
    got = antidiagonal_block_scores(q, k, 2, 0.3, bs, S)
    n = 10  # 40 / S tiles per side
    ref = torch.zeros(2, n, n)
    for h in range(2):
        for i in range(n):
            for j in range(n):
                ref[h, i, j] = sum(q[0, h, i * S + S - 1 - s] @ k[0, 0, j * S + s] for s in range(S)) * 0.3 / S
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    p = ref.masked_fill(~causal, float("-inf")).softmax(-1).mean(0)  # averaged over the group
    blocks = p.reshape(5, 2, 5, 2).sum((1, 3))
    assert torch.allclose(got[0, 0], blocks, atol=1e-5)


def test_xattention_keeps_the_blocks_with_the_highest_antidiagonal_mass():
    """A key token every query matches (a vertical line) crosses the antidiagonal of its tile in
    every strided query row, so its block wins every later row; at a given threshold each row keeps
    exactly the cumulative-threshold set of its antidiagonal block scores (sink and diagonal first)."""
    q, k, v = qkv(L=256)
    u = 6.0 * F.normalize(torch.randn(16, generator=torch.Generator().manual_seed(7)), dim=0)
    q += u
    k[:, :, 85] += 3 * u  # one key in block 5
    s = stage("xattention", 0.6, ARGS["xattention"])
    pattern = s.pattern(q, k, 2, 0.25)
    assert bool(pattern.blocks[..., 6:, 5].all())
    scores = antidiagonal_block_scores(q, k, 2, 0.25, 16, 4)
    assert bool((scores[..., 6:, 5] > 0.5 * scores[..., 6:, :].sum(-1)).all())  # the mass is there
    kept = s.select(s.ranking(scores), 0.8, 256).blocks
    for h in range(2):
        for r in range(16):
            row = scores[0, h, r, : r + 1].double()
            forced = {0, r}
            order = [c for c in row.argsort(descending=True).tolist() if c not in forced]
            want, mass = set(forced), float(row[list(forced)].sum())
            for c in order:  # the smallest prefix of the ranking that reaches the threshold
                if mass >= 0.8 * float(row.sum()):
                    break
                want.add(c)
                mass += float(row[c])
            assert set(kept[0, h, r].nonzero().flatten().tolist()) == want, (h, r)


# --- FlexPrefill ----------------------------------------------------------------------------------
def planted_heads(L=256, seed=0):
    """KV head 0: random (its pooled estimate matches the true block distribution); KV head 1: a
    vertical line at key 100 whose block (96–111) averages to nothing along it, so the pooled
    estimate misses what the last queries actually attend."""
    q, k, v = qkv(L=L, seed=seed)
    u = F.normalize(torch.randn(16, generator=torch.Generator().manual_seed(3)), dim=0)
    q[:, 2:] += 4.0 * u
    k[:, 1, 96:112] -= (k[:, 1, 96:112] @ u)[..., None] * u  # block 6 orthogonal to u ...
    k[:, 1, 100] += 12.0 * u  # ... but for one key
    k[:, 1, 101:112] -= (12.0 / 11) * u  # and the block's mean along u is 0
    return q, k, v


def test_flexprefill_chooses_the_pattern_per_head_by_js_divergence():
    q, k, v = planted_heads()
    s = stage("flexprefill", 0.6, "block_size=16,min_budget=32")  # 2 blocks: the sink and one more
    s.begin_sample()
    vertical, slash, query_aware, _ = s.estimate(q, k, 2, 0.25)
    assert query_aware.tolist() == [[True, False]]
    pattern = s.pattern(q, k, 2, 0.25)
    assert bool(pattern.blocks[0, 1, 7:, 6].all())  # the vertical-slash head keeps the line's column
    assert float(vertical[0, 1, 100]) > 0.5  # the last queries put most of their mass on it


def test_flexprefill_query_aware_blocks_are_the_smallest_set_reaching_gamma():
    """A query-aware head keeps, over its whole pooled block map (one unit of mass per query
    block), the fewest highest pairs whose mass reaches gamma, plus the min-budget sink column and
    main diagonal."""
    q, k, v = qkv(L=256)
    s = stage("flexprefill", 0.5, "block_size=16,min_budget=16,tau=1")  # tau=1: every head query-aware
    s.begin_sample()
    estimates = s.estimate(q, k, 2, 0.25)
    assert bool(estimates[2].all())
    nb = 16
    causal = torch.ones(nb, nb, dtype=torch.bool).tril()
    forced = (torch.arange(nb)[None, :] == 0) | torch.eye(nb, dtype=torch.bool)  # sink column, diagonal
    for gamma in (0.3, 0.7):
        kept = s.select(s.plan(estimates), gamma, 256).blocks
        for h in range(2):
            flat = estimates[3][0, h][causal].double()
            assert float(flat.sum()) == pytest.approx(nb)
            chosen, mass = set(), 0.0
            for c in flat.argsort(descending=True).tolist():
                if mass >= gamma * nb:
                    break
                chosen.add(c)
                mass += float(flat[c])
            want = torch.zeros(len(flat), dtype=torch.bool)
            want[list(chosen)] = True
            assert torch.equal(kept[0, h][causal], want | forced[causal]), (gamma, h)


def test_sqrt_js_divergence_is_zero_for_equal_and_one_for_disjoint():
    p = torch.tensor([0.5, 0.5, 0.0, 0.0])
    assert float(sqrt_js_divergence(p, p)) == pytest.approx(0.0, abs=1e-5)
    assert float(sqrt_js_divergence(p, p.flip(0))) == pytest.approx(math.sqrt(math.log(2)), abs=1e-4)


# --- TriangleMix and the dilated patterns ---------------------------------------------------------
def test_tri_mix_is_dense_shallow_and_triangle_deep():
    q, k, v = qkv(L=256)
    s = stage("tri_mix", 0.3, ARGS["tri_mix"])
    outs = prefill_all_layers(s, q, k, v)
    assert outs[0] is None
    mask = s.pattern(q, k, 2, 0.25).dense_mask()[0, 0]
    assert bool(mask[16:, :16].all())  # sinks
    assert bool(mask[-16:].sum(-1).eq(torch.arange(241, 257)).all())  # the last queries see everything
    middle = mask[128:240, 16:64]  # middle Q-K: neither sink, local nor last
    assert not bool(middle.any())


@pytest.mark.parametrize("variant", ["dilated", "strided"])
def test_dilated_patterns_attend_every_other_block_diagonal(variant):
    q, k, _ = qkv(L=512)
    s = stage("dilated", 0.6, f"{ARGS['dilated']},variant={variant}")
    blocks = s.pattern(q, k, 2, 0.25).blocks[0, 0]
    nb = 32
    offsets = {d: bool(blocks.diagonal(-d)[1:].all()) for d in range(nb) if blocks.diagonal(-d)[1:].numel()}
    kept = [d for d, on in offsets.items() if on]
    span = max(kept) + 1
    if variant == "dilated":
        assert all(d % 2 == 0 for d in kept) and all(offsets[d] for d in range(0, span, 2))
    else:
        dense = max(1, round(span / 3))
        assert all(offsets[d] for d in range(dense))  # dense local ...
        assert all(d % 2 == 0 for d in kept if d >= dense)  # ... then dilated
    assert bool(blocks[1:, 0].all())  # the sink block


# --- MInference's per-head pattern search ---------------------------------------------------------
MINF = ("block_size=16,sink_tokens=16,last_queries=16,sink_columns=4,local_slashes=8,slash_per_vertical=0.5,"
        "search_queries=64")


@pytest.fixture
def minference_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LCBENCH_CACHE", str(tmp_path))
    return tmp_path / "minference"


def two_kinds_of_heads(L=256):
    """KV head 0: query block i attends key block i // 2 (a different block per query block, no line:
    only a block-level estimate sees it); KV head 1: every query attends 10 single keys scattered
    over 10 blocks (vertical lines, which no small set of blocks covers)."""
    q, k, v = qkv(L=L)
    e = 5.0 * torch.eye(16)
    for i in range(2, 16):  # head 0: q heads 0, 1
        q[:, :2, i * 16:(i + 1) * 16] += e[i]
        k[:, 0, (i // 2) * 16:(i // 2 + 1) * 16] += e[i]
    u = 5.0 * F.normalize(torch.ones(16), dim=0)
    q[:, 2:] += u  # head 1: q heads 2, 3
    k[:, 1, [20, 41, 60, 75, 99, 120, 140, 161, 180, 200]] += 2 * u
    return q, k, v


def test_minference_search_picks_the_pattern_with_the_highest_recall_per_head(minference_cache):
    q, k, v = two_kinds_of_heads()
    s = stage("minference", 0.7, MINF)
    s.begin_sample()
    out = s.prefill_attention(MODULE4, q, k, v, None, 0.25, 0)
    assert s.choices[0] == ["block_topk", "vertical_slash"]
    pattern = s.pattern(q, k, 2, 0.25)
    assert torch.allclose(out, reference(q, k, v, pattern.dense_mask(), 0.25), atol=1e-5)
    assert 0.25 <= s.sample_stats()["attention_density"] <= 0.3 + s.tolerance
    # the choice is cached per model: a new instance (a later run) reuses it without searching
    assert len(list(minference_cache.glob("*.json"))) == 1
    again = stage("minference", 0.7, MINF)
    again.search = lambda *a, **k: pytest.fail("searched again although the choice is cached")
    again.begin_sample()
    again.prefill_attention(MODULE4, *qkv(L=256, seed=5), None, 0.25, 0)
    assert again.choices[0] == ["block_topk", "vertical_slash"]


@pytest.mark.parametrize("target", [0.75, 0.5, 0.25])
def test_minference_meets_density_and_is_dense_on_its_blocks(minference_cache, target):
    q, k, v = qkv(L=1024)
    s = stage("minference", 1 - target, MINF)
    s.begin_sample()
    out = s.prefill_attention(MODULE4, q, k, v, None, 0.25, 0)
    assert abs(s.sample_stats()["attention_density"] - target) <= s.tolerance
    assert torch.allclose(out, reference(q, k, v, s.pattern(q, k, 2, 0.25).dense_mask(), 0.25), atol=1e-5)


def test_minference_through_the_engine(tiny, sample, minference_cache):
    full = run(tiny, sample, "full", 0.0)
    zero = run(tiny, sample, "minference", 0.0, MINF)
    assert [r["_ids"] for r in zero] == [r["_ids"] for r in full]
    assert not minference_cache.exists()  # ratio 0: dense, nothing searched
    rec = run(tiny, sample, "minference", 0.5, MINF)[0]
    assert abs(rec["attention_density"] - 0.5) <= 0.05 and rec["kv_bytes"] == full[0]["kv_bytes"]
    assert len(list(minference_cache.glob("*.json"))) == 1
