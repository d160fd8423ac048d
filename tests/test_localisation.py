"""Grad-CAM localisation, measured (issue 12.6): lesion points, map peaks, the pointing game in
``evaluate``, the shared display scale, ``explain --json`` and a model-randomisation check."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from PIL import Image
from test_explain import resnet_like, save_run

from bonescan_core import cli, evaluation, explain, gradcam, ingest, lesions, localisation, pixelstore, plots, runs
from bonescan_core import db as dbm
from bonescan_core.heavy import keras_module
from bonescan_core.preprocess import content_box, prepare_image, to_image_geometry, to_model_input

keras = keras_module()


# --- helpers -----------------------------------------------------------------------------------------

def bump(shape: tuple[int, int], row: float, col: float, sigma: float = 6.0, height: float = 1.0) -> np.ndarray:
    """(H, W) float32 Gaussian bump of ``height`` at (row, col): a hand-made map with a known peak."""
    rows = np.arange(shape[0], dtype=np.float32)[:, None]
    cols = np.arange(shape[1], dtype=np.float32)[None, :]
    return (height * np.exp(-0.5 * ((rows - row) ** 2 + (cols - col) ** 2) / sigma**2)).astype(np.float32)


def add_study(db, name: str, shape: tuple[int, int] = (512, 128)) -> tuple[int, dict[str, int]]:
    """A study of one patient with an anterior and a posterior image of ``shape`` (distinct noise): (study id, {view: image id})."""
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    with dbm.write(db):
        patient = db["patients"].insert({"key": f"p-{name}", "created_at": dbm.utc_now()}).last_pk
        study = db["studies"].insert({"patient_id": patient, "key": f"s-{name}", "origin": "import",
                                      "created_at": dbm.utc_now()}).last_pk
        images = {view: ingest.insert_image(db, study, rng.integers(0, 100, shape, dtype=np.uint16), view, f"{name}-{view}", "png")
                  for view in ("anterior", "posterior")}
    return study, images


def add_run(db, threshold: float = 0.5) -> int:
    with dbm.write(db):
        return db["runs"].insert({"backbone": "resnet50", "status": "done", "config": json.dumps({"backbone": "resnet50"}),
                                  "config_hash": f"loc-{threshold}", "created_at": dbm.utc_now(), "threshold": threshold,
                                  "results": "{}"}).last_pk


def predict(db, run_id: int, images: dict[str, int], label: int, probabilities: tuple[float, float]) -> None:
    with dbm.write(db):
        for view, probability in zip(("anterior", "posterior"), probabilities, strict=True):
            db["predictions"].insert({"run_id": run_id, "image_id": images[view], "subset": "test", "label": label,
                                      "probability": probability})


def add_points(db, image_id: int, points: list[tuple[float, float]]) -> None:
    with dbm.write(db):
        lesions.store_points(db, image_id, points, "manifest")


# --- peaks and the tolerance --------------------------------------------------------------------------

def test_peak_of_a_hand_made_map_is_its_known_maximum():
    assert localisation.peak_of(bump((512, 128), 300.0, 41.0)) == (300, 41)
    plateau = np.zeros((40, 20), np.float32)
    plateau[10:13, 4:9] = 1.0  # a float16 plateau: the centre of the tied pixels, not the first one
    assert localisation.peak_of(plateau) == (11, 6)
    assert localisation.peak_of(np.zeros((8, 4), np.float32)) is None  # no positive evidence, no peak


@pytest.mark.parametrize(("shape", "offset", "hit"), [
    ((1024, 256), (15, 0), True), ((1024, 256), (16, 0), False),
    ((512, 128), (7, 0), True), ((512, 128), (8, 0), False),  # half the matrix: half the pixels
    ((896, 224), (13, 0), True), ((896, 224), (14, 0), False),  # the other scanner's 896 x 224: 13.1 px
    ((1024, 128), (0, 7), True), ((1024, 128), (0, 8), False),  # per axis: half as many columns
    ((1024, 128), (14, 0), True), ((1024, 128), (9, 6), True), ((1024, 128), (10, 6), False),
])
def test_tolerance_is_15_px_at_1024x256_scaled_to_the_stored_image(shape, offset, hit):
    lesion = np.array([[300.0, 60.0]])
    peak = (300 + offset[0], 60 + offset[1])
    assert localisation.is_hit(peak, lesion, shape) is hit
    assert localisation.is_hit(None, lesion, shape) is False


# --- the pointing game in evaluate ---------------------------------------------------------------------

@pytest.fixture
def scored_run(db):
    """A run with six test studies whose maps, probabilities and lesion points are known.

    A: TP, lesion on the anterior view; anterior map peaks 4 rows, 2 cols off (8.9 px at 1024x256): hit.
    B: TP through its posterior view (p 0.8); the posterior map peaks 20 cols (40 px) off its
       lesion: miss, although the anterior map (p 0.2) peaks exactly on an anterior lesion.
    C: metastatic but called negative (p 0.2): not scored.   D: a false positive without lesions.
    E: TP with a lesion but no cached map: left out, counted.   F: TP without lesion points.
    """
    run_id = add_run(db, threshold=0.5)
    shape = (512, 128)
    studies = {name: add_study(db, name, shape) for name in "ABCDEF"}
    a, b, c, d, e, f = (studies[n][1] for n in "ABCDEF")
    predict(db, run_id, a, 1, (0.9, 0.3))
    predict(db, run_id, b, 1, (0.2, 0.8))
    predict(db, run_id, c, 1, (0.2, 0.2))
    predict(db, run_id, d, 0, (0.9, 0.9))
    predict(db, run_id, e, 1, (0.95, 0.4))
    predict(db, run_id, f, 1, (0.7, 0.7))
    add_points(db, a["anterior"], [(100.0, 40.0)])
    add_points(db, b["anterior"], [(200.0, 30.0)])
    add_points(db, b["posterior"], [(300.0, 60.0)])
    add_points(db, c["anterior"], [(250.0, 64.0)])
    add_points(db, e["anterior"], [(260.0, 64.0)])
    maps = {
        a["anterior"]: bump(shape, 104, 42), a["posterior"]: bump(shape, 400, 100),
        b["anterior"]: bump(shape, 200, 30), b["posterior"]: bump(shape, 300, 80),
        c["anterior"]: bump(shape, 250, 64), c["posterior"]: bump(shape, 250, 64),
        d["anterior"]: bump(shape, 50, 50), d["posterior"]: bump(shape, 50, 50),
        f["anterior"]: bump(shape, 10, 10), f["posterior"]: bump(shape, 10, 10),
    }
    runs.store_heatmaps(db, run_id, maps)
    return run_id, studies


def test_pointing_game_scores_true_positive_lesion_studies_at_their_shared_scale_peak(db, scored_run):
    run_id, studies = scored_run
    game = localisation.pointing_game(db, run_id, threshold=0.5)
    by_study = {s.study_id: s for s in game.studies}
    assert set(by_study) == {studies["A"][0], studies["B"][0]}
    a, b = by_study[studies["A"][0]], by_study[studies["B"][0]]
    assert (a.image_id, a.peak, a.hit) == (studies["A"][1]["anterior"], (104, 42), True)
    assert a.distance == pytest.approx(math.hypot(8, 4), abs=0.01)
    assert (b.image_id, b.peak, b.hit, b.distance) == (studies["B"][1]["posterior"], (300, 80), False, 40.0)
    assert (game.n, game.hits, game.n_lesion_studies, game.n_without_map) == (2, 1, 4, 1)


def test_pointing_game_reads_the_peaks_stored_with_the_maps(db, scored_run):
    """Maps stored with their peaks are scored from those three numbers (no map is read), with
    the same result as from the maps themselves; a planted stored peak is what counts."""
    run_id, studies = scored_run
    before = localisation.pointing_game(db, run_id, threshold=0.5)
    with dbm.write(db):
        for image_id, blob in db.execute("SELECT image_id, heatmap FROM explanations WHERE run_id = ?", [run_id]).fetchall():
            peak, value = localisation.map_peak(pixelstore.decode_pixels(blob))
            db.execute("UPDATE explanations SET peak_row = ?, peak_col = ?, peak_value = ? WHERE run_id = ? AND image_id = ?",
                       [peak[0], peak[1], value, run_id, image_id])
    assert localisation.pointing_game(db, run_id, threshold=0.5) == before
    with dbm.write(db):  # B's posterior map now claims its peak on B's posterior lesion
        db.execute("UPDATE explanations SET peak_row = 300, peak_col = 60 WHERE run_id = ? AND image_id = ?",
                   [run_id, studies["B"][1]["posterior"]])
    assert localisation.pointing_game(db, run_id, threshold=0.5).hits == 2


def test_evaluate_json_reports_localisation_with_a_wilson_interval(db, scored_run):
    run_id, _ = scored_run
    loc = evaluation.evaluate(db, run_id, n_resamples=50).as_json()["localisation"]
    # Wilson 95% for 1 of 2: centre (0.5 + z^2/4) / (1 + z^2/2), half-width z sqrt(1/8 + z^2/16) / (1 + z^2/2)
    z = 1.959963984540054
    centre, half = 0.5, z * math.sqrt(0.25 / 2 + z * z / 16) / (1 + z * z / 2)
    assert loc["hit_rate"] == 0.5 and (loc["n"], loc["hits"], loc["n_without_map"]) == (2, 1, 1)
    assert loc["ci95"] == pytest.approx([centre - half, centre + half], abs=1e-4)
    assert loc["tolerance_px"] == 15.0 and loc["reference_size"] == [1024, 256]
    assert "localisation 0.500 (95% CI 0.095 to 0.905)" in evaluation.evaluate(db, run_id, n_resamples=50).format_text()


def test_localisation_is_absent_without_lesion_points_and_unscored_without_true_positives(db, scored_run):
    run_id, _ = scored_run
    high = evaluation.evaluate(db, run_id, threshold=0.99, n_resamples=20).as_json()["localisation"]
    assert (high["hit_rate"], high["ci95"], high["n"]) == (None, [None, None], 0)  # lesions, but no true positive
    with dbm.write(db):
        db.execute("DELETE FROM lesions")
    assert "localisation" not in evaluation.evaluate(db, run_id, n_resamples=20).as_json()


def test_evaluate_cli_prints_the_localisation_object(db, db_path, scored_run, capsys):
    run_id, _ = scored_run
    assert cli.main(["--db", str(db_path), "evaluate", str(run_id), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["localisation"]["n"] == 2


# --- the shared scale -----------------------------------------------------------------------------------

def test_a_confident_negative_looks_cold_and_a_confident_positive_hot():
    heat = bump((64, 32), 30, 16)  # both stored maps are divided by their own maximum: identical
    negative, positive = localisation.shared_scale(heat, 0.02), localisation.shared_scale(heat, 0.98)
    assert negative.max() == pytest.approx(0.02, abs=1e-6) and positive.max() == pytest.approx(0.98, abs=1e-6)
    pixels = np.full((64, 32), 50, np.uint16)
    plain = plots.overlay(pixels, np.zeros((64, 32), np.float32), opacity=0.6)
    assert np.abs(plots.overlay(pixels, negative, opacity=0.6).astype(int) - plain).max() <= 4
    assert np.abs(plots.overlay(pixels, positive, opacity=0.6).astype(int) - plain).max() > 100


def test_explain_png_shows_the_map_on_the_shared_scale(db, db_path, tmp_path):
    run_id = save_run(db, db_path, resnet_like((128, 64)), image_size=(128, 64))
    _, images = add_study(db, "png", (256, 96))
    image_id = images["anterior"]
    runs.store_heatmaps(db, run_id, {image_id: bump((256, 96), 120, 50, sigma=10)}, {image_id: 0.5})
    pixels = pixelstore.decode_pixels(db.execute("SELECT pixels FROM images WHERE id = ?", [image_id]).fetchone()[0])
    plain = plots.overlay(pixels, np.zeros(pixels.shape, np.float32), opacity=0.8)
    shown = {}
    for probability in (0.01, 0.99):
        with dbm.write(db):
            db.execute("DELETE FROM predictions")
            db["predictions"].insert({"run_id": run_id, "image_id": image_id, "subset": "test", "label": 0,
                                      "probability": probability})
        out = explain.explain_png(db, db_path, run_id, image_id, tmp_path / f"{probability}.png", opacity=0.8)
        with Image.open(out) as png:
            shown[probability] = np.abs(np.asarray(png).astype(int) - plain).max()
    assert shown[0.01] <= 4 < 100 < shown[0.99]


# --- lesion points: phantoms, manifests, the migration ----------------------------------------------------

def test_demo_phantoms_store_their_metastases_as_lesion_points(db):
    ingest.add_demo_studies(db, 6, seed=7)
    expected = set()
    for image_id, truth, height, width in db.execute("SELECT id, truth, height, width FROM images").fetchall():
        for _view, row, col in lesions.points_from_truth(truth):
            assert 0 <= row < height and 0 <= col < width
            expected.add((image_id, row, col))
    stored = {tuple(r) for r in db.execute("SELECT image_id, row, col FROM lesions WHERE source = 'phantom'").fetchall()}
    assert stored == expected and len(stored) > 0


@pytest.mark.parametrize(("cell", "message"), [
    ("[[anterior, 1, 2]]", "is not JSON"),
    ('{"anterior": [1, 2]}', "must be a JSON list"),
    ('[["anterior", 1]]', r"is not \[view, row, col\]"),
    ('[["lateral", 1, 2]]', "use anterior or posterior"),
    ('[["A", -1, 2]]', "numbers >= 0"),
    ('[["A", true, 2]]', "numbers >= 0"),
    ('[["A", 1, NaN]]', "numbers >= 0"),
])
def test_a_bad_lesions_cell_is_refused_with_what_to_fix(cell, message):
    with pytest.raises(lesions.LesionError, match=message):
        lesions.parse_points(cell)


def test_a_lesions_cell_parses_views_and_coordinates():
    assert lesions.parse_points('[["A", 412, 97.5], ["posterior", 0, 0]]') == (
        lesions.LesionPoint("anterior", 412.0, 97.5), lesions.LesionPoint("posterior", 0.0, 0.0))
    assert lesions.parse_points("") == () and lesions.parse_points(" [] ") == ()


def write_png(path, seed: int, shape=(128, 64)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(1, 1000, shape, dtype=np.uint16)).save(path)


def write_lesion_manifest(path, rows) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "patient_id", "study_id", "view", "label", "lesions"])
        writer.writerows(rows)


def test_manifest_lesions_are_stored_on_their_image_and_bad_points_reject_the_file(db, tmp_path):
    for seed, name in enumerate(["a.png", "p.png", "out.png", "wrong.png"]):
        write_png(tmp_path / name, seed)
    write_lesion_manifest(tmp_path / "m.csv", [
        ["a.png", "P1", "S1", "A", "metastatic", '[["anterior", 10, 5], ["A", 127, 63]]'],
        ["p.png", "P1", "S1", "P", "metastatic", ""],
        ["out.png", "P2", "S2", "A", "metastatic", '[["anterior", 128, 5]]'],
        ["wrong.png", "P3", "S3", "P", "metastatic", '[["anterior", 10, 5]]'],
    ])
    outcomes = ingest.import_files(db, [], manifest=tmp_path / "m.csv")
    assert [o.status for o in outcomes] == ["imported", "imported", "rejected", "rejected"]
    assert "lies outside the 128x64 anterior image" in outcomes[2].detail and "m.csv line 4" in outcomes[2].detail
    assert "names the anterior view but this file holds posterior" in outcomes[3].detail
    anterior = outcomes[0].image_ids[0]
    assert db.execute("SELECT image_id, row, col, source FROM lesions ORDER BY id").fetchall() == [
        (anterior, 10.0, 5.0, "manifest"), (anterior, 127.0, 63.0, "manifest")]
    assert db.execute("SELECT COUNT(*) FROM images").fetchone()[0] == 2  # the rejected files left nothing


def test_a_manifest_with_a_malformed_lesions_cell_names_its_line(db, tmp_path):
    write_png(tmp_path / "a.png", 1)
    write_lesion_manifest(tmp_path / "m.csv", [["a.png", "P1", "S1", "A", "metastatic", '[["side", 1, 2]]']])
    with pytest.raises(ingest.ManifestError, match=r"m\.csv line 2: lesion .* use anterior or posterior"):
        ingest.import_files(db, [], manifest=tmp_path / "m.csv")
    assert db.execute("SELECT COUNT(*) FROM images").fetchone()[0] == 0


def test_migration_015_copies_phantom_lesions_and_gives_old_maps_their_probability(tmp_path, monkeypatch):
    path = tmp_path / "old.db"
    monkeypatch.setattr(dbm, "MIGRATIONS", [m for m in dbm.MIGRATIONS if m[0] < "015"])
    truth = json.dumps([{"kind": "metastasis", "view": "anterior", "row": 40, "col": 12, "radius": 3.0},
                        {"kind": "degenerative", "view": "anterior", "row": 80, "col": 20, "radius": 4.0}])
    with dbm.opened(path) as db:
        with dbm.write(db):
            patient = db["patients"].insert({"key": "p", "created_at": dbm.utc_now()}).last_pk
            study = db["studies"].insert({"patient_id": patient, "key": "s", "origin": "demo", "created_at": dbm.utc_now()}).last_pk
            image = ingest.insert_image(db, study, np.ones((128, 32), np.uint16), "anterior", "x", "phantom", truth=truth)
            run_id = db["runs"].insert({"backbone": "resnet50", "status": "done", "config": "{}", "config_hash": "h",
                                        "created_at": dbm.utc_now()}).last_pk
            db["predictions"].insert({"run_id": run_id, "image_id": image, "subset": "test", "label": 1, "probability": 0.83})
            db["explanations"].insert({"run_id": run_id, "image_id": image,
                                       "heatmap": pixelstore.encode_pixels(np.ones((128, 32), np.float16))})
    monkeypatch.undo()
    with dbm.opened(path) as db:
        assert dbm.schema_version(db) == dbm.MIGRATIONS[-1][0]
        assert db.execute("SELECT image_id, row, col, source FROM lesions").fetchall() == [(image, 40.0, 12.0, "phantom")]
        assert runs.cached_explanation(db, run_id, image)[1] == pytest.approx(0.83)


# --- explain --json: the peak in the stored image's pixels ------------------------------------------------

def test_a_frame_peak_maps_back_to_the_stored_image_through_the_geometry():
    size, shape = (64, 32), (300, 100)  # taller than the frame's 2:1, so columns are padded
    top, left, height, width = content_box(shape, size)
    frame_map = np.zeros(size, np.float32)
    frame_map[40, left + 15] = 1.0
    peak = localisation.peak_of(to_image_geometry(frame_map, size, shape))
    # the frame pixel's centre, out of the content box, scaled to the stored image
    expected = ((40 + 0.5 - top) * shape[0] / height - 0.5, (15 + 0.5) * shape[1] / width - 0.5)
    assert abs(peak[0] - expected[0]) <= 2.5 and abs(peak[1] - expected[1]) <= 2.5


def hot_spot_image(shape=(400, 100), row=250, col=70) -> np.ndarray:
    rng = np.random.default_rng(0)
    base = rng.normal(40.0, 2.0, shape).clip(0)
    return (base + bump(shape, row, col, sigma=3.0, height=2000.0)).astype(np.uint16)


def test_explain_json_prints_the_probability_and_the_peak_in_stored_pixels(db, db_path, capsys):
    size = (128, 64)
    model = resnet_like(size)
    run_id = save_run(db, db_path, model, image_size=size)
    pixels = hot_spot_image()
    with dbm.write(db):
        patient = db["patients"].insert({"key": "p", "created_at": dbm.utc_now()}).last_pk
        study = db["studies"].insert({"patient_id": patient, "key": "s", "origin": "import", "created_at": dbm.utc_now()}).last_pk
        image_id = ingest.insert_image(db, study, pixels, "anterior", "hot", "png")
    assert cli.main(["--db", str(db_path), "explain", str(run_id), str(image_id), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"image_id", "probability", "peak"} and out["image_id"] == image_id
    # 400 x 100 fits the 128 x 64 frame at 0.32: the frame peak near (80, 22) must come back near (250, 70)
    assert math.hypot(out["peak"][0] - 250, out["peak"][1] - 70) <= 8.0
    stored = db.execute("SELECT peak_row, peak_col, peak_value, heatmap FROM explanations WHERE image_id = ?", [image_id]).fetchone()
    assert [stored[0], stored[1]] == out["peak"]  # stored with the map, for the pointing game
    assert stored[2] == pytest.approx(float(pixelstore.decode_pixels(stored[3]).max()))
    own = float(np.asarray(model(to_model_input(prepare_image(pixels, size)[None], "resnet50")))[0, 0])
    assert out["probability"] == pytest.approx(own, abs=1e-4)  # no prediction stored: the model's own output
    with dbm.write(db):
        db["predictions"].insert({"run_id": run_id, "image_id": image_id, "subset": "test", "label": 1, "probability": 0.25})
    assert cli.main(["--db", str(db_path), "explain", str(run_id), str(image_id), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["probability"] == 0.25  # what the run reports for it


def test_explain_needs_out_or_json(db_path, capsys):
    assert cli.main(["--db", str(db_path), "explain", "1", "1"]) == 2
    assert "--out" in capsys.readouterr().err


# --- model randomisation (Adebayo et al. 2018) --------------------------------------------------------------

SHAPE = (48, 24)


def blob_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, 48, 24, 3) noisy images, half with a bright blob at a random place; labels; blob centres (row, col)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.2, 0.05, (n, *SHAPE)).astype(np.float32)
    y = (np.arange(n) % 2).astype(np.float32)
    centres = np.stack([rng.integers(6, SHAPE[0] - 6, n), rng.integers(5, SHAPE[1] - 5, n)], axis=1)
    for i in np.flatnonzero(y):
        x[i] += bump(SHAPE, centres[i, 0], centres[i, 1], sigma=1.5, height=0.8)
    return np.repeat(x[..., None], 3, axis=-1), y, centres


def tiny_model(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((*SHAPE, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="cam")(x)
    x = keras.layers.GlobalMaxPooling2D()(x)
    outputs = keras.layers.Dense(1, activation="sigmoid")(x)
    return keras.Model(inputs, outputs)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps (average ranks for ties), from numpy alone."""
    def ranks(v: np.ndarray) -> np.ndarray:
        v = v.ravel().astype(np.float64)
        order = np.argsort(v, kind="stable")
        r = np.empty(v.size)
        r[order] = np.arange(v.size)
        _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
        return (np.bincount(inverse, r) / counts)[inverse]
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def test_maps_depend_on_the_learned_weights_model_randomisation():
    """Adebayo et al. (2018): a saliency method whose maps barely change when the trained
    weights are replaced by random ones explains the input, not the model. Grad-CAM of a tiny
    trained blob detector must point at the blobs and differ from the same architecture's
    re-initialised maps (Spearman rank correlation well below 1)."""
    x, y, _ = blob_data(256, seed=1)
    model = tiny_model(seed=2)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy")
    model.fit(x, y, batch_size=32, epochs=12, verbose=0, shuffle=False)
    test_x, test_y, centres = blob_data(24, seed=3)
    positives = np.flatnonzero(test_y)
    trained_maps, probabilities = gradcam.gradcam_with_probabilities(model, test_x[positives], "cam")
    assert probabilities.min() > 0.5 and np.median(probabilities) > 0.8  # it learned the task
    peaks = [localisation.peak_of(m) for m in trained_maps]
    hits = [p is not None and localisation.nominal_distances(p, centres[i][None], SHAPE, reference=SHAPE).min() <= 3.0
            for p, i in zip(peaks, positives, strict=True)]
    assert np.mean(hits) >= 0.9  # and it points at the blobs (within 3 px)
    random_maps = gradcam.gradcam(tiny_model(seed=99), test_x[positives], "cam")
    correlations = [spearman(a, b) for a, b in zip(trained_maps, random_maps, strict=True)]
    assert np.median(correlations) < 0.4, correlations  # measured: 0.22 (two trained models agree at 0.45)
    assert spearman(trained_maps[0], trained_maps[0]) == pytest.approx(1.0)  # the statistic can say "same"


# --- the Evaluate page ----------------------------------------------------------------------------------

def test_evaluate_page_shows_the_pointing_game(db_path):
    """Every view of the metastatic test studies has a lesion point (the page test's labels are
    not the phantoms' truth, so they are placed by hand); maps peak on it in each anterior view
    and in a corner of each posterior one: a true-positive study is a hit exactly when its
    anterior view is the more probable."""
    from test_evaluate_page import insert_runs, open_evaluate

    with dbm.opened(db_path) as db:
        run = insert_runs(db)["densenet121"]  # the newest run: the page opens on it
        with dbm.write(db):
            db.execute("DELETE FROM lesions")
            # The pointing game scores true positives at the study threshold: stored here, equal to the image one.
            db.execute("UPDATE runs SET results = ? WHERE id = ?", [json.dumps(
                {"thresholds": {"image": run["threshold"], "study": run["threshold"], "rule": "youden", "target": None}}),
                run["id"]])
        maps = {}
        for image_id, _, _, view, subset, label, _ in run["rows"]:
            height, width = db.execute("SELECT height, width FROM images WHERE id = ?", [image_id]).fetchone()
            lesion = (height // 3, width // 2)
            if subset == "test" and label == 1:
                add_points(db, image_id, [lesion])
            maps[image_id] = bump((height, width), *(lesion if view == "anterior" else (height - 5, width - 5)))
        runs.store_heatmaps(db, run["id"], maps)
    studies: dict[int, dict[str, float]] = {}
    for _, study_id, _, view, subset, label, p in run["rows"]:
        if subset == "test" and label == 1:
            studies.setdefault(study_id, {})[view] = p
    scored = [s for s in studies.values() if max(s.values()) >= run["threshold"]]
    hits = sum(s["anterior"] >= s["posterior"] for s in scored)
    assert scored and 0 < hits < len(scored), "test setup: hits and misses are both needed"
    app = open_evaluate(db_path)
    assert {m.label: m.value for m in app.metric}["Grad-CAM pointing game"] == f"{hits / len(scored):.3f}"
    assert any(f"in {hits} of {len(scored)} true-positive lesion studies" in c.value for c in app.caption)
