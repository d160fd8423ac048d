"""Inter-reader agreement: Cohen's kappa with a 95% CI, percent agreement, the 2x2 table.

Per pair of readers, over the studies both have read: kappa and the table count the
studies both labelled (metastatic / non_metastatic); a study one of them excluded is listed
among the disagreements when the other did not exclude it, but is not in the 2x2 table.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from bonescan_core.heavy import sqlite_utils
from bonescan_core.review import LABELS, study_statuses

Z_95 = 1.959963984540054


def cohen_kappa(first: Sequence[str], second: Sequence[str], categories: Sequence[str] = LABELS) -> tuple[float, tuple[float, float]]:
    """Cohen's kappa of two readers and its 95% CI from the large-sample standard error.

    The variance is that of Fleiss, Cohen & Everitt (1969), the non-null asymptotic
    variance, so the interval is right when kappa is not zero.

    Args:
        first, second: the two readers' labels of the same items, equal length >= 1.
        categories: all possible labels (a 2x2 table for the default).

    Returns:
        (kappa, (low, high)); kappa in [-1, 1]. When both readers use one single category
        throughout, chance agreement is 1 and kappa is undefined: returns (nan, (nan, nan)).
    """
    if len(first) != len(second) or not first:
        raise ValueError("need two equally long, non-empty lists of labels")
    table = confusion_table(first, second, categories) / len(first)
    n = len(first)
    rows, cols = table.sum(axis=1), table.sum(axis=0)
    observed = float(np.trace(table))
    expected = float(rows @ cols)
    if math.isclose(expected, 1.0):
        return math.nan, (math.nan, math.nan)
    kappa = (observed - expected) / (1.0 - expected)
    k = len(categories)
    diagonal = sum(table[i, i] * (1 - (rows[i] + cols[i]) * (1 - kappa)) ** 2 for i in range(k))
    off_diagonal = (1 - kappa) ** 2 * sum(
        table[i, j] * (cols[i] + rows[j]) ** 2 for i in range(k) for j in range(k) if i != j
    )
    variance = (diagonal + off_diagonal - (kappa - expected * (1 - kappa)) ** 2) / (n * (1 - expected) ** 2)
    half_width = Z_95 * math.sqrt(max(variance, 0.0))
    return kappa, (max(-1.0, kappa - half_width), min(1.0, kappa + half_width))


def confusion_table(first: Sequence[str], second: Sequence[str], categories: Sequence[str] = LABELS) -> np.ndarray:
    """Counts: rows = first reader's category, columns = second's. (k, k) float64."""
    index = {category: i for i, category in enumerate(categories)}
    table = np.zeros((len(categories), len(categories)))
    for a, b in zip(first, second, strict=True):
        table[index[a], index[b]] += 1
    return table


@dataclass
class PairAgreement:
    """Agreement of two readers (``docs/cli.md`` fields: reviewers, n, kappa, kappa_ci95, percent_agreement)."""

    reviewers: tuple[str, str]
    n: int  # studies both labelled
    kappa: float | None
    kappa_ci95: tuple[float, float] | None
    percent_agreement: float | None  # 0..100
    table: list[list[int]]  # rows: first reader metastatic/non_metastatic; columns: second reader
    disagreements: list[dict] = field(default_factory=list)  # {study_id, <reader>: verdict, ...}

    def as_json(self) -> dict:
        return {
            "reviewers": list(self.reviewers),
            "n": self.n,
            "kappa": self.kappa,
            "kappa_ci95": list(self.kappa_ci95) if self.kappa_ci95 else None,
            "percent_agreement": self.percent_agreement,
            "table": {"labels": list(LABELS), "counts": self.table},
            "disagreements": self.disagreements,
        }


def _clean(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 6)


def pairwise(db: sqlite_utils.Database) -> list[PairAgreement]:
    """Agreement for every pair of readers who have read at least one study in common."""
    statuses = study_statuses(db).values()
    names = sorted({name for status in statuses for name in status.readers})
    pairs = []
    for first, second in itertools.combinations(names, 2):
        both = [s for s in statuses if first in s.readers and second in s.readers]
        if not both:
            continue
        labelled = [s for s in both if s.readers[first] in LABELS and s.readers[second] in LABELS]
        a = [s.readers[first] for s in labelled]
        b = [s.readers[second] for s in labelled]
        disagreements = [
            {"study_id": s.study_id, first: s.readers[first], second: s.readers[second]}
            for s in both if s.readers[first] != s.readers[second]
        ]
        if labelled:
            kappa, ci = cohen_kappa(a, b)
            agreement = 100.0 * sum(x == y for x, y in zip(a, b, strict=True)) / len(a)
            table = confusion_table(a, b).astype(int).tolist()
            pair = PairAgreement((first, second), len(a), _clean(kappa),
                                 None if math.isnan(ci[0]) else (round(ci[0], 6), round(ci[1], 6)),
                                 round(agreement, 4), table, disagreements)
        else:
            pair = PairAgreement((first, second), 0, None, None, None, [[0, 0], [0, 0]], disagreements)
        pairs.append(pair)
    return pairs
