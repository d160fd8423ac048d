"""bonescan_core.comparison: runs compared per study, paired by patient (issue 11, point 2), and
repeat groups (point 5). Runs are inserted directly (no training); every number is checked
against scikit-learn, statsmodels, a brute-force clustered bootstrap or studystats itself."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest
from conftest import run_cli
from sklearn import metrics as skm
from statsmodels.stats.multitest import multipletests

from bonescan_core import comparison, errors, jobs, runs
from bonescan_core import db as dbm
from bonescan_core import evaluation as ev
from bonescan_core import studystats as ss
from bonescan_core.ingest import add_demo_studies

PAIR_KEYS = {"a", "b", "label_a", "label_b", "delta_auc", "delta_sensitivity", "delta_specificity", "mcnemar"}


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def synthetic(seed: int, n_patients: int = 40, separations=(1.5, 0.8, 1.1)) -> dict:
    """Studies nested in patients (1-3 each), a subset per patient (val or test), a label per
    study, and one probability per study for each of len(separations) runs, correlated within
    a patient (a shared patient effect) and across runs (a shared study effect)."""
    rng = np.random.default_rng(seed)
    per_patient = rng.integers(1, 4, n_patients)
    patient = np.repeat(np.arange(n_patients), per_patient)
    subset = np.where((np.arange(n_patients) % 4 == 0)[patient], "val", "test")
    label = (rng.random(patient.size) < 0.4).astype(int)
    patient_effect, study_effect = rng.normal(size=n_patients)[patient], rng.normal(size=patient.size)
    scores = [np.round(sigmoid(patient_effect + 0.6 * study_effect + 0.5 * rng.normal(size=patient.size)
                               + s * (2 * label - 1)), 4) for s in separations]
    return {"patient": patient, "subset": subset, "label": label, "scores": scores}


def insert(db, data: dict, views_per_study: int = 1, backbones=None, study_thresholds=None,
           image_thresholds=None, split_id=None) -> tuple[list[int], list[int]]:
    """Patients, studies, ``views_per_study`` images per study (each carrying the study's
    probability: a composite-like run writes one study output once per image), a split and one
    done run per score vector. Returns (run ids, study ids in insertion order)."""
    n_runs = len(data["scores"])
    backbones = backbones or ["densenet121", "vgg19", "resnet50"][:n_runs]
    study_thresholds = study_thresholds or [None] * n_runs
    image_thresholds = image_thresholds or [0.5] * n_runs
    now = dbm.utc_now()
    with dbm.write(db):
        if split_id is None:
            split_id = db["splits"].insert({"seed": 0, "test_fraction": 0.3, "val_fraction": 0.15, "labels_hash": "h",
                                            "created_at": now}).last_pk
        patients = {}
        for p in sorted(set(data["patient"].tolist())):
            patients[p] = db["patients"].insert({"key": f"p-{split_id}-{p}", "created_at": now}).last_pk
        studies, images = [], []
        for i, p in enumerate(data["patient"].tolist()):
            study = db["studies"].insert({"patient_id": patients[p], "key": f"s-{split_id}-{i}", "origin": "import",
                                          "created_at": now}).last_pk
            studies.append(study)
            images.append([db["images"].insert({
                "study_id": study, "view": view, "source": "x", "format": "png", "height": 1, "width": 1,
                "dtype": "uint16", "pixels": b"", "pixel_sha256": f"{split_id}-{study}-{view}", "thumbnail": b"",
                "display_max": 1.0, "created_at": now}).last_pk for view in ("anterior", "posterior")[:views_per_study]])
        run_ids = []
        for backbone, scores, study_t, image_t in zip(backbones, data["scores"], study_thresholds, image_thresholds,
                                                      strict=True):
            facts = {"split_id": split_id, **({"thresholds": {"image": image_t, "study": study_t, "rule": "youden",
                                                              "target": None}} if study_t is not None else {})}
            run = db["runs"].insert({"backbone": backbone, "status": "done", "config": json.dumps({"backbone": backbone}),
                                     "config_hash": f"{backbone}-{split_id}-{len(run_ids)}", "split_id": split_id,
                                     "created_at": now, "threshold": image_t, "results": json.dumps(facts)}).last_pk
            run_ids.append(run)
            db["predictions"].insert_all([
                {"run_id": run, "image_id": image, "subset": data["subset"][i], "label": int(data["label"][i]),
                 "probability": float(scores[i])}
                for i in range(len(studies)) for image in images[i]])
    return run_ids, studies


def test_compare_json_is_the_contract_and_every_number_matches_its_reference(db):
    data = synthetic(1)
    run_ids = insert(db, data, study_thresholds=[0.45, 0.55, 0.5])[0]
    result = comparison.compare_runs(db, run_ids, n_resamples=2000, seed=3)
    json.dumps(result, allow_nan=False)  # JSON-ready: no NaN anywhere
    assert {"unit", "n_studies", "n_patients", "pairs"} <= set(result) and result["unit"] == "study"
    test = data["subset"] == "test"
    y, patient = data["label"][test], data["patient"][test]
    assert result["n_studies"] == test.sum() and result["n_patients"] == np.unique(patient).size
    assert [(p["a"], p["b"]) for p in result["pairs"]] == [(run_ids[0], run_ids[1]), (run_ids[0], run_ids[2]),
                                                           (run_ids[1], run_ids[2])]
    assert "repeats" not in result  # no run belongs to a repeat group
    thresholds = dict(zip(run_ids, (0.45, 0.55, 0.5), strict=True))
    assert [(r["threshold"], r["threshold_source"]) for r in result["runs"]] == [(0.45, "stored"), (0.55, "stored"), (0.5, "stored")]
    scores = {run: s[test] for run, s in zip(run_ids, data["scores"], strict=True)}
    every_p = []
    for pair in result["pairs"]:
        assert set(pair) == PAIR_KEYS
        assert set(pair["delta_auc"]) == {"value", "ci95", "p", "p_holm", "bootstrap"}
        assert set(pair["delta_sensitivity"]) == set(pair["delta_specificity"]) == {"value", "ci95", "p", "p_holm"}
        assert {"b", "c", "p", "p_holm"} <= set(pair["mcnemar"])
        a, b = scores[pair["a"]], scores[pair["b"]]
        ta, tb = thresholds[pair["a"]], thresholds[pair["b"]]
        assert pair["delta_auc"]["value"] == pytest.approx(skm.roc_auc_score(y, a) - skm.roc_auc_score(y, b), abs=1e-4)
        sens = skm.recall_score(y, a >= ta) - skm.recall_score(y, b >= tb)
        spec = skm.recall_score(y, a >= ta, pos_label=0) - skm.recall_score(y, b >= tb, pos_label=0)
        assert pair["delta_sensitivity"]["value"] == pytest.approx(sens, abs=1e-4)
        assert pair["delta_specificity"]["value"] == pytest.approx(spec, abs=1e-4)
        # The reported dAUC test is the clustered DeLong (Obuchowski), patients as clusters.
        delong = ss.clustered_delong(y, a, b, patient)
        assert pair["delta_auc"]["p"] == pytest.approx(delong["p"], rel=1e-3)
        assert pair["delta_auc"]["ci95"] == pytest.approx(list(delong["ci95"]), abs=1e-4)
        boot = ss.paired_bootstrap(y, a, b, patient, ta, tb, n_resamples=2000, seed=3)
        assert pair["delta_auc"]["bootstrap"]["ci95"] == pytest.approx(list(boot["delta_auc"]["ci95"]), abs=1e-4)
        assert pair["delta_sensitivity"]["ci95"] == pytest.approx(list(boot["delta_sensitivity"]["ci95"]), abs=1e-4)
        correct_a, correct_b = (a >= ta) == y, (b >= tb) == y
        assert (pair["mcnemar"]["b"], pair["mcnemar"]["c"]) == (int(np.sum(correct_a & ~correct_b)), int(np.sum(~correct_a & correct_b)))
        every_p += [delong["p"], boot["delta_sensitivity"]["p"], boot["delta_specificity"]["p"],
                    ss.mcnemar_studies(y, a, b, ta, tb)["p"]]
    # Holm over all 12 p shown together (3 pairs x 4 tests), against statsmodels.
    expected = multipletests(every_p, method="holm")[1]
    shown = [pair[k]["p_holm"] for pair in result["pairs"] for k in ("delta_auc", "delta_sensitivity", "delta_specificity", "mcnemar")]
    np.testing.assert_allclose(shown, expected, rtol=1e-3)
    assert all(h >= p["p"] for pair in result["pairs"] for p in (pair["delta_auc"], pair["mcnemar"]) for h in [p["p_holm"]])


def pair_auc(y, score) -> float:
    """AUC as the share of (positive, negative) pairs the score orders right, ties one half."""
    difference = score[y == 1][:, None] - score[y == 0][None, :]
    return float(np.mean((difference > 0) + 0.5 * (difference == 0)))


def test_compare_matches_a_brute_force_clustered_bootstrap(db):
    """Each resample rebuilt as an explicit list of studies (every study of a drawn patient, as
    often as drawn, the same draws for both runs) and scored from scratch."""
    data = synthetic(2, n_patients=16, separations=(1.4, 0.6))
    run_ids = insert(db, data, study_thresholds=[0.5, 0.4])[0]
    result = comparison.compare_runs(db, run_ids, n_resamples=2000, seed=5)
    test = data["subset"] == "test"
    y, patient = data["label"][test], data["patient"][test]
    a, b = data["scores"][0][test], data["scores"][1][test]
    rng = np.random.default_rng(5)  # evaluation.bootstrap_weights draws patients like this
    unique = np.unique(patient)
    deltas = {"auc": [], "sensitivity": [], "specificity": []}
    for _ in range(2000):
        drawn = unique[rng.integers(0, unique.size, unique.size)]
        rows = np.concatenate([np.flatnonzero(patient == p) for p in drawn])
        yr, ar, br = y[rows], a[rows], b[rows]
        if yr.min() == yr.max():
            continue
        deltas["auc"].append(pair_auc(yr, ar) - pair_auc(yr, br))
        deltas["sensitivity"].append(np.mean(ar[yr == 1] >= 0.5) - np.mean(br[yr == 1] >= 0.4))
        deltas["specificity"].append(np.mean(ar[yr == 0] < 0.5) - np.mean(br[yr == 0] < 0.4))
    (pair,) = result["pairs"]
    for name, key in (("auc", "bootstrap"), ("sensitivity", None), ("specificity", None)):
        values = np.array(deltas[name])
        part = pair["delta_auc"]["bootstrap"] if key else pair[f"delta_{name}"]
        p = min(1.0, 2 * min((1 + np.sum(values <= 0)), (1 + np.sum(values >= 0))) / (values.size + 1))
        assert part["ci95"] == pytest.approx(list(np.quantile(values, [0.025, 0.975])), abs=1e-4), name
        assert part["p"] == pytest.approx(p, rel=1e-3), name


def test_writing_every_study_twice_changes_neither_n_nor_any_p(tmp_path):
    """A composite-like run stores each study's one output once per image: two image rows per
    study. The comparison is per study, so n, every value, interval and p are unchanged."""
    data = synthetic(3)
    results, n_images = [], []
    for views in (1, 2):
        with dbm.opened(tmp_path / f"views{views}.db") as db:
            run_ids = insert(db, data, views_per_study=views)[0]
            n_images.append(runs.predictions(db, run_ids[0], "test")["image_id"].size)
            results.append(comparison.compare_runs(db, run_ids))
    assert n_images[1] == 2 * n_images[0]  # the rows really are written twice
    once, twice = results
    assert twice == once
    assert once["n_studies"] == n_images[0]
    assert [r["threshold_source"] for r in once["runs"]] == ["validation"] * 3


def test_study_threshold_is_stored_else_chosen_on_validation_studies_else_the_image_threshold(db):
    data = synthetic(4, separations=(1.5, 1.0))
    stored, chosen = (runs.get(db, r) for r in insert(db, data, study_thresholds=[0.42, None], image_thresholds=[0.3, 0.6])[0])
    assert comparison.study_threshold(db, stored) == (0.42, "stored")
    val = data["subset"] == "val"
    expected = ss.choose_threshold(data["label"][val], data["scores"][1][val], "youden").value
    assert comparison.study_threshold(db, chosen) == (pytest.approx(expected), "validation")
    # Validation studies of one class only: the run's image-level threshold.
    with dbm.write(db):
        db.execute("UPDATE predictions SET label = 0 WHERE run_id = ? AND subset = 'val'", [chosen.id])
    assert comparison.study_threshold(db, chosen) == (0.6, "image")


def test_compare_refuses_what_it_cannot_compare(db):
    first = insert(db, synthetic(5, separations=(1.0, 0.5)))[0]
    other_split = insert(db, synthetic(5, separations=(1.0,)), backbones=["vgg19"])[0]
    with pytest.raises(comparison.IncomparableRunsError, match="different splits"):
        comparison.compare_runs(db, [first[0], other_split[0]])
    with pytest.raises(errors.InputError, match="at least two different runs"):
        comparison.compare_runs(db, [first[0], first[0]])
    with pytest.raises(errors.InputError, match="at least 2000"):
        comparison.compare_runs(db, first, n_resamples=500)
    with pytest.raises(errors.RunNotFound):
        comparison.compare_runs(db, [first[0], 999])
    with dbm.write(db):
        image = db.execute("SELECT image_id FROM predictions WHERE run_id = ? AND subset = 'test' LIMIT 1", [first[1]]).fetchone()[0]
        db.execute("DELETE FROM predictions WHERE run_id = ? AND image_id = ?", [first[1], image])
    with pytest.raises(comparison.IncomparableRunsError, match="different test studies"):
        comparison.compare_runs(db, first)


def test_compare_verb_json_text_and_exit_codes(db_path):
    with dbm.opened(db_path) as db:
        run_ids = insert(db, synthetic(6, separations=(1.5, 0.7)))[0]
        other = insert(db, synthetic(6, separations=(1.0,)), backbones=["resnet50"])[0]
    ids = [str(r) for r in run_ids]
    as_json = run_cli("compare", *ids, "--json", "--resamples", "2000", "--seed", "1", db_path=db_path)
    assert as_json.returncode == 0, as_json.stderr
    result = json.loads(as_json.stdout)
    assert result["unit"] == "study" and len(result["pairs"]) == 1 and result["bootstrap"]["seed"] == 1
    with dbm.opened(db_path) as db:
        assert result == json.loads(json.dumps(comparison.compare_runs(db, run_ids, seed=1)))
    text = run_cli("compare", *ids, db_path=db_path)
    assert text.returncode == 0 and text.stdout.startswith("Per study, paired by patient:")
    assert "ΔAUC" in text.stdout and "Holm" in text.stdout and "McNemar" in text.stdout
    for bad in ([ids[0]], [ids[0], str(other[0])], [*ids, "--resamples", "100"], [ids[0], "999"]):
        refused = run_cli("compare", *bad, db_path=db_path)
        assert refused.returncode == 2 and refused.stderr.startswith("bonescan compare: "), bad


# --- repeats ---------------------------------------------------------------------------------------

def test_repeats_are_queued_as_one_group_per_backbone_with_consecutive_seeds(db):
    add_demo_studies(db, 16, seed=4)
    config = runs.TrainConfig(backbone="resnet50", weights="none", mode="full", epochs=1, seed=7)
    queued = jobs.enqueue_backbones(db, ["resnet50", "vgg19"], config, repeats=3)
    assert [(q.backbone, q.seed) for q in queued] == [(b, s) for s in (7, 8, 9) for b in ("resnet50", "vgg19")]
    for backbone in ("resnet50", "vgg19"):
        ids = [q.run_id for q in queued if q.backbone == backbone]
        group = runs.repeat_group_runs(db, ids[0])
        assert [r.id for r in group] == ids and {r.repeat_group for r in group} == {ids[0]}
        assert [r.settings.seed for r in group] == [7, 8, 9]
    assert len({runs.get(db, q.run_id).split_id for q in queued}) == 1  # only the seed varies
    assert "repeat group" in queued[1].message and runs.get(db, queued[0].run_id).to_json()["repeat_group"] == queued[0].run_id

    resplit = jobs.enqueue_backbones(db, ["densenet121"], config, repeats=3, resplit=True)
    split_ids = [runs.get(db, q.run_id).split_id for q in resplit]
    assert len(set(split_ids)) == 3  # one patient-grouped split per repeat
    assert runs.get(db, queued[2].run_id).split_id == split_ids[0]  # seed 7's split, shared
    single = jobs.enqueue_backbones(db, ["densenet121"], runs.TrainConfig(backbone="densenet121", weights="none", seed=30))
    assert runs.get(db, single[0].run_id).repeat_group is None and single[0].repeat_group is None
    with pytest.raises(errors.InputError, match="drop the fixed split"):
        jobs.enqueue_backbones(db, ["vgg19"], config, split_id=split_ids[0], repeats=2, resplit=True)
    with pytest.raises(errors.InputError, match="at least 1"):
        jobs.enqueue_backbones(db, ["vgg19"], config, repeats=0)


def test_repeat_summary_and_compare_show_mean_and_sd_of_finished_repeats(db):
    data = synthetic(7, separations=(1.5, 1.2, 0.6))
    run_ids = insert(db, data, backbones=["densenet121", "densenet121", "vgg19"], study_thresholds=[0.5, 0.45, 0.5])[0]
    solo = comparison.compare_runs(db, [run_ids[0], run_ids[2]])
    assert "repeats" not in solo
    group = runs.set_repeat_group(db, run_ids[:2])
    assert group == run_ids[0]
    summary = comparison.repeat_summary(db, group)
    test = data["subset"] == "test"
    y = data["label"][test]
    aucs = [skm.roc_auc_score(y, data["scores"][i][test]) for i in (0, 1)]
    sens = [skm.recall_score(y, data["scores"][i][test] >= t) for i, t in ((0, 0.5), (1, 0.45))]
    assert (summary["group"], summary["backbone"], summary["n"], summary["runs"]) == (group, "densenet121", 2, run_ids[:2])
    assert summary["auc"]["values"] == pytest.approx(aucs, abs=1e-4)
    assert summary["auc"]["mean"] == pytest.approx(statistics.fmean(aucs), abs=1e-4)
    assert summary["auc"]["sd"] == pytest.approx(statistics.stdev(aucs), abs=1e-4)
    assert summary["sensitivity"]["values"] == pytest.approx(sens, abs=1e-4)
    result = comparison.compare_runs(db, [run_ids[0], run_ids[2]])
    assert result["repeats"] == [summary]
    assert comparison.repeat_table(summary)[-1]["run"] == "mean ± SD"
    # A repeat that has not finished is not counted; one finished run is no spread.
    with dbm.write(db):
        db.execute("UPDATE runs SET status = 'failed' WHERE id = ?", [run_ids[1]])
    assert comparison.repeat_summary(db, group)["n"] == 1
    assert comparison.repeat_summary(db, group)["auc"]["sd"] is None
    assert "repeats" not in comparison.compare_runs(db, [run_ids[0], run_ids[2]])
    with pytest.raises(errors.NotFound, match="repeat group 999"):
        comparison.repeat_summary(db, 999)


def test_train_refuses_resplit_with_a_fixed_split_and_queues_repeats(db_path):
    run_cli("demo", "--studies", "12", "--seed", "4", db_path=db_path)
    options = ("--backbone", "resnet50", "--weights", "none", "--mode", "full", "--epochs", "1", "--queue")
    queued = run_cli("train", *options, "--repeats", "2", "--seed", "3", db_path=db_path)
    assert queued.returncode == 0, queued.stderr
    ids = [int(line) for line in queued.stdout.split()]
    listed = {r["id"]: r for r in json.loads(run_cli("runs", "--json", db_path=db_path).stdout)}
    assert [(listed[i]["config"]["seed"], listed[i]["repeat_group"]) for i in ids] == [(3, ids[0]), (4, ids[0])]
    refused = run_cli("train", *options, "--repeats", "2", "--resplit", "--split", str(listed[ids[0]]["split_id"]),
                      db_path=db_path)
    assert refused.returncode == 2 and "drop the fixed split" in refused.stderr
    assert run_cli("train", *options, "--repeats", "0", db_path=db_path).returncode == 2


def test_nan_free_rounding_keeps_small_p_values():
    assert comparison._round_p(3.2e-7) == 3.2e-7 and comparison._round_p(math.nan) is None
    assert comparison._round(0.123456) == 0.1235 and comparison._round(math.nan) is None


def test_image_level_compare_is_gone():
    """One way to compare: evaluation no longer pairs runs on images."""
    assert not hasattr(ev, "compare_runs")
