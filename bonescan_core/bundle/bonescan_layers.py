"""The input pipeline of an exported bonescan model, as Keras layers that serialise.

This file travels in every model bundle beside ``model.keras`` and ``predict.py`` and must
stay self-contained: it imports Keras and nothing of bonescan. Import it before
``keras.saving.load_model(..., safe_mode=True)``: importing registers the layers under the
package name ``bonescan`` (``bonescan>FitScan``, ``bonescan>BackboneInput``,
``bonescan>Float16Cache``).

The layers compute, in the graph and for an image of any size, what the app computes with
NumPy and Pillow (``bonescan_core.preprocess``) before its model sees an image:

1. :class:`FitScan`: per-image min-max to [0, 1]; resize keeping the aspect ratio with
   Pillow's bilinear filter (antialiased when shrinking), centred in a zero-padded (H, W)
   frame; values clipped to [0, 1]; rounded to float16 and back, as the app caches images.
2. :class:`BackboneInput`: x 255, grey repeated on R, G, B, then the backbone's own
   ``keras.applications.<module>.preprocess_input`` (none for scintinet, which scales
   each image inside its own model).

A model trained in fast mode also rounds its pooled features to float16 before the head
(:class:`Float16Cache`), as the app's feature cache does.

The resize is two matrix products, ``rows @ image @ cols.T``: every output pixel is the
triangle-filter average Pillow's ``Image.resize(..., BILINEAR)`` computes (filter support
scaled by the reduction factor, weights renormalised at the edges), and the rows and columns
of the matrices that fall in the padding are zero, so the padding comes out as zeros. The
weights are built from the input's dynamic shape with ``keras.ops`` only.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

BACKBONE_MODULES = ("resnet", "vgg19", "densenet")  # keras.applications submodules with the backbones' preprocess_input
NO_MODULE = ""  # a backbone without an application (scintinet): it scales each image itself, inside its model


def _round_half_even(numerator: Any, denominator: Any) -> Any:
    """round(numerator / denominator) of non-negative int32 tensors, ties to even (Python's round)."""
    quotient = ops.floor_divide(numerator, denominator)
    twice_rest = 2 * (numerator - quotient * denominator)
    up = ops.logical_or(twice_rest > denominator, ops.logical_and(twice_rest == denominator, ops.mod(quotient, 2) == 1))
    return quotient + ops.cast(up, "int32")


def _resample_matrix(size_in: Any, size_out: Any, offset: Any, frame: int) -> Any:
    """(frame, size_in) float32 weights: row offset + i is Pillow's bilinear filter for output i of size_out.

    Rows outside [offset, offset + size_out) are zero (the padding). Pillow: scale = in / out,
    support = max(scale, 1), output i centred at (i + 0.5) * scale, input x weighted by
    max(0, 1 - |x + 0.5 - centre| / support), weights normalised to sum 1.
    """
    # x + 0.5 - centre = ((2x + 1) out - (2i + 1) in) / (2 out), and dividing by the support
    # max(in / out, 1) gives |...| / (2 max(in, out)): an exact integer over an integer, one
    # rounding (float32 centres of a large image would be off by 1e-5 of a pixel).
    index = ops.arange(frame, dtype="int32") - offset  # output index within the content
    inside = ops.logical_and(index >= 0, index < size_out)
    source = ops.arange(size_in, dtype="int32")
    numerator = (2 * source[None, :] + 1) * size_out - (2 * index[:, None] + 1) * size_in
    distance = ops.cast(ops.abs(numerator), "float32") / ops.cast(2 * ops.maximum(size_in, size_out), "float32")
    weights = ops.maximum(0.0, 1.0 - distance)
    total = ops.sum(weights, axis=1, keepdims=True)
    weights = ops.where(total > 0.0, weights / ops.where(total > 0.0, total, 1.0), 0.0)
    return ops.where(inside[:, None], weights, 0.0)


@keras.saving.register_keras_serializable(package="bonescan")
class FitScan(keras.layers.Layer):
    """Raw counts of any size → the app's (H, W) image in [0, 1].

    Input: (N, h, w, 1) float32 counts (any h, w >= 1; the N images of a batch share one
    size). Output: (N, H, W, 1) float32 in [0, 1], equal (within float rounding before the
    float16 step) to ``bonescan_core.preprocess.prepare_image(counts, (H, W))`` rounded to
    float16, which is what the app's model sees.

    Args:
        height, width: the frame (H, W).
        cache_dtype: ``"float16"`` (round as the app's image cache does) or ``"float32"`` (keep).
    """

    def __init__(self, height: int, width: int, cache_dtype: str = "float16", **kwargs: Any) -> None:
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if cache_dtype not in ("float16", "float32"):
            raise ValueError(f"cache_dtype must be float16 or float32, not {cache_dtype!r}")
        self.height, self.width, self.cache_dtype = int(height), int(width), cache_dtype

    def call(self, counts: Any) -> Any:
        x = ops.nan_to_num(ops.cast(counts[..., 0], "float32"), nan=0.0, posinf=0.0, neginf=0.0)
        low = ops.min(x, axis=(1, 2), keepdims=True)
        high = ops.max(x, axis=(1, 2), keepdims=True)
        spread = high - low
        x = ops.where(spread > 0.0, (x - low) / ops.where(spread > 0.0, spread, 1.0), 0.0)
        shape = ops.shape(x)
        h, w = ops.cast(shape[1], "int32"), ops.cast(shape[2], "int32")
        height, width = self.height, self.width
        # preprocess.content_box: scale = min(H / h, W / w), compared and rounded in integers.
        by_height = height * w <= width * h
        new_h = ops.where(by_height, height, _round_half_even(h * width, w))
        new_w = ops.where(by_height, _round_half_even(w * height, h), width)
        new_h = ops.clip(new_h, 1, height)
        new_w = ops.clip(new_w, 1, width)
        rows = _resample_matrix(h, new_h, (height - new_h) // 2, height)  # (H, h)
        cols = _resample_matrix(w, new_w, (width - new_w) // 2, width)  # (W, w)
        frame = ops.matmul(rows, ops.matmul(x, ops.transpose(cols)))  # (N, H, W)
        frame = ops.clip(frame, 0.0, 1.0)
        if self.cache_dtype == "float16":
            frame = ops.cast(ops.cast(frame, "float16"), "float32")
        return frame[..., None]

    def compute_output_shape(self, input_shape: tuple[Any, ...]) -> tuple[Any, ...]:
        return (input_shape[0], self.height, self.width, 1)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "height": self.height, "width": self.width, "cache_dtype": self.cache_dtype}


@keras.saving.register_keras_serializable(package="bonescan")
class BackboneInput(keras.layers.Layer):
    """Grey [0, 1] → the backbone's input: ``preprocess_input(255 * grey on R, G, B)``.

    Input: (N, H, W, 1) float32 in [0, 1]. Output: (N, H, W, 3) float32.

    Args:
        module: the ``keras.applications`` submodule whose ``preprocess_input`` applies:
            ``resnet`` (ResNet50), ``vgg19`` or ``densenet`` (DenseNet121); ``""`` (:data:`NO_MODULE`,
            scintinet): none, the output is ``255 * grey`` on R, G, B.
    """

    def __init__(self, module: str, **kwargs: Any) -> None:
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if module not in (*BACKBONE_MODULES, NO_MODULE):
            raise ValueError(f"unknown backbone module {module!r}; one of {', '.join(BACKBONE_MODULES)} or ''")
        self.module = module

    def call(self, grey: Any) -> Any:
        rgb = ops.repeat(ops.clip(ops.cast(grey, "float32"), 0.0, 1.0) * 255.0, 3, axis=-1)
        if self.module == NO_MODULE:
            return rgb
        return getattr(keras.applications, self.module).preprocess_input(rgb)

    def compute_output_shape(self, input_shape: tuple[Any, ...]) -> tuple[Any, ...]:
        return (*input_shape[:-1], 3)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "module": self.module}


@keras.saving.register_keras_serializable(package="bonescan")
class Float16Cache(keras.layers.Layer):
    """Round to float16 and back: what the app's float16 feature cache does to a fast-mode run's
    pooled features before its head. Input and output: any shape, float32."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)

    def call(self, x: Any) -> Any:
        return ops.cast(ops.cast(x, "float16"), "float32")

    def compute_output_shape(self, input_shape: tuple[Any, ...]) -> tuple[Any, ...]:
        return input_shape
