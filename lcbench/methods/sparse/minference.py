"""MInference: per-head choice among A-shape, vertical-slash and block-sparse, by an offline search.

Jiang et al., "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic Sparse
Attention", NeurIPS 2024 (arXiv:2407.02490); official implementation github.com/microsoft/MInference,
read at commit fb56c917f618e8645f1cfc37535afd7424d78f0d (``minference/modules/minference_forward.py``:
``search_pattern``; the shipped per-model configs in ``minference/configs/``).

The paper's *kernel-aware optimal sparse pattern search* runs once per model, offline, on one
calibration input: for every head it builds each candidate pattern at a comparable compute budget,
measures how much of the head's dense attention the pattern covers (its recall), and keeps the
pattern with the highest recall; inference then uses that pattern type per head, re-estimating its
indices on each input. Here the candidates are lcbench's three patterns (:mod:`.shapes` ``ashape``,
:mod:`.vertical_slash`, :mod:`.block_topk`), each built at the density target ``1 − ratio``; recall is
the dense attention mass of the last ``search_queries`` queries inside the pattern, averaged over
the query heads of each KV head. The search runs on the first context the method prefills (the
calibration input) and is cached per model, layer count, head count, ratio and pattern parameters
under ``$LCBENCH_CACHE/minference/`` (default ``~/.cache/lcbench``); later samples and later runs
reuse the cached choice (delete the file to search again). lcbench deviation: upstream's
calibration input is a fixed synthetic KV-retrieval prompt; here it is the first context of the
first run with that key, so a different first task can give a different choice.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ...params import Param
from .block_topk import BlockTopK
from .kernel import BlockPattern
from .prefill import BLOCK_SIZE, SparsePrefill
from .shapes import AShape
from .vertical_slash import VerticalSlash
from ...paths import lcbench_cache

CANDIDATES = ("ashape", "vertical_slash", "block_topk")


def cache_dir() -> Path:
    return lcbench_cache("minference")


def pattern_rows(pattern: BlockPattern, rows: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, len(rows), L) bool: the pattern's element mask for the query ``rows`` only."""
    L, bs = pattern.length, pattern.block_size
    keys = torch.arange(L, device=rows.device)
    mask = pattern.blocks[:, :, rows // bs][..., keys // bs]
    if pattern.columns is not None and pattern.columns.shape[-1]:
        cols = torch.zeros(mask.shape[:2] + (L,), dtype=torch.bool, device=mask.device)
        cols.scatter_(2, pattern.columns, True)
        mask = mask | cols[:, :, None, :]
    mask = mask & (keys[None, :] <= rows[:, None])
    if pattern.window is not None:
        mask = mask & (keys[None, :] > rows[:, None] - pattern.window)
    return mask


class MInference(SparsePrefill):
    name = "minference"
    family = "sparse_attention"
    paper = ("Jiang et al., MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic "
             "Sparse Attention, NeurIPS 2024 (arXiv:2407.02490)")
    summary = "per KV head the best of ashape / vertical_slash / block_topk by recall, searched once per model (cached)"
    tolerance = 0.05
    cross_sample_state = True  # the first context's search sets the pattern types the others use
    defaults = {"block_size": 64, "sink_tokens": 64, "last_queries": 64, "sink_columns": 30, "local_slashes": 100,
                "slash_per_vertical": 6.096, "search_queries": 256}
    params = (
        BLOCK_SIZE,
        Param("sink_tokens", int, None, "A-shape's attention-sink tokens (needs at least one)", min=1),
        Param("last_queries", int, None, "vertical-slash: last queries that estimate its lines", min=1),
        Param("sink_columns", int, None, "vertical-slash: first key columns always attended", min=0),
        Param("local_slashes", int, None, "vertical-slash: nearest diagonals always attended", min=0),
        Param("slash_per_vertical", float, None, "vertical-slash: slash lines per vertical line", min=0),
        Param("search_queries", int, None, "last queries whose dense attention scores each pattern's recall", min=1),
    )

    def __init__(self, ratio: float = 0.0, **args):
        super().__init__(ratio, **args)
        bs = self.args["block_size"]
        self.candidates = {
            "ashape": AShape(ratio, block_size=bs, sink_tokens=self.args["sink_tokens"]),
            "vertical_slash": VerticalSlash(ratio, block_size=bs, last_queries=self.args["last_queries"],
                                            sink_columns=self.args["sink_columns"],
                                            local_slashes=self.args["local_slashes"],
                                            slash_per_vertical=self.args["slash_per_vertical"]),
            "block_topk": BlockTopK(ratio, block_size=bs),
        }
        self.choices: dict[int, list[str]] = {}  # layer → pattern name per KV head
        self._path: Path | None = None  # the cache file (set by prefill_attention from the model)
        self._layer = 0
        self._module = None

    # --- the search and its cache ------------------------------------------------------------
    def cache_path(self, module, heads: int) -> Path:
        config = getattr(module, "config", None)
        ident = {
            "model": str(getattr(config, "_name_or_path", "") or getattr(config, "model_type", "")),
            "layers": getattr(config, "num_hidden_layers", None), "kv_heads": heads,
            "ratio": round(self.ratio, 6), **{k: v for k, v in sorted(self.args.items())},
        }
        digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
        return cache_dir() / f"{digest}.json"

    def load(self, path: Path) -> None:
        if self._path != path:
            self._path = path
            self.choices = {}
            if path.is_file():
                self.choices = {int(k): v for k, v in json.loads(path.read_text())["choices"].items()}

    def save(self, module) -> None:
        config = getattr(module, "config", None)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"model": str(getattr(config, "_name_or_path", "")), "ratio": self.ratio,
                                   "args": dict(self.args), "choices": self.choices}, indent=1))
        tmp.replace(self._path)

    def recall(self, pattern: BlockPattern, probs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(B, Hkv): mean over ``rows`` of the dense attention mass ``probs`` (B, Hkv, w, L) the
        pattern computes."""
        return (probs * pattern_rows(pattern, rows)).sum(-1).mean(-1)

    def search(self, patterns: dict[str, BlockPattern], query, key, groups, scaling) -> list[str]:
        """The highest-recall candidate per KV head (row 0: the calibration context) among those
        whose density in that head is within the target (plus tolerance): the budget is what the
        candidates share, as upstream compares patterns at comparable FLOPs. When none fits, the
        sparsest."""
        B, Hq, L, D = query.shape
        Hkv = key.shape[1]
        w = min(self.args["search_queries"], L)
        rows = torch.arange(L - w, L, device=key.device)
        q = query[:1, :, L - w:].float().reshape(1, Hkv, groups, w, D)
        scores = torch.einsum("bhgqd,bhkd->bhgqk", q, key[:1].float()) * scaling
        keys = torch.arange(L, device=key.device)
        hidden = keys[None, :] > rows[:, None]
        if self.window is not None:
            hidden = hidden | (keys[None, :] <= rows[:, None] - self.window)
        probs = scores.masked_fill(hidden, float("-inf")).softmax(-1).mean(2)  # (1, Hkv, w, L)
        recalls, densities = [], []
        for p in patterns.values():
            p = BlockPattern(p.blocks[:1], p.block_size, p.length, None if p.columns is None else p.columns[:1], p.window)
            recalls.append(self.recall(p, probs, rows)[0])
            computed, total = p.pair_counts()
            densities.append(computed[0].double() / total)
        recall, density = torch.stack(recalls), torch.stack(densities)  # (candidates, Hkv)
        fits = density <= self.target_density() + self.tolerance
        score = torch.where(fits, recall.double(), -density - 1.0)  # no fit: the sparsest wins
        names = list(patterns)
        return [names[i] for i in score.argmax(0).tolist()]

    # --- the pattern -------------------------------------------------------------------------
    def prefill_attention(self, module, query, key, value, mask, scaling, layer_idx, window=None, **terms):
        self.load(self.cache_path(module, key.shape[1]))
        self._layer = layer_idx
        self._module = module
        return super().prefill_attention(module, query, key, value, mask, scaling, layer_idx, window, **terms)

    def pattern(self, query, key, groups, scaling):
        for c in self.candidates.values():
            c.window = self.window
        needed = set(self.choices.get(self._layer, CANDIDATES))
        patterns = {n: c.pattern(query, key, groups, scaling) for n, c in self.candidates.items() if n in needed}
        if self._layer not in self.choices:
            self.choices[self._layer] = self.search(patterns, query, key, groups, scaling)
            if self._path is not None:
                self.save(self._module)
        return combine(patterns, self.choices[self._layer])


def combine(patterns: dict[str, BlockPattern], choice: list[str]) -> BlockPattern:
    """One pattern whose KV head h is ``patterns[choice[h]]``'s head h. Heads without vertical
    columns get column 0 repeated: its block (a sink block, or block-top-k's forced first block)
    is always computed, so the column adds nothing and is counted nowhere."""
    first = next(iter(patterns.values()))
    B, Hkv, nb, _ = first.blocks.shape
    blocks = torch.stack([patterns[choice[h]].blocks[:, h] for h in range(Hkv)], dim=1)
    columns = None
    vs = patterns.get("vertical_slash")
    if vs is not None and vs.columns is not None and "vertical_slash" in choice:
        columns = torch.zeros_like(vs.columns)
        for h, name in enumerate(choice):
            if name == "vertical_slash":
                columns[:, h] = vs.columns[:, h]
    return BlockPattern(blocks, first.block_size, first.length, columns, window=first.window)
