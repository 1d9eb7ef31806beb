"""Ltri-LLM: semantic spans found in the local triangular attention pattern, indexed, and retrieved
for the question prefill and every decoding step.

Tang et al., "Ltri-LLM: Streaming Long Context Inference for LLMs with Training-Free Dynamic
Triangular Attention Pattern", arXiv:2412.04757 (2024). No official implementation was found (the
stored code index holds, for the arXiv id, only reading lists and one third-party
re-implementation of the span detector), and the paper's full text was not at hand: this follows
its abstract and published summary — triangle-based span discovery with NMS, a span index of
static and dynamic vectors, collaborative retrieval with retrieval-head voting and persistent
recall — and where these leave the construction open (the baseline θ, how each index vector is
built, how votes are counted) the choices below are lcbench's, stated as such.

The paper observes that within the local window the attention map is made of *triangles* along the
diagonal: the tokens of one semantic span attend to each other (the lower-triangular block of the
span) and little to the tokens before it. Ltri-LLM cuts the KV cache into such spans, keeps one
index per span and retrieves whole spans for the queries, in InfLLM's streaming frame (initial
tokens, retrieved memory, local window). Here, per layer during lcbench's dense context pass:

* **Local attention.** Each context query's softmax over the ``max_span`` keys ending at it
  (``(i − max_span, i]``), summed over the layer's query heads: the band ``A[i, j]``.
* **Triangle score.** A candidate span ``[x, y]`` (at most ``max_span`` tokens) scores
  ``S(x, y) = Σ_{x ≤ j ≤ i ≤ y} (A[i, j] − θ_i)``, the attention inside its triangle less a
  baseline, ``θ_i = threshold × heads / min(i + 1, max_span)`` (``threshold`` times the attention
  a uniform row would put on one key): a span scores positively only where its tokens attend each
  other more than uniformly, and joining two spans loses the (below-baseline) cross terms. The
  paper's θ is a hyperparameter; lcbench's default 1.5 makes a token that attends uniformly lower
  the score of a span it would join (at 1.0 such a token is neutral and spans drift by noise).
* **NMS.** Candidates with a positive score are taken greedily, highest first, each rejected when
  it overlaps one already taken (non-maximum suppression with overlap threshold 0); tokens covered
  by no span are cut into spans of at most ``max_span`` tokens. Spans are shared by the layer's
  heads and lie between the initial tokens and the local window.
* **Span index.** Per KV head and span two vectors (lcbench's reading of the paper's static and
  dynamic index vectors): the *static* one, the mean of the span's keys, and the *dynamic* one,
  the span's keys weighted by the attention they received inside the triangle; ``index`` picks one
  or both, a span then scoring the higher of the two.
* **Retrieval.** A query chunk — the question part or one generated token — scores each span, per
  query head, by the mean of its valid queries against the span's index. Each head *votes* for the
  spans of its own ranking that fit the retrieval budget (the paper's retrieval-head voting, here
  with every head voting), and the layer ranks spans by votes, ties by the score summed over the
  heads (``voting=false``: by the summed score only) — one choice for the layer's heads. The chunk
  attends the initial tokens, the spans in rank order until they hold the retrieval budget (the
  last one cut to fit, so the density is met exactly), the local window and everything after the
  context.

``--ratio`` sets the attended share of the context per query: ``B = (1 − ratio) × context``, split
into initial tokens, local window and retrieved spans by ``init_share``/``local_share`` (the InfLLM
configuration Ltri-LLM builds on: 128 initial and 4096 local of 6272). The whole KV cache is kept;
``attention_density`` counts what was attended (the selection is a mask over the whole cache, a
reference latency). Not reproduced, stated here: the streaming chunked prefill (the context is
prefilled densely, spans found once from that pass), the paper's *persistent recall* of spans
retrieved at earlier steps (it would exceed the ratio's budget) and a per-model choice of
retrieval heads (every head votes, which needs no calibration). Layers with the model's own
sliding window attend as the model does, counted as dense.
"""

from __future__ import annotations

import torch

from ...params import Param
from ..base import keep_count
from .retrieval import ContextRetrieval

QUERY_CHUNK = 256  # context queries per step of the local-attention pass (bounded transients)


def local_band(query: torch.Tensor, key: torch.Tensor, groups: int, scaling: float, width: int) -> torch.Tensor:
    """(L, width) the band ``A[i, d]``: query ``i``'s softmax over the keys ``(i − width, i]``,
    on key ``i − d``, summed over the query heads (zero where ``i − d < 0``)."""
    _, hq, n, dim = query.shape
    hkv = key.shape[1]
    q = query[0].float().reshape(hkv, groups, n, dim)
    k = key[0].float()
    band = torch.zeros(n, width, dtype=torch.float32, device=query.device)
    offsets = torch.arange(width, device=query.device)
    for a in range(0, n, QUERY_CHUNK):
        c = min(n, a + QUERY_CHUNK)
        lo = max(0, a - width + 1)
        s = torch.einsum("hgqd,hkd->hgqk", q[:, :, a:c], k[:, lo:c]) * scaling
        rows = torch.arange(a, c, device=query.device)[:, None]
        cols = torch.arange(lo, c, device=query.device)[None, :]
        s.masked_fill_(~((cols <= rows) & (cols > rows - width)), float("-inf"))
        p = s.softmax(-1).sum((0, 1))  # (c − a, c − lo)
        j = rows - offsets[None, :]  # (c − a, width) the key each band cell holds
        ok = j >= 0
        band[a:c] = torch.where(ok, p.gather(1, (j - lo).clamp(min=0)), torch.zeros((), device=query.device))
    return band


def triangle_scores(band: torch.Tensor, threshold: float, heads: int) -> torch.Tensor:
    """(L, width) ``S[x, l − 1]``: the triangle score of the span of ``l`` tokens starting at ``x``
    (``-inf`` past the end): Σ over ``x ≤ j ≤ i ≤ x + l − 1`` of ``A[i, j] − θ_i``."""
    n, width = band.shape
    rows = torch.arange(n, device=band.device)
    theta = threshold * heads / (rows + 1).clamp(max=width).float()  # (L,)
    suffix = (band - theta[:, None]).cumsum(1)  # suffix[i, d] = Σ_{j = i−d..i} (A[i, j] − θ_i)
    out = torch.full((n, width), float("-inf"), device=band.device)
    total = torch.zeros(n, device=band.device)
    for length in range(1, width + 1):
        last = rows + length - 1  # the span's last row
        inside = last < n
        total = total + torch.where(inside, suffix[last.clamp(max=n - 1), length - 1], torch.zeros((), device=band.device))
        out[:, length - 1] = torch.where(inside, total, torch.full((), float("-inf"), device=band.device))
    return out


def nms_spans(scores: torch.Tensor, start: int, stop: int) -> list[tuple[int, int]]:
    """Non-overlapping spans ``[a, b)`` covering ``[start, stop)``: positive-scoring candidates
    (``scores[x, l − 1]``, span ``[x, x + l)``) taken greedily highest first, each dropped when it
    overlaps one taken; the uncovered gaps cut into spans of at most ``width`` tokens."""
    width = scores.shape[1]
    s = scores[start:stop].clone()
    lengths = torch.arange(1, width + 1, device=s.device)
    s[(torch.arange(start, stop, device=s.device)[:, None] + lengths[None, :]) > stop] = float("-inf")
    flat = s.flatten()
    positive = (flat > 0).nonzero().flatten()
    order = positive[torch.sort(flat[positive], descending=True, stable=True).indices].tolist()
    taken = bytearray(stop - start)
    spans: list[tuple[int, int]] = []
    left = len(taken)
    for idx in order:
        if not left:
            break
        x, length = divmod(idx, width)
        length += 1
        if not any(taken[x:x + length]):
            taken[x:x + length] = b"\x01" * length
            left -= length
            spans.append((start + x, start + x + length))
    i = 0
    while i < len(taken):  # the gaps
        if taken[i]:
            i += 1
            continue
        j = i
        while j < len(taken) and not taken[j] and j - i < width:
            j += 1
        spans.append((start + i, start + j))
        i = j
    return sorted(spans)


class Ltri(ContextRetrieval):
    name = "ltri"
    family = "sparse_attention"
    paper = ("Tang et al., Ltri-LLM: Streaming Long Context Inference for LLMs with Training-Free Dynamic "
             "Triangular Attention Pattern, arXiv:2412.04757 (2024)")
    summary = "question prefill and decode attend initial tokens, the top spans found from local triangular attention, and a local window"
    tolerance = 0.05
    defaults = {"max_span": 128, "threshold": 1.5, "index": "both", "voting": True, "init_share": 128 / 6272,
                "local_share": 4096 / 6272}
    params = (
        Param("max_span", int, None, "longest span and width of the local attention the spans are found in", min=1),
        Param("threshold", float, None, "triangle-score baseline per cell, in units of a uniform row's attention on one key",
              min=0.0),
        Param("index", str, None, "span index: static (mean key), dynamic (attention-weighted key) or both (the higher)",
              choices=("static", "dynamic", "both")),
        Param("voting", bool, None, "rank spans by the votes of the query heads (each for the spans of its own ranking "
              "that fit the budget), ties by the summed score; false: by the summed score only"),
        Param("init_share", float, None, "share of the attended budget for the initial tokens (InfLLM's 128 of 6272)",
              min=0.0, max=1.0),
        Param("local_share", float, None, "share of the attended budget for the local window (InfLLM's 4096 of 6272)",
              min=0.0, max=1.0),
    )

    def _plan(self, context: int) -> tuple[int, int, int]:
        """(initial tokens, local window, span tokens retrieved) for a ``context``-token context."""
        budget = keep_count(context, self.ratio)
        init = int(budget * self.args["init_share"])
        local = max(1, int(budget * self.args["local_share"]))
        return init, local, max(0, budget - init - local)

    def learn(self, query, key, scaling, groups, layer_idx):
        """The layer's spans (between the initial tokens and the window) and their index vectors;
        None when every span token would be retrieved (the layer stays dense)."""
        context = key.shape[2]
        init, local, recall = self._plan(context)
        start, stop = init, max(init, context - local)
        if stop - start <= recall:
            return None
        width = min(self.args["max_span"], context)
        band = local_band(query, key, groups, scaling, width)
        spans = nms_spans(triangle_scores(band, self.args["threshold"], query.shape[1]), start, stop)
        k = key[0].float()  # (Hkv, L, D)
        hkv = k.shape[0]
        bounds = torch.tensor(spans, dtype=torch.long, device=k.device)  # (S, 2)
        label = torch.full((context,), -1, dtype=torch.long, device=k.device)
        for i, (a, b) in enumerate(spans):
            label[a:b] = i
        slots = torch.arange(start, stop, device=k.device)
        lab = label[start:stop]
        # attention each key receives inside its own span's triangle (rows i ≥ j in the same span)
        received = torch.zeros(context, device=k.device)
        rows = torch.arange(context, device=k.device)
        for d in range(width):
            j = rows - d
            same = (j >= 0) & (label[j.clamp(min=0)] == label) & (label >= 0)
            received.index_add_(0, j.clamp(min=0)[same], band[same, d])
        count = len(spans)
        static = torch.zeros(hkv, count, k.shape[-1], device=k.device)
        static.index_add_(1, lab, k[:, slots])
        static /= (bounds[:, 1] - bounds[:, 0]).float()[None, :, None]
        w = received[slots]
        norm = torch.zeros(count, device=k.device).index_add_(0, lab, w)
        dynamic = torch.zeros_like(static).index_add_(1, lab, k[:, slots] * w[None, :, None])
        dynamic = torch.where(norm[None, :, None] > 0, dynamic / norm.clamp(min=1e-12)[None, :, None], static)
        return bounds, static, dynamic, init, stop, recall, label

    def ranked_spans(self, learned, query, valid_queries) -> torch.Tensor:
        """(B, S) the spans in rank order. Each query head scores every span by its mean valid query
        against the span's index (the higher of static and dynamic with ``index=both``) and, with
        ``voting``, votes for the spans of its own ranking that fit the retrieval budget; spans are
        ranked by votes, ties (and every span without ``voting``) by the score summed over heads."""
        bounds, static, dynamic, _, _, recall, _ = learned
        b, hq, n, d = query.shape
        hkv = static.shape[0]
        weights = valid_queries.to(torch.float32)[:, None, :, None]
        mean_q = ((query.float() * weights).sum(2) / weights.sum(2).clamp(min=1)).reshape(b, hkv, hq // hkv, d)
        scores = []
        if self.args["index"] in ("static", "both"):
            scores.append(torch.einsum("bhgd,hsd->bhgs", mean_q, static.to(query.device)))
        if self.args["index"] in ("dynamic", "both"):
            scores.append(torch.einsum("bhgd,hsd->bhgs", mean_q, dynamic.to(query.device)))
        per_head = torch.stack(scores).amax(0).reshape(b, hq, -1)  # (B, Hq, S)
        order = torch.sort(per_head.sum(1), dim=-1, descending=True, stable=True).indices  # (B, S)
        if not self.args["voting"]:
            return order
        lengths = (bounds[:, 1] - bounds[:, 0]).to(query.device)
        head_order = torch.sort(per_head, dim=-1, descending=True, stable=True).indices  # (B, Hq, S)
        ranked_len = lengths[head_order]
        fits = (ranked_len.cumsum(-1) - ranked_len) < recall  # the span starts within the head's budget
        votes = torch.zeros_like(per_head).scatter_(-1, head_order, fits.float()).sum(1)  # (B, S)
        again = torch.sort(votes.gather(-1, order), dim=-1, descending=True, stable=True).indices
        return order.gather(-1, again)

    def keep(self, learned, query, key, valid_queries, scaling):
        """The initial tokens, the top spans' tokens up to the retrieval budget (the last span cut),
        the local window and all after it — one choice per row for the layer's heads."""
        bounds, _, _, init, stop, recall, label = learned
        b = query.shape[0]
        total = key.shape[2]
        order = self.ranked_spans(learned, query, valid_queries)  # (B, S)
        lengths = (bounds[:, 1] - bounds[:, 0]).to(query.device)
        slots = torch.arange(total, device=query.device)
        keep = ((slots < init) | (slots >= stop))[None].expand(b, total).clone()
        owner = torch.full((total,), -1, dtype=torch.long, device=query.device)
        owner[:label.shape[0]] = label.to(query.device)  # each context slot's span (-1: none)
        for row in range(b):
            before = torch.zeros(len(lengths), dtype=torch.long, device=query.device)
            ranked_len = lengths[order[row]]
            before[order[row]] = ranked_len.cumsum(0) - ranked_len  # tokens of better-ranked spans
            quota = (recall - before).clamp(min=0)  # tokens of each span that still fit
            in_span = owner >= 0
            offset = slots - bounds[owner.clamp(min=0), 0].to(query.device)
            keep[row] |= in_span & (offset < quota[owner.clamp(min=0)])
        return keep[:, None, None, :]
