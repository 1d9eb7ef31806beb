"""The cache at the end of a row's decoding (issue #17: long generation).

A row's ``kv_bytes_end`` / ``kept_tokens_end`` are read from the tensors held at the step its
decoding ended (before it leaves the batch): with ``full`` they grow with every generated token;
with a method that evicts generated tokens they stay at the size decoding began with. One row
decoding alone is measured exactly (:meth:`KVCache.nbytes`). When several rows decode together
each row is given the batch's bytes divided by its rows, except that a context the rows share
without copies (:class:`~lcbench.cache.shared.SharedContextLayer`) counts in full for every row,
as each row's ``kv_bytes`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..cache.shared import SharedContextLayer
from .joint import JointLayer


@dataclass(frozen=True)
class EndCache:
    kv_bytes: int  # bytes of this row's keys and values (all layers)
    kept_tokens: float  # valid slots held, mean over layers and KV heads


def row_end_cache(cache, row: int, rows: int) -> EndCache:
    """What batch row ``row`` of ``rows`` holds in ``cache`` now. In a joint batch of several runs
    (:class:`~lcbench.engine.joint.JointLayer`), each layer's share is read from the row's own
    run's layer, with that run's rows, exactly as when the run decodes alone."""
    if rows == 1:
        return EndCache(int(cache.nbytes()), float(cache.kept_tokens()))
    total, kept = 0.0, []
    for layer in cache.token_layers():
        own, n = (row, rows)
        if isinstance(layer, JointLayer):
            layer, own, n = layer.part_of(row)
        if n == 1:
            total += layer.nbytes()
            kept.append(float(layer.kept_tokens().float().mean()))
        elif isinstance(layer, SharedContextLayer):
            context = layer.context.nbytes()
            total += context + (layer.nbytes() - context) / n
            kept.append(float(layer.kept_tokens()[own].float().mean()))
        else:
            total += layer.nbytes() / n
            kept.append(float(layer.kept_tokens()[own].float().mean()))
    return EndCache(int(total), sum(kept) / len(kept) if kept else 0.0)
