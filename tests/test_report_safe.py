"""Text from results made safe per medium (lcbench/report/safe.py), and declared parameter ranges."""

import pandas as pd
import pytest

from lcbench.errors import UserError
from lcbench.params import Param
from lcbench.report.safe import csv_cell, csv_frame, markdown_cell, strip_controls, terminal_text


def test_terminal_text_shows_controls_and_never_reads_markup():
    assert strip_controls("a\x1b[31mb\x07\tc\nd") == "a\\x1b[31mb\\x07\tc\nd"
    assert terminal_text("[bold]x[/bold] out[/x]") == "\\[bold]x\\[/bold] out\\[/x]"


def test_markdown_cells_escape_html_pipes_and_newlines():
    assert markdown_cell('"><img src=x onerror=alert(1)>|a\nb') == "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;\\|a b"


@pytest.mark.parametrize("value, expected", [("=1+1", "'=1+1"), ("+1", "'+1"), ("-cmd", "'-cmd"), ("@SUM(A1)", "'@SUM(A1)"),
                                             ("snapkv", "snapkv"), (-0.5, -0.5), (3, 3)])
def test_csv_cells_that_look_like_formulas_are_text(value, expected):
    assert csv_cell(value) == expected


def test_csv_frame_keeps_numbers_numbers():
    df = csv_frame(pd.DataFrame({"method": ["=evil", "full"], "score": [-0.5, 1.0]}))
    assert list(df["method"]) == ["'=evil", "full"] and list(df["score"]) == [-0.5, 1.0]


@pytest.mark.parametrize("param, value, message", [
    (Param("w", int, 8, min=1), "0", "'w' must be ≥ 1, got 0"),
    (Param("r", float, 0.2, min=0, max=1), "1.5", "'r' must be ≤ 1, got 1.5"),
    (Param("r", float, 0.2, min=0, max=1), "nan", "'r' is NaN"),
    (Param("d", str, "0;50", numbers=True, nonempty=True, min=0, max=100), "", "'d' is empty"),
    (Param("d", str, "0;50", numbers=True, min=0, max=100), "10;x", "must be numbers separated by ';'"),
    (Param("l", str, None, numbers=True, arity=3, min=1), "1;2", "needs exactly 3 values"),
    (Param("f", list, None, nonempty=True), "", "'f' is empty"),
])
def test_declared_ranges_are_checked_when_resolved(param, value, message):
    with pytest.raises(UserError, match="Fix:") as err:
        param.coerce(value, "method 'x'")
    assert message in str(err.value)
    assert param.coerce(param.default, "method 'x'") == param.default or param.default is None
