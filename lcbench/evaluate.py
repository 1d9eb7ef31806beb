"""One run from a RunSpec: task → samples → engine → scored records in the run store → summary.

This is what ``lcbench run`` calls once per (method, ratio, task). It resumes: turns already in
``samples.jsonl`` are skipped, so a killed run re-run with the same spec ends with exactly one
record per turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .engine.batching import auto_rows, batch_refusal, run_batched
from .engine.runner import Engine, EngineConfig
from .errors import UserError
from .methods.chain import Chain, chain_ratio, resolve_chain
from .models.loading import DEFAULT_MODEL, MODEL_PARAMS, LoadedModel, load_model, resolve_device, resolve_dtype
from .params import parse_kv
from .results.store import RunStore
from .results.summary import suite_score, summarize
from .spec import RunSpec
from .tasks.base import TaskEnv
from .tasks.registry import TASKS


def build_spec(*, model: str = DEFAULT_MODEL, model_args: str | None = None, method: str = "full",
               method_args: str | None = None, ratio: float = 0.5, task: str = "niah",
               task_args: str | None = None, limit: int | None = None, seed: int = 0,
               device: str | None = None, dtype: str | None = None, query_aware: bool = False,
               batch_size: int | str = "turns", output_path: str = "results",
               prefill_chunk: int | None = None, data_dir: str | None = None) -> RunSpec:
    """Expand command-line values into a fully resolved RunSpec (every default filled in)."""
    if not 0.0 <= ratio < 1.0:
        raise UserError(f"--ratio {ratio} is outside [0, 1): it is the fraction of the context's KV memory "
                        f"removed (0 = none, 0.75 = keep a quarter). Fix: pass e.g. --ratio 0.5.")
    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit}: must be a positive number of samples.")
    batch_size = parse_batch_size(batch_size)
    if prefill_chunk is not None and prefill_chunk < 0:
        raise UserError(f"--prefill-chunk {prefill_chunk}: must be a number of tokens ≥ 1 (0 = no chunking).")
    margs = parse_kv(model_args, "--model-args")
    if dtype:
        margs["dtype"] = dtype
    dev = resolve_device(device)
    margs = MODEL_PARAMS.resolve(margs, f"model '{model}'")
    margs["dtype"] = str(resolve_dtype(margs["dtype"], dev)).replace("torch.", "")
    chain = resolve_chain(method, method_args, ratio)
    task_cls = TASKS.get(task)
    targs = parse_kv(task_args, "--task-args")
    if data_dir:  # --data-dir: the task's own data_dir argument, so the spec records it
        if "data_dir" not in {p.name for p in task_cls.params}:
            raise UserError(f"--data-dir: task '{task}' reads no released data (it is generated, or takes its "
                            f"files through --task-args: see `lcbench ls tasks`). Fix: drop --data-dir.")
        targs.setdefault("data_dir", data_dir)
    task_obj = task_cls(**targs)
    return RunSpec(model=model, model_args=margs, method=chain, ratio=chain_ratio(chain), task=task,
                   task_args=task_obj.args, task_version=task_obj.version,
                   task_template_hash=task_obj.template_hash(), limit=limit, seed=seed, device=dev,
                   dtype=margs["dtype"], query_aware=query_aware, mode=task_obj.mode,
                   batch_size=batch_size, output_path=output_path, prefill_chunk=prefill_chunk or None)


def parse_batch_size(value: int | str) -> int | str:
    """``--batch-size``: ``turns`` (the default: one sample at a time, all its turns decoded as one
    batch, so latencies are those of one request), a number of decode rows ≥ 1 (samples whose turns
    fit are prefilled together), or ``auto`` (rows sized from free memory)."""
    if isinstance(value, str) and value.strip().lower() in ("auto", "turns"):
        return value.strip().lower()
    try:
        rows = int(value)
    except (TypeError, ValueError):
        rows = 0
    if rows < 1:
        raise UserError(f"--batch-size {value}: must be 'turns' (one sample at a time, its turns together), a "
                        f"number of rows ≥ 1 (turns of one or several samples decoded together) or 'auto'. "
                        f"Fix: e.g. --batch-size 8.")
    return rows


@dataclass
class RunOutcome:
    spec: RunSpec
    folder: Path
    summary: dict[str, Any]
    new_records: int


class ModelPool:
    """Keeps the last loaded model so several runs in one command load it once."""

    def __init__(self):
        self._key = None
        self._loaded: LoadedModel | None = None

    def get(self, spec: RunSpec) -> LoadedModel:
        key = (spec.model, tuple(sorted(spec.model_args.items())), spec.device)
        if key != self._key:
            self._loaded = load_model(spec.model, {k: v for k, v in spec.model_args.items() if v is not None},
                                      spec.device)
            self._key = key
        return self._loaded


def evaluate(spec: RunSpec, models: ModelPool | None = None,
             progress: Callable[[int, int], None] | None = None) -> RunOutcome:
    """Run (or resume) ``spec``; returns the folder and its summary."""
    torch.manual_seed(spec.seed)
    folder = Path(spec.output_path) / spec.run_id
    store = RunStore(folder)
    store.open(spec.to_json())
    loaded = (models or ModelPool()).get(spec)
    task = TASKS.get(spec.task)(**spec.task_args)
    env = TaskEnv(tokenizer=loaded.tokenizer, model_name=spec.model, model_max_length=loaded.max_length,
                  seed=spec.seed, data_dir=None)
    samples = task.samples(env)
    if spec.limit is not None:
        samples = samples[: spec.limit]
    chain = Chain.build(spec.method, spec.ratio)
    engine = Engine(loaded.model, loaded.tokenizer, chain,
                    EngineConfig(query_aware=spec.query_aware, prefill_chunk=spec.prefill_chunk,
                                 batch_size=spec.batch_size if isinstance(spec.batch_size, int) else None))
    multi_turn = spec.mode == "multi_turn"
    written = 0
    by_id = {s.id: s for s in samples}
    for finished, produced in _produce(engine, samples, store.done_turns(), spec.batch_size, multi_turn):
        for record in produced:
            sample = by_id[record["sample_id"]]
            record.update(task.score(sample, sample.turns[record["turn"]], record["prediction"]))
            record.update({"run_id": spec.run_id, "task": spec.task, "method": spec.method_name,
                           "model": spec.model})
            store.append(record)
            written += 1
        if progress:
            progress(finished, len(samples))
    wanted = {s.id for s in samples}
    records = [r for r in store.records() if r["sample_id"] in wanted]
    summary = summarize(records, task.aggregate(records), suite_score(records, task.suite_score))
    summary.update({"run_id": spec.run_id, "task": spec.task, "method": spec.method_name,
                    "ratio": spec.ratio, "model": spec.model, "query_aware": spec.query_aware})
    store.write_json(RunStore.SUMMARY, summary)
    return RunOutcome(spec, folder, summary, written)


def _produce(engine: Engine, samples: list, done: dict[str, set[int]], batch_size: int | str,
             multi_turn: bool) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """``(samples finished, records)`` as they come: with ``--batch-size N|auto``, samples batched
    together where the chain and mode allow it (engine/batching.py); otherwise one sample at a
    time with its turns batched."""
    refusal = batch_refusal(engine.chain, multi_turn, engine.config.query_aware)
    if refusal is None and batch_size not in (1, "turns"):
        yield from run_batched(engine, samples, done, batch_size)
        return
    if batch_size == "auto":
        longest = max((len(engine.tokenizer(s.context)["input_ids"]) for s in samples), default=1)
        engine.config.batch_size = auto_rows(engine.model, longest, engine.config.prefill_chunk)
    for i, sample in enumerate(samples):
        skip = done.get(sample.id, set())
        records = engine.run(sample, multi_turn, skip_turns=skip) if len(skip) < len(sample.turns) else []
        yield i + 1, records
