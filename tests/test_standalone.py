"""A model that stands alone (issue 13, point 4): the exported bundle's ``predict.py`` runs in a
fresh interpreter that cannot import bonescan and reproduces the probability the app stored for
the same image within 1e-4, from a TIFF and a PNG written from the stored pixels; the bundle's
input layers compute what ``preprocess`` computes; the script applies a stored calibration as
``studystats.apply_calibration`` does, prints the thresholds, and refuses what it cannot read."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from conftest import REPO, run_cli, tiny_run
from PIL import Image

from bonescan_core import db as dbm
from bonescan_core import jobs, pixelstore, preprocess, report, runs, studystats
from bonescan_core.ingest import add_demo_studies

PREDICT = REPO / "bonescan_core" / "bundle" / "predict.py"

# Runs predict.py's main once per argv list, in this interpreter, after making sure that no
# bonescan module can be imported (an editable install would otherwise reach the repository).
BOOTSTRAP = r"""
import importlib.abc, json, runpy, sys

class NoBonescan(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "bonescan_core":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoBonescan())
try:
    import bonescan_core  # noqa: F401
    print("== bonescan_core importable")
except ModuleNotFoundError:
    print("== bonescan_core not importable")
script, runs = sys.argv[1], json.loads(sys.argv[2])
for argv in runs:
    sys.argv = [script, *argv]
    try:
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as stop:
        code = stop.code or 0
    print(f"== rc {code}", flush=True)
"""


def run_bundle(bundle, argv_lists, cwd):
    """Run the bundle's predict.py for each argv in ``python -I`` with a clean environment; returns
    (stdout blocks per run, return codes, stderr)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(cwd), "TF_CPP_MIN_LOG_LEVEL": "2",
           "KERAS_BACKEND": os.environ.get("KERAS_BACKEND", "tensorflow")}
    done = subprocess.run([sys.executable, "-I", "-c", BOOTSTRAP, str(bundle / "predict.py"), json.dumps(argv_lists)],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "== bonescan_core not importable", lines[0]
    blocks, codes, current = [], [], []
    for line in lines[1:]:
        if line.startswith("== rc "):
            blocks.append(current)
            codes.append(int(line.split()[-1]))
            current = []
        elif line.strip():
            current.append(line)
    return blocks, codes, done.stderr


def train(db_path, **settings):
    with dbm.opened(db_path) as db:
        config = tiny_run(**settings)
        run_id = jobs.enqueue(db, config.backbone, config.to_dict(), config.identity_hash())
    assert jobs.run_worker(db_path, once=True, echo=lambda line: None) == 1
    with dbm.opened(db_path) as db:
        run = runs.get(db, run_id)
    assert run.status == "done", run.error
    return run_id


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """16 demo studies; a per-image scintinet run (uncalibrated), a composite scintinet run (weights none, 64 x 32,
    1 epoch) and a fast-mode ResNet50 run (the ImageNet input layer), each exported once: (db path, (run, its bundle)
    of each). Scintinet where the backbone is not the point: it builds ~5x faster than an ImageNet backbone."""
    folder = tmp_path_factory.mktemp("standalone")
    db_path = folder / "labels.db"
    with dbm.opened(db_path) as db:
        add_demo_studies(db, 16, seed=21)
    per_image = train(db_path, backbone="scintinet", view_mode="per_image", calibration="none")  # the test adds a calibration itself
    composite = train(db_path, backbone="scintinet", view_mode="composite")
    fast = train(db_path, backbone="resnet50", mode="fast", epochs=3)
    with dbm.opened(db_path) as db:  # in this process: no fresh interpreter needed for the in-process check
        report.export_bundle(db, db_path, fast, folder / "fast")
    return (db_path, (per_image, export(db_path, per_image, folder / "per-image")),
            (composite, export(db_path, composite, folder / "composite")), (fast, folder / "fast"))


def stored(db_path, run_id):
    """[(study id, {view: pixels}, stored probability)] of the run's test predictions, by study."""
    with dbm.opened(db_path) as db:
        rows = db.execute(
            "SELECT p.image_id, i.study_id, i.view, i.pixels, p.probability FROM predictions p JOIN images i ON i.id = p.image_id "
            "WHERE p.run_id = ? AND p.subset = 'test' ORDER BY i.study_id, i.id", [run_id]).fetchall()
    studies = {}
    for image_id, study_id, view, blob, probability in rows:
        studies.setdefault(study_id, []).append((image_id, view, pixelstore.decode_pixels(blob), probability))
    return studies


def write_files(folder, name, pixels):
    """The stored pixels as a TIFF (any dtype, exact) and a 16-bit PNG (integer counts)."""
    tiff, png = folder / f"{name}.tif", folder / f"{name}.png"
    tifffile.imwrite(tiff, pixels)
    assert pixels.dtype.kind in "ui" and pixels.max() <= 0xFFFF, pixels.dtype
    Image.fromarray(pixels.astype(np.uint16)).save(png)
    return tiff, png


def export(db_path, run_id, bundle):
    """``bonescan export RUN --out BUNDLE`` in a fresh process, as a user would."""
    result = run_cli("export", str(run_id), "--out", str(bundle), db_path=db_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in bundle.iterdir()) == sorted(report.BUNDLE_FILES)
    card = (bundle / "model_card.md").read_text(encoding="utf-8")  # the model card, with the flow and the checklist
    assert "Imported: 16 studies" in card and "| CLAIM 44 |" in card and "| TRIPOD+AI 27c |" in card
    return bundle


@pytest.mark.slow
def test_per_image_bundle_reproduces_the_app_without_bonescan(trained, tmp_path):
    db_path, (run_id, bundle), *_ = trained
    config = json.loads((bundle / "config.json").read_text())
    assert config["model_input"]["inputs"] == ["counts"] and config["calibration"] == {"method": "none"}

    studies = stored(db_path, run_id)
    images = [image for items in studies.values() for image in items][:3]
    files, expected = [], []
    for image_id, _, pixels, probability in images:
        files += [str(path) for path in write_files(tmp_path, f"image-{image_id}", pixels)]
        expected += [probability, probability]
    garbage = tmp_path / "notes.png"
    garbage.write_text("not an image")

    calibrated = tmp_path / "calibrated"
    shutil.copytree(bundle, calibrated)
    calibration = {"method": "platt", "intercept": -0.4, "slope": 1.7}
    (calibrated / "config.json").write_text(json.dumps({**config, "calibration": calibration,
                                                        "thresholds": {"image": 0.31, "study": 0.42, "rule": "youden"}}))

    work = tmp_path / "elsewhere"
    work.mkdir()
    blocks, codes, stderr = run_bundle(bundle, [
        files,
        [files[0], str(garbage), files[1]],
        ["--threshold"],
        ["--bundle", str(calibrated), *files[:2]],
        ["--bundle", str(calibrated), "--threshold"],
        ["--bundle", str(calibrated), "--raw", files[0]],
    ], work)

    printed = [line.split("\t") for line in blocks[0]]
    assert [name for name, _ in printed] == files
    assert codes[0] == 0
    np.testing.assert_allclose([float(p) for _, p in printed], expected, atol=1e-4, rtol=0)

    assert codes[1] == 2 and [line.split("\t")[0] for line in blocks[1]] == [files[0], files[1]]
    assert f"{garbage}: not a TIFF, PNG, JPEG or DICOM file" in stderr

    stored_thresholds = config["thresholds"]  # image and study, each chosen on validation
    assert codes[2] == 0 and blocks[2] == [f"image\t{stored_thresholds['image']:.6f}", f"study\t{stored_thresholds['study']:.6f}"]

    raw = np.array([float(p) for _, p in printed[:2]])
    assert codes[3] == 0
    np.testing.assert_allclose([float(line.split("\t")[1]) for line in blocks[3]],
                               studystats.apply_calibration(calibration, raw), atol=2e-6, rtol=0)
    assert not np.allclose(studystats.apply_calibration(calibration, raw), raw, atol=1e-3)  # the calibration matters
    assert blocks[4] == ["image\t0.310000", "study\t0.420000"]
    assert blocks[5] == [blocks[0][0]]  # --raw skips the calibration


@pytest.mark.slow
def test_composite_bundle_reproduces_the_app_without_bonescan(trained, tmp_path):
    db_path, _, (run_id, bundle), _ = trained
    assert json.loads((bundle / "config.json").read_text())["model_input"]["inputs"] == ["anterior", "posterior"]
    argv, expected = [], []
    for study_id, items in list(stored(db_path, run_id).items())[:2]:
        views = {view: (pixels, probability) for _, view, pixels, probability in items}
        (anterior, probability), (posterior, _) = views["anterior"], views["posterior"]
        tiff, _ = write_files(tmp_path, f"study-{study_id}-anterior", anterior)
        _, png = write_files(tmp_path, f"study-{study_id}-posterior", posterior)
        argv += [str(tiff), str(png)]
        expected.append(probability)
    work = tmp_path / "elsewhere"
    work.mkdir()
    blocks, codes, _ = run_bundle(bundle, [argv, argv[:3]], work)
    assert codes[0] == 0
    printed = [line.split("\t") for line in blocks[0]]
    assert [line[:2] for line in printed] == [argv[0:2], argv[2:4]]
    np.testing.assert_allclose([float(line[2]) for line in printed], expected, atol=1e-4, rtol=0)
    assert codes[1] == 2 and blocks[1] == []  # an odd number of files is not a set of pairs


@pytest.mark.slow
def test_the_exported_model_loads_safely_and_takes_any_size(trained):
    import keras

    from bonescan_core.bundle import bonescan_layers  # noqa: F401  # registers the layers

    db_path, (run_id, bundle), _, (fast_id, fast_bundle) = trained
    model = keras.saving.load_model(bundle / "model.keras", compile=False, safe_mode=True)
    assert model.input_shape == (None, None, None, 1) and model.output_shape == (None, 1)
    assert not any(isinstance(layer, keras.layers.Lambda) for layer in model._flatten_layers())
    run_model, backbone, size = runs.load_model(db_path, run_id)
    rng = np.random.default_rng(3)
    for shape in ((64, 32), (300, 128), (97, 211)):
        counts = rng.poisson(20, size=shape).astype(np.float32)
        standalone = float(np.asarray(model(counts[None, :, :, None], training=False))[0, 0])
        grey = preprocess.prepare_image(counts, size).astype(np.float16).astype(np.float32)
        app = float(np.asarray(run_model([preprocess.to_model_input(grey[None], backbone)], training=False))[0, 0])
        assert abs(standalone - app) < 1e-5, shape

    # Fast mode: the stored probabilities come from float16-cached features; the bundle rounds them too.
    fast = keras.saving.load_model(fast_bundle / "model.keras", compile=False, safe_mode=True)
    images = [image for items in stored(db_path, fast_id).values() for image in items][:4]
    ours = [float(np.asarray(fast(pixels.astype(np.float32)[None, :, :, None], training=False))[0, 0])
            for _, _, pixels, _ in images]
    np.testing.assert_allclose(ours, [probability for *_, probability in images], atol=1e-4, rtol=0)


@pytest.mark.parametrize(("shape", "size"), [
    ((1024, 256), (646, 220)), ((646, 220), (646, 220)), ((777, 333), (128, 64)), ((50, 70), (64, 32)),
    ((20, 9), (64, 32)), ((300, 120), (64, 32)), ((7, 7), (64, 64)), ((256, 1024), (64, 110)),
])
def test_fit_scan_layer_is_the_apps_prepare_image(shape, size):
    """Pillow's antialiased bilinear resize, the centring, padding and min-max, as NumPy does them."""
    from bonescan_core.bundle.bonescan_layers import FitScan

    counts = np.random.default_rng(sum(shape)).gamma(2.0, 50.0, size=shape).astype(np.float32)
    counts[0, 0] = -5.0  # min-max starts at the image's own minimum
    layer = FitScan(*size, cache_dtype="float32")
    fitted = np.asarray(layer(counts[None, :, :, None]))[0, :, :, 0]
    np.testing.assert_allclose(fitted, preprocess.prepare_image(counts, size), atol=2e-6, rtol=0)
    blank = np.asarray(layer(np.full((1, 80, 70, 1), 9.0, dtype=np.float32)))
    assert not blank.any()  # a constant image is all zeros, as preprocess.minmax makes it


def test_predict_script_calibrates_as_the_app_does():
    spec = importlib.util.spec_from_file_location("bundle_predict", PREDICT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    raw = np.array([0.0, 1e-9, 0.03, 0.5, 0.77, 0.999, 1.0])
    for calibration in (None, {"method": "none"}, {"method": "temperature", "temperature": 1.8},
                        {"method": "platt", "intercept": 0.3, "slope": 0.6}):
        ours = [script.calibrate(calibration, p) for p in raw]
        np.testing.assert_allclose(ours, studystats.apply_calibration(calibration, raw), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="unknown calibration method"):
        script.calibrate({"method": "isotonic"}, 0.5)
