"""The run store: ``results/<run-id>/{spec.json, samples.jsonl, summary.json}`` (JSON only)."""

from .store import RunStore

__all__ = ["RunStore"]
