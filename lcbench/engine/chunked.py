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

**Compress as you go** (``--prefill-chunk N --compress-chunks``, issue #15; Finch's sequential
chunk processing, Corallo & Papotti, TACL 2024): *every* chunk is a compressing pass, so the cache
never holds the whole context — after chunk ``i`` (context tokens ``0..b_i`` seen so far) the cache
stage keeps what a one-pass prefill of those tokens would, ``keep_count(b_i, ratio)`` per layer and
KV head (with ``--budget B``: at most ``B``; with a protected question: counted over both), and the next chunk attends to those plus itself. The last chunk compresses to exactly the
count a one-pass prefill keeps, so the achieved ratio is the requested one; what is kept can differ
(an early chunk cannot know a later token's competition), except for rules that never revisit a
choice (StreamingLLM's sinks and recent window keep the same positions: tests/test_compress_chunks.py);
and the keys and values of a later chunk are not a one-pass prefill's, since its hidden states
attended only the tokens kept so far — that is the computation compressing as you go performs.
In query-aware mode the question is the observation window of every chunk, as in Finch: each
intermediate pass is ``chunk + question`` (the question right after the chunk), compressed with the
question protected, and the question's KV is then cropped off; the last pass holds the question at
its true positions and keeps it. The peak cache is ``kept + chunk (+ question)`` tokens per layer.
Only chains with one token-keeping cache stage can do this (a quantizer or channel pruner has no
per-chunk token count; two dropping stages would compound); stages that need every query of the
pass or the attention every key received see each pass's own (each pass is a prefill of its own).
Each sample is prefilled alone (samples are not batched into one prefill).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from ..errors import UserError
from ..methods.base import Needs, Stage, keep_count
from ..methods.budget import takes_budget


def prefill_spans(length: int, chunk: int | None, window: int = 0) -> list[tuple[int, int]]:
    """``[start, stop)`` spans covering ``length`` tokens in chunks of ``chunk`` (one span when
    ``chunk`` is None or 0); a last span shorter than ``window`` is merged into the previous one."""
    if not chunk or chunk >= length:
        return [(0, length)]
    spans = [(a, min(a + chunk, length)) for a in range(0, length, chunk)]
    if len(spans) > 1 and spans[-1][1] - spans[-1][0] < window:
        spans[-2:] = [(spans[-2][0], length)]
    return spans


def check_chunkable(stages: list[Stage], needs: Needs, chunk: int | None, every_chunk: bool = False) -> None:
    """Raise a UserError when ``--prefill-chunk`` (with ``every_chunk``: ``--compress-chunks``)
    cannot give these stages what they need."""
    if every_chunk and not chunk:
        raise UserError("--compress-chunks compresses after every prefill chunk, but no --prefill-chunk was given. "
                        "Fix: add --prefill-chunk N (e.g. 512), or drop --compress-chunks.")
    if not chunk:
        return
    if chunk < 1:
        raise UserError(f"--prefill-chunk {chunk}: must be a positive number of tokens (or 0 for no chunking).")
    if every_chunk:
        check_compress_as_you_go(stages, needs, chunk)
    for stage in stages:
        why = None
        if "context_inputs" in stage.stages:
            why = "it prefills the context as embeddings of its own"
        elif "prefill_attention" in stage.stages:
            why = "its sparse attention pattern is built for one whole prefill pass"
        elif "cache" in stage.stages and not every_chunk and (stage.needs.queries or stage.needs.full_attention_sum):
            why = ("it needs every query of the prefill" if stage.needs.queries
                   else "it needs the attention every key received from every query of the prefill")
        if why:
            raise UserError(
                f"--prefill-chunk cannot be used with method '{stage.name}': {why}, while a chunked prefill "
                f"shows the cache stages only the last chunk's queries. Fix: drop --prefill-chunk for this "
                f"method, or use a method that needs only the last window of queries (e.g. snapkv).")


def check_compress_as_you_go(stages: list[Stage], needs: Needs, chunk: int) -> None:
    """Raise a UserError when ``--compress-chunks`` cannot compress these stages chunk by chunk."""
    cache = [s for s in stages if "cache" in s.stages]
    if len(cache) != 1:
        raise UserError(
            f"--compress-chunks runs one token-keeping cache stage after every chunk; this chain has "
            f"{len(cache)} cache stages ({', '.join(s.name for s in cache) or 'none'}). Fix: use one dropping or "
            f"merging method (e.g. snapkv), or drop --compress-chunks.")
    stage = cache[0]
    if not takes_budget(type(stage)):
        raise UserError(
            f"--compress-chunks cannot be used with method '{stage.name}' ({stage.family}): it keeps no whole "
            f"tokens per head, so there is no per-chunk token count to keep. Fix: drop --compress-chunks (a "
            f"chunked prefill still compresses on the last chunk).")
    if needs.window > chunk:
        raise UserError(
            f"--prefill-chunk {chunk} is shorter than the {needs.window}-token observation window of method "
            f"'{stage.name}', which every chunk must hold when it compresses. Fix: --prefill-chunk {needs.window} "
            f"or more.")


@contextmanager
def chunk_target(stage: Stage, seen_tokens: int, protected: int) -> Iterator[None]:
    """While one chunk's pass compresses: ``stage`` keeps ``keep_count(seen_tokens + protected, ratio)``
    tokens per layer and KV head, the ``protected`` question among them (what a one-pass prefill of
    those tokens keeps: :func:`lcbench.methods.dropping.select.context_budget`), or its ``--budget``
    if it has one; its ratio and budget are restored after the pass."""
    ratio, budget = stage.ratio, stage.budget_tokens
    if budget is None:
        total = seen_tokens + protected
        stage.budget_tokens = total if ratio <= 0 else max(protected + 1, keep_count(total, ratio))
    try:
        yield
    finally:
        stage.ratio, stage.budget_tokens = ratio, budget


def compress_as_you_go(forward: Callable, x: torch.Tensor, pos: torch.Tensor, state, chunk: int,
                       window: int = 0) -> torch.Tensor:
    """Prefill one row ``x`` (1, L; its last ``state.protected`` tokens the protected question) chunk
    by chunk, compressing after every chunk (the module docstring); returns the last pass's logits.
    ``forward(ids, positions, state)`` runs one pass of the model through lcbench attention."""
    protected = state.protected
    n = x.shape[1] - protected
    question, question_pos = x[:, n:], pos[:, n:]
    (stage,) = state.cache_stages
    spans = prefill_spans(n, chunk, window)
    logits = None
    for i, (a, b) in enumerate(spans):
        last = i == len(spans) - 1
        if last:
            ids, positions = x[:, a:], pos[:, a:]
        else:  # the question right after the chunk, as in Finch's sequential passes
            ids = torch.cat([x[:, a:b], question], dim=1)
            positions = torch.cat([pos[:, a:b], question_pos - n + b], dim=1)
        with chunk_target(stage, b, protected):
            logits = forward(ids, positions, state)
        if not last and protected:  # forget the question's KV: the next chunk follows the context
            state.cache.crop_to([layer.seq_len() - protected for layer in state.cache.layers])
    return logits
