"""One sample through the whole pipeline (DESIGN.md "The data flow of one run"):

text stage → render → prefill the context part (cache stages compress each layer as it
finishes) → per turn, prefill the question part on the compressed cache and decode greedily.
In multi-request mode the turns of a context decode together as one batch, each row starting
from the same compressed context — held once and shared by the rows (:mod:`lcbench.cache.shared`)
unless a stage changes each row's context later — and each row leaves the batch when it ends;
in multi-turn mode they run in order with gold history.
Every turn yields one record with quality inputs, timings, KV bytes and memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..cache import KVCache
from ..errors import CompressionShortfall
from ..methods.base import TextInput
from ..methods.chain import Chain
from ..tasks.sample import Sample
from .chunked import check_chunkable, prefill_spans
from .decode import forward, greedy_decode
from .prompt import RenderedPrompt, render
from .state import DECODE, PREFILL, QUESTION, ForwardState
from .timing import MemoryMeter, Stopwatch, input_device, model_devices


@dataclass
class EngineConfig:
    query_aware: bool = False
    batch_size: int | None = 8  # rows (turns) decoded together; None: all pending turns of a sample
    check_ratio: bool = True
    prefill_chunk: int | None = None  # prefill the context this many tokens at a time (see engine/chunked.py)


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
    """Runs samples for one (model, method chain) pair; the model must use lcbench attention
    (see :func:`lcbench.models.loading.use_lcbench_attention`)."""

    def __init__(self, model, tokenizer, chain: Chain, config: EngineConfig | None = None):
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
        check_chunkable(chain.stages, chain.needs, self.config.prefill_chunk)
        # turns may share the compressed context (no copy per turn) unless a stage acts on each
        # row's cache after compression: decode stages (eviction, sparse decode) and sparse
        # prefill attention (it runs on the question parts too)
        self._shares_context = not any({"decode", "prefill_attention"} & set(s.stages) for s in chain.stages)

    # --- helpers --------------------------------------------------------------------------
    def warm_up(self, tokens: int = 16) -> None:
        """One untimed pass before the first timed sample, so sample 1's TTFT is not device
        start-up (CUDA context, kernel selection, allocator growth): a ``tokens``-token prefill and
        one decode step through the engine's own forward path (lcbench attention, an lcbench
        cache), on a throwaway cache with no stage taking part — the stages are untouched and
        every sample resets them anyway (:meth:`prepare`)."""
        self.warmed_up = True
        cache = KVCache(self.num_layers)
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

    def _state(self, cache: KVCache) -> ForwardState:
        return ForwardState(cache=cache, stages=self.chain.stages, needs=self.chain.needs, timer=self.clock)

    def _tensor(self, rows: list[list[int]], pad: int = 0):
        """Left-pad rows into (B, q) ids and validity."""
        q = max(len(r) for r in rows)
        ids = torch.full((len(rows), q), pad, dtype=torch.long)
        valid = torch.zeros((len(rows), q), dtype=torch.bool)
        for i, r in enumerate(rows):
            if r:
                ids[i, q - len(r):] = torch.tensor(r)
                valid[i, q - len(r):] = True
        return ids.to(self.device), valid.to(self.device)

    def _prefill(self, ids: list[int], protected: int) -> tuple[KVCache, dict[str, float], torch.Tensor]:
        """Prefill ``ids`` into a new cache; cache stages compress it during this pass."""
        cache = KVCache(self.num_layers)
        state = self._state(cache)
        state.phase = PREFILL
        state.compressing = bool(state.cache_stages)
        state.protected = protected
        times: dict[str, float] = {}
        start = self.clock.now()
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        pos = torch.arange(len(ids), device=self.device)[None]
        with torch.inference_mode():
            logits = self._prefill_forward(x, pos, state, len(ids) - protected)
        total = self.clock.now() - start
        times["compress_s"] = state.compress_seconds
        times["prefill_s"] = total - state.compress_seconds
        self.memory.sample()
        return cache, times, logits, self._stage_stats(state.stats)

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
        return self._chunked_forward(x, pos, state)

    def _chunked_forward(self, x, pos, state: ForwardState, valid: torch.Tensor | None = None):
        """Prefill ``x`` in spans of ``config.prefill_chunk`` tokens; only the last span is the
        compressing pass (the rule and what it allows: :mod:`lcbench.engine.chunked`)."""
        compressing = state.compressing
        spans = prefill_spans(x.shape[1], self.config.prefill_chunk, self.chain.needs.window)
        for a, b in spans:
            state.compressing = compressing and b == x.shape[1]
            logits = forward(self.model, x[:, a:b], pos[:, a:b], state, None if valid is None else valid[:, a:b])
        state.compressing = compressing
        return logits

    def _stage_stats(self, stats: dict[str, float]) -> dict[str, float]:
        """Merge what the stages measured on this sample (:meth:`Stage.sample_stats`) into ``stats``."""
        for stage in self.chain.stages:
            stats.update(stage.sample_stats())
        return stats

    # --- one sample -----------------------------------------------------------------------
    def run(self, sample: Sample, multi_turn: bool, skip_turns: set[int] = frozenset()) -> list[dict[str, Any]]:
        """Records for every turn of ``sample`` not in ``skip_turns``."""
        prompt, original, common = self.prepare(sample, multi_turn)
        if multi_turn:
            return self._run_multi_turn(sample, prompt, original, common, skip_turns)
        if self.config.query_aware:
            return [self._run_query_aware(sample, k, prompt, original, common)
                    for k in range(len(sample.turns)) if k not in skip_turns]
        return self._run_multi_request(sample, prompt, common, skip_turns)

    def prepare(self, sample: Sample, multi_turn: bool) -> tuple[RenderedPrompt, RenderedPrompt, dict[str, Any]]:
        """The per-sample work before prefill: reset the stages, run the text stage, render.
        Returns the rendered prompt, the prompt of the uncompressed context, and the fields every
        record of the sample shares."""
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
        common = {
            "context_tokens_original": len(original.context_ids),
            "context_tokens": len(prompt.context_ids),
            "text_s": text_times.get("text_s", 0.0),
            "text_peak_memory_mb": self.memory.peak_mb(),  # the compressor's cost (same kind as peak_memory_mb)
        }
        return prompt, original, common

    def _fixed_tokens(self, sample: Sample, original: RenderedPrompt) -> int:
        """Tokens of the measured prefill a text stage cannot shorten: the context part's template
        and system text and, in query-aware mode, the (first) question part."""
        context = len(self.tokenizer(sample.context, add_special_tokens=False)["input_ids"])
        question = len(original.turn_ids[0]) if self.config.query_aware and original.turn_ids else 0
        return max(0, len(original.context_ids) - context) + question

    def _measure(self, cache: KVCache, full_tokens: int, rows: int = 1) -> dict[str, float]:
        kv = cache.nbytes() / rows
        full = dense_kv_bytes(self.model, full_tokens, self.bytes_per_token)
        return {"kv_bytes": int(kv), "kv_bytes_full": int(full), "kept_tokens": cache.kept_tokens(),
                "achieved_ratio": 1.0 - kv / full if full else 0.0}

    def _check(self, measured: dict[str, float], stats: dict[str, float]) -> None:
        """Fail the run when the measured compression misses the request beyond tolerance: KV
        memory for memory-compressing components, attention density for sparse ones."""
        if not self.config.check_ratio:
            return
        chain = self.chain
        checks = [("KV memory", chain.memory_ratio, measured["achieved_ratio"], chain.tolerance_of(False))]
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

    def _record(self, k: int, sample: Sample, out, times: dict, measured: dict, common: dict,
                input_tokens: int, rows: int) -> dict[str, Any]:
        turn = sample.turns[k]
        decode_tokens = len(out.tokens)
        ttft = common["text_s"] + times["prefill_s"] + times["compress_s"] + times["question_prefill_s"]
        return {
            "sample_id": sample.id, "turn": k, "meta": sample.meta,
            "prediction": out.text, "answers": turn.answers, "stopped_by": out.stopped_by,
            "input_tokens": input_tokens, **common, **measured,
            "requested_ratio": self.chain.requested_ratio,
            "prefill_s": times["prefill_s"], "compress_s": times["compress_s"],
            "question_prefill_s": times["question_prefill_s"], "ttft_s": ttft,
            "decode_tokens": decode_tokens, "decode_s": times["decode_s"],
            "decode_tok_s": decode_tokens / times["decode_s"] if times["decode_s"] > 0 else None,
            "batch_rows": rows, "batch_samples": 1, "peak_memory_mb": self.memory.peak_mb(), "memory_kind": self.memory.kind,
            **{k2: v for k2, v in times.items() if k2 not in ("prefill_s", "compress_s", "question_prefill_s", "decode_s")},
        }

    def _decode_rows(self, cache: KVCache, turn_ids: list[list[int]], start: int | list[int], turns,
                     stats) -> tuple[list, dict]:
        """Prefill question parts (left-padded, one row each) on ``cache`` and decode them together;
        ``start`` is the true position of each row's first question token (one int for all rows,
        or one per row when the rows continue different contexts)."""
        times: dict[str, float] = {}
        state = self._state(cache)
        state.phase = QUESTION
        state.stats = stats
        ids, valid = self._tensor(turn_ids)
        q = ids.shape[1]
        lengths = torch.tensor([len(t) for t in turn_ids], device=self.device)
        start = torch.as_tensor(start, device=self.device).reshape(-1)
        pos = start[:, None] + torch.arange(q, device=self.device)[None, :] - (q - lengths)[:, None]
        pos = pos.clamp(min=0)
        with torch.inference_mode():
            with self.clock.region(times, "question_prefill_s"):
                logits = forward(self.model, ids, pos, state, valid)
            with self.clock.region(times, "decode_s"):
                outs = greedy_decode(self.model, self.tokenizer, state, logits, start + lengths,
                                     [t.max_new_tokens for t in turns], self.eos, [t.stop for t in turns],
                                     [t.min_new_tokens for t in turns], [t.stop_token_ids for t in turns])
        self._stage_stats(stats)
        self.memory.sample()
        return outs, times

    def _run_multi_request(self, sample, prompt: RenderedPrompt, common, skip_turns) -> list[dict]:
        cache, times, _, stats = self._prefill(prompt.context_ids, protected=0)
        measured = self._measure(cache, common["context_tokens_original"])
        self._check(measured, stats)
        todo = [k for k in range(len(sample.turns)) if k not in skip_turns]
        records = []
        n_ctx = len(prompt.context_ids)
        size = (len(todo) or 1) if self.config.batch_size is None else max(1, self.config.batch_size)
        for start in range(0, len(todo), size):
            group = todo[start: start + size]
            last = start + size >= len(todo)
            # the last group takes the cache itself when it is one row; otherwise the rows share the
            # context's layers (cache/shared.py: no copy per turn) where the chain never changes a
            # row's context after compression, and copy it where it does (decode-time eviction,
            # sparse attention, re-quantized windows)
            rows = cache if last and len(group) == 1 else (
                cache.share_rows(len(group)) if self._shares_context else cache.repeat_rows(len(group)))
            if last:
                del cache
            outs, t2 = self._decode_rows(rows, [prompt.turn_ids[k] for k in group], n_ctx,
                                         [sample.turns[k] for k in group], stats)
            for k, out in zip(group, outs):
                rec = self._record(k, sample, out, {**times, **t2}, {**measured, **stats}, common,
                                   n_ctx + len(prompt.turn_ids[k]), len(group))
                records.append(rec)
        return records

    def _run_query_aware(self, sample, k, prompt, original, common) -> dict:
        """SnapKV's original protocol: compress after the question is prefilled (no sharing)."""
        q_ids = prompt.turn_ids[k]
        ids = prompt.context_ids + q_ids
        cache, times, logits, stats = self._prefill(ids, protected=len(q_ids))
        measured = self._measure(cache, common["context_tokens_original"] + len(q_ids))
        self._check(measured, stats)
        state = self._state(cache)
        state.stats = stats
        t2 = {"question_prefill_s": 0.0}
        with torch.inference_mode(), self.clock.region(t2, "decode_s"):
            outs = greedy_decode(self.model, self.tokenizer, state, logits,
                                 torch.tensor([len(ids)], device=self.device), [sample.turns[k].max_new_tokens],
                                 self.eos, [sample.turns[k].stop], [sample.turns[k].min_new_tokens],
                                 [sample.turns[k].stop_token_ids])
        self._stage_stats(stats)
        return self._record(k, sample, outs[0], {**times, **t2}, {**measured, **stats}, common, len(ids), 1)

    def _run_multi_turn(self, sample, prompt, original, common, skip_turns) -> list[dict]:
        """SCBench multi-turn: each turn sees the context, earlier questions and gold answers."""
        cache, times, _, stats = self._prefill(prompt.context_ids, protected=0)
        measured = self._measure(cache, common["context_tokens_original"])
        self._check(measured, stats)
        position = len(prompt.context_ids)
        records = []
        for k, turn in enumerate(sample.turns):
            lengths = cache.seq_lengths()
            outs, t2 = self._decode_rows(cache, [prompt.turn_ids[k]], position, [turn], stats)
            position += len(prompt.turn_ids[k])
            if k not in skip_turns:
                records.append(self._record(k, sample, outs[0], {**times, **t2}, {**measured, **stats}, common,
                                            position, 1))
            # forget the generated answer; the next turn's text carries the gold answer instead
            cache.crop_to([min(n + len(prompt.turn_ids[k]), layer.seq_len())
                           for n, layer in zip(lengths, cache.layers)])
        return records
