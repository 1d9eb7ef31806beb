"""One run's folder. Records are appended and flushed one turn at a time, so a killed run
loses at most the line being written; re-opening the folder resumes (keyed by sample id and
turn), drops a torn last line, and never duplicates a record. The store runs nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from ..errors import UserError


class RunStore:
    SPEC, SAMPLES, SUMMARY = "spec.json", "samples.jsonl", "summary.json"

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)

    # --- writing --------------------------------------------------------------------------
    def open(self, spec: dict[str, Any]) -> None:
        """Create the folder (or check it belongs to the same spec) and repair a torn tail."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe = self.folder / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise UserError(
                f"cannot write results to '{self.folder}': {exc.strerror or exc}. "
                f"Fix: pass a writable folder with --output-path."
            ) from None
        spec_path = self.folder / self.SPEC
        if spec_path.exists():
            old = json.loads(spec_path.read_text())
            if old.get("run_id") != spec.get("run_id"):
                raise UserError(f"'{self.folder}' holds another run ({old.get('run_id')}). Fix: choose another --output-path.")
        self.write_json(self.SPEC, spec)
        self._repair_tail()

    def _repair_tail(self) -> None:
        path = self.folder / self.SAMPLES
        if not path.exists():
            return
        data = path.read_bytes()
        if not data:
            return
        lines = data.split(b"\n")
        good = []
        for line in lines:
            if not line.strip():
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError:
                break  # a line torn by a kill: drop it and everything after
            good.append(line)
        fixed = b"".join(line + b"\n" for line in good)
        if fixed != data:
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(fixed)
            os.replace(tmp, path)

    def append(self, record: dict[str, Any]) -> None:
        with open(self.folder / self.SAMPLES, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False, default=_json_default) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write_json(self, name: str, payload: Any) -> None:
        tmp = self.folder / (name + ".tmp")
        tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False, default=_json_default))
        os.replace(tmp, self.folder / name)

    # --- reading --------------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        return self._read_json(self.SPEC)

    def summary(self) -> dict[str, Any]:
        return self._read_json(self.SUMMARY)

    def _read_json(self, name: str) -> dict[str, Any]:
        path = self.folder / name
        if not path.exists():
            raise UserError(f"'{self.folder}' is not an lcbench run folder ({name} is missing). "
                            f"Fix: pass folders written by `lcbench run` (results/<run-id>/).")
        return json.loads(path.read_text())

    def records(self) -> list[dict[str, Any]]:
        path = self.folder / self.SAMPLES
        if not path.exists():
            return []
        out = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
        return out

    def done_turns(self) -> dict[str, set[int]]:
        done: dict[str, set[int]] = {}
        for r in self.records():
            done.setdefault(r["sample_id"], set()).add(int(r["turn"]))
        return done


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Run folders among ``paths`` (a run folder itself, or a folder containing run folders)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if (p / RunStore.SPEC).exists():
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(q.parent for q in p.glob("**/" + RunStore.SPEC)))
        else:
            raise UserError(f"'{p}' does not exist. Fix: pass run folders written by `lcbench run`.")
    if not found:
        raise UserError(f"no lcbench runs found under {', '.join(map(str, paths))}. Fix: run `lcbench run` first.")
    return found
