"""Text from results (model, task and method names, folder names, predictions, error messages) made
safe for the medium it is written to, so a crafted name can neither run in a reader's browser nor
spreadsheet, nor drive their terminal:

- terminal: control characters (ESC sequences, bells, carriage returns) shown as ``\\x1b``-style
  escapes, and rich markup escaped (``[/x]`` is printed, not parsed);
- Markdown: HTML special characters as entities (GitHub renders raw HTML in Markdown), pipes and
  newlines escaped inside table cells;
- CSV: a cell starting with ``=``, ``+``, ``-``, ``@`` (or tab/CR) gets a leading ``'`` so a
  spreadsheet reads it as text, not as a formula (OWASP "CSV Injection"); numbers stay numbers.
"""

from __future__ import annotations

import html
import re
from typing import Any

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def strip_controls(text: str) -> str:
    """Control characters other than newline and tab, written out as visible escapes."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def terminal_text(value: Any) -> str:
    """For rich's ``console.print``: no control characters, no markup read from the text."""
    from rich.markup import escape

    return escape(strip_controls(str(value)))


def markdown_text(value: Any) -> str:
    """Prose or a heading in a Markdown file: HTML escaped, control characters made visible."""
    return html.escape(strip_controls(str(value)), quote=True)


def markdown_cell(value: Any) -> str:
    """One cell of a Markdown table: :func:`markdown_text` with backslashes, ``|`` and newlines escaped."""
    text = str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")
    return markdown_text(text)


def csv_cell(value: Any) -> Any:
    """A CSV cell that no spreadsheet evaluates: text starting like a formula gets a leading ``'``."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def csv_frame(df):
    """A copy of a pandas frame with every text cell (and column name) passed through :func:`csv_cell`."""
    from pandas.api.types import is_object_dtype, is_string_dtype

    out = df.copy()
    for col in out.columns:
        if is_object_dtype(out[col]) or is_string_dtype(out[col]):
            out[col] = out[col].map(csv_cell).astype(object)
    out.columns = [csv_cell(c) if isinstance(c, str) else c for c in out.columns]
    return out
