"""Model-assisted reading: out-of-sample opinions only, the blind rule on the Review page, the
``assisted`` flag, the likely-label-error queue (confident learning) and ``bonescan queue``."""

from __future__ import annotations

import csv
import io
import json
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest
from conftest import REPO, add_bare_studies
from streamlit.testing.v1 import AppTest

from bonescan_core import assist, errors, pixelstore
from bonescan_core import db as dbm
from bonescan_core import review as rv
from bonescan_core.cli import QUEUE_ORDER_NAMES, main
from bonescan_core.ingest import add_demo_studies


def read(db, study: int, label: str, reviewer: str = "ann", **extra) -> int:
    criteria = ("typical_pattern",) if label == "metastatic" else ("no_abnormal_uptake",)
    return rv.add_review(db, rv.Review(study, reviewer, "include", label=label, criteria=criteria, **extra))


def insert_run(db, members: dict[int, str], study_rows: dict[int, tuple[str, float]], *, status: str = "done",
               study_threshold: float = 0.5) -> int:
    """A run without a model file: a split of ``members`` {study: subset} and one
    ``study_predictions`` row per ``study_rows`` {study: (subset, probability)}."""
    labels = {s: rv.study_statuses(db, [s])[s].label or "non_metastatic" for s in members}
    with dbm.write(db):
        split_id = db["splits"].insert({"seed": 0, "test_fraction": 0.3, "val_fraction": 0.15, "labels_hash": "test",
                                        "created_at": dbm.utc_now()}).last_pk
        db["split_members"].insert_all([{"split_id": split_id, "study_id": s, "subset": subset, "label": labels[s]}
                                        for s, subset in members.items()])
        config = {"backbone": "resnet50", "mode": "full", "weights": "none", "image_size": [64, 32],
                  "view_mode": "per_image", "split_id": split_id}
        run_id = db["runs"].insert({
            "backbone": "resnet50", "status": status, "config": json.dumps(config), "config_hash": f"test-{split_id}",
            "split_id": split_id, "created_at": dbm.utc_now(), "finished_at": dbm.utc_now(), "threshold": study_threshold,
            "results": json.dumps({"thresholds": {"image": study_threshold, "study": study_threshold, "rule": "youden",
                                                  "target": None}}),
        }).last_pk
        db["study_predictions"].insert_all([
            {"run_id": run_id, "study_id": s, "subset": subset, "probability": p,
             "label": None if subset == "external" else int(labels.get(s) == "metastatic")}
            for s, (subset, p) in study_rows.items()])
    return run_id


# --- likely label errors ---------------------------------------------------------------------------

def test_rank_label_errors_is_confident_learning_with_per_class_thresholds():
    # Labelled 1: p = 0.9, 0.8, 0.1 -> t1 = 0.6; labelled 0: p = 0.2, 0.3, 0.7 -> t0 = mean(0.8, 0.7, 0.3) = 0.6.
    ids, labels, p = [1, 2, 3, 4, 5, 6], [1, 1, 1, 0, 0, 0], [0.9, 0.8, 0.1, 0.2, 0.3, 0.7]
    assert assist.class_thresholds(np.array(labels), np.array(p)) == pytest.approx({1: 0.6, 0: 0.6})
    ranked = assist.rank_label_errors(ids, labels, p)
    # study 3 (labelled 1): P(0) = 0.9 >= 0.6, margin 0.3; study 6 (labelled 0): P(1) = 0.7 >= 0.6, margin 0.1.
    assert [s for s, _ in ranked] == [3, 6]
    assert [score for _, score in ranked] == pytest.approx([0.3, 0.1])
    # A model low on every study (t1 = 0.25, t0 = 0.85): a fixed 0.5 would call both metastatic
    # labels wrong; the class thresholds flag only the one far below its class (P(0) = 0.95, margin 0.1).
    ranked = assist.rank_label_errors([1, 2, 3, 4], [1, 1, 0, 0], [0.45, 0.05, 0.1, 0.2])
    assert [s for s, _ in ranked] == [2] and ranked[0][1] == pytest.approx(0.1)
    # One class only: the other class has no threshold, so nothing can be flagged as it.
    assert assist.rank_label_errors([1, 2], [0, 0], [0.9, 0.1]) == []


def test_label_errors_use_out_of_sample_predictions_and_current_labels(db):
    studies = add_bare_studies(db, 8)
    truth = ["metastatic", "metastatic", "metastatic", "non_metastatic", "non_metastatic", "non_metastatic",
             "non_metastatic", "metastatic"]
    for study, label in zip(studies, truth, strict=True):
        read(db, study, label)
    members = dict.fromkeys(studies[:7], "test") | {studies[0]: "train", studies[2]: "val"}
    rows = {studies[0]: ("train", 0.01),  # a training prediction that contradicts its label: never used
            studies[1]: ("test", 0.9), studies[2]: ("val", 0.2), studies[3]: ("test", 0.1), studies[4]: ("test", 0.95),
            studies[5]: ("test", 0.3), studies[7]: ("external", 0.05)}
    run_id = insert_run(db, members, rows)
    found = assist.label_errors(db, run_id)
    # labelled 1 (out of sample): 0.9, 0.2, 0.05 -> t1 = 0.3833; labelled 0: 0.1, 0.95, 0.3 -> t0 = mean(0.9, 0.05, 0.7) = 0.55
    assert [(f.study_id, f.subset) for f in found] == [(studies[4], "test"), (studies[7], "external"), (studies[2], "val")]
    assert [f.score for f in found] == pytest.approx([0.95 - 0.38333, 0.95 - 0.55, 0.8 - 0.55], abs=1e-4)
    assert studies[0] not in {f.study_id for f in found}
    # The current label counts, not the one the run trained with: an adjudicated correction of study 5.
    rv.set_adjudicator(db, "cat")
    read(db, studies[4], "metastatic", reviewer="cat", adjudication=True)
    assert studies[4] not in {f.study_id for f in assist.label_errors(db, run_id)}
    queue = assist.reading_queue(db, "ann", "label_errors", run_id)
    assert queue == [(f.study_id, f.score) for f in assist.label_errors(db, run_id)]


def test_queue_orders_and_refusals(db):
    studies = add_bare_studies(db, 4)
    with pytest.raises(errors.InputError, match="no finished run"):
        assist.reading_queue(db, "ann", "label_errors")
    assert assist.reading_queue(db, "ann", "all") == [(s, None) for s in studies]
    assert set(assist.QUEUE_ORDERS) == set(QUEUE_ORDER_NAMES)  # the CLI offers every order the page has
    with pytest.raises(errors.InputError, match="unknown queue order"):
        assist.reading_queue(db, "ann", "random")
    with pytest.raises(errors.RunNotFound):
        assist.reading_queue(db, "ann", "label_errors", 99)
    queued = insert_run(db, {}, {}, status="queued")
    with pytest.raises(errors.InputError, match="is queued"):
        assist.reading_queue(db, "ann", "uncertain", queued)


# --- what a reader may see ----------------------------------------------------------------------------

def test_model_visible_is_blind_until_the_reader_has_read():
    assert not assist.model_visible(blind=True, show_model=True, read_by_reader=False)
    assert not assist.model_visible(blind=False, show_model=False, read_by_reader=False)
    assert assist.model_visible(blind=False, show_model=True, read_by_reader=False)
    assert assist.model_visible(blind=True, show_model=False, read_by_reader=True)


def test_opinion_never_gives_a_training_prediction(db):
    studies = add_bare_studies(db, 4)
    for study in studies:
        read(db, study, "metastatic")
    run_id = insert_run(db, {studies[0]: "train", studies[1]: "val", studies[2]: "test"},
                        {studies[0]: ("train", 0.99), studies[1]: ("val", 0.7)})
    trained = assist.opinion(db, run_id, studies[0])
    assert (trained.status, trained.probability) == ("trained", None)
    val = assist.opinion(db, run_id, studies[1])
    assert (val.status, val.subset, val.probability, val.threshold, val.called) == ("out_of_sample", "val", 0.7, 0.5, "metastatic")
    assert assist.opinion(db, run_id, studies[2]).status == "missing"
    assert assist.opinion(db, run_id, studies[3]).status == "not_predicted"
    with pytest.raises(errors.InputError, match="trained run"):
        assist.study_overlays(db, "unused.db", run_id, studies[0], [])


def test_an_empty_map_is_named_in_a_note_and_a_map_with_evidence_is_not(db):
    """A map that is zero everywhere leaves the plain scan; the note says so, so a grey overlay
    is never mistaken for a map that failed to draw."""
    from bonescan_core import catalog, runs

    add_demo_studies(db, 1, seed=0)
    study = db.execute("SELECT id FROM studies").fetchone()[0]
    read(db, study, "metastatic")
    run_id = insert_run(db, {study: "val"}, {study: ("val", 0.8)})
    images = catalog.study_images(db, study)
    anterior, posterior = (next(image for image in images if image["view"] == view) for view in ("anterior", "posterior"))
    with dbm.write(db):
        db["predictions"].insert_all([{"run_id": run_id, "image_id": image["id"], "subset": "val", "label": 1,
                                       "probability": 0.8} for image in images])
    evidence = np.zeros(anterior["pixels"].shape, dtype=np.float32)
    evidence[10:20, 10:20] = 1.0
    runs.store_heatmaps(db, run_id, {anterior["id"]: evidence,
                                     posterior["id"]: np.zeros(posterior["pixels"].shape, dtype=np.float32)})
    overlays = {o.view: o for o in assist.study_overlays(db, "unused.db", run_id, study, images)}
    assert (overlays["anterior"].empty_map, overlays["posterior"].empty_map) == (False, True)
    note = assist.empty_map_note(list(overlays.values()))
    assert note.startswith(f"Posterior (image {posterior['id']}): the Grad-CAM map is empty")
    assert assist.empty_map_note([overlays["anterior"]]) is None


# --- the assisted flag ---------------------------------------------------------------------------------

def test_assisted_reviews_are_stored_and_exported(db, tmp_path):
    studies = add_bare_studies(db, 2)
    read(db, studies[0], "metastatic")
    read(db, studies[1], "non_metastatic", assisted=True)
    assert [r["assisted"] for r in rv.history(db, studies[0]) + rv.history(db, studies[1])] == [0, 1]
    sheet = tmp_path / "reviews.csv"
    assert rv.export_reviews_csv(db, sheet) == 2
    rows = list(csv.DictReader(sheet.open()))
    assert [row["assisted"] for row in rows] == ["0", "1"]
    other = tmp_path / "other.db"
    with dbm.opened(other) as fresh:
        add_bare_studies(fresh, 2)
        assert rv.import_reviews_csv(fresh, sheet).added == 2
        assert [r["assisted"] for r in rv.history(fresh, 1) + rv.history(fresh, 2)] == [0, 1]


# --- bonescan queue ------------------------------------------------------------------------------------

def cli(db_path, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["--db", str(db_path), *argv])
    return code, out.getvalue(), err.getvalue()


def test_cli_queue_prints_label_errors_worst_first_and_refuses_what_it_cannot_do(db_path):
    with dbm.opened(db_path) as db:
        studies = add_bare_studies(db, 4)
        for study, label in zip(studies, ["metastatic", "metastatic", "non_metastatic", "non_metastatic"], strict=True):
            read(db, study, label)
        run_id = insert_run(db, dict.fromkeys(studies, "test"),
                            {studies[0]: ("test", 0.9), studies[1]: ("test", 0.2), studies[2]: ("test", 0.1),
                             studies[3]: ("test", 0.8)})
    # t1 = 0.55, t0 = mean(0.9, 0.2) = 0.55: study 2 has P(0) = 0.8 (0.25), study 4 P(1) = 0.8 (0.25): a tie, by id.
    code, out, _ = cli(db_path, "queue", "--order", "label_errors", "--run", str(run_id), "--json")
    assert code == 0
    assert json.loads(out) == [{"study_id": studies[1], "score": 0.25}, {"study_id": studies[3], "score": 0.25}]
    code, out, _ = cli(db_path, "queue", "--order", "label_errors")  # the newest finished run; a table
    assert code == 0 and out.splitlines()[0] == "study_id\tscore" and out.splitlines()[1] == f"{studies[1]}\t0.25"
    code, out, _ = cli(db_path, "queue", "--order", "unread", "--reviewer", "bob", "--json")
    assert code == 0 and json.loads(out) == [{"study_id": s, "score": None} for s in studies]
    assert cli(db_path, "queue", "--order", "label_errors", "--run", "99", "--json")[0] == 2
    code, _, err = cli(db_path, "queue", "--order", "unread")
    assert code == 2 and "--reviewer" in err
    assert cli(db_path, "queue", "--order", "worst")[0] == 2  # argparse: not an order


# --- the Review page ------------------------------------------------------------------------------------

PROBABILITY = 0.873  # the test study's probability: must never reach a blind reader before they read


@pytest.fixture
def review_run(db_path) -> dict[str, int]:
    """Four demo studies: the first in the run's test subset (p = 0.873 on both views, with stored
    Grad-CAM maps), the second in its training subset (a stored p = 0.777 that must never show),
    the third in validation, the fourth outside the split."""
    with dbm.opened(db_path) as db:
        add_demo_studies(db, 4, seed=2)
        studies = [row[0] for row in db.execute("SELECT id FROM studies ORDER BY id").fetchall()]
        test, train, val, _ = studies
        run_id = insert_run(db, {test: "test", train: "train", val: "val"},
                            {test: ("test", PROBABILITY), train: ("train", 0.777), val: ("val", 0.2)})
        with dbm.write(db):
            for image_id, height, width in db.execute("SELECT id, height, width FROM images WHERE study_id = ?", [test]).fetchall():
                db["predictions"].insert({"run_id": run_id, "image_id": image_id, "subset": "test", "label": 1,
                                          "probability": PROBABILITY})
                heat = np.zeros((height, width), dtype=np.float16)
                heat[height // 3: height // 3 + 40, width // 2 - 20: width // 2 + 20] = 1.0
                db["explanations"].insert({"run_id": run_id, "image_id": image_id, "heatmap": pixelstore.encode_pixels(heat)})
    return {"run": run_id, "test": test, "train": train}


def open_review() -> AppTest:
    app = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=90)
    app.query_params["reviewer"] = "ann"
    app.run()
    app.switch_page("app_pages/review.py").run()
    assert not app.exception, [e.value for e in app.exception]
    return app


def shown_text(app: AppTest) -> str:
    """Every text the page shows: Markdown, captions, alerts, image captions, widget labels."""
    parts = [e.value for kind in ("markdown", "caption", "info", "success", "warning", "error") for e in app.get(kind)]
    parts += [caption for image in app.get("image") for caption in image.captions]
    parts += [w.label for w in app.slider]
    return "\n".join(parts)


def model_shown(app: AppTest) -> bool:
    text = shown_text(app)
    return f"{PROBABILITY:.3f}" in text or "Grad-CAM" in text


def test_a_blind_reader_sees_the_model_only_after_saving_a_read(db_path, review_run):
    app = open_review()
    study = review_run["test"]
    assert app.session_state["rv_study"] == study and app.toggle(key="rv_blind").value
    assert not model_shown(app), "the model's probability or map was shown before the read was saved"
    assert "Hidden until you have saved your read" in shown_text(app)
    assert app.toggle(key="rv_show_model").proto.disabled  # blind mode: no way to show it early

    app.checkbox(key=f"rv_{study}_typical_pattern").check()
    app.button(key="rv_metastatic").click().run()
    assert app.session_state["rv_study"] == review_run["train"]
    assert not model_shown(app)  # the next study is unread: still hidden
    app.button(key="rv_prev").click().run()  # back to the study just read
    assert app.session_state["rv_study"] == study
    text = shown_text(app)
    assert f"probability of metastasis **{PROBABILITY:.3f}**" in text and "Grad-CAM" in text
    with dbm.opened(db_path) as db:
        assert [r["assisted"] for r in rv.history(db, study) if r["reviewer"] == "ann"] == [0]
        # A correction saved with the model on screen is assisted.
        app.checkbox(key=f"rv_{study}_typical_pattern").check()
        app.button(key="rv_metastatic").click().run()
        assert [r["assisted"] for r in rv.history(db, study) if r["reviewer"] == "ann"] == [0, 1]


def test_show_model_before_reading_records_an_assisted_read_and_hides_training_predictions(db_path, review_run):
    app = open_review()
    app.toggle(key="rv_blind").set_value(False).run()
    app.toggle(key="rv_show_model").set_value(True).run()
    study = review_run["test"]
    assert f"{PROBABILITY:.3f}" in shown_text(app)
    app.checkbox(key=f"rv_{study}_typical_pattern").check()
    app.button(key="rv_metastatic").click().run()
    with dbm.opened(db_path) as db:
        assert [r["assisted"] for r in rv.history(db, study) if r["reviewer"] == "ann"] == [1]
    assert app.session_state["rv_study"] == review_run["train"]
    text = shown_text(app)
    assert "This study trained the model" in text and "0.777" not in text and "Grad-CAM" not in text
