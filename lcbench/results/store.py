"""One run's folder: ``results/<run-id>/{spec.json, samples.jsonl, summary.json, status.json}``.

Records are appended and flushed one turn at a time, so a killed run loses at most the line being
written; re-opening the folder resumes (keyed by sample id and turn) and never duplicates a record:

- one writer per folder: ``.lock`` holds the writer's pid and host; a second writer is refused
  with that pid; a lock whose process is gone (killed) is taken over;
- a torn last line (a kill in the middle of a write) is dropped; a corrupt line *between* good
  ones is moved to ``samples.quarantine.jsonl`` (with its line number), every other record kept;
- ``status.json`` says how the last writer ended: ``running`` (``incomplete`` once killed), ``complete``,
  ``failed`` (with the error: a compression shortfall, a crash, a full disk) or ``aborted``
  (Ctrl-C/SIGTERM); reports never show a failed run as a valid result.

The store runs nothing.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterable

from ..errors import RunFailed, UserError
from .record import TurnRecord

RUNNING, COMPLETE, FAILED, ABORTED, INCOMPLETE = "running", "complete", "failed", "aborted", "incomplete"
DISK_FULL = {28, 122, 27}  # ENOSPC, EDQUOT, EFBIG


class RunStore:
    SPEC, SAMPLES, SUMMARY, STATUS = "spec.json", "samples.jsonl", "summary.json", "status.json"
    QUARANTINE, LOCK = "samples.quarantine.jsonl", ".lock"

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        self.notes: list[str] = []  # what opening the folder repaired, for the user to read
        self._locked = False

    # --- writing --------------------------------------------------------------------------
    def open(self, spec: dict[str, Any]) -> None:
        """Create the folder (or check it belongs to the same spec), take the writer's lock and
        repair the records (torn tail dropped, corrupt lines quarantined)."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe = self.folder / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise UserError(
                f"cannot write results to '{self.folder}': {exc.strerror or exc}. "
                f"Fix: pass a writable folder with --output-path."
            ) from None
        self._check_spec(spec.get("run_id"))
        self._lock()
        try:
            self._repair()
            self.records()  # every kept record names its sample and turn
            self.write_json(self.SPEC, spec)  # after the checks: a refused resume leaves spec.json as it was
            self.mark(RUNNING)
        except BaseException:
            self.release()
            raise

    def check_resumable(self, run_id: str) -> None:
        """The checks :meth:`open` makes of a folder that already exists (it holds this run, no live
        writer holds it, its records name their turns), reading only: so a run refuses a folder it
        could not resume before it spends minutes loading its model."""
        if not self.folder.is_dir():
            return
        self._check_spec(run_id)
        holder = _read_lock(self.folder / self.LOCK)
        if holder and not self._mine(holder) and _alive(holder, socket.gethostname()):
            raise self._live_writer(holder)
        self.records()

    def _check_spec(self, run_id: str | None) -> None:
        if (self.folder / self.SPEC).exists():
            old = self._read_json(self.SPEC)
            if not isinstance(old, dict) or old.get("run_id") != run_id:
                other = old.get("run_id") if isinstance(old, dict) else None
                raise UserError(f"'{self.folder}' holds another run ({other}). Fix: choose another --output-path.")

    @staticmethod
    def _mine(holder: dict) -> bool:
        return holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()

    def _live_writer(self, holder: dict) -> UserError:
        return UserError(
            f"'{self.folder}' is being written by another lcbench process (pid {holder.get('pid')} on "
            f"{holder.get('host')}); two writers would duplicate its records. Fix: wait for it to end "
            f"or stop it (kill {holder.get('pid')}), then re-run; or pass another --output-path.")

    def _lock(self) -> None:
        path = self.folder / self.LOCK
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_lock(path)
                if self._mine(holder):
                    self._locked = True  # this process already writes here (re-entrant)
                    return
                if _alive(holder, me["host"]):
                    raise self._live_writer(holder) from None
                path.unlink(missing_ok=True)  # the holder is gone (killed): take the lock over
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._locked = True
            return
        raise UserError(f"could not take the lock {path}. Fix: delete it if no lcbench process writes there.")

    def release(self) -> None:
        """Give up the writer's lock (only one this process holds)."""
        if not self._locked:
            return
        path = self.folder / self.LOCK
        holder = _read_lock(path)
        if holder.get("pid") == os.getpid():
            path.unlink(missing_ok=True)
        self._locked = False

    def close(self, state: str = COMPLETE, error: str | None = None) -> None:
        """Record how the run ended and release the lock."""
        try:
            self.mark(state, error)
        finally:
            self.release()

    def mark(self, state: str, error: str | None = None) -> None:
        self.write_json(self.STATUS, {"state": state, "error": error, "pid": os.getpid(), "time": time.time()})

    def _repair(self) -> None:
        path = self.folder / self.SAMPLES
        if not path.exists():
            return
        data = path.read_bytes()
        if not data:
            return
        lines = data.split(b"\n")
        parsed = [(i + 1, line, _parse(line)) for i, line in enumerate(lines) if line.strip()]
        last_good = max((k for k, (_, _, rec) in enumerate(parsed) if rec is not None), default=-1)
        good, bad = [], []
        for k, (number, line, rec) in enumerate(parsed):
            if rec is not None:
                good.append(line)
            elif k < last_good:  # corrupt between good records: keep it aside, keep the rest
                bad.append((number, line))
            # else: a torn tail (a kill mid-write) is dropped; its turns are recomputed
        fixed = b"".join(line + b"\n" for line in good)
        if bad:
            with open(self.folder / self.QUARANTINE, "a", encoding="utf-8") as f:
                for number, line in bad:
                    f.write(json.dumps({"line": number, "text": line.decode("utf-8", "replace")}) + "\n")
            self.notes.append(f"{path}: {len(bad)} corrupt line(s) (line {', '.join(str(n) for n, _ in bad)}) moved "
                              f"to {self.folder / self.QUARANTINE}; the other {len(good)} records are kept and the "
                              f"quarantined turns are recomputed")
        if fixed != data:
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(fixed)
            os.replace(tmp, path)

    def append(self, record: TurnRecord) -> None:
        """One turn's record, as one line of its schema (:mod:`lcbench.results.record`), synced."""
        with open(self.folder / self.SAMPLES, "a", encoding="utf-8") as f:
            f.write(json.dumps(record.to_json(), ensure_ascii=False, default=_json_default) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write_json(self, name: str, payload: Any) -> None:
        tmp = self.folder / (name + ".tmp")
        try:
            tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False, default=_json_default))
            os.replace(tmp, self.folder / name)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise

    # --- reading --------------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        payload = self._read_json(self.SPEC)
        if not isinstance(payload, dict) or not isinstance(payload.get("spec"), dict) or "run_id" not in payload:
            raise UserError(f"{self.folder / self.SPEC} is not an lcbench spec (it needs 'run_id' and 'spec'). "
                            f"Fix: restore it from the run's copy, or delete the folder and re-run.")
        return payload

    def summary(self) -> dict[str, Any]:
        payload = self._read_json(self.SUMMARY)
        if not isinstance(payload, dict):
            raise UserError(f"{self.folder / self.SUMMARY} is not a summary. Fix: delete it and re-run the same "
                            f"command (it is rebuilt from samples.jsonl).")
        return payload

    def status(self) -> dict[str, Any]:
        """How the last writer ended: ``complete``, ``failed``, ``aborted``, ``running`` (its writer
        is alive) or ``incomplete`` (its writer was killed). Folders written before status.json
        existed: ``complete`` when they have a summary, else ``incomplete``."""
        path = self.folder / self.STATUS
        payload: dict[str, Any] = {}
        if path.exists():
            try:
                payload = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                payload = {}
        if not isinstance(payload, dict) or payload.get("state") not in (RUNNING, COMPLETE, FAILED, ABORTED):
            payload = {"state": COMPLETE if (self.folder / self.SUMMARY).exists() else INCOMPLETE, "error": None}
        if payload["state"] == RUNNING and not _alive(_read_lock(self.folder / self.LOCK), socket.gethostname()):
            payload = {**payload, "state": INCOMPLETE}
        return payload

    def _read_json(self, name: str) -> Any:
        path = self.folder / name
        if not path.exists():
            raise UserError(f"'{self.folder}' is not an lcbench run folder ({name} is missing). "
                            f"Fix: pass folders written by `lcbench run` (results/<run-id>/).")
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"{path} is corrupt (not JSON: {exc}). Fix: restore it, or delete the run folder "
                            f"and re-run the same command.") from None
        except OSError as exc:
            raise UserError(f"cannot read {path}: {exc.strerror or exc}.") from None

    def records(self) -> list[TurnRecord]:
        """The records, in order, read through their schema (version-1 flat lines too);
        unparseable lines are skipped (``self.skipped`` counts them; a writer moves them aside on
        open). A record without its sample id and turn, or of a newer schema, is an error."""
        path = self.folder / self.SAMPLES
        self.skipped = 0
        if not path.exists():
            return []
        out = []
        try:
            text = path.read_bytes().decode("utf-8", "replace")
        except OSError as exc:
            raise UserError(f"cannot read {path}: {exc.strerror or exc}.") from None
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            rec = _parse(line.encode())
            if rec is None:
                self.skipped += 1
                continue
            if "sample_id" not in rec or not isinstance(rec.get("turn"), int):
                raise UserError(f"{path} line {number}: a record without its 'sample_id' and integer 'turn' "
                                f"(not written by lcbench). Fix: remove that line (or the run folder) and re-run "
                                f"the same command; the missing turns are recomputed.")
            try:
                out.append(TurnRecord.from_json(rec))
            except ValueError as exc:
                raise UserError(f"{path} line {number}: {exc}. Fix: read it with the lcbench version that "
                                f"wrote it (see spec.json's provenance), or re-run the run.") from None
        return out

    def done_turns(self) -> dict[str, set[int]]:
        done: dict[str, set[int]] = {}
        for r in self.records():
            done.setdefault(r["sample_id"], set()).add(int(r["turn"]))
        return done


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        rec = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return rec if isinstance(rec, dict) else None


def _read_lock(path: Path) -> dict[str, Any]:
    try:
        payload = json.loads(path.read_text())
        return payload if isinstance(payload, dict) else {}
    except (OSError, ValueError):
        return {}


def _alive(holder: dict[str, Any], host: str) -> bool:
    """Is the lock's process still running? (On another host it cannot be told: assume so.)"""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if holder.get("host") not in (None, host):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped) writes nothing any more
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_FULL


def disk_full_error(folder: Path, exc: OSError, kept: int) -> RunFailed:
    return RunFailed(f"cannot write to '{folder}': {exc.strerror or exc} (the disk is full or a file-size limit "
                     f"was reached). {kept} records are kept. Fix: free space, then re-run the same command to "
                     f"resume.")


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
