"""Cohorts: every study belongs to one (``studies.cohort``, default ``default``).

A cohort is the set of studies from one source (a hospital, a scanner, a demo with a scanner
shift). A split is made from chosen cohorts (``splits.make_split(cohorts=...)``); the studies
of the other cohorts are external to its runs. A study keeps the cohort it was first imported
into. Never imports Keras or TensorFlow.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from bonescan_core.errors import InputError
from bonescan_core.heavy import sqlite_utils

DEFAULT_COHORT = "default"
# Short, printable, no commas (``--cohort a,b`` lists several) and no leading space or dot.
COHORT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,39}")
ALLOWED = "1 to 40 letters, digits, spaces, '.', '_' or '-', starting with a letter or digit"


class CohortError(InputError):
    """A cohort name that is not allowed, or a cohort with no studies; the message says what is allowed."""


def check_cohort(name: str | None) -> str:
    """The cohort name, stripped of surrounding spaces; None or empty gives :data:`DEFAULT_COHORT`.

    Raises:
        CohortError: the name does not match :data:`COHORT_PATTERN` (the message says what is allowed).
    """
    name = (name or "").strip() or DEFAULT_COHORT
    if not COHORT_PATTERN.fullmatch(name):
        raise CohortError(f"cohort name {name!r} is not allowed: use {ALLOWED}, e.g. hospital-b")
    return name


def parse_cohorts(text: str | Iterable[str] | None) -> list[str] | None:
    """``"a, b"`` (or a list) -> sorted, de-duplicated, checked names; None or empty -> None (every cohort)."""
    if text is None:
        return None
    parts = text.split(",") if isinstance(text, str) else list(text)
    names = sorted({check_cohort(part) for part in parts if part.strip()})
    return names or None


def study_ids(db: sqlite_utils.Database, cohort: str) -> list[int]:
    """The ids of a cohort's studies, ascending (empty for a cohort with none)."""
    return [row[0] for row in db.execute("SELECT id FROM studies WHERE cohort = ? ORDER BY id", [cohort]).fetchall()]


def in_cohort(db: sqlite_utils.Database, ids: Iterable[int], cohort: str | None) -> list[bool]:
    """For each study id, whether it belongs to ``cohort`` (all True when ``cohort`` is None):
    how the external assessment keeps one cohort's rows."""
    ids = list(ids)
    if cohort is None:
        return [True] * len(ids)
    members = set(study_ids(db, cohort))
    return [int(i) in members for i in ids]


def list_cohorts(db: sqlite_utils.Database) -> list[str]:
    """The cohorts that hold at least one study, sorted."""
    return [row[0] for row in db.execute("SELECT DISTINCT cohort FROM studies ORDER BY cohort").fetchall()]
