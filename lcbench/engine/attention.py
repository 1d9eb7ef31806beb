"""lcbench's attention function, registered with transformers' ``AttentionInterface``.

The model's own attention modules project q/k/v, apply rotary embeddings and call
``KVCache.update``; then they call this function, which

1. builds the mask from what *this layer* holds (storage order, padding/ragged validity), so
   layers may keep different numbers of tokens under plain SDPA;
2. lets a sparse-attention stage replace the computation (prefill or decode);
3. on the compressing pass, collects what the cache stages asked for (window attention, ...)
   and runs them on this layer right away — before the next layer runs, so the full cache of
   all layers never exists at once;
4. in decode, lets decode stages evict after the step.

No model forward code is copied: any transformers model whose attention goes through
``ALL_ATTENTION_FUNCTIONS`` works — and :func:`lcbench.models.hook.probe` checks after loading that
every layer really calls this function.

What a model passes besides q/k/v is honoured (:class:`AttentionCall`), in prefill, question
prefill and decode, for dense attention and for every stage: a sliding window in *true*
positions (a query at position p sees keys at positions in ``(p − window, p]``, transformers'
``sliding_window_overlay``; dropped tokens keep their positions, so the window is not counted in
slots), Gemma-2's logit softcap and gpt-oss's learned sinks (computed explicitly, as SDPA cannot),
the model's scaling; dropout is never applied. Llama-4's chunked layers, which the model marks in
its config rather than in the call (``layer_types``), are honoured like a window: a query at
position p sees its own chunk ``[⌊p / C⌋ · C, p]`` (:func:`lcbench.cache.layer.lowest_visible`).

Compression on a sliding-window layer: each prefill pass ends by forgetting the tokens no later
query can see (the last ``window − 1`` stay, as in transformers' ``DynamicSlidingWindowLayer``),
before the cache stages run. A method's budget there therefore counts only what the layer can
still see, and the uncompressed reference (``kv_bytes_full``, :class:`lcbench.models.hook.Geometry`)
holds ``min(context, window − 1)`` tokens per window layer: no method is credited for dropping what
the window hides anyway. Sparse prefill stages get the window and build their patterns inside it
(density over the pairs it lets through); decode stages (Quest) get it too. Tokens appended after
the context (question, answer) are masked by the window, not forgotten, so a multi-turn crop back
to the context stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

from ..cache.layer import KVLayer, lowest_visible
from ..cache.shared import SharedContextLayer
from ..errors import UserError
from ..methods.base import LayerObservation, Needs
from ..methods.budget import compress
from ..models.hook import produces_shared_kv, reuses_kv
from .carried import carried
from .joint import JointLayer
from .kv_sharing import reused_attention, source_view
from .state import DECODE, PREFILL, QUESTION, ForwardState

ATTENTION_NAME = "lcbench"


@dataclass(frozen=True)
class AttentionCall:
    """What the model passed to one attention call besides q/k/v, as transformers' own attention
    functions read it: ``sliding_window`` (a query at true position p sees the keys at positions in
    ``(p - window, p]``: ``sliding_window_overlay`` in transformers' ``masking_utils``), ``softcap``
    (Gemma-2: ``tanh(s / cap) · cap`` on the scaled logits before the mask, ``gemma2`` eager path),
    ``sinks`` (gpt-oss's learned per-head logit ``s_aux``, one extra softmax column that is then
    dropped, ``gpt_oss`` eager path) and ``scaling``. Dropout is never applied (evaluation).
    ``chunk``: on a chunked-attention layer (Llama-4's ``layer_types`` "chunked_attention", which the
    model does not pass but its mask carries: ``chunked_overlay`` in ``masking_utils``), a query at
    true position p sees only the keys of its own chunk of ``attention_chunk_size`` positions,
    ``[⌊p / chunk⌋ · chunk, p]``."""

    scaling: float
    window: int | None = None
    chunk: int | None = None
    softcap: float | None = None
    sinks: torch.Tensor | None = None
    causal: bool = True

    @classmethod
    def from_kwargs(cls, module, query: torch.Tensor, scaling: float | None, kwargs: dict) -> "AttentionCall":
        unsupported = [k for k in UNSUPPORTED_KWARGS if kwargs.get(k) is not None]
        if unsupported:
            raise UserError(
                f"this model passes {', '.join(unsupported)} to its attention function, which lcbench's attention "
                f"does not implement (its numbers would be wrong). Fix: use a model whose attention lcbench "
                f"supports (README, supported architectures)."
            )
        window = kwargs.get("sliding_window")
        return cls(scaling=query.shape[-1] ** -0.5 if scaling is None else float(scaling),
                   window=int(window) if window else None, chunk=layer_chunk(module),
                   softcap=kwargs.get("softcap") or None,
                   sinks=kwargs.get("s_aux"),
                   causal=bool(kwargs.get("is_causal", getattr(module, "is_causal", True))))


# attention arguments some transformers models pass that change the numbers and lcbench does not implement
UNSUPPORTED_KWARGS = ("position_bias", "attention_chunk_size")


def layer_chunk(module) -> int | None:
    """The attention chunk of ``module``'s layer when its config marks it "chunked_attention"
    (Llama-4: transformers builds that layer's mask with ``attention_chunk_size`` and caches it as a
    sliding layer of that size), else None."""
    config = getattr(module, "config", None)
    types = getattr(config, "layer_types", None)
    idx = getattr(module, "layer_idx", None)
    if not types or idx is None or idx >= len(types) or types[idx] != "chunked_attention":
        return None
    return int(config.attention_chunk_size)


def storage_mask(layer: KVLayer, q_len: int, window: int | None = None,
                 chunk: int | None = None) -> torch.Tensor | None:
    """Boolean (B, 1 or H, q, L) mask: the ``q_len`` newest stored tokens are the queries; each
    sees every valid older token and the new ones up to itself — and, with a sliding ``window``,
    only the keys whose true position lies in ``(p - window, p]`` for a query at true position p
    (with a ``chunk``, only those of its own chunk: :func:`lowest_visible`). ``None`` when plain
    causal attention is exactly right (what transformers' SDPA path does), to keep its numerics."""
    L = layer.seq_len()
    outside = window_excludes(layer, q_len, window, chunk)
    if layer.valid is None and not outside and (q_len == 1 or q_len == L):
        return None
    device = layer.positions.device
    rows = torch.arange(q_len, device=device)[:, None] + (L - q_len)
    cols = torch.arange(L, device=device)[None, :]
    causal = cols <= rows  # (q, L)
    if layer.valid is None and not outside:
        return causal[None, None]
    mask = causal[None, None]
    if layer.valid is not None:
        own = cols == rows  # a padded query still sees itself: no all-masked rows (NaN)
        mask = mask & (layer.valid[:, :, None, :] | own)  # (B, H, q, L)
    if outside:
        lowest = lowest_visible(layer.positions[..., L - q_len:], window, chunk)  # (B, H, q)
        mask = mask & (layer.positions[..., None, :] >= lowest[..., :, None])
    if mask.shape[1] > 1 and bool((mask == mask[:, :1]).all()):
        mask = mask[:, :1]
    return mask


def window_excludes(layer: KVLayer, q_len: int, window: int | None, chunk: int | None = None) -> bool:
    """Whether a sliding ``window`` (or an attention ``chunk``) hides any stored key from any of the
    ``q_len`` newest queries."""
    if not (window or chunk) or layer.positions is None:
        return False
    L = layer.seq_len()
    lowest = lowest_visible(layer.positions[..., L - q_len:], window, chunk)
    return bool(lowest.amax() > layer.positions.amin())


def visible_after(layer: KVLayer, window: int | None, chunk: int | None = None) -> torch.Tensor:
    """(B, H, L) bool: the stored tokens a query after every stored one can still see through a
    sliding ``window`` (true position > next position − window) or in its ``chunk``."""
    nxt = layer.positions.amax(dim=-1, keepdim=True) + 1
    return layer.positions >= lowest_visible(nxt, window, chunk)


def drop_unseeable(layer: KVLayer, window: int | None, chunk: int | None = None) -> KVLayer:
    """Forget the tokens no later query of a sliding-window layer can see (what transformers'
    ``DynamicSlidingWindowLayer`` keeps: the last ``window - 1``), or, on a chunked-attention layer,
    the tokens before the chunk the next position opens or continues. Every row and head keep their
    last ``K`` slots, ``K`` the most real tokens any of them can still see — so a row shorter than the
    others keeps some of its left padding, and no row keeps a token it cannot see; a chunked layer
    whose context ends on a chunk boundary keeps its newest token (``K`` ≥ 1: it sees nothing, and
    is masked). Done only where that is exact (the visible tokens are the newest slots, as after a
    prefill)."""
    L = layer.seq_len()
    seeable = visible_after(layer, window, chunk)
    if layer.valid is not None:
        seeable = seeable & layer.valid
    k = max(1, int(seeable.sum(-1).max()))
    if k >= L or bool(seeable[..., : L - k].any()):
        return layer
    b, h, _ = seeable.shape
    layer.select(torch.arange(L - k, L, device=seeable.device).expand(b, h, k))
    return layer


DENSE_IMPLEMENTATIONS = ("sdpa", "eager")


def slot_bias(layer: KVLayer) -> torch.Tensor | None:
    """The per-slot additive attention logits (B, H, L) ``layer`` holds (merge compensation,
    :class:`lcbench.cache.layer.DenseLayer`'s ``bias``), looking through wrappers: a decode-evicting
    layer's ``inner`` and a cross-sample batch's stacked children (left-padded with 0, their padding
    is masked anyway). ``None`` when no slot carries one."""
    bias = getattr(layer, "bias", None)
    if bias is not None:
        return bias
    inner = getattr(layer, "inner", None)
    if isinstance(inner, KVLayer):
        return slot_bias(inner)
    children = getattr(layer, "children", None)
    if isinstance(children, list) and children and all(isinstance(c, KVLayer) for c in children):
        biases = [slot_bias(c) for c in children]
        if all(b is None for b in biases):
            return None
        width = layer.seq_len()
        out = []
        for child, b in zip(children, biases):
            rows, heads, n = child.positions.shape
            own = b if b is not None else torch.zeros(rows, heads, n, device=child.positions.device)
            out.append(torch.cat([own.new_zeros(rows, heads, width - n), own.float()], dim=-1))
        return torch.cat(out, dim=0)
    return None


def additive_mask(bias: torch.Tensor, mask: torch.Tensor | None, q_len: int, groups: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """The float mask (B, Hq, q, L) that adds ``bias`` (B, Hkv, L) to the logits where ``mask``
    (boolean, :func:`storage_mask`; ``None`` = plain bottom-right causal) lets a query see a key
    and is ``-inf`` where it does not, in the queries' dtype (SDPA adds a float mask to the scaled
    logits)."""
    b, hkv, L = bias.shape
    add = bias.float()[:, :, None, :]
    if mask is None and q_len > 1:
        mask = (torch.arange(L, device=bias.device)[None, :]
                <= torch.arange(L - q_len, L, device=bias.device)[:, None])[None, None]
    if mask is not None:
        add = add.masked_fill(~mask, float("-inf"))
    add = add.expand(b, hkv, q_len, L)
    return add.repeat_interleave(groups, dim=1).to(dtype)


def softmax_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float,
                      allowed: torch.Tensor | None = None, softcap: float | None = None,
                      sink_column: torch.Tensor | None = None, additive: torch.Tensor | None = None) -> torch.Tensor:
    """Attention computed on explicit logits, as transformers' eager paths do (``gemma2``,
    ``gpt_oss`` ``eager_attention_forward``): ``query`` (..., q, D) over ``keys``/``values``
    (..., L, D) with as many heads; the scaled logits, Gemma-2's softcap ``tanh(s / cap) · cap``,
    then either the float mask ``additive`` added (it carries ``-inf`` where a key is hidden) or the
    boolean ``allowed`` (broadcast to (..., q, L); ``None`` hides nothing) applied; gpt-oss's learned
    sink logits ``sink_column`` (broadcast to (..., q, 1)) join the softmax as one more column that
    is dropped after it. The softmax runs in float32; returns (..., q, D) in the query's dtype."""
    scores = query @ keys.transpose(-1, -2) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if additive is not None:
        scores = scores + additive
    elif allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    if sink_column is not None:
        column = sink_column.to(scores.dtype).expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, column], dim=-1)
        scores = scores - scores.amax(dim=-1, keepdim=True)
        probs = scores.softmax(-1, dtype=torch.float32)[..., :-1].to(query.dtype)
    else:
        probs = scores.softmax(-1, dtype=torch.float32).to(query.dtype)
    return probs @ values


def dense_attention(module, query, key, value, mask, scaling, call: AttentionCall | None = None,
                    bias: torch.Tensor | None = None):
    """Exact attention over what the layer holds; per-KV-head masks expand to the query heads.

    The computation is torch SDPA (transformers' ``sdpa`` path, for identical numerics), or the
    explicit softmax of transformers' ``eager`` path when the model was loaded with
    ``attn_implementation=eager`` (recorded on the config as ``lcbench_dense_attention``) or when
    the call has a softcap or sinks, which SDPA cannot compute. ``mask`` already holds the sliding
    window (:func:`storage_mask`). ``bias`` (B, Hkv, L): per-slot logits added after the scaling
    (and after a softcap), through a float mask (:func:`additive_mask`); ``None`` keeps the paths
    above exactly as they are."""
    groups = getattr(module, "num_key_value_groups", 1)
    softcap = call.softcap if call is not None else None
    sinks = call.sinks if call is not None else None
    eager = getattr(getattr(module, "config", None), "lcbench_dense_attention", "sdpa") == "eager"
    if bias is not None:
        add = additive_mask(bias, mask, query.shape[2], groups, query.dtype)
        if not (eager or softcap is not None or sinks is not None):
            out = F.scaled_dot_product_attention(query, repeat_kv(key, groups), repeat_kv(value, groups),
                                                 attn_mask=add, scale=scaling)
            return out.transpose(1, 2).contiguous()
    if eager or softcap is not None or sinks is not None:
        if bias is None and mask is not None and mask.shape[1] > 1:
            mask = mask.repeat_interleave(groups, dim=1)
        elif bias is None and mask is None and query.shape[2] > 1:
            L, q = key.shape[2], query.shape[2]
            mask = torch.arange(L, device=query.device)[None, :] <= torch.arange(L - q, L, device=query.device)[:, None]
        sink_column = None if sinks is None else sinks.reshape(1, -1, 1, 1)
        out = softmax_attention(query, repeat_kv(key, groups), repeat_kv(value, groups), scaling,
                                allowed=None if bias is not None else mask, softcap=softcap,
                                sink_column=sink_column, additive=add if bias is not None else None)
        return out.transpose(1, 2).contiguous()
    if mask is not None and mask.shape[1] > 1:
        mask = mask.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(query, repeat_kv(key, groups), repeat_kv(value, groups),
                                             attn_mask=mask, scale=scaling)
        return out.transpose(1, 2).contiguous()
    out, _ = sdpa_attention_forward(module, query, key, value, mask, dropout=0.0, scaling=scaling)
    return out


def observe(needs: Needs, query, key, layer: KVLayer, groups: int, scaling: float,
            layer_idx: int, num_layers: int, protected: int, module=None) -> LayerObservation:
    """Collect what the cache stages need from this layer's compressing pass."""
    L = layer.seq_len()
    q_len = query.shape[2]
    # the stages' groups are query heads per *stored* head: on a latent cache (MLA) one stored
    # "head" serves every query head, although attention's expanded keys have a head per query head
    stored_heads = layer.positions.shape[1]
    seen = LayerObservation(layer_idx=layer_idx, num_layers=num_layers, num_groups=query.shape[1] // stored_heads,
                            context_length=L - protected, protected=protected, module=module,
                            positions=layer.positions[:, 0])
    if needs.queries:
        seen.queries = query
    if needs.window or needs.full_attention_sum:
        valid = layer.valid  # (B, Hkv, L) or None

        def probs(start: int, stop: int, width: int = L) -> torch.Tensor:
            """Attention (B, Hq, n, width) of queries ``start:stop`` over the first ``width`` keys (the
            keys after the last of these queries are causally masked: leaving them out changes nothing)."""
            b, hq, _, _ = query.shape
            n = stop - start
            scores = grouped_scores(query[:, :, start:stop], key, groups, scaling, width)
            scores = scores.view(b, hq // groups, groups, n, width)
            rows = torch.arange(start, stop, device=query.device)[:, None] + (L - q_len)
            cols = torch.arange(width, device=query.device)[None, :]
            allowed = (cols <= rows)[None, None, None]
            if valid is not None:
                allowed = allowed & (valid[:, :, None, None, :width] | (cols == rows))
            scores.masked_fill_(~allowed, float("-inf"))
            return softmax_in_place(scores).view(b, hq, n, width)

        if needs.window:
            w = min(needs.window, q_len)
            seen.window_attention = probs(q_len - w, q_len)
            if needs.window_queries:
                seen.window_queries = query[:, :, q_len - w:]
        if needs.full_attention_sum:
            seen.attention_sum = (attention_sum(query, key, groups, scaling, L) if valid is None else
                                  sum_in_chunks(probs, query.shape[:2], L, q_len, query.device,
                                                chunk=query_chunk(query.shape[1], L)))
    elif needs.window_queries:
        seen.window_queries = query[:, :, max(0, q_len - 1):]
    return seen


# Observation transients (issue #12): keys are never repeated per query head nor upcast whole —
# scores are computed per KV head on its grouped queries, keys upcast to float32 KEY_CHUNK at a
# time; softmax runs in float32 in place, SOFTMAX_CHUNK_BYTES of rows at a time; and a pass over
# every query (H2O) takes as many queries at once as keep its float32 scores within CHUNK_BYTES.
KEY_CHUNK = 4096
CHUNK_BYTES = 256 * 2**20
SOFTMAX_CHUNK_BYTES = 64 * 2**20


def grouped_scores(query: torch.Tensor, key: torch.Tensor, groups: int, scaling: float,
                   width: int | None = None) -> torch.Tensor:
    """Float32 scaled logits (B, Hkv, G·n, width) of ``query`` (B, Hq, n, D) over the first
    ``width`` keys of ``key`` (B, Hkv, L, D): per KV head on its ``G`` grouped query heads (query
    head ``h·G + g`` is row block ``g`` of KV head ``h``, as ``repeat_kv`` orders them), keys
    upcast ``KEY_CHUNK`` at a time — the same dot products as over repeated float32 keys."""
    b, hq, n, d = query.shape
    hkv = key.shape[1]
    width = key.shape[2] if width is None else width
    q = query.float().reshape(b, hkv, groups * n, d)
    if width <= KEY_CHUNK:
        return torch.matmul(q, key[:, :, :width].float().transpose(-1, -2)).mul_(scaling)
    out = torch.empty(b, hkv, groups * n, width, dtype=torch.float32, device=query.device)
    for a in range(0, width, KEY_CHUNK):
        c = min(width, a + KEY_CHUNK)
        out[..., a:c] = torch.matmul(q, key[:, :, a:c].float().transpose(-1, -2))
    return out.mul_(scaling)


def softmax_in_place(scores: torch.Tensor) -> torch.Tensor:
    """``scores.softmax(-1)`` written back into ``scores`` (same numbers), a bounded block of rows
    at a time, so no second tensor of its size exists."""
    rows = scores.view(-1, scores.shape[-1])
    step = max(1, SOFTMAX_CHUNK_BYTES // (4 * max(1, scores.shape[-1])))
    for a in range(0, rows.shape[0], step):
        rows[a:a + step] = rows[a:a + step].softmax(-1)
    return scores


def query_chunk(query_heads: int, length: int, limit: int = 512) -> int:
    """Queries per chunk of a pass over every query: at most ``limit``, and few enough that the
    chunk's float32 scores (query heads × queries × keys) stay within ``CHUNK_BYTES``."""
    return max(1, min(limit, CHUNK_BYTES // (4 * query_heads * max(1, length))))


def sum_in_chunks(probs, batch_heads, L: int, q_len: int, device, chunk: int = 512) -> torch.Tensor:
    """(B, Hq, L): attention each key received, summed over the queries, ``chunk`` queries at a time."""
    total = torch.zeros(*batch_heads, L, device=device)
    for start in range(0, q_len, chunk):
        stop = min(q_len, start + chunk)
        width = L - q_len + stop
        total[..., :width] += probs(start, stop, width).sum(2)
    return total


def attention_sum(query, key, groups: int, scaling: float, L: int, chunk: int | None = None) -> torch.Tensor:
    """:func:`sum_in_chunks` for a layer without padding, computed per KV head on the grouped
    queries (no repeated keys, keys upcast in chunks: :func:`grouped_scores`) and masking only each
    chunk's own diagonal block: same numbers, about half the time (H2O needs every query's
    attention, which SDPA does not return). ``chunk`` queries at a time (default
    :func:`query_chunk`: the float32 scores of a chunk stay within ``CHUNK_BYTES``)."""
    b, hq, q_len, d = query.shape
    hkv = hq // groups
    chunk = chunk or query_chunk(hq, L)
    total = torch.zeros(b, hkv, groups, L, device=query.device)
    for start in range(0, q_len, chunk):
        stop = min(q_len, start + chunk)
        n, width = stop - start, L - q_len + stop
        scores = grouped_scores(query[:, :, start:stop], key, groups, scaling, width).view(b, hkv, groups, n, width)
        future = torch.ones(n, n, dtype=torch.bool, device=query.device).triu_(1)
        scores[..., width - n:].masked_fill_(future, float("-inf"))
        total[..., :width] += softmax_in_place(scores).sum(3)
    return total.reshape(b, hq, L)


def plain_mask(query: torch.Tensor, key: torch.Tensor, window: int | None,
               chunk: int | None = None) -> torch.Tensor | None:
    """Outside the engine: the bottom-right causal mask (queries are the last ``q`` of ``L`` slots,
    slot index = position), with the sliding window or the attention chunk; ``None`` where SDPA's
    own causal path is exact."""
    q_len, kv_len = query.shape[2], key.shape[2]
    span = window or chunk
    if (q_len == 1 or q_len == kv_len) and (not span or kv_len <= span):
        return None
    rows = torch.arange(kv_len - q_len, kv_len, device=query.device)[:, None]
    cols = torch.arange(kv_len, device=query.device)[None, :]
    mask = cols <= rows
    if span:
        mask = mask & (cols >= lowest_visible(rows, window, chunk))
    return mask[None, None]


def _stage_kwargs(call: AttentionCall, stage) -> dict:
    """The keywords a stage hook gets: ``window`` on a sliding-window layer, and each of
    ``softcap`` / ``sinks`` / ``chunk`` the call carries and the stage applies
    (:attr:`Stage.attention_terms`; the engine refuses a stage that would need one it does not
    apply) — nothing otherwise, so stages that predate these keep working on models without them."""
    out: dict = {"window": call.window} if call.window else {}
    terms = getattr(stage, "attention_terms", ())
    out.update({term: value for term, value in (("softcap", call.softcap), ("sinks", call.sinks),
                                                ("chunk", call.chunk)) if value is not None and term in terms})
    return out


def shared_context_attention(module, query, layer: SharedContextLayer, call: AttentionCall) -> torch.Tensor:
    """Attention for rows sharing a context: one folded dense call over the shared keys
    (:meth:`SharedContextLayer.attend`, no per-row copy), with the call's window, softcap and
    sinks (all per query, so folding the rows changes none of them)."""
    bias = slot_bias(layer.context)
    if bias is not None:  # the context's slots keep their bias; the rows' own tokens get 0
        bias = torch.cat([bias, bias.new_zeros(*bias.shape[:2], layer.owner.numel())], dim=-1)
    return layer.attend(query, lambda q, k, v, m: dense_attention(module, q, k, v, m, call.scaling, call, bias),
                        window=call.window, chunk=call.chunk)


def lcbench_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The function transformers calls per layer when ``attn_implementation="lcbench"``. Its
    signature is ``sdpa_attention_forward``'s (``dropout`` before ``scaling``), which wrappers of
    registered attention functions (kvpress patches every one on import) pass positionally.

    Everything the model passes that shapes attention is honoured (:class:`AttentionCall`):
    sliding window, softcap, learned sinks, scaling; dropout is off. On a sliding-window layer,
    each prefill pass ends by forgetting the context tokens no later query can see
    (:func:`drop_unseeable`, as transformers' sliding cache does), *before* any cache stage runs:
    a method's budget on such a layer counts only the tokens it can still see, and the full
    cache it is measured against holds the same (:class:`lcbench.models.hook.Geometry`)."""
    state: ForwardState | None = carried("state")
    call = AttentionCall.from_kwargs(module, query, scaling, kwargs)
    if state is None and not call.causal:  # e.g. the vision tower of a multimodal checkpoint
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=call.scaling,
                                      **{k: kwargs[k] for k in ("is_causal", "position_bias") if k in kwargs})
    if state is None:  # the model used outside lcbench's engine: plain attention
        # transformers makes no mask for a custom attention name, and SDPA's is_causal aligns
        # top-left: queries appended to a cache (chunked prefill) need the bottom-right causal mask
        mask = attention_mask if attention_mask is not None else plain_mask(query, key, call.window, call.chunk)
        if call.softcap is None and call.sinks is None and mask is attention_mask:
            return sdpa_attention_forward(module, query, key, value, mask, dropout=0.0, scaling=call.scaling)
        return dense_attention(module, query, key, value, mask, call.scaling, call), None
    if not call.causal:
        raise UserError(f"{type(module).__name__} attends bidirectionally (is_causal=False); lcbench evaluates "
                        f"causal decoders only. Fix: use a causal language model.")
    cache = state.cache
    idx = module.layer_idx
    if idx is None or idx < 0:  # an attention block shared by several layers (Zamba2): the layer it just cached
        idx, cache.updated_layer = getattr(cache, "updated_layer", None), None
    layer = cache.layers[idx] if idx is not None else None
    if state.probe is not None:
        state.probe.seen(module, query, key, value, call, stored=layer, layer_idx=idx)
    if reuses_kv(module):  # KV sharing (Gemma-3n/4): the producer's keys and values, as it saw them
        view = state.kv_sources.get(module.layer_type)
        if view is None:
            raise RuntimeError(f"layer {idx} reuses the keys and values of a '{module.layer_type}' layer that did "
                               f"not attend before it in this forward")
        return reused_attention(module, query, key, value, view, call), None
    if produces_shared_kv(module):
        state.kv_sources[module.layer_type] = source_view(layer)
    if isinstance(layer, JointLayer):  # several runs' rows decoding together (engine/joint.py)
        return layer.attend(query, lambda q, k, v, part_layer, part_state: attend_layer(
            module, q, k, v, part_layer, part_state, call, idx, len(cache.layers)), key, value), None
    out, cache.layers[idx] = attend_layer(module, query, key, value, layer, state, call, idx, len(cache.layers))
    return out, None


def attend_layer(module, query, key, value, layer: KVLayer, state: ForwardState, call: AttentionCall, idx: int,
                 num_layers: int) -> tuple[torch.Tensor, KVLayer]:
    """One layer's attention over what ``layer`` holds, with ``state``'s stages (sparse attention,
    compression on the compressing pass, decode-time eviction); returns the output and the layer
    the cache holds from now on."""
    if isinstance(layer, SharedContextLayer):  # turns sharing one context (cache/shared.py)
        return shared_context_attention(module, query, layer, call), layer
    q_len = query.shape[2]
    mask = storage_mask(layer, q_len, call.window, call.chunk)
    scaling = call.scaling

    out = None
    if state.phase == DECODE:
        for stage in state.decode_stages:
            out = stage.decode_attention(module, query, layer, scaling, idx, **_stage_kwargs(call, stage))
            if out is not None:
                break
    elif state.attention_stages:
        # stages get the storage mask without the window (None: plain causal) and the window itself
        plain = storage_mask(layer, q_len) if call.window else mask
        for stage in state.attention_stages:
            out = stage.prefill_attention(module, query, key, value, plain, scaling, idx, **_stage_kwargs(call, stage))
            if out is not None:
                break
    bias = slot_bias(layer)
    if out is None:
        out = dense_attention(module, query, key, value, mask, scaling, call, bias)
    elif bias is not None:
        raise UserError(f"method '{stage.name}' computes attention itself and would ignore the per-slot attention "
                        f"bias of merged or weighted slots (zeromerge, subgen). Fix: do not chain it with a stage that "
                        f"merges or samples the cache.")

    if (call.window or call.chunk) and state.phase == PREFILL:
        layer = drop_unseeable(layer, call.window, call.chunk)
        kept = layer.seq_len()
        if kept < key.shape[2]:  # what a cache stage observes: the tokens kept (the newest slots)
            key = key[:, :, key.shape[2] - kept:]
            query = query[:, :, max(0, q_len - kept):]

    if state.compressing and state.cache_stages:
        start = state.timer.now()
        groups = getattr(module, "num_key_value_groups", 1)
        seen = observe(state.needs, query, key, layer, groups, scaling, idx, num_layers,
                       min(state.protected, layer.seq_len()), module=module)
        for stage in state.cache_stages:
            layer = compress(stage, layer, seen)
        state.compress_seconds += state.timer.now() - start
    elif state.phase == DECODE and state.decode_stages:
        for stage in state.decode_stages:
            layer = stage.after_decode_step(layer, idx, query)
    elif state.phase == QUESTION and state.decode_stages:
        for stage in state.decode_stages:
            layer = stage.after_question(layer, idx, query)
    return out, layer


def registered(name: str, function) -> str:
    """``name``, once ``function`` is registered under it with transformers' ``AttentionInterface``
    (for ``model.set_attn_implementation(name)``). Registering on first use, not at import, keeps
    transformers' modeling code out of ``import lcbench.methods``: listing the methods or refusing a
    bad flag then costs a second, not the five of loading transformers' model code."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, function)
    return name
