"""Run folders for the report, leaderboard and check tests.

``write_run`` writes a run folder in the store's format with chosen scores (so tests can pin
exact table values and regressions); ``tiny_runs`` produces real runs of the tiny random model
with ``evaluate`` (so the readers are tested on what ``lcbench run`` writes). The test in this
file keeps the two formats from drifting apart.
"""

from __future__ import annotations

import functools
import re
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from lcbench.results.record import TurnRecord
from lcbench.results.store import RunStore
from lcbench.results.summary import summarize
from lcbench.spec import RunSpec, provenance

TINY_NIAH = "lengths=300,depths=0;100,max_new_tokens=4"
KV_BYTES_FULL = 1_000_000


def write_run(root: Path, scores: Sequence[float], *, method: str = "snapkv", ratio: float = 0.5,
              model: str = "tiny-random-llama", task: str = "niah", achieved: float | None = None,
              metas: Sequence[dict[str, Any]] | None = None, turns: Sequence[int] | None = None,
              query_aware: bool = False, predictions: Sequence[str] | None = None,
              sample_ids: Sequence[str] | None = None) -> Path:
    """A run folder whose i-th record has score ``scores[i]`` (sample ``s<i>``, turn 0 unless given)."""
    achieved = ratio if achieved is None else achieved
    spec = RunSpec(model=model, model_args={"dtype": "float32"},
                   method=[{"name": n, "ratio": ratio, "args": {}} for n in method.split("+")], ratio=ratio,
                   task=task, task_args={"lengths": "500;1000"}, task_version="1.0", task_template_hash="0" * 16,
                   query_aware=query_aware, output_path=str(root))
    folder = root / re.sub(r"[^A-Za-z0-9._-]+", "_", spec.run_id)
    store = RunStore(folder)
    store.open(spec.to_json())
    records = []
    for i, score in enumerate(scores):
        meta = {"dataset": task, "length": 500, "length_bucket": 500}
        meta.update((metas[i] if metas else {}))
        kv = int(KV_BYTES_FULL * (1 - achieved))
        records.append({
            "sample_id": sample_ids[i] if sample_ids else f"s{i}", "turn": turns[i] if turns else 0, "meta": meta,
            "prediction": predictions[i] if predictions else f"answer {i}", "answers": [f"gold {i}"],
            "input_tokens": 400 + 100 * i, "context_tokens": 380 + 100 * i, "kv_bytes": kv,
            "kv_bytes_full": KV_BYTES_FULL, "kept_tokens": 100.0, "achieved_ratio": achieved,
            "requested_ratio": ratio, "text_s": 0.0, "prefill_s": 0.1, "compress_s": 0.01,
            "question_prefill_s": 0.02, "ttft_s": 0.12 + 0.01 * i, "decode_tokens": 4, "decode_s": 0.1,
            "decode_tok_s": 40.0, "batch_rows": 1, "peak_memory_mb": 500.0, "memory_kind": "cpu_rss",
            "score": float(score), "run_id": spec.run_id, "task": task, "method": method, "model": model,
        })
    for record in records:
        store.append(TurnRecord.from_json(record))  # written as lcbench writes it (schema 2)
    store.write_json(RunStore.SUMMARY, summarize(records))
    store.close()  # status.json: complete; the writer's lock released
    return folder


@functools.lru_cache(maxsize=None)
def tiny_runs() -> tuple[Path, ...]:
    """Real runs of the tiny random Llama (full and snapkv at 0.5) on a small NIAH grid (cached)."""
    from lcbench.evaluate import ModelPool, build_spec, evaluate

    torch.set_num_threads(2)
    root = Path(tempfile.mkdtemp(prefix="lcbench-tiny-runs-"))
    pool = ModelPool()
    folders = []
    for method in ("full", "snapkv"):
        spec = build_spec(model="tiny-random-llama", method=method, ratio=0.5, task="niah", task_args=TINY_NIAH,
                          device="cpu", output_path=str(root))
        folders.append(evaluate(spec, pool).folder)
    return tuple(folders)


def test_written_runs_have_the_fields_of_real_runs(tmp_path):
    """The synthetic records carry only fields real records carry, so the readers see the real format."""
    real = RunStore(tiny_runs()[1]).records()
    fake = RunStore(write_run(tmp_path, [1.0, 0.0])).records()
    assert len(real) == 2  # 1 length × 2 depths
    assert set(fake[0]) <= set(real[0])
    assert set(fake[0]["meta"]) <= set(real[0]["meta"])
    real_spec = RunStore(tiny_runs()[1]).spec()
    assert set(RunStore(write_run(tmp_path / "b", [1.0])).spec()) == set(real_spec) >= {"run_id", "spec", "provenance"}
    assert set(real_spec["provenance"]) == set(provenance())
