"""Chunked prefill (``--prefill-chunk N``): the context enters the model ``N`` tokens at a time.

Why: a prefill's transient memory (MLP activations, attention masks and scores, the
observations a cache stage asks for) grows with the number of tokens in one forward pass;
chunks bound it by ``N`` while every token still sees every earlier one (the cache of the earlier
chunks, at true positions; the mask is causal bottom-right, see
:func:`lcbench.engine.attention.storage_mask`), so the model computes the same thing.

The rule for compression: **the last chunk is the compressing pass.** Earlier chunks only fill
the cache; after the last chunk's attention in each layer, the cache stages see that layer's
whole cache (every context token) and the observations of the last chunk's queries. So a stage
that needs the attention (or the query states) of the last ``w`` queries — SnapKV, PyramidKV,
AdaKV, TOVA, ChunkKV, Expected Attention's window, or stages that read only the keys and values
(K-norm, quantization, StreamingLLM, random) — compresses exactly as without chunks, provided the
last chunk holds at least ``w`` tokens: the spans are cut from the start every ``N`` tokens and a
last span shorter than the window is merged into the one before it.

Refused (a :class:`~lcbench.errors.UserError` names the stage): stages that need *every* query of
the prefill (``Needs.queries``: Q-Filters, Compactor, the kvpress bridge) or the attention every
key received from every query (``Needs.full_attention_sum``: H2O), sparse-attention prefill stages
(their block patterns are built for one whole pass) and ``context_inputs`` stages (soft
compression prefills embeddings of its own). What a chunked prefill does *not* lower: the KV of
all layers is held in full until the last chunk compresses it, so chunks trade a smaller
activation peak for the per-layer compression's cache peak (see ``benchmarks/memory.py``).
"""

from __future__ import annotations

from ..errors import UserError
from ..methods.base import Needs, Stage


def prefill_spans(length: int, chunk: int | None, window: int = 0) -> list[tuple[int, int]]:
    """``[start, stop)`` spans covering ``length`` tokens in chunks of ``chunk`` (one span when
    ``chunk`` is None or 0); a last span shorter than ``window`` is merged into the previous one."""
    if not chunk or chunk >= length:
        return [(0, length)]
    spans = [(a, min(a + chunk, length)) for a in range(0, length, chunk)]
    if len(spans) > 1 and spans[-1][1] - spans[-1][0] < window:
        spans[-2:] = [(spans[-2][0], length)]
    return spans


def check_chunkable(stages: list[Stage], needs: Needs, chunk: int | None) -> None:
    """Raise a UserError when ``--prefill-chunk`` cannot give these stages what they need."""
    if not chunk:
        return
    if chunk < 1:
        raise UserError(f"--prefill-chunk {chunk}: must be a positive number of tokens (or 0 for no chunking).")
    for stage in stages:
        why = None
        if "context_inputs" in stage.stages:
            why = "it prefills the context as embeddings of its own"
        elif "prefill_attention" in stage.stages:
            why = "its sparse attention pattern is built for one whole prefill pass"
        elif "cache" in stage.stages and (stage.needs.queries or stage.needs.full_attention_sum):
            why = ("it needs every query of the prefill" if stage.needs.queries
                   else "it needs the attention every key received from every query of the prefill")
        if why:
            raise UserError(
                f"--prefill-chunk cannot be used with method '{stage.name}': {why}, while a chunked prefill "
                f"shows the cache stages only the last chunk's queries. Fix: drop --prefill-chunk for this "
                f"method, or use a method that needs only the last window of queries (e.g. snapkv).")
