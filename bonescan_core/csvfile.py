"""Reading user-made CSV files (manifests, reading-room sheets) with errors that say what to do."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path


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
