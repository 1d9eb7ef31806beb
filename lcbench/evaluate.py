"""One run from a RunSpec: task → samples → engine → scored records in the run store → summary.

This is what ``lcbench run`` calls once per (method, ratio, task). It resumes: turns already in
``samples.jsonl`` are skipped, so a killed run re-run with the same spec ends with exactly one
record per turn.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .engine.attach import use_lcbench_attention
from .engine.batching import auto_rows, batch_refusal, run_batched
from .engine.runner import Engine, EngineConfig
from .engine.loglik import produce as loglik_produce
from .engine.shared_prefill import PrefillMemo, budget_bytes, share_refusal
from .methods.base import Needs
from .errors import CompressionShortfall, RunAborted, RunFailed, UserError, out_of_memory, signal_number
from .methods.chain import Chain, chain_ratio, compresses_nothing, resolve_chain
from .models.loading import (
    MODEL_PARAMS,
    LoadedModel,
    load_model,
    resolve_device,
    resolve_dtype,
)
from .params import parse_kv
from .results.record import TurnRecord
from .results.store import ABORTED, FAILED, RunStore, disk_full, disk_full_error
from .results.summary import suite_score, summarize
from .spec import DEFAULT_MODEL, RunSpec, run_settings
from .tasks.base import LOGLIK, TaskEnv
from .tasks.registry import TASKS


def build_spec(*, model: str = DEFAULT_MODEL, model_args: str | dict | None = None, method: str = "full",
               method_args: str | None = None, ratio: float | None = None, task: str = "niah",
               task_args: str | dict | None = None, data_dir: str | None = None, budget: int | None = None,
               **settings: Any) -> RunSpec:
    """Expand command-line values into a fully resolved RunSpec (every default filled in).
    ``ratio`` defaults to 0.5; ``budget`` (tokens kept per layer and KV head) replaces it.
    ``settings`` are RunSpec's plain settings (:func:`lcbench.spec.run_settings`), each defaulting
    to what the command line passes without its flag."""
    declared = {f.name: s for f, s in run_settings()}
    unknown = sorted(set(settings) - set(declared))
    if unknown:
        raise TypeError(f"build_spec: unknown setting(s) {unknown}; RunSpec declares {sorted(declared)}")
    given = {name: settings.get(name, s.cli_default) for name, s in declared.items()}
    limit, seed, device, dtype = given["limit"], given["seed"], given["device"], given["dtype"]
    query_aware, batch_size, output_path = given["query_aware"], given["batch_size"], given["output_path"]
    prefill_chunk, compress_chunks = given["prefill_chunk"], given["compress_chunks"]
    if budget is not None and ratio is not None:
        raise UserError(f"--ratio {ratio} and --budget {budget} both set how much the cache keeps. Fix: pass one "
                        f"of them (--budget N keeps N tokens per layer and KV head; --ratio r removes a fraction).")
    if budget is not None and compresses_nothing(method):
        budget = None  # `full` keeps everything at any budget: one run, as at any ratio
    ratio = (0.0 if budget is not None else 0.5) if ratio is None else ratio
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or math.isnan(ratio):
        raise UserError(f"--ratio {ratio!r} is not a number. Fix: pass e.g. --ratio 0.5.")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
        raise UserError(f"--limit {limit!r}: must be a whole number of samples. Fix: e.g. --limit 10.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"--seed {seed!r}: must be a whole number. Fix: e.g. --seed 0.")
    if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int)):
        raise UserError(f"--prefill-chunk {prefill_chunk!r}: must be a whole number of tokens. Fix: e.g. --prefill-chunk 512.")
    if not isinstance(query_aware, bool):
        raise UserError(f"query_aware {query_aware!r}: must be true or false. Fix: query_aware = true.")
    if not isinstance(compress_chunks, bool):
        raise UserError(f"compress_chunks {compress_chunks!r}: must be true or false. Fix: compress_chunks = true.")
    if compress_chunks and not prefill_chunk:
        raise UserError("--compress-chunks compresses after every prefill chunk, but no --prefill-chunk was given. "
                        "Fix: add --prefill-chunk N (e.g. 512), or drop --compress-chunks.")
    for flag, value in (("--model", model), ("--method", method), ("--task", task), ("--output-path", output_path)):
        if not isinstance(value, str) or not value.strip():
            raise UserError(f"{flag} {value!r}: must be a non-empty name. Fix: see `lcbench run --help`.")
    if not 0.0 <= ratio < 1.0:
        raise UserError(f"--ratio {ratio} is outside [0, 1): it is the fraction of the context's KV memory "
                        f"removed (0 = none, 0.75 = keep a quarter). Fix: pass e.g. --ratio 0.5.")
    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit}: must be a positive number of samples. Fix: e.g. --limit 10 (or leave it "
                        f"out for every sample).")
    batch_size = parse_batch_size(batch_size)
    share_prefill = parse_share_prefill(given["share_prefill"])
    if prefill_chunk is not None and prefill_chunk < 0:
        raise UserError(f"--prefill-chunk {prefill_chunk}: must be a number of tokens ≥ 1 (0 = no chunking). "
                        f"Fix: e.g. --prefill-chunk 512.")
    margs = dict(model_args) if isinstance(model_args, dict) else parse_kv(model_args, "--model-args")
    if dtype:
        margs["dtype"] = dtype
    dev = resolve_device(device)
    margs = MODEL_PARAMS.resolve(margs, f"model '{model}'")
    margs["dtype"] = str(resolve_dtype(margs["dtype"], dev)).replace("torch.", "")
    chain = resolve_chain(method, method_args, ratio, budget)
    task_cls = TASKS.get(task)
    targs = dict(task_args) if isinstance(task_args, dict) else parse_kv(task_args, "--task-args")
    if data_dir:  # --data-dir: the task's own data_dir argument, so the spec records it
        if "data_dir" not in {p.name for p in task_cls.params}:
            raise UserError(f"--data-dir: task '{task}' reads no released data (it is generated, or takes its "
                            f"files through --task-args: see `lcbench ls tasks`). Fix: drop --data-dir.")
        targs.setdefault("data_dir", data_dir)
    task_obj = task_cls(**targs)
    return RunSpec(model=model, model_args=margs, method=chain, ratio=chain_ratio(chain), task=task,
                   task_args=task_obj.args, task_version=task_obj.version,
                   task_template_hash=task_obj.template_hash(), budget=budget, limit=limit, seed=seed, device=dev,
                   dtype=margs["dtype"], query_aware=query_aware, mode=task_obj.mode,
                   batch_size=batch_size, output_path=output_path, prefill_chunk=prefill_chunk or None,
                   compress_chunks=compress_chunks, share_prefill=share_prefill)


def parse_share_prefill(value: str) -> str:
    """``--share-prefill``: ``auto``, ``off`` or a budget in MB (> 0)."""
    text = str(value).strip().lower()
    if text in ("auto", "off"):
        return text
    try:
        mb = float(text)
    except ValueError:
        mb = 0.0
    if not mb > 0:
        raise UserError(f"--share-prefill {value}: must be 'auto' (held within half the free memory), 'off', or a "
                        f"budget in MB > 0. Fix: e.g. --share-prefill 4096.")
    return f"{mb:g}"


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


def share_groups(specs: list[RunSpec]) -> list[list[RunSpec]]:
    """``specs`` split into the groups whose runs would share prefills in one process (several runs
    each), and every other run alone, in first-seen order: what an executor that runs each group
    in one process (Ray: one task per group) must keep together for the sharing to happen."""
    groups: dict[tuple, list[RunSpec]] = {}
    for i, spec in enumerate(specs):
        groups.setdefault(_share_key(spec) if _sharing_chain(spec) else ("alone", i), []).append(spec)
    return list(groups.values())


def _sharing_chain(spec: RunSpec) -> Chain | None:
    """The run's chain when the run may reuse a prefill another run of its command made, else None."""
    if spec.share_prefill == "off":
        return None
    chain = Chain.build(spec.method, spec.ratio)
    return chain if share_refusal(chain, spec.query_aware, spec.prefill_chunk) is None else None


def _share_key(spec: RunSpec) -> tuple:
    """What runs must have in common to share prefills: all but the method chain, ratio and output."""
    return (spec.model, json.dumps(spec.model_args, sort_keys=True, default=str), spec.device, spec.dtype, spec.task,
            json.dumps(spec.task_args, sort_keys=True, default=str), spec.limit, spec.seed, spec.mode)


class ModelPool:
    """Keeps the last loaded model so several runs in one command load it once, and the prefills
    runs of one command share (:mod:`lcbench.engine.shared_prefill`)."""

    def __init__(self):
        self._key = None
        self._loaded: LoadedModel | None = None
        self._memos: dict[tuple, PrefillMemo] = {}
        self.warmed_up = False  # the loaded model ran the engine's untimed warm-up pass (Engine.warm_up)

    def plan_shared_prefill(self, specs: list[RunSpec]) -> None:
        """Group the runs that may share prefills (same model, task, samples and settings; chains
        of cache and decode stages only; ``share_prefill`` not ``off``) and give every group of
        two or more runs one memo for the union of their needs."""
        groups: dict[tuple, list[Needs]] = {}
        for spec in specs:
            chain = _sharing_chain(spec)
            if chain is not None:
                groups.setdefault(_share_key(spec), []).append(chain.needs)
        for key, needs in groups.items():
            if len(needs) > 1 and key not in self._memos:
                union = Needs()
                for n in needs:
                    union = union.merge(n)
                spec = next(s for s in specs if _share_key(s) == key)
                self._memos[key] = PrefillMemo(union, budget_bytes(spec.share_prefill, spec.device))

    def memo_for(self, spec: RunSpec, chain: Chain) -> PrefillMemo | None:
        memo = self._memos.get(_share_key(spec))
        if memo is None or spec.share_prefill == "off" or share_refusal(chain, spec.query_aware, spec.prefill_chunk):
            return None
        return memo

    def get(self, spec: RunSpec) -> LoadedModel:
        key = (spec.model, tuple(sorted(spec.model_args.items())), spec.device)
        if key != self._key:
            for memo in self._memos.values():
                memo.clear()
            self._loaded = load_model(spec.model, {k: v for k, v in spec.model_args.items() if v is not None},
                                      spec.device)
            use_lcbench_attention(self._loaded.model, self._loaded.dense_attention)
            self._key = key
            self.warmed_up = False
        return self._loaded


def load_spec_file(path: Path) -> RunSpec:
    """``lcbench run --spec spec.json``: the file's spec, validated exactly like the flags."""
    try:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"--spec {path}: not a readable lcbench spec.json ({exc}). Fix: pass the spec.json of a "
                        f"run folder (results/<run-id>/spec.json).") from None
    return check_spec(RunSpec.from_json(payload, where=f"--spec {path}"), where=f"--spec {path}")


def check_spec(spec: RunSpec, where: str = "spec", same_task_version: bool = True) -> RunSpec:
    """Validate a spec that did not come from the flags (``--spec``, a baseline re-run, a Ray
    task) as :func:`build_spec` validates them, and return it re-resolved: every argument typed and
    range-checked, defaults filled in, and the top-level ``ratio`` (the run's label) equal to what
    its method chain requests. ``same_task_version``: the task's version and template hash must be
    this installation's (a replay); otherwise they are re-derived (a check re-runs today's code)."""
    def bad(what: str, fix: str) -> UserError:
        return UserError(f"{where}: {what}. Fix: {fix}.")

    if not isinstance(spec.method, list) or not spec.method or not all(
            isinstance(m, dict) and isinstance(m.get("name"), str) and isinstance(m.get("args", {}), dict)
            and isinstance(m.get("ratio"), (int, float)) and not isinstance(m.get("ratio"), bool) for m in spec.method):
        raise bad(f"'method' must be a non-empty list of {{name, ratio, args}}, got {spec.method!r}",
                  "write it as `lcbench run` does, or rebuild the spec with the flags")
    for key in ("model_args", "task_args"):
        if not isinstance(getattr(spec, key), dict):
            raise bad(f"'{key}' must be an object, got {getattr(spec, key)!r}", "restore the spec.json")
    for key in ("model", "task", "dtype", "device", "output_path", "mode", "task_version", "task_template_hash"):
        if not isinstance(getattr(spec, key), str):
            raise bad(f"'{key}' must be a string, got {getattr(spec, key)!r}", "restore the spec.json")
    chain = []
    for item in spec.method:
        from .methods.registry import METHODS

        ratio = float(item["ratio"])
        if not 0.0 <= ratio < 1.0:
            raise bad(f"method '{item['name']}' has ratio {ratio}, outside [0, 1)", "e.g. 0.5")
        stage = METHODS.get(item["name"])(ratio=ratio, **item.get("args", {}))  # names, types and ranges
        chain.append({"name": item["name"], "ratio": round(ratio, 6), "args": stage.args})
        if "budget" in item:
            chain[-1]["budget"] = _checked_budget(item, spec.budget, bad)
    if spec.budget is not None and not any("budget" in m for m in chain):
        raise bad(f"'budget' is {spec.budget!r} but no component of 'method' carries it", "rebuild the spec with "
                  "`lcbench run --budget N`")
    requested = chain_ratio(chain)
    if isinstance(spec.ratio, bool) or not isinstance(spec.ratio, (int, float)) or abs(float(spec.ratio) - requested) > 1e-6:
        raise bad(f"the run is labelled ratio={spec.ratio!r} but its method chain requests {requested:g} (the "
                  f"'ratio' of each component in 'method')", "edit the components' ratios (not only the top-level "
                  "'ratio'), or make the run with `lcbench run --ratio R` and replay that spec")
    if spec.batch_size is None or isinstance(spec.batch_size, bool):
        raise bad(f"'batch_size' {spec.batch_size!r} is not valid", "'turns', 'auto' or a number ≥ 1")
    rebuilt = build_spec(model=spec.model, method="full", ratio=0.0, task=spec.task, model_args=spec.model_args,
                         task_args=spec.task_args, **{f.name: getattr(spec, f.name) for f, _ in run_settings()})
    if spec.mode != rebuilt.mode:
        raise bad(f"'mode' {spec.mode!r} is not the task's ({rebuilt.mode!r})", f"set \"mode\": \"{rebuilt.mode}\"")
    if same_task_version and (spec.task_version, spec.task_template_hash) != (rebuilt.task_version,
                                                                             rebuilt.task_template_hash):
        raise bad(f"task '{spec.task}' was version {spec.task_version} (template {spec.task_template_hash}) when "
                  f"this spec was written; this lcbench has {rebuilt.task_version} ({rebuilt.task_template_hash}), "
                  f"so the replay would not compute what the spec says", "install the lcbench version that wrote "
                  "it (its provenance names it), or run the task again with the flags")
    return dataclasses.replace(rebuilt, method=chain, ratio=requested, budget=spec.budget)


def _checked_budget(item: dict, budget: Any, bad: Callable[[str, str], UserError]) -> int:
    """A method item's ``budget``: a whole number ≥ 1, the spec's own, on a component that takes one."""
    from .methods.budget import budget_refusal
    from .methods.registry import METHODS

    value = item["budget"]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value != budget:
        raise bad(f"method '{item['name']}' has budget {value!r}, but the spec's 'budget' is {budget!r} (both a "
                  f"whole number of tokens ≥ 1)", "make them equal, or rebuild the spec with `lcbench run --budget N`")
    why = budget_refusal(METHODS.get(item["name"]))
    if why is not None:
        raise bad(f"--budget cannot apply to it: {why}", "move the budget to a dropping component")
    return value


def warn(message: str) -> None:
    """A warning on stderr (inside a progress bar, rich redirects it above the bar)."""
    from .report.safe import strip_controls

    print(f"warning: {strip_controls(message)}", file=sys.stderr, flush=True)


def _check_lengths(samples: list, tokenizer, max_length: int, model: str) -> None:
    """Warn when a prompt (context, longest question and answer) exceeds the model's position limit."""
    longest, worst = 0, None
    for s in samples:
        n = len(tokenizer(s.context, add_special_tokens=False)["input_ids"])
        n += max((len(tokenizer(t.question, add_special_tokens=False)["input_ids"]) + t.max_new_tokens
                  for t in s.turns), default=0)
        if n > longest:
            longest, worst = n, s.id
    if longest > max_length:
        warn(f"sample {worst} needs about {longest} tokens, more than model '{model}''s max_length {max_length} "
             f"(max_position_embeddings): positions beyond it were never trained and scores there mean little. "
             f"Fix: shorter task lengths (e.g. --task-args lengths=...), or a model with a longer window.")


@dataclass
class OpenRun:
    """A run whose inputs were checked and whose folder is open and locked to this process."""

    spec: RunSpec
    folder: Path
    store: RunStore
    engine: Engine
    task: Any
    samples: list
    fresh: bool  # the folder did not exist before this process
    written: int = 0


def evaluate(spec: RunSpec, models: ModelPool | None = None,
             progress: Callable[[int, int], None] | None = None) -> RunOutcome:
    """Run (or resume) ``spec``; returns the folder and its summary.

    Everything that can be checked is checked before the run folder is created (an existing folder
    first, reading only, then the rest): the model loads,
    the task builds its samples and the chain its stages. The folder is then locked to this
    process; a run that ends in an error is marked failed in ``status.json`` (a signal: aborted)."""
    run = open_run(spec, models)
    with ending(run):
        run.written, summary = _fill(spec, run.store, run.engine, run.task, run.samples, progress)
    run.store.close()
    return RunOutcome(spec, run.folder, summary, run.written)


def open_run(spec: RunSpec, models: ModelPool | None = None) -> OpenRun:
    """Load, check and open ``spec``'s run (the folder is created only once every input is checked)."""
    torch.manual_seed(spec.seed)
    folder = Path(spec.output_path) / spec.run_id
    RunStore(folder).check_resumable(spec.run_id)  # a folder it cannot resume: refused before the model loads
    loaded = (models or ModelPool()).get(spec)
    task = TASKS.get(spec.task)(**spec.task_args)
    env = TaskEnv(tokenizer=loaded.tokenizer, model_name=spec.model, model_max_length=loaded.max_length,
                  seed=spec.seed)
    samples = task.samples(env)
    if spec.limit is not None:
        samples = samples[: spec.limit]
    if not samples:
        raise UserError(f"task '{spec.task}' with {spec.task_args} yields no samples. Fix: check --task-args "
                        f"(see `lcbench ls tasks`).")
    _check_lengths(samples, loaded.tokenizer, loaded.max_length, spec.model)
    chain = Chain.build(spec.method, spec.ratio)
    engine = Engine(loaded.model, loaded.tokenizer, chain, engine_config(spec, loaded, samples))
    if models is not None:
        engine.prefill_memo = models.memo_for(spec, chain)
        # the untimed warm-up pass (device start-up) once per loaded model, not once per run of it
        if not models.warmed_up:
            engine.warm_up()
            models.warmed_up = True
        engine.warmed_up = True
    store = RunStore(folder)
    fresh = not folder.exists()
    try:
        store.open(spec_payload(spec, engine))
    except OSError as exc:
        if disk_full(exc):
            raise disk_full_error(folder, exc, 0) from None
        raise UserError(f"cannot write results to '{folder}': {exc.strerror or exc}. Fix: pass a writable "
                        f"folder with --output-path.") from None
    for note in store.notes:
        warn(note)
    return OpenRun(spec, folder, store, engine, task, samples, fresh)


@contextlib.contextmanager
def ending(run: OpenRun):
    """How an open run ends when its work raises: aborted by a signal (then :class:`RunAborted`),
    failed on a full disk (then the disk-full error), failed otherwise — and a folder this process
    created for bad input found only once the first sample ran is removed again."""
    try:
        yield
    except KeyboardInterrupt as exc:
        _end(run.store, ABORTED, "stopped by " + signal.Signals(signal_number(exc)).name)
        raise RunAborted(run.folder, len(run.store.records()), signal_number(exc)) from None
    except OSError as exc:
        if not disk_full(exc):
            _end(run.store, FAILED, f"{type(exc).__name__}: {exc}")
            raise
        _end(run.store, FAILED, f"disk full: {exc}")
        raise disk_full_error(run.folder, exc, _count(run.store)) from None
    except BaseException as exc:
        if out_of_memory(exc):
            _end(run.store, FAILED, f"out of memory: {exc}")
            raise out_of_memory_error(run, exc) from None
        _end(run.store, FAILED, str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}")
        if (run.fresh and isinstance(exc, UserError) and not isinstance(exc, CompressionShortfall)
                and not _count(run.store)):
            _remove_fresh(run.folder)  # bad input found only once the first sample ran: leave no folder behind
        raise


def out_of_memory_error(run: OpenRun, exc: BaseException) -> RunFailed:
    """What a run that ran out of memory says: where, what is kept, how to go on (exit 1)."""
    detail = " ".join(str(exc).split())
    detail = detail.split("DefaultCPUAllocator: ", 1)[-1][:300]
    return RunFailed(f"out of memory on {run.spec.device or 'the device'}: {detail}. {_count(run.store)} records are "
                     f"kept in '{run.folder}'. Fix: re-run the same command with --batch-size 1 (one row at a time) or "
                     f"--prefill-chunk 4096 (prefill in pieces) to resume it; shorter task lengths, --model-args "
                     f"dtype=bfloat16 or --model-args device_map=auto (over several GPUs) start a new run.")


def spec_payload(spec: RunSpec, engine: Engine) -> dict[str, Any]:
    """spec.json: the spec and, when a stage calibrated on the model, which calibration the run used."""
    payload = spec.to_json()
    if engine.calibrations:
        payload["calibration"] = [c.to_json() for c in engine.calibrations]
    return payload


def _remove_fresh(folder: Path) -> None:
    """Delete a run folder this process just created and wrote no record into."""
    for name in (RunStore.SPEC, RunStore.STATUS, RunStore.SAMPLES, RunStore.LOCK):
        (folder / name).unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass


def _count(store: RunStore) -> int:
    try:
        return len(store.records())
    except (UserError, OSError):
        return 0


def _end(store: RunStore, state: str, error: str) -> None:
    """Mark how the run ended; on a full disk even status.json may not fit (the lock still goes)."""
    try:
        store.close(state, error)
    except OSError:
        store.release()


def _fill(spec: RunSpec, store: RunStore, engine: Engine, task, samples: list,
          progress: Callable[[int, int], None] | None) -> tuple[int, dict[str, Any]]:
    """Compute the turns the store lacks, then write the summary."""
    multi_turn = spec.mode == "multi_turn"
    written = 0
    by_id = {s.id: s for s in samples}
    loglik = spec.mode == LOGLIK  # records scored by their tokens' log-likelihood (engine/loglik.py)
    produce = (loglik_produce(engine, samples, store.done_turns(), task.score_tokens, task.args["chunk"],
                              spec.batch_size) if loglik else
               _produce(engine, samples, store.done_turns(), spec.batch_size, multi_turn))
    for finished, produced in produce:
        written += _write(spec, store, task, by_id, produced, scored=not loglik)
        if progress:
            progress(finished, len(samples))
    return written, _summary(spec, store, task, samples)


def _write(spec: RunSpec, store: RunStore, task, by_id: dict, produced: list[TurnRecord], scored: bool = True) -> int:
    """Score (unless the engine scored them), stamp and append ``produced``; returns how many."""
    for record in produced:
        sample = by_id[record.sample_id]
        if scored:
            record = record.scored(task.score(sample, sample.turns[record.turn], record.prediction))
        record = record.stamped(
            run_id=spec.run_id, task=spec.task, method=spec.method_name, model=spec.model)
        store.append(record)
    return len(produced)


def _summary(spec: RunSpec, store: RunStore, task, samples: list) -> dict[str, Any]:
    """The run's summary over its records of ``samples``, written to the store."""
    wanted = {s.id for s in samples}
    records = [r for r in store.records() if r["sample_id"] in wanted]
    summary = summarize(records, task.aggregate(records), suite_score(records, task.suite_score))
    summary.update({"run_id": spec.run_id, "task": spec.task, "method": spec.method_name,
                    "ratio": spec.ratio, "budget": spec.budget, "model": spec.model, "query_aware": spec.query_aware})
    store.write_json(RunStore.SUMMARY, summary)
    return summary


def engine_config(spec: RunSpec, loaded: LoadedModel, samples: list) -> EngineConfig:
    """The engine's execution settings, derived from the spec once (never changed during the run):
    ``--batch-size turns`` decodes all of a sample's turns together; ``N`` decodes N turns at a
    time; ``auto`` sizes that from free memory and the longest context."""
    rows: int | None = spec.batch_size if isinstance(spec.batch_size, int) else None
    if spec.batch_size == "auto":
        longest = max((len(loaded.tokenizer(s.context)["input_ids"]) for s in samples), default=1)
        rows = auto_rows(loaded.model, longest, spec.prefill_chunk)
    return EngineConfig(query_aware=spec.query_aware, prefill_chunk=spec.prefill_chunk, decode_rows=rows,
                        compress_chunks=spec.compress_chunks)


def _produce(engine: Engine, samples: list, done: dict[str, set[int]], batch_size: int | str,
             multi_turn: bool) -> Iterator[tuple[int, list[TurnRecord]]]:
    """``(samples finished, records)`` as they come: with ``--batch-size N|auto``, samples batched
    together where the chain and mode allow it (engine/batching.py); otherwise one sample at a
    time with its turns batched — both through the engine's one pipeline."""
    refusal = batch_refusal(engine.chain, multi_turn, engine.config.query_aware)
    if refusal is None and batch_size not in (1, "turns") and not engine.config.compress_chunks and not engine.one_row:
        # (compressing every chunk prefills each sample alone: its chunks' targets are its own)
        yield from run_batched(engine, samples, done, batch_size)
        return
    for i, sample in enumerate(samples):
        skip = done.get(sample.id, set())
        records = engine.run(sample, multi_turn, skip_turns=skip) if len(skip) < len(sample.turns) else []
        yield i + 1, records
