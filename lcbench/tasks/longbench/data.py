"""Loading LongBench rows: from the Hugging Face hub with ``datasets`` (``zai-org/LongBench``, the
repository's current name, then ``THUDM/LongBench``; config ``<dataset>`` or ``<dataset>_e``,
split ``test``, as ``LongBench/pred.py``) or from a local folder of ``<config>.jsonl`` files in
the released format (``data.zip`` unpacks to ``data/<config>.jsonl``; both the folder and its
parent are accepted). Row fields: ``input, context, answers, length, dataset, language,
all_classes, _id``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...errors import UserError
from .protocol import longbench_protocol

_DOWNLOAD_HINT = (
    "download data.zip from https://huggingface.co/datasets/zai-org/LongBench (formerly THUDM/LongBench), "
    "unzip it and pass the folder that holds <dataset>.jsonl as the task argument data_dir=PATH (or --data-dir PATH)"
)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file (blank lines skipped); a UserError names the bad line."""
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}: line {number} is not valid JSON ({exc.msg}). Fix: the file must hold one "
                                f"LongBench row (a JSON object) per line, as in LongBench's data.zip.") from None
    return rows


def local_file(data_dir: Path, config: str) -> Path | None:
    """``<data_dir>/<config>.jsonl`` or ``<data_dir>/data/<config>.jsonl``, if either exists."""
    for candidate in (data_dir / f"{config}.jsonl", data_dir / "data" / f"{config}.jsonl"):
        if candidate.is_file():
            return candidate
    return None


def load_local(data_dir: Path, config: str) -> list[dict[str, Any]]:
    if not data_dir.is_dir():
        raise UserError(f"LongBench data_dir '{data_dir}' is not a folder. Fix: {_DOWNLOAD_HINT}.")
    path = local_file(data_dir, config)
    if path is None:
        have = sorted(p.stem for p in data_dir.glob("*.jsonl")) or sorted(p.stem for p in data_dir.glob("data/*.jsonl"))
        listing = ", ".join(have[:30]) if have else "no .jsonl files"
        raise UserError(f"LongBench data_dir '{data_dir}' has no {config}.jsonl (it has: {listing}). "
                        f"Fix: {_DOWNLOAD_HINT}.")
    return read_jsonl(path)


def hub_load(repo: str, config: str, split: str) -> list[dict[str, Any]]:
    """``datasets.load_dataset(repo, config, split=split)`` as a list of rows."""
    import datasets

    return [dict(row) for row in datasets.load_dataset(repo, config, split=split)]


def _repo_missing(exc: Exception) -> bool:
    """True when the hub answered that the repository/config does not exist (try the next id);
    False for network failures, where trying another id would only wait again."""
    try:
        from datasets.exceptions import DatasetNotFoundError
    except ImportError:  # older datasets
        DatasetNotFoundError = FileNotFoundError  # noqa: N806
    return isinstance(exc, (DatasetNotFoundError, FileNotFoundError)) and not isinstance(exc, ConnectionError)


def load_hub(config: str) -> list[dict[str, Any]]:
    proto = longbench_protocol()
    tried = []
    for repo in proto["hub_ids"]:
        try:
            return hub_load(repo, config, proto["split"])
        except Exception as exc:  # datasets raises many types; all end in the same advice
            tried.append(f"{repo}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            if not _repo_missing(exc):
                break
    raise UserError(f"Could not load LongBench config '{config}' from the Hugging Face hub ({'; '.join(tried)}). "
                    f"Offline? Fix: {_DOWNLOAD_HINT}.")


def load_rows(config: str, data_dir: str | Path | None) -> list[dict[str, Any]]:
    """The rows of one LongBench config, in file order (row index = position)."""
    if data_dir:
        return load_local(Path(data_dir).expanduser(), config)
    return load_hub(config)
