"""CSV files in and out: reading user-made sheets (manifests, reading-room sheets) with errors that
say what to do, and writing every CSV bonescan produces through one function that defuses formulas.

Formula injection: a spreadsheet runs a cell that starts with ``= + - @`` (and, in some, TAB or
CR) as a formula, so a reviewer note ``=HYPERLINK(...)`` would act when the export is opened.
:func:`write_rows` prefixes such text cells with a single quote ``'`` (the convention spreadsheets
show as text), and :func:`unescape_cell` removes it again on import, so a round trip is lossless.
A text cell that itself starts with ``'`` is quoted too, so the removal is never ambiguous.
Numbers are written as numbers: ``-3`` is a value, not a formula.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

# First characters that make a spreadsheet evaluate a cell (OWASP's list), plus the quote itself.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_QUOTED_STARTS = (*FORMULA_STARTS, "'")


def escape_cell(value: str) -> str:
    """``value`` made safe for a spreadsheet: ``'`` + value when it starts with a formula character or ``'``."""
    return "'" + value if value.startswith(_QUOTED_STARTS) else value


def unescape_cell(value: str) -> str:
    """Undo :func:`escape_cell`: ``unescape_cell(escape_cell(v)) == v`` for every string ``v``."""
    return value[1:] if value.startswith("'") and value[1:].startswith(_QUOTED_STARTS) else value


def write_rows(handle: TextIO, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> int:
    """Write a header and ``rows`` as CSV to an open text handle; returns the number of rows.

    Text cells go through :func:`escape_cell`; None becomes an empty cell; numbers are written as
    ``str()`` gives them. Lines end in ``\\n``. Open files with ``newline=""``.
    """
    writer = csv.writer(handle, lineterminator="\n")
    writer.writerow(columns)
    count = 0
    for row in rows:
        writer.writerow(["" if row[c] is None else escape_cell(row[c]) if isinstance(row[c], str) else row[c] for c in columns])
        count += 1
    return count


def read_rows(path: Path, required: Sequence[str], error: type[Exception]) -> list[tuple[int, dict[str, str]]]:
    """Rows of a UTF-8 CSV (a BOM is fine) with their line numbers (the header is line 1).

    Raises:
        error: a required column is missing, or the file cannot be read as UTF-8 CSV.
    """
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise error(f"{path}: missing columns {', '.join(missing)}; the header needs {', '.join(required)}")
            return list(enumerate(reader, start=2))
    except (OSError, UnicodeDecodeError, csv.Error) as problem:
        raise error(f"{path}: cannot read it as a UTF-8 CSV ({problem}); save it as UTF-8 CSV") from problem
