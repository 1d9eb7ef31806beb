"""The one ``lcbench run ...`` command that reproduces a stored run, built from its spec.json only.

Every value comes from the resolved spec the run stored (model and model arguments, the method
chain with each component's ratio and arguments, task and task arguments, ratio, sample limit,
seed, device, dtype, batching), never from the registry of the lcbench that builds the report: a
default that changed since the run was made cannot change the command. Defaults are therefore
written out too. What ``lcbench run`` flags cannot express (a value holding the ``,`` that
separates ``k=v`` pairs, a chain naming one component twice, spec fields no flag sets) makes the
command the exact replay ``lcbench run --spec <run folder>/spec.json`` instead.

The output folder is left out: it is not part of what a run measures (the run id hashes the spec
without it), so the command reproduces the run wherever the reader keeps results.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any, Mapping

# spec fields the command sets, or leaves out on purpose (output_path: where results go; mode: the task's)
_COVERED = {"model", "model_args", "method", "ratio", "budget", "task", "task_args", "task_version", "task_template_hash",
            "limit", "seed", "device", "dtype", "query_aware", "mode", "batch_size", "output_path",
            "prefill_chunk", "compress_chunks", "share_prefill", "extra"}


class Inexpressible(ValueError):
    """A spec value that ``lcbench run`` flags cannot carry."""


@dataclass(frozen=True)
class Command:
    """``text``: the shell command; ``exact``: built from flags (False: the ``--spec`` replay)."""

    text: str
    exact: bool


def _value(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):  # list parameters are written a;b;c on the command line
        return ";".join(_value(v, where) for v in value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, (int, str)):
        text = str(value)
        if "," in text or "\n" in text:
            raise Inexpressible(f"{where}={text!r} holds a ',' (the separator of k=v pairs)")
        return text
    raise Inexpressible(f"{where}={value!r} is not a flag value")


def _pairs(args: Mapping[str, Any], prefix: str = "") -> str:
    """``k=v,...`` of the arguments that have a value (None is every parameter's unset state)."""
    return ",".join(f"{prefix}{k}={_value(v, prefix + k)}" for k, v in args.items() if v is not None)


def _ratio(value: float) -> str:
    return _value(float(value), "ratio")


def flags(spec: Mapping[str, Any]) -> list[str]:
    """The arguments after ``lcbench run`` that rebuild ``spec`` (raises :class:`Inexpressible`)."""
    unknown = sorted(k for k in spec if k not in _COVERED and k != "run_id")
    if unknown:
        raise Inexpressible(f"spec fields {unknown} have no flag")
    if spec.get("extra"):
        raise Inexpressible("spec 'extra' has no flag")
    chain = list(spec["method"])
    names = [str(part["name"]) for part in chain]
    if len(set(names)) != len(names):
        raise Inexpressible("a chain naming one component twice cannot be addressed by name.k=v")
    ratio = float(spec["ratio"])
    out = ["--model", str(spec["model"])]
    model_args = {k: v for k, v in (spec.get("model_args") or {}).items() if k != "dtype"}
    if _pairs(model_args):
        out += ["--model-args", _pairs(model_args)]
    if spec.get("dtype"):
        out += ["--dtype", str(spec["dtype"])]
    out += ["--method", "+".join(names)]
    method_args = []
    budget = spec.get("budget")
    for part in chain:
        own = float(part.get("ratio", ratio))
        # one component: --ratio is its ratio; a chain: each component's share written out, so the
        # split does not depend on how this lcbench divides a ratio across components (the
        # component a --budget applies to has no ratio of its own)
        if "budget" not in part and (len(chain) > 1 or own != ratio):
            method_args.append(f"{part['name']}.ratio={_ratio(own)}")
        pairs = _pairs(part.get("args") or {}, f"{part['name']}.")
        if pairs:
            method_args.append(pairs)
    if method_args:
        out += ["--method-args", ",".join(method_args)]
    out += ["--task", str(spec["task"])]
    if _pairs(spec.get("task_args") or {}):
        out += ["--task-args", _pairs(spec.get("task_args") or {})]
    out += ["--budget", str(int(budget))] if budget is not None else ["--ratio", _ratio(ratio)]
    if spec.get("limit") is not None:
        out += ["--limit", str(int(spec["limit"]))]
    out += ["--seed", str(int(spec.get("seed", 0)))]
    if spec.get("device"):
        out += ["--device", str(spec["device"])]
    if spec.get("query_aware"):
        out.append("--query-aware")
    if spec.get("batch_size") not in (None, "turns"):
        out += ["--batch-size", str(spec["batch_size"])]
    if spec.get("prefill_chunk"):
        out += ["--prefill-chunk", str(int(spec["prefill_chunk"]))]
    if spec.get("compress_chunks"):
        out += ["--compress-chunks"]
    if spec.get("share_prefill") not in (None, "auto"):
        out += ["--share-prefill", str(spec["share_prefill"])]
    return out


def run_command(spec: Mapping[str, Any], spec_path: str = "<run folder>/spec.json") -> Command:
    """The command for the resolved ``spec`` (spec.json's ``"spec"`` object), shell-quoted."""
    try:
        return Command(shlex.join(["lcbench", "run", *flags(spec)]), True)
    except Inexpressible:
        return Command(shlex.join(["lcbench", "run", "--spec", spec_path]), False)
