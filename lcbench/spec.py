"""RunSpec: everything that determines a run's results, fully resolved (every default filled in),
serializable, and hashed into the run id (HELM/inspect-style). A short command line expands to
a full spec that can be written down and replayed with ``lcbench run --spec spec.json``.

RunSpec is the one declaration of a run's parameters. Its plain settings (``limit``, ``seed``,
``device``, ``dtype``, ``query_aware``, ``batch_size``, ``output_path``, ``prefill_chunk``,
``compress_chunks``) carry
their flag, help text, command-line type and whether they change what a run computes (hashed)
or only how it executes (batching, chunking, the output folder: not hashed) as field metadata
(:class:`Setting`); ``lcbench run``'s options, a sweep grid's ``[run]`` keys and the engine's
execution settings are derived from it (:func:`run_settings`). The axes (model, method chain and
ratio, task, their arguments) are built from their own flags by :func:`lcbench.evaluate.build_spec`.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import subprocess
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from typing import Any, Optional

import lcbench

DEFAULT_MODEL = "smollm2-135m-instruct"  # the offline default (lcbench.models.default)


@dataclass(frozen=True)
class Setting:
    """How a plain RunSpec setting is given: its flag, help text, the type the command line parses,
    the value the command line passes when the flag is absent (``None``: resolved by ``build_spec``,
    e.g. the device), and whether it changes what the run computes (``hashed``) or only how it
    executes."""

    flag: str
    help: str
    cli_type: Any
    cli_default: Any
    hashed: bool = True


def setting(default: Any, flag: str, help: str, cli_type: Any, *, cli_default: Any = MISSING,
            hashed: bool = True) -> Any:
    """A RunSpec field declared with its :class:`Setting`."""
    meta = Setting(flag, help, cli_type, default if cli_default is MISSING else cli_default, hashed)
    return field(default=default, metadata={"setting": meta})


# a build input that is not a field: --data-dir lands in the task's own data_dir argument
DATA_DIR = Setting("--data-dir", "local copy of a suite's released data (same as --task-args data_dir=PATH)",
                   Optional[str], None)


@dataclass
class RunSpec:
    model: str
    model_args: dict[str, Any]
    method: list[dict[str, Any]]  # [{"name", "ratio", "args"}] in chain order
    ratio: float
    task: str
    task_args: dict[str, Any]
    task_version: str
    task_template_hash: str
    # --budget: tokens kept per layer and KV head by the chain's budgeted component (its method item
    # carries it too); None for a --ratio run (then not part of the run id's input, as before it existed)
    budget: int | None = None
    limit: int | None = setting(None, "--limit", "first N samples only", Optional[int])
    seed: int = setting(0, "--seed", "seed of the task's generated samples and of seeded methods", int)
    device: str = setting("cpu", "--device", "cpu, cuda, cuda:1 (default: cuda if available)", Optional[str],
                          cli_default=None)
    dtype: str = setting("float32", "--dtype", "float32, bfloat16, float16 (default: auto)", Optional[str],
                         cli_default=None)
    query_aware: bool = setting(False, "--query-aware", "compress after the question is prefilled", bool)
    mode: str = "multi_request"  # the task's (multi_request or multi_turn), recorded
    batch_size: int | str = setting(
        "turns", "--batch-size", "turns (default: one sample at a time, its turns decoded together; per-request "
        "latency) | N | auto: N rows decoded together, samples whose turns fit prefilled together (throughput; "
        "latencies are the batch's)", str, hashed=False)
    output_path: str = setting("results", "--output-path", "folder of run folders", str, hashed=False)
    prefill_chunk: int | None = setting(None, "--prefill-chunk", "prefill the context N tokens at a time (the last "
                                        "chunk compresses)", Optional[int], hashed=False)
    compress_chunks: bool = setting(
        False, "--compress-chunks", "with --prefill-chunk: compress after every chunk, so the cache never holds the "
        "whole context (compress as you go; in --query-aware mode the question observes every chunk, as in Finch)", bool)
    share_prefill: str = setting(
        "auto", "--share-prefill", "several runs of one command that differ only in cache/decode-stage methods or "
        "ratio prefill each context once: auto (held within half the free memory) | off | a budget in MB", str,
        hashed=False)

    @property
    def method_name(self) -> str:
        return "+".join(m["name"] for m in self.method)

    @property
    def size(self) -> str:
        """How much the run keeps, as people write it: ``r=0.5``, or ``budget=512`` (tokens per layer and head)."""
        return f"budget={self.budget}" if self.budget is not None else f"r={self.ratio:g}"

    def hashed_fields(self) -> dict[str, Any]:
        """The fields that determine what the run computes (the run id's input)."""
        d = asdict(self)
        for f, s in run_settings():
            if not s.hashed:
                d.pop(f.name)
        if d["budget"] is None:
            d.pop("budget")
        if not d["compress_chunks"]:  # only set runs hash it (run ids from before it existed stay)
            d.pop("compress_chunks")
        return d

    @property
    def run_id(self) -> str:
        blob = json.dumps(self.hashed_fields(), sort_keys=True, default=str).encode()
        digest = hashlib.sha256(blob).hexdigest()[:10]
        model = self.model.rstrip("/").split("/")[-1]
        size = f"b{self.budget}" if self.budget is not None else f"r{self.ratio:g}"
        name = f"{self.task}__{self.method_name}__{size}__{model}"
        return re.sub(r"[^A-Za-z0-9._+=-]", "-", name) + f"__{digest}"  # safe as a folder name anywhere

    def to_json(self) -> dict[str, Any]:
        """spec.json: the run id, the spec, the provenance and a description of each method
        component (family, paper, parameters) that reports read instead of the live registry."""
        from .methods.registry import describe_component

        return {"run_id": self.run_id, "spec": asdict(self), "provenance": provenance(self.device),
                "methods": [describe_component(m["name"]) for m in self.method]}

    @classmethod
    def from_json(cls, payload: dict[str, Any], where: str = "spec.json") -> "RunSpec":
        """The spec of a ``spec.json`` payload; unknown or missing keys are a UserError naming them
        (types and ranges: :func:`lcbench.evaluate.check_spec`)."""
        from .errors import UserError

        body = payload.get("spec") if isinstance(payload, dict) else None
        if not isinstance(body, dict):
            raise UserError(f"{where}: no 'spec' object (an lcbench spec.json holds run_id, spec and provenance). "
                            f"Fix: pass the spec.json of a run folder.")
        names = [f.name for f in fields(cls)]
        if body.get("extra") == {}:  # written before 'extra' (never used) was dropped
            body = {k: v for k, v in body.items() if k != "extra"}
        unknown = sorted(set(body) - set(names))
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [k for k in required if k not in body]
        if unknown or missing:
            raise UserError(f"{where}: " + "; ".join(
                ([f"unknown key(s) {unknown}"] if unknown else []) + ([f"missing key(s) {missing}"] if missing else []))
                + f". A spec has {names}. Fix: restore the spec.json, or rebuild it with `lcbench run` flags.")
        return cls(**body)


def run_settings() -> list[tuple[Field, Setting]]:
    """The plain settings of a run, in declaration order: each RunSpec field with its :class:`Setting`."""
    return [(f, f.metadata["setting"]) for f in fields(RunSpec) if "setting" in f.metadata]


def _git(*args: str) -> str | None:
    """git in lcbench's own checkout; None for an installed wheel (its parent folder may be some
    other project's repository, whose revision is not lcbench's)."""
    if not lcbench.IN_CHECKOUT:
        return None
    try:
        out = subprocess.run(["git", *args], cwd=lcbench.REPO_ROOT, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def _git_revision() -> str | None:
    """HEAD of lcbench's checkout, with ``-dirty`` when tracked files differ from it."""
    head = _git("rev-parse", "HEAD")
    if not head:
        return None
    return head + ("-dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def provenance(device: str | None = None) -> dict[str, Any]:
    """Library versions, git revision and hardware, written beside the spec."""
    import importlib.metadata as md

    import psutil
    import torch

    from .engine.timing import device_hardware

    versions = {}
    for pkg in ("lcbench", "torch", "transformers", "datasets", "numpy", "kvpress", "llmlingua"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    hw = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
          "cpu_model": _cpu_model(), "cpu_threads": torch.get_num_threads(), "python": platform.python_version(),
          "memory_gb": round(psutil.virtual_memory().total / 2**30, 1)}
    hw.update(device_hardware(device))  # the GPU the run used (--device cuda:N), not always cuda:0
    return {"versions": versions, "git_revision": _git_revision(), "hardware": hw}
