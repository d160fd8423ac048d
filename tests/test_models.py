"""Backbones: registry facts checked against Keras, flat graphs, freezing, head transplant, weights."""

from __future__ import annotations

import numpy as np
import pytest

from bonescan_core import heavy, models

SIZE = (64, 32)  # the smallest useful input: fast on 2 CPU cores


@pytest.fixture(scope="module")
def keras():
    return heavy.keras_module()


@pytest.fixture(scope="module")
def built():
    """One model per backbone (weights none), built once for the module's read-only checks."""
    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = models.build_model(name, "none", SIZE, dropout=0.2, seed=0)
        return cache[name]

    return get


def ancestors(tensor) -> set[str]:
    """Names of every layer the tensor depends on (walks Keras's functional graph)."""
    seen: set[str] = set()
    stack = [tensor]
    while stack:
        operation, node_index, _ = stack.pop()._keras_history
        if operation.name in seen:
            continue
        seen.add(operation.name)
        stack.extend(operation._inbound_nodes[node_index].input_tensors)
    return seen


def test_registry_matches_keras_files_and_urls():
    from keras.src.applications import densenet, resnet, vgg19

    assert set(models.BACKBONES) == {"resnet50", "vgg19", "densenet121", "scintinet"}
    assert [name for name, bb in models.BACKBONES.items() if not bb.has_imagenet] == ["scintinet"]  # from scratch only
    assert models.BACKBONES["resnet50"].imagenet_url == resnet.BASE_WEIGHTS_PATH + models.BACKBONES["resnet50"].imagenet_file
    assert models.BACKBONES["vgg19"].imagenet_url == vgg19.WEIGHTS_PATH_NO_TOP
    assert models.BACKBONES["densenet121"].imagenet_url == densenet.DENSENET121_WEIGHT_PATH_NO_TOP
    for backbone in (bb for bb in models.BACKBONES.values() if bb.has_imagenet):
        assert backbone.imagenet_url.endswith("/" + backbone.imagenet_file)
        assert backbone.imagenet_file.endswith("_notop.h5")
    with pytest.raises(ValueError, match="resnet50"):
        models.get_backbone("alexnet")


def test_preprocess_input_is_each_backbones_own():
    rgb = np.full((1, 4, 4, 3), 255.0, dtype=np.float32)
    caffe = models.BACKBONES["resnet50"].preprocess_input(rgb.copy())
    torch = models.BACKBONES["densenet121"].preprocess_input(rgb.copy())
    assert caffe[0, 0, 0].tolist() == pytest.approx([255 - 103.939, 255 - 116.779, 255 - 123.68], abs=1e-3)  # BGR, mean off
    assert torch[0, 0, 0].tolist() == pytest.approx([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225], abs=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(models.BACKBONES))
def test_each_backbone_is_one_flat_graph_and_trains_a_step(name, keras, built):
    backbone = models.BACKBONES[name]
    model = built(name)
    assert tuple(model.input.shape) == (None, *SIZE, 3)
    assert tuple(model.output.shape) == (None, 1)
    assert not any(isinstance(layer, keras.Model) for layer in model.layers), "a nested model hides the conv layers"
    conv = model.get_layer(backbone.last_conv_layer)
    assert backbone.last_conv_layer in ancestors(model.output)
    assert conv.output.shape[-1] == backbone.n_features
    assert model.get_layer("head_dense").dtype_policy.compute_dtype == "float32"
    grad_model = keras.Model(model.input, [conv.output, model.output])  # what Grad-CAM builds
    x = np.random.default_rng(0).normal(size=(4, *SIZE, 3)).astype(np.float32)
    feature_map, probability = grad_model(x)
    assert feature_map.shape[0] == 4 and probability.shape == (4, 1)

    # One training step. TensorFlow: eager (tracing ResNet/DenseNet graphs takes 30-50 s on 2 cores);
    # JAX: compiled (its eager gradients of DenseNet take minutes).
    trained = models.build_model(name, "none", SIZE, dropout=0.2, seed=1)
    models.freeze_for(trained, "full", backbone)
    eager = keras.backend.backend() == "tensorflow"
    trained.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy", run_eagerly=eager)
    before = [np.array(w) for w in trained.get_layer("head_dense").get_weights()]
    loss = trained.train_on_batch(x, np.array([[0], [1], [0], [1]], dtype=np.float32))
    after = trained.get_layer("head_dense").get_weights()
    assert np.isfinite(float(np.asarray(loss).reshape(-1)[0]))
    assert not np.allclose(before[0], after[0])


@pytest.mark.parametrize("name", ["resnet50", "vgg19", "densenet121"])
def test_freeze_for_each_mode(name, keras, built):
    backbone = models.BACKBONES[name]
    model = built(name)
    layers = models.backbone_layers(model)
    names = [layer.name for layer in layers]
    start = names.index(backbone.finetune_from)
    head = [model.get_layer(n) for n in models.HEAD_LAYERS]

    for mode in ("fast", "head", "finetune"):
        models.freeze_for(model, mode, backbone)  # finetune's first phase is the head phase
        assert not any(layer.trainable for layer in layers)
        assert all(layer.trainable for layer in head)
        assert len(model.trainable_weights) == 2  # the Dense kernel and bias

    models.freeze_for(model, "finetune", backbone, phase="finetune")
    is_bn = [isinstance(layer, keras.layers.BatchNormalization) for layer in layers]
    assert not any(layer.trainable for layer, bn in zip(layers, is_bn, strict=True) if bn), "BatchNorm must stay frozen"
    assert all(layer.trainable for layer, bn in zip(layers[start:], is_bn[start:], strict=True) if not bn)
    assert not any(layer.trainable for layer in layers[:start])
    assert 2 < len(model.trainable_weights) < len(model.weights)

    models.freeze_for(model, "full", backbone)
    assert all(layer.trainable for layer in layers)
    with pytest.raises(ValueError, match="mode"):
        models.freeze_for(model, "sometimes", backbone)


def test_fast_mode_head_transplants_into_the_full_model(keras):
    model = models.build_model("vgg19", "none", SIZE, dropout=0.3, seed=0)
    extractor = models.features_of(model)
    head = models.head_model(models.BACKBONES["vgg19"].n_features, dropout=0.3, seed=5)
    x = np.random.default_rng(1).normal(size=(3, *SIZE, 3)).astype(np.float32)
    features = np.asarray(extractor(x, training=False))
    assert features.shape == (3, 512)
    models.transplant_head(head, model)
    np.testing.assert_allclose(np.asarray(model(x, training=False)), np.asarray(head(features, training=False)), rtol=1e-4, atol=1e-6)
    standalone = models.feature_extractor("vgg19", "none", SIZE, seed=0)
    assert tuple(standalone.output.shape) == (None, 512)


def test_weights_from_files(tmp_path, keras):
    model = models.build_model("vgg19", "none", SIZE, seed=3)
    x = np.random.default_rng(2).normal(size=(2, *SIZE, 3)).astype(np.float32)
    whole = tmp_path / "run.weights.h5"
    model.save_weights(whole)
    again = models.build_model("vgg19", whole, SIZE, seed=99)
    np.testing.assert_allclose(np.asarray(again(x)), np.asarray(model(x)), rtol=1e-5)

    saved = tmp_path / "model.keras"
    model.save(saved)
    from_keras = models.build_model("vgg19", saved, SIZE, seed=98)
    np.testing.assert_allclose(np.asarray(from_keras(x)), np.asarray(model(x)), rtol=1e-5)

    base = keras.applications.VGG19(include_top=False, weights=None, input_shape=(*SIZE, 3))
    backbone_only = tmp_path / "vgg19-backbone.weights.h5"
    base.save_weights(backbone_only)
    loaded = models.build_model("vgg19", backbone_only, SIZE, seed=97)
    np.testing.assert_array_equal(loaded.get_layer("block5_conv4").get_weights()[0], base.get_layer("block5_conv4").get_weights()[0])

    with pytest.raises(models.WeightsIncompatible, match="vgg19"):
        models.build_model("vgg19", _resnet_weights(tmp_path), SIZE)
    with pytest.raises(models.WeightsUnavailable, match="does not exist"):
        models.build_model("vgg19", tmp_path / "missing.weights.h5", SIZE)


def _resnet_weights(folder):
    path = folder / "resnet.weights.h5"
    models.build_model("resnet50", "none", SIZE).save_weights(path)
    return path


def test_offline_imagenet_fails_fast_with_the_file_folder_and_url(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    probes, downloads = [], []

    def offline(url, timeout_s):  # offline, whatever this machine is
        probes.append((url, timeout_s))
        return False

    def no_download(*args, **kwargs):
        downloads.append(args)
        raise OSError("offline")

    from keras.src.utils import file_utils

    monkeypatch.setattr(models, "_reachable", offline)
    monkeypatch.setattr(file_utils, "get_file", no_download)
    backbone = models.BACKBONES["densenet121"]
    with pytest.raises(models.WeightsUnavailable) as caught:
        models.build_model("densenet121", "imagenet", SIZE)
    assert probes == [(backbone.imagenet_url, models.PROBE_TIMEOUT_S)] and downloads == []  # one bounded probe, no download
    message = str(caught.value)
    assert backbone.imagenet_file in message and "~/.keras/models/" in message and backbone.imagenet_url in message
    assert str(tmp_path / "keras-home" / "models") in message
