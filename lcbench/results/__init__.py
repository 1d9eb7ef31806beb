"""The run store: ``results/<run-id>/{spec.json, samples.jsonl, summary.json}`` (JSON only), and
the typed record of one turn that ``samples.jsonl`` holds a line of."""

from pathlib import Path

from .record import Measured, TurnRecord
from .store import RunStore


def read_records(folder: str | Path) -> list[TurnRecord]:
    """The turn records of a run folder, read through their schema (older flat files too)."""
    return RunStore(folder).records()


__all__ = ["Measured", "RunStore", "TurnRecord", "read_records"]
