"""SimLayerKV: lazy layers keep only their attention sinks and a recent window.

Zhang et al., "SimLayerKV: A Simple Framework for Layer-Level KV Cache Reduction" (arXiv:2410.13846);
official code sail-sg/SimLayerKV@1fb6bda (``LongBench/SimLayerKV_llama.py``,
``SimLayerKV_attention_llama.py``), and kvpress 0.5.5 ``SimLayerKVPress``.

A layer is *lazy* when its last query puts almost all its attention on the first ``n_initial``
tokens and the last ``n_recent`` ones: its laziness score is the attention of the last ``n_last``
prompt queries (softmax over every key, causal within those queries, the columns of those queries
themselves left out, as kvpress's ``SnapKVPress.compute_window_attention``), averaged over batch
rows, query heads and those queries, summed over the first ``n_initial`` and the ``n_recent`` keys
before them. A lazy layer keeps its first ``n_initial`` slots and its last ``n_recent − n_last``
(kvpress's slice); every other layer keeps everything. The official code scores the first decoded
token instead (its ``SimLayerKV_decode`` variant) with 4 sinks and 1024 recent tokens; kvpress, and
lcbench, score the last prompt token, so the cache is cut at the end of the prefill.

Two modes (param ``mode``):

``threshold``  the paper's and kvpress's rule: a layer is lazy when its score exceeds
               ``lazy_threshold`` (the paper recommends 0.9 for Llama-3, 0.65 Llama-2, 0.8 Mistral,
               0.85 Qwen; 1.0 compresses nothing); nothing is compressed when a layer holds no more
               than ``n_initial + n_recent + n_last`` tokens (kvpress's guard). The achieved ratio is
               whatever the threshold gives: ``--ratio`` is only the floor the engine checks it
               against (run with ``--ratio 0`` to measure it). On a fixed input it keeps exactly
               kvpress's positions (tests/test_kvpress_natives_more.py).
``ratio``      lcbench's ratio mode (the default, so ``--ratio`` is honoured; it is not in the paper):
               layers are ranked by the same laziness score and the most lazy are marked lazy, one by
               one, until the requested ratio can be reached with each lazy layer keeping its sinks and
               at least its ``n_recent − n_last`` recent slots; the dropped tokens are then spread
               evenly over the lazy layers, so their recent window grows past ``n_recent − n_last``
               when fewer tokens must go. Only when even every layer cut to that window could not
               reach the ratio (a context not much longer than ``n_recent``) are all layers lazy and
               their windows narrower than ``n_recent − n_last``. The ranking needs every layer's
               score, so layers are cut, in place, when the last layer has been prefilled (the same
               cache as cutting each at once: a layer's prefill never reads its own cut cache).
               Ratio 0 keeps everything. In a chain it must be the last cache stage in this mode (a chain
               with one after it is refused: ``snapkv+simlayerkv``, not ``simlayerkv+kivi``): a later cache stage acts on each layer
               as soon as it is prefilled, before the cut, and would replace the layer the cut is made on.
               For the same reason samples are not batched together in this mode (``--batch-size N``
               runs them one at a time; the engine reports it as state carried between samples).

Batched rows share one decision per layer (the score is averaged over rows, as kvpress does).
The method keeps whole layers, not a number of tokens per head, so ``--budget`` is refused.
"""

from __future__ import annotations

import torch

from ...errors import UserError
from ...params import Param
from ..base import LayerObservation, Needs, Stage, keep_count
from .select import context_slots, keep_top, real_context_slots


def laziness(seen: LayerObservation, n_last: int, n_initial: int, n_recent: int) -> float:
    """SimLayerKV's score of one layer: the attention of the last ``n_last`` queries (mean over rows,
    heads and queries) on the first ``n_initial`` keys and the ``n_recent`` keys before those queries."""
    attn = seen.window_attention[:, :, -n_last:, :].float()  # (B, Hq, n_last, L)
    attn = attn[..., : attn.shape[-1] - n_last].mean((0, 1, 2))  # the queries' own columns left out
    return float(attn[:n_initial].sum() + attn[-n_recent:].sum())


def recency_scores(layer, n_initial: int) -> torch.Tensor:
    """(B, H, n) scores keeping the sinks (true position < ``n_initial``) first, then the latest slots."""
    scores = layer.positions.float()
    return scores.masked_fill(layer.positions < n_initial, float("inf"))


def spread(capacity: list[int], drop: int) -> list[int]:
    """Tokens each layer drops: ``drop`` in total, as evenly as each layer's ``capacity`` allows."""
    out = [0] * len(capacity)
    left = drop
    order = sorted(range(len(capacity)), key=lambda i: capacity[i])
    for rank, i in enumerate(order):
        share = -(-left // (len(order) - rank))  # ceil
        out[i] = min(capacity[i], share)
        left -= out[i]
    return out


def fewest_first(order: list[int], context: list[int], floor: list[int], narrow: list[int], drop: int) -> dict[int, int]:
    """{unit: context slots it keeps} for the units (layers, heads) that are cut: the fewest of ``order``
    (first first) that can drop ``drop`` tokens while each keeps at least ``floor`` of its ``context``
    slots, the drop spread evenly over them; when all of them cannot, every unit is cut, down to
    ``narrow`` slots each."""
    if drop <= 0:
        return {}
    cut: list[int] = []
    for i in order:
        cut.append(i)
        if sum(context[j] - floor[j] for j in cut) >= drop:
            break
    else:
        floor, cut = narrow, list(order)
    drops = spread([max(0, context[j] - floor[j]) for j in cut], drop)
    return {j: max(1, context[j] - d) for j, d in zip(cut, drops)}


def lazy_allocation(scores: list[float], context: list[int], protected: int, ratio: float, n_initial: int,
                    window: int) -> dict[int, int]:
    """Ratio mode: {layer: context slots it keeps} for the lazy layers (the others keep all).

    ``context`` are the layers' real context slots; a lazy layer keeps at least ``window`` recent slots
    (the protected tail counts in them) besides its ``n_initial`` sinks, unless no choice of lazy layers
    reaches the ratio so, and then every layer is lazy with a narrower window (≥ 1 recent slot)."""
    drop = sum(n + protected - keep_count(n + protected, ratio) for n in context)
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # most lazy first
    floor = [min(n, n_initial + max(0, window - protected)) for n in context]
    narrow = [min(n, n_initial + (1 if protected == 0 else 0)) for n in context]
    return fewest_first(order, context, floor, narrow, drop)


class SimLayerKV(Stage):
    name = "simlayerkv"
    hybrid_layers = False  # its ratio mode waits for num_layers observations, one per model layer
    family = "kv_dropping"
    paper = ("Zhang et al., SimLayerKV: A Simple Framework for Layer-Level KV Cache Reduction, ICLR 2025 "
             "(arXiv:2410.13846)")
    summary = ("lazy layers (last query's attention on sinks + recent window) keep only those; ratio mode marks "
               "the most lazy layers until --ratio is reached, threshold mode is the paper's lazy_threshold")
    params = (
        Param("mode", str, "ratio", "ratio: the most lazy layers until --ratio is reached (lcbench's); threshold: "
              "a layer is lazy when its score exceeds lazy_threshold (the paper's and kvpress's)",
              choices=("ratio", "threshold")),
        Param("lazy_threshold", float, 0.9, "threshold mode: laziness score above which a layer is lazy "
              "(paper: Llama-3 0.9, Llama-2 0.65, Mistral 0.8, Qwen 0.85; 1.0 compresses nothing)", min=0.0, max=1.0),
        Param("n_last", int, 1, "last prompt queries whose attention scores a layer", min=1),
        Param("n_recent", int, 1024, "recent tokens of the score; a lazy layer keeps n_recent - n_last of them",
              min=2),
        Param("n_initial", int, 4, "initial tokens (attention sinks) a lazy layer keeps", min=0),
    )
    token_budget = False

    def __init__(self, ratio: float = 0.0, **args):
        super().__init__(ratio, **args)
        if self.args["n_recent"] <= self.args["n_last"]:
            raise UserError(f"simlayerkv: n_recent ({self.args['n_recent']}) must exceed n_last "
                            f"({self.args['n_last']}), since a lazy layer keeps n_recent - n_last recent tokens. "
                            f"Fix: raise n_recent or lower n_last.")
        self.needs = Needs(window=self.args["n_last"])
        # ratio mode cuts earlier layers in place once the last one is scored; a cross-sample batch
        # compresses per-row copies of each layer and stacks them anew (engine/per_row.py), so the cut
        # would miss them: such a chain runs one sample at a time (the flag the engine reads for that)
        self.cross_sample_state = self.args["mode"] == "ratio"
        self.cuts_after_last_layer = self.args["mode"] == "ratio"  # so it must be the last cache stage
        self.begin_sample()

    def begin_sample(self) -> None:
        self._pending: dict[int, tuple] = {}  # ratio mode: layer → (layer object, observation, score)
        self.lazy_layers: list[int] = []  # what the last sample marked lazy (tests, sample_stats)
        self.layer_scores: dict[int, float] = {}  # each scored layer's laziness on the last sample

    def score(self, seen: LayerObservation) -> float:
        a = self.args
        self.layer_scores[seen.layer_idx] = laziness(seen, a["n_last"], a["n_initial"], a["n_recent"])
        return self.layer_scores[seen.layer_idx]

    def _cut(self, layer, seen: LayerObservation, keep_context: int):
        """Keep the sinks and the latest slots: ``keep_context`` context slots, plus the protected tail."""
        if keep_context >= context_slots(layer, seen):
            return layer
        self.lazy_layers.append(seen.layer_idx)
        return keep_top(layer, recency_scores(layer, self.args["n_initial"])[..., : context_slots(layer, seen)],
                        1.0, seen, keep=keep_context)

    def compress_layer(self, layer, seen: LayerObservation):
        a = self.args
        if a["mode"] == "threshold":
            total = layer.seq_len()
            if a["lazy_threshold"] >= 1.0 or total <= a["n_initial"] + a["n_recent"] + a["n_last"]:
                return layer
            if self.score(seen) > a["lazy_threshold"]:
                keep = a["n_initial"] + a["n_recent"] - a["n_last"] - seen.protected
                return self._cut(layer, seen, max(1, keep))
            return layer
        if self.ratio <= 0:
            return layer
        self._pending[seen.layer_idx] = (layer, seen, self.score(seen))
        if len(self._pending) < seen.num_layers:
            return layer
        pending, self._pending = self._pending, {}
        layers = sorted(pending)
        allocation = lazy_allocation([pending[i][2] for i in layers],
                                     [real_context_slots(pending[i][0], pending[i][1]) for i in layers],
                                     seen.protected, self.ratio, a["n_initial"], a["n_recent"] - a["n_last"])
        for rank, keep in sorted(allocation.items()):
            held, held_seen, _ = pending[layers[rank]]
            cut = self._cut(held, held_seen, keep)
            assert cut is held  # cut in place: the cache holds this object
        self.lazy_layers.sort()
        return layer

    def sample_stats(self) -> dict[str, float]:
        return {"lazy_layers": float(len(self.lazy_layers))}
