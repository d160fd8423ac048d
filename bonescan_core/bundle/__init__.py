"""A model that stands alone: the exported model carries the app's input pipeline, and the
bundle carries the code that runs it without bonescan.

:func:`standalone_model` wraps a run's saved model (input: the backbone's preprocessed
(H, W, 3) image) into one that takes the raw counts of a stored image of any size, as a
batch (1, h, w, 1) float32 (two such inputs, ``anterior`` and ``posterior``, for a
composite run), and applies min-max, fit-to-size, the float16 rounding of the app's image
cache, the grey-to-RGB channels and the backbone's ``preprocess_input`` in its own layers
(:mod:`bonescan_core.bundle.bonescan_layers`). Its output is the app's raw probability of
the same image within float rounding (``tests/test_standalone.py``); a fast-mode run's
model also rounds its pooled features to float16, as the app's feature cache does.

The app itself keeps its NumPy/Pillow path (:mod:`bonescan_core.preprocess`): training
fits every image once into a float16 cache and feeds same-sized batches for many epochs,
which a per-image, any-size in-graph resize cannot do as fast. The layers compute the same
arithmetic (Pillow's bilinear filter as two weight matrices), and the tests hold the two
together.

The two files :data:`CODE_FILES` are copied into a bundle verbatim; they import nothing of
bonescan, so they live here as plain modules of their own.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from bonescan_core import errors
from bonescan_core.heavy import keras_module
from bonescan_core.models import Backbone, features_of, get_backbone

HERE = Path(__file__).resolve().parent
CODE_FILES = ("predict.py", "bonescan_layers.py")  # copied into every bundle beside model.keras


def standalone_model(model: Any, backbone: str | Backbone, view_mode: str = "per_image", mode: str = "finetune") -> Any:
    """A run's model with the app's whole input pipeline in front of it, in layers that serialise.

    Args:
        model: the run's model (``runs.load_model``): input (None, H, W, 3) backbone input,
            output (None, 1) probability.
        backbone: whose ``preprocess_input`` applies.
        view_mode: ``per_image`` (one input ``counts``) or ``composite`` (inputs ``anterior``
            and ``posterior``, each fitted into its half of the frame, W // 2 and W - W // 2
            wide, as ``preprocess.compose_views``).
        mode: the run's training mode; ``fast`` rounds the pooled features to float16 before
            the head, since a fast run's stored probabilities come from its float16 feature cache.

    Returns:
        A ``keras.Model``: input(s) (N, h, w, 1) float32 raw counts, any h and w (the images
        of one batch share a size; the bundle's ``predict.py`` feeds one at a time); output
        (N, 1) float32, the uncalibrated probability. Loads with ``safe_mode=True`` once
        ``bonescan_layers`` is imported.
    """
    from bonescan_core.bundle import bonescan_layers as layers

    keras = keras_module()
    height, width = (int(v) for v in model.input_shape[1:3])
    module = get_backbone(backbone).module
    if view_mode == "per_image":
        inputs = [keras.Input((None, None, 1), dtype="float32", name="counts")]
        grey = layers.FitScan(height, width, name="fit_to_size")(inputs[0])
    elif view_mode == "composite":
        inputs = [keras.Input((None, None, 1), dtype="float32", name=name) for name in ("anterior", "posterior")]
        halves = (width // 2, width - width // 2)
        fitted = [layers.FitScan(height, half, name=f"fit_{name}")(view)
                  for half, name, view in zip(halves, ("anterior", "posterior"), inputs, strict=True)]
        grey = keras.layers.Concatenate(axis=2, name="composite")(fitted)
    else:  # fusion: the standalone pipeline does not stack and mirror two views yet
        raise errors.InputError(f"a {view_mode} run cannot be exported as a standalone model yet; export a per_image or "
                                "composite run (or use this run in the app: `bonescan predict`)")
    x = layers.BackboneInput(module, name="backbone_input")(grey)
    if mode == "fast":
        pooled = layers.Float16Cache(name="feature_cache")(features_of(model)(x))
        output = model.get_layer("head_dense")(model.get_layer("head_dropout")(pooled))
    else:
        output = model(x)
    return keras.Model(inputs if len(inputs) > 1 else inputs[0], output, name=f"{model.name}_standalone")


def write_code(out_dir: Path) -> list[Path]:
    """Copy :data:`CODE_FILES` into ``out_dir``; returns their paths."""
    paths = []
    for name in CODE_FILES:
        shutil.copyfile(HERE / name, out_dir / name)
        paths.append(out_dir / name)
    return paths
