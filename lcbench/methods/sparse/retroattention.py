"""RetroAttention: Quest's page selection plus a retrospective revision of past queries' outputs.

Choi, Kang, Jo, Kim, "Retrospective Sparse Attention for Efficient Long-Context Generation",
ICLR 2026 (arXiv:2508.09001). Decoding attends a few KV pages per step (Quest's query-aware page
selection). The pages step ``t`` loads include pages the queries of the previous ``w − 1`` steps
(the *retrospective window*) did not attend; RetroAttention lets those past queries attend the
newly arrived entries too. Each past query keeps, in a small *output cache* (``w − 1`` entries per
layer and head), its attention output and its softmax normaliser (log-sum-exp); the partial
attention of the past query over the new entries is merged into the cached output exactly, as
split-K attention merges its parts::

    lse' = logaddexp(lse_old, lse_new)
    o'   = exp(lse_old − lse') · o_old + exp(lse_new − lse') · o_new

so the revised output *is* dense attention of that query over the union of the entries it has
seen. A per-(layer, KV head, page) record of the last step that loaded each page (the paper's
page-loaded mask) gates the revision: a past query from step ``s`` takes a page loaded at ``t`` only when no step in
``[s, t)`` loaded it (it has it already otherwise), and only keys before its own position
(causality; its own always-attended newest partial page is never counted twice).

Official implementation: github.com/csh3695/RetroAttention @7804760 ("test", 2025-07-31) holds
only a one-line README ("# RetroAttention / Test") and an empty file ``test``: no code was
released to read, so this file follows the paper's description; where the description was not
at hand in full (this machine has no copy of the paper's method section), the choices are lcbench's
and are marked below.

What lcbench does and does not do (deviations):

* **Done.** The current query attends exactly Quest's pages (this class subclasses
  :class:`~lcbench.methods.sparse.quest.Quest` and returns Quest's own output for the current
  token; the selection the revision uses is recomputed from Quest's incremental page bounds and
  budget, and a test checks it gives Quest's output). The output cache (query, output,
  log-sum-exp per past query, per layer), the page-loaded record and the exact LSE merge run at
  every decode step on every sparse layer; ``sample_stats`` reports ``retro_kv_exposure`` (entries
  the window's queries attended after revision over those they attended at their own step —
  lcbench's reading of the paper's "effective KV exposure", summed over sparse layers and steps)
  and ``retro_attention_density`` (the density including the revisions) next to Quest's
  ``attention_density``. :meth:`RetroAttention.output_cache` gives the
  revised outputs. With ``measure_error=true`` each cached query's dense output (over every key
  before it) is computed too, and ``retro_error_before`` / ``retro_error_after`` report the mean
  relative L2 error, per head, of its output at its own step (Quest's) and after the revisions —
  how much of the gap to dense attention the revision closes (a measurement lcbench adds).
* **Not done: what the revised outputs feed.** In the paper the revised attention outputs of past
  tokens replace their old ones, so the past tokens' hidden states — and hence their keys and
  values in the *following* layers — are updated (the abstract calls the method "a KV cache update
  technique"; how exactly the paper recomputes those entries could not be read here). Doing that needs each past
  token's residual stream and the rest of its decoder layer (output projection, residual, norms,
  MLP) and the next layer's k/v projections and rotary: lcbench's decode hooks
  (``decode_attention`` gets one attention module and the current query; ``after_decode_step`` the
  layer's cache) reach none of that without copying the model's decoder-layer forward per
  architecture, which lcbench does not do. So the revision stays in the output cache: **tokens
  decoded by ``retroattention`` are Quest's tokens at the same page budget** (a test checks this),
  and what the method measures is how much KV the revision would expose and the revised outputs
  themselves — not the paper's accuracy gains.
* Revision runs on layers without padding slots and without a sliding window (any batch of
  unpadded rows); on a padded batch, a ragged layer or a sliding-window layer the step is Quest's
  alone and the output cache of that layer starts again (counted in ``retro_skipped_steps``). The
  output cache also starts again when the stored prefix of a layer changed between steps (another
  stage evicted or reordered slots) or rows left the batch.
* ``retro_window`` (``w``; the output cache holds ``w − 1`` past queries) defaults to 8: lcbench's
  choice, not checked against the paper's experiments. The first ``dense_layers`` layers stay dense
  as in Quest and are never revised (their queries saw every entry).
* Reference implementation: PyTorch per step, fp32 partial attention per past query over a mask
  of all slots; not the paper's fused kernel.
"""

from __future__ import annotations

import math

import torch

from ...params import Param
from .quest import Quest


def masked_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                     scaling: float, softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 attention of one query per head over the slots ``mask`` allows, with its log-sum-exp.

    query (B, Hq, D); keys/values (B, Hkv, L, D); mask (B, Hkv, L) per KV head (shared by its
    group); ``softcap``: the model's logit softcap (Gemma-2). Returns the output (B, Hq, D) and lse
    (B, Hq); a head with no allowed slot gets output 0 and lse −inf (the neutral element of
    :func:`merge`). A model's learned sinks are not in it: :func:`with_sinks` adds them to a result."""
    B, Hq, D = query.shape
    Hkv = keys.shape[1]
    g = Hq // Hkv
    q = query.float().reshape(B, Hkv, g, D)
    scores = torch.einsum("bhgd,bhld->bhgl", q, keys.float()) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, Hkv, g)
    weights = torch.exp(scores - lse[..., None].clamp_min(torch.finfo(torch.float32).min))
    weights = torch.nan_to_num(weights, nan=0.0)
    out = torch.einsum("bhgl,bhld->bhgd", weights, values.float())
    return out.reshape(B, Hq, D), lse.reshape(B, Hq)


def with_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """The output (B, Hq, D) of a softmax over the same keys plus gpt-oss's learned sink column
    ``sinks`` (Hq,), from the sink-free output and its ``lse``: ``out · Z / (Z + e^s)`` =
    ``out · sigmoid(lse − s)``. Outputs stay sink-free while they are merged (the sink is one
    column of the whole softmax, not of each part)."""
    if sinks is None:
        return out
    return out * torch.sigmoid(lse - sinks.float().reshape(1, -1))[..., None]


def merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
          lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact softmax merge of two attention outputs over disjoint key sets (split-K): their
    outputs (…, D) weighted by their normalisers (…); a part with lse −inf contributes nothing."""
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    wa = torch.where(torch.isinf(lse_a), torch.zeros_like(lse_a), torch.exp(lse_a - safe))
    wb = torch.where(torch.isinf(lse_b), torch.zeros_like(lse_b), torch.exp(lse_b - safe))
    return wa[..., None] * out_a + wb[..., None] * out_b, lse


class RetroAttention(Quest):
    name = "retroattention"
    family = "sparse_attention"
    paper = ("Choi, Kang, Jo, Kim, Retrospective Sparse Attention for Efficient Long-Context Generation, ICLR "
             "2026 (arXiv:2508.09001)")
    summary = ("Quest's decode pages, and past queries' cached outputs revised (log-sum-exp merge) with pages "
               "they had not attended; revisions stay in the output cache (tokens are Quest's)")
    # reference: Quest's PyTorch page selection plus an fp32 masked attention per cached past query at every
    # decode step, not the paper's fused kernel
    reference_latency = True
    # Quest's decode and the output cache's revisions apply the model's softcap; the cache keeps sink-free
    # (out, lse) so revisions merge exactly, and the sinks are applied when an output is read (with_sinks)
    attention_terms = frozenset({"softcap", "sinks", "chunk"})
    defaults = {"retro_window": 8, "measure_error": False}
    params = Quest.params + (
        Param("retro_window", int, None, "queries in the retrospective window (current + cached past ones)",
              min=1),
        Param("measure_error", bool, None, "also compute each cached query's dense output (all keys before it) "
              "and report how far its output is from it before and after the revisions (costs a dense attention)"),
    )

    def begin_sample(self) -> None:
        super().begin_sample()
        self._retro: dict[int, dict] = {}
        self._retro_base = 0.0  # entries the revised queries attended at their own step
        self._retro_added = 0.0  # entries revisions added to them
        self._retro_skipped = 0
        self._errors = [0.0, 0.0, 0]  # Σ relative error of Quest's / the revised output, heads counted

    # --- decode -----------------------------------------------------------------------------
    def decode_attention(self, module, query, layer, scaling, layer_idx, window=None, softcap=None, sinks=None,
                         chunk=None):
        """Quest's output for the current token, then the retrospective revision of the layer's
        output cache with the entries this step loads."""
        if not hasattr(self, "_retro"):
            self.begin_sample()
        self._terms = (softcap, sinks)
        out = super().decode_attention(module, query, layer, scaling, layer_idx, window, softcap=softcap, sinks=sinks,
                                       chunk=chunk)
        if self.ratio > 0 and layer_idx >= self.args["dense_layers"]:
            if window or chunk or layer.valid is not None:
                self._drop(layer_idx)
                self._retro_skipped += 1
            else:
                self._retrospect(module, query, layer, scaling, layer_idx, dense=out is None)
        return out

    def selected_pages(self, query: torch.Tensor, layer, layer_idx: int, layers: int) -> torch.Tensor:
        """The whole pages Quest's selection attends this step, as a mask (B, Hkv, L // page_size),
        in a model of ``layers`` layers (the partial newest page, always attended, is not in it).
        Same bounds (Quest's incremental ``_page_bounds``), budget (``_layer_keep``) and forced
        newest page as :class:`Quest`."""
        keys, _ = layer.dense()
        B, Hkv, L, D = keys.shape
        ps = self.args["page_size"]
        P, n_full = math.ceil(L / ps), L // ps
        keep, _ = self._layer_keep(L, layers, layer_idx)
        sel = torch.zeros(B, Hkv, n_full, dtype=torch.bool, device=keys.device)
        if keep >= P:
            return sel.fill_(True)
        pick = keep - (1 if L > n_full * ps else 0)
        kmin, kmax = self._page_bounds(layer_idx, layer, keys, ps)
        q = query.float().reshape(B, Hkv, -1, 1, D)
        bound = torch.maximum(q * kmin[:, :, None], q * kmax[:, :, None]).sum(-1).amax(2)
        if L == n_full * ps:
            bound[..., -1] = float("inf")
        return sel.scatter_(-1, bound.topk(pick, dim=-1).indices, True)

    def _retrospect(self, module, query, layer, scaling, layer_idx: int, dense: bool) -> None:
        keys, values = layer.dense()
        B, Hkv, L, _ = keys.shape
        ps = self.args["page_size"]
        n_full = L // ps
        state = self._retro.get(layer_idx)
        if state is not None:
            done = state["length"]
            if not (done < L and state["positions"].shape[:2] == layer.positions.shape[:2]
                    and torch.equal(state["positions"], layer.positions[..., :done])):
                self._drop(layer_idx)
                state = None
        if state is None:
            state = {"step": 0, "entries": [],
                     "loaded": torch.full((B, Hkv, 0), -1, dtype=torch.long, device=keys.device)}
        t = state["step"] + 1
        loaded = state["loaded"]
        if loaded.shape[-1] < n_full:
            loaded = torch.cat([loaded, loaded.new_full((B, Hkv, n_full - loaded.shape[-1]), -1)], -1)
        sel = (torch.ones(B, Hkv, n_full, dtype=torch.bool, device=keys.device) if dense
               else self.selected_pages(query, layer, layer_idx, module.config.num_hidden_layers))
        page_of = torch.arange(n_full * ps, device=keys.device) // ps  # whole-page slots → page
        slot = torch.arange(L, device=keys.device)
        cur_mask = torch.ones(B, Hkv, L, dtype=torch.bool, device=keys.device)
        cur_mask[..., :n_full * ps] = sel[..., page_of]
        q_now = query[:, :, -1]
        softcap, sinks = getattr(self, "_terms", (None, None))
        sinks = None if sinks is None else sinks.detach().float()  # a model parameter: kept, read outside inference
        out_now, lse_now = masked_attention(q_now, keys, values, cur_mask, scaling, softcap)
        reference = None
        if self.args["measure_error"]:
            reference = with_sinks(*masked_attention(q_now, keys, values, torch.ones_like(cur_mask), scaling, softcap),
                                   sinks)
        for entry in state["entries"]:
            fresh = sel & (loaded < entry["step"])  # loaded now, by no step since the entry's own
            new = torch.zeros(B, Hkv, L, dtype=torch.bool, device=keys.device)
            new[..., :n_full * ps] = fresh[..., page_of]
            new &= slot < entry["full"]  # before its own partial page (attended at its step) and itself
            count = float(new.sum())
            if count:
                o_new, lse_new = masked_attention(entry["query"], keys, values, new, scaling, softcap)
                entry["out"], entry["lse"] = merge(entry["out"], entry["lse"], o_new, lse_new)
                entry["added"] += count
                self._retro_added += count
        loaded = torch.where(sel, torch.full_like(loaded, t), loaded)
        base = float(cur_mask.sum())
        self._retro_base += base
        entries = state["entries"] + [{"step": t, "full": n_full * ps, "position": layer.positions[..., L - 1].clone(),
                                       "query": q_now.float().clone(), "out": out_now, "lse": lse_now,
                                       "base": base, "added": 0.0, "dense": reference, "quest": with_sinks(out_now, lse_now, sinks),
                                       "sinks": sinks}]
        keep = self.args["retro_window"] - 1
        for gone in entries[:len(entries) - keep] if keep else entries:
            self._score(gone)
        state.update(step=t, loaded=loaded, length=L, positions=layer.positions.clone(),
                     entries=entries[len(entries) - keep:] if keep else [])
        self._retro[layer_idx] = state

    def _drop(self, layer_idx: int) -> None:
        """Start the layer's output cache again (its entries are scored first)."""
        for entry in self._retro.pop(layer_idx, {"entries": []})["entries"]:
            self._score(entry)

    def _score(self, entry: dict, into: list | None = None) -> None:
        """Add an entry's relative errors (Quest's output and the revised one against its dense
        output, per head) to ``into`` (the sample's tally: entries leaving the cache); nothing
        without ``measure_error``."""
        if entry["dense"] is None:
            return
        into = self._errors if into is None else into
        norm = entry["dense"].norm(dim=-1).clamp_min(1e-12)
        into[0] += float(((entry["quest"] - entry["dense"]).norm(dim=-1) / norm).sum())
        revised = with_sinks(entry["out"], entry["lse"], entry["sinks"])
        into[1] += float(((revised - entry["dense"]).norm(dim=-1) / norm).sum())
        into[2] += norm.numel()

    def output_cache(self, layer_idx: int) -> list[dict]:
        """The layer's output cache, oldest first: per past query its step, ``position`` (B, Hkv),
        ``out`` (B, Hq, D) and ``lse`` (B, Hq) after every revision so far (without a model's learned
        sinks, so they merge exactly; :func:`with_sinks` with the entry's ``sinks`` gives the output the
        model's softmax would), ``quest`` its output at its own step, ``dense`` its dense output (with
        ``measure_error``, else None; both with the sinks), and the entries it attended at its step
        (``base``) and the revisions added (``added``), summed over heads."""
        state = getattr(self, "_retro", {}).get(layer_idx)
        return [] if state is None else list(state["entries"])

    def sample_stats(self) -> dict[str, float]:
        stats = super().sample_stats()
        base = getattr(self, "_retro_base", 0.0)
        if base:
            stats["retro_kv_exposure"] = (base + self._retro_added) / base
            stats["retro_attention_density"] = (self._selected + self._retro_added) / self._stored
        errors = list(getattr(self, "_errors", [0.0, 0.0, 0]))
        for state in getattr(self, "_retro", {}).values():  # entries still in the cache
            for entry in state["entries"]:
                self._score(entry, errors)
        if errors[2]:
            stats["retro_error_before"] = errors[0] / errors[2]
            stats["retro_error_after"] = errors[1] / errors[2]
        if getattr(self, "_retro_skipped", 0):
            stats["retro_skipped_steps"] = float(self._retro_skipped)
        return stats

