"""The Evaluate page and the HTML report over finished runs whose predictions are inserted
directly (no training): every figure the page shows is checked against numbers computed here
from the inserted rows, independently of bonescan's evaluation code."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from conftest import REPO
from sklearn.metrics import roc_auc_score, roc_curve
from streamlit.testing.v1 import AppTest

from bonescan_core import db as dbm
from bonescan_core import pixelstore, report
from bonescan_core.ingest import add_demo_studies

THRESHOLDS = {"resnet50": 0.5, "densenet121": 0.4}  # each run's stored (validation-chosen) threshold
TEST_STUDIES, VAL_STUDIES = 6, 2


def insert_runs(db) -> dict[str, dict]:
    """Two done runs (ResNet50, then DenseNet121) on one split of 8 demo studies, with
    predictions for all 16 images (6 test studies, 2 val studies) and a stored Grad-CAM map for
    each; no model file. Returns {backbone: {"id", "threshold", "rows": [(image_id, study_id,
    patient_id, view, subset, label, probability)]}}."""
    add_demo_studies(db, TEST_STUDIES + VAL_STUDIES, seed=5)
    images = db.execute("""SELECT i.id, i.study_id, s.patient_id, i.view, i.height, i.width
                           FROM images i JOIN studies s ON s.id = i.study_id ORDER BY i.study_id, i.id""").fetchall()
    study_ids = sorted({row[1] for row in images})
    subset = {study: "test" if n < TEST_STUDIES else "val" for n, study in enumerate(study_ids)}
    label = {study: n % 2 for n, study in enumerate(study_ids)}  # 1 = metastatic
    rng = np.random.default_rng(14)  # a seed where both runs' four counts are non-zero and their accuracies differ
    runs = {}
    with dbm.write(db):
        split_id = db["splits"].insert({"seed": 0, "test_fraction": 0.75, "val_fraction": 0.25, "labels_hash": "test",
                                        "created_at": dbm.utc_now()}).last_pk
        db["split_members"].insert_all([{"split_id": split_id, "study_id": s, "subset": subset[s],
                                         "label": "metastatic" if label[s] else "non_metastatic"} for s in study_ids])
        for backbone, threshold in THRESHOLDS.items():
            config = {"backbone": backbone, "mode": "full", "weights": "none", "image_size": [64, 32],
                      "view_mode": "per_image", "split_id": split_id}
            run_id = db["runs"].insert({
                "backbone": backbone, "status": "done", "config": json.dumps(config), "config_hash": f"test-{backbone}",
                "split_id": split_id, "created_at": dbm.utc_now(), "finished_at": dbm.utc_now(), "threshold": threshold,
            }).last_pk
            db["epochs"].insert_all([{"run_id": run_id, "epoch": e, "phase": "full", "loss": 0.7 / e, "val_loss": 0.8 / e,
                                      "metrics": json.dumps({"auc": 0.5 + 0.1 * e, "val_auc": 0.5 + 0.05 * e})}
                                     for e in (1, 2, 3)])
            rows = []
            for image_id, study_id, patient_id, view, height, width in images:
                # Labelled images lean high, others low, with overlap; 3 decimals keep them off the thresholds.
                p = float(np.clip(np.round(rng.normal(0.62 if label[study_id] else 0.38, 0.2), 3), 0.001, 0.999))
                rows.append((image_id, study_id, patient_id, view, subset[study_id], label[study_id], p))
                db["explanations"].insert({"run_id": run_id, "image_id": image_id, "heatmap": pixelstore.encode_pixels(
                    np.linspace(0, 1, height * width, dtype=np.float16).reshape(height, width))})
            db["predictions"].insert_all([{"run_id": run_id, "image_id": r[0], "subset": r[4], "label": r[5],
                                           "probability": r[6]} for r in rows])
            runs[backbone] = {"id": run_id, "threshold": threshold, "rows": rows}
    return runs


def counts(rows, threshold: float, subsets=("test",)) -> dict[str, int]:
    """tp, fp, tn, fn of the rows of ``subsets`` at ``threshold`` (metastatic when p >= threshold)."""
    picked = [(r[5], r[6] >= threshold) for r in rows if r[4] in subsets]
    return {"tp": sum(y and p for y, p in picked), "fp": sum((not y) and p for y, p in picked),
            "tn": sum((not y) and (not p) for y, p in picked), "fn": sum(y and (not p) for y, p in picked)}


def expected_cards(rows, threshold: float) -> dict[str, str]:
    """The page's metric cards, as it formats them, computed from the inserted test rows."""
    c = counts(rows, threshold)
    n = sum(c.values())
    recall, precision = c["tp"] / (c["tp"] + c["fn"]), c["tp"] / (c["tp"] + c["fp"])
    test = [r for r in rows if r[4] == "test"]
    values = {
        "Accuracy": (c["tp"] + c["tn"]) / n,
        "Recall (sensitivity)": recall,
        "Precision (PPV)": precision,
        "F1": 2 * precision * recall / (precision + recall),
        "Specificity": c["tn"] / (c["tn"] + c["fp"]),
        "ROC AUC": roc_auc_score([r[5] for r in test], [r[6] for r in test]),
    }
    return {name: f"{value:.3f}" for name, value in values.items()}


@pytest.fixture
def two_runs(db_path):
    with dbm.opened(db_path) as db:
        return insert_runs(db)


def open_evaluate(db_path) -> AppTest:
    app = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=120)
    app.query_params["reviewer"] = "ann"
    app.run()
    app.switch_page("app_pages/evaluate.py").run()
    assert not app.exception, [e.value for e in app.exception]
    return app


def cards(app: AppTest, unit: str = "per image") -> dict[str, str]:
    """The metric cards of the shown unit, by metric name (each card's label ends with its unit)."""
    suffix = f" ({unit})"
    return {metric.label.removesuffix(suffix): metric.value for metric in app.metric if metric.label.endswith(suffix)}


def study_rows(rows) -> list[tuple]:
    """One row per study, as (image_id, study_id, patient_id, view, subset, label, max probability over its views)."""
    best: dict[int, tuple] = {}
    for r in rows:
        if r[1] not in best or r[6] > best[r[1]][6]:
            best[r[1]] = r
    return list(best.values())


def confusion_shown(app: AppTest) -> dict[str, int]:
    """The counts printed in the page's confusion-matrix heatmap (rows truth, columns prediction)."""
    specs = [json.loads(chart.proto.spec) for chart in app.get("plotly_chart")]
    heatmaps = [spec["data"][0] for spec in specs if spec["data"] and spec["data"][0]["type"] == "heatmap"]
    assert len(heatmaps) == 1
    (tp, fn), (fp, tn) = [[int(re.search(r"<b>(\d+)</b>", cell).group(1)) for cell in row] for row in heatmaps[0]["text"]]
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn}


def explorer_table(app: AppTest):
    (table,) = [frame.value for frame in app.dataframe if "outcome" in frame.value.columns]
    return table


def test_evaluate_page_shows_the_runs_numbers(db_path, two_runs):
    newest = two_runs["densenet121"]  # runs are listed newest first: the page opens on this one
    rows, threshold = newest["rows"], newest["threshold"]
    app = open_evaluate(db_path)
    assert app.selectbox(key="ev_run").value == newest["id"]

    test = [r for r in rows if r[4] == "test"]
    patients = len({r[2] for r in test})
    assert any(c.value.startswith(f"Test subset: {len(test)} images, {TEST_STUDIES} studies, {patients} patients. "
                                  "Metrics per study.") for c in app.caption)

    # The study is the unit by default: cards, matrix and curves per study, at the study threshold
    # (this run stores none: chosen now on its validation studies, which the page says).
    assert app.radio(key="ev_unit").value == "per study"
    study_threshold = app.slider(key=f"ev_threshold_{newest['id']}_study").value
    studies = study_rows(rows)
    shown = cards(app, "per study")
    assert set(shown) >= {"Accuracy", "ROC AUC"} and not cards(app, "per image")
    c = counts(studies, study_threshold)
    test_studies = [r for r in studies if r[4] == "test"]
    assert shown["Accuracy"] == f"{(c['tp'] + c['tn']) / sum(c.values()):.3f}" and sum(c.values()) == TEST_STUDIES
    assert shown["ROC AUC"] == f"{roc_auc_score([r[5] for r in test_studies], [r[6] for r in test_studies]):.3f}"
    assert confusion_shown(app) == c
    assert any("chosen now by rule youden" in c.value for c in app.caption)
    titles = [json.loads(chart.proto.spec)["layout"]["title"]["text"] for chart in app.get("plotly_chart")]
    assert any("per study" in t for t in titles if t.startswith("ROC")) and not app.warning

    # The paper's image-level figures, one click away.
    app.radio(key="ev_unit").set_value("per image (as in the paper)").run()
    assert not app.exception
    shown = cards(app)
    assert {name: shown[name] for name in expected_cards(rows, threshold)} == expected_cards(rows, threshold)
    assert confusion_shown(app) == counts(rows, threshold)

    # The threshold slider moves the cards and the matrix, and marks them exploratory.
    app.slider(key=f"ev_threshold_{newest['id']}_image").set_value(0.7).run()
    assert not app.exception
    shown = cards(app)
    assert {name: shown[name] for name in ("Accuracy", "Recall (sensitivity)")} == \
        {name: expected_cards(rows, 0.7)[name] for name in ("Accuracy", "Recall (sensitivity)")}
    assert confusion_shown(app) == counts(rows, 0.7)
    assert any("exploratory (threshold not chosen on validation)" in w.value for w in app.warning)


def labels_and_scores(rows, subset: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels, max probability over the views) of the run's studies of ``subset``, by study id."""
    studies = sorted({r[1] for r in rows if r[4] == subset})
    label = np.array([next(r[5] for r in rows if r[1] == s) for s in studies])
    top = np.array([max(r[6] for r in rows if r[1] == s) for s in studies])
    return label, top


def youden(label: np.ndarray, score: np.ndarray) -> float:
    """Youden's threshold by scikit-learn's ROC (0.5 when nothing beats chance, as documented)."""
    fpr, tpr, thresholds = roc_curve(label, score)
    best = int(np.argmax(tpr - fpr))
    return float(thresholds[best]) if tpr[best] - fpr[best] > 0 else 0.5


def test_evaluate_page_compares_the_runs_of_one_split_per_study(db_path, two_runs):
    app = open_evaluate(db_path)
    assert any(m.value.startswith(f"**Per study, paired by patient**: {TEST_STUDIES} test studies") for m in app.markdown)
    (table,) = [frame.value for frame in app.dataframe if "study threshold" in frame.value.columns]
    assert len(table) == 2
    auc = {}
    for backbone, run in two_runs.items():
        # No study threshold stored: each run's is chosen on its validation studies (Youden).
        threshold = youden(*labels_and_scores(run["rows"], "val"))
        label, top = labels_and_scores(run["rows"], "test")
        auc[backbone] = roc_auc_score(label, top)
        row = table[table["run"] == f"{'DenseNet121' if backbone == 'densenet121' else 'ResNet50'} (run {run['id']})"]
        assert row["study threshold"].item() == pytest.approx(threshold, abs=1e-4), backbone
        assert row["threshold from"].item() == "validation"
        assert row["Recall (sensitivity)"].item() == pytest.approx(np.mean(top[label == 1] >= threshold), abs=1e-4)
        assert row["Specificity"].item() == pytest.approx(np.mean(top[label == 0] < threshold), abs=1e-4)
        assert row["ROC AUC"].item() == pytest.approx(auc[backbone], abs=1e-4)
    (pairs,) = [frame.value for frame in app.dataframe if "Holm p" in frame.value.columns]
    assert pairs["quantity"].tolist() == ["ΔAUC", "Δsensitivity", "Δspecificity", "McNemar"]
    newest, oldest = two_runs["densenet121"]["id"], two_runs["resnet50"]["id"]
    assert set(pairs["pair"]) == {f"DenseNet121 (run {newest}) − ResNet50 (run {oldest})"}  # newest first, as listed
    assert float(pairs["difference"].iloc[0]) == pytest.approx(auc["densenet121"] - auc["resnet50"], abs=1e-3)
    assert all(p.startswith("p ") for p in pairs["p"]) and all(p.startswith("p ") for p in pairs["Holm p"])


def test_evaluate_page_shows_every_repeat_and_their_mean_and_sd(db_path, two_runs):
    """Two finished runs of one repeat group: the Metrics tab lists both and their mean ± SD of
    the study-level AUC (computed here from the inserted rows)."""
    from bonescan_core import runs

    with dbm.opened(db_path) as db:
        group = runs.set_repeat_group(db, [run["id"] for run in two_runs.values()])
    app = open_evaluate(db_path)
    assert any(m.value.startswith("**Repeats of ResNet50") and f"group {group}, 2 finished runs" in m.value for m in app.markdown)
    metrics_tab, compare_tab = [frame.value for frame in app.dataframe if "seed" in frame.value.columns]
    assert metrics_tab.equals(compare_tab)  # the compare tab shows the group of its runs too
    table = metrics_tab
    aucs = [roc_auc_score(*labels_and_scores(two_runs[b]["rows"], "test")) for b in ("resnet50", "densenet121")]
    assert table["run"].tolist() == [str(two_runs["resnet50"]["id"]), str(two_runs["densenet121"]["id"]), "mean ± SD"]
    assert table["AUC"].tolist()[:2] == [f"{a:.3f}" for a in aucs]
    assert table["AUC"].iloc[2] == f"{np.mean(aucs):.3f} ± {np.std(aucs, ddof=1):.3f}"


def test_evaluate_page_explorer_lists_filters_and_shows_the_top_loss(db_path, two_runs):
    run = two_runs["densenet121"]
    rows, threshold = run["rows"], run["threshold"]
    app = open_evaluate(db_path)
    table = explorer_table(app)
    assert len(table) == len(rows)  # every val and test prediction
    outcomes = table["outcome"].value_counts().to_dict()
    expected = {k.upper(): v for k, v in counts(rows, threshold, ("val", "test")).items() if v}
    assert outcomes == expected

    # Top losses first: the first row is the image whose label the run got most wrong.
    def loss(r):
        p = min(max(r[6], 1e-7), 1 - 1e-7)
        return -np.log(p if r[5] else 1 - p)

    worst = max(rows, key=loss)
    assert int(table.iloc[0]["image_id"]) == worst[0]
    outcome = "TP" if worst[5] and worst[6] >= threshold else "FN" if worst[5] else "FP" if worst[6] >= threshold else "TN"
    assert any(h.value == f"Study {worst[1]} · image {worst[0]} ({worst[3]}) · {outcome}" for h in app.subheader)
    assert not app.error, [e.value for e in app.error]  # the stored Grad-CAM maps were shown, no model needed
    (image,) = app.get("image")  # the study's views side by side, each over its stored map
    study_images = sorted(r[0] for r in rows if r[1] == worst[1])
    assert [int(i) for i in re.findall(r"\(image (\d+)\)", image.captions[0])] == study_images

    app.multiselect(key="ex_outcome").set_value(["FP"]).run()
    assert not app.exception
    filtered = explorer_table(app)
    assert set(filtered["outcome"]) <= {"FP"} and len(filtered) == expected.get("FP", 0)


def test_report_is_self_contained_with_the_runs_numbers(db, two_runs):
    run = two_runs["resnet50"]
    html = report.report_html(db, run["id"])
    assert html.count("window.PlotlyConfig") == 1, "plotly.js inlined once"
    assert re.findall(r"<script[^>]*\bsrc=", html) == []  # nothing fetched: opens with no network
    # confusion, ROC, PR, calibration, training curves; reliability before/after and decision curve; subgroups
    assert html.count('class="plotly-graph-div"') == 8
    assert "<h2>Calibration (test studies)</h2><p>Fitted on validation: none. Test studies (n = 6)" in html
    assert "<h2 id=\"report-reproducibility\">Reproducibility</h2><p>Not recorded" in html  # these runs were stored without it
    c = counts(run["rows"], run["threshold"])
    accuracy = (c["tp"] + c["tn"]) / sum(c.values())
    assert f"<tr><td>Accuracy</td><td>{accuracy:.3f}</td>" in html  # the image table, "as in the paper"
    assert f"Test subset: {sum(c.values())} images, {TEST_STUDIES} studies," in html
    assert html.index("<h2>Per study") < html.index("<h2>Per image (as in the paper")
    assert "<th>metric (per study)</th>" in html and "<th>metric (per image)</th>" in html and "ROC curve (per study)" in html
