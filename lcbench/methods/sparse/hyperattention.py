"""HyperAttention: sortLSH block-diagonal attention plus sampled columns, with a causal recursion.

Han et al., "HyperAttention: Long-context Attention in Near-Linear Time", ICLR 2024
(arXiv:2310.05869); official implementation github.com/insuhan/hyper-attn, read at commit
68b91e9b95ee9504d5beb9f8f6fba5792dfd9a56 (``models/attention/hyper_attn.py``, ``angular_lsh.py``).

Without a causal mask (``noncausal``): queries and keys are hashed by angular LSH (the signs of
``lsh_bits`` random projections, bucket ids ordered so neighbouring buckets differ in one bit) and
sorted by bucket; the i-th block of sorted queries attends the i-th block of ``block_size`` sorted
keys exactly (the large entries land there), and every query also attends ``sample_size`` key
columns drawn uniformly, outside its own block, weighted ``n_keys / sample_size`` (the residual);
the two parts are merged through their log-sum-exps. With the causal mask (``causal``) the
sequence is halved: each half attends itself causally (recursively), and the second half attends
the first without a mask (``noncausal``); pieces shorter than ``leaf_blocks × block_size`` (upstream
``min_seq_len``) are exact causal attention. The result equals a softmax over the computed pairs
with those weights (what the tests check, against a dense reference built from the same hashes
and samples). ``--ratio`` sets the density target ``1 − r`` (computed pairs over causal pairs,
per query head): ``block_size`` (= ``sample_size``) is searched for the densest plan within it.
Projections and samples are drawn from a generator seeded by ``seed`` and the layer, so a run is
reproducible. Not a block pattern (its pairs are scattered by the hash), so it has its own path:
sliding-window layers and padded batches attend densely and count as dense.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from ...params import Param
from ..base import Stage
from .kernel import chunk_pairs
from .prefill import DensityStats


def gray_order(bits: int) -> torch.Tensor:
    """Rank of each bucket id (sign pattern as an integer) in the reflected Gray-code order, so
    buckets adjacent in the sort differ in one projection's sign."""
    ids = torch.arange(2 ** bits)
    gray = ids ^ (ids >> 1)  # the i-th code of the order
    rank = torch.empty_like(gray)
    rank[gray] = ids
    return rank


def lsh_order(x: torch.Tensor, proj: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """(…, n) permutation sorting ``x`` (…, n, D) by angular-LSH bucket (stable)."""
    bits = (x.float() @ proj) > 0
    ids = (bits.long() * (2 ** torch.arange(proj.shape[1], device=x.device))).sum(-1)
    return rank.to(x.device)[ids].sort(dim=-1, stable=True).indices


def merge(o1, l1, o2, l2):
    """Two attention results over disjoint key sets, combined through their log-sum-exps."""
    lse = torch.logaddexp(l1, l2)
    return o1 * (l1 - lse).exp()[..., None] + o2 * (l2 - lse).exp()[..., None], lse


def logits(q, k, scale, softcap: float | None = None):
    """Scaled logits of ``q`` over ``k``, with Gemma-2's softcap ``tanh(s / cap) · cap`` when given."""
    s = (q @ k.transpose(-1, -2)) * scale
    return s if softcap is None else torch.tanh(s / softcap) * softcap


def exact(q, k, v, scale, causal: bool, softcap: float | None = None):
    """(out, lse) of exact attention (fp32)."""
    s = logits(q, k, scale, softcap)
    if causal:
        n = q.shape[-2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    lse = s.logsumexp(-1)
    return (s - lse[..., None]).exp() @ v, lse


@dataclass
class Piece:
    """One unmasked HyperAttention call: queries [q0, q0+nq) and keys [k0, k0+nk) of the layer,
    their LSH sort orders (B, H, n), the key block size, and the sampled sorted-key ranks (B, H, m)."""

    q0: int
    k0: int
    q_order: torch.Tensor
    k_order: torch.Tensor
    block: int
    samples: torch.Tensor


@dataclass
class Plan:
    """What one layer computed: exact causal leaves [start, end), exact unmasked rectangles
    (q0, nq, k0, nk) and the HyperAttention pieces."""

    leaves: list[tuple[int, int]] = field(default_factory=list)
    rects: list[tuple[int, int, int, int]] = field(default_factory=list)
    pieces: list[Piece] = field(default_factory=list)
    pairs: torch.Tensor | float = 0.0  # computed pairs per (row, query head)


class HyperAttentionRun:
    """One layer's HyperAttention with fixed sizes (``block`` = sample size, leaves below ``leaf``)."""

    def __init__(self, block: int, leaf: int, bits: int, generator: torch.Generator, dim: int,
                 softcap: float | None = None):
        self.block, self.samples, self.leaf = block, block, leaf
        self.softcap = softcap  # the model's logit softcap, on every computed logit
        self.gen = generator
        self.proj = torch.randn(dim, bits, generator=generator)
        self.rank = gray_order(bits)
        self.plan = Plan()

    def causal(self, q, k, v, scale, start: int = 0):
        n = q.shape[-2]
        if n <= self.leaf:
            self.plan.leaves.append((start, start + n))
            self.plan.pairs = self.plan.pairs + n * (n + 1) / 2
            return exact(q, k, v, scale, True, self.softcap)
        h = n // 2
        o1, l1 = self.causal(q[..., :h, :], k[..., :h, :], v[..., :h, :], scale, start)
        o2, l2 = self.causal(q[..., h:, :], k[..., h:, :], v[..., h:, :], scale, start + h)
        o3, l3 = self.noncausal(q[..., h:, :], k[..., :h, :], v[..., :h, :], scale, start + h, start)
        o2, l2 = merge(o2, l2, o3, l3)
        return torch.cat([o1, o2], dim=-2), torch.cat([l1, l2], dim=-1)

    def noncausal(self, q, k, v, scale, q0: int, k0: int):
        B, H, nq, D = q.shape
        nk = k.shape[-2]
        if nq < self.leaf or nk <= self.block:  # small: exact (upstream: below min_seq_len)
            self.plan.rects.append((q0, nq, k0, nk))
            self.plan.pairs = self.plan.pairs + nq * nk
            return exact(q, k, v, scale, False, self.softcap)
        proj = self.proj.to(q.device)
        q_ord, k_ord = lsh_order(q, proj, self.rank), lsh_order(k, proj, self.rank)
        nb = math.ceil(nk / self.block)
        bq = math.ceil(nq / nb)
        qs = q.gather(2, q_ord[..., None].expand(-1, -1, -1, D))
        ks = k.gather(2, k_ord[..., None].expand(-1, -1, -1, D))
        vs = v.gather(2, k_ord[..., None].expand(-1, -1, -1, D))
        pq, pk = nb * bq - nq, nb * self.block - nk
        qb = torch.nn.functional.pad(qs, (0, 0, 0, pq)).reshape(B, H, nb, bq, D)
        kb = torch.nn.functional.pad(ks, (0, 0, 0, pk)).reshape(B, H, nb, self.block, D)
        vb = torch.nn.functional.pad(vs, (0, 0, 0, pk)).reshape(B, H, nb, self.block, D)
        s = logits(qb, kb, scale, self.softcap)  # (B, H, nb, bq, block)
        real_key = torch.arange(nb * self.block, device=q.device).reshape(nb, 1, self.block) < nk
        s = s.masked_fill(~real_key, float("-inf"))
        lse_b = s.logsumexp(-1)
        out_b = ((s - lse_b[..., None]).exp() @ vb).reshape(B, H, nb * bq, D)[:, :, :nq]
        lse_b = lse_b.reshape(B, H, nb * bq)[:, :, :nq]
        # the residual: uniform samples of the sorted keys, those in the query's own block hidden
        m = self.samples
        idx = torch.randint(nk, (B, H, m), generator=self.gen).to(q.device)
        kss = ks.gather(2, idx[..., None].expand(-1, -1, -1, D))
        vss = vs.gather(2, idx[..., None].expand(-1, -1, -1, D))
        own = (torch.arange(nq, device=q.device)[:, None] // bq) == (idx // self.block)[:, :, None, :]  # (B,H,nq,m)
        r = logits(qs, kss, scale, self.softcap).masked_fill(own, float("-inf"))
        lse_r = r.logsumexp(-1)
        out_r = (r - lse_r[..., None]).exp().nan_to_num(0.0) @ vss
        lse_r = lse_r + math.log(nk / m)
        out, lse = merge(out_b, lse_b, out_r, lse_r)
        inv = q_ord.argsort(-1)
        out = out.gather(2, inv[..., None].expand(-1, -1, -1, D))
        lse = lse.gather(2, inv)
        in_block = (torch.arange(nb * bq, device=q.device)[:nq] // bq)  # sorted query rank → block
        sizes = (nk - in_block * self.block).clamp(max=self.block).float()  # real keys in its block
        self.plan.pairs = self.plan.pairs + sizes.sum() + (~own).sum((-1, -2)).float()
        self.plan.pieces.append(Piece(q0, k0, q_ord, k_ord, self.block, idx))
        return out, lse


def planned_pairs(length: int, block: int, leaf: int) -> float:
    """Pairs one query head is expected to compute at these sizes (a sample falls in the query's
    own block, and is skipped, with probability about block / n_keys)."""

    @functools.lru_cache(maxsize=None)
    def causal(n: int) -> float:
        if n <= leaf:
            return n * (n + 1) / 2
        h = n // 2
        return causal(h) + causal(n - h) + noncausal(n - h, h)

    def noncausal(nq: int, nk: int) -> float:
        if nq < leaf or nk <= block:
            return nq * nk
        return nq * (block + block * (1 - block / nk))

    return causal(length)


class HyperAttention(DensityStats, Stage):
    name = "hyperattention"
    family = "sparse_attention"
    paper = ("Han et al., HyperAttention: Long-context Attention in Near-Linear Time, ICLR 2024 "
             "(arXiv:2310.05869)")
    summary = "sortLSH block-diagonal exact attention + sampled columns, causal by recursive halving"
    # reference: LSH sort, pieces and the causal recursion are Python over PyTorch calls, not upstream's Triton kernels
    reference_latency = True
    tolerance = 0.05
    stages = ("prefill_attention",)
    # every computed logit is softcapped; the sinks join the total log-sum-exp of the merged parts; a chunked
    # layer stays dense within its chunks
    attention_terms = frozenset({"softcap", "sinks", "chunk"})
    params = (
        Param("lsh_bits", int, 7, "random projections of the angular LSH (upstream 7)", min=1, max=16),
        Param("leaf_blocks", int, 4, "pieces up to this many blocks are exact causal attention (upstream 4096/256 = 16)", min=1),
        Param("seed", int, 0, "seed of the projections and samples", min=0),
    )

    def sizes(self, length: int) -> tuple[int, int]:
        """(block, leaf) of the densest plan within the target (the smallest block when none is);
        every block size is tried, since the density is not monotone in it (a piece turns exact
        once it fits a leaf)."""
        cached = getattr(self, "_sizes", {}).get(length)
        if cached is not None:
            return cached
        total = length * (length + 1) / 2
        factor = self.args["leaf_blocks"]
        best, best_density = 1, -1.0
        for block in range(1, length + 1):
            density = planned_pairs(length, block, factor * block) / total
            if best_density < density <= self.target_density():
                best, best_density = block, density
        self._sizes = {**getattr(self, "_sizes", {}), length: (best, factor * best)}  # every layer asks
        return best, factor * best

    def target_density(self) -> float:
        return 1.0 - self.ratio

    def run(self, query, key, value, scaling, layer_idx, softcap: float | None = None,
            sinks: torch.Tensor | None = None) -> tuple[torch.Tensor, Plan]:
        """Output (B, L, Hq, D) and what was computed. ``sinks`` (Hq,): each query head's learned sink
        logit joins the softmax, i.e. the output is rescaled by ``Z / (Z + e^s) = sigmoid(lse − s)``."""
        B, Hq, L, D = query.shape
        g = Hq // key.shape[1]
        block, leaf = self.sizes(L)
        gen = torch.Generator().manual_seed(self.args["seed"] * 100003 + layer_idx)
        hyper = HyperAttentionRun(block, leaf, self.args["lsh_bits"], gen, D, softcap)
        k = key.float().repeat_interleave(g, 1)
        v = value.float().repeat_interleave(g, 1)
        out, lse = hyper.causal(query.float(), k, v, scaling)
        if sinks is not None:
            out = out * torch.sigmoid(lse - sinks.float().reshape(1, Hq, 1))[..., None]
        return out.to(query.dtype).transpose(1, 2).contiguous(), hyper.plan

    def prefill_attention(self, module, query, key, value, mask, scaling, layer_idx, window=None,
                          softcap=None, sinks=None, chunk=None):
        L = key.shape[2]
        if query.shape[2] != L:  # a question part on an existing cache: dense, not counted
            return None
        heads = query.shape[0] * query.shape[1]
        if chunk is not None and chunk < L:  # a chunked layer: dense within its chunks, counted so
            total = heads * chunk_pairs(L, chunk)
            self._count(total, total)
            return None
        total = heads * L * (L + 1) / 2
        if self.ratio <= 0 or mask is not None or (window is not None and window < L):
            self._count(total, total)
            return None
        out, plan = self.run(query, key, value, scaling, layer_idx, softcap, sinks)
        pairs = plan.pairs
        computed = float(pairs.sum()) if torch.is_tensor(pairs) else float(pairs) * heads
        self._count(min(computed, total), total)
        return out
