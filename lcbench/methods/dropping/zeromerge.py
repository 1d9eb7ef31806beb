"""ZeroMerge: per-head eviction whose evicted tokens are merged into residual slots, with the
attention compensation of the merged slots.

Liu, Liu and Tang, "ZeroMerge: Parameter-Free KV Cache Compression for Memory-Efficient
Long-Context LLMs" (arXiv:2503.10714; later retitled ZSMerge). Read against the official
implementation, github.com/SusCom-Lab/ZSMerge at commit 4bab12788b700ca31c9a31e36e93d4ca8a084176,
``mergekv/mergekv.py`` (``cache_args_parse``, ``score_scaled_dot_product_attention``,
``cache_init``), whose defaults are this method's.

Each KV head (head-level allocation: every head chooses its own tokens) keeps a budget of ``K``
slots per head, split three ways as the official ``cache_args_parse`` splits its ``cache_budget``:

* a *proximity* window: the newest ``max(2, tail · K)`` context tokens;
* *context* tokens: the highest-scoring of the rest, the score of a key being the attention it
  received from the prefill's queries with recent queries weighing more (query ``i`` of ``q``
  weighs ``shrink_factor^(q−1−i)``), summed over the query heads of the KV head;
* ``residual`` *merged* slots: every token that is not kept, split in storage order into
  ``residual`` near-equal contiguous chunks, each chunk averaged into one slot (keys and values).

A merged slot standing for ``n`` tokens gets the attention compensation ``scale_factor · log n``
added to its logit (the official ``scores += scale_factor * log(pos_weight)``): with the default
``scale_factor=1`` attention over the slot equals attention over ``n`` copies of it. lcbench
stores it as the layer's per-slot bias (:class:`lcbench.cache.layer.DenseLayer` ``bias``), which
the engine's attention adds to the logits; the bias is stored bytes, counted in the layer's
``nbytes``, and the budget ``K`` is set so that keys, values and bias together meet ``--ratio``.
A merged slot keeps the true position of its newest member (so a sliding window drops it last).

During generation (``decode_merge``, on by default as in the official ``cache_update``) the cache
keeps the size decoding began with: after each token every slot's score decays by
``shrink_factor`` and gains the new query's attention, and the lowest-scoring slot outside the
merged slots and the proximity window (the ``recent`` newest slots: question and generated tokens
join it as they arrive) is merged, weighted by the tokens each stands for, into the merged slot
whose key is most similar (dot product), which takes the larger score and the compensation of its
new count; the layer then holds one slot fewer. (The official code keeps its proximity window as a
ring buffer and moves the token leaving it into the freed slot, so that token cannot be merged in
the step it leaves the window; here it can.) Every
token stays represented exactly once: the weights always sum to the tokens seen. Multi-turn mode
cannot crop a turn's answer out of merged slots; when that leaves heads with different numbers of
prompt tokens the layer would have to become ragged, which cannot hold the bias, and the run is
refused — pass ``decode_merge=false`` there.

A chain must end with zeromerge where a later stage would convert the layer (head-wise ragged
budgets, quantization, channel pruning): those layer kinds cannot hold the bias and refuse it.
"""

from __future__ import annotations

import math

import torch

from ...cache.layer import DenseLayer
from ...engine.attention import grouped_scores
from ...errors import UserError
from ...params import Param
from ..base import Needs, Stage, keep_count
from .decode_eviction import EvictingLayer
from .select import context_slots, query_positions, real_context_slots

SCORE, EXTRA, RESIDUAL = "zeromerge_score", "zeromerge_extra", "zeromerge_residual"  # per-slot decode tracks
# (EXTRA: tokens merged into a slot besides its own — so the 0 a decode track gives a new token is right)

SCORE_CHUNK_BYTES = 64 * 2**20  # float32 scores of the decayed attention sum computed at a time
NEGLIGIBLE = 1e-7  # queries whose decay weight is below this share are left out of the score


def decayed_attention(query: torch.Tensor, key: torch.Tensor, key_positions: torch.Tensor,
                      query_positions: torch.Tensor, valid: torch.Tensor | None, bias: torch.Tensor | None,
                      groups: int, scaling: float, shrink: float) -> torch.Tensor:
    """(B, Hkv, L): attention each key got from the queries, query ``i`` of ``q`` weighted by
    ``shrink^(q−1−i)`` and summed over the ``groups`` query heads of each KV head (the official
    ``score_scaled_dot_product_attention`` with ``de_repeat_kv``). A query sees the keys at true
    positions up to its own; queries with a weight below ``NEGLIGIBLE`` are skipped."""
    b, hq, q, d = query.shape
    hkv, L = key.shape[1], key.shape[2]
    first = 0
    if shrink < 1.0:
        first = max(0, q - 1 - int(math.ceil(math.log(NEGLIGIBLE) / math.log(shrink))))
    k32 = key.float()
    total = torch.zeros(b, hkv, L, device=key.device)
    chunk = max(1, SCORE_CHUNK_BYTES // (4 * hq * max(1, L) * b))
    for start in range(first, q, chunk):
        stop = min(q, start + chunk)
        n = stop - start
        qs = query[:, :, start:stop].float().reshape(b, hkv, groups * n, d)
        logits = torch.matmul(qs, k32.transpose(-1, -2)).mul_(scaling).view(b, hkv, groups, n, L)
        if bias is not None:
            logits += bias.float()[:, :, None, None, :]
        seen = key_positions[:, :, None, None, :] <= query_positions[start:stop].to(key.device)[None, None, None, :, None]
        if valid is not None:
            seen = seen & valid[:, :, None, None, :]
        probs = logits.masked_fill_(~seen, float("-inf")).softmax(-1).nan_to_num_(0.0)
        weight = torch.pow(torch.full((n,), float(shrink), device=key.device),
                           torch.arange(q - 1 - start, q - 1 - stop, -1, device=key.device, dtype=torch.float32))
        total += (probs * weight[None, None, None, :, None]).sum((2, 3))
    return total


def split_budget(k: int, tail: float, residual: int) -> tuple[int, int]:
    """(proximity tokens, merged slots) of a per-head budget of ``k`` slots, as the official
    ``cache_args_parse``: ``max(2, int(tail·k))`` recent tokens, ``residual`` merged slots, the rest
    context tokens; a budget too small for all three keeps fewer recent tokens, then fewer slots."""
    recent = min(k, max(2, int(tail * k)))
    merged = min(residual, k - recent)
    if merged == 0 and k >= 2:
        recent, merged = recent - 1, 1
    return recent, merged


def chunk_ids(residual: torch.Tensor, slots: int) -> torch.Tensor:
    """(B, H, n): the merged slot (0 … slots−1) each ``residual`` token goes to — near-equal contiguous
    chunks in storage order, the first ``R mod slots`` one longer (official ``cache_init``) — and
    ``slots`` (a spare, dropped) for the others."""
    rank = residual.long().cumsum(-1) - 1  # rank among the residual tokens
    count = residual.sum(-1, keepdim=True)
    size, extra = count // slots, count % slots
    big = extra * (size + 1)
    chunk = torch.where(rank < big, rank // (size + 1), extra + (rank - big) // size.clamp(min=1))
    return torch.where(residual, chunk.clamp(0, slots - 1), slots)


def merge_chunks(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, weights: torch.Tensor,
                 residual: torch.Tensor, slots: int):
    """The ``slots`` merged slots of each row and head: the tokens marked ``residual`` (B, H, n),
    in storage order, split into near-equal contiguous chunks (the first ``R mod slots`` chunks one
    longer, as the official ``cache_init``), each averaged with ``weights`` (B, H, n) > 0 into one
    slot. Returns keys, values (B, H, slots, D), the newest member's position, each slot's total
    weight (0 for a chunk left empty) and whether it holds any token."""
    b, h, n, _ = keys.shape
    chunk = chunk_ids(residual, slots)
    w = (weights.float() * residual)[..., None]
    out = []
    for x in (keys, values):
        acc = torch.zeros(b, h, slots + 1, x.shape[-1], device=x.device)
        acc.scatter_add_(2, chunk[..., None].expand(-1, -1, -1, x.shape[-1]), x.float() * w)
        out.append(acc[:, :, :slots])
    total = torch.zeros(b, h, slots + 1, device=keys.device).scatter_add_(2, chunk, w[..., 0])[..., :slots]
    newest = torch.full((b, h, slots + 1), -1, dtype=torch.long, device=keys.device)
    newest = newest.scatter_reduce(2, chunk, torch.where(residual, positions, -1), "amax")[..., :slots]
    held = total > 0
    div = total.clamp(min=torch.finfo(torch.float32).tiny)[..., None]
    return (out[0] / div).to(keys.dtype), (out[1] / div).to(values.dtype), newest.clamp(min=0), total, held


class ZeroMerge(Stage):
    name = "zeromerge"
    family = "kv_dropping"
    paper = ("Liu, Liu and Tang, ZeroMerge: Parameter-Free KV Cache Compression for Memory-Efficient "
             "Long-Context LLMs (arXiv:2503.10714); github.com/SusCom-Lab/ZSMerge @4bab127")
    summary = ("per head: recent window + top decayed-attention tokens kept, the rest averaged into residual "
               "slots whose logits get log(merged count)")
    params = (
        Param("tail", float, 0.1, "share of each head's budget kept as the most recent tokens (at least 2)",
              min=0.0, max=1.0),
        Param("residual", int, 1, "merged slots per head that the evicted tokens are averaged into", min=1),
        Param("shrink_factor", float, 0.98, "decay of older queries' weight in the attention score", min=0.0, max=1.0),
        Param("scale_factor", float, 1.0, "the compensation: a merged slot of n tokens adds scale_factor·log n "
              "to its logit (0: none)", min=0.0),
        Param("decode_merge", bool, True, "keep merging while generating, so the cache keeps the size decoding "
              "began with (the official cache_update); false: generated tokens are appended whole"),
    )

    def begin_sample(self):
        self._decode: dict[int, dict] = {}

    def __init__(self, ratio: float = 0.0, **args):
        super().__init__(ratio, **args)
        self.needs = Needs(queries=True)

    def budget(self, layer, seen, keys, values) -> int:
        """Context slots per head: the layer's keys, values and bias together hold what ``--ratio``
        leaves of the dense keys and values (the bias is 4 bytes per slot)."""
        per_slot = (keys.shape[-1] * keys.element_size() + values.shape[-1] * values.element_size())
        total = keep_count(real_context_slots(layer, seen) + seen.protected, self.ratio)
        return max(1, total * per_slot // (per_slot + 4) - seen.protected)

    def compress_layer(self, layer, seen):
        n = context_slots(layer, seen)
        if self.ratio <= 0 or n <= 1:
            return layer
        if type(layer) is not DenseLayer:
            raise UserError(f"zeromerge merges full-precision keys/values of a dense layer (got a {type(layer).__name__}). "
                            f"Quantized, ragged (head-wise budget) and channel-pruned layers cannot hold its merged slots' bias either, "
                            f"so it does not chain with them in any order. Fix: use zeromerge alone or after a "
                            f"dense token-dropping stage (e.g. snapkv+zeromerge).")
        keys, values = layer.dense()
        k = self.budget(layer, seen, keys, values)
        if k >= real_context_slots(layer, seen):
            return layer
        module = seen.module
        scaling = float(getattr(module, "scaling", keys.shape[-1] ** -0.5))
        every = decayed_attention(seen.queries, keys, layer.positions, query_positions(seen),
                                  layer.valid, layer.bias, seen.num_groups, scaling, self.args["shrink_factor"])
        scores = every[..., :n]
        b, h, _ = scores.shape
        real = torch.ones(b, h, n, dtype=torch.bool, device=keys.device) if layer.valid is None \
            else layer.valid[..., :n]
        recent, slots = split_budget(k, self.args["tail"], self.args["residual"])
        from_end = real.flip(-1).long().cumsum(-1).flip(-1)  # 1 = the newest real context token
        priority = scores.masked_fill(real & (from_end <= recent), float("inf")).masked_fill(~real, float("-inf"))
        kept = priority.topk(k - slots, dim=-1).indices.sort(-1).values  # (B, H, k - slots)
        residual = real.clone()
        residual.scatter_(-1, kept, False)
        weights = torch.ones(b, h, n, device=keys.device) if layer.bias is None else layer.bias[..., :n].float().exp()
        mk, mv, mpos, mweight, held = merge_chunks(keys[:, :, :n], values[:, :, :n], layer.positions[..., :n],
                                                   weights, residual, slots)
        bias_kept = (torch.zeros(b, h, n, device=keys.device) if layer.bias is None
                     else layer.bias[..., :n].float()).gather(-1, kept)
        mbias = (mweight.clamp(min=1.0).log() * self.args["scale_factor"]).where(held, 0.0)
        mscore = torch.full((b, h, slots + 1), float("-inf"), device=keys.device).scatter_reduce(
            2, chunk_ids(residual, slots), scores.float(), "amax")[..., :slots].where(held, 0.0)  # official "max"
        gather = kept[..., None]
        ck = torch.cat([keys.gather(2, gather.expand(-1, -1, -1, keys.shape[-1])), mk], dim=2)
        cv = torch.cat([values.gather(2, gather.expand(-1, -1, -1, values.shape[-1])), mv], dim=2)
        cpos = torch.cat([layer.positions.gather(-1, kept), mpos], dim=-1)
        cbias = torch.cat([bias_kept, mbias], dim=-1)
        cvalid = torch.cat([real.gather(-1, kept), held], dim=-1)
        order = torch.where(cvalid, cpos, -1).argsort(dim=-1, stable=True)  # storage order = true positions (empty first)
        ck = ck.gather(2, order[..., None].expand(-1, -1, -1, ck.shape[-1]))
        cv = cv.gather(2, order[..., None].expand(-1, -1, -1, cv.shape[-1]))
        cpos, cbias, cvalid = cpos.gather(-1, order), cbias.gather(-1, order), cvalid.gather(-1, order)
        cscore = torch.cat([scores.float().gather(-1, kept), mscore], dim=-1).gather(-1, order)
        cweight = torch.cat([weights.gather(-1, kept), mweight.where(held, 1.0)], dim=-1).gather(-1, order)
        cresidual = torch.cat([torch.zeros_like(kept, dtype=torch.float32), held.float()], dim=-1).gather(-1, order)
        tail = slice(n, None)  # the protected slots (the question in query-aware mode) stay as they are
        tail_bias = (torch.zeros_like(layer.positions[..., tail], dtype=torch.float32) if layer.bias is None
                     else layer.bias[..., tail].float())
        tail_valid = (torch.ones_like(layer.positions[..., tail], dtype=torch.bool) if layer.valid is None
                      else layer.valid[..., tail])
        layer.keys = torch.cat([ck, keys[:, :, tail]], dim=2).contiguous()
        layer.values = torch.cat([cv, values[:, :, tail]], dim=2).contiguous()
        layer.positions = torch.cat([cpos, layer.positions[..., tail]], dim=-1).contiguous()
        layer.bias = torch.cat([cbias, tail_bias], dim=-1).contiguous()
        valid = torch.cat([cvalid, tail_valid], dim=-1)
        layer.valid = None if bool(valid.all()) else valid
        if self.args["decode_merge"]:
            if not hasattr(self, "_decode"):
                self.begin_sample()
            self._decode[seen.layer_idx] = {
                SCORE: torch.cat([cscore, every[..., n:].float()], dim=-1),
                EXTRA: torch.cat([cweight, tail_bias.exp()], dim=-1) - 1.0,
                RESIDUAL: torch.cat([cresidual, torch.zeros_like(tail_bias)], dim=-1),
                "recent": recent, "scaling": scaling}
        return layer

    # --- generation: the official cache_update (init_f False) ---------------------------------
    def after_decode_step(self, layer, layer_idx, query):
        """After each generated token: every slot's score decays by ``shrink_factor`` and gains the
        new query's attention (with the compensation); then, to keep the size decoding began with,
        the lowest-scoring slot that is neither a merged slot nor among the ``recent`` newest is
        merged (weighted by the tokens each stands for) into the merged slot whose key is most
        similar (dot product), whose logit bias becomes ``scale_factor · log`` of its new count."""
        state = getattr(self, "_decode", {}).get(layer_idx)
        if self.ratio <= 0 or state is None:
            return layer
        layer = EvictingLayer.wrap(layer)
        inner = layer.inner
        if type(inner) is not DenseLayer or inner.bias is None:
            return layer
        keys, values = inner.keys, inner.values
        b, h, n, d = keys.shape
        for name in (SCORE, EXTRA, RESIDUAL):
            if name not in layer.tracks:
                start = state[name][..., :n].expand(b, h, -1)
                layer.tracks[name] = torch.cat([start, start.new_zeros(b, h, n - start.shape[-1])], dim=-1)
        groups = query.shape[1] // h
        logits = grouped_scores(query, keys, groups, state["scaling"]).view(b, h, groups, n) + inner.bias[:, :, None, :]
        valid = layer.valid
        if valid is not None:
            logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
        layer.tracks[SCORE] = layer.tracks[SCORE] * self.args["shrink_factor"] + logits.softmax(-1).sum(2)
        if n <= layer.prompt_slots:
            return layer
        residual = layer.tracks[RESIDUAL] > 0
        usable = torch.ones(b, h, n, dtype=torch.bool, device=keys.device) if valid is None else valid
        slot = torch.arange(n, device=keys.device)
        candidate = usable & ~residual & (slot < n - max(1, state["recent"]))
        target = usable & residual
        if not bool(candidate.any(-1).all()) or not bool(target.any(-1).all()):
            return layer  # nothing to merge in some head: the cache grows by this token
        score = layer.tracks[SCORE]
        i = score.masked_fill(~candidate, float("inf")).argmin(-1, keepdim=True)  # (B, H, 1)
        k_i = keys.gather(2, i[..., None].expand(-1, -1, -1, d))
        similarity = (keys.float() @ k_i.float().transpose(-1, -2))[..., 0]  # (B, H, n)
        j = similarity.masked_fill(~target, float("-inf")).argmax(-1, keepdim=True)
        w_i, w_j = layer.tracks[EXTRA].gather(-1, i) + 1.0, layer.tracks[EXTRA].gather(-1, j) + 1.0
        w = w_i + w_j

        def merged(x: torch.Tensor) -> torch.Tensor:
            xi = x.gather(2, i[..., None].expand(-1, -1, -1, x.shape[-1])).float()
            xj = x.gather(2, j[..., None].expand(-1, -1, -1, x.shape[-1])).float()
            new = ((xi * w_i[..., None] + xj * w_j[..., None]) / w[..., None]).to(x.dtype)
            return x.scatter(2, j[..., None].expand(-1, -1, -1, x.shape[-1]), new)

        inner.keys, inner.values = merged(keys), merged(values)
        inner.bias = inner.bias.scatter(-1, j, w.log() * self.args["scale_factor"])
        inner.positions = inner.positions.scatter(-1, j, torch.maximum(inner.positions.gather(-1, i),
                                                                        inner.positions.gather(-1, j)))
        layer.tracks[EXTRA] = layer.tracks[EXTRA].scatter(-1, j, w - 1.0)
        layer.tracks[SCORE] = score.scatter(-1, j, torch.maximum(score.gather(-1, i), score.gather(-1, j)))
        keep = slot.expand(b, h, n)[slot.expand(b, h, n) != i].view(b, h, n - 1)
        layer.select(keep)
        return layer
