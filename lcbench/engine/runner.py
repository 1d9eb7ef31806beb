"""The engine: one pipeline over a group of rows (DESIGN.md "The data flow of one run").

Its steps are public and every mode runs through them:

``prepare``  reset the stages, run the text stage, render the prompt (:class:`Prepared`);
``prefill``  prefill one or several contexts (left-padded rows); cache stages compress each layer
             as it finishes — a one-row prefill uses the chain's own stages, a several-row one each
             sample's own copies, so every row is compressed exactly as if alone;
``measure``  KV bytes, kept tokens and the achieved ratio of one row's compressed context;
``check``    fail the run when that misses the requested ratio beyond tolerance;
``decode``   prefill question parts (left-padded rows) and decode greedily, finished rows leaving;
``record``   one :class:`~lcbench.results.record.TurnRecord` per turn.

:meth:`Engine.run_group` is the multi-request pipeline for a group of one sample (its turns decoded
together, sharing the compressed context: :mod:`lcbench.cache.shared`) or of several samples
(``--batch-size N|auto``, grouped by :mod:`.batching`); query-aware mode runs each turn as a group
of one row whose protected tail is the question; multi-turn mode decodes the turns in order on one
cache with gold history.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..cache import KVCache
from ..cache.model_caches import cache_for
from ..errors import CompressionShortfall, UserError
from ..methods.base import Needs, TextInput
from ..methods.chain import Chain
from ..models.hook import arch_name, geometry as geometry_of
from ..results.record import Measured, TurnRecord
from ..tasks.sample import Sample, Turn
from .attach import attached, attention_refusal, hybrid_refusal, latent_refusal, use_lcbench_attention
from .calibration import calibrate_stages
from .chunked import check_chunkable, compress_as_you_go, prefill_spans
from .decode import RowOutput, forward, greedy_decode
from .per_row import PerRowCompression, fresh_copies
from .prompt import RenderedPrompt, render
from .row_stack import row_layers, take_rows
from .shared_prefill import PrefillMemo, Recorded, Recorder, compress_recorded
from .state import DECODE, PREFILL, QUESTION, ForwardState
from .timing import MemoryMeter, Stopwatch, input_device, model_devices


@dataclass(frozen=True)
class EngineConfig:
    """How the engine executes (derived from the RunSpec by :func:`lcbench.evaluate.engine_config`):
    ``decode_rows`` turns decoded together (None: every pending turn of the group at once)."""

    query_aware: bool = False
    decode_rows: int | None = None
    check_ratio: bool = True
    prefill_chunk: int | None = None  # prefill the context this many tokens at a time (see engine/chunked.py)
    compress_chunks: bool = False  # compress after every chunk, not only the last (engine/chunked.py)


@dataclass
class Prepared:
    """A sample after its text stage and rendering: the prompt, the context's token counts before
    and after the text stage, what the text stage cost and measured, and the turns still to run."""

    sample: Sample
    prompt: RenderedPrompt
    original: RenderedPrompt
    todo: list[int]
    text_s: float = 0.0
    text_peak_memory_mb: float | None = None
    stats: dict[str, float] = field(default_factory=dict)  # what its text stages measured

    @property
    def context_tokens_original(self) -> int:
        return len(self.original.context_ids)


@dataclass
class Prefilled:
    """A prefilled (and compressed) group of contexts: the cache (one row per context), the pass's
    times, its last logits, and the stages that compressed each row (their ``sample_stats``)."""

    cache: KVCache
    prefill_s: float
    compress_s: float
    logits: torch.Tensor | None
    row_stages: list[list]
    shared: bool = False  # made once for several runs (engine/shared_prefill.py)
    peak_memory_mb: float | None = None  # the shared pass's peak, when it ran before this run's meter reset


@dataclass
class Decoded:
    outputs: list[RowOutput]
    question_prefill_s: float
    decode_s: float


@dataclass
class Pending:
    """One run's sample with its context compressed (:meth:`Engine.ask`): the cache its turns
    decode from, then (once their question parts are prefilled) ``asked``; what
    :meth:`Engine.answer` needs."""

    engine: "Engine"
    prepared: Prepared
    prefilled: Prefilled
    measured: dict[str, float]
    stats: dict[str, float]
    cache: KVCache
    asked: "Asked | None" = None

    def question_rows(self) -> list[list[int]]:
        """The question part of each pending turn, in decode-row order."""
        return [self.prepared.prompt.turn_ids[k] for k in self.prepared.todo]


@dataclass
class Asked:
    """Question parts prefilled on a compressed context: where greedy decoding starts."""

    state: ForwardState
    logits: torch.Tensor
    next_positions: torch.Tensor
    question_prefill_s: float


def kv_bytes_per_token(model) -> int:
    """Bytes one token's keys+values take in a dense cache of this model (all layers): as probed
    when lcbench attention was switched on (layers may differ: Gemma-4), else from the config."""
    geometry = getattr(model, "lcbench_geometry", None)
    if geometry is not None:
        return sum(geometry.bytes_per_token)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elem = torch.finfo(model.dtype).bits // 8
    return 2 * cfg.num_hidden_layers * heads * head_dim * elem


def dense_kv_bytes(model, tokens: int, bytes_per_token: int) -> int:
    """Bytes of the uncompressed cache after ``tokens`` context tokens: per layer as probed when
    lcbench attention was switched on (a sliding-window layer holds only the ``window - 1`` tokens
    it can still see: :class:`lcbench.models.hook.Geometry`), else ``tokens × bytes_per_token``."""
    geometry = getattr(model, "lcbench_geometry", None)
    return geometry.dense_bytes(tokens) if geometry is not None else tokens * bytes_per_token


def eos_token_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for source in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        if source is None:
            continue
        ids.update(source if isinstance(source, (list, tuple)) else [source])
    return ids


class Engine:
    """Runs samples for one (model, method chain) pair. The model computes attention through
    lcbench's attention function: a model not switched yet is switched (dense attention by sdpa)
    and probed here (:func:`lcbench.engine.attach.use_lcbench_attention`)."""

    def __init__(self, model, tokenizer, chain: Chain, config: EngineConfig | None = None):
        if not attached(model):
            use_lcbench_attention(model)
        self.model = model
        self.tokenizer = tokenizer
        self.chain = chain
        self.config = config or EngineConfig()
        self.device = input_device(model)  # where inputs go (the first device of a device_map)
        self.devices = model_devices(model)  # timing synchronizes, and memory is measured on, all of them
        self.clock = Stopwatch(self.devices)
        self.memory = MemoryMeter(self.devices)
        self.warmed_up = False
        self.eos = eos_token_ids(model, tokenizer)
        self.num_layers = (model.config.get_text_config() if hasattr(model.config, "get_text_config")
                           else model.config).num_hidden_layers
        self.bytes_per_token = kv_bytes_per_token(model)
        self.prefill_memo: PrefillMemo | None = None  # set when several runs share prefills (evaluate.py)
        check_chunkable(chain.stages, chain.needs, self.config.prefill_chunk, self.config.compress_chunks)
        asks = [s.name for s in chain.stages if s.needs_question and (s.ratio > 0 or s.budget_tokens is not None)]
        if asks and not self.config.query_aware:
            raise UserError(f"method '{asks[0]}' scores the context by the question's attention, but without "
                            f"--query-aware the question is not part of the prefill. Fix: add --query-aware.")
        refusal = (attention_refusal(model, chain.stages) or latent_refusal(model, chain.stages)
                   or hybrid_refusal(model, chain.stages))
        if refusal:
            raise UserError(refusal + ".")
        # per-model offline work of the stages, cached on disk (engine/calibration.py); spec.json records it
        self.calibrations = calibrate_stages(model, tokenizer, chain.stages, self.clock)
        # turns may share the compressed context (no copy per turn) unless a stage acts on each
        # row's cache after compression: decode stages (eviction, sparse decode) and sparse
        # prefill attention (it runs on the question parts too); and never on a latent cache (MLA),
        # where the model expands every row's cache into keys and values before attention reads them
        measured = geometry_of(model)
        self.latent = bool(measured and measured.latent)
        self.shares_context = not self.latent and not any({"decode", "prefill_attention"} & set(s.stages)
                                                          for s in chain.stages)
        # a hybrid's recurrent layers would take padding into their state (cache/recurrent.py): one
        # unpadded row per forward (samples prefilled alone, turns decoded one at a time)
        self.one_row = bool(measured and measured.stateful)
        if self.one_row and self.config.compress_chunks and self.config.query_aware:
            raise UserError(f"--compress-chunks with --query-aware prefills the question after every chunk and then "
                            f"forgets it, but {arch_name(model)} keeps a recurrent state in its linear-attention "
                            f"layers, which cannot forget tokens. Fix: drop --query-aware or --compress-chunks.")

    def warm_up(self, tokens: int = 16) -> None:
        """One untimed pass before the first timed sample, so sample 1's TTFT is not device
        start-up (CUDA context, kernel selection, allocator growth): a ``tokens``-token prefill and
        one decode step through the engine's own forward path (lcbench attention, an lcbench
        cache), on a throwaway cache with no stage taking part — the stages are untouched and
        every sample resets them anyway (:meth:`prepare`)."""
        self.warmed_up = True
        cache = cache_for(self.model, self.num_layers)
        state = ForwardState(cache=cache, stages=[], needs=self.chain.needs, timer=self.clock)
        state.phase = PREFILL
        text = "The quick brown fox jumps over the lazy dog. " * max(1, tokens // 8)
        ids = (self.tokenizer(text, add_special_tokens=False)["input_ids"] or [0])[:tokens]
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        pos = torch.arange(len(ids), device=self.device)[None]
        with torch.inference_mode():
            logits = forward(self.model, x, pos, state)
            state.phase = DECODE
            forward(self.model, logits.argmax(-1)[:, None].to(self.device), pos[:, -1:] + 1, state)
        del cache, state
        self.clock.now()  # wait for the device before anything is timed

    def forward_state(self, cache: KVCache, stages: list | None = None, needs: Needs | None = None) -> ForwardState:
        """The state one forward pass shares with lcbench attention (the chain's stages and needs by default)."""
        return ForwardState(cache=cache, stages=self.chain.stages if stages is None else stages,
                            needs=self.chain.needs if needs is None else needs, timer=self.clock)

    def left_pad(self, rows: Sequence[Sequence[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of token ids left-padded into (B, q) ids and their validity, on the input device."""
        q = max(len(r) for r in rows)
        ids = torch.full((len(rows), q), pad, dtype=torch.long)
        valid = torch.zeros((len(rows), q), dtype=torch.bool)
        for i, r in enumerate(rows):
            if r:
                ids[i, q - len(r):] = torch.tensor(list(r))
                valid[i, q - len(r):] = True
        return ids.to(self.device), valid.to(self.device)

    # --- step 1: prepare --------------------------------------------------------------------
    def prepare(self, sample: Sample, multi_turn: bool = False, skip_turns: Sequence[int] = ()) -> Prepared:
        """The per-sample work before prefill: reset the stages, run the text stage, render."""
        if not self.warmed_up:
            self.warm_up()
        for stage in self.chain.stages:
            stage.begin_sample()
        self.memory.reset()
        cfg = self.config
        text_times: dict[str, float] = {}
        original = render(self.tokenizer, sample, sample.context, multi_turn)
        text_in = TextInput(sample.context, [t.question for t in sample.turns] if cfg.query_aware else [],
                            self.tokenizer, cfg.query_aware, model=self.model,
                            fixed_tokens=self._fixed_tokens(sample, original) if self.chain.has("text") else 0)
        with self.clock.region(text_times, "text_s"):
            for stage in self.chain.stages:
                if "text" in stage.stages:
                    text_in = stage.compress_text(text_in)
        prompt = original if text_in.context == sample.context else render(self.tokenizer, sample, text_in.context, multi_turn)
        stats: dict[str, float] = {}
        for stage in self.chain.stages:
            if "text" in stage.stages:
                stats.update(stage.sample_stats())
        skip = set(skip_turns)
        return Prepared(sample, prompt, original, [k for k in range(len(sample.turns)) if k not in skip],
                        text_s=text_times.get("text_s", 0.0),
                        text_peak_memory_mb=self.memory.peak_mb(),  # the compressor's cost (same kind as peak_memory_mb)
                        stats=stats)

    def _fixed_tokens(self, sample: Sample, original: RenderedPrompt) -> int:
        """Tokens of the measured prefill a text stage cannot shorten: the context part's template
        and system text and, in query-aware mode, the (first) question part."""
        context = len(self.tokenizer(sample.context, add_special_tokens=False)["input_ids"])
        question = len(original.turn_ids[0]) if self.config.query_aware and original.turn_ids else 0
        return max(0, len(original.context_ids) - context) + question

    # --- step 2: prefill --------------------------------------------------------------------
    def prefill(self, rows: Sequence[Sequence[int]], protected: int = 0) -> Prefilled:
        """Prefill ``rows`` (one context each; the last ``protected`` tokens of a row must be kept)
        into a new cache; cache stages compress each layer during this pass. One row is compressed
        by the chain's own stages (and may be prefilled by a ``context_inputs`` stage); several by
        each row's own fresh copies of the cache stages (:class:`PerRowCompression`). With a
        :attr:`prefill_memo` (several runs sharing prefills, :mod:`.shared_prefill`), one context
        is prefilled once and each run compresses its own copy."""
        if self.prefill_memo is not None and len(rows) == 1 and protected == 0:
            return self._shared_prefill(list(rows[0]))
        cache = cache_for(self.model, self.num_layers)
        if len(rows) == 1:
            row_stages = [self.chain.stages]
            state = self.forward_state(cache)
        else:
            cache_stages = [s for s in self.chain.stages if "cache" in s.stages]
            row_stages = [fresh_copies(cache_stages) for _ in rows]
            per_row = PerRowCompression(row_stages, [len(r) for r in rows], self.chain.needs)
            state = self.forward_state(cache, [per_row] if cache_stages else [])
        state.phase = PREFILL
        state.compressing = bool(state.cache_stages)
        state.protected = protected
        start = self.clock.now()
        with torch.inference_mode():
            if len(rows) == 1:
                x = torch.tensor([list(rows[0])], dtype=torch.long, device=self.device)
                pos = torch.arange(len(rows[0]), device=self.device)[None]
                logits = self._prefill_forward(x, pos, state, len(rows[0]) - protected)
            else:
                ids, valid = self.left_pad(rows)
                width = ids.shape[1]
                offsets = torch.tensor([width - len(r) for r in rows], device=self.device)
                pos = (torch.arange(width, device=self.device)[None, :] - offsets[:, None]).clamp(min=0)
                logits = self.chunked_forward(ids, pos, state, valid)
        total = self.clock.now() - start
        self.memory.sample()
        return Prefilled(cache, total - state.compress_seconds, state.compress_seconds, logits, row_stages)

    def _shared_prefill(self, ids: list[int]) -> Prefilled:
        """The context's recorded prefill (made now if no sharing run made it yet), compressed by
        this run's own stages (:mod:`.shared_prefill`)."""
        memo = self.prefill_memo
        recorded = memo.get(self.model, ids, self.chain.needs)
        if recorded is None:
            needs = memo.needs.merge(self.chain.needs)
            recorder = Recorder(needs)
            cache = cache_for(self.model, self.num_layers)
            state = self.forward_state(cache, [recorder], needs)
            state.phase = PREFILL
            state.compressing = True
            start = self.clock.now()
            with torch.inference_mode():
                forward(self.model, torch.tensor([ids], dtype=torch.long, device=self.device),
                        torch.arange(len(ids), device=self.device)[None], state)
            total = self.clock.now() - start
            self.memory.sample()
            recorded = Recorded(cache, recorder.seen, needs, total - state.compress_seconds, state.compress_seconds,
                                self.memory.peak_mb())
            memo.put(self.model, ids, recorded)
        start = self.clock.now()
        cache = compress_recorded(recorded, self.chain.stages)
        own = self.clock.now() - start
        self.memory.sample()
        return Prefilled(cache, recorded.prefill_s, recorded.observe_s + own, None, [self.chain.stages],
                         shared=True, peak_memory_mb=recorded.peak_memory_mb)

    def _prefill_forward(self, x, pos, state: ForwardState, context_length: int):
        """Prefill the ids, unless a ``context_inputs`` stage hands embeddings in their place (or
        writes the context's KV itself); that stage's own time counts as compression."""
        for stage in self.chain.stages:
            if "context_inputs" not in stage.stages:
                continue
            start = self.clock.now()
            inputs = stage.context_inputs(self.model, x, context_length, state.cache)
            state.compress_seconds += self.clock.now() - start
            if inputs is not None:
                if inputs.embeds is None:
                    return None
                return forward(self.model, None, inputs.positions, state, inputs_embeds=inputs.embeds)
        return self.chunked_forward(x, pos, state)

    def chunked_forward(self, x, pos, state: ForwardState, valid: torch.Tensor | None = None):
        """Prefill ``x`` in spans of ``config.prefill_chunk`` tokens; only the last span is the
        compressing pass (the rule and what it allows: :mod:`lcbench.engine.chunked`)."""
        compressing = state.compressing
        if compressing and self.config.compress_chunks and valid is None:
            return compress_as_you_go(lambda ids, p, s: forward(self.model, ids, p, s), x, pos, state,
                                      self.config.prefill_chunk, self.chain.needs.window)
        spans = prefill_spans(x.shape[1], self.config.prefill_chunk, self.chain.needs.window)
        for a, b in spans:
            state.compressing = compressing and b == x.shape[1]
            logits = forward(self.model, x[:, a:b], pos[:, a:b], state, None if valid is None else valid[:, a:b])
        state.compressing = compressing
        return logits

    # --- steps 3 and 4: measure, check ------------------------------------------------------
    def measure(self, cache: KVCache, full_tokens: int, prefilled_tokens: int | None = None) -> dict[str, float]:
        """KV bytes, kept tokens and achieved ratio of a one-row compressed context, against the
        dense cache of ``full_tokens`` tokens, and the ratio requested of it: the chain's, or with
        ``--budget N`` the one of keeping ``N`` of the ``prefilled_tokens`` each layer held (a
        sliding-window layer holds fewer) times what the chain's other components keep."""
        kv = cache.nbytes()
        full = dense_kv_bytes(self.model, full_tokens, self.bytes_per_token)
        budget = self.chain.budget
        if budget is None:
            requested = self.chain.requested_ratio  # the run's label (a sparse chain's: the attention skipped)
        else:
            held = full_tokens if prefilled_tokens is None else prefilled_tokens
            kept = dense_kv_bytes(self.model, min(held, budget), self.bytes_per_token)
            requested = 1.0 - self.chain.fixed_keep() * kept / full if full else 0.0
        return {"kv_bytes": int(kv), "kv_bytes_full": int(full), "kept_tokens": cache.kept_tokens(),
                "state_bytes": cache.state_nbytes() or None,
                "achieved_ratio": 1.0 - kv / full if full else 0.0, "requested_ratio": requested, "budget": budget}

    def check(self, measured: dict[str, float], stats: dict[str, float]) -> None:
        """Fail the run when the measured compression misses the request beyond tolerance: KV
        memory for memory-compressing components, attention density for sparse ones."""
        if not self.config.check_ratio:
            return
        chain = self.chain
        memory = chain.memory_ratio if chain.budget is None else measured["requested_ratio"]
        checks = [("KV memory", memory, measured["achieved_ratio"], chain.tolerance_of(False))]
        if chain.attention_ratio > 0 and "attention_density" in stats:
            checks.append(("attention", chain.attention_ratio, 1.0 - stats["attention_density"],
                           chain.tolerance_of(True)))
        for what, requested, achieved, tolerance in checks:
            if requested - achieved > tolerance:
                raise CompressionShortfall(
                    f"method '{chain.name}' achieved a {what} compression ratio of {achieved:.3f} but "
                    f"{requested:.3f} was requested (tolerance {tolerance:.3f}): this is a failed run, "
                    f"not a score. Fix the method, or request a ratio it can reach."
                )

    def measured(self, cache: KVCache, p: Prepared, stages: list) -> tuple[dict[str, float], dict[str, float]]:
        """What one context's compressed ``cache`` holds and what ``stages`` reported, checked
        against the requested ratio."""
        m = self.measure(cache, p.context_tokens_original, len(p.prompt.context_ids))
        stats = self.stage_stats(stages, dict(p.stats))
        self.check(m, stats)
        return m, stats

    def stage_stats(self, stages: list, into: dict[str, float]) -> dict[str, float]:
        """``into`` updated with what ``stages`` measured on the current sample (:meth:`Stage.sample_stats`)."""
        for stage in stages:
            into.update(stage.sample_stats())
        return into

    # --- step 5: decode ---------------------------------------------------------------------
    def decode(self, cache: KVCache, turn_ids: list[list[int]], start: int | list[int], turns: list[Turn]) -> Decoded:
        """Prefill question parts (left-padded, one row each) on ``cache`` and decode them together;
        ``start`` is the true position of each row's first question token (one int for all rows,
        or one per row when the rows continue different contexts)."""
        asked = self.question_prefill(cache, turn_ids, start)
        times: dict[str, float] = {}
        with torch.inference_mode(), self.clock.region(times, "decode_s"):
            outs = self._greedy(asked.state, asked.logits, asked.next_positions, turns)
        self.memory.sample()
        return Decoded(outs, asked.question_prefill_s, times["decode_s"])

    def question_prefill(self, cache: KVCache, turn_ids: list[list[int]], start: int | list[int]) -> "Asked":
        """The question parts prefilled on ``cache`` (left-padded rows): the state decoding goes on
        with, the last logits of each row, each row's next position, and the time it took."""
        state = self.forward_state(cache)
        state.phase = QUESTION
        return self.prefill_questions(state, turn_ids, start)

    def prefill_questions(self, state: ForwardState, turn_ids: list[list[int]], start: int | list[int]) -> "Asked":
        """:meth:`question_prefill` on ``state`` (one run's, or several runs' joint state:
        engine/joint.py), its phase already set."""
        times: dict[str, float] = {}
        ids, valid = self.left_pad(turn_ids)
        q = ids.shape[1]
        lengths = torch.tensor([len(t) for t in turn_ids], device=self.device)
        start = torch.as_tensor(start, device=self.device).reshape(-1)
        pos = start[:, None] + torch.arange(q, device=self.device)[None, :] - (q - lengths)[:, None]
        pos = pos.clamp(min=0)
        with torch.inference_mode(), self.clock.region(times, "question_prefill_s"):
            logits = forward(self.model, ids, pos, state, valid)
        return Asked(state, logits, start + lengths, times["question_prefill_s"])

    def decode_from(self, cache: KVCache, logits: torch.Tensor, next_position: int, turn: Turn) -> Decoded:
        """Decode one row greedily from the prefill's last ``logits`` (query-aware mode: the
        question was part of the prefill)."""
        times: dict[str, float] = {}
        state = self.forward_state(cache)
        with torch.inference_mode(), self.clock.region(times, "decode_s"):
            outs = self._greedy(state, logits, torch.tensor([next_position], device=self.device), [turn])
        return Decoded(outs, 0.0, times["decode_s"])

    def _greedy(self, state, logits, next_positions, turns: list[Turn]) -> list[RowOutput]:
        return greedy_decode(self.model, self.tokenizer, state, logits, next_positions,
                             [t.max_new_tokens for t in turns], self.eos, [t.stop for t in turns],
                             [t.min_new_tokens for t in turns], [t.stop_token_ids for t in turns])

    # --- step 6: record ---------------------------------------------------------------------
    def record(self, p: Prepared, k: int, out: RowOutput, prefilled: Prefilled, decoded: Decoded,
               measured: dict[str, float], stats: dict[str, float], input_tokens: int, rows: int,
               samples: int = 1) -> TurnRecord:
        """The record of turn ``k`` of ``p``: what the engine measured, and apart from it what the
        method's stages reported (``stats``)."""
        tokens = len(out.tokens)
        ttft = p.text_s + prefilled.prefill_s + prefilled.compress_s + decoded.question_prefill_s
        m = Measured(
            input_tokens=input_tokens, context_tokens_original=p.context_tokens_original,
            context_tokens=len(p.prompt.context_ids), **measured,
            text_s=p.text_s, text_peak_memory_mb=p.text_peak_memory_mb,
            prefill_s=prefilled.prefill_s, compress_s=prefilled.compress_s,
            question_prefill_s=decoded.question_prefill_s, ttft_s=ttft, decode_tokens=tokens,
            decode_s=decoded.decode_s, decode_tok_s=tokens / decoded.decode_s if decoded.decode_s > 0 else None,
            kv_bytes_end=out.end.kv_bytes if out.end else None, kept_tokens_end=out.end.kept_tokens if out.end else None,
            batch_rows=rows, batch_samples=samples,
            peak_memory_mb=max((m for m in (self.memory.peak_mb(), prefilled.peak_memory_mb) if m is not None),
                               default=None),
            memory_kind=self.memory.kind, shared_prefill=prefilled.shared or None)
        turn = p.sample.turns[k]
        return TurnRecord(sample_id=p.sample.id, turn=k, prediction=out.text, answers=list(turn.answers),
                          meta=p.sample.meta, stopped_by=out.stopped_by, decoded_ids=list(out.tokens),
                          measured=m, method_stats=dict(stats))

    # --- the pipelines ----------------------------------------------------------------------
    def run(self, sample: Sample, multi_turn: bool, skip_turns: set[int] = frozenset()) -> list[TurnRecord]:
        """Records for every turn of ``sample`` not in ``skip_turns``."""
        p = self.prepare(sample, multi_turn, skip_turns)
        if multi_turn:
            return self.run_multi_turn(p)
        if self.config.query_aware:
            return [self.run_query_aware(p, k) for k in p.todo]
        return self.run_group([p])

    def run_group(self, group: list[Prepared], rows: int | None = None) -> list[TurnRecord]:
        """Multi-request mode: the contexts of ``group`` prefilled together (each row compressed as
        if alone), measured and checked one by one, then every pending turn decoded from its
        context's row, ``rows`` turns at a time (default ``config.decode_rows``; None: all). One
        sample's turns share its compressed context where the chain allows (no copy per turn)."""
        if len(group) > 1:
            self.memory.reset()
        prefilled = self.prefill([p.prompt.context_ids for p in group])
        cache = prefilled.cache
        per_row = [cache] if len(group) == 1 else [type(cache).over(layers) for layers in
                                                  zip(*(row_layers(layer, len(group)) for layer in cache.layers))]
        measured, stats = [], []
        for j, p in enumerate(group):
            m, st = self.measured(per_row[j], p, prefilled.row_stages[j])
            measured.append(m)
            stats.append(st)
        del per_row
        pending = [(j, k) for j, p in enumerate(group) for k in p.todo]
        size = 1 if self.one_row else max(1, rows or self.config.decode_rows or len(pending) or 1)
        records = []
        for begin in range(0, len(pending), size):
            chunk = pending[begin:begin + size]
            last = begin + size >= len(pending)
            decode_cache = self._decode_cache(cache, [sum(1 for j2, _ in chunk if j2 == j) for j in range(len(group))],
                                              last)
            if last:
                del cache  # no second copy of the contexts' KV outlives its use
            decoded = self.decode(decode_cache, [group[j].prompt.turn_ids[k] for j, k in chunk],
                                  [len(group[j].prompt.context_ids) for j, _ in chunk],
                                  [group[j].sample.turns[k] for j, k in chunk])
            del decode_cache
            for (j, k), out in zip(chunk, decoded.outputs):
                p = group[j]
                s = self.stage_stats(prefilled.row_stages[j], stats[j])
                records.append(self.record(p, k, out, prefilled, decoded, measured[j], s,
                                           len(p.prompt.context_ids) + len(p.prompt.turn_ids[k]), len(chunk),
                                           len(group)))
        return records

    # --- several runs decoding together (engine/joint.py) ------------------------------------
    def ask(self, p: Prepared) -> "Pending":
        """:meth:`run_group` for one sample, up to its question parts: the context prefilled (from
        a shared prefill where runs share them) and compressed, measured and checked, and the cache
        its pending turns decode from (their question parts are prefilled with the other runs':
        :func:`lcbench.engine.joint.decode_together`)."""
        prefilled = self.prefill([p.prompt.context_ids])
        measured, stats = self.measured(prefilled.cache, p, prefilled.row_stages[0])
        cache = self._decode_cache(prefilled.cache, [len(p.todo)], last=True)
        return Pending(self, p, prefilled, measured, stats, cache)

    def answer(self, pending: "Pending", outputs: list[RowOutput], decode_s: float, rows: int) -> list[TurnRecord]:
        """The records of ``pending``'s turns from their decoded ``outputs`` (a decode of ``rows``
        rows that took ``decode_s``), as :meth:`run_group` writes them."""
        p, prefilled = pending.prepared, pending.prefilled
        decoded = Decoded(outputs, pending.asked.question_prefill_s, decode_s)
        self.memory.sample()
        records = []
        for k, out in zip(p.todo, outputs):
            stats = self.stage_stats(prefilled.row_stages[0], pending.stats)
            records.append(self.record(p, k, out, prefilled, decoded, pending.measured, stats,
                                       len(p.prompt.context_ids) + len(p.prompt.turn_ids[k]), rows))
        return records

    def _decode_cache(self, cache: KVCache, counts: list[int], last: bool) -> KVCache:
        """The cache ``counts[j]`` decode rows of context row ``j`` start from: the cache itself
        when it is the last use and one row per context; for one context, its layers shared by
        the rows (cache/shared.py: no copy per turn) where the chain never changes a row's context
        after compression, else copied (decode-time eviction, sparse attention, re-quantized
        windows); for several contexts, each row copied ``counts[j]`` times."""
        if last and all(c == 1 for c in counts):
            return cache
        if len(counts) == 1:
            return cache.share_rows(counts[0]) if self.shares_context else cache.repeat_rows(counts[0])
        return type(cache).over([take_rows(layer, counts) for layer in cache.layers])

    def run_query_aware(self, p: Prepared, k: int) -> TurnRecord:
        """SnapKV's original protocol: the context and turn ``k``'s question prefilled together and
        compressed with the question protected (no sharing across turns)."""
        q_ids = p.prompt.turn_ids[k]
        ids = p.prompt.context_ids + q_ids
        prefilled = self.prefill([ids], protected=len(q_ids))
        measured = self.measure(prefilled.cache, p.context_tokens_original + len(q_ids), len(ids))
        stats = self.stage_stats(self.chain.stages, dict(p.stats))
        self.check(measured, stats)
        decoded = self.decode_from(prefilled.cache, prefilled.logits, len(ids), p.sample.turns[k])
        self.stage_stats(self.chain.stages, stats)
        return self.record(p, k, decoded.outputs[0], prefilled, decoded, measured, stats, len(ids), 1)

    def run_multi_turn(self, p: Prepared) -> list[TurnRecord]:
        """SCBench multi-turn: each turn sees the context, earlier questions and gold answers."""
        prefilled = self.prefill([p.prompt.context_ids])
        cache = prefilled.cache
        measured = self.measure(cache, p.context_tokens_original, len(p.prompt.context_ids))
        stats = self.stage_stats(self.chain.stages, dict(p.stats))
        self.check(measured, stats)
        position = len(p.prompt.context_ids)
        todo = set(p.todo)
        records = []
        for k, turn in enumerate(p.sample.turns):
            lengths = cache.seq_lengths()
            decoded = self.decode(cache, [p.prompt.turn_ids[k]], position, [turn])
            self.stage_stats(self.chain.stages, stats)
            position += len(p.prompt.turn_ids[k])
            if k in todo:
                records.append(self.record(p, k, decoded.outputs[0], prefilled, decoded, measured, stats, position, 1))
            # forget the generated answer; the next turn's text carries the gold answer instead
            cache.crop_to([min(n + len(p.prompt.turn_ids[k]), layer.seq_len())
                           for n, layer in zip(lengths, cache.layers)])
        return records
