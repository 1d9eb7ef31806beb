"""The ``lcbench`` command line (typer + rich). Flags follow lm-evaluation-harness where it fits.

Bad input (unknown names, misspelled or mistyped parameters, a ratio outside [0, 1), an
unwritable output path) prints one paragraph naming the fix and exits with code 2, no traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="lcbench: long-context compression methods × task suites, with quality, latency and memory.")
console = Console()
if not console.is_terminal:  # logs and pipes: wide enough that the results table needs no wrapping
    console = Console(width=140)
err_console = Console(stderr=True)


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ratios(text: str) -> list[float]:
    try:
        return [float(r) for r in _split(text)]
    except ValueError:
        raise UserError(f"--ratio '{text}' is not a number (or a comma-separated list of numbers). Fix: --ratio 0.5") from None


@app.command()
def run(
    model: str = typer.Option("smollm2-135m-instruct", "--model", help="registered name, hub id or local folder"),
    model_args: Optional[str] = typer.Option(None, "--model-args", help="k=v,... e.g. dtype=bfloat16,gguf_file=x.gguf"),
    method: str = typer.Option("full", "--method", help="method chain a+b; several runs: comma-separated"),
    method_args: Optional[str] = typer.Option(None, "--method-args", help="k=v,... or name.k=v for one component"),
    task: str = typer.Option("niah", "--task", help="task name; several: comma-separated"),
    task_args: Optional[str] = typer.Option(None, "--task-args", help="k=v,... (lists use ';')"),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="local copy of a suite's released data (same as --task-args data_dir=PATH)"),
    ratio: str = typer.Option("0.5", "--ratio", help="fraction of the context KV memory removed, in [0,1); list allowed"),
    limit: Optional[int] = typer.Option(None, "--limit", help="first N samples only"),
    batch_size: str = typer.Option("turns", "--batch-size", help="turns (default: one sample at a time, its turns decoded together; per-request latency) | N | auto: N rows decoded together, samples whose turns fit prefilled together (throughput; latencies are the batch's)"),
    prefill_chunk: Optional[int] = typer.Option(None, "--prefill-chunk", help="prefill the context N tokens at a time (the last chunk compresses)"),
    output_path: str = typer.Option("results", "--output-path", help="folder of run folders"),
    seed: int = typer.Option(0, "--seed"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 (default: cuda if available)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, bfloat16, float16 (default: auto)"),
    query_aware: bool = typer.Option(False, "--query-aware", help="compress after the question is prefilled"),
    spec: Optional[Path] = typer.Option(None, "--spec", help="replay a spec.json (other flags ignored)"),
) -> None:
    """Evaluate method chains on tasks; print a table; write results/<run-id>/."""
    from .evaluate import ModelPool, build_spec, evaluate
    from .report.table import render_table, run_rows
    from .spec import RunSpec

    if spec is not None:
        try:
            specs = [RunSpec.from_json(json.loads(spec.read_text()))]
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
            raise UserError(f"--spec {spec}: not a readable lcbench spec.json ({exc}).") from None
    else:
        specs = [build_spec(model=model, model_args=model_args, method=m, method_args=method_args, ratio=r,
                            task=t, task_args=task_args, limit=limit, seed=seed, device=device, dtype=dtype,
                            query_aware=query_aware, batch_size=batch_size, output_path=output_path,
                            prefill_chunk=prefill_chunk, data_dir=data_dir)
                 for t in _split(task) for r in _ratios(ratio) for m in _split(method)]
    pool = ModelPool()
    from .errors import CompressionShortfall

    folders, failed = [], []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=err_console) as bar:
        for s in specs:
            job = bar.add_task(escape(f"{s.task} · {s.method_name} · r={s.ratio:g}"), total=None)
            try:
                outcome = evaluate(s, pool, progress=lambda i, n, job=job: bar.update(job, completed=i, total=n))
            except CompressionShortfall as exc:  # this (method, ratio) failed; the other runs still go
                if len(specs) == 1:
                    raise
                failed.append(f"{s.task} · {s.method_name} · r={s.ratio:g}: {exc}")
                continue
            folders.append(outcome.folder)
    if folders:
        render_table(run_rows(folders), console)
        console.print(escape(f"records: {', '.join(str(f) for f in folders)}"))
    if failed:
        raise UserError(f"{len(failed)} of {len(specs)} runs failed:\n" + "\n".join(failed))


@app.command("ls")
def ls(what: str = typer.Argument(..., help="methods | tasks | models")) -> None:
    """List registered methods, tasks or models with their parameters."""
    from .describe import describe_registry

    describe_registry(what, console)


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

    written = build_report(run_dirs, console, output, tuple(_split(group_by)), tuple(_split(formats)), plots)
    if written:
        console.print(f"wrote {len(written)} files under {output}")


@app.command()
def leaderboard(
    run_dirs: list[Path] = typer.Argument(..., help="run folders (or folders containing them)"),
    output: Path = typer.Option(Path("leaderboard"), "--output", "-o", help="folder of the static site"),
    ratios: Optional[str] = typer.Option(None, "--ratios", help="ratios of the rankings, e.g. 0.5,0.75 (default: all run)"),
    title: str = typer.Option("lcbench leaderboard", "--title"),
) -> None:
    """Build a self-contained static site (opens from disk, no network) from stored runs."""
    from .report.leaderboard import build_leaderboard

    index = build_leaderboard(run_dirs, output, _ratios(ratios) if ratios else None, title)
    console.print(f"leaderboard: {index}")


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
    from .report.table import run_rows
    from .sweep import expand, load_grid, run_local, run_ray

    if executor not in ("local", "ray"):
        raise UserError(f"--executor {executor}: choose local or ray.")
    specs = expand(load_grid(grid), output_path, remote_devices=executor == "ray")
    if dry_run:
        for s in specs:
            console.print(f"{s.run_id}  device={s.device}  → {s.output_path}")
        console.print(f"{len(specs)} runs")
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=err_console) as bar:
        runs = bar.add_task(escape(f"sweep {grid.name} ({executor})"), total=len(specs))
        current = bar.add_task("", total=None, visible=executor == "local")

        def on_done(done) -> None:
            status = "[red]failed[/]" if done.error else "done"
            bar.console.print(f"{status} " + escape(f"{done.spec.task} · {done.spec.method_name} · r={done.spec.ratio:g} · "
                              f"{done.spec.model}" + (f": {done.error}" if done.error else "")), highlight=False)
            bar.advance(runs)

        def on_progress(spec, i, n) -> None:
            bar.update(current, description=escape(f"{spec.task} · {spec.method_name} · r={spec.ratio:g}"), completed=i, total=n)

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
        run_rows(folders).to_csv(csv, index=False)
        console.print(escape(f"{len(folders)} runs; run table: {csv}; report (tables by dataset/length/turn, "
                             f"plots): {report_dir}/"))
    failed = [f for f in finished if f.error]
    if failed:
        err_console.print(f"[bold red]{len(failed)} of {len(finished)} runs failed[/]: "
                          + escape("; ".join(f"{f.spec.run_id}: {f.error}" for f in failed)), highlight=False)
        raise typer.Exit(1)


def main() -> None:
    """Console entry point: user errors become one paragraph on stderr and exit code 2."""
    try:
        app(standalone_mode=False)
    except UserError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("aborted (results written so far are kept; re-run the same command to resume)")
        sys.exit(130)
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(2)
        if isinstance(exc, click.exceptions.Exit):
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
