"""``lcbench report``: print the grouped tables and write them (CSV/Markdown/LaTeX) with the plots."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from rich.console import Console

from ..errors import UserError
from .export import FORMATS, check_formats, render_grouped, write_table
from .frame import load_runs, records_frame
from .grouped import GROUPINGS, report_tables
from .plots import EXTENSIONS, all_plots
from .table import render_table, run_rows


def build_report(run_dirs: Iterable[Path], console: Console, output: Path | None = None,
                 groupings: tuple[str, ...] = GROUPINGS, formats: tuple[str, ...] = FORMATS,
                 plots: bool = True, title: str = "lcbench results") -> list[Path]:
    """Print the run table and one table per grouping; with ``output``, write each as ``by_<grouping>.<fmt>`` and the
    plots under ``output/plots/``. Returns the files written."""
    bad = [g for g in groupings if g not in GROUPINGS]
    if bad:
        raise UserError(f"--group-by {','.join(bad)}: choose among {', '.join(GROUPINGS)}.")
    check_formats(formats)
    render_table(run_rows(run_dirs), console, title=title)
    df = records_frame(load_runs(run_dirs))
    written: list[Path] = []
    for table in report_tables(df, groupings):
        render_grouped(table, console)
        if output is not None:
            written += write_table(table, output, formats)
    if output is not None:
        written.append(output / "records.csv")
        df.drop(columns=["prediction"]).to_csv(written[-1], index=False)
        if plots:
            for plot in all_plots(df, output / "plots"):
                written += [output / "plots" / plot.path(ext) for ext in EXTENSIONS]
    return written
