"""Loading SCBench's released rows: ``{"id", "context", "multi_turns": [{"input", "answer", ...}]}``
(``scbench/readme.md``), from a local folder or the hub (``load_dataset("microsoft/SCBench", task,
split="test")``, as ``run_scbench.py``).

A local folder may hold the released JSONL files (``<task>.jsonl``, also under ``data/``, or the
older ``multi_turn_<name>.jsonl`` names) or the hub's parquet layout (``<task>/*.parquet``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...errors import UserError
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


def load_local(folder: Path, task: str) -> list[dict]:
    for path in candidates(folder, task):
        if path.is_file():
            return read_jsonl(path)
        if path.is_dir() and sorted(path.glob("*.parquet")):
            import datasets

            files = [str(p) for p in sorted(path.glob("*.parquet"))]
            return [_plain(r) for r in datasets.load_dataset("parquet", data_files=files, split="train")]
    looked = ", ".join(str(p) for p in candidates(folder, task)[:3])
    raise UserError(f"scbench: no data for {task} in '{folder}' (looked for {looked}, or a {task}/ folder of "
                    f"parquet files). Fix: download microsoft/SCBench's data/{task}.jsonl into that folder, or "
                    f"point data_dir= at the folder that has it.")


def load_hub(task: str) -> list[dict]:
    repo = PROTOCOL["defaults"]["hub_dataset"]
    try:
        import datasets

        last: Exception | None = None
        for split in PROTOCOL["defaults"]["hub_splits"]:
            try:
                return [_plain(r) for r in datasets.load_dataset(repo, task, split=split)]
            except ValueError as exc:  # the split does not exist under this card's naming
                last = exc
        raise last if last else RuntimeError("no split")
    except Exception as exc:  # offline, missing dataset, hub errors: all mean "no data here"
        raise UserError(
            f"scbench: {task} could not be loaded from the hub dataset '{repo}' ({type(exc).__name__}). "
            f"Fix: download the released files (data/{task}.jsonl) and pass their folder with --task-args "
            f"data_dir=PATH (or --data-dir PATH)."
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
