"""Run an exported bonescan model on scan files, without bonescan.

Usage (from anywhere; the bundle is this file's folder unless --bundle says otherwise)::

    python predict.py FILE [FILE ...]          # a per-image run: FILE<TAB>probability per image
    python predict.py ANTERIOR POSTERIOR [...]  # a two-view (composite) run: one line per pair
    python predict.py --threshold              # the run's decision threshold(s), NAME<TAB>value

Needs only numpy, pillow, tifffile, pydicom and keras (with its backend, e.g. TensorFlow).
The bundle's ``model.keras`` takes the raw counts of one image of any size and does the
app's whole preprocessing itself (``bonescan_layers.py``), so this script only reads pixels
the way the app imports them: TIFF (one image per page), PNG, JPEG and uncompressed or
plugin-decodable DICOM (one image per frame; rescale slope/intercept applied, MONOCHROME1
and white-is-zero TIFF inverted), colour converted to grey (ITU-R BT.601 luma), negative
values set to 0. A file with several images prints ``FILE#k`` for its k-th image. The
probability is the model's, passed through the run's calibration when ``config.json`` holds
one (``--raw`` skips it); 6 decimals, as the app's predictions CSV.

Exit status: 0 when every file was predicted; 2 when a file could not be read (its message
goes to stderr, the other files are still predicted) or the arguments are wrong.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
MIN_SIDE = 64  # the app refuses images under 64 px on a side
LOGIT_EPS = 1e-7  # probabilities are clipped to [eps, 1 - eps] before the logit, as in the app
EXIT_OK, EXIT_INPUT = 0, 2


class Unreadable(Exception):
    """A file this script cannot turn into counts; the message says why."""


# --- reading pixels, as the app imports them --------------------------------------------------------

def _grey(arr: np.ndarray) -> np.ndarray:
    """(H, W, C) colour → (H, W) luma 0.299 R + 0.587 G + 0.114 B; integer samples rounded back to their dtype."""
    if arr.ndim == 2:
        return arr
    if arr.ndim != 3 or arr.shape[-1] < 3:
        raise Unreadable(f"unsupported layout {arr.shape}; export 2-D greyscale images")
    work = np.float64 if arr.dtype.itemsize >= 4 else np.float32
    r, g, b = (arr[..., i].astype(work) for i in range(3))
    grey = work(0.299) * r + work(0.587) * g + work(0.114) * b
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        grey = np.clip(np.rint(grey), info.min, info.max).astype(arr.dtype)
    return grey


def _invert(arr: np.ndarray) -> np.ndarray:
    """min + max - v, same dtype (MONOCHROME1 and white-is-zero images)."""
    low, high = arr.min(), arr.max()
    if np.issubdtype(arr.dtype, np.floating):
        return (low + high - arr).astype(arr.dtype)
    return (int(low) + int(high) - arr.astype(np.int64)).astype(arr.dtype)


def _read_tiff(path: Path) -> list[np.ndarray]:
    import tifffile

    images = []
    with tifffile.TiffFile(path) as tif:
        for page in tif.pages:
            if int(getattr(page, "subfiletype", 0)) & 0b101:  # thumbnails and masks
                continue
            photometric = int(page.photometric)
            if photometric == 3:
                raise Unreadable("palette-colour TIFF is not read here; export greyscale")
            if photometric not in (0, 1, 2):
                raise Unreadable(f"unsupported TIFF colour model {photometric}; export greyscale or RGB")
            arr = page.asarray()
            if arr.ndim == 3 and photometric == 2:
                arr = arr[..., :3]
            elif arr.ndim == 3 and arr.shape[-1] == 2:  # grey + alpha
                arr = arr[..., 0]
            arr = _grey(arr)
            if photometric == 0:
                arr = _invert(arr)
            images.append(arr)
    return images


def _read_pillow(path: Path) -> list[np.ndarray]:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        mode = im.mode
        if mode in ("L", "F") or mode.startswith("I;16"):
            arr = np.asarray(im)
            arr = arr.astype(arr.dtype.newbyteorder("="))
        elif mode == "I":
            arr = np.asarray(im)
            if arr.size and arr.min() >= 0 and arr.max() <= 0xFFFF:
                arr = arr.astype(np.uint16)
        elif mode == "1":
            arr = np.asarray(im.convert("L"))
        elif mode in ("LA", "La"):
            arr = np.asarray(im)[..., 0]
        elif mode in ("RGB", "RGBX", "RGBA", "RGBa"):
            arr = _grey(np.asarray(im)[..., :3])
        elif mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
            arr = _grey(np.asarray(im.convert("RGB")))
        else:
            raise Unreadable(f"unsupported pixel layout (Pillow mode {mode}); export 8- or 16-bit greyscale")
    return [arr]


def _read_dicom(path: Path) -> list[np.ndarray]:
    import pydicom

    ds = pydicom.dcmread(path)
    try:
        data = ds.pixel_array
    except Exception as error:  # a compressed transfer syntax without its decoder plugin, damaged data
        raise Unreadable(f"cannot decode the DICOM pixel data ({error}); install its pydicom plugin or export it uncompressed") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    samples = int(ds.get("SamplesPerPixel", 1))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    colour = samples == 3 or photometric == "PALETTE COLOR"
    if photometric == "PALETTE COLOR":
        data = pydicom.pixels.apply_color_lut(data, ds)
    elif samples != 1 and not colour:
        raise Unreadable(f"unsupported DICOM layout ({samples} samples per pixel); export as greyscale")
    elif not colour and photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise Unreadable(f"unsupported DICOM photometric interpretation {photometric}; export as MONOCHROME2")
    if data.ndim == (3 if colour else 2):
        data = data[np.newaxis]
    if data.shape[0] != frames:
        raise Unreadable(f"decoded {data.shape[0]} frames but the header declares {frames}")
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    slope = 1.0 if slope in (None, "") else float(slope)
    intercept = 0.0 if intercept in (None, "") else float(intercept)
    if (slope, intercept) != (1.0, 0.0) and not colour:
        data = (data.astype(np.float64) * slope + intercept).astype(np.float32)
    images = [_grey(np.ascontiguousarray(frame)) for frame in data]
    return [_invert(a) for a in images] if photometric == "MONOCHROME1" else images


def read_counts(path: Path) -> list[np.ndarray]:
    """The images of one file as (H, W) float32 counts, negatives set to 0, as the app stores them.

    Raises:
        Unreadable: not TIFF/PNG/JPEG/DICOM, damaged, too small, blank or holding NaN.
    """
    try:
        with path.open("rb") as handle:
            head = handle.read(132)
    except OSError as error:
        raise Unreadable(f"cannot read the file ({error.strerror or error}); check that it exists") from None
    if head[128:132] == b"DICM":
        reader = _read_dicom
    elif head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        reader = _read_tiff
    elif head[:8] == b"\x89PNG\r\n\x1a\n" or head[:3] == b"\xff\xd8\xff":
        reader = _read_pillow
    else:
        raise Unreadable("not a TIFF, PNG, JPEG or DICOM file")
    try:
        arrays = reader(path)
    except Unreadable:
        raise
    except Exception as error:  # the decoders raise many types on damaged files
        raise Unreadable(f"cannot decode it ({type(error).__name__}: {error})") from None
    if not arrays:
        raise Unreadable("holds no image")
    images = []
    for arr in arrays:
        if arr.ndim != 2:
            raise Unreadable(f"unsupported layout {arr.shape}; export 2-D greyscale images")
        counts = np.asarray(arr, dtype=np.float32)  # the app's min-max works on float32 too
        if not np.isfinite(counts).all():
            raise Unreadable("contains NaN or infinite values; export it again without invalid pixels")
        counts = np.maximum(counts, 0.0)  # counts are never negative (the app clips at import)
        if min(counts.shape) < MIN_SIDE:
            raise Unreadable(f"implausibly small ({counts.shape[1]} x {counts.shape[0]} px; at least {MIN_SIDE} px a side)")
        if counts.min() == counts.max():
            raise Unreadable("blank image (every pixel is the same); check the export")
        images.append(counts)
    return images


# --- calibration, as bonescan_core.studystats.apply_calibration ----------------------------------

def calibrate(calibration: dict[str, Any] | None, probability: float) -> float:
    """The run's stored calibration applied to one raw probability (identity without one)."""
    method = (calibration or {}).get("method", "none")
    if method == "none":
        return probability
    p = min(max(float(probability), LOGIT_EPS), 1.0 - LOGIT_EPS)
    z = math.log(p) - math.log1p(-p)
    if method == "temperature":
        z = z / float(calibration["temperature"])
    elif method == "platt":
        z = float(calibration["intercept"]) + float(calibration["slope"]) * z
    else:
        raise ValueError(f"unknown calibration method {method!r} in config.json (known: none, temperature, platt)")
    return 0.5 * (1.0 + math.tanh(0.5 * z))


def thresholds(config: dict[str, Any]) -> list[tuple[str, float]]:
    """(name, value) of the run's decision thresholds: ``thresholds`` image/study when stored, else ``threshold``."""
    stored = config.get("thresholds") or {}
    found = [(name, float(stored[name])) for name in ("image", "study") if stored.get(name) is not None]
    if not found and config.get("threshold") is not None:
        found = [("threshold", float(config["threshold"]))]
    return found


# --- the model --------------------------------------------------------------------------------------

def load_bundle_model(bundle: Path) -> Any:
    """The bundle's model.keras, loaded in Keras's safe mode (its layers come from bonescan_layers.py)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(bundle))
    try:
        import bonescan_layers  # noqa: F401  # registers bonescan>FitScan and bonescan>BackboneInput
    finally:
        sys.path.remove(str(bundle))
    import keras

    return keras.saving.load_model(bundle / "model.keras", compile=False, safe_mode=True)


def probability(model: Any, images: list[np.ndarray]) -> float:
    """The model's raw probability for one sample: one image, or the (anterior, posterior) pair."""
    batch = [image[None, :, :, None] for image in images]
    output = model(batch if len(batch) > 1 else batch[0], training=False)
    return float(np.asarray(output).reshape(-1)[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Probability of bone metastasis from an exported bonescan model.")
    parser.add_argument("files", nargs="*", metavar="FILE",
                        help="scan files; for a two-view run, pairs: ANTERIOR POSTERIOR [ANTERIOR POSTERIOR ...]")
    parser.add_argument("--bundle", default=str(HERE), help="the bundle folder (default: this script's folder)")
    parser.add_argument("--threshold", action="store_true", help="print the run's decision threshold(s) and exit")
    parser.add_argument("--raw", action="store_true", help="print the model's probability before the run's calibration")
    args = parser.parse_args(argv)
    bundle = Path(args.bundle)
    config = json.loads((bundle / "config.json").read_text())
    if args.threshold:
        for name, value in thresholds(config):
            print(f"{name}\t{value:.6f}")
        return EXIT_OK
    if not args.files:
        parser.error("give at least one FILE (or --threshold)")
    composite = config.get("view_mode") == "composite"
    if composite and len(args.files) % 2:
        parser.error("this is a two-view run: give the ANTERIOR and POSTERIOR file of each study, in pairs")
    calibration = None if args.raw else config.get("calibration")
    model = load_bundle_model(bundle)
    status = EXIT_OK
    groups = [args.files[i : i + 2] for i in range(0, len(args.files), 2)] if composite else [[f] for f in args.files]
    for group in groups:
        try:
            images = [read_counts(Path(name)) for name in group]
        except Unreadable as error:
            print(f"predict.py: {' '.join(group)}: {error}", file=sys.stderr)
            status = EXIT_INPUT
            continue
        if composite:
            if any(len(found) != 1 for found in images):
                print(f"predict.py: {' '.join(group)}: give one image per file (the anterior, then the posterior view)",
                      file=sys.stderr)
                status = EXIT_INPUT
                continue
            samples = [("\t".join(group), [images[0][0], images[1][0]])]
        else:
            found = images[0]
            samples = [(group[0] if len(found) == 1 else f"{group[0]}#{k}", [image]) for k, image in enumerate(found, 1)]
        for name, sample in samples:
            print(f"{name}\t{calibrate(calibration, probability(model, sample)):.6f}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
