"""Do scintinet's fixed reader channels carry the signal? Hand-made scores on demo phantoms, no training.

Draws demo studies (``phantom.make_studies``, the generator behind ``bonescan demo``), fits each
view to the network's input size as the app does (``preprocess.prepare_image``), computes
``scintinet.reader_channels`` in Keras (the model's own graph code) and prints one JSON line:

* ``study_auc``: for each channel, the study-level AUC of one hand-made score, the channel's
  maximum over a study's two views (posterior mirrored, as in fusion). The grey image's
  maximum is the baseline a network starts from without the channels.
* ``at_findings``: the 10th / 50th / 90th percentile of the large-ring contrast and the
  asymmetry at metastases, at each kind of look-alike, and at the highest place of each view
  away from every finding ("normal", the anatomy a score must not fire on).

    python bench/reader_channels.py --studies 60 --size 512x128
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _size(text: str) -> tuple[int, int]:
    height, width = (int(part) for part in text.lower().split("x"))
    return height, width


def rank_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of raw scores (any range): the chance that a positive outscores a negative, ties half."""
    positive, negative = scores[labels == 1], scores[labels == 0]
    greater = (positive[:, None] > negative[None, :]).mean()
    return float(greater + 0.5 * (positive[:, None] == negative[None, :]).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=60)
    parser.add_argument("--seed", type=int, default=11, help="phantom seed (not the demo's 7: no peeking at its test set)")
    parser.add_argument("--size", type=_size, default=(512, 128))
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from bonescan_core import models, phantom, preprocess, scintinet

    keras = models.keras_module()
    height, width = args.size
    scale_r, scale_c = height / 1024, width / 256
    names = ["grey (scaled)", "contrast, small ring", "contrast, large ring", "asymmetry", "other view"]
    scores, labels = [], []
    found: dict[str, dict[str, list[float]]] = {}
    for study in phantom.make_studies(args.studies, args.seed):
        views = np.stack([preprocess.prepare_image(study.anterior, args.size),
                          preprocess.prepare_image(study.posterior, args.size)[:, ::-1]])  # fusion: mirrored posterior
        x = keras.ops.convert_to_tensor(np.repeat(views[..., None], 3, axis=-1))
        ch = keras.ops.convert_to_numpy(scintinet.reader_channels(scintinet.robust_scale(x), views=2))  # (2, H, W, 5)
        scores.append(ch.reshape(-1, ch.shape[-1]).max(0))
        labels.append(int(study.metastatic))
        for view_index, view in enumerate(("anterior", "posterior")):
            away = np.ones((height, width), bool)
            for finding in (f for f in study.findings if f.view == view):
                row = round(finding.row * scale_r)
                col = round(finding.col * scale_c) if view == "anterior" else width - 1 - round(finding.col * scale_c)
                r0, r1, c0, c1 = max(row - 3, 0), row + 4, max(col - 3, 0), col + 4
                near = ch[view_index, r0:r1, c0:c1]
                entry = found.setdefault(finding.kind, {"contrast": [], "asymmetry": []})
                entry["contrast"].append(float(near[..., 2].max()))
                entry["asymmetry"].append(float(near[..., 3].max()))
                away[max(row - 12, 0):row + 13, max(col - 12, 0):col + 13] = False
            entry = found.setdefault("normal", {"contrast": [], "asymmetry": []})
            entry["contrast"].append(float(ch[view_index, ..., 2][away].max()))
            entry["asymmetry"].append(float(ch[view_index, ..., 3][away].max()))
    scores_array, y = np.array(scores), np.array(labels)
    aucs = {name: round(rank_auc(y, scores_array[:, i]), 3) for i, name in enumerate(names)}
    summary = {kind: {what: [round(float(v), 2) for v in np.percentile(values, [10, 50, 90])] + [len(values)]
                      for what, values in entry.items()} for kind, entry in found.items()}
    print(json.dumps({"studies": args.studies, "seed": args.seed, "size": list(args.size), "positives": int(y.sum()),
                      "study_auc": aucs, "at_findings (p10, p50, p90, n)": summary}))


if __name__ == "__main__":
    main()
