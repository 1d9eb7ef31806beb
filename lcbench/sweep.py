"""``lcbench sweep GRID.toml``: a grid of models × methods × ratios × tasks as independent runs.

Every combination becomes one fully resolved RunSpec (:func:`lcbench.evaluate.build_spec`) with
its own run folder, so a sweep is resumable run by run (and, inside a run, turn by turn).
Combinations that resolve to the same spec (``full`` at every ratio) run once. Executors:

``local``  the runs one after another in this process (a model is loaded once for its runs);
``ray``    each run a Ray task asking for ``gpus_per_run`` GPUs (CUDA runs) or ``cpus_per_run``
           CPUs, on the cluster at ``address`` or on a local Ray instance. Workers write the run
           folders themselves: on a cluster of several machines put ``output_path`` on a shared
           filesystem (the final report reads the folders), and install lcbench on every node.

A failed run (e.g. a method that falls short of its ratio) is reported and the others go on.

The grid file (see ``examples/sweep_grid.toml``)::

    [grid]                  # lists (or single values) whose product is the set of runs
    model = ["smollm2-135m-instruct"]
    method = ["full", "snapkv", "snapkv+kivi"]
    ratio = [0.25, 0.5, 0.75]   # or budget = [128, 512]: tokens kept per layer and head (not both)
    task = ["niah"]
    [run]                   # any other flag of `lcbench run`, shared by every run
    limit = 10
    [method_args]           # per method chain name: its --method-args
    snapkv = "window_size=32"
    [task_args]             # per task name: its --task-args
    niah = "lengths=1000;2000"
    [model_args]            # per model name: its --model-args
"""

from __future__ import annotations

import dataclasses
import itertools
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import UserError
from .evaluate import ModelPool, build_spec, share_groups
from .run_together import run_each
from .spec import RunSpec, run_settings

AXES = ("model", "method", "ratio", "budget", "task")  # ratio or budget (tokens per layer and head)
PER_NAME = {"method_args": "method", "task_args": "task", "model_args": "model"}
# the [run] keys: RunSpec's plain settings (declared once, in lcbench/spec.py) and --data-dir
RUN_KEYS = tuple(f.name for f, _ in run_settings()) + ("data_dir",)
SECTIONS = ("grid", "run", *PER_NAME)


@dataclass
class Grid:
    axes: dict[str, list[Any]]
    run: dict[str, Any] = field(default_factory=dict)
    per_name: dict[str, dict[str, str]] = field(default_factory=dict)  # "method_args" → {name: args}
    name: str = "sweep"


def load_grid(path: Path | str) -> Grid:
    """Read and check a grid file; a UserError names any unknown section or key."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise UserError(f"cannot read the grid file '{path}': {exc.strerror or exc}. Fix: pass a TOML file "
                        f"(see examples/sweep_grid.toml).") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"'{path}' is not valid TOML ({exc}). Fix the file (see examples/sweep_grid.toml).") from None
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise UserError(f"'{path}': unknown section(s) {unknown}; a grid file has {list(SECTIONS)}. "
                        f"Fix: rename or drop them (see examples/sweep_grid.toml).")
    grid = data.get("grid", {})
    bad = sorted(set(grid) - set(AXES))
    if bad:
        raise UserError(f"'{path}' [grid]: unknown axis {bad}; the axes are {list(AXES)} (other settings go in [run]). "
                        f"Fix: rename it.")
    axes = {k: (v if isinstance(v, list) else [v]) for k, v in grid.items()}
    if "method" not in axes or not axes["method"]:
        raise UserError(f"'{path}' [grid] names no method. Fix: e.g. method = [\"full\", \"snapkv\"].")
    for axis, values in axes.items():
        if not values:
            raise UserError(f"'{path}' [grid] {axis} = []: an empty axis would run nothing. Fix: list at least one "
                            f"value, or drop the line for the default.")
        want, kind, example = {"ratio": ((int, float), "numbers", "ratio = [0.25, 0.5]."),
                               "budget": (int, "whole numbers of tokens", "budget = [128, 512]."),
                               }.get(axis, (str, "strings (names)", f'{axis} = ["name"].'))
        bad_values = [v for v in values if isinstance(v, bool) or not isinstance(v, want)]
        if bad_values:
            raise UserError(f"'{path}' [grid] {axis}: {bad_values} are not {kind}. Fix: e.g. {example}")
    if "ratio" in axes and "budget" in axes:
        raise UserError(f"'{path}' [grid] has both ratio and budget: each sets how much the cache keeps. Fix: keep "
                        f"one axis (two grids for both).")
    run = data.get("run", {})
    bad = sorted(set(run) - set(RUN_KEYS))
    if bad:
        raise UserError(f"'{path}' [run]: unknown key(s) {bad}; allowed: {list(RUN_KEYS)}. Fix: rename or drop them.")
    per_name = {}
    for section, axis in PER_NAME.items():
        table = data.get(section, {})
        if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
            raise UserError(f"'{path}' [{section}]: each entry is a name and its k=v,... string, e.g. "
                            f"snapkv = \"window_size=8\".")
        named = {str(v) for v in axes.get(axis, [])}
        stray = sorted(set(table) - named) if axis in axes else []
        if stray:
            raise UserError(f"'{path}' [{section}] names {stray}, which the [grid] {axis} axis does not list "
                            f"({sorted(named)}): a typo would silently run the defaults. Fix: use a name of the grid.")
        per_name[section] = {str(k): v for k, v in table.items()}
    return Grid(axes, dict(run), per_name, path.stem)


def expand(grid: Grid, output_path: str | None = None, remote_devices: bool = False) -> list[RunSpec]:
    """One resolved RunSpec per combination (duplicates, e.g. ``full`` at several ratios, dropped).

    ``remote_devices``: the runs execute elsewhere (Ray workers), so a CUDA device is not checked
    on this machine; its default dtype is still the GPU one."""
    run = dict(grid.run)
    if output_path is not None:
        run["output_path"] = output_path
    if not isinstance(run.get("output_path", "results"), str):
        raise UserError(f"grid '{grid.name}' [run] output_path = {run['output_path']!r}: must be a folder path string. "
                        f"Fix: output_path = \"results\".")
    run["output_path"] = str(Path(run.get("output_path", "results")).resolve())
    axes = {k: grid.axes.get(k) for k in AXES if grid.axes.get(k)}
    keys = list(axes)
    specs: dict[str, RunSpec] = {}
    for values in itertools.product(*(axes[k] for k in keys)):
        combo = dict(zip(keys, values))
        args = {**run, **combo}
        for section, axis in PER_NAME.items():
            name = combo.get(axis)
            if name is not None and str(name) in grid.per_name.get(section, {}):
                args[section] = grid.per_name[section][str(name)]
        try:
            spec = _build(args, remote_devices)
        except UserError as exc:
            raise UserError(f"grid '{grid.name}', run {combo}: {exc}") from None
        specs.setdefault(spec.run_id, spec)
    return list(specs.values())


def _build(args: dict[str, Any], remote_devices: bool) -> RunSpec:
    device = str(args.get("device") or "")
    if remote_devices and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            from .models.loading import resolve_dtype

            dtype = str(resolve_dtype(args.get("dtype") or "auto", device)).replace("torch.", "")
            spec = build_spec(**{**args, "device": "cpu", "dtype": dtype})
            return dataclasses.replace(spec, device=device)
    return build_spec(**args)


# --- executors ------------------------------------------------------------------------------------
@dataclass
class Finished:
    spec: RunSpec
    folder: Path | None
    error: str | None = None


def run_local(specs: list[RunSpec], on_done: Callable[[Finished], None],
              on_progress: Callable[[RunSpec, int, int], None] | None = None) -> list[Finished]:
    """The runs one after another in this process; runs of one model share its loaded copy, and
    runs that differ only in cache/decode-stage methods or ratio share prefills."""
    pool = ModelPool()
    pool.plan_shared_prefill(specs)
    out = []
    for spec, outcome in run_each(sorted(specs, key=lambda s: (s.model, str(s.model_args), s.device)), pool,
                                  on_progress):
        # one run's failure (bad input, out of memory, a method's bug) stops no other
        done = (Finished(spec, Path(spec.output_path) / spec.run_id, failure_text(outcome))
                if isinstance(outcome, Exception) else Finished(spec, outcome.folder))
        out.append(done)
        on_done(done)
    return out


def failure_text(exc: Exception) -> str:
    """A user error as its message; anything else with its type, so a crash reads as one."""
    return str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"


_WORKER_POOL: ModelPool | None = None


def execute_payloads(payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a Ray task runs: a group of specs (spec.json payloads) that share prefills, one after
    another in this worker → each one's folder, or its error (one failure stops no other)."""
    global _WORKER_POOL
    if _WORKER_POOL is None:  # a worker process keeps its model for the next run it gets
        _WORKER_POOL = ModelPool()
    specs = [RunSpec.from_json(p) for p in payloads]
    _WORKER_POOL.plan_shared_prefill(specs)
    return [{"folder": str(Path(spec.output_path) / spec.run_id), "error": failure_text(outcome)}
            if isinstance(outcome, Exception) else {"folder": str(outcome.folder), "error": None}
            for spec, outcome in run_each(specs, _WORKER_POOL)]


def run_ray(specs: list[RunSpec], on_done: Callable[[Finished], None], address: str | None = None,
            gpus_per_run: float = 1.0, cpus_per_run: float = 1.0, num_cpus: int | None = None) -> list[Finished]:
    """Each run a Ray task (``gpus_per_run`` GPUs for CUDA runs, else ``cpus_per_run`` CPUs) on the
    cluster at ``address``, or on a local Ray instance (``num_cpus``) when none is connected — except
    runs that share prefills (:func:`lcbench.evaluate.share_groups`: same model, task and samples,
    cache/decode-stage methods or ratios apart), which are grouped before dispatch into one task that
    runs them in order, prefilling each context once (``share_prefill = "off"`` in the grid's
    ``[run]``: one task per run, all in parallel)."""
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray. Fix: pip install 'lcbench[ray]' (or pip install ray), "
                        "or use --executor local.") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, num_cpus=None if address else num_cpus, log_to_driver=False)
    try:
        task = ray.remote(execute_payloads)
        pending = {}
        for group in share_groups(specs):
            gpu = group[0].device.startswith("cuda")
            ref = task.options(num_gpus=gpus_per_run if gpu else 0, num_cpus=cpus_per_run,
                               name=group[0].run_id if len(group) == 1 else f"{len(group)} runs sharing prefills"
                               ).remote([spec.to_json() for spec in group])
            pending[ref] = group
        out = []
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            group = pending.pop(ready[0])
            try:
                results = ray.get(ready[0])
                finished = [Finished(s, Path(r["folder"]), r["error"]) for s, r in zip(group, results)]
            except Exception as exc:  # the task died (out of memory, lost node): report, go on
                finished = [Finished(s, None, f"{type(exc).__name__}: {exc}") for s in group]
            for done in finished:
                out.append(done)
                on_done(done)
        return out
    finally:
        if started:
            ray.shutdown()
