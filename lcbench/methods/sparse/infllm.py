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

from ...params import Param
from ..base import keep_count
from .retrieval import ContextRetrieval

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


class InfLLM(ContextRetrieval):
    name = "infllm"
    family = "sparse_attention"
    paper = ("Xiao et al., InfLLM: Training-Free Long-Context Extrapolation for LLMs with an Efficient Context "
             "Memory, NeurIPS 2024 (arXiv:2402.04617)")
    summary = "question prefill and decode attend initial tokens, the top memory blocks and a local window"
    tolerance = 0.05
    defaults = {"block_size": 128, "repr_topk": 4, "init_share": 128 / 6272, "local_share": 4096 / 6272}
    params = (
        Param("block_size", int, None, "tokens per memory block (upstream 128)", min=1),
        Param("repr_topk", int, None, "keys per block whose mean represents it (upstream 4)", min=1),
        Param("init_share", float, None, "share of the attended budget for the initial tokens (upstream 128 of 6272)",
              min=0.0, max=1.0),
        Param("local_share", float, None, "share of the attended budget for the local window (upstream 4096 of 6272)",
              min=0.0, max=1.0),
    )

    def _plan(self, context: int) -> tuple[int, int, int]:
        """(initial tokens, local window, blocks retrieved) for a ``context``-token context."""
        budget = keep_count(context, self.ratio)
        init = int(budget * self.args["init_share"])
        local = max(1, int(budget * self.args["local_share"]))
        topk = max(0, (budget - init - local) // self.args["block_size"])
        return init, local, topk

    def learn(self, query, key, scaling, groups, layer_idx):
        """Each memory block's representative: the mean of its ``repr_topk`` keys with the most
        local-window attention; None when every block would be retrieved (the layer stays dense)."""
        context = key.shape[2]
        init, local, topk = self._plan(context)
        bs = self.args["block_size"]
        start, stop = init, max(init, context - local)  # the blocks lie between the initial tokens and the window
        blocks = (stop - start) // bs
        if blocks <= topk:
            return None
        score = representative_scores(query, key, groups, scaling, local)[..., start:start + blocks * bs]
        b, hkv = key.shape[:2]
        k = key[:, :, start:start + blocks * bs].float().reshape(b, hkv, blocks, bs, -1)
        best = score.reshape(b, hkv, blocks, bs).topk(min(self.args["repr_topk"], bs), dim=-1).indices
        reps = k.gather(3, best[..., None].expand(*best.shape, k.shape[-1])).mean(3)  # (B, Hkv, blocks, D)
        return reps, init, start + blocks * bs, topk

    def keep(self, learned, query, key, valid_queries, scaling):
        """The initial tokens, the ``topk`` blocks whose representatives best match the mean of the
        (valid) queries summed over heads — one choice for the layer — the window and all after it."""
        reps, init, blocks_end, topk = learned
        bs = self.args["block_size"]
        b, hq, n, d = query.shape
        hkv = reps.shape[1]
        weights = valid_queries.to(torch.float32)[:, None, :, None]  # (B, 1, q, 1)
        mean_q = (query.float() * weights).sum(2) / weights.sum(2).clamp(min=1)  # (B, Hq, D)
        relevance = torch.einsum("bhgd,bhkd->bk", mean_q.reshape(b, hkv, hq // hkv, d), reps)
        chosen = relevance.topk(topk, dim=-1).indices  # (B, topk)
        total = key.shape[2]
        slots = torch.arange(total, device=query.device)
        keep = ((slots < init) | (slots >= blocks_end))[None].expand(b, total).clone()
        in_memory = (slots >= init) & (slots < blocks_end)
        keep |= in_memory[None] & (((slots - init) // bs)[None, :, None] == chosen[:, None, :]).any(-1)
        return keep[:, None, None, :]
