"""Lesion points: where on a stored image a reader (or a phantom's ground truth) puts a metastasis.

A lesion point is (row, col) in the STORED image's own pixels (row 0 at the top, the image's
``height`` x ``width``), one row of the ``lesions`` table per point and image
(migration ``015_localisation``): ``lesions(image_id, row, col, source)``, ``source``
``phantom`` or ``manifest``. They are what Grad-CAM localisation is measured against
(:mod:`bonescan_core.localisation`).

Where they come from:

* demo phantoms: every metastasis of ``images.truth`` (the phantom ground truth: findings
  with ``kind``, ``view``, ``row``, ``col``, ``radius``, already in that view's pixels; the
  posterior column is mirrored) is stored as a point when the study is added, and the
  migration copies those of phantoms added before it. One table, not a second reading of
  ``images.truth`` at evaluation time, so that phantoms and imported scans are read, checked
  and counted alike, and evaluation does not parse every image's findings;
* an import manifest's optional ``lesions`` column: a JSON list of ``[view, row, col]``
  (``view`` as in the ``view`` column: anterior/posterior or A/P) in the pixels of the file
  of that row, e.g. ``[["anterior", 412, 97], ["P", 415, 160]]``. A point names the view of
  one of the file's images (a multi-frame DICOM may hold both); :func:`parse_points` checks
  the cell when the manifest is read, :func:`check_points` checks the points against the
  decoded images (inside the image, view present) before anything is stored, and a file
  whose points do not fit is rejected with a reason that says what to fix.

Standard library, numpy and the database only (the import and the CLI's fast path use it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from bonescan_core.errors import InputError
from bonescan_core.heavy import sqlite_utils

SOURCES = ("phantom", "manifest")
VIEW_TOKENS = {  # the spellings of a view in names and CSV cells (ingest uses the same)
    "a": "anterior", "ant": "anterior", "anterior": "anterior",
    "p": "posterior", "post": "posterior", "posterior": "posterior",
}
EXAMPLE = '[["anterior", 412, 97], ["posterior", 415, 160]]'


class LesionError(InputError):
    """Lesion points that cannot be used (bad JSON, unknown view, outside the image); the message says what to fix."""


@dataclass(frozen=True)
class LesionPoint:
    """One lesion centre on one view: ``view`` anterior/posterior, ``row`` and ``col`` in that
    view's stored pixels (floats, >= 0)."""

    view: str
    row: float
    col: float


def parse_points(text: str) -> tuple[LesionPoint, ...]:
    """The points of a manifest ``lesions`` cell (JSON list of ``[view, row, col]``).

    Args:
        text: the cell; empty (or ``[]``) means no points.

    Returns:
        The points in the order given (views spelled ``anterior``/``posterior``).

    Raises:
        LesionError: not JSON, not a list of ``[view, row, col]``, an unknown view, or a row
            or column that is not a finite number >= 0 (the message quotes the entry).
    """
    text = (text or "").strip()
    if not text:
        return ()
    try:
        data = json.loads(text)
    except ValueError:
        raise LesionError(f"lesions {text[:60]!r} is not JSON; write a list of [view, row, col], e.g. {EXAMPLE}") from None
    if not isinstance(data, list):
        raise LesionError(f"lesions must be a JSON list of [view, row, col], e.g. {EXAMPLE}")
    points = []
    for entry in data:
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)):
            raise LesionError(f"lesion {json.dumps(entry)} is not [view, row, col]; e.g. {EXAMPLE}")
        view = VIEW_TOKENS.get(entry[0].strip().lower())
        if view is None:
            raise LesionError(f"lesion {json.dumps(entry)} names view {entry[0]!r}; use anterior or posterior (or A/P)")
        row, col = entry[1], entry[2]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in (row, col)):
            raise LesionError(f"lesion {json.dumps(entry)}: row and col must be numbers >= 0, in the stored image's pixels")
        points.append(LesionPoint(view, float(row), float(col)))
    return tuple(points)


def check_points(points: Sequence[LesionPoint], images: Sequence[tuple[str | None, int, int]]) -> str | None:
    """Why ``points`` do not fit a file's images, or None when they all do.

    Args:
        points: from :func:`parse_points`.
        images: (view, height, width) of each image the file holds (view None: unknown).

    Returns:
        One sentence saying what to fix, or None.
    """
    shapes = {view: (height, width) for view, height, width in images if view is not None}
    for point in points:
        if point.view not in shapes:
            held = ", ".join(sorted(shapes)) or "no image of known view"
            return (f"lesion [{point.view}, {point.row:g}, {point.col:g}] names the {point.view} view but this file holds "
                    f"{held}; put the point on the row of the {point.view} file, or give the file's view")
        height, width = shapes[point.view]
        if not (point.row < height and point.col < width):
            return (f"lesion [{point.view}, {point.row:g}, {point.col:g}] lies outside the {height}x{width} {point.view} image; "
                    "give row < height and col < width in the stored image's pixels")
    return None


def points_from_truth(truth: str | None) -> list[tuple[str, float, float]]:
    """(view, row, col) of every metastasis in a phantom's ``images.truth`` JSON (none for None)."""
    if not truth:
        return []
    return [(f["view"], float(f["row"]), float(f["col"])) for f in json.loads(truth) if f.get("kind") == "metastasis"]


def store_points(db: sqlite_utils.Database, image_id: int, points: Iterable[tuple[float, float]], source: str) -> int:
    """Add (row, col) points of one image (call inside ``dbm.write``); a point already stored is
    kept once. Returns how many rows were added."""
    if source not in SOURCES:
        raise ValueError(f"lesion source must be one of {', '.join(SOURCES)}, not {source!r}")
    added = 0
    for row, col in points:
        cursor = db.execute("INSERT OR IGNORE INTO lesions (image_id, row, col, source) VALUES (?, ?, ?, ?)",
                            [int(image_id), float(row), float(col), source])
        added += cursor.rowcount
    return added


def points_by_image(db: sqlite_utils.Database, image_ids: Iterable[int]) -> dict[int, np.ndarray]:
    """{image id: (k, 2) float64 (row, col)} of the images that have lesion points (others left out)."""
    wanted = sorted({int(i) for i in image_ids})
    found: dict[int, list[tuple[float, float]]] = {}
    for start in range(0, len(wanted), 500):
        chunk = wanted[start:start + 500]
        marks = ", ".join("?" for _ in chunk)
        for image_id, row, col in db.execute(
                f"SELECT image_id, row, col FROM lesions WHERE image_id IN ({marks}) ORDER BY image_id, id", chunk).fetchall():
            found.setdefault(image_id, []).append((row, col))
    return {image_id: np.asarray(points, dtype=np.float64) for image_id, points in found.items()}


def studies_with_points(db: sqlite_utils.Database) -> int:
    """How many studies have at least one lesion point."""
    return int(db.execute(
        "SELECT COUNT(DISTINCT i.study_id) FROM lesions l JOIN images i ON i.id = l.image_id").fetchone()[0])


__all__ = ["LesionError", "LesionPoint", "check_points", "parse_points", "points_by_image", "points_from_truth",
           "store_points", "studies_with_points"]
