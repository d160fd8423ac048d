"""Pre-processing: min-max, aspect-keeping resize, views, model input, augmentation, batches from the database."""

from __future__ import annotations

import numpy as np
import pytest

from bonescan_core import catalog, preprocess
from bonescan_core.ingest import add_demo_studies

SIZE = (64, 32)


def test_minmax_range_and_constant_image():
    counts = np.array([[5, 10], [15, 25]], dtype=np.uint16)
    scaled = preprocess.minmax(counts)
    assert scaled.dtype == np.float32
    assert scaled.min() == 0.0 and scaled.max() == 1.0
    assert scaled[0, 1] == pytest.approx(0.25)
    assert not preprocess.minmax(np.full((3, 3), 7, dtype=np.int16)).any()
    signed = preprocess.minmax(np.array([[-100.0, 0.0], [100.0, np.nan]]))
    assert np.isfinite(signed).all() and signed.max() == 1.0


def test_fit_keeps_the_aspect_ratio_by_padding():
    tall = np.ones((100, 25), dtype=np.float32)  # aspect 4:1 into a 2:1 frame: pad left and right
    fitted = preprocess.fit_to(tall, SIZE)
    assert fitted.shape == SIZE and fitted.dtype == np.float32
    top, left, height, width = preprocess.content_box(tall.shape, SIZE)
    assert (top, height, width) == (0, 64, 16) and left == 8
    columns = np.flatnonzero(fitted.max(axis=0) > 0)
    assert columns.min() == 8 and columns.max() == 23, "content is 16 px wide (not stretched to 32)"
    assert not fitted[:, :8].any() and not fitted[:, 24:].any(), "padding is zero"
    np.testing.assert_allclose(fitted[:, 8:24], 1.0)

    wide = np.ones((10, 40), dtype=np.float32)  # wider than the frame: pad top and bottom
    fitted = preprocess.fit_to(wide, SIZE)
    rows = np.flatnonzero(fitted.max(axis=1) > 0)
    assert len(rows) == 8 and rows.min() == 28  # 10 * 32/40 = 8 rows, centred

    # A round blob stays round: equal extent in both axes after resizing.
    yy, xx = np.mgrid[0:400, 0:100]
    blob = (((yy - 200) ** 2 + (xx - 50) ** 2) < 30**2).astype(np.float32)
    fitted = preprocess.fit_to(blob, SIZE)
    mask = fitted > 0.5
    assert abs(int(mask.any(axis=0).sum()) - int(mask.any(axis=1).sum())) <= 1


def test_prepare_image_of_a_phantom_sized_scan():
    counts = np.random.default_rng(0).poisson(50, size=(1024, 256)).astype(np.uint16)
    image = preprocess.prepare_image(counts, (646, 220))
    assert image.shape == (646, 220)
    assert 0.0 <= image.min() and image.max() <= 1.0
    top, left, height, width = preprocess.content_box((1024, 256), (646, 220))
    assert (height, width) == (646, 162) and not image[:, :left].any()


def test_composite_puts_each_view_in_its_half():
    anterior = np.zeros((100, 50), dtype=np.float32)
    anterior[:, 25:] = 1.0  # right half of the view hot
    posterior = np.zeros((100, 50), dtype=np.float32)
    posterior[:50] = 1.0  # top half of the view hot
    composite = preprocess.compose_views(anterior, posterior, SIZE)
    assert composite.shape == SIZE
    left, right = composite[:, :16], composite[:, 16:]
    top, pad, height, width = preprocess.content_box((100, 50), (64, 16))
    assert (top, height, width) == (16, 32, 16)  # each view fitted into its 64 x 16 half, padded above and below
    assert not left[:top].any() and not right[top + height :].any()
    assert left[top : top + height, 10:].min() > 0.9 and left[top : top + height, :6].max() < 0.1
    assert right[top : top + 14].min() > 0.9 and right[top + 18 : top + height].max() < 0.1
    blank = preprocess.compose_views(anterior, None, SIZE)
    assert not blank[:, 16:].any()


def test_model_input_scales_to_255_and_applies_preprocess_input():
    grey = np.zeros((2, *SIZE), dtype=np.float16)
    grey[1] = 1.0
    x = preprocess.to_model_input(grey, "vgg19")
    assert x.shape == (2, *SIZE, 3) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, 0, 0], [-103.939, -116.779, -123.68], atol=1e-3)  # caffe: BGR minus mean
    np.testing.assert_allclose(x[1, 0, 0], [255 - 103.939, 255 - 116.779, 255 - 123.68], atol=1e-3)
    dense = preprocess.to_model_input(grey[:, :, :, None], "densenet121")
    np.testing.assert_allclose(dense[1, 0, 0], [(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225], atol=1e-3)


def test_augmentation_changes_training_batches_only():
    assert set(preprocess.PAPER_AUGMENT) == {"flip_horizontal", "rotation_degrees", "zoom", "translation", "shear"}
    augmenter = preprocess.make_augmenter(preprocess.PAPER_AUGMENT, seed=0)
    names = [layer.name for layer in augmenter.layers]
    assert names == ["flip", "rotation", "zoom", "translation", "shear"]
    images = np.zeros((4, *SIZE), dtype=np.float32)
    images[:, 10:50, 4:12] = 1.0  # an off-centre bar: any flip or shift moves it
    x = images[..., None]
    np.testing.assert_array_equal(np.asarray(augmenter(x, training=False)), x)
    changed = np.asarray(augmenter(x, training=True))
    assert changed.shape == x.shape and not np.allclose(changed, x)
    assert changed.min() >= 0.0 and changed[:, :2, :2].max() == 0.0  # fill is 0 (no counts), not reflected

    labels = np.array([0, 1, 0, 1])
    plain = preprocess.image_batches(images, labels, 4)  # grey batches: augmentation happens in the model's step
    np.testing.assert_array_equal(plain[0][0], images[..., None])

    assert preprocess.make_augmenter({}) is None and preprocess.make_augmenter(None) is None
    assert preprocess.make_augmenter({"zoom": 0, "flip_horizontal": False}) is None
    with pytest.raises(ValueError, match="unknown augmentation"):
        preprocess.make_augmenter({"elastic": 1.0})


def test_input_pipeline_runs_augmentation_and_scaling_inside_the_model():
    from bonescan_core import models

    images = np.zeros((4, *SIZE), dtype=np.float32)
    images[:, 10:50, 4:12] = 1.0
    model = models.build_model("vgg19", "none", SIZE, seed=0)
    wrapped = preprocess.with_input_pipeline(model, "vgg19", preprocess.make_augmenter(preprocess.PAPER_AUGMENT, seed=0))
    assert wrapped.input_shape == (None, *SIZE, 1)
    assert {id(w) for w in model.weights} <= {id(w) for w in wrapped.weights}, "the wrapper shares the model's weights"
    direct = np.asarray(model(preprocess.to_model_input(images, "vgg19"), training=False))
    np.testing.assert_allclose(np.asarray(wrapped(images[..., None], training=False)), direct, rtol=1e-5, atol=1e-6)
    plain = preprocess.with_input_pipeline(model, "vgg19")
    assert "augment" not in [layer.name for layer in plain.layers]
    augmented = wrapped.get_layer("augment")(images[..., None], training=True)
    assert not np.allclose(np.asarray(augmented), images[..., None]), "training=True augments inside the graph"


def test_batches_shuffle_by_seed_cover_every_sample_and_carry_class_weights():
    images = np.stack([np.full(SIZE, i / 10, dtype=np.float16) for i in range(10)])
    labels = np.array([0] * 6 + [1] * 4)
    weights = {0: 10 / 12, 1: 10 / 8}

    def epoch_order(seed):
        batches = preprocess.image_batches(images, labels, 4, rng=np.random.default_rng(seed), class_weights=weights)
        assert len(batches) == 3
        seen = [batches.batch_indices(i) for i in range(len(batches))]
        x, y, w = batches[2]
        assert x.shape == (2, *SIZE, 1) and y.shape == (2, 1) and w.shape == (2,)
        np.testing.assert_allclose(w, [weights[int(v)] for v in y[:, 0]])
        return np.concatenate(seen), batches

    first, batches = epoch_order(1)
    assert sorted(first.tolist()) == list(range(10))
    assert np.array_equal(first, epoch_order(1)[0]) and not np.array_equal(first, epoch_order(2)[0])
    batches.on_epoch_end()
    reshuffled = np.concatenate([batches.batch_indices(i) for i in range(3)])
    assert sorted(reshuffled.tolist()) == list(range(10)) and not np.array_equal(reshuffled, first)


def test_samples_and_images_from_the_database(db):
    add_demo_studies(db, 3, seed=11)
    study_ids = [row[0] for row in db.execute("SELECT id FROM studies ORDER BY id").fetchall()]
    labels = {sid: i % 2 for i, sid in enumerate(study_ids)}

    per_image = preprocess.list_samples(db, labels, "per_image")
    assert len(per_image) == 6 and all(len(s.image_ids) == 1 for s in per_image)
    assert [s.label for s in per_image] == [0, 0, 1, 1, 0, 0]
    images = preprocess.load_images(db, per_image, SIZE)
    assert images.shape == (6, *SIZE) and images.dtype == np.float16
    # Min-max comes before the (antialiased) shrink, so the hottest pixel may average below 1.
    assert images.min() >= 0 and 0.5 < images.max() <= 1.0
    np.testing.assert_allclose(images[0], preprocess.prepare_image(catalog.image_pixels(db, per_image[0].key), SIZE), atol=1e-3)

    composite = preprocess.list_samples(db, labels, "composite")
    assert len(composite) == 3 and all(s.views == ("anterior", "posterior") for s in composite)
    views = dict(db.execute("SELECT id, view FROM images").fetchall())
    assert [views[i] for i in composite[0].image_ids] == ["anterior", "posterior"]
    assert set(composite[0].image_ids) == {per_image[0].key, per_image[1].key}
    both = preprocess.load_images(db, composite, SIZE, "composite")
    assert both.shape == (3, *SIZE)
    for index, sample in enumerate(composite):  # each half normalised and fitted on its own
        anterior, posterior = (catalog.image_pixels(db, i) for i in sample.image_ids)
        np.testing.assert_allclose(both[index], preprocess.compose_views(anterior, posterior, SIZE), atol=1e-3)

    with pytest.raises(ValueError, match="view mode"):
        preprocess.list_samples(db, labels, "stacked")
    with pytest.raises(InterruptedError):
        preprocess.load_images(db, per_image, SIZE, cancelled=lambda: True)


@pytest.mark.parametrize("backbone", ["resnet50", "vgg19", "densenet121"])
def test_model_input_equals_the_backbones_own_preprocess_input(backbone):
    """The in-graph model_input (through to_model_input) is the backbone's preprocess_input on the grey image repeated on R, G, B."""
    from bonescan_core.models import get_backbone

    grey = np.random.default_rng(1).random((2, *SIZE, 1), dtype=np.float32)
    expected = get_backbone(backbone).preprocess_input(np.repeat(grey * 255.0, 3, axis=-1))
    np.testing.assert_allclose(preprocess.to_model_input(grey, backbone), expected, rtol=1e-5, atol=1e-4)
