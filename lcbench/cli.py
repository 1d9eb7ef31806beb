"""The ``lcbench`` command line (typer + rich). Flags follow lm-evaluation-harness where it fits.

Exit codes (README "Exit codes (for CI)"): 0 success; 1 ``check`` found a regression, or a run failed
for a reason other than its input (a crash, a full disk); 2 bad input — one paragraph naming the
problem and the fix, no traceback — and every usage error (typer's own handling); 130 on Ctrl-C and
143 on SIGTERM, after saying how many records were kept and how to resume.
"""

from __future__ import annotations

import inspect
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .errors import RunAborted, RunFailed, Terminated, UserError, signal_number
from .report.safe import terminal_text
from .spec import DATA_DIR, DEFAULT_MODEL, run_settings

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="lcbench: long-context compression methods × task suites, with quality, latency and memory.")
console = Console()
if not console.is_terminal:  # logs and pipes: wide enough that the results table needs no wrapping
    console = Console(width=140)
err_console = Console(stderr=True)


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _names(text: str, flag: str, example: str) -> list[str]:
    """A comma-separated list flag that must name at least one thing."""
    names = _split(text)
    if not names:
        raise UserError(f"{flag} '{text}' names nothing. Fix: e.g. {flag} {example}.")
    return names


def _ratios(text: str, flag: str = "--ratio") -> list[float]:
    try:
        ratios = [float(r) for r in _split(text)]
    except ValueError:
        raise UserError(f"{flag} '{text}' is not a number (or a comma-separated list of numbers). "
                        f"Fix: {flag} 0.5") from None
    if not ratios:
        raise UserError(f"{flag} '{text}' names no ratio. Fix: e.g. {flag} 0.5 (or 0.25,0.5,0.75).")
    return ratios


def _budgets(text: str) -> list[int]:
    """``--budget 128,256``: whole numbers of tokens kept per layer and KV head."""
    try:
        budgets = [int(b) for b in _split(text)]
    except ValueError:
        budgets = []
    if not budgets or any(b < 1 for b in budgets):
        raise UserError(f"--budget '{text}': must be a whole number of tokens ≥ 1 kept per layer and KV head (or a "
                        f"comma-separated list). Fix: e.g. --budget 512 (or 128,512,2048).")
    return budgets


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=err_console)


@contextmanager
def _abortable(output: object):
    """Ctrl-C (130) or SIGTERM (143): the progress bar (inside this block) has already stopped and
    shown the cursor again; say what was kept and how to resume."""
    try:
        yield
    except KeyboardInterrupt as exc:
        err_console.show_cursor(True)
        where, kept = (exc.folder, exc.records) if isinstance(exc, RunAborted) else (output, 0)
        err_console.print(terminal_text(f"aborted: {kept} records written to {where}; "
                                        f"re-run the same command to resume"), highlight=False)
        raise typer.Exit(128 + signal_number(exc)) from None


@contextmanager
def _writing(output: object, flag: str):
    """A report or site that cannot be written (a full disk, no permission) is one paragraph, not a traceback."""
    try:
        yield
    except OSError as exc:
        where = getattr(exc, "filename", None) or output
        raise UserError(f"cannot write {where}: {exc.strerror or exc}. Fix: free space or pass a writable "
                        f"folder with {flag}.") from None


def _run_parameters() -> list[inspect.Parameter]:
    """``lcbench run``'s options: the axes (model, method chain, task, their arguments, ratio) and
    ``--spec`` here; every plain setting derived from its RunSpec declaration (lcbench/spec.py)."""
    def option(name: str, annotation, default, flag: str, help: str) -> inspect.Parameter:
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                 default=typer.Option(default, flag, help=help))

    axes = [
        option("model", str, DEFAULT_MODEL, "--model", "registered name, hub id or local folder"),
        option("model_args", Optional[str], None, "--model-args", "k=v,... e.g. dtype=bfloat16,gguf_file=x.gguf"),
        option("method", str, "full", "--method", "method chain a+b; several runs: comma-separated"),
        option("method_args", Optional[str], None, "--method-args", "k=v,... or name.k=v for one component"),
        option("task", str, "niah", "--task", "task name; several: comma-separated"),
        option("task_args", Optional[str], None, "--task-args", "k=v,... (lists use ';')"),
        option("data_dir", DATA_DIR.cli_type, DATA_DIR.cli_default, DATA_DIR.flag, DATA_DIR.help),
        option("ratio", Optional[str], None, "--ratio", "fraction of the context KV memory removed, in [0,1) "
               "(default 0.5); list allowed"),
        option("budget", Optional[str], None, "--budget", "instead of --ratio: tokens kept per layer and KV head "
               "(SnapKV/PyramidKV tables); list allowed"),
    ]
    settings = [option(f.name, s.cli_type, s.cli_default, s.flag, s.help) for f, s in run_settings()]
    replay = option("spec", Optional[Path], None, "--spec", "replay a spec.json (other flags ignored)")
    return axes + settings + [replay]


def run(**options) -> None:
    """Evaluate method chains on tasks; print a table; write results/<run-id>/."""
    with _abortable(options["output_path"]):
        _run(**options)


run.__signature__ = inspect.Signature(_run_parameters())
app.command("run")(run)


def _run(*, model, model_args, method, method_args, task, task_args, data_dir, ratio, budget, spec,
         **settings) -> None:
    from .errors import CompressionShortfall
    from .evaluate import ModelPool, build_spec, load_spec_file
    from .run_together import run_each
    from .report.table import render_table, run_rows

    if spec is not None:
        specs = [load_spec_file(spec)]
    else:
        tasks = _names(task, "--task", "niah")
        if ratio is not None and budget is not None:
            raise UserError(f"--ratio {ratio} and --budget {budget} both set how much the cache keeps. Fix: pass "
                            f"one of them.")
        sizes = ([{"budget": b} for b in _budgets(budget)] if budget is not None
                 else [{"ratio": r} for r in _ratios("0.5" if ratio is None else ratio)])
        methods = _names(method, "--method", "snapkv")
        specs = [build_spec(model=model, model_args=model_args, method=m, method_args=method_args, **size,
                            task=t, task_args=task_args, data_dir=data_dir, **settings)
                 for t in tasks for size in sizes for m in methods]
    pool = ModelPool()
    pool.plan_shared_prefill(specs)
    folders, failed = [], []
    with _progress() as bar:
        jobs = {s.run_id: bar.add_task(terminal_text(f"{s.task} · {s.method_name} · {s.size}"), total=None)
                for s in specs}
        for s, outcome in run_each(specs, pool, lambda s, i, n: bar.update(jobs[s.run_id], completed=i, total=n)):
            if isinstance(outcome, CompressionShortfall) and len(specs) > 1:
                # this (method, ratio) failed; the other runs still go
                failed.append(f"{s.task} · {s.method_name} · {s.size}: {outcome}")
                continue
            if isinstance(outcome, BaseException):
                raise outcome
            folders.append(outcome.folder)
    if folders:
        render_table(run_rows(folders), console)
        console.print(terminal_text(f"records: {', '.join(str(f) for f in folders)}"))
    if failed:
        raise UserError(f"{len(failed)} of {len(specs)} runs failed:\n" + "\n".join(failed))


@app.command("ls")
def ls(what: str = typer.Argument(..., help="methods | tasks | models"),
       name: Optional[str] = typer.Argument(None, help="one method or task, shown in full")) -> None:
    """List registered methods, tasks or models with their parameters (or one of them in full)."""
    from .describe import describe_entry, describe_registry

    if name is None:
        describe_registry(what, console)
    else:
        describe_entry(what, name, console)


@app.command("new")
def new(
    kind: str = typer.Argument(..., help="method | task"),
    name: str = typer.Argument(..., help="the registered name, e.g. my_method (lower case, digits, '_')"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="folder to write (default: ./lcbench-NAME)"),
) -> None:
    """Write a working plugin package: one module, its entry point, a test, baselines script, CI check."""
    from rich.markup import escape

    from .scaffold import write_plugin

    folder = output or Path("lcbench-" + name.replace("_", "-"))
    written = write_plugin(kind, name, folder)
    console.print(escape(f"wrote {len(written)} files under {folder}/: " + ", ".join(
        str(w.relative_to(folder)) for w in written)))
    console.print(escape(f"next: cd {folder} && pip install -e '.[dev]' && python -m pytest -q && bash make_baselines.sh"))


@app.command()
def report(
    run_dirs: list[Path] = typer.Argument(..., help="run folders (or folders containing them)"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="write tables (CSV/Markdown/LaTeX) and plots here"),
    group_by: str = typer.Option("dataset,length,turn", "--group-by", help="table columns: dataset, length, turn"),
    formats: str = typer.Option("csv,md,tex", "--format", help="files written with -o: csv, md, tex"),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="with -o: PNG+SVG plots in <output>/plots"),
) -> None:
    """Print the runs and their scores grouped by dataset, length and turn (95% bootstrap CIs)."""
    from .report.build import build_report

    groupings, fmts = tuple(_names(group_by, "--group-by", "dataset")), tuple(_names(formats, "--format", "csv,md"))
    with _writing(output, "-o"):
        written = build_report(run_dirs, console, output, groupings, fmts, plots)
    if written:
        console.print(terminal_text(f"wrote {len(written)} files under {output}"))


@app.command()
def leaderboard(
    run_dirs: list[Path] = typer.Argument(..., help="run folders (or folders containing them)"),
    output: Path = typer.Option(Path("leaderboard"), "--output", "-o", help="folder of the static site"),
    ratios: Optional[str] = typer.Option(None, "--ratios", help="ratios of the rankings, e.g. 0.5,0.75 (default: all run)"),
    title: str = typer.Option("lcbench leaderboard", "--title"),
) -> None:
    """Build a self-contained static site (opens from disk, no network) from stored runs."""
    from .report.leaderboard import build_leaderboard

    fixed = _ratios(ratios, "--ratios") if ratios is not None else None
    if fixed and not all(0.0 <= r < 1.0 for r in fixed):
        raise UserError(f"--ratios {ratios}: each ratio must be in [0, 1). Fix: e.g. --ratios 0.5,0.75.")
    with _writing(output, "-o"):
        index = build_leaderboard(run_dirs, output, fixed, title)
    console.print(terminal_text(f"leaderboard: {index}"))


@app.command()
def check(
    baseline: Path = typer.Option(Path("results/baselines"), "--baseline", help="folder of committed baseline runs"),
    new: Optional[list[Path]] = typer.Option(None, "--new", help="compare these runs instead of re-running (repeatable)"),
    output_path: Optional[Path] = typer.Option(None, "--output-path", help="where re-runs go (default: a fresh temp folder)"),
    tolerance: float = typer.Option(0.0, "--tolerance", help="score drop that never fails (absolute, e.g. 0.05)"),
    ratio_tolerance: float = typer.Option(0.02, "--ratio-tolerance", help="achieved-ratio shortfall that never fails"),
    max_drop: Optional[float] = typer.Option(None, "--max-drop", help="score drop that always fails (small suites)"),
    confidence: float = typer.Option(0.95, "--confidence", help="one-sided paired bootstrap confidence"),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="also write the table as Markdown (CI summaries)"),
) -> None:
    """Re-run a baseline's specs (or take --new runs); exit 1 when a score drops beyond its paired bootstrap
    bound and --tolerance, or by more than --max-drop, or the method compresses less."""
    from .check import CheckOptions, run_check

    with _abortable(output_path or "a temporary folder"):
        code = run_check(baseline, console, new, output_path,
                         CheckOptions(tolerance=tolerance, ratio_tolerance=ratio_tolerance, confidence=confidence,
                                      max_drop=max_drop), markdown)
    if code:
        raise typer.Exit(code)


@app.command()
def sweep(
    grid: Path = typer.Argument(..., help="grid file (TOML): models × methods × ratios × tasks, see examples/sweep_grid.toml"),
    executor: str = typer.Option("local", "--executor", help="local (one after another here) | ray (one Ray task per run)"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address, e.g. ray://head:10001 (default: a local Ray instance)"),
    gpus_per_run: float = typer.Option(1.0, "--gpus-per-run", help="GPUs a Ray task asks for (CUDA runs)"),
    cpus_per_run: float = typer.Option(1.0, "--cpus-per-run", help="CPUs a Ray task asks for"),
    output_path: Optional[str] = typer.Option(None, "--output-path", help="folder of the run folders (overrides [run] output_path)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list the runs, run nothing"),
) -> None:
    """Run every combination of a grid as its own resumable run; print one combined report (the
    run table and the grouped tables) and write it, with the plots, beside the runs."""
    from .report.build import build_report
    from .report.safe import csv_frame
    from .report.table import run_rows
    from .sweep import expand, load_grid, run_local, run_ray

    if executor not in ("local", "ray"):
        raise UserError(f"--executor {executor}: choose local or ray. Fix: --executor local.")
    if gpus_per_run < 0 or cpus_per_run <= 0:
        raise UserError("--gpus-per-run must be ≥ 0 and --cpus-per-run > 0. Fix: e.g. --gpus-per-run 1 --cpus-per-run 1.")
    specs = expand(load_grid(grid), output_path, remote_devices=executor == "ray")
    if dry_run:
        for s in specs:
            console.print(terminal_text(f"{s.run_id}  device={s.device}  → {s.output_path}"))
        console.print(f"{len(specs)} runs")
        return
    with _abortable(specs[0].output_path), _progress() as bar:
        runs = bar.add_task(terminal_text(f"sweep {grid.name} ({executor})"), total=len(specs))
        current = bar.add_task("", total=None, visible=executor == "local")

        def on_done(done) -> None:
            status = "[red]failed[/]" if done.error else "done"
            bar.console.print(f"{status} " + terminal_text(
                f"{done.spec.task} · {done.spec.method_name} · r={done.spec.ratio:g} · {done.spec.model}"
                + (f": {done.error}" if done.error else "")), highlight=False)
            bar.advance(runs)

        def on_progress(spec, i, n) -> None:
            bar.update(current, description=terminal_text(f"{spec.task} · {spec.method_name} · r={spec.ratio:g}"),
                       completed=i, total=n)

        if executor == "local":
            finished = run_local(specs, on_done, on_progress)
        else:
            finished = run_ray(specs, on_done, address, gpus_per_run, cpus_per_run)
    folders = [f.folder for f in finished if f.error is None]
    if folders:
        root = Path(specs[0].output_path)
        report_dir = root / f"sweep-{grid.stem}"
        build_report(folders, console, report_dir, title=f"lcbench sweep {grid.name}")
        csv = root / f"sweep-{grid.stem}.csv"
        csv_frame(run_rows(folders)).to_csv(csv, index=False)
        console.print(terminal_text(f"{len(folders)} runs; run table: {csv}; report (tables by dataset/length/turn, "
                                    f"plots): {report_dir}/"))
    failed = [f for f in finished if f.error]
    if failed:
        err_console.print(f"[bold red]{len(failed)} of {len(finished)} runs failed[/]: "
                          + terminal_text("; ".join(f"{f.spec.run_id}: {f.error}" for f in failed)), highlight=False)
        raise typer.Exit(1)


def main() -> None:
    """Console entry point: typer's own handling for usage errors (exit 2, its usage text) and
    ``--help``; a :class:`UserError` is one paragraph on stderr and exit 2, a :class:`RunFailed`
    exit 1; Ctrl-C exits 130 and SIGTERM 143 after saying what was kept (README "Exit codes")."""
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        app(standalone_mode=True)  # ends in sys.exit: typer.Exit codes, usage errors (2), success (0)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    except UserError as exc:
        _fail(exc, 2)
    except RunFailed as exc:
        _fail(exc, 1)
    finally:
        signal.signal(signal.SIGTERM, previous)


def entry() -> None:
    """The ``lcbench`` console script: :func:`main`, then Ctrl-C and SIGTERM are ignored while the
    interpreter shuts down — the command's work is done and its output printed, so a late signal
    must not turn a finished run into a death by signal (torch's teardown takes about a second)."""
    main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _fail(exc: Exception, code: int) -> None:
    err_console.show_cursor(True)
    err_console.print(f"[bold red]error:[/] {terminal_text(str(exc))}", highlight=False)
    sys.exit(code)


def _on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()


if __name__ == "__main__":
    entry()
