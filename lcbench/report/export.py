"""Writing report tables: CSV (numbers), Markdown and LaTeX (formatted, escaped), and rich tables
in the terminal. Markdown is written here (pipes escaped) rather than through ``tabulate``, so a
report needs nothing beyond pandas; LaTeX goes through pandas' Styler with ``escape="latex"``."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from ..errors import UserError
from .grouped import GroupedTable
from .safe import csv_frame, markdown_cell, markdown_text, terminal_text

FORMATS = ("csv", "md", "tex")


def to_markdown(df: pd.DataFrame, left: tuple[str, ...] = ("model", "method", "task")) -> str:
    """A GitHub-flavoured Markdown table (``left`` columns left-aligned, others right); HTML,
    ``|`` and newlines in cells are escaped (:func:`lcbench.report.safe.markdown_cell`)."""
    cell = markdown_cell
    head = [cell(c) for c in df.columns]
    align = ["---" if c in left else "---:" for c in df.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def to_latex(df: pd.DataFrame, caption: str) -> str:
    """A booktabs LaTeX tabular (``\\usepackage{booktabs}``); every cell and header escaped."""
    styler = df.style.hide(axis="index").format(escape="latex").format_index(escape="latex", axis=1)
    align = "".join("l" if c in ("model", "method", "task") else "r" for c in df.columns)
    return styler.to_latex(hrules=True, caption=_latex_escape(caption), column_format=align)


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def check_formats(formats: tuple[str, ...]) -> None:
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise UserError(f"--format {','.join(sorted(unknown))}: choose among {', '.join(FORMATS)}. "
                        f"Fix: e.g. --format csv,md.")


def write_table(table: GroupedTable, out_dir: Path, formats: tuple[str, ...] = FORMATS) -> list[Path]:
    """``<out_dir>/<table.name>.{csv,md,tex}``; returns the paths written."""
    check_formats(formats)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot write the report to '{out_dir}': {exc.strerror or exc}. "
                        f"Fix: pass a writable folder with --output.") from None
    written = []
    for fmt in formats:
        path = out_dir / f"{table.name}.{fmt}"
        if fmt == "csv":
            csv_frame(table.numeric).to_csv(path, index=False)
        elif fmt == "md":
            note = f"\n{markdown_text(table.note)}\n" if table.note else ""
            path.write_text(f"### {markdown_text(table.title)}\n\n" + to_markdown(table.display) + note,
                            encoding="utf-8")
        else:
            path.write_text(to_latex(table.display, f"{table.title}. {table.note}" if table.note else table.title),
                            encoding="utf-8")
        written.append(path)
    return written


def render_grouped(table: GroupedTable, console: Console) -> None:
    """Print ``table.display`` as a rich table (text from results is never read as markup)."""
    t = Table(title=_plain(table.title), title_justify="left", caption=_plain(table.note) or None,
              caption_justify="left")
    for col in table.display.columns:
        t.add_column(_plain(col), justify="left" if col in ("model", "method") else "right", overflow="fold")
    for row in table.display.itertuples(index=False):
        t.add_row(*[_plain(v) for v in row])
    console.print(t)


def _plain(value) -> str:
    return terminal_text(value)
