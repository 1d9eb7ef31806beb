"""Runs that share prefills, run sample by sample side by side so their turns decode in one batch
(issue #14: "decoding runs' turns together where memory allows").

:func:`evaluate` runs one spec from its first sample to its last. Runs that share prefills
(:mod:`lcbench.engine.shared_prefill`) still decode one after the other that way: the context is
prefilled once, but every run pays its own decode, one row per step. :func:`evaluate_together`
opens every run of such a group (each its own folder, exactly as :func:`evaluate` opens it), and
for each sample lets each run prepare and compress its copy of the shared prefill; then all their
rows prefill their question parts and decode in one batch (:func:`lcbench.engine.joint.decode_together`),
and each run scores and writes its own records. Each record is the one the run writes alone
(tokens, KV bytes at compression and at the end, kept tokens, achieved ratio); ``question_prefill_s``
and ``decode_s`` are the joint passes' and ``batch_rows`` how many rows shared them. A run that fails (a shortfall, bad
input found at its first sample) is ended as :func:`evaluate` ends it and the others go on; a
signal aborts every open run, each resumable. Resume works per run: a run skips the turns its
folder holds, and the others still decode together. Memory: the compressed caches waiting for the
joint decode are held together; when they outgrow the sharing budget (``--share-prefill``: half
the free memory by default, or the MB given) the runs asked so far decode first.
"""

from __future__ import annotations

import contextlib
import signal
from typing import Callable, Iterator

from .engine.joint import decode_together
from .errors import RunAborted, signal_number
from .evaluate import (ModelPool, OpenRun, RunOutcome, _count, _end, _share_key, _sharing_chain, _summary, _write,
                       ending, evaluate, open_run)
from .results.store import ABORTED
from .spec import RunSpec


def together_groups(specs: list[RunSpec]) -> list[list[RunSpec]]:
    """``specs`` in groups that run together (two or more runs that share prefills, decode whole
    samples' turns at once and score by generation), each other run alone; in first-seen order."""
    groups: dict[tuple, list[RunSpec]] = {}
    for i, spec in enumerate(specs):
        joinable = (spec.mode == "multi_request" and spec.batch_size == "turns" and _sharing_chain(spec) is not None)
        groups.setdefault(_share_key(spec) if joinable else ("alone", i), []).append(spec)
    return list(groups.values())


def evaluate_together(specs: list[RunSpec], models: ModelPool,
                      progress: Callable[[RunSpec, int, int], None] | None = None) -> list[RunOutcome | Exception]:
    """Run (or resume) ``specs`` side by side, each sample's turns of every run decoded in one
    batch; per spec, its outcome or the exception that ended it (what :func:`evaluate` alone
    would have raised). A signal ends every open run aborted and raises :class:`RunAborted`."""
    results: dict[int, RunOutcome | BaseException] = {}
    live: list[tuple[int, OpenRun]] = []
    try:
        for i, spec in enumerate(specs):
            try:
                live.append((i, open_run(spec, models)))
            except Exception as exc:  # bad input: this run's, not the others'
                results[i] = exc
        for n in range(max((len(run.samples) for _, run in live), default=0)):
            asked, held = [], 0
            for i, run in list(live):
                if n >= len(run.samples):
                    continue
                sample = run.samples[n]
                skip = run.store.done_turns().get(sample.id, set())
                if len(skip) >= len(sample.turns):
                    continue
                with _ended_apart(i, run, results, live):
                    prepared = run.engine.prepare(sample, skip_turns=skip)
                    if run.engine.one_row:  # a hybrid model: its turns one unpadded row at a time, still sharing the prefill
                        run.written += _write(run.spec, run.store, run.task, {sample.id: sample},
                                              run.engine.run_group([prepared]))
                        continue
                    pending = run.engine.ask(prepared)
                    held += pending.cache.nbytes()
                    asked.append((i, run, pending))
                budget = run.engine.prefill_memo.budget_bytes if run.engine.prefill_memo is not None else None
                if budget is not None and held > budget and len(asked) > 1:
                    # the compressed caches waiting to decode outgrew the sharing budget: decode these now
                    _decode(asked, results, live)
                    asked, held = [], 0
            if asked:
                _decode(asked, results, live)
            for i, run in live:
                if progress and n < len(run.samples):
                    progress(run.spec, n + 1, len(run.samples))
    except KeyboardInterrupt as exc:  # a signal (RunAborted: while one run was working)
        sig = signal_number(exc)
        for i, run in live:
            if i not in results:
                _end(run.store, ABORTED, "stopped by " + signal.Signals(sig).name)
                results[i] = RunAborted(run.folder, _count(run.store), sig)
        raise next((r for r in results.values() if isinstance(r, RunAborted)), exc) from None
    for i, run in live:
        with ending(run):
            summary = _summary(run.spec, run.store, run.task, run.samples)
        run.store.close()
        results[i] = RunOutcome(run.spec, run.folder, summary, run.written)
    return [results[i] for i in range(len(specs))]


@contextlib.contextmanager
def _ended_apart(i: int, run: OpenRun, results: dict, live: list):
    """Run's work: an error ends this run (as :func:`ending` does) and the others go on; a signal
    ends it aborted and is raised on."""
    try:
        with ending(run):
            yield
    except KeyboardInterrupt as exc:
        results[i] = exc
        live.remove((i, run))
        raise
    except Exception as exc:
        results[i] = exc
        live.remove((i, run))


def _decode(asked: list, results: dict, live: list) -> None:
    """Decode the asked turns of several runs together and write each run's records."""
    try:
        produced = decode_together([pending for _, _, pending in asked])
    except Exception as exc:  # the joint decode failed: every run in it ends with that error
        for i, run, _ in asked:
            with _ended_apart(i, run, results, live):
                raise exc
        return
    for (i, run, pending), records in zip(asked, produced):
        by_id = {pending.prepared.sample.id: pending.prepared.sample}
        with _ended_apart(i, run, results, live):
            run.written += _write(run.spec, run.store, run.task, by_id, records)


def run_each(specs: list[RunSpec], models: ModelPool,
             progress: Callable[[RunSpec, int, int], None] | None = None) -> Iterator[tuple[RunSpec, RunOutcome | Exception]]:
    """Every spec's outcome (or the exception that ended it), group by group
    (:func:`together_groups`): a group of runs side by side, any other run alone by :func:`evaluate`
    — started only when the caller asks for the next outcome."""
    for group in together_groups(specs):
        if len(group) > 1:
            yield from zip(group, evaluate_together(group, models, progress))
            continue
        spec = group[0]
        try:
            yield spec, evaluate(spec, models, progress=(lambda i, n: progress(spec, i, n)) if progress else None)
        except Exception as exc:
            yield spec, exc
