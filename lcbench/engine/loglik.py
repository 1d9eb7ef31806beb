"""The log-likelihood path: a document's continuation teacher-forced on the compressed cache of
its prefix, each token's negative log-likelihood recorded (issue #17; the ``perplexity`` task).

Built from the engine's own steps (:mod:`.runner`), so a method meets a document exactly as it
meets a sample in generation:

1. ``Engine.prepare`` — reset the stages, run the text stage on the *prefix* (the sample's context
   part; prompt compression rewrites it), render it (``chat=False``: plain text, the tokenizer's
   own special tokens);
2. ``Engine.prefill`` — prefill the prefix; cache stages compress each layer as it finishes, sparse
   prefill stages replace its attention, ``context_inputs`` stages feed it as embeddings; a shared
   prefill (``--share-prefill``) is used as in generation;
3. ``Engine.measure`` / ``Engine.check`` — KV bytes and the achieved ratio of the compressed prefix;
4. the continuation (the sample's one turn, its question part) is fed at true positions after the
   prefix, through :func:`.decode.forward` with a :class:`ForwardState`:

   - chains without a decode stage: ``chunk`` tokens per pass in the question phase (what a
     question part gets: cache stages leave the appended tokens alone, sparse prefill stages act
     on each chunk's queries), every position's logits kept;
   - chains with a decode stage (StreamingLLM's rolling window, H2O's and TOVA's decode eviction,
     Quest's page selection): one token per pass in the *decode* phase, so their
     ``decode_attention`` / ``after_decode_step`` hooks run after every token exactly as in
     generation (with ``evict_generated`` — their default — the fed tokens are evicted too, so the
     cache stays at its prefilled size, as in StreamingLLM's ``examples/eval_long_ppl.py``,
     mit-han-lab/streaming-llm@2e50426, where each token is fed alone and the start+recent cache is
     trimmed after every step).

Which tokens are scored: continuation token ``j ≥ 1`` is predicted from the logits of the pass that
fed token ``j − 1`` — so every scored prediction comes from a query that attended the compressed
cache. The first continuation token is fed but not scored (the prefill's own last logits predate
the compression of the later layers' cache and are never used). ``full`` therefore scores exactly
what ``model(ids).logits`` scores on positions ``P+1 … N−1`` of the same ids (tested).

Positions: each scored token carries its *document* position (the uncompressed prefix length plus
its index), which the task buckets; the model is fed true positions after the prefix it actually
holds (shorter after a text stage), as the engine does for question parts.

Refused (a :class:`~lcbench.errors.UserError`, exit 2): query-aware mode (there is no question to
protect) and ``--batch-size N|auto`` (documents are scored one at a time).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from ..errors import UserError
from ..results.record import MEASURED_FIELDS, Measured, TurnRecord
from ..tasks.sample import Sample
from .decode import forward
from .runner import Engine, Prefilled, Prepared
from .state import DECODE, QUESTION

DEFAULT_CHUNK = 512

# what a loglik task hands this path: its scorer over (sample, document positions, per-token NLL)
TokenScorer = Callable[[Sample, Sequence[int], Sequence[float]], dict]


@dataclass
class Loglik:
    """One document scored: the NLL (nats) of each scored token and its document position, how it
    was fed, what the compressed prefix held, and the cache's size while the continuation ran."""

    positions: list[int]
    nll: list[float]
    prepared: Prepared
    prefilled: Prefilled
    measured: dict
    stats: dict
    fed: int  # continuation tokens fed (all but the last; each predicts the next)
    per_token: bool  # fed one at a time in the decode phase (a decode-stage chain)
    score_s: float  # time of the teacher-forced continuation
    kv_bytes_end: int = 0
    kept_tokens_end: float = 0.0
    max_kept_tokens: float = 0.0  # the most the cache held (mean over layers and KV heads) after any pass
    kept_trace: list[float] = field(default_factory=list)  # kept tokens after each pass

    @property
    def nll_sum(self) -> float:
        return float(sum(self.nll))

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / len(self.nll)) if self.nll else float("nan")


def loglik_refusal(engine: Engine, batch_size: int | str = "turns") -> str | None:
    """Why this engine's run cannot be scored by log-likelihood (None when it can)."""
    if engine.config.query_aware:
        return ("query-aware mode compresses the context together with a question, and a perplexity "
                "document has none. Fix: drop --query-aware (the prefix is compressed on its own).")
    if batch_size not in (1, "turns"):
        return (f"--batch-size {batch_size}: perplexity scores one document at a time (its continuation is "
                f"teacher-forced on that document's own compressed cache). Fix: drop --batch-size.")
    return None


def per_token(engine: Engine) -> bool:
    """Whether the chain must be fed one token per pass (it has a decode stage)."""
    return any("decode" in stage.stages for stage in engine.chain.stages)


def score_document(engine: Engine, sample: Sample, chunk: int = DEFAULT_CHUNK) -> Loglik:
    """Prefill (and compress) ``sample``'s context part, then teacher-force its one turn's question
    part and return each scored token's NLL (see the module docstring)."""
    if len(sample.turns) != 1:
        raise UserError(f"sample {sample.id}: a log-likelihood sample has exactly one turn (its continuation), "
                        f"not {len(sample.turns)}. Fix: the task must yield one turn per document.")
    if chunk < 1:
        raise UserError(f"chunk={chunk}: the continuation is fed in chunks of at least 1 token. Fix: e.g. chunk=512.")
    p = engine.prepare(sample)
    context = list(p.prompt.context_ids)
    prefilled = engine.prefill([context])
    measured = engine.measure(prefilled.cache, p.context_tokens_original, len(context)) \
        if _measure_takes_prefilled(engine) else engine.measure(prefilled.cache, p.context_tokens_original)
    measured.setdefault("requested_ratio", engine.chain.requested_ratio)
    stats = engine.stage_stats(prefilled.row_stages[0], dict(p.stats))
    engine.check(measured, stats)

    ids = list(p.prompt.turn_ids[0])
    if len(ids) < 2:
        raise UserError(f"sample {sample.id}: its continuation has {len(ids)} token(s); at least 2 are needed (the "
                        f"first is fed, the rest scored). Fix: a longer document or a shorter prefix.")
    cache = prefilled.cache
    state = engine.forward_state(cache)
    stepwise = per_token(engine)
    state.phase = DECODE if stepwise else QUESTION
    step = 1 if stepwise else chunk
    device = engine.device
    feed = torch.tensor([ids[:-1]], dtype=torch.long, device=device)
    targets = torch.tensor(ids[1:], dtype=torch.long, device=device)
    start = len(context)  # true position of the first continuation token in the cache's numbering
    nll: list[torch.Tensor] = []
    trace: list[float] = []
    t0 = engine.clock.now()
    with torch.inference_mode():
        for a in range(0, feed.shape[1], step):
            x = feed[:, a:a + step]
            pos = torch.arange(start + a, start + a + x.shape[1], device=device)[None]
            if stepwise:
                logits = forward(engine.model, x, pos, state)[:, None, :]
            else:
                logits = forward(engine.model, x, pos, state, all_logits=True)
            logp = torch.log_softmax(logits[0].float(), dim=-1)  # (q, V)
            want = targets[a:a + x.shape[1]].to(logp.device)
            nll.append(-logp.gather(-1, want[:, None])[:, 0].double().cpu())
            trace.append(cache.kept_tokens())
    score_s = engine.clock.now() - t0
    engine.memory.sample()
    doc_start = p.context_tokens_original  # document position of continuation token 0
    values = torch.cat(nll).tolist()
    return Loglik(positions=[doc_start + j for j in range(1, len(ids))], nll=values, prepared=p,
                  prefilled=prefilled, measured=measured, stats=engine.stage_stats(prefilled.row_stages[0], stats),
                  fed=len(ids) - 1, per_token=stepwise, score_s=score_s, kv_bytes_end=int(cache.nbytes()),
                  kept_tokens_end=float(cache.kept_tokens()), max_kept_tokens=max(trace, default=0.0),
                  kept_trace=trace)


def _measure_takes_prefilled(engine: Engine) -> bool:
    """``Engine.measure`` takes the prefilled token count where ``--budget`` exists."""
    import inspect

    return "prefilled_tokens" in inspect.signature(engine.measure).parameters


def record(engine: Engine, result: Loglik, scores: dict) -> TurnRecord:
    """The document's record: what the engine measured (the compressed prefix's bytes and ratio,
    the continuation's time as ``decode_s`` over ``decode_tokens`` fed tokens, the cache at the
    end), the stages' stats, and the task's scores."""
    p, pre = result.prepared, result.prefilled
    m = Measured(
        input_tokens=len(p.prompt.context_ids) + len(p.prompt.turn_ids[0]),
        context_tokens_original=p.context_tokens_original, context_tokens=len(p.prompt.context_ids),
        **result.measured, text_s=p.text_s, text_peak_memory_mb=p.text_peak_memory_mb,
        prefill_s=pre.prefill_s, compress_s=pre.compress_s, question_prefill_s=0.0,
        ttft_s=p.text_s + pre.prefill_s + pre.compress_s, decode_tokens=result.fed, decode_s=result.score_s,
        decode_tok_s=result.fed / result.score_s if result.score_s > 0 else None,
        **_end_fields(result), batch_rows=1, batch_samples=1,
        peak_memory_mb=max((v for v in (engine.memory.peak_mb(), pre.peak_memory_mb) if v is not None), default=None),
        memory_kind=engine.memory.kind, shared_prefill=pre.shared or None)
    sample = p.sample
    return TurnRecord(sample_id=sample.id, turn=0, prediction="", answers=[], meta=sample.meta,
                      stopped_by="teacher_forced_per_token" if result.per_token else "teacher_forced",
                      decoded_ids=[], measured=m, method_stats=dict(result.stats), scores=dict(scores))


def _end_fields(result: Loglik) -> dict:
    """The cache after the last scored token, in the record fields long generation added (issue #17)."""
    end = {"kv_bytes_end": result.kv_bytes_end, "kept_tokens_end": result.kept_tokens_end}
    return {k: v for k, v in end.items() if k in MEASURED_FIELDS}


def produce(engine: Engine, samples: list[Sample], done: dict[str, set[int]], score: TokenScorer,
            chunk: int = DEFAULT_CHUNK, batch_size: int | str = "turns") -> Iterator[tuple[int, list[TurnRecord]]]:
    """``(samples finished, records)`` for the documents the store lacks, each scored by ``score``
    (the task's ``score_tokens``): one record per document, its scores already in it."""
    why = loglik_refusal(engine, batch_size)
    if why is not None:
        raise UserError(why)
    for i, sample in enumerate(samples):
        if 0 in done.get(sample.id, set()):
            yield i + 1, []
            continue
        result = score_document(engine, sample, chunk)
        yield i + 1, [record(engine, result, score(sample, result.positions, result.nll))]
