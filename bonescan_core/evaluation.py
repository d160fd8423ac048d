"""Metrics, confidence intervals, thresholds and paired tests over stored predictions.

No plotting here (see ``plots.py``); everything takes and returns plain arrays and dicts.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_curve


def youden_threshold(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Decision threshold that maximises Youden's J (sensitivity + specificity - 1).

    Args:
        labels: (n,) 0/1, 1 = metastatic; both classes present.
        probabilities: (n,) in [0, 1].

    Returns:
        A threshold in [0, 1]; predict metastatic when probability >= threshold. With one
        class only (J undefined), 0.5.
    """
    labels = np.asarray(labels).astype(int)
    if labels.min() == labels.max():
        return 0.5
    fpr, tpr, thresholds = roc_curve(labels, np.asarray(probabilities, dtype=np.float64))
    best = int(np.argmax(tpr - fpr))
    return float(np.clip(thresholds[best], 0.0, 1.0))  # roc_curve's first threshold is +inf
