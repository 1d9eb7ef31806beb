"""Batching across samples (``--batch-size N|auto``): several contexts prefilled, compressed and
decoded together, with every answer token-identical to running each sample alone.

How a group runs (:func:`run_group`):

1. The samples' context parts are left-padded into one ``(B, P)`` prefill; each row has its own
   true positions (0…n−1) and its padding is marked invalid in the cache, so attention hides it.
2. On the compressing pass each layer is split back into rows and every cache stage runs on each
   row's unpadded layer with that row's observations (:class:`PerRowCompression`), through a
   fresh copy of the stage per sample — so budgets, pooling edges, quantization groups and
   per-sample state are exactly those of a run with batch size 1. The rows are then stacked again
   (:func:`lcbench.engine.row_stack.stack_rows`), each keeping what it kept.
3. Every pending turn of every sample becomes a decode row (a copy of its sample's compressed
   cache); question parts are left-padded, and all rows decode greedily together.

Groups (:func:`plan_groups`): samples sorted by context length, longest first (an out-of-memory
shows at once), grown while the group's turns fit in ``rows`` and the padding stays under
``max_padding`` of the padded tokens. ``auto`` (:func:`auto_rows`) sizes ``rows`` from the free
memory (CUDA allocator on GPU, available RAM on CPU) and an estimate of one row's bytes.

Timings of a record are those its row lived through (the group's prefill, its decode); a record
says how many samples and rows shared them (``batch_samples``, ``batch_rows``). Chains with
decode, sparse-attention or ``context_inputs`` stages, stages that carry state across samples,
multi-turn mode and query-aware mode run one sample at a time (:func:`batch_refusal` says why).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch

from ..cache import KVCache
from ..methods.base import LayerObservation, Needs, Stage
from ..methods.chain import Chain
from ..tasks.sample import Sample
from .prompt import RenderedPrompt
from .row_stack import cache_of, row_layers, stack_rows, take_rows
from .state import PREFILL, ForwardState

BATCHABLE_STAGES = {"text", "cache"}


def batch_refusal(chain: Chain, multi_turn: bool, query_aware: bool) -> str | None:
    """Why the samples of this run cannot share a batch (None when they can)."""
    if multi_turn:
        return "multi-turn turns run in order, one sample at a time"
    if query_aware:
        return "query-aware mode compresses each turn's own prefill"
    for stage in chain.stages:
        other = set(stage.stages) - BATCHABLE_STAGES
        if other:
            return f"method '{stage.name}' has a {sorted(other)[0]} stage, which runs per sample"
        if stage.cross_sample_state:
            return f"method '{stage.name}' carries state from one sample to the next"
    return None


# --- planning --------------------------------------------------------------------------------
def plan_groups(sizes: list[tuple[int, int]], rows: int, max_padding: float = 0.25) -> list[list[int]]:
    """Indices of ``sizes`` (context tokens, turn rows) in groups: longest context first; a group
    takes the next sample while its rows stay ≤ ``rows`` and padding ≤ ``max_padding`` of the
    group's padded tokens. A sample with more rows than ``rows`` is a group of its own."""
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i][0], i))
    groups: list[list[int]] = []
    for i in order:
        tokens, n = sizes[i]
        if groups:
            group = groups[-1]
            longest = sizes[group[0]][0]
            real = sum(sizes[j][0] for j in group) + tokens
            padded = longest * (len(group) + 1)
            if sum(sizes[j][1] for j in group) + n <= rows and 1.0 - real / padded <= max_padding:
                group.append(i)
                continue
        groups.append([i])
    return groups


def auto_rows(model, tokens_per_row: int, query_tokens: int | None = None, cap: int = 64,
              share: float = 0.5) -> int:
    """Rows that fit in ``share`` of the free memory: per row, its KV (all layers, dense), the
    activations of one forward pass over ``query_tokens`` (hidden states, q/k/v/o and MLP
    projections) and its boolean attention mask (``query_tokens × tokens_per_row``). An estimate
    (weights are already loaded, so free memory excludes them); at least 1, at most ``cap``."""
    from .runner import kv_bytes_per_token

    device = next(model.parameters()).device
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = _available_ram()
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    elem = torch.finfo(model.dtype).bits // 8
    q = min(query_tokens or tokens_per_row, tokens_per_row)
    intermediate = getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)
    activations = q * elem * (6 * cfg.hidden_size + 3 * intermediate)
    per_row = tokens_per_row * kv_bytes_per_token(model) + activations + q * tokens_per_row
    return int(max(1, min(cap, share * free // max(1, per_row))))


def _available_ram() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# --- compressing each row as if alone ------------------------------------------------------------
def row_observation(seen: LayerObservation, row: int, offset: int, length: int, needs: Needs) -> LayerObservation:
    """What row ``row`` (its ``length`` real tokens start at slot ``offset``) would have observed
    alone: its keys only, and the last ``min(window, length)`` window queries."""
    window = min(needs.window, length) if needs.window else None

    def own(t: torch.Tensor | None, keys_last: bool = False, queries_dim: int | None = None):
        if t is None:
            return None
        t = t[row:row + 1]
        if keys_last:
            t = t[..., offset:]
        if queries_dim is not None and window is not None:
            t = t.narrow(queries_dim, t.shape[queries_dim] - window, window)
        return t

    return LayerObservation(
        layer_idx=seen.layer_idx, num_layers=seen.num_layers, num_groups=seen.num_groups,
        context_length=length - seen.protected, protected=seen.protected,
        window_attention=own(seen.window_attention, keys_last=True, queries_dim=2),
        window_queries=own(seen.window_queries, queries_dim=2),
        attention_sum=own(seen.attention_sum, keys_last=True),
        queries=None if seen.queries is None else seen.queries[row:row + 1, :, offset:],
        extra=dict(seen.extra), module=seen.module,
        positions=None if seen.positions is None else seen.positions[row:row + 1, offset:])


class PerRowCompression(Stage):
    """The cache stage of a cross-sample prefill: splits each layer into its samples' rows, runs
    each sample's own copies of the chain's cache stages on its row, and stacks the results."""

    name = "per-row"
    stages = ("cache",)

    def __init__(self, row_stages: list[list[Stage]], lengths: list[int], needs: Needs):
        super().__init__(0.0)
        self.row_stages = row_stages
        self.lengths = lengths
        self.needs = needs

    def compress_layer(self, layer, seen):
        width = layer.seq_len()
        rows = row_layers(layer)
        kept = []
        for j, (stages, n) in enumerate(zip(self.row_stages, self.lengths)):
            n = min(n, width)  # a sliding-window layer kept only its last `width` slots (engine/attention.py)
            row, row_seen = rows[j], row_observation(seen, j, width - n, n, self.needs)
            for stage in stages:
                row = stage.compress_layer(row, row_seen)
            kept.append(row)
        return stack_rows(kept)


def fresh_copies(stages: list[Stage]) -> list[Stage]:
    """Per-sample copies of ``stages``, each reset with ``begin_sample`` (state never shared)."""
    out = [copy.deepcopy(stage) for stage in stages]
    for stage in out:
        stage.begin_sample()
    return out


# --- running a group -------------------------------------------------------------------------------
@dataclass
class Prepared:
    """A sample after its text stage and rendering, with the turns still to run."""

    sample: Sample
    prompt: RenderedPrompt
    common: dict[str, Any]
    todo: list[int]
    stats: dict[str, float] = field(default_factory=dict)  # what its text stages measured


def prepare(engine, sample: Sample, skip_turns: Iterable[int] = ()) -> Prepared:
    prompt, _, common = engine.prepare(sample, multi_turn=False)
    stats: dict[str, float] = {}
    for stage in engine.chain.stages:
        if "text" in stage.stages:
            stats.update(stage.sample_stats())
    todo = [k for k in range(len(sample.turns)) if k not in set(skip_turns)]
    return Prepared(sample, prompt, common, todo, stats)


def _prefill_group(engine, group: list[Prepared]) -> tuple[KVCache, dict[str, float], list[list[Stage]]]:
    """Prefill the group's contexts left-padded; each row is compressed as if alone."""
    cache_stages = [s for s in engine.chain.stages if "cache" in s.stages]
    row_stages = [fresh_copies(cache_stages) for _ in group]
    lengths = [len(p.prompt.context_ids) for p in group]
    stages = [PerRowCompression(row_stages, lengths, engine.chain.needs)] if cache_stages else []
    cache = KVCache(engine.num_layers)
    state = ForwardState(cache=cache, stages=stages, needs=engine.chain.needs, timer=engine.clock)
    state.phase = PREFILL
    state.compressing = bool(stages)
    ids, valid = engine._tensor([p.prompt.context_ids for p in group])
    width = ids.shape[1]
    offsets = torch.tensor([width - n for n in lengths], device=engine.device)
    pos = (torch.arange(width, device=engine.device)[None, :] - offsets[:, None]).clamp(min=0)
    start = engine.clock.now()
    with torch.inference_mode():
        engine._chunked_forward(ids, pos, state, valid)
    total = engine.clock.now() - start
    engine.memory.sample()
    return cache, {"compress_s": state.compress_seconds, "prefill_s": total - state.compress_seconds}, row_stages


def _stage_stats(stages: list[Stage], into: dict[str, float]) -> dict[str, float]:
    for stage in stages:
        into.update(stage.sample_stats())
    return into


def run_group(engine, group: list[Prepared], rows: int) -> list[dict[str, Any]]:
    """Records for every pending turn of ``group``'s samples, prefilled together and decoded
    ``rows`` turns at a time."""
    engine.memory.reset()
    cache, times, row_stages = _prefill_group(engine, group)
    per_layer = [row_layers(layer) for layer in cache.layers]
    measured, stats = [], []
    for j, p in enumerate(group):
        m = engine._measure(cache_of([by_row[j] for by_row in per_layer]), p.common["context_tokens_original"])
        s = _stage_stats(row_stages[j], dict(p.stats))
        engine._check(m, s)
        measured.append(m)
        stats.append(s)
    del per_layer
    pending = [(j, k) for j, p in enumerate(group) for k in p.todo]
    size = max(1, rows)
    records = []
    for start in range(0, len(pending), size):
        chunk = pending[start:start + size]
        last = start + size >= len(pending)
        counts = [sum(1 for j2, _ in chunk if j2 == j) for j in range(len(group))]
        decode_cache = cache if last and all(c == 1 for c in counts) else cache_of(
            [take_rows(layer, counts) for layer in cache.layers])
        if last:
            del cache  # no second copy of the contexts' KV outlives its use
        outs, t2 = engine._decode_rows(
            decode_cache, [group[j].prompt.turn_ids[k] for j, k in chunk],
            [len(group[j].prompt.context_ids) for j, _ in chunk],
            [group[j].sample.turns[k] for j, k in chunk], {})
        del decode_cache
        for (j, k), out in zip(chunk, outs):
            p = group[j]
            s = _stage_stats(row_stages[j], stats[j])
            rec = engine._record(k, p.sample, out, {**times, **t2}, {**measured[j], **s}, p.common,
                                 len(p.prompt.context_ids) + len(p.prompt.turn_ids[k]), len(chunk))
            rec["batch_samples"] = len(group)
            records.append(rec)
    return records


def run_batched(engine, samples: list[Sample], skip: dict[str, set[int]], rows: int | str,
                window: int | None = None) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """Yield ``(samples finished so far, records)`` group by group. Samples are prepared (text
    stage, rendering) ``window`` at a time (default 8 × rows) and grouped within each window."""
    done = 0
    step = window or 8 * (rows if isinstance(rows, int) else 8)
    for begin in range(0, len(samples), step):
        batch = [s for s in samples[begin:begin + step]]
        pending = [prepare(engine, s, skip.get(s.id, set())) for s in batch
                   if len(skip.get(s.id, set())) < len(s.turns)]
        done += len(batch) - len(pending)
        if not pending:
            yield done, []
            continue
        sizes = [(len(p.prompt.context_ids) + max(len(p.prompt.turn_ids[k]) for k in p.todo), len(p.todo))
                 for p in pending]
        limit = rows if isinstance(rows, int) else auto_rows(
            engine.model, max(t for t, _ in sizes) + max(p.sample.turns[k].max_new_tokens
                                                         for p in pending for k in p.todo),
            engine.config.prefill_chunk)
        for group in plan_groups(sizes, limit):
            members = [pending[i] for i in group]
            records = run_group(engine, members, limit)
            done += len(members)
            yield done, records
