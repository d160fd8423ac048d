"""scintinet: size and shape of the network, its in-model intensity scaling, its defaults, and a
tiny run through the app's own path (queue → worker → predictions → Grad-CAM)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from bonescan_core import cli, errors, explain, jobs, models, preprocess, runs, scintinet, training
from bonescan_core import db as dbm
from bonescan_core.ingest import add_demo_studies

SMALL = (256, 64)


@pytest.fixture(scope="module")
def keras():
    return models.keras_module()


def counts(n: int, size: tuple[int, int], seed: int) -> np.ndarray:
    """(n, H, W, 3) float32 Poisson counts: a dim body, bright 'bone' stripe, one hot spot, grey on 3 channels."""
    rng = np.random.default_rng(seed)
    height, width = size
    rate = np.full(size, 2.0)
    rate[:, width // 3 : 2 * width // 3] = 40.0
    images = []
    for _ in range(n):
        local = rate.copy()
        row, col = rng.integers(10, height - 10), rng.integers(width // 3, 2 * width // 3)
        local[row - 2 : row + 3, col - 2 : col + 3] *= rng.uniform(1.5, 4.0)
        images.append(rng.poisson(local).astype(np.float32))
    return np.repeat(np.stack(images)[..., None], 3, axis=-1)


def test_full_size_network_is_small_fully_convolutional_and_has_no_normalisation_layer(keras):
    model = models.build_model("scintinet", "none", scintinet.DEFAULT_SIZE, seed=0)  # built, never trained
    assert model.count_params() <= 2_000_000
    assert tuple(model.input.shape) == (None, 1024, 256, 3) and tuple(model.output.shape) == (None, 1)
    assert not any(isinstance(layer, (keras.layers.BatchNormalization, keras.layers.Dense)) for layer in model.layers[:-1])
    # No normalisation layer at all: GroupNorm let the network read image-wide statistics anywhere.
    assert not any(isinstance(layer, (keras.layers.GroupNormalization, keras.layers.LayerNormalization)) for layer in model.layers)
    # The lesion-evidence map: one logit per place on the stride-16 grid, read from the Grad-CAM layer.
    bb = models.BACKBONES["scintinet"]
    assert tuple(model.get_layer(bb.last_conv_layer).output.shape) == (None, 64, 16, bb.n_features)
    assert tuple(model.get_layer("evidence").output.shape) == (None, 64, 16, 1)


def test_output_shape_dtype_range_and_the_pooled_evidence(keras):
    model = models.build_model("scintinet", "none", SMALL, seed=0)
    x = counts(3, SMALL, seed=1)
    p = keras.ops.convert_to_numpy(model(x, training=False))
    assert p.shape == (3, 1) and p.dtype == np.float32
    assert np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()
    # The image's logit is a smooth maximum of its evidence map (log-sum-exp), between mean and max.
    probe = keras.Model(model.input, [model.get_layer("evidence").output, model.get_layer("head_pool").output])
    evidence, pooled = (keras.ops.convert_to_numpy(t) for t in probe(x, training=False))
    s = evidence.reshape(3, -1).astype(np.float64)
    r = scintinet.SHARPNESS
    expected = (np.log(np.exp(r * (s - s.max(1, keepdims=True))).sum(1)) + r * s.max(1) - np.log(s.shape[1])) / r
    np.testing.assert_allclose(pooled[:, 0], expected, rtol=1e-4, atol=1e-4)
    assert (s.mean(1) <= pooled[:, 0] + 1e-5).all() and (pooled[:, 0] <= s.max(1) + 1e-5).all()
    assert (pooled[:, 0] >= s.max(1) - np.log(s.shape[1]) / r - 1e-5).all()


def test_robust_scale_divides_by_the_percentile_and_clips(keras):
    x = counts(2, SMALL, seed=2)
    x[1, 5, 5] = 1e6  # one absurd pixel changes the maximum, not the percentile
    scaled = keras.ops.convert_to_numpy(scintinet.robust_scale(keras.ops.convert_to_tensor(x)))
    assert scaled.shape == (2, *SMALL, 1) and scaled.dtype == np.float32
    for i in range(2):
        grid = x[i, :: scintinet.SAMPLE, :: scintinet.SAMPLE, 0].ravel()
        k = math.ceil(grid.size * (100 - scintinet.PERCENTILE) / 100)
        reference = np.sort(grid)[-k]
        expected = np.clip(x[i, ..., 0] / reference, 0.0, scintinet.CLIP)
        np.testing.assert_allclose(scaled[i, ..., 0], expected, rtol=1e-5)
    assert scaled.max() == pytest.approx(scintinet.CLIP)
    zero = keras.ops.convert_to_numpy(scintinet.robust_scale(keras.ops.zeros((1, 64, 64, 3))))
    assert np.isfinite(zero).all() and not zero.any()


def test_the_model_takes_raw_counts_at_any_scale(keras):
    model = models.build_model("scintinet", "none", SMALL, seed=3)
    x = counts(4, SMALL, seed=4)
    reference = keras.ops.convert_to_numpy(model(x, training=False))
    for factor in (1e-4, 0.37, 255.0 / x.max(), 1e3):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(model(x * factor, training=False)), reference, atol=2e-5)


def test_defaults_are_the_backbones_own_and_nonsense_is_refused(keras):
    parser = cli.build_parser()
    config = cli.train_config(parser.parse_args(["train", "--backbone", "scintinet"]))
    assert (config.weights, config.mode, config.image_size) == ("none", "full", (1024, 256))
    assert (config.view_mode, config.augment, config.patience) == ("fusion", {}, 10)
    resnet = cli.train_config(parser.parse_args(["train", "--backbone", "resnet50"]))
    assert (resnet.weights, resnet.mode, resnet.image_size) == ("imagenet", "finetune", models.DEFAULT_SIZE)
    assert (resnet.view_mode, resnet.augment, resnet.patience) == ("per_image", preprocess.PAPER_AUGMENT, 5)
    assert training.TrainConfig(backbone="scintinet").to_dict() == config.to_dict()

    for mode in ("fast", "head", "finetune"):
        with pytest.raises(errors.InputError, match="only in mode full"):
            training.TrainConfig(backbone="scintinet", mode=mode)
    with pytest.raises(errors.InputError, match="no ImageNet weights"):
        training.TrainConfig(backbone="scintinet", weights="imagenet")
    with pytest.raises(errors.InputError, match="no ImageNet weights"):
        models.build_model("scintinet", "imagenet", SMALL)
    model = models.build_model("scintinet", "none", SMALL)
    with pytest.raises(errors.InputError, match="--mode full"):
        models.freeze_for(model, "finetune", "scintinet")
    models.freeze_for(model, "full", "scintinet")
    assert all(layer.trainable for layer in model.layers)


def test_weights_file_round_trip_and_a_foreign_file_is_refused(tmp_path, keras):
    model = models.build_model("scintinet", "none", SMALL, seed=5)
    model.save_weights(tmp_path / "scintinet.weights.h5")
    again = models.build_model("scintinet", str(tmp_path / "scintinet.weights.h5"), SMALL, seed=6)
    x = counts(2, SMALL, seed=7)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(again(x)), keras.ops.convert_to_numpy(model(x)), atol=1e-6)
    models.build_model("vgg19", "none", (64, 32)).save_weights(tmp_path / "vgg19.weights.h5")
    with pytest.raises(models.WeightsIncompatible, match="scintinet"):
        models.build_model("scintinet", str(tmp_path / "vgg19.weights.h5"), SMALL)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> tuple[Path, int]:
    """20 demo studies, one scintinet run (256x64, 2 epochs, its defaults otherwise) done by the worker."""
    folder = tmp_path_factory.mktemp("scintinet")
    db_path = folder / "labels.db"
    with dbm.opened(db_path) as db:
        add_demo_studies(db, 20, seed=0)
        config = training.TrainConfig(backbone="scintinet", epochs=2, batch_size=8, image_size=SMALL)
        run_id = jobs.enqueue(db, config.backbone, config.to_dict(), config.identity_hash())
    jobs.run_worker(db_path, once=True, echo=lambda line: None)
    return db_path, run_id


def test_a_tiny_run_through_the_worker_gives_varied_predictions(trained_run):
    db_path, run_id = trained_run
    with dbm.opened(db_path) as db:
        run = runs.get(db, run_id)
        assert run.status == "done", run.error
        assert (run.settings.mode, run.settings.weights) == ("full", "none")
        p = np.array([row[0] for row in db.execute("SELECT probability FROM predictions WHERE run_id = ?", [run_id])])
    assert len(p) >= 10 and np.isfinite(p).all()
    assert p.std() > 1e-4, f"constant predictions: {p}"


def test_gradcam_explains_its_images(trained_run, tmp_path):
    db_path, run_id = trained_run
    copy = tmp_path / "labels.db"  # a copy: this test clears cached maps
    shutil.copy(db_path, copy)
    shutil.copytree(db_path.parent / "runs", tmp_path / "runs")
    with dbm.opened(copy) as db:
        assert db.execute("SELECT COUNT(*) FROM explanations WHERE run_id = ?", [run_id]).fetchone()[0] > 0  # the worker's
        stored = dict(db.execute("SELECT image_id, probability FROM predictions WHERE run_id = ? AND subset = 'test' "
                                 "ORDER BY image_id LIMIT 3", [run_id]).fetchall())
        db.execute("DELETE FROM explanations WHERE run_id = ?", [run_id])
        db.conn.commit()
        explained = explain.explain_images(db, copy, run_id, list(stored))
        shapes = {i: db.execute("SELECT height, width FROM images WHERE id = ?", [i]).fetchone() for i in stored}
    for image_id, result in explained.items():
        assert result.heatmap.shape == tuple(shapes[image_id])
        assert np.isfinite(result.heatmap).all() and 0.0 <= result.heatmap.min() <= result.heatmap.max() <= 1.0
        assert result.probability == pytest.approx(stored[image_id], abs=1e-4)


def spot_scan(size: tuple[int, int], spots: list[tuple[int, int]], factor: float = 3.0) -> np.ndarray:
    """(H, W) float32 noise-free rates: dim body 2, a 'bone' stripe at 40 (a third of the width), 3 x 3 spots on it."""
    height, width = size
    rate = np.full(size, 2.0, np.float32)
    rate[:, width // 3 : 2 * width // 3] = 40.0
    for row, col in spots:
        rate[row - 1 : row + 2, col - 1 : col + 2] *= factor
    return rate


def channels_of(keras, images: np.ndarray, views: int = 1) -> np.ndarray:
    """scintinet's reader channels of (N, H, W) counts, as NumPy."""
    x = keras.ops.convert_to_tensor(np.repeat(images[..., None], 3, axis=-1))
    return keras.ops.convert_to_numpy(scintinet.reader_channels(scintinet.robust_scale(x), views=views))


def test_reader_channels_peak_on_a_focus_over_its_bone_and_ignore_scale(keras):
    spot = (100, 26)  # on the stripe, left of the centre column: its mirror place (100, 37) is plain bone
    one = spot_scan(SMALL, [spot])
    pair = spot_scan(SMALL, [spot, (100, SMALL[1] - 1 - spot[1])])  # the same focus on both sides
    ch = channels_of(keras, np.stack([one, pair]))
    assert ch.shape == (2, *SMALL, 4) and ch.dtype == np.float32
    bone = np.ones(SMALL, bool)
    bone[:, : SMALL[1] // 3 + 3] = bone[:, 2 * SMALL[1] // 3 - 3 :] = False
    bone[90:111] = False
    for c in (1, 2):  # both point contrasts: a clear peak at the focus (the small ring: at its centre), ~1 on bone
        peak = np.unravel_index(ch[0, ..., c].argmax(), SMALL)
        assert peak == spot if c == 1 else max(abs(peak[0] - spot[0]), abs(peak[1] - spot[1])) <= 1
        assert ch[0, spot[0], spot[1], c] > 2.5
        assert 0.8 < np.median(ch[0, ..., c][bone]) < 1.1 and ch[0, ..., c][bone].max() < 1.2
    # Asymmetry: a one-sided focus stands out; the same focus mirrored on the other side does not.
    assert ch[0, spot[0], spot[1], 3] > 1.5
    assert ch[1, spot[0], spot[1], 3] < 0.1 and ch[1, ..., 3].max() < 0.1
    # Raw counts at any scale: the same channels (the intensity scaling comes first).
    for factor in (1e-3, 7.0, 1e3):
        np.testing.assert_allclose(channels_of(keras, np.stack([one, pair]) * factor), ch, rtol=1e-4, atol=1e-5)


def test_fusion_reader_channel_sees_the_other_view_at_the_same_place(keras):
    spot = (100, 26)
    both = [spot_scan(SMALL, [spot]), spot_scan(SMALL, [spot], factor=2.0)]  # the far view: a fainter focus
    near_only = [spot_scan(SMALL, [spot]), spot_scan(SMALL, [])]
    ch = channels_of(keras, np.stack(both + near_only), views=2)  # two studies, (anterior, mirrored posterior) rows
    assert ch.shape == (4, *SMALL, 5)
    np.testing.assert_allclose(ch[:, ..., :4], channels_of(keras, np.stack(both + near_only))[..., :4], rtol=1e-6)
    assert ch[0, spot[0], spot[1], 4] > 1.7  # the far view's focus, seen from the near view
    assert ch[1, spot[0], spot[1], 4] > 2.5  # and the other way round
    assert ch[2, spot[0], spot[1], 4] < 1.2  # no focus in the other view: plain bone there


@pytest.mark.parametrize("views", [1, 2])
def test_the_model_with_reader_channels_saves_and_loads_in_safe_mode(tmp_path, keras, views):
    model = scintinet.build(SMALL, seed=8, views=views)
    assert model.get_layer("reader_skip") is not None and model.count_params() <= 2_000_000
    path = tmp_path / "scintinet.keras"
    model.save(path)
    again = keras.saving.load_model(path, compile=False, safe_mode=True)
    x = counts(2 * views, SMALL, seed=9)
    x = x if views == 1 else x.reshape(2, 2, *SMALL, 3)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(again(x, training=False)),
                               keras.ops.convert_to_numpy(model(x, training=False)), atol=1e-6)


def test_a_per_image_scintinet_exports_as_a_standalone_model(tmp_path, keras):
    from bonescan_core import bundle
    from bonescan_core.bundle import bonescan_layers  # noqa: F401  # registers the bundle's layers

    model = models.build_model("scintinet", "none", SMALL, seed=10)
    standalone = bundle.standalone_model(model, "scintinet", "per_image", "full")
    standalone.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras", compile=False, safe_mode=True)
    image = counts(1, (300, 80), seed=11)[..., :1]  # raw counts of another size: fitted in the graph
    grey = preprocess.prepare_image(image[0, ..., 0], SMALL).astype(np.float16).astype(np.float32)
    app = keras.ops.convert_to_numpy(model(preprocess.to_model_input(grey[None], "scintinet"), training=False))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(image, training=False)), app, atol=1e-5)
