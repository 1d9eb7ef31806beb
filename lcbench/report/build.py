"""``lcbench report``: print the grouped tables, the equal-memory table and the 95 % summary, and write
them (CSV/Markdown/LaTeX) with the plots."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from rich.console import Console

from ..errors import UserError
from .equal_memory import equal_memory_table, families
from .export import FORMATS, check_formats, render_grouped, write_table
from .frame import load_runs, records_frame, scored_runs
from .grouped import GROUPINGS, report_tables
from .plots import EXTENSIONS, all_plots
from .reproduce import run_command
from .retention import retention_grouped
from .safe import csv_frame, terminal_text
from .table import render_table, run_rows
from .throughput import throughput_grouped


def build_report(run_dirs: Iterable[Path], console: Console, output: Path | None = None,
                 groupings: tuple[str, ...] = GROUPINGS, formats: tuple[str, ...] = FORMATS,
                 plots: bool = True, title: str = "lcbench results") -> list[Path]:
    """Print the run table, one table per grouping, the equal-memory table and the 95 % summary; with
    ``output``, write each as ``<name>.<fmt>`` (``by_<grouping>``, ``equal_memory``, ``retention``) and the plots
    under ``output/plots/``. Returns the files written."""
    bad = [g for g in groupings if g not in GROUPINGS]
    if bad:
        raise UserError(f"--group-by {','.join(bad)}: choose among {', '.join(GROUPINGS)}. "
                        f"Fix: e.g. --group-by dataset,length.")
    check_formats(formats)
    runs = load_runs(run_dirs)
    render_table(run_rows(run_dirs), console, title=title)
    for run in runs:
        for note in run.notes:
            console.print(f"[yellow]warning:[/] {terminal_text(note)}", highlight=False)
    failed = [r for r in runs if r.failed]
    if failed:
        console.print(terminal_text(f"{len(failed)} failed run(s) left out of the grouped tables: "
                                    + "; ".join(f"{r.label()} ({r.folder}): {r.error}" for r in failed)),
                      style="red", highlight=False)
    scored = scored_runs(runs)
    if not scored:
        raise UserError("every run given failed: there are no results to report. Fix: fix the cause named "
                        "above and re-run (`lcbench run` with the same flags resumes).")
    df = records_frame(scored)
    written: list[Path] = []
    commands = {r.run_id: run_command(r.spec, str(r.folder / "spec.json")).text for r in scored}
    views = [equal_memory_table(df, families(scored), commands), retention_grouped(df)]
    throughput = throughput_grouped(scored)  # runs at batch sizes > 1 (--batch-size N): tok/s and samples/s
    if throughput is not None:
        views.append(throughput)
    for table in [*report_tables(df, groupings), *views]:
        render_grouped(table, console)
        if output is not None:
            written += write_table(table, output, formats)
    if output is not None:
        written.append(output / "records.csv")
        csv_frame(df.drop(columns=["prediction"])).to_csv(written[-1], index=False)
        if plots:
            for plot in all_plots(df, output / "plots", families(scored)):
                written += [output / "plots" / plot.path(ext) for ext in EXTENSIONS]
    return written
