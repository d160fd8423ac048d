"""The backbones: a registry of ImageNet CNNs, one from-scratch network, and the classifier built on each.

``BACKBONES`` maps a name (``resnet50``, ``vgg19``, ``densenet121``, ``scintinet``) to a
:class:`Backbone` that knows its Keras application, its own ``preprocess_input``, the last
convolutional layer (Grad-CAM), the exact ImageNet weights file Keras downloads, where
fine-tuning starts, and its defaults (weights, mode, input size). ``scintinet``
(``bonescan_core.scintinet``) has no application and no ImageNet weights: it is built by its
own module, trains from scratch in mode ``full`` only, at 1024 x 256 by default. Importing this module is cheap: Keras (and with it TensorFlow or JAX) is imported
only when a model is built, so the CLI and the pages can list backbones without it.

Every model here is ONE FLAT functional graph: input (H, W, 3) float32, already passed
through the backbone's ``preprocess_input`` (see ``preprocess.to_model_input``), then the
application's layers, then ``head_pool`` (GlobalAveragePooling2D) → ``head_dropout`` →
``head_dense`` (Dense(1, sigmoid), float32 even under mixed precision). Flat, not a nested
``Model``, so ``model.get_layer(backbone.last_conv_layer)`` reaches the last conv layer of
the very model that predicts. ``scintinet`` has the same three head layer names around its
lesion-evidence map (``head_dropout`` → ``evidence`` → ``head_pool`` (GlobalMaxPooling2D) →
``head_dense``; see its module).

Weights: ``"imagenet"`` (Keras's own download and cache, ``~/.keras/models``), ``"none"``
(random initialisation) or a path to a weights file. Offline, ``"imagenet"`` fails within
seconds with :class:`WeightsUnavailable`, whose message names the file, the folder and the
URL.
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.parse
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bonescan_core import errors, scintinet
from bonescan_core.heavy import keras_module

if TYPE_CHECKING:  # pragma: no cover - typing only; keras is imported lazily
    import keras

DEFAULT_SIZE: tuple[int, int] = (646, 220)  # (H, W): the paper's 220 x 646 images, portrait
MODES = ("fast", "head", "finetune", "full")
HEAD_LAYERS = ("head_pool", "head_dropout", "head_dense")
PROBE_TIMEOUT_S = 3.0  # offline check before an ImageNet download: DNS + TCP connect
DOWNLOAD_TIMEOUT_S = 60.0  # per socket operation while Keras downloads (a stalled download fails, not hangs)


class WeightsUnavailable(errors.Unavailable):
    """Backbone weights cannot be loaded (not cached and no internet, or no such file); the message says what to place where."""


class WeightsIncompatible(errors.InputError):
    """A weights file does not fit the model being built (other backbone, size or head)."""


@dataclass(frozen=True)
class Backbone:
    """One backbone: an ImageNet application, or (``application`` empty) a network built from scratch.

    Attributes:
        name: registry key, e.g. ``"resnet50"``.
        application: class name in ``keras.applications``, e.g. ``"ResNet50"``.
        module: ``keras.applications`` submodule holding its ``preprocess_input``.
        last_conv_layer: name of the last convolutional feature map (Grad-CAM target).
        imagenet_file: the no-top weights file name Keras downloads into ``~/.keras/models/``.
        imagenet_url: where Keras downloads that file from.
        finetune_from: first layer (in ``model.layers`` order) unfrozen in finetune mode:
            the start of the last stage.
        n_features: length of the pooled feature vector (channels of ``last_conv_layer``).
        modes: the training modes that make sense for it (:data:`MODES` for ImageNet ones).
        default_weights: what ``--weights`` means when not given.
        default_mode: what ``--mode`` means when not given.
        default_size: (H, W) input size when not given.
        default_view_mode: what ``--view-mode`` means when not given (``per_image``; for
            ``scintinet`` ``fusion``: both views of a study, one output per study).
        default_augment: ``paper`` (``preprocess.PAPER_AUGMENT``) or ``none``: the
            augmentation when not given.
        default_patience: early stopping patience (epochs) when not given.
    """

    name: str
    application: str
    module: str
    last_conv_layer: str
    imagenet_file: str
    imagenet_url: str
    finetune_from: str
    n_features: int
    modes: tuple[str, ...] = MODES
    default_weights: str = "imagenet"
    default_mode: str = "finetune"
    default_size: tuple[int, int] = DEFAULT_SIZE
    default_view_mode: str = "per_image"
    default_augment: str = "paper"
    default_patience: int = 5

    @property
    def has_imagenet(self) -> bool:
        """Whether ImageNet weights exist for it (False for a from-scratch network)."""
        return bool(self.imagenet_file)

    @property
    def builder(self) -> Callable[..., keras.Model]:
        """The Keras application constructor, e.g. ``keras.applications.ResNet50``."""
        return getattr(keras_module().applications, self.application)

    @property
    def preprocess_input(self) -> Callable[[Any], Any]:
        """The application's own ``preprocess_input``: takes RGB 0..255, returns what the backbone expects.

        ResNet50 and VGG19 ("caffe"): RGB→BGR, ImageNet mean subtracted, about -124..152.
        DenseNet121 ("torch"): scaled to 0..1 and standardised by the ImageNet mean/std.
        scintinet: the identity (it scales each image itself, inside the model).
        """
        if not self.module:
            return _identity
        return getattr(keras_module().applications, self.module).preprocess_input


def _identity(x: Any) -> Any:
    return x


_KERAS_WEIGHTS = "https://storage.googleapis.com/tensorflow/keras-applications/"

BACKBONES: dict[str, Backbone] = {
    "resnet50": Backbone(
        name="resnet50",
        application="ResNet50",
        module="resnet",
        last_conv_layer="conv5_block3_out",
        imagenet_file="resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        imagenet_url=_KERAS_WEIGHTS + "resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        finetune_from="conv5_block1_1_conv",  # stage conv5 (3 bottleneck blocks, ~15 M of 23.6 M weights)
        n_features=2048,
    ),
    "vgg19": Backbone(
        name="vgg19",
        application="VGG19",
        module="vgg19",
        last_conv_layer="block5_conv4",
        imagenet_file="vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
        imagenet_url=_KERAS_WEIGHTS + "vgg19/vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
        finetune_from="block5_conv1",  # block 5 (4 convolutions, ~9.4 M of 20 M weights)
        n_features=512,
    ),
    "densenet121": Backbone(
        name="densenet121",
        application="DenseNet121",
        module="densenet",
        last_conv_layer="relu",  # the final BN + ReLU after dense block 4
        imagenet_file="densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
        imagenet_url=_KERAS_WEIGHTS + "densenet/densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
        finetune_from="conv5_block1_0_bn",  # dense block 4 (16 layers) and the final BN
        n_features=1024,
    ),
    "scintinet": Backbone(
        name="scintinet",
        application="",  # built by bonescan_core.scintinet, not keras.applications
        module="",
        last_conv_layer=scintinet.LAST_CONV_LAYER,  # the stride-16 lesion-evidence map itself
        imagenet_file="",
        imagenet_url="",
        finetune_from="",
        n_features=scintinet.N_FEATURES,
        modes=("full",),  # random weights: freezing any part of it would freeze noise
        default_weights="none",
        default_mode="full",
        default_size=(1024, 256),  # one stored view at its own resolution (docs/scintinet.md)
        default_view_mode="fusion",  # a lesion may show in one view only: the study, not the image, has the label
        # No resampling augmentation: rotation, zoom and shear interpolate, and blur a 1-3 px lesion into its bone.
        default_augment="none",
        default_patience=10,  # from scratch it sits on a plateau first; 5 epochs of flat val_loss ended runs there
    ),
}


def get_backbone(backbone: str | Backbone) -> Backbone:
    """The :class:`Backbone` for a name (or the backbone itself); ValueError names the known ones."""
    if isinstance(backbone, Backbone):
        return backbone
    try:
        return BACKBONES[backbone]
    except KeyError:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}") from None


# --- ImageNet weights: Keras's cache, and failing fast offline ------------------------------------

def keras_models_dir() -> Path:
    """Folder where Keras caches downloaded weights: ``$KERAS_HOME/models`` or ``~/.keras/models``.

    Mirrors ``keras.src.backend.config``: an unwritable home falls back to ``/tmp/.keras``.
    """
    if "KERAS_HOME" in os.environ:
        return Path(os.environ["KERAS_HOME"]).expanduser() / "models"
    home = Path("~").expanduser()
    base = home if os.access(home, os.W_OK) else Path("/tmp")
    return base / ".keras" / "models"


def imagenet_cached(backbone: str | Backbone) -> Path | None:
    """Path of the cached ImageNet no-top weights file, or None if Keras would have to download it."""
    path = keras_models_dir() / get_backbone(backbone).imagenet_file
    return path if path.is_file() else None


def _reachable(url: str, timeout_s: float) -> bool:
    """Whether a TCP connection to the URL's host opens within ``timeout_s`` (DNS included).

    ``getaddrinfo`` has no timeout of its own (a dead resolver can block for 20 s or more),
    so the probe runs in a daemon thread and we wait at most ``timeout_s`` for it.
    """
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((parts.hostname, port), timeout=timeout_s):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(result and result[0])


def _unavailable_message(bb: Backbone, reason: str) -> str:
    folder = keras_models_dir()
    return (
        f"ImageNet weights for {bb.name} are not available ({reason}): download {bb.imagenet_file} "
        f"from {bb.imagenet_url} on a machine with internet and put it in ~/.keras/models/ "
        f"(here: {folder}/{bb.imagenet_file}), or train with --weights none or --weights PATH"
    )


def ensure_imagenet(backbone: str | Backbone, probe_timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Fail fast, before Keras tries a download that cannot succeed.

    Raises:
        WeightsUnavailable: the weights file is not cached and its host cannot be reached
            within ``probe_timeout_s`` seconds.
    """
    bb = get_backbone(backbone)
    if not bb.has_imagenet:
        raise errors.InputError(f"{bb.name} has no ImageNet weights: train it with --weights none (from scratch) or a weights file")
    if imagenet_cached(bb) is None and not _reachable(bb.imagenet_url, probe_timeout_s):
        raise WeightsUnavailable(_unavailable_message(bb, "not in the Keras cache and no internet connection"))


# --- building -------------------------------------------------------------------------------------

def weights_kind(weights: str | os.PathLike[str] | None) -> str:
    """``"imagenet"``, ``"none"`` or ``"file"``."""
    if weights is None or str(weights).lower() == "none":
        return "none"
    if str(weights) == "imagenet":
        return "imagenet"
    return "file"


def _application(bb: Backbone, weights: str | None, inputs: Any) -> keras.Model:
    """Build the application on ``inputs`` (no top), downloading ImageNet weights if asked."""
    if weights != "imagenet":
        return bb.builder(include_top=False, weights=weights, input_tensor=inputs)
    ensure_imagenet(bb)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # Keras's urlretrieve has no timeout of its own
    try:
        return bb.builder(include_top=False, weights="imagenet", input_tensor=inputs)
    except Exception as error:  # Keras raises bare Exception for "URL fetch failure"
        if isinstance(error, (ValueError, TypeError)) and "fetch" not in str(error).lower():
            raise
        raise WeightsUnavailable(_unavailable_message(bb, f"download failed: {error}")) from error
    finally:
        socket.setdefaulttimeout(previous)


def build_model(
    backbone: str | Backbone,
    weights: str | os.PathLike[str] | None = "imagenet",
    image_size: tuple[int, int] = DEFAULT_SIZE,
    dropout: float = 0.3,
    seed: int = 0,
    views: int = 1,
) -> keras.Model:
    """The classifier: backbone + GlobalAveragePooling2D → Dropout → Dense(1, sigmoid), one flat graph.

    Args:
        backbone: name in :data:`BACKBONES` or a :class:`Backbone`.
        weights: ``"imagenet"``, ``"none"`` (or None) or a path. A ``.h5`` file (not
            ``.weights.h5``) is taken as backbone-only weights like Keras's ImageNet files;
            a ``.keras`` / ``.weights.h5`` file as weights of a whole model built here (e.g.
            a previous run); either falls back to the other reading.
        image_size: (H, W) of the input; at least 32 x 32.
        dropout: dropout rate before the last Dense layer, 0 <= dropout < 1.
        seed: seeds Keras's global RNG (``keras.utils.set_random_seed``) before building,
            so random initial weights are reproducible, and the head's own layers.
        views: 1, or 2 for dual-view fusion (``view_mode="fusion"``): the input is then
            (None, 2, H, W, 3), a study's anterior and mirrored posterior view; one shared
            backbone runs over both (the views become consecutive batch rows), ``head_pool``
            pools each view's features, ``view_fusion`` keeps the larger of the two per
            feature (a lesion may show in either view), then the usual head: one output
            per study. The backbone's layers (and Grad-CAM's ``last_conv_layer``) then
            hold 2 rows per study, anterior first.

    Returns:
        A ``keras.Model`` named ``bonescan_<backbone>``: input ``image`` (None, H, W, 3)
        float32 already passed through ``backbone.preprocess_input``; output (None, 1)
        float32, the probability of metastasis in [0, 1]. All layers trainable.

    Raises:
        WeightsUnavailable: ImageNet weights not cached and offline, or a missing file.
        WeightsIncompatible: a weights file that fits neither the backbone nor the model.
    """
    bb = get_backbone(backbone)
    height, width = (int(v) for v in image_size)
    if height < 32 or width < 32:
        raise ValueError(f"image size {height}x{width} is too small: the backbones need at least 32x32")
    kind = weights_kind(weights)
    if views not in (1, 2):
        raise ValueError(f"views must be 1 or 2, not {views}")
    if not bb.has_imagenet:
        return _build_from_scratch(bb, kind, weights, (height, width), dropout, seed, views)
    if kind == "imagenet":
        ensure_imagenet(bb)  # before importing Keras: offline, fail in well under a second
    keras = keras_module()
    path = Path(weights) if kind == "file" else None
    if path is not None and not path.is_file():
        raise WeightsUnavailable(f"weights file {path} does not exist; give an existing .keras, .weights.h5 or .h5 file")
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(height, width, 3) if views == 1 else (2, height, width, 3), dtype="float32", name="image")
    rows = inputs if views == 1 else keras.ops.reshape(inputs, (-1, height, width, 3))
    whole_model_file = path is not None and (path.name.endswith(".weights.h5") or path.suffix == ".keras")
    first_error: Exception | None = None
    if path is None:
        base = _application(bb, "imagenet" if kind == "imagenet" else None, rows)
    elif whole_model_file:
        base = _application(bb, None, rows)
    else:
        try:  # a plain .h5: backbone-only weights, like Keras's own ImageNet files
            base = _application(bb, str(path), rows)
        except Exception as error:  # noqa: BLE001 - any failure: try reading it as a whole model
            first_error, whole_model_file = error, True
            base = _application(bb, None, rows)
    x = keras.layers.GlobalAveragePooling2D(name="head_pool")(base.output)
    if views == 2:  # (2N, C) → (N, 2, C) → (N, C): per feature, the stronger of the two views
        x = keras.layers.Identity(name="view_fusion")(_fuse_views(x))  # ops, not a Lambda: safe_mode loads it
    x = keras.layers.Dropout(dropout, seed=seed, name="head_dropout")(x)
    outputs = keras.layers.Dense(
        1, activation="sigmoid", dtype="float32", name="head_dense",  # float32 even under mixed_float16
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
    )(x)
    model = keras.Model(inputs, outputs, name=f"bonescan_{bb.name}")
    if path is not None and whole_model_file:
        try:
            with warnings.catch_warnings():  # a backbone-only file warns about the head before failing; we fall back
                warnings.simplefilter("ignore", UserWarning)
                model.load_weights(str(path))
        except Exception as error:
            if first_error is None and path.suffix != ".keras":
                # A .weights.h5 that holds only backbone weights: try the backbone reading.
                try:
                    with warnings.catch_warnings():  # Keras warns about every layer of a file that does not fit
                        warnings.simplefilter("ignore", UserWarning)
                        base.load_weights(str(path))
                    return model
                except Exception:
                    pass
            reason = str(first_error or error).strip().splitlines()[0][:200]
            raise WeightsIncompatible(
                f"{path} does not fit {bb.name} at {height}x{width} ({reason}); "
                f"use weights saved from a {bb.name} model of this size, or Keras's {bb.imagenet_file}"
            ) from error
    return model


def _fuse_views(features: Any) -> Any:
    """(2N, C) pooled features, a study's anterior and posterior view in consecutive rows → (N, C), their maximum."""
    ops = keras_module().ops
    return ops.max(ops.reshape(features, (-1, 2, features.shape[-1])), axis=1)


def _build_from_scratch(bb: Backbone, kind: str, weights: str | os.PathLike[str] | None, size: tuple[int, int],
                        dropout: float, seed: int, views: int = 1) -> keras.Model:
    """A backbone without ImageNet weights (``scintinet``): random weights, or a whole-model weights file."""
    if kind == "imagenet":
        ensure_imagenet(bb)  # raises the InputError that says to use --weights none
    path = Path(weights) if kind == "file" else None
    if path is not None and not path.is_file():
        raise WeightsUnavailable(f"weights file {path} does not exist; give an existing .keras or .weights.h5 file")
    keras_module().utils.set_random_seed(seed)
    model = scintinet.build(size, dropout=dropout, seed=seed, views=views)
    if path is not None:
        try:
            with warnings.catch_warnings():  # a foreign file warns about every layer before it fails
                warnings.simplefilter("ignore", UserWarning)
                model.load_weights(str(path))
        except Exception as error:
            reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            raise WeightsIncompatible(
                f"{path} does not fit {bb.name} at {size[0]}x{size[1]} ({reason}); use weights saved from a {bb.name} run"
            ) from error
    return model


def backbone_layers(model: keras.Model) -> list[Any]:
    """The model's backbone layers (everything except the input and the ``head_*`` layers), in graph order."""
    keras = keras_module()
    return [layer for layer in model.layers if layer.name not in HEAD_LAYERS and not isinstance(layer, keras.layers.InputLayer)]


def freeze_for(model: keras.Model, mode: str, backbone: str | Backbone, phase: str | None = None) -> None:
    """Set which layers train, for a training mode and phase. Recompile the model afterwards.

    * ``fast`` / ``head`` (and ``finetune`` in its first phase, ``phase="head"``): the whole
      backbone frozen, only the head trains.
    * ``finetune`` with ``phase="finetune"``: layers from ``backbone.finetune_from`` on train,
      every BatchNormalization layer stays frozen (in Keras 3 a frozen BN also runs in
      inference mode, so its moving statistics, learned on ImageNet, are kept: small
      batches would wreck them), everything earlier stays frozen.
    * ``full``: every layer trains, BatchNormalization included.

    Args:
        model: a model from :func:`build_model`.
        mode: one of :data:`MODES`.
        backbone: the model's backbone.
        phase: ``"head"`` or ``"finetune"`` for mode ``finetune`` (default ``"head"``);
            ignored for the other modes.
    """
    keras = keras_module()
    bb = get_backbone(backbone)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode not in bb.modes:
        raise errors.InputError(f"{bb.name} trains only in mode {', '.join(bb.modes)} (it has no pretrained layers to freeze); "
                                f"use --mode {bb.modes[0]}")
    phase = phase or "head"
    if mode == "finetune" and phase not in ("head", "finetune"):
        raise ValueError(f"finetune phase must be 'head' or 'finetune', not {phase!r}")
    model.trainable = True  # the container itself; layers are set one by one below
    layers = backbone_layers(model)
    names = [layer.name for layer in layers]
    start = names.index(bb.finetune_from) if bb.finetune_from in names else len(names)
    for index, layer in enumerate(layers):
        if mode == "full":
            layer.trainable = True
        elif mode == "finetune" and phase == "finetune":
            layer.trainable = index >= start and not isinstance(layer, keras.layers.BatchNormalization)
        else:
            layer.trainable = False
    for name in HEAD_LAYERS:
        model.get_layer(name).trainable = True


def feature_extractor(
    backbone: str | Backbone,
    weights: str | os.PathLike[str] | None = "imagenet",
    image_size: tuple[int, int] = DEFAULT_SIZE,
    seed: int = 0,
) -> keras.Model:
    """A model mapping a preprocessed image to its pooled backbone features.

    Returns:
        ``keras.Model``: (None, H, W, 3) float32 preprocessed → (None, n_features) pooled
        activations of ``last_conv_layer`` (float32, or float16 under mixed precision).
    """
    return features_of(build_model(backbone, weights, image_size, dropout=0.0, seed=seed))


def features_of(model: keras.Model) -> keras.Model:
    """The pooled-features part of a model from :func:`build_model`, sharing its weights."""
    keras = keras_module()
    return keras.Model(model.input, model.get_layer("head_pool").output, name=f"{model.name}_features")


def head_model(n_features: int, dropout: float = 0.3, seed: int = 0) -> keras.Model:
    """The classifier head alone, for fast mode: (None, n_features) → Dropout → Dense(1, sigmoid).

    Its ``head_dense`` weights can be copied into a full model with :func:`transplant_head`.
    """
    keras = keras_module()
    inputs = keras.Input(shape=(n_features,), dtype="float32", name="features")
    x = keras.layers.Dropout(dropout, seed=seed, name="head_dropout")(inputs)
    outputs = keras.layers.Dense(
        1, activation="sigmoid", dtype="float32", name="head_dense",
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
    )(x)
    return keras.Model(inputs, outputs, name="bonescan_head")


def transplant_head(head: keras.Model, model: keras.Model) -> None:
    """Copy a trained :func:`head_model`'s Dense weights into a full model (same backbone features)."""
    model.get_layer("head_dense").set_weights(head.get_layer("head_dense").get_weights())
