"""InfLLM: block memory retrieval for the question prefill and decoding.

Xiao et al., "InfLLM: Training-Free Long-Context Extrapolation for LLMs with an Efficient Context
Memory", NeurIPS 2024 (arXiv:2402.04617); official code github.com/thunlp/InfLLM, read at commit
12b70798f56e56ebb23c53c7018091a3f540a028 (``inf_llm/attention/context_manager.py``).

The context is cut into *initial tokens* (attention sinks), *memory blocks* of ``block_size``
tokens, and the *local window* (the most recent tokens). Each block is represented by the mean of
its ``repr_topk`` keys with the highest *representative score*: the attention each key received
from the queries of the local window that followed it (upstream accumulates the local
attention's probabilities, ``append_global`` → ``get_block_k``; the paper writes the score as the
mean query-key product). A query chunk — the question part, or one generated token — scores every
block by the mean of its queries against the block's representative, summed over the heads
(``calc_block_topk``: one selection per layer shared by its heads), and attends the initial
tokens, the ``topk`` best blocks and the local window only. The whole KV cache is kept (InfLLM
offloads the blocks to CPU memory; lcbench measures what is attended, reported as
``attention_density``, not bytes).

In lcbench the context is prefilled densely (lcbench's context pass; upstream also retrieves
during its chunked prefill), and ``--ratio`` sets the attended budget: with ``B`` = (1 − ratio) ×
context tokens, the initial tokens, the local window and the retrieved blocks take the shares of
upstream's configuration (``config/mistral-inf-llm.yaml``: 128 initial, 4096 local, 16 × 128
retrieved of 6,272; ``init_share``, ``local_share``), so a 6,272 / (1 − ratio)-token context runs
upstream's numbers. Deviations, all documented here: keys keep their true rotary positions
(upstream re-rotates retrieved blocks to one fixed distance); the local window is anchored at the
end of the context and the question and generated tokens are always attended (upstream slides the
window and turns tokens leaving it into new blocks — the same for answers shorter than the
window); layers with the model's own sliding window attend as the model does (dense within it,
counted as dense in the density).
"""

from __future__ import annotations

import torch

from ...engine.attention import dense_attention, storage_mask
from ...errors import UserError
from ...params import Param
from ..base import Stage, keep_count

QUERY_CHUNK = 256  # context queries per step of the representative-score pass (bounded transients)


def representative_scores(query: torch.Tensor, key: torch.Tensor, groups: int, scaling: float,
                          local: int) -> torch.Tensor:
    """(B, Hkv, L) attention each key receives from the queries of the ``local``-token window that
    follows it — each query's softmax over its own window (keys in ``(i − local, i]``), summed over
    the query heads of the key's group and the queries (upstream's ``local_score``)."""
    b, hq, n, d = query.shape
    hkv = key.shape[1]
    q = query.float().reshape(b, hkv, groups, n, d)
    k = key.float()
    out = torch.zeros(b, hkv, n, dtype=torch.float32, device=query.device)
    for a in range(0, n, QUERY_CHUNK):
        c = min(n, a + QUERY_CHUNK)
        lo = max(0, a - local + 1)
        s = torch.einsum("bhgqd,bhkd->bhgqk", q[:, :, :, a:c], k[:, :, lo:c]) * scaling
        rows = torch.arange(a, c, device=query.device)[:, None]
        cols = torch.arange(lo, c, device=query.device)[None, :]
        s.masked_fill_(~((cols <= rows) & (cols > rows - local)), float("-inf"))
        out[..., lo:c] += s.softmax(-1).sum((2, 3))
    return out


class InfLLM(Stage):
    name = "infllm"
    family = "sparse_attention"
    paper = ("Xiao et al., InfLLM: Training-Free Long-Context Extrapolation for LLMs with an Efficient Context "
             "Memory, NeurIPS 2024 (arXiv:2402.04617)")
    summary = "question prefill and decode attend initial tokens, the top memory blocks and a local window"
    # reference: the selection is applied as a mask over every stored key (dense compute), not upstream's
    # gathered blocks with CPU offloading
    reference_latency = True
    tolerance = 0.05
    defaults = {"block_size": 128, "repr_topk": 4, "init_share": 128 / 6272, "local_share": 4096 / 6272}
    stages = ("prefill_attention", "decode")
    params = (
        Param("block_size", int, None, "tokens per memory block (upstream 128)", min=1),
        Param("repr_topk", int, None, "keys per block whose mean represents it (upstream 4)", min=1),
        Param("init_share", float, None, "share of the attended budget for the initial tokens (upstream 128 of 6272)",
              min=0.0, max=1.0),
        Param("local_share", float, None, "share of the attended budget for the local window (upstream 4096 of 6272)",
              min=0.0, max=1.0),
    )

    def begin_sample(self) -> None:
        self._memory: dict[int, tuple[torch.Tensor, int, int, int, int]] = {}
        self._attended = 0.0
        self._visible = 0.0

    def _plan(self, context: int) -> tuple[int, int, int]:
        """(initial tokens, local window, blocks retrieved) for a ``context``-token context."""
        budget = keep_count(context, self.ratio)
        init = int(budget * self.args["init_share"])
        local = max(1, int(budget * self.args["local_share"]))
        topk = max(0, (budget - init - local) // self.args["block_size"])
        return init, local, topk

    # --- the context pass: dense, and each block's representative --------------------------
    def prefill_attention(self, module, query, key, value, mask, scaling, layer_idx, window=None):
        if self.ratio <= 0:
            return None
        if not hasattr(self, "_memory"):
            self.begin_sample()
        n, total = query.shape[2], key.shape[2]
        if n == total:  # the context pass
            if window is None:
                self._remember(query, key, scaling, layer_idx, getattr(module, "num_key_value_groups", 1))
            return None
        if layer_idx not in self._memory:  # dense (a window layer, or a context every block of which fits)
            self._count_dense(key.shape[0] * key.shape[1] * n * min(total, window or total))
            return None
        context = self._memory[layer_idx][1]
        if total - n != context:
            raise UserError(f"infllm retrieves blocks of the context as it was prefilled ({context} slots), but the "
                            f"layer now holds {total - n}: a cache stage changed it. Fix: chain infllm with no "
                            f"KV-dropping stage (it keeps the whole cache).")
        base = mask if mask is not None else storage_causal(n, total, query.device)
        own = torch.arange(total - n, total, device=query.device)
        valid_queries = base[:, 0, -1, own]  # (B, n): the last query sees every valid slot
        return self._attend(module, query, key, value, base, scaling, layer_idx, valid_queries)

    def _remember(self, query, key, scaling: float, layer_idx: int, groups: int) -> None:
        context = key.shape[2]
        init, local, topk = self._plan(context)
        bs = self.args["block_size"]
        start, stop = init, max(init, context - local)  # the blocks lie between the initial tokens and the window
        blocks = (stop - start) // bs
        if blocks <= topk:  # every block would be retrieved: attend densely
            return
        score = representative_scores(query, key, groups, scaling, local)[..., start:start + blocks * bs]
        b, hkv = key.shape[:2]
        k = key[:, :, start:start + blocks * bs].float().reshape(b, hkv, blocks, bs, -1)
        best = score.reshape(b, hkv, blocks, bs).topk(min(self.args["repr_topk"], bs), dim=-1).indices
        reps = k.gather(3, best[..., None].expand(*best.shape, k.shape[-1])).mean(3)  # (B, Hkv, blocks, D)
        self._memory[layer_idx] = (reps, context, init, start + blocks * bs, topk)

    # --- question prefill and decoding over the retrieved blocks -----------------------------
    def decode_attention(self, module, query, layer, scaling, layer_idx, window=None):
        if self.ratio <= 0:
            return None
        base = storage_mask(layer, 1, window)
        if base is None:
            base = torch.ones(1, 1, 1, layer.seq_len(), dtype=torch.bool, device=query.device)
        if window is not None or layer_idx not in getattr(self, "_memory", {}):  # dense, counted as such
            b, hkv = layer.positions.shape[:2]
            self._count_dense(float(base.expand(b, hkv, 1, -1).sum()))
            return None
        keys, values = layer.dense()
        valid = torch.ones(query.shape[0], 1, dtype=torch.bool, device=query.device)
        return self._attend(module, query, keys, values, base, scaling, layer_idx, valid)

    def _count_dense(self, pairs: float) -> None:
        """A layer that attended densely: every visible query–key pair counts as attended."""
        if not hasattr(self, "_memory"):
            self.begin_sample()
        self._attended += pairs
        self._visible += pairs

    def _attend(self, module, query, key, value, base: torch.Tensor, scaling: float, layer_idx: int,
                valid_queries: torch.Tensor):
        """Attention of ``query`` (B, Hq, q, D) over the initial tokens, the top blocks for these
        queries, the local window and everything after the context (``base``: the storage mask)."""
        reps, context, init, blocks_end, topk = self._memory[layer_idx]
        bs = self.args["block_size"]
        b, hq, n, d = query.shape
        hkv = reps.shape[1]
        weights = valid_queries.to(torch.float32)[:, None, :, None]  # (B, 1, q, 1)
        mean_q = (query.float() * weights).sum(2) / weights.sum(2).clamp(min=1)  # (B, Hq, D)
        grouped = mean_q.reshape(b, hkv, hq // hkv, d)
        relevance = torch.einsum("bhgd,bhkd->bk", grouped, reps)  # summed over heads (one choice per layer)
        chosen = relevance.topk(topk, dim=-1).indices  # (B, topk)
        total = key.shape[2]
        slots = torch.arange(total, device=key.device)
        keep = (slots < init) | (slots >= blocks_end)  # initial tokens, the window and all after the context
        keep = keep[None].expand(b, total).clone()
        block_of = ((slots - init) // bs).clamp(min=0)
        in_memory = (slots >= init) & (slots < blocks_end)
        keep |= in_memory[None] & (block_of[None, :, None] == chosen[:, None, :]).any(-1)
        allowed = base & keep[:, None, None, :]
        self._attended += float(allowed.sum()) * (hkv if allowed.shape[1] == 1 else 1)
        self._visible += float(base.expand(b, -1, n, total).sum()) * (hkv if base.shape[1] == 1 else 1)
        return dense_attention(module, query, key, value, allowed, scaling)

    def sample_stats(self) -> dict[str, float]:
        if getattr(self, "_visible", 0.0):
            return {"attention_density": self._attended / self._visible}
        return {}


def storage_causal(q: int, total: int, device) -> torch.Tensor:
    """(1, 1, q, total) causal mask of ``q`` newest queries over ``total`` stored keys."""
    rows = torch.arange(q, device=device)[:, None] + (total - q)
    return (torch.arange(total, device=device)[None, :] <= rows)[None, None]
