"""Grouping samples for the engine's one pipeline (``--batch-size N|auto``): several contexts
prefilled, compressed and decoded together by :meth:`lcbench.engine.runner.Engine.run_group`, with
every answer token-identical to running each sample alone.

How a group runs (the engine's steps, :mod:`lcbench.engine.runner`): the samples' context parts
are left-padded into one ``(B, P)`` prefill, each row at its own true positions with its padding
marked invalid; on the compressing pass each layer is split back into rows and each sample's own
fresh copies of the cache stages compress its unpadded row (:mod:`lcbench.engine.per_row`), so
budgets, pooling edges, quantization groups and per-sample state are those of a one-sample run;
every pending turn then becomes a decode row and all rows decode together.

Groups (:func:`plan_groups`): samples sorted by context length, longest first (an out-of-memory
shows at once), grown while the group's turns fit in ``rows`` and the padding stays under
``max_padding`` of the padded tokens. ``auto`` (:func:`auto_rows`) sizes ``rows`` from the free
memory (CUDA allocator on GPU, available RAM on CPU) and an estimate of one row's bytes.

Timings of a record are those its row lived through (the group's prefill, its decode); a record
says how many samples and rows shared them (``batch_samples``, ``batch_rows``). One rule decides
whether samples may share a prefill (:func:`batch_refusal`): every stage must act on each row of a
prefill alone — text and cache stages without cross-sample state. Decode and sparse-attention
stages act on the padded batch as a whole, ``context_inputs`` stages replace one sample's prefill,
multi-turn turns run in order, and query-aware mode compresses each turn's own prefill; those run
one sample per group, through the same pipeline.
"""

from __future__ import annotations

import os
from typing import Iterator

import torch

from ..methods.chain import Chain
from ..results.record import TurnRecord
from ..tasks.sample import Sample

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


# --- running --------------------------------------------------------------------------------------
def run_batched(engine, samples: list[Sample], skip: dict[str, set[int]], rows: int | str,
                window: int | None = None) -> Iterator[tuple[int, list[TurnRecord]]]:
    """Yield ``(samples finished so far, records)`` group by group. Samples are prepared (text
    stage, rendering) ``window`` at a time (default 8 × rows) and grouped within each window."""
    done = 0
    step = window or 8 * (rows if isinstance(rows, int) else 8)
    for begin in range(0, len(samples), step):
        batch = [s for s in samples[begin:begin + step]]
        pending = [engine.prepare(s, skip_turns=skip.get(s.id, set())) for s in batch
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
            records = engine.run_group(members, rows=limit)
            done += len(members)
            yield done, records
