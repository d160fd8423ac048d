"""Dual-view fusion (view mode ``fusion``) and per-view augmentation of composites.

Fusion: one shared backbone over a study's anterior view and its mirrored posterior view,
one output per study; a run stores one study row per study and Grad-CAM maps for both images.
"""

from __future__ import annotations

import numpy as np
import pytest

from bonescan_core import db as dbm
from bonescan_core import errors, explain, jobs, models, preprocess, runs, scintinet, training
from bonescan_core.ingest import add_demo_studies

SMALL = (256, 64)


@pytest.fixture(scope="module")
def keras():
    return models.keras_module()


def _studies(n: int, size: tuple[int, int], seed: int) -> np.ndarray:
    """(n, 2, H, W, 3) float32 random counts: n studies, two views each."""
    return np.random.default_rng(seed).uniform(0.0, 255.0, size=(n, 2, *size, 3)).astype(np.float32)


@pytest.mark.parametrize(("backbone", "size"), [("scintinet", SMALL), ("vgg19", (64, 32))])
def test_a_fusion_model_gives_one_output_per_study_and_reads_both_views(keras, backbone, size):
    model = models.build_model(backbone, "none", size, seed=0, views=2)
    assert tuple(model.input.shape) == (None, 2, *size, 3) and tuple(model.output.shape) == (None, 1)
    x = _studies(3, size, seed=1)
    base = keras.ops.convert_to_numpy(model(x, training=False))[:, 0]
    assert base.shape == (3,)
    for view in (0, 1):  # changing either view of study 0 changes study 0's output, and only that one
        changed = x.copy()
        changed[0, view] = _studies(1, size, seed=2 + view)[0, 0] * 3.0
        out = keras.ops.convert_to_numpy(model(changed, training=False))[:, 0]
        assert abs(out[0] - base[0]) > 1e-6, f"view {view} does not reach the output"
        np.testing.assert_allclose(out[1:], base[1:], rtol=1e-5, atol=1e-6)


def test_fusion_weights_are_shared_by_the_views(keras):
    single = models.build_model("scintinet", "none", SMALL, seed=0)
    fused = models.build_model("scintinet", "none", SMALL, seed=0, views=2)
    # One backbone, not two: fusion adds only the weights that read its one extra reader channel (the other
    # view's contrast), in the stem (5 x 5 x 16), where the channels join the last stage (3 x 3 x 128) and
    # in the evidence map's direct reader path (1).
    extra = 5 * 5 * scintinet.STEM[0] + 3 * 3 * scintinet.STAGES[-1][0] + 1
    assert fused.count_params() == single.count_params() + extra
    plain = [scintinet.build(SMALL, seed=0, views=views, reader=False).count_params() for views in (1, 2)]
    assert plain[0] == plain[1]


def test_fusion_views_mirror_the_posterior_view():
    anterior = np.zeros((64, 32), dtype=np.float32)
    anterior[10, 3] = 5.0
    posterior = anterior.copy()
    pair = preprocess.fusion_views(anterior, posterior, (64, 32))
    assert pair.shape == (2, 64, 32)
    assert pair[0, 10, 3] == 1.0 and pair[1, 10, 32 - 1 - 3] == 1.0 and pair[1, 10, 3] == 0.0
    blank = preprocess.fusion_views(anterior, None, (64, 32))
    assert not blank[1].any()


def test_composite_augmentation_never_swaps_the_anterior_and_posterior_halves(keras):
    height, width = 32, 64
    frame_in = keras.Input((height, width, 3))
    identity = keras.Model(frame_in, frame_in)  # shows what the pipeline feeds a model
    wrapped = preprocess.with_input_pipeline(identity, "scintinet", preprocess.make_augmenter({"flip_horizontal": True}, seed=0),
                                             "composite")
    grey = np.zeros((32, height, width, 1), dtype=np.float32)
    grey[:, :, :8] = 1.0  # a mark at the outer edge of the anterior (left) half
    seen = keras.ops.convert_to_numpy(wrapped(grey, training=True))[..., 0]
    left, right = seen[:, :, : width // 2], seen[:, :, width // 2 :]
    assert (left.sum(axis=(1, 2)) > 0).all() and not right.any(), "a flip moved the anterior view into the posterior half"
    flipped = left[:, :, 24:].sum(axis=(1, 2)) > 0  # mirrored inside its own half
    assert flipped.any() and not flipped.all()


def test_fusion_is_refused_in_fast_mode_and_is_scintinets_default():
    with pytest.raises(errors.InputError, match="fusion"):
        training.TrainConfig(backbone="resnet50", weights="none", mode="fast", view_mode="fusion")
    assert training.TrainConfig(backbone="scintinet").view_mode == "fusion"
    assert training.TrainConfig(backbone="resnet50").view_mode == "per_image"


@pytest.fixture(scope="module")
def fusion_run(tmp_path_factory):
    """12 demo studies, one scintinet fusion run (256 x 64, 1 epoch) done by the worker."""
    db_path = tmp_path_factory.mktemp("fusion") / "labels.db"
    with dbm.opened(db_path) as db:
        add_demo_studies(db, 12, seed=0)
        config = training.TrainConfig(backbone="scintinet", epochs=1, batch_size=4, image_size=SMALL, augment={})
        assert config.view_mode == "fusion"
        run_id = jobs.enqueue(db, config.backbone, config.to_dict(), config.identity_hash())
    jobs.run_worker(db_path, once=True, echo=lambda line: None)
    return db_path, run_id


def test_a_fusion_run_stores_one_study_row_per_study_and_maps_for_both_views(fusion_run):
    db_path, run_id = fusion_run
    with dbm.opened(db_path) as db:
        run = runs.get(db, run_id)
        assert run.status == "done", run.error
        assert run.results.facts["sample_unit"] == "study"
        rows = runs.study_predictions(db, run_id)
        stored = db.execute("SELECT COUNT(*), COUNT(DISTINCT study_id) FROM study_predictions WHERE run_id = ?", [run_id]).fetchone()
        images = runs.predictions(db, run_id)
        assert stored[0] == stored[1] == len(rows["study_id"]) == run.results.facts["n_val"] + run.results.facts["n_test"]
        assert set(rows["subset"]) == {"val", "test"}
        # Each image carries its study's one probability.
        by_study = dict(zip(rows["study_id"], rows["probability"], strict=True))
        for study_id, probability in zip(images["study_id"], images["probability"], strict=True):
            assert probability == pytest.approx(by_study[study_id])
        test_study = int(rows["study_id"][list(rows["subset"]).index("test")])
        ids = [row[0] for row in db.execute("SELECT id FROM images WHERE study_id = ? ORDER BY id", [test_study])]
        assert len(ids) == 2
        assert db.execute(f"SELECT COUNT(*) FROM explanations WHERE run_id = ? AND image_id IN ({ids[0]}, {ids[1]})",
                          [run_id]).fetchone()[0] == 2  # the worker explained both views
        db.execute("DELETE FROM explanations WHERE run_id = ?", [run_id])
        db.conn.commit()
        explained = explain.explain_images(db, db_path, run_id, ids)
        for image_id in ids:
            h, w = db.execute("SELECT height, width FROM images WHERE id = ?", [image_id]).fetchone()
            assert explained[image_id].heatmap.shape == (h, w)
            assert explained[image_id].probability == pytest.approx(by_study[test_study], abs=1e-4)
