"""Loading LongBench rows, from the released ``data.zip`` or a local copy of it.

- **Hub (default).** ``data.zip`` of the dataset repo ``zai-org/LongBench`` (formerly
  ``THUDM/LongBench``) at a pinned commit (``tasks/longbench.json`` → ``hub``; the task argument
  ``revision`` overrides it and the spec records it), fetched once with huggingface_hub's client into
  the HF cache and read in place: member ``data/<config>.jsonl``. This is the file LongBench's README
  offers for download; the repository's ``LongBench.py`` loading script, which ``datasets`` ≥ 4 refuses
  to run, is not used.
- **Local.** ``data_dir=PATH``: a folder of ``<config>.jsonl`` (the unpacked ``data/`` folder, or its
  parent), or ``data.zip`` itself.

Row fields (``LongBench/README.md`` "Data Format"): ``input, context, answers, length, dataset,
language, all_classes, _id``; rows without ``input``/``context``/``answers`` are a schema error.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any, Iterable

from ...errors import UserError
from ..hub import HubFile, download
from .protocol import longbench_protocol

REQUIRED = ("input", "context", "answers")


def _hub() -> dict[str, str]:
    return longbench_protocol()["hub"]


def default_revision() -> str:
    return _hub()["revision"]


def _download_hint() -> str:
    hub = _hub()
    return (f"or download {hub['file']} from https://huggingface.co/datasets/{hub['repo']} (formerly THUDM/LongBench), "
            f"and pass it or its unzipped data/ folder as --data-dir PATH (task argument data_dir=PATH)")


def parse_jsonl(lines: Iterable[str], where: str, required: tuple[str, ...] = REQUIRED) -> list[dict[str, Any]]:
    """Rows of JSON-lines text (blank lines skipped); a UserError names the bad line or field."""
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: line {number} is not valid JSON ({exc.msg}). Fix: the file must hold one "
                            f"LongBench row (a JSON object) per line, as in LongBench's data.zip.") from None
        missing = [k for k in required if not isinstance(row, dict) or k not in row]
        if missing:
            have = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
            raise UserError(f"{where}: line {number} is not a LongBench row (missing {', '.join(missing)}; it has "
                            f"{have}). Fix: use LongBench's released files (fields input, context, answers, length, "
                            f"dataset, language, all_classes, _id).")
        rows.append(row)
    return rows


def read_jsonl(path: Path, required: tuple[str, ...] = REQUIRED) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return parse_jsonl(f, str(path), required)


def read_zip(path: Path, config: str) -> list[dict[str, Any]]:
    """``data/<config>.jsonl`` from LongBench's ``data.zip``."""
    member = _hub()["member"].format(config=config)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UserError(f"LongBench: '{path}' is not a readable zip archive ({exc}). Fix: delete it (a partial "
                        f"download?) and run again, {_download_hint()}.") from None
    with archive:
        names = archive.namelist()
        if member not in names:
            have = sorted(n for n in names if n.endswith(".jsonl"))
            raise UserError(f"LongBench: '{path}' has no {member} (it has {len(have)} .jsonl files: "
                            f"{', '.join(have[:8])}{'…' if len(have) > 8 else ''}), so it is not LongBench's "
                            f"released data.zip layout. Fix: {_download_hint()[3:]}.")
        with archive.open(member) as raw:
            return parse_jsonl(io.TextIOWrapper(raw, encoding="utf-8"), f"{path}:{member}")


def local_file(data_dir: Path, config: str) -> Path | None:
    """``<data_dir>/<config>.jsonl`` or ``<data_dir>/data/<config>.jsonl``, if either exists."""
    for candidate in (data_dir / f"{config}.jsonl", data_dir / "data" / f"{config}.jsonl"):
        if candidate.is_file():
            return candidate
    return None


def load_local(data_dir: Path, config: str) -> list[dict[str, Any]]:
    if data_dir.is_file() and data_dir.suffix == ".zip":
        return read_zip(data_dir, config)
    if not data_dir.is_dir():
        raise UserError(f"LongBench data_dir '{data_dir}' is neither a folder nor data.zip. Fix: pass the folder "
                        f"holding <dataset>.jsonl, drop --data-dir to load from the hub, {_download_hint()}.")
    if (data_dir / "data.zip").is_file() and local_file(data_dir, config) is None:
        return read_zip(data_dir / "data.zip", config)
    path = local_file(data_dir, config)
    if path is None:
        have = sorted(p.stem for p in data_dir.glob("*.jsonl")) or sorted(p.stem for p in data_dir.glob("data/*.jsonl"))
        listing = ", ".join(have[:30]) if have else "no .jsonl files"
        raise UserError(f"LongBench data_dir '{data_dir}' has no {config}.jsonl (it has: {listing}). "
                        f"Fix: drop --data-dir to load from the hub, {_download_hint()}.")
    return read_jsonl(path)


def hub_file(revision: str | None = None) -> HubFile:
    hub = _hub()
    return HubFile(hub["repo"], hub["file"], revision or hub["revision"])


def load_hub(config: str, revision: str | None = None) -> list[dict[str, Any]]:
    """``config``'s rows from the hub's ``data.zip`` (downloaded once into the HF cache)."""
    path = download(hub_file(revision), f"LongBench '{config}'", _download_hint()[3:])
    return read_zip(path, config)


def load_rows(config: str, data_dir: str | Path | None, revision: str | None = None) -> list[dict[str, Any]]:
    """The rows of one LongBench config, in file order (row index = position)."""
    if data_dir:
        return load_local(Path(data_dir).expanduser(), config)
    return load_hub(config, revision)
