"""Readers against the model and the model card (issue 14, points 2 and 3).

One small fixture, every number computed by hand below: 8 test studies (one patient each), two
readers (ann, ben), an adjudicator (adj; ann adjudicates too), a validation and two training
studies, two excluded studies and an unread one.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from conftest import REPO, add_bare_studies
from sklearn.metrics import roc_auc_score

from bonescan_core import db as dbm
from bonescan_core import errors, evaluation, modelcard, pixelstore, plots, readers, report
from bonescan_core.review import Review, add_review, set_adjudicator
from bonescan_core.runs import TrainConfig

M, N, X = "metastatic", "non_metastatic", "exclude"

# study number -> (subset, stored label, model probability); the model's study threshold is 0.5.
RUN = {1: ("test", 1, 0.9), 2: ("test", 1, 0.7), 3: ("test", 1, 0.55), 4: ("test", 1, 0.6),
       5: ("test", 0, 0.2), 6: ("test", 0, 0.6), 7: ("test", 0, 0.1), 8: ("test", 0, 0.4),
       9: ("val", 1, 0.8), 10: ("train", 1, 0.9), 11: ("train", 0, 0.1)}
READS = {  # study -> {reader: verdict}
    1: {"ann": M, "ben": M}, 2: {"ann": M, "ben": N}, 3: {"ann": N, "ben": M}, 4: {"ann": M},
    5: {"ann": N, "ben": N}, 6: {"ann": M, "ben": N}, 7: {"ann": X, "ben": N}, 8: {"ann": N, "ben": N},
    9: {"ann": N, "ben": N}, 10: {"ann": M}, 11: {"ann": N},  # val and train reads never count
    12: {"ann": X}, 13: {"ann": X, "ben": X},
}
PIXELS = pixelstore.encode_pixels(np.zeros((64, 32), dtype=np.uint16))  # the explorer decodes the study's images
ADJUDICATIONS = {2: ("adj", M), 8: ("ann", M)}
EXCLUSION = {12: "poor_quality", 13: "medical_device"}


def review(study_id: int, reader: str, decision: str, adjudication: bool = False) -> Review:
    if decision == X:
        return Review(study_id, reader, "exclude", exclusion_reason=EXCLUSION.get(study_id, "artifact"))
    criteria = ("typical_pattern",) if decision == M else ("no_abnormal_uptake",)
    return Review(study_id, reader, "include", label=decision, criteria=criteria, adjudication=adjudication)


@pytest.fixture
def fixture_db(db):
    """The fixture above; returns (db, run id, {study number: study id})."""
    ids = dict(zip(range(1, 15), add_bare_studies(db, 14), strict=True))
    set_adjudicator(db, "adj")
    set_adjudicator(db, "ann")
    for number, reads in READS.items():
        for reader, decision in reads.items():
            add_review(db, review(ids[number], reader, decision))
    for number, (adjudicator, decision) in ADJUDICATIONS.items():
        add_review(db, review(ids[number], adjudicator, decision, adjudication=True))
    with dbm.write(db):
        split_id = db["splits"].insert({"seed": 0, "test_fraction": 0.3, "val_fraction": 0.15, "labels_hash": "x",
                                        "cohorts": json.dumps(["default"]), "grouping": "patient",
                                        "created_at": dbm.utc_now()}).last_pk
        db["split_members"].insert_all({"split_id": split_id, "study_id": ids[n], "subset": subset,
                                        "label": M if label else N} for n, (subset, label, _) in RUN.items())
        config = TrainConfig(backbone="vgg19", split_id=split_id)
        run_id = db["runs"].insert({
            "backbone": "vgg19", "status": "done", "config": config.to_json(), "config_hash": "h", "split_id": split_id,
            "created_at": dbm.utc_now(), "threshold": 0.5,
            "results": json.dumps({"thresholds": {"image": 0.5, "study": 0.5, "rule": "youden", "target": None}})}).last_pk
        for n, (subset, label, probability) in RUN.items():
            image_id = db["images"].insert({
                "study_id": ids[n], "view": "anterior", "source": f"s{n}", "format": "png", "height": 64, "width": 32,
                "dtype": "uint16", "pixels": PIXELS, "pixel_sha256": f"sha-{n}", "thumbnail": b"", "display_max": 1.0,
                "created_at": dbm.utc_now()}).last_pk
            if subset != "train":
                db["predictions"].insert({"run_id": run_id, "image_id": image_id, "subset": subset, "label": label,
                                          "probability": probability})
    return db, run_id, ids


def by_reader(result: readers.ReaderComparison) -> dict[str, readers.ReaderScore]:
    return {score.reader: score for score in result.readers}


def test_each_reader_against_the_reference_without_their_own_reads(fixture_db):
    db, run_id, ids = fixture_db
    result = readers.compare(db, run_id)
    scores = by_reader(result)
    assert sorted(scores) == ["ann", "ben"]  # adj only adjudicated: not a reader
    ann, ben = scores["ann"], scores["ben"]
    # ann (7 labelled test studies, 1 excluded). Reference without ann: s1 ben M; s2 adj M; s3 ben M;
    # s4 nobody else -> none; s5 ben N; s6 ben N; s8 adjudicated by ann herself -> ben N.
    # ann's calls M M N . N M N -> TP s1 s2, FN s3, TN s5 s8, FP s6.
    assert (ann.n_read, ann.n_excluded, ann.n_scored, ann.n_no_reference) == (7, 1, 6, 1)
    assert ann.confusion == {"tp": 2, "fp": 1, "tn": 2, "fn": 1}
    assert ann.sensitivity.value == pytest.approx(2 / 3, abs=1e-4) and ann.specificity.value == pytest.approx(2 / 3, abs=1e-4)
    # The model on ann's 6 studies and reference: s3 (0.55) is a TP for it, s6 (0.6) an FP.
    assert ann.model_sensitivity.value == 1.0 and ann.model_specificity.value == pytest.approx(2 / 3, abs=1e-4)
    assert ann.delta_sensitivity.value == pytest.approx(-1 / 3, abs=1e-4) and ann.delta_specificity.value == 0.0
    # ben (7 labelled, val s9 not counted). Reference without ben: s1 ann M; s2 adj M; s3 ann N; s5 ann N; s6 ann M;
    # s7 ann excluded -> none; s8 adjudicated by ann (not ben) M. ben's calls M N M N N . N.
    assert (ben.n_read, ben.n_excluded, ben.n_scored, ben.n_no_reference) == (7, 0, 6, 1)
    assert ben.confusion == {"tp": 1, "fp": 1, "tn": 1, "fn": 3}
    assert ben.sensitivity.value == 0.25 and ben.specificity.value == 0.5
    assert ben.model_sensitivity.value == 0.75 and ben.model_specificity.value == 0.5  # s8 (0.4) a FN for the model


def test_kappa_between_the_model_at_its_threshold_and_each_reader(fixture_db):
    db, run_id, _ = fixture_db
    scores = by_reader(readers.compare(db, run_id))
    # ann vs model over ann's 7 labelled studies: agree 6/7; ann 4 M / 3 N, model 5 M / 2 N.
    # p_o = 42/49, p_e = (4*5 + 3*2)/49 = 26/49, kappa = 16/23.
    assert scores["ann"].kappa == pytest.approx(16 / 23, abs=1e-4)
    assert scores["ann"].percent_agreement == pytest.approx(600 / 7, abs=1e-3)
    # ben over 7: agree 5/7; ben 2 M / 5 N, model 4 M / 3 N: p_e = 23/49, kappa = 12/26.
    assert scores["ben"].kappa == pytest.approx(6 / 13, abs=1e-4)
    low, high = scores["ben"].kappa_ci95
    assert low < 6 / 13 < high


def test_intervals_are_the_patient_bootstrap_of_the_scored_studies(fixture_db):
    db, run_id, ids = fixture_db
    ann = by_reader(readers.compare(db, run_id, n_resamples=500, seed=3))["ann"]
    # ann's scored studies in study order: s1 s2 s3 s5 s6 s8, one patient each.
    scored = [ids[n] for n in (1, 2, 3, 5, 6, 8)]
    patients = [db.execute("SELECT patient_id FROM studies WHERE id = ?", [s]).fetchone()[0] for s in scored]
    y, calls = np.array([1, 1, 1, 0, 0, 0]), np.array([1.0, 1, 0, 0, 1, 0])
    expected = evaluation.bootstrap_ci(y, calls, patients, 0.5, n_resamples=500, seed=3)
    assert ann.sensitivity.ci95 == pytest.approx(expected["recall"], abs=1e-4)
    assert ann.specificity.ci95 == pytest.approx(expected["specificity"], abs=1e-4)
    model = evaluation.bootstrap_ci(y, np.array([0.9, 0.7, 0.55, 0.2, 0.6, 0.4]), patients, 0.5, n_resamples=500, seed=3)
    assert ann.model_specificity.ci95 == pytest.approx(model["specificity"], abs=1e-4)


def test_the_roc_curve_is_the_models_on_the_labelled_test_studies_only(fixture_db):
    db, run_id, _ = fixture_db
    result = readers.compare(db, run_id)
    labels = [RUN[n][1] for n in range(1, 9)]
    probabilities = [RUN[n][2] for n in range(1, 9)]
    assert (result.n_studies, result.threshold, result.subset) == (8, 0.5, "test")
    assert result.roc["auc"] == pytest.approx(roc_auc_score(labels, probabilities))
    assert result.as_json()["readers"][0]["sensitivity"]["value"] == pytest.approx(0.6667, abs=1e-4)


def test_only_out_of_sample_subsets_are_compared(fixture_db):
    db, run_id, _ = fixture_db
    for subset in ("val", "train"):
        with pytest.raises(errors.InputError, match="out-of-sample"):
            readers.compare(db, run_id, subset=subset)
    with pytest.raises(evaluation.NoPredictionsError):
        readers.compare(db, run_id, subset="external")


def test_a_reader_is_a_point_with_whiskers_on_the_roc_figure(fixture_db):
    db, run_id, _ = fixture_db
    result = readers.compare(db, run_id)
    figure = plots.readers_roc_figure("VGG19", result.roc, result.threshold, [r.as_json() for r in result.readers])
    points = {trace.name: trace for trace in figure.data if trace.name and trace.name.startswith(("ann", "ben"))}
    ben = by_reader(result)["ben"]
    trace = points["ben (n = 6)"]
    assert (trace.x[0], trace.y[0]) == pytest.approx((0.5, 0.25))  # (1 - specificity, sensitivity)
    assert trace.error_y.array[0] == pytest.approx(ben.sensitivity.ci95[1] - 0.25)
    assert trace.error_x.array[0] == pytest.approx((1 - ben.specificity.ci95[0]) - 0.5)  # the x axis runs the other way
    assert len(points) == 2


# --- the model card --------------------------------------------------------------------------

def test_inclusion_flow_counts_imported_excluded_by_reason_included_and_subsets(fixture_db):
    db, run_id, _ = fixture_db
    from bonescan_core import runs

    flow = modelcard.inclusion_flow(db, runs.get(db, run_id))
    # 14 imported: s12, s13 excluded; s14 unread; s3, s6, s7 disagree (read after the split); the other 8 included.
    assert (flow["imported"], flow["excluded"], flow["unread"], flow["awaiting_adjudication"], flow["included"]) == (14, 2, 1, 3, 8)
    assert flow["excluded_by_reason"] == {"medical_device": 1, "poor_quality": 1}
    assert flow["subsets"] == {"train": 2, "val": 1, "test": 8}
    assert (flow["included_after_split"], flow["split_no_longer_included"]) == (0, 3)


def test_the_model_card_holds_the_flow_counts_and_every_section(fixture_db):
    db, run_id, _ = fixture_db
    text = report.model_card_markdown(db, run_id)
    for line in ("Imported: 14 studies", "Excluded: 2", "poor image quality: 1", "medical device in view: 1",
                 "Not yet read: 1", "awaiting adjudication: 3", "Included (with a reference label): 8",
                 "train 2, validation 1, test 8"):
        assert line in text, line
    sections = modelcard.model_card(db, run_id)
    assert [s.id for s in sections] == [key for key in modelcard.WHERE if not key.startswith(("report-", "bundle"))]
    # prevalence per partition: test 4 of 8 metastatic
    assert "| test | 8 | 8 | 4 (50.0%) |" in text
    assert "ann: sensitivity 0.667" in text  # readers vs model
    assert "ROC AUC" in text and "No external validation" in text


def test_every_checklist_item_is_answered_or_says_not_addressed():
    ids = [item for item, _, _ in modelcard.CHECKLIST]
    assert len(ids) == len(set(ids))
    assert sum(i.startswith("CLAIM ") for i in ids) == 44
    tripod = {re.sub(r"[a-z]$", "", i.removeprefix("TRIPOD+AI ")) for i in ids if i.startswith("TRIPOD+AI ")}
    assert tripod == {str(n) for n in range(1, 28)}  # all 27 TRIPOD+AI items (with their sub-items)
    for item, text, answer in modelcard.checklist_rows():
        assert text and len(text) <= 100, item
        assert answer == modelcard.NOT_ADDRESSED or answer in modelcard.WHERE.values(), item
    assert all(where is None or where in modelcard.WHERE for _, _, where in modelcard.CHECKLIST)


def test_report_html_has_the_readers_plot_the_model_card_and_the_checklist(fixture_db):
    db, run_id, _ = fixture_db
    page = report.report_html(db, run_id)
    assert '<h2 id="readers-vs-model">' in page
    assert '"ann (n = 6)"' in page and '"ben (n = 6)"' in page  # the readers' points on the ROC figure
    for key in modelcard.WHERE:  # every place the checklist points to is an anchor of the report
        if key != "bundle":
            assert f'id="{key}"' in page, key
    assert "Imported: 14 studies" in page
    assert page.count(f"<td>{modelcard.NOT_ADDRESSED}</td>") == sum(where is None for _, _, where in modelcard.CHECKLIST)
    assert "model_card.md" in report.BUNDLE_FILES


def test_the_evaluate_page_draws_the_readers_on_the_roc_curve(fixture_db):
    from streamlit.testing.v1 import AppTest

    db, run_id, _ = fixture_db
    app = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=120)
    app.query_params["reviewer"] = "lead"
    app.run()
    app.switch_page("app_pages/evaluate.py").run()
    assert not app.exception, [e.value for e in app.exception]
    assert any("Only studies with out-of-sample predictions count" in c.value for c in app.caption)
    (chart,) = [c for c in app.get("plotly_chart") if "Readers on the model" in json.loads(c.proto.spec)["layout"]["title"]["text"]]
    names = [trace.get("name") for trace in json.loads(chart.proto.spec)["data"]]
    assert "ann (n = 6)" in names and "ben (n = 6)" in names
    (table,) = [frame.value for frame in app.dataframe if "reader" in frame.value.columns]
    assert table["reader"].tolist() == ["ann", "ben"] and table["studies scored"].tolist() == [6, 6]
