"""``lcbench check``: does a method still score what its committed baseline scored?

Given a baseline (a folder of run folders, e.g. ``results/baselines``), either re-run every
baseline spec with the code installed now (``evaluate(RunSpec)``, into a fresh folder so nothing
is resumed from an earlier check) or take runs made elsewhere (``--new``), pair each new run with
its baseline (same run id, else same task/method/ratio/model/task arguments), compare them turn by
turn (:mod:`lcbench.results.compare`) and print a before/after table. The exit code is 1 when any
run regressed or is incomplete, 0 otherwise: what a method author puts in CI.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.table import Table

from .errors import UserError
from .report.export import to_markdown
from .report.frame import Run, load_runs
from .report.safe import markdown_text, terminal_text
from .results.compare import FAILED, FAILING, Comparison, compare_records
from .tasks.base import LOWER_IS_BETTER_MODES


@dataclass
class CheckOptions:
    tolerance: float = 0.0  # score drop that is never a failure
    ratio_tolerance: float = 0.02  # achieved-ratio shortfall vs the baseline that is never a failure
    confidence: float = 0.95  # one-sided
    n_boot: int = 2000
    max_drop: float | None = None  # a score drop that always fails, whatever the interval


def rerun(baselines: list[Run], output: Path, progress: Callable[[str], None] | None = None) -> list[Run]:
    """Evaluate every baseline's spec again into ``output`` (which must not hold these runs yet).
    A re-run that fails (its method misses the ratio, it crashes) is returned as a failed run."""
    from .errors import CompressionShortfall
    from .evaluate import ModelPool, check_spec, evaluate
    from .report.frame import load_run
    from .spec import RunSpec

    pool = ModelPool()
    specs = []
    for base in baselines:  # every baseline spec is checked before the first re-run starts
        where = f"baseline {base.folder / 'spec.json'}"
        spec = RunSpec.from_json({"spec": {**base.spec, "output_path": str(output)}}, where=where)
        specs.append(check_spec(spec, where=where, same_task_version=False))
    runs = []
    for base, spec in zip(baselines, specs):
        folder = output / spec.run_id
        if folder.resolve() == base.folder.resolve() or (folder / "samples.jsonl").exists():
            raise UserError(f"'{folder}' already holds results for {spec.run_id}; a check must not resume them. "
                            f"Fix: pass an empty --output-path (or none: a fresh temporary folder is used).")
        if progress:
            progress(base.label())
        try:
            runs.append(load_run(evaluate(spec, pool).folder))
        except Exception as exc:  # the code under test failed this run: a verdict, not a usage error
            if isinstance(exc, UserError) and not isinstance(exc, CompressionShortfall):
                raise
            error = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
            if (folder / "spec.json").exists():
                run = load_run(folder)
            else:
                run = Run(folder, spec.run_id, dataclasses.asdict(spec), {}, [], {})
            run.status, run.error = "failed", error
            runs.append(run)
    return runs


def pair_runs(baselines: list[Run], new: list[Run]) -> list[tuple[Run, Run | None]]:
    """Each baseline with its new run: same run id first, else the same measurement key."""
    by_id = {r.run_id: r for r in new}
    by_key = {r.key: r for r in new}
    return [(b, by_id.get(b.run_id) or by_key.get(b.key)) for b in baselines]


def compare(pairs: list[tuple[Run, Run | None]], opts: CheckOptions) -> list[Comparison]:
    out = []
    models = {base.spec["model"] for base, _ in pairs}
    for base, new in pairs:
        label = base.label()
        if len(models) == 1:  # the model is in the title
            label = label.replace(f" · {base.spec['model']}", "")
        comp = compare_records(label, base.run_id, new.run_id if new else "–", base.records,
                               new.records if new else [], opts.tolerance, opts.ratio_tolerance,
                               opts.confidence, opts.n_boot, opts.max_drop,
                               lower_is_better=base.spec.get("mode") in LOWER_IS_BETTER_MODES)  # a perplexity
        comp.model = base.spec["model"]
        if new is not None and new.status == FAILED:
            comp.verdict = FAILED
            comp.reasons.insert(0, f"the new run failed: {new.error or 'see its status.json'}")
        out.append(comp)
    return out


def _num(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def table_rows(comparisons: list[Comparison]) -> list[dict[str, str]]:
    """The before/after table as strings (shared by the terminal and the Markdown file)."""
    rows = []
    for c in comparisons:
        rows.append({"run": c.label, "turns": f"{c.n_paired}/{c.n_baseline}", "before": _num(c.before),
                     "after": _num(c.after),
                     "Δ [bounds]": f"{c.delta:+.2f} [{c.ci[0]:+.2f},{c.ci[1]:+.2f}]" if c.n_paired else "–",
                     "changed": str(c.changed),
                     "achieved": f"{_num(c.achieved_before, 2)}→{_num(c.achieved_after, 2)}",
                     "verdict": c.verdict.upper() if c.failed else c.verdict})
    return rows


def render(comparisons: list[Comparison], console: Console, opts: CheckOptions) -> None:
    """The table, then one line per reason a run failed."""
    rows = table_rows(comparisons)
    models = sorted({c.model for c in comparisons})
    t = Table(title=f"lcbench check ({', '.join(models)}): paired bootstrap over turns, one-sided "
                    f"{opts.confidence:.0%} bounds, {_rules(opts)}",
              title_justify="left")
    for col in rows[0] if rows else []:
        t.add_column(terminal_text(col), justify="left" if col in ("run", "verdict") else "right", overflow="fold",
                     min_width=16 if col == "run" else None, no_wrap=col != "run")
    for row, c in zip(rows, comparisons):
        style = "bold red" if c.failed else ("green" if c.verdict in ("same", "improved") else "")
        t.add_row(*[terminal_text(v) for v in row.values()], style=style)
    if not console.is_terminal and console.width < 120:  # CI logs: wide enough not to fold the numbers
        console = Console(file=console.file, width=120, no_color=console.no_color)
    console.print(t)
    for c in comparisons:
        for reason in c.reasons:
            console.print(f"[red]✗[/] {terminal_text(c.label)}: {terminal_text(reason)}", highlight=False)


def run_check(baseline: Path, console: Console, new: list[Path] | None = None, output: Path | None = None,
              opts: CheckOptions | None = None, markdown: Path | None = None) -> int:
    """Compare and print; returns the exit code (1 when any run failed)."""
    opts = opts or CheckOptions()
    if not 0.5 <= opts.confidence < 1.0:
        raise UserError(f"--confidence {opts.confidence}: must be in [0.5, 1). Fix: e.g. --confidence 0.95.")
    if opts.tolerance < 0 or opts.ratio_tolerance < 0 or (opts.max_drop is not None and opts.max_drop < 0):
        raise UserError("--tolerance, --ratio-tolerance and --max-drop are drops: they must be ≥ 0. Fix: e.g. --tolerance 0.05.")
    baselines = load_runs([baseline])
    broken = [b for b in baselines if b.status != "complete"]
    if broken:
        raise UserError("the baseline holds runs that did not complete: " + "; ".join(
            f"{b.folder} ({b.status}{': ' + b.error if b.error else ''})" for b in broken)
            + ". Fix: remake those baselines (a failed run is not a reference score).")
    if new:
        fresh = load_runs(new)
    else:
        output = Path(output) if output else Path(tempfile.mkdtemp(prefix="lcbench-check-"))
        console.print(terminal_text(f"re-running {len(baselines)} baseline spec(s) into {output}"))
        fresh = rerun(baselines, output, lambda label: console.print(f"  {terminal_text(label)}"))
    # a re-run is its baseline's partner by construction (its run id changes when the task's version does)
    pairs = pair_runs(baselines, fresh) if new else list(zip(baselines, fresh))
    comparisons = compare(pairs, opts)
    render(comparisons, console, opts)
    failed = [c for c in comparisons if c.failed]
    if markdown is not None:
        try:
            markdown.write_text(_markdown(comparisons, opts, failed), encoding="utf-8")
        except OSError as exc:
            raise UserError(f"cannot write --markdown {markdown}: {exc.strerror or exc}. Fix: pass a writable "
                            f"file path.") from None
    if failed:
        console.print(f"[bold red]FAILED[/]: {len(failed)} of {len(comparisons)} runs "
                      f"{' / '.join(sorted({c.verdict for c in failed}))}")
        return 1
    console.print(f"[green]passed[/]: {len(comparisons)} runs match their baseline ({_rules(opts)})")
    return 0


def _rules(opts: CheckOptions) -> str:
    text = f"tolerance {opts.tolerance:g}"
    return text + (f", max drop {opts.max_drop:g}" if opts.max_drop is not None else "")


def _markdown(comparisons: list[Comparison], opts: CheckOptions, failed: list[Comparison]) -> str:
    import pandas as pd

    head = (f"## lcbench check: {'FAILED' if failed else 'passed'}\n\n"
            f"Paired bootstrap over turns, one-sided {opts.confidence:.0%} bounds; {_rules(opts)}; "
            f"ratio tolerance {opts.ratio_tolerance:g}; verdicts {' and '.join(FAILING)} fail.\n\n")
    reasons = "".join(f"- {markdown_text(c.label)}: {markdown_text(r)}\n" for c in comparisons for r in c.reasons)
    table = to_markdown(pd.DataFrame(table_rows(comparisons)), left=("run", "verdict"))
    return head + table + ("\n" + reasons if reasons else "")
