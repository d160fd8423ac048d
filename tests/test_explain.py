"""Grad-CAM (``gradcam``, ``explain``): shapes and ranges per backbone, a model whose answer is
known, geometry (``preprocess``), overlay (``plots``), loading run models safely (``runs``), and
the explanations cache.

The "known answer" model is built by hand: one convolution ("cam_conv") whose kernel is a
zero-sum difference of Gaussians (it responds to focal hot spots and ignores flat or broad
uptake), global average pooling, and a Dense layer with a positive weight. Its evidence for
"metastatic" is exactly where that convolution fires, so Grad-CAM must peak on the hottest
focal spot: a phantom lesion made conspicuous. Any error in the gradient's sign, the channel
weighting, the conv stride or the padding/resizing geometry moves the peak off the lesion.
"""

from __future__ import annotations

import gc
import hashlib
import json
import weakref
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bonescan_core import db as dbm
from bonescan_core import errors, explain, gradcam, ingest, jobs, pixelstore, plots, preprocess, runs
from bonescan_core.heavy import keras_module
from bonescan_core.models import BACKBONES, build_model
from bonescan_core.phantom import make_study
from bonescan_core.preprocess import compose_views, content_box, prepare_image, to_model_input

keras = keras_module()

PHANTOM_SHAPE = (512, 160)  # (H0, W0) of the test scans
FRAME = (256, 128)  # model input: the scan is halved to 256 x 80 and padded by 24 columns each side


def gaussian_kernel(sigma: float, size: int = 9) -> np.ndarray:
    """(size, size) Gaussian summing to 1."""
    r = np.arange(size) - size // 2
    g = np.exp(-0.5 * (r[:, None] ** 2 + r[None, :] ** 2) / sigma**2)
    return g / g.sum()


def known_model(image_size: tuple[int, int], conv_name: str = "cam_conv", weight: float = 50.0) -> keras.Model:
    """Input (H, W, 3) → Conv2D(1, 9x9, stride 2, relu; difference-of-Gaussians kernel) → GAP → Dense(1, sigmoid)."""
    inputs = keras.Input((*image_size, 3), name="image")
    x = keras.layers.Conv2D(1, 9, strides=2, padding="same", activation="relu", name=conv_name)(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="head_pool")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", name="head_dense")(x)
    model = keras.Model(inputs, outputs, name="known")
    dog = gaussian_kernel(1.2) - gaussian_kernel(3.0)  # zero-sum: the backbone's mean subtraction cancels
    kernel = np.repeat(dog[:, :, None, None], 3, axis=2).astype(np.float32) / 3.0
    model.get_layer(conv_name).set_weights([kernel, np.zeros(1, np.float32)])
    model.get_layer("head_dense").set_weights([np.full((1, 1), weight, np.float32), np.zeros(1, np.float32)])
    return model


def add_blob(image: np.ndarray, row: float, col: float, sigma: float, peak: float) -> np.ndarray:
    rows = np.arange(image.shape[0], dtype=np.float32)[:, None]
    cols = np.arange(image.shape[1], dtype=np.float32)[None, :]
    return image.astype(np.float32) + np.float32(peak) * np.exp(-0.5 * ((rows - row) ** 2 + (cols - col) ** 2) / sigma**2)


@pytest.fixture(scope="module")
def lesion_study():
    """The first seeded phantom with exactly one metastasis and no look-alikes, its lesion made hotter than anything else."""
    for seed in range(1000):
        study = make_study(np.random.default_rng(seed), True, *PHANTOM_SHAPE)
        if len(study.findings) == 2:  # one focus, seen in both views
            break
    views = {}
    for finding in study.lesions:
        pixels = getattr(study, finding.view)
        views[finding.view] = (add_blob(pixels, finding.row, finding.col, max(finding.radius, 2.5), 2.0 * float(pixels.max())), finding)
    return views


def distance_to(heatmap: np.ndarray, finding) -> float:
    row, col = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return float(np.hypot(row - finding.row, col - finding.col))


def tolerance(finding) -> float:
    """A few lesion radii, and at least two conv cells (stride 2 in a frame at half scale: 4 px each)."""
    return max(3.0 * finding.radius, 8.0)


# --- gradcam per backbone ----------------------------------------------------------------------

@pytest.mark.parametrize("name", list(BACKBONES))
def test_gradcam_shape_range_and_cached_grad_model(name, monkeypatch):
    built = []

    class CountingGradCam(gradcam.GradCam):
        def __init__(self, *args, **kwargs):
            built.append(args[1])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(gradcam, "GradCam", CountingGradCam)
    model = build_model(name, weights="none", image_size=(96, 64))
    layer = BACKBONES[name].last_conv_layer
    x = np.random.default_rng(0).normal(0.0, 50.0, size=(3, 96, 64, 3)).astype(np.float32)

    maps = gradcam.gradcam(model, x, layer)
    again = gradcam.gradcam(model, x, layer)

    h, w = model.get_layer(layer).output.shape[1:3]
    assert maps.shape == (3, h, w) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0.0 and maps.max() <= 1.0
    assert np.allclose(maps, again)
    assert built == [layer]  # built once, reused by the second call
    cam = gradcam.grad_cam_for(model, layer)
    assert cam is gradcam.grad_cam_for(model, layer)
    assert cam.split and cam.uses_logit  # cut at the layer; scored on the logit, not the saturating sigmoid


def test_cached_grad_model_is_freed_with_its_model():
    model = known_model((64, 32))
    gradcam.gradcam(model, np.zeros((1, 64, 32, 3), np.float32), "cam_conv")
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_unknown_layer_names_the_problem():
    with pytest.raises(ValueError, match="no layer 'nope'"):
        gradcam.gradcam(known_model((64, 32)), np.zeros((1, 64, 32, 3), np.float32), "nope")


def test_layer_bypassed_by_a_skip_connection():
    inputs = keras.Input((32, 32, 3))
    stem = keras.layers.Conv2D(4, 3, padding="same", name="stem")(inputs)
    target = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="cam_conv")(stem)
    x = keras.layers.Add()([stem, target])  # the prediction also reads the stem directly
    outputs = keras.layers.Dense(1, activation="sigmoid")(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(3).normal(size=(2, 32, 32, 3)).astype(np.float32)
    if keras.backend.backend() == "tensorflow":  # the whole model is taped
        maps = gradcam.gradcam(model, x, "cam_conv")
        assert maps.shape == (2, 32, 32) and np.isfinite(maps).all() and 0.0 <= maps.min() <= maps.max() <= 1.0
        assert not gradcam.grad_cam_for(model, "cam_conv").split
    else:
        with pytest.raises(ValueError, match="not a cut point"):
            gradcam.gradcam(model, x, "cam_conv")


def sigmoid_after_dense(image_size: tuple[int, int]) -> keras.Model:
    """The known model with the sigmoid as a layer of its own: no logit to score, the output itself is."""
    base = known_model(image_size, weight=1.0)
    dense = base.get_layer("head_dense")
    logits = keras.layers.Dense(1, name="logit")(base.get_layer("head_pool").output)
    model = keras.Model(base.inputs[0], keras.layers.Activation("sigmoid")(logits))
    model.get_layer("logit").set_weights(dense.get_weights())
    return model


@pytest.mark.parametrize("kind", ["logit", "output", "densenet121"])
def test_probabilities_are_the_models_own_prediction(kind):
    size = (64, 32)
    if kind == "densenet121":  # batch normalisation and dropout: inference mode in both
        model, layer = build_model("densenet121", weights="none", image_size=size), BACKBONES["densenet121"].last_conv_layer
    else:
        model, layer = (known_model(size, weight=1.0) if kind == "logit" else sigmoid_after_dense(size)), "cam_conv"
    x = np.random.default_rng(4).uniform(-120.0, 120.0, size=(5, *size, 3)).astype(np.float32)
    maps, probabilities = gradcam.gradcam_with_probabilities(model, x, layer, batch_size=2)  # three passes
    expected = np.asarray(model(x, training=False), dtype=np.float32)[:, 0]
    assert gradcam.grad_cam_for(model, layer).uses_logit == (kind != "output")
    assert probabilities.shape == (5,) and probabilities.dtype == np.float32
    assert np.ptp(expected) > 1e-4  # distinct predictions: a swapped or repeated one would show
    assert np.allclose(probabilities, expected, atol=1e-5, rtol=0)
    assert np.array_equal(maps, gradcam.gradcam(model, x, layer, batch_size=2))  # gradcam(): the same step, maps only


def test_map_without_positive_evidence_is_zero_not_nan():
    # A negative Dense weight: the hot spots count AGAINST metastasis, so no region supports it.
    model = known_model((64, 32), weight=-50.0)
    x = np.random.default_rng(1).uniform(-100.0, 100.0, size=(2, 64, 32, 3)).astype(np.float32)
    maps = gradcam.gradcam(model, x, "cam_conv")
    assert maps.shape == (2, 32, 16) and not maps.any()
    assert not gradcam.cams_from(np.full((1, 2, 2, 3), np.nan), np.zeros((1, 2, 2, 3))).any()


# --- a model whose answer is known --------------------------------------------------------------

def test_heatmap_peaks_inside_the_lesion(lesion_study):
    pixels, finding = lesion_study["anterior"]
    heatmap = explain.heatmap_for_image(known_model(FRAME), "resnet50", pixels, FRAME, layer_name="cam_conv")
    assert heatmap.shape == PHANTOM_SHAPE and heatmap.dtype == np.float32
    assert heatmap.min() >= 0.0 and heatmap.max() <= 1.0
    assert distance_to(heatmap, finding) <= tolerance(finding)


def test_composite_heatmaps_peak_inside_the_lesion_in_each_view(lesion_study):
    (front, front_lesion), (back, back_lesion) = lesion_study["anterior"], lesion_study["posterior"]
    size = (256, 192)  # each view gets a 256 x 96 half
    maps = explain.heatmaps_for_composite(known_model(size), "densenet121", front, back, size, layer_name="cam_conv")
    assert [m.shape for m in maps] == [PHANTOM_SHAPE, PHANTOM_SHAPE]
    assert distance_to(maps[0], front_lesion) <= tolerance(front_lesion)
    assert distance_to(maps[1], back_lesion) <= tolerance(back_lesion)
    only_front = explain.heatmaps_for_composite(known_model(size), "densenet121", front, None, size, layer_name="cam_conv")
    assert only_front[1] is None and distance_to(only_front[0], front_lesion) <= tolerance(front_lesion)


# --- geometry ----------------------------------------------------------------------------------

def test_content_box_heatmap_maps_to_the_whole_image():
    top, left, height, width = content_box(PHANTOM_SHAPE, FRAME)
    assert left > 0  # the test needs padding to undo
    frame = np.zeros(FRAME, np.float32)
    frame[top : top + height, left : left + width] = 1.0
    assert np.allclose(preprocess.to_image_geometry(frame, FRAME, PHANTOM_SHAPE), 1.0, atol=1e-5)


def test_a_point_in_the_frame_lands_on_the_same_anatomy():
    top, left, height, width = content_box(PHANTOM_SHAPE, FRAME)
    frame = np.zeros(FRAME, np.float32)
    frame[top + 40, left + 10] = 1.0  # image pixel (80, 20) at scale 0.5
    back = preprocess.to_image_geometry(frame, FRAME, PHANTOM_SHAPE)
    row, col = np.unravel_index(int(np.argmax(back)), back.shape)
    assert abs(row - 80) <= 2 and abs(col - 20) <= 2


def test_composite_halves_map_to_their_views():
    size = (256, 192)
    frame = np.zeros(size, np.float32)
    frame[:, : size[1] // 2] = 0.25
    frame[:, size[1] // 2 :] = 0.75
    front, back = preprocess.to_view_geometries(frame, size, (512, 160), (400, 200))
    assert front.shape == (512, 160) and back.shape == (400, 200)
    assert np.allclose(front, 0.25, atol=1e-5) and np.allclose(back, 0.75, atol=1e-5)


# --- overlay -----------------------------------------------------------------------------------

def test_overlay_shape_opacity_and_colour():
    pixels = np.random.default_rng(2).poisson(50.0, size=(64, 32)).astype(np.uint16)
    heat = np.zeros((64, 32), np.float32)
    heat[10:20, 5:15] = 1.0
    image = plots.overlay(pixels, heat, opacity=0.6)
    assert image.shape == (64, 32, 3) and image.dtype == np.uint8
    plain = pixelstore.to_display(pixels)
    assert np.array_equal(plots.overlay(pixels, heat, opacity=0.0), np.repeat(plain[..., None], 3, axis=-1))
    assert np.array_equal(image[30:, :, 0], plain[30:, :])  # no heat: the plain display, untouched
    hot = image[10:20, 5:15].astype(int)
    assert (np.abs(hot[..., 0] - hot[..., 2]) > 40).all()  # coloured, not grey
    with pytest.raises(ValueError, match="shape"):
        plots.overlay(pixels, np.zeros((8, 8), np.float32))


def test_colour_map_runs_from_cool_to_hot():
    assert plots.TURBO.shape == (256, 3) and plots.TURBO.dtype == np.uint8
    low, high = plots.TURBO[25].astype(int), plots.TURBO[230].astype(int)
    assert low[2] > low[0] + 100 and high[0] > high[2] + 100  # blue for little heat, red for much


# --- run models and the explanations cache ------------------------------------------------------

def save_run(db, db_path: Path, model: keras.Model | None, *, view_mode: str = "per_image", sha: str | None = "auto",
             image_size: tuple[int, int] = (128, 64)) -> int:
    """A finished resnet50 run whose model file is ``model`` (None: no file at all)."""
    folder = db_path.parent / "runs"  # as runs were stored before per-database folders: still found
    folder.mkdir(exist_ok=True)
    weights_path = f"run-test-{len(list(folder.iterdir()))}/model.keras"
    if model is not None:
        (folder / weights_path).parent.mkdir()
        model.save(folder / weights_path)
    if sha == "auto":
        sha = hashlib.sha256((folder / weights_path).read_bytes()).hexdigest() if model is not None else None
    config = {"backbone": "resnet50", "image_size": list(image_size), "view_mode": view_mode, "weights": "none"}
    with dbm.write(db):
        return db["runs"].insert({
            "backbone": "resnet50", "status": "done", "config": json.dumps(config), "config_hash": f"test-{weights_path}",
            "created_at": dbm.utc_now(), "weights_path": weights_path, "weights_sha256": sha,
        }).last_pk


def resnet_like(image_size: tuple[int, int] = (128, 64), weight: float = 50.0) -> keras.Model:
    """The known model with its conv layer named as resnet50's last conv layer (a tiny stand-in classifier)."""
    return known_model(image_size, conv_name=BACKBONES["resnet50"].last_conv_layer, weight=weight)


def test_load_run_model_returns_model_backbone_and_size(db, db_path):
    run_id = save_run(db, db_path, resnet_like())
    model, backbone, size = runs.load_model(db_path, run_id)
    assert backbone.name == "resnet50" and size == (128, 64)
    assert model.get_layer("conv5_block3_out") is not None
    assert runs.load_model(db_path, run_id)[0] is model  # cached while the file is unchanged


def test_corrupted_model_file_raises_model_unavailable(db, db_path):
    run_id = save_run(db, db_path, resnet_like(), sha=None)
    path = db_path.parent / "runs" / db.execute("SELECT weights_path FROM runs WHERE id = ?", [run_id]).fetchone()[0]
    path.write_bytes(b"PK\x03\x04 this is not a Keras archive")
    with pytest.raises(runs.ModelUnavailable, match="cannot be loaded.*train the run again"):
        runs.load_model(db_path, run_id)


def test_checksum_mismatch_raises_model_unavailable(db, db_path):
    run_id = save_run(db, db_path, resnet_like(), sha="0" * 64)
    with pytest.raises(runs.ModelUnavailable, match="does not match its recorded checksum.*restore the original file"):
        runs.load_model(db_path, run_id)


def test_missing_model_file_raises_model_unavailable(db, db_path):
    run_id = save_run(db, db_path, None)
    with pytest.raises(runs.ModelUnavailable, match="missing.*restore"):
        runs.load_model(db_path, run_id)
    with dbm.write(db):
        db.execute("UPDATE runs SET weights_path = NULL, status = 'failed' WHERE id = ?", [run_id])
    with pytest.raises(runs.ModelUnavailable, match="no saved model"):
        runs.load_model(db_path, run_id)


@pytest.fixture
def demo_images(db) -> dict[str, int]:
    """One seeded phantom study in the database: {view: image id}."""
    ingest.add_demo_studies(db, 1, seed=3)
    return dict(db.execute("SELECT view, id FROM images ORDER BY id").fetchall())


def test_explain_image_is_computed_once_and_cached(db, db_path, demo_images, tmp_path):
    run_id = save_run(db, db_path, resnet_like())
    image_id = demo_images["anterior"]
    first = explain.explain_image(db, db_path, run_id, image_id)
    pixels = pixelstore.decode_pixels(db.execute("SELECT pixels FROM images WHERE id = ?", [image_id]).fetchone()[0])
    assert first.shape == pixels.shape and first.dtype == np.float32 and 0.0 <= first.min() <= first.max() <= 1.0
    assert db.execute("SELECT COUNT(*) FROM explanations").fetchone()[0] == 1

    # With the model file gone, only the stored map can answer (computing it again would raise
    # ModelUnavailable), and what comes back is what is stored: a map written over the stored
    # one is returned as written.
    weights_path = db.execute("SELECT weights_path FROM runs WHERE id = ?", [run_id]).fetchone()[0]
    (db_path.parent / "runs" / weights_path).unlink()
    assert np.array_equal(explain.explain_image(db, db_path, run_id, image_id), first)
    planted = np.linspace(0.0, 1.0, first.size, dtype=np.float16).reshape(first.shape)
    with dbm.write(db):
        db.execute("UPDATE explanations SET heatmap = ? WHERE run_id = ? AND image_id = ?",
                   [pixelstore.encode_pixels(planted), run_id, image_id])
    np.testing.assert_array_equal(explain.explain_image(db, db_path, run_id, image_id), planted.astype(np.float32))
    assert db.execute("SELECT COUNT(*) FROM explanations").fetchone()[0] == 1

    out = explain.explain_png(db, db_path, run_id, image_id, tmp_path / "overlay.png", opacity=0.5)
    with Image.open(out) as png:
        assert png.mode == "RGB" and png.size == (pixels.shape[1], pixels.shape[0])


def test_explain_image_of_a_composite_run_stores_both_views(db, db_path, demo_images):
    run_id = save_run(db, db_path, resnet_like((128, 128)), view_mode="composite", image_size=(128, 128))
    heat = explain.explain_image(db, db_path, run_id, demo_images["posterior"])
    assert heat.shape == (1024, 256)
    stored = dict(db.execute("SELECT image_id, heatmap FROM explanations WHERE run_id = ?", [run_id]).fetchall())
    assert set(stored) == {demo_images["anterior"], demo_images["posterior"]}
    assert np.array_equal(pixelstore.decode_pixels(stored[demo_images["posterior"]]).astype(np.float32), heat)


def test_explain_image_unknown_image(db, db_path):
    run_id = save_run(db, db_path, resnet_like())
    with pytest.raises(errors.ImageNotFound, match="bonescan images"):
        explain.explain_image(db, db_path, run_id, 999)


def stored_map(db, run_id: int, image_id: int) -> np.ndarray:
    row = db.execute("SELECT heatmap FROM explanations WHERE run_id = ? AND image_id = ?", [run_id, image_id]).fetchone()
    assert row is not None, f"no stored map for image {image_id}"
    return pixelstore.decode_pixels(row[0]).astype(np.float32)


def image_pixels(db, image_id: int) -> np.ndarray:
    return pixelstore.decode_pixels(db.execute("SELECT pixels FROM images WHERE id = ?", [image_id]).fetchone()[0])


def test_explain_images_batches_a_study_with_its_probabilities(db, db_path, demo_images, monkeypatch):
    size = (64, 32)
    run_id = save_run(db, db_path, resnet_like(size, weight=1.0), image_size=size)
    model, backbone, _ = runs.load_model(db_path, run_id)
    ids = [demo_images["posterior"], demo_images["anterior"]]
    passes = []
    real_pass = explain.gradcam_with_probabilities

    def counting_pass(model, inputs, *args, **kwargs):
        passes.append(len(inputs))
        return real_pass(model, inputs, *args, **kwargs)

    monkeypatch.setattr(explain, "gradcam_with_probabilities", counting_pass)
    found = explain.explain_images(db, db_path, run_id, ids)
    assert passes == [2]  # both views in one forward pass
    assert list(found) == ids

    layer = backbone.last_conv_layer
    for image_id in ids:
        pixels = image_pixels(db, image_id)
        own = float(np.asarray(model(to_model_input(prepare_image(pixels, size)[None], backbone)))[0, 0])
        assert found[image_id].probability == pytest.approx(own, abs=1e-5)
        separate = explain.heatmap_for_image(model, backbone, pixels, size, layer_name=layer)  # one image, one pass
        heat = found[image_id].heatmap
        assert heat.shape == pixels.shape and heat.dtype == np.float32 and heat.max() > 0.5
        assert np.allclose(heat, separate, atol=2e-3)
        assert np.array_equal(heat, stored_map(db, run_id, image_id))  # returned as stored (float16 values)
    assert found[ids[0]].probability != pytest.approx(found[ids[1]].probability, abs=1e-3)  # no mix-up of the two
    assert not np.allclose(found[ids[0]].heatmap, found[ids[1]].heatmap, atol=0.05)
    assert db.execute("SELECT COUNT(*) FROM explanations WHERE run_id = ?", [run_id]).fetchone()[0] == 2
    passes.clear()
    assert np.array_equal(explain.explain_image(db, db_path, run_id, ids[1]), found[ids[1]].heatmap)
    assert passes == []  # now from the cache


def test_explain_images_computes_only_what_is_not_cached(db, db_path, demo_images, monkeypatch):
    size = (64, 32)
    run_id = save_run(db, db_path, resnet_like(size, weight=1.0), image_size=size)
    front, back = demo_images["anterior"], demo_images["posterior"]
    first = explain.explain_image(db, db_path, run_id, front)
    computed = []
    real = explain._explain_per_image

    def recording(model, backbone, images, *args, **kwargs):
        computed.append([image.shape for image in images])
        return real(model, backbone, images, *args, **kwargs)

    monkeypatch.setattr(explain, "_explain_per_image", recording)
    found = explain.explain_images(db, db_path, run_id, [front, back, front])
    assert computed == [[image_pixels(db, back).shape]]  # the cached anterior view was not recomputed
    assert list(found) == [front, back]
    # the cache keeps the probability of the pass that made the map (migration 011)
    stored = db.execute("SELECT probability FROM explanations WHERE run_id = ? AND image_id = ?", [run_id, front]).fetchone()[0]
    assert np.array_equal(found[front].heatmap, first) and found[front].probability == stored and 0.0 < stored < 1.0
    assert found[back].probability is not None and 0.0 < found[back].probability < 1.0

    def no_model(*args, **kwargs):
        raise AssertionError("every map is cached: no model should be loaded")

    monkeypatch.setattr(runs, "load_model", no_model)
    again = explain.explain_images(db, db_path, run_id, [back, front])
    assert np.array_equal(again[back].heatmap, found[back].heatmap) and computed == [[image_pixels(db, back).shape]]
    assert again[back].probability == pytest.approx(found[back].probability)


def test_explain_images_of_a_composite_run_gives_one_probability_per_study(db, db_path, demo_images):
    size = (64, 64)
    run_id = save_run(db, db_path, resnet_like(size, weight=1.0), view_mode="composite", image_size=size)
    model, backbone, _ = runs.load_model(db_path, run_id)
    front, back = demo_images["anterior"], demo_images["posterior"]
    found = explain.explain_images(db, db_path, run_id, [front, back])
    composite = compose_views(image_pixels(db, front), image_pixels(db, back), size)
    own = float(np.asarray(model(to_model_input(composite[None], backbone)))[0, 0])
    assert found[front].probability == found[back].probability == pytest.approx(own, abs=1e-5)
    expected = explain.heatmaps_for_composite(model, backbone, image_pixels(db, front), image_pixels(db, back), size)
    for image_id, heat in zip((front, back), expected, strict=True):
        assert np.allclose(found[image_id].heatmap, heat, atol=2e-3)
        assert np.array_equal(found[image_id].heatmap, stored_map(db, run_id, image_id))


class QuietReporter:
    def __init__(self, cancel_after: int | None = None):
        self.updates, self.cancel_after = [], cancel_after

    def cancelled(self) -> bool:
        return self.cancel_after is not None and len(self.updates) >= self.cancel_after

    def progress(self, fields: dict, force: bool = False) -> None:
        self.updates.append({**fields, "forced": force})


def predicted_run(db, db_path, n_studies: int) -> tuple[int, dict[int, list[int]]]:
    """A finished per-image run whose predictions cover every image of n demo studies; {study: image ids}."""
    ingest.add_demo_studies(db, n_studies, seed=5)
    size = (64, 32)
    run_id = save_run(db, db_path, resnet_like(size, weight=1.0), image_size=size)
    studies: dict[int, list[int]] = {}
    with dbm.write(db):
        for image_id, study_id in db.execute("SELECT id, study_id FROM images ORDER BY id").fetchall():
            studies.setdefault(study_id, []).append(image_id)
            db["predictions"].insert({"run_id": run_id, "image_id": image_id, "subset": "test", "label": 0, "probability": 0.5})
    return run_id, studies


def test_precomputation_explains_one_study_per_pass(db, db_path, monkeypatch):
    run_id, studies = predicted_run(db, db_path, 3)
    calls = []
    real = explain.explain_images

    def recording(db, db_path, run_id, image_ids):
        calls.append(list(image_ids))
        return real(db, db_path, run_id, image_ids)

    monkeypatch.setattr(explain, "explain_images", recording)
    reporter = QuietReporter()
    assert jobs.precompute_explanations(db_path, run_id, reporter) == 6
    assert calls == list(studies.values()) and all(len(ids) == 2 for ids in calls)
    assert [(u["batch"], u["forced"]) for u in reporter.updates] == [(1, False), (2, False), (3, False), (3, True)]
    assert reporter.updates[-1]["batches"] == 3  # where it ended, written past the throttle
    assert db.execute("SELECT COUNT(*) FROM explanations WHERE run_id = ?", [run_id]).fetchone()[0] == 6
    assert jobs.precompute_explanations(db_path, run_id, QuietReporter()) == 0 and len(calls) == 3  # nothing left


def test_precomputation_stops_between_studies(db, db_path):
    run_id, _ = predicted_run(db, db_path, 3)
    stopped = QuietReporter(cancel_after=1)
    assert jobs.precompute_explanations(db_path, run_id, stopped) == 2  # cancelled after one study
    assert (stopped.updates[-1]["batch"], stopped.updates[-1]["batches"], stopped.updates[-1]["forced"]) == (1, 3, True)
    jobs.enqueue(db, "resnet50", {"backbone": "resnet50"}, "another run")
    assert jobs.precompute_explanations(db_path, run_id, QuietReporter()) == 0  # a queued run comes first
    assert db.execute("SELECT COUNT(*) FROM explanations WHERE run_id = ?", [run_id]).fetchone()[0] == 2
