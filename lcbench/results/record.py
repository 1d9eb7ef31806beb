"""TurnRecord: the typed, versioned record of one turn — one line of ``samples.jsonl``.

Three namespaces that nothing merges by hand (issue #13): :class:`Measured` is what the engine
measured (tokens, KV bytes, the achieved ratio, timings, memory), ``method_stats`` what the method's
stages reported (:meth:`lcbench.methods.base.Stage.sample_stats`), ``scores`` what the task's
scorer returned. A stage's stat or a task's score can therefore never overwrite ``achieved_ratio``
or ``kv_bytes``. The decoded token ids are kept beside the decoded text.

On disk (schema 2)::

    {"schema": 2, "sample_id", "turn", "run_id", "task", "method", "model", "meta", "prediction",
     "answers", "stopped_by", "decoded_ids", "measured": {...}, "method_stats": {...}, "scores": {...}}

Files written before the schema (version 1: one flat object) are still read: the engine's known
fields go to ``measured``, the rest to ``scores`` (version 1 did not separate a method's stats from
a task's scores, so they stay together there).

Tabular readers (summaries, reports, ``lcbench check``) see a record as a read-only mapping over
its :meth:`TurnRecord.flat` view: identity, prediction and every measured field under their own
names, then method stats and scores under theirs unless the name is taken — a colliding stat is
shown as ``method_stats.<name>``, a colliding score as ``scores.<name>``, so a measured value is
never shadowed.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Iterator

SCHEMA = 2


@dataclass(frozen=True)
class Measured:
    """What the engine measured for one turn (lcbench's own numbers; ``None`` = not measured, e.g.
    in a record written by an older version)."""

    input_tokens: int | None = None  # tokens of the prefilled prompt (context + this turn's question)
    context_tokens_original: int | None = None  # context part before the text stage
    context_tokens: int | None = None  # context part after the text stage
    kv_bytes: int | None = None  # bytes of the compressed context's cache (per row)
    kv_bytes_full: int | None = None  # bytes of the same context's dense cache
    kept_tokens: int | None = None  # slots the compressed cache holds (all layers and heads)
    state_bytes: int | None = None  # a hybrid's linear-attention / state-space states (per row; not in kv_bytes)
    achieved_ratio: float | None = None  # 1 − kv_bytes / kv_bytes_full
    requested_ratio: float | None = None  # with a budget: of keeping it, over this sample's tokens
    budget: int | None = None  # --budget: tokens kept per layer and KV head
    text_s: float | None = None  # text stage (prompt compression)
    text_peak_memory_mb: float | None = None
    prefill_s: float | None = None  # prefill of the context, compression excluded
    compress_s: float | None = None  # cache and context-inputs stages
    question_prefill_s: float | None = None
    ttft_s: float | None = None  # text + prefill + compress + question prefill
    decode_tokens: int | None = None
    decode_s: float | None = None
    decode_tok_s: float | None = None
    kv_bytes_end: int | None = None  # bytes of this turn's cache (per row) when its decoding ended (engine/end_cache.py)
    kept_tokens_end: float | None = None  # slots held then (mean over layers and KV heads)
    batch_rows: int | None = None  # decode rows that shared this turn's decode
    batch_samples: int | None = None  # samples that shared this turn's prefill
    peak_memory_mb: float | None = None
    memory_kind: str | None = None  # what peak_memory_mb measures (device allocator or process RSS)
    shared_prefill: bool | None = None  # the prefill was computed once for several runs (its prefill_s is that pass's)
    timings: dict[str, float] = field(default_factory=dict)  # further timed regions, by name


MEASURED_FIELDS = tuple(f.name for f in fields(Measured) if f.name != "timings")
IDENTITY_FIELDS = ("sample_id", "turn", "run_id", "task", "method", "model", "meta", "prediction",
                   "answers", "stopped_by", "decoded_ids")


@dataclass(frozen=True)
class TurnRecord(Mapping):
    """One turn's record: identity, the decoded answer, and the three namespaces."""

    sample_id: str
    turn: int
    prediction: str
    answers: list[Any] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    stopped_by: str | None = None
    decoded_ids: list[int] | None = None  # None in records written before the schema kept them
    measured: Measured = field(default_factory=Measured)
    method_stats: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None
    task: str | None = None
    method: str | None = None
    model: str | None = None

    # --- building -----------------------------------------------------------------------------
    def scored(self, scores: Mapping[str, Any]) -> "TurnRecord":
        """This record with the task's scores."""
        return dataclasses.replace(self, scores=dict(scores))

    def stamped(self, **identity: str) -> "TurnRecord":
        """This record with the run's identity (``run_id``, ``task``, ``method``, ``model``)."""
        unknown = set(identity) - {"run_id", "task", "method", "model"}
        if unknown:
            raise TypeError(f"not identity fields: {sorted(unknown)}")
        return dataclasses.replace(self, **identity)

    # --- the file schema ----------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        measured = {k: v for k, v in dataclasses.asdict(self.measured).items() if k != "timings"}
        if self.measured.timings:
            measured["timings"] = dict(self.measured.timings)
        return {"schema": SCHEMA, "sample_id": self.sample_id, "turn": self.turn, "run_id": self.run_id,
                "task": self.task, "method": self.method, "model": self.model, "meta": self.meta,
                "prediction": self.prediction, "answers": self.answers, "stopped_by": self.stopped_by,
                "decoded_ids": self.decoded_ids, "measured": measured,
                "method_stats": dict(self.method_stats), "scores": dict(self.scores)}

    @classmethod
    def from_json(cls, payload: Mapping[str, Any]) -> "TurnRecord":
        """A record from one ``samples.jsonl`` line (schema 2, or a flat version-1 line). Raises
        ``ValueError`` for a line of a newer schema or without ``sample_id`` and an integer ``turn``."""
        schema = payload.get("schema", 1)
        if not isinstance(payload.get("turn"), int) or "sample_id" not in payload:
            raise ValueError("a record needs its 'sample_id' and an integer 'turn'")
        if schema == 1:
            return cls._from_flat(payload)
        if schema != SCHEMA:
            raise ValueError(f"record schema {schema!r} is newer than this lcbench's ({SCHEMA})")
        m = dict(payload.get("measured") or {})
        timings = m.pop("timings", None) or {}
        known = {k: m.pop(k) for k in MEASURED_FIELDS if k in m}
        timings.update(m)  # a measured field this version does not know: kept, as a timing
        return cls(sample_id=str(payload["sample_id"]), turn=payload["turn"], prediction=payload.get("prediction", ""),
                   answers=list(payload.get("answers") or []), meta=dict(payload.get("meta") or {}),
                   stopped_by=payload.get("stopped_by"), decoded_ids=payload.get("decoded_ids"),
                   measured=Measured(**known, timings=timings),
                   method_stats=dict(payload.get("method_stats") or {}), scores=dict(payload.get("scores") or {}),
                   run_id=payload.get("run_id"), task=payload.get("task"), method=payload.get("method"),
                   model=payload.get("model"))

    @classmethod
    def _from_flat(cls, payload: Mapping[str, Any]) -> "TurnRecord":
        rest = {k: v for k, v in payload.items() if k not in IDENTITY_FIELDS and k not in MEASURED_FIELDS
                and k != "schema"}
        timings = {k: rest.pop(k) for k in list(rest) if k.endswith("_s") and isinstance(rest[k], (int, float))}
        return cls(sample_id=str(payload["sample_id"]), turn=payload["turn"], prediction=payload.get("prediction", ""),
                   answers=list(payload.get("answers") or []), meta=dict(payload.get("meta") or {}),
                   stopped_by=payload.get("stopped_by"), decoded_ids=payload.get("decoded_ids"),
                   measured=Measured(**{k: payload[k] for k in MEASURED_FIELDS if k in payload}, timings=timings),
                   scores=rest, run_id=payload.get("run_id"), task=payload.get("task"),
                   method=payload.get("method"), model=payload.get("model"))

    # --- the flat, read-only view -------------------------------------------------------------
    def flat(self) -> dict[str, Any]:
        """Identity, measured fields, then method stats and scores (prefixed where a name is taken)."""
        return dict(self._flat)

    @functools.cached_property
    def _flat(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: getattr(self, k) for k in IDENTITY_FIELDS}
        out.update({k: getattr(self.measured, k) for k in MEASURED_FIELDS})
        for k, v in self.measured.timings.items():
            out.setdefault(k, v)
        for prefix, space in (("method_stats", self.method_stats), ("scores", self.scores)):
            for k, v in space.items():
                out[f"{prefix}.{k}" if k in out else k] = v
        return out

    def __getitem__(self, key: str) -> Any:
        return self._flat[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._flat)

    def __len__(self) -> int:
        return len(self._flat)
