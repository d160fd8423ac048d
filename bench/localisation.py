"""Pointing-game baseline on the demo phantoms: where does a model that knows only "hot spot" point?

A fixed (untrained) hot-spot detector, the difference-of-Gaussians classifier of
``tests/test_explain.py`` (one 9x9 conv, global average pooling, Dense(sigmoid)), saved as a
resnet50-named run at the app's 646 x 220, explains every image of N demo studies (seed 7)
through the real pipeline (``explain.explain_images``: Grad-CAM, geometry, cache), and
``evaluation.evaluate`` scores its maps in the pointing game with every metastatic study a
true positive (threshold 0). Chance: a peak placed at random in a 1024 x 256 view hits one of
k lesions with probability about k * pi * 15^2 / (1024 * 256) = 0.0027 k.
Prints one JSON object: the localisation summary, seconds per study for the maps and for
scoring, and the environment.

    python bench/localisation.py [N_STUDIES]

Figures, never assertions (tests/test_localisation.py checks the method).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment  # noqa: E402 - tests/ and bench/ are on the path only after the lines above
from test_explain import resnet_like, save_run  # noqa: E402

from bonescan_core import db as dbm  # noqa: E402
from bonescan_core import evaluation, explain, ingest  # noqa: E402

SIZE = (646, 220)


def main(n_studies: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        db_path = Path(folder) / "labels.db"
        with dbm.opened(db_path) as db:
            ingest.add_demo_studies(db, n_studies, seed=7)
            run_id = save_run(db, db_path, resnet_like(SIZE, weight=1.0), image_size=SIZE)
            with dbm.write(db):
                db.execute("UPDATE runs SET threshold = 0.0 WHERE id = ?", [run_id])
            by_study: dict[int, list[int]] = {}
            for image_id, study_id in db.execute("SELECT id, study_id FROM images ORDER BY id").fetchall():
                by_study.setdefault(study_id, []).append(image_id)
            labels = {study: label == "metastatic" for study, label in db.execute(
                "SELECT study_id, label FROM reviews WHERE reviewer = 'reference'").fetchall()}
            started = time.perf_counter()
            rows = []
            for study_id, image_ids in by_study.items():
                for image_id, found in explain.explain_images(db, db_path, run_id, image_ids).items():
                    rows.append({"run_id": run_id, "image_id": image_id, "subset": "test",
                                 "label": int(labels[study_id]), "probability": found.probability})
            map_seconds = (time.perf_counter() - started) / len(by_study)
            with dbm.write(db):
                db["predictions"].insert_all(rows)
            started = time.perf_counter()
            loc = evaluation.localisation_summary(db, run_id, threshold=0.0)
            score_seconds = time.perf_counter() - started
    return {"localisation": loc, "studies": n_studies, "image_size": list(SIZE),
            "map_seconds_per_study": round(map_seconds, 3), "scoring_seconds": round(score_seconds, 3),
            "environment": environment()}


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 40), indent=2))
