"""Loading SCBench's released rows: ``{"id", "context", "multi_turns": [{"input", "answer", ...}]}``
(``scbench/readme.md``), from a local folder or the hub (``load_dataset("microsoft/SCBench", task,
split="test")``, as ``run_scbench.py``).

A local folder may hold the released JSONL files (``<task>.jsonl``, also under ``data/``, or the
older ``multi_turn_<name>.jsonl`` names) or the hub's parquet layout (``<task>/<split>-*.parquet``
as the repository holds it, or ``<task>/<split>/*.parquet`` as its parquet-conversion branch).
Every row is checked against the released schema (:func:`check_schema`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...errors import UserError
from ..hub import datasets_error_cause
from .protocol import PROTOCOL


def _plain(value: Any) -> Any:
    """Arrow/numpy values → plain Python (lists, ints, strings)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def candidates(folder: Path, task: str) -> list[Path]:
    old = task.replace("scbench_", "multi_turn_", 1)
    return [folder / f"{task}.jsonl", folder / "data" / f"{task}.jsonl", folder / f"{old}.jsonl",
            folder / "data" / f"{old}.jsonl", folder / task, folder / old]


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    raise UserError(f"scbench: line {n} of '{path}' is not JSON. Fix: pass the released "
                                    f"{path.name} unchanged.") from None
    return rows


def parquet_files(path: Path) -> list[Path]:
    """Parquet shards of one config: ``<task>/*.parquet`` (``push_to_hub``'s ``<split>-0000N-of-…``
    files, as the hub repository holds them) or ``<task>/<split>/*.parquet`` (the hub's
    ``refs/convert/parquet`` layout); the first split of ``hub_splits`` that has files wins."""
    for split in PROTOCOL["defaults"]["hub_splits"]:
        files = sorted(path.glob(f"{split}-*.parquet")) or sorted(path.glob(f"{split}/*.parquet"))
        if files:
            return files
    return sorted(path.glob("*.parquet")) or sorted(path.glob("*/*.parquet"))


def check_schema(rows: list[dict], task: str, where: str) -> list[dict]:
    """The released schema (``scbench/readme.md``; the hub card's ``dataset_info``): ``context`` (``input``
    in older files) and ``multi_turns``, a list of ``{"input", "answer", ...}``."""
    for n, row in enumerate(rows):
        turns = row.get("multi_turns") if isinstance(row, dict) else None
        ok = (isinstance(row, dict) and ("context" in row or "input" in row) and isinstance(turns, list) and turns
              and all(isinstance(t, dict) and "input" in t and "answer" in t for t in turns))
        if not ok:
            have = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
            raise UserError(f"scbench: row {n} of {task} in {where} is not in SCBench's released schema (context and "
                            f"multi_turns: a list of {{input, answer}}; it has {have}). Fix: use microsoft/SCBench's "
                            f"files unchanged (data/{task}.jsonl, or the hub's parquet), or another data_dir.")
    return rows


def load_local(folder: Path, task: str) -> list[dict]:
    for path in candidates(folder, task):
        if path.is_file():
            return check_schema(read_jsonl(path), task, str(path))
        files = parquet_files(path) if path.is_dir() else []
        if files:
            import datasets

            rows = [_plain(r) for r in datasets.load_dataset("parquet", data_files=[str(p) for p in files],
                                                             split="train")]
            return check_schema(rows, task, str(path))
    looked = ", ".join(str(p) for p in candidates(folder, task)[:3])
    raise UserError(f"scbench: no data for {task} in '{folder}' (looked for {looked}, or a {task}/ folder of "
                    f"parquet files). Fix: download microsoft/SCBench's data/{task}.jsonl into that folder, or "
                    f"point data_dir= at the folder that has it.")


def load_hub(task: str) -> list[dict]:
    """``load_dataset("microsoft/SCBench", task, split="test")`` (``run_scbench.py``; the card's parquet,
    no loading script), falling back to the older cards' ``train`` split."""
    repo = PROTOCOL["defaults"]["hub_dataset"]
    try:
        import datasets

        last: Exception | None = None
        for split in PROTOCOL["defaults"]["hub_splits"]:
            try:
                rows = [_plain(r) for r in datasets.load_dataset(repo, task, split=split)]
                return check_schema(rows, task, f"the hub dataset {repo}")
            except ValueError as exc:  # the split does not exist under this card's naming
                if "split" not in str(exc).lower():
                    raise
                last = exc
        raise last if last else RuntimeError("no split")
    except UserError:
        raise
    except Exception as exc:  # datasets raises many types; _hub_cause names the real one
        raise UserError(
            f"scbench: {task} could not be loaded from the hub dataset '{repo}': {datasets_error_cause(exc)}. Fix: run once "
            f"with network access (the data is cached in the HF cache), or download the released files "
            f"(data/{task}.jsonl) and pass their folder with --task-args data_dir=PATH (or --data-dir PATH)."
        ) from None


def load_rows(task: str, data_dir: str | Path | None) -> list[dict]:
    """Rows of ``task`` from ``data_dir`` when given, else from the hub."""
    if data_dir:
        folder = Path(data_dir)
        if not folder.is_dir():
            raise UserError(f"scbench: data_dir '{folder}' is not a folder. Fix: data_dir=PATH to a folder holding "
                            f"the released <task>.jsonl files.")
        return load_local(folder, task)
    return load_hub(task)
