"""CSV cells that a spreadsheet would run as formulas are escaped on write and restored on read."""

import ast
import csv
import io

import pytest
from conftest import REPO

from bonescan_core import csvfile


@pytest.mark.parametrize("value", ["=HYPERLINK(\"http://x\",\"y\")", "+1", "-2", "@SUM(A1)", "\tx", "\rx", "'=1", "''", "'"])
def test_formula_starts_are_escaped_and_restored(value):
    escaped = csvfile.escape_cell(value)
    assert escaped == "'" + value
    assert csvfile.unescape_cell(escaped) == value


@pytest.mark.parametrize("value", ["", "plain", "a=b", "it's", " =x", "anterior"])
def test_harmless_text_is_written_as_is(value):
    assert csvfile.escape_cell(value) == value
    assert csvfile.unescape_cell(value) == value


def test_write_rows_escapes_text_but_not_numbers():
    buffer = io.StringIO()
    count = csvfile.write_rows(buffer, ["n", "x", "note"], [{"n": -3, "x": -0.25, "note": "=1+1"}, {"n": 1, "x": None, "note": "ok"}])
    assert count == 2
    rows = list(csv.reader(io.StringIO(buffer.getvalue())))
    assert rows == [["n", "x", "note"], ["-3", "-0.25", "'=1+1"], ["1", "", "ok"]]


def test_every_csv_is_written_by_csvfile():
    """One writer, so no export can forget the escaping: no other module builds a csv writer."""
    offenders = []
    for path in sorted((REPO / "bonescan_core").rglob("*.py")):
        if path.name == "csvfile.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "csv" \
                    and node.attr in ("writer", "DictWriter"):
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []
