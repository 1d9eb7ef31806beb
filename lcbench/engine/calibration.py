"""Per-model calibration: the offline work some methods do once per model (issue #15).

DuoAttention scores its retrieval heads on synthetic passkey samples, CompressKV finds semantic
retrieval heads, ILRe picks its intermediate layer, FourierAttention ranks head dimensions: work
that depends on the model and the method's parameters, not on the sample. A stage declares it by
overriding :meth:`lcbench.methods.base.Stage.calibrate`; the engine calls it here, once per (model,
method, the parameters named in :attr:`Stage.calibration_params`), before the first sample:

- the result is cached on disk at ``$LCBENCH_CACHE/calibration/<method>/<key>.pt`` (``torch.save``
  of tensors, numbers, lists and dicts; read back with ``weights_only=True``), so later runs and
  later processes reuse it — delete the file to calibrate again;
- the key hashes the model's identity (name or path, hub commit, dtype, its config and a fingerprint
  of its weights, so two random tiny models of one config do not share a file) with the method's
  name, parameters and the source file of its class (an edited method calibrates again);
- each :class:`Calibration` (key, file, seconds, computed here or loaded) is written to the run's
  ``spec.json`` under ``calibration``, so a reader knows which calibration produced the numbers;
- its time is not any sample's compression time (it is paid once per model, like a download), and
  spec.json says how long it took when it was computed.

The stage finds its result in ``self.calibration``, on the CPU as read back from the file (per-row copies made for batched prefills are
deep copies, so they carry it too). Inside ``calibrate`` the model runs outside the engine: plain
dense attention through lcbench's attention function (no cache stage acts).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import pickle
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..methods.base import Stage
from ..paths import lcbench_cache


@dataclass(frozen=True)
class Calibration:
    """One stage's calibration as the run used it."""

    method: str
    key: str
    path: str
    seconds: float  # how long computing it took (when it was computed, here or by the run that cached it)
    computed: bool  # True: computed by this process; False: read from the cache

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def calibrates(stage: Stage) -> bool:
    """Whether ``stage`` has calibration work (overrides :meth:`Stage.calibrate`)."""
    return type(stage).calibrate is not Stage.calibrate


def model_identity(model) -> dict[str, Any]:
    """What tells one model's weights from another's: name or path, hub commit, dtype, the config,
    and a fingerprint of the first and last parameter tensors (random models of one config differ)."""
    cfg = model.config
    params = list(model.parameters())
    digest = hashlib.sha256()
    for p in (params[0], params[-1]) if params else ():
        flat = p.detach().reshape(-1)[:4096].float().cpu()
        digest.update(flat.numpy().tobytes())
        digest.update(str(tuple(p.shape)).encode())
    return {"name": getattr(cfg, "_name_or_path", "") or "", "commit": getattr(cfg, "_commit_hash", None),
            "dtype": str(model.dtype), "config": hashlib.sha256(cfg.to_json_string(use_diff=False).encode()).hexdigest(),
            "weights": digest.hexdigest(), "parameters": sum(p.numel() for p in params)}


def method_code(stage: Stage) -> str:
    """A digest of the source file of the stage's class: a changed method calibrates again rather
    than read a result its older code computed."""
    try:
        return hashlib.sha256(Path(inspect.getfile(type(stage))).read_bytes()).hexdigest()[:16]
    except (OSError, TypeError):
        return ""


def calibration_key(model, stage: Stage) -> str:
    """The cache key of ``stage``'s calibration on ``model``: model identity, method name, and the
    parameters the calibration depends on (``calibration_params``; None: all; ``ratio`` may be named)."""
    names = stage.calibration_params
    args = dict(stage.args, ratio=stage.ratio)
    used = {k: args[k] for k in (sorted(stage.args) if names is None else names)}
    payload = {"model": model_identity(model), "method": stage.name, "params": used, "code": method_code(stage)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def calibrate_stages(model, tokenizer, stages: list[Stage], clock) -> list[Calibration]:
    """Give every calibrating stage its result (cached, or computed now and cached); what was used."""
    done = []
    for stage in stages:
        if not calibrates(stage):
            continue
        key = calibration_key(model, stage)
        path = lcbench_cache("calibration", stage.name, key + ".pt")
        loaded = _load(path)
        if loaded is not None:
            stage.calibration, seconds = loaded["result"], float(loaded["seconds"])
            done.append(Calibration(stage.name, key, str(path), seconds, computed=False))
            continue
        start = clock.now()
        with torch.inference_mode():
            result = stage.calibrate(model, tokenizer)
        seconds = clock.now() - start
        _save(path, {"result": result, "seconds": seconds})
        saved = _load(path)  # what a later run reads back (on the CPU), so both paths see the same
        stage.calibration = result if saved is None else saved["result"]
        done.append(Calibration(stage.name, key, str(path), seconds, computed=True))
    return done


def _load(path) -> dict | None:
    """The cached calibration at ``path``, or None (absent, unreadable or not lcbench's: recompute)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, AttributeError, pickle.UnpicklingError):
        return None
    return payload if isinstance(payload, dict) and {"result", "seconds"} <= set(payload) else None


def _save(path, payload: dict) -> None:
    """Write atomically (a killed run leaves no half file). A cache that cannot be written costs only
    recomputing in the next run: the run goes on, with a warning naming the folder and the fix."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        warnings.warn(f"the calibration could not be cached at {path} ({exc.strerror or exc}): the next run "
                      f"computes it again. Fix: set LCBENCH_CACHE to a writable folder.", stacklevel=2)
