"""DICOM through pydicom (with the pylibjpeg plugins), one frame per DICOM frame."""

from __future__ import annotations

import contextlib
import io
import itertools
import math
import re
import struct
import threading
import warnings
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pydicom.pixels
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

from bonescan_core.deidentify import DicomFacts, collect_identifiers, dicom_facts
from bonescan_core.imaging.common import (
    _EXPANSION_SLACK,
    MAX_PIXELS,
    RejectedFile,
    _corrupt,
    _Decoded,
    _describe_exception,
    _expands_too_far,
    _inflated_size,
    _invert_within_range,
    _packbits_size,
    _scrub,
    _too_many_pixels,
    register_reader,
)

# --------------------------------------------------------------------------- DICOM

# What would decode each compressed transfer syntax, for the install advice.
_TS_PLUGINS: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg-libjpeg (or Pillow)",
    "1.2.840.10008.1.2.4.51": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.57": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.70": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.80": "pylibjpeg-libjpeg or pyjpegls",
    "1.2.840.10008.1.2.4.81": "pylibjpeg-libjpeg or pyjpegls",
    "1.2.840.10008.1.2.4.90": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.91": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.201": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.202": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "pylibjpeg-rle",
}
# Names for transfer syntaxes newer than pydicom 3.0's UID dictionary.
_TS_NAMES: dict[str, str] = {
    "1.2.840.10008.1.2.4.110": "JPEG XL Lossless",
    "1.2.840.10008.1.2.4.111": "JPEG XL JPEG Recompression",
    "1.2.840.10008.1.2.4.112": "JPEG XL",
    "1.2.840.10008.1.2.8.1": "Deflated Image Frame Compression",
}
_VIDEO_TS_PREFIXES = ("1.2.840.10008.1.2.4.10", "1.2.840.10008.1.2.7.")  # MPEG-2/4, HEVC, SMPTE 2110
_JPIP_TS = ("1.2.840.10008.1.2.4.94", "1.2.840.10008.1.2.4.95", "1.2.840.10008.1.2.4.204", "1.2.840.10008.1.2.4.205")



def _ts_rejection(ts: UID) -> RejectedFile | None:
    """Why the pixel data of transfer syntax ``ts`` cannot be decoded here, or None if it can."""
    name = _TS_NAMES.get(str(ts)) or (ts.name if ts.name != str(ts) else "unknown")
    label = f"transfer syntax {name} ({ts})"
    if str(ts).startswith(_VIDEO_TS_PREFIXES):
        return RejectedFile(f"{label} is video, not a still image format; export the frames uncompressed")
    if str(ts) in _JPIP_TS:
        return RejectedFile(f"{label} keeps the pixels on a JPIP server, not in the file; export it uncompressed")
    try:
        decoder = pydicom.pixels.get_decoder(ts)
    except NotImplementedError:
        return RejectedFile(
            f"{label} cannot be decoded here (no decoder for it in pydicom {pydicom.__version__}); export it uncompressed"
        )
    if decoder.is_available:
        return None
    plugin = _TS_PLUGINS.get(str(ts), "a pydicom pixel-data plugin for it")
    return RejectedFile(f"{label} cannot be decoded here; install {plugin}, or export it uncompressed")


def _check_dicom_complete(ds: Dataset, size: int, deflated: bool) -> None:
    """Reject a DICOM file that pydicom read only partly.

    pydicom does not raise at end-of-file: a value cut short is kept short, a tag
    header cut short ends the dataset, and encapsulated pixel data missing its
    delimiter is dropped with a warning (handled by the caller).
    """
    last_end = 0
    for container in (ds.file_meta, ds):
        for tag in list(container.keys()):
            elem = container.get_item(tag)
            if not isinstance(elem, RawDataElement) or elem.value is None:
                continue
            if elem.length != 0xFFFFFFFF:
                if len(elem.value) < elem.length:
                    raise _corrupt(
                        "dicom",
                        f"element {elem.tag} declares {elem.length} bytes but the file ends after {len(elem.value)}",
                    )
                end = elem.value_tell + elem.length
            else:
                end = elem.value_tell + len(elem.value) + 8  # + the sequence delimiter item
                if not deflated and end > size:
                    raise _corrupt("dicom", f"element {elem.tag} has no end delimiter")
            last_end = max(last_end, end)
    # pydicom treats fewer than 8 bytes left as the end of the file, so an element cut
    # inside its tag header vanishes silently (positions are meaningless when deflated).
    if not deflated and 0 < size - last_end < 8:
        raise _corrupt("dicom", "the file ends inside an element header")


def _dicom_int(ds: Dataset, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword, default)
    if value is None or value == "":
        if default is None:
            raise _corrupt("dicom", f"the image header has no {keyword}")
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise _corrupt("dicom", f"{keyword} is not a number") from None


def _dicom_float(value: object, default: float) -> float:
    try:
        return default if value in (None, "") else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default


_ANT_WORDS = frozenset({"ANT", "ANTERIOR"})
_POST_WORDS = frozenset({"POST", "POSTERIOR"})
# Words that make a view something other than plain anterior/posterior.
_OTHER_VIEW_WORDS = frozenset({"LAT", "LATERAL", "OBL", "OBLIQUE", "LAO", "RAO", "LPO", "RPO", "ANTERO", "POSTERO", "AP", "PA"})
# "POST" followed by one of these means "after", not "posterior".
_POST_AS_AFTER = frozenset({"THERAPY", "TX", "INJ", "INJECTION", "OP", "VOID", "VOIDING", "TREATMENT", "CONTRAST"})


def _view_from_words(words: list[str]) -> str | None:
    """'anterior'/'posterior' if exactly one of them is named, else None."""
    found = set()
    for i, word in enumerate(words):
        if word in _OTHER_VIEW_WORDS:
            return None
        if word in _ANT_WORDS:
            found.add("anterior")
        elif word in _POST_WORDS and not (i + 1 < len(words) and words[i + 1] in _POST_AS_AFTER):
            found.add("posterior")
    return found.pop() if len(found) == 1 else None


def _words(text: object) -> list[str]:
    return [w for w in re.split(r"[^A-Z]+", str(text).upper()) if w]


def _view_from_codes(codes: Iterable[Dataset]) -> str | None:
    words = [w for item in codes for w in _words(item.get("CodeMeaning", ""))]
    return _view_from_words(words)


def _dicom_views(ds: Dataset, n_frames: int) -> list[str | None]:
    """Per-frame views from NM detector information, else from unambiguous header text.

    Text (SeriesDescription, ImageComments, ImageID, ImageType) is used for
    single-frame objects only: one "ANT" in a two-frame object says nothing about
    which frame it is.
    """
    detectors = ds.get("DetectorInformationSequence") or []
    detector_views = [_view_from_codes(item.get("ViewCodeSequence") or []) for item in detectors]
    if any(detector_views):
        if n_frames == 1 and len(detector_views) == 1:
            return detector_views
        vector = ds.get("DetectorVector")
        if vector is not None:
            vector = [int(v) for v in (vector if isinstance(vector, Iterable) else [vector])]
            if len(vector) == n_frames:
                return [detector_views[v - 1] if 1 <= v <= len(detector_views) else None for v in vector]
        return [None] * n_frames
    if n_frames != 1:
        return [None] * n_frames
    root = _view_from_codes(ds.get("ViewCodeSequence") or [])
    if root:
        return [root]
    words: list[str] = []
    for keyword in ("SeriesDescription", "ImageComments", "ImageID", "ImageType"):
        value = ds.get(keyword)
        if value is None:
            continue
        values = value if isinstance(value, (list, tuple, MultiValue)) else [value]
        for item in values:
            words.extend(_words(item))
    return [_view_from_words(words)]



def _sop_class_name(ds: Dataset) -> str | None:
    uid = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
    if not uid:
        return None
    uid = UID(str(uid))
    return uid.name if uid.name != str(uid) else f"SOP class {uid}"


def _rescale(ds: Dataset) -> tuple[float, float]:
    """RescaleSlope/Intercept from the top level or the enhanced shared functional groups."""
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is None and intercept is None:
        shared = ds.get("SharedFunctionalGroupsSequence") or []
        for group in shared[:1]:
            for item in (group.get("PixelValueTransformationSequence") or [])[:1]:
                slope, intercept = item.get("RescaleSlope"), item.get("RescaleIntercept")
    return _dicom_float(slope, 1.0), _dicom_float(intercept, 0.0)


@register_reader("dicom")
def _read_dicom(path: Path, size: int) -> _Decoded:
    """DICOM via pydicom: checks header/pixel consistency, decodes every frame.

    Signed pixel data stays signed; RescaleSlope/Intercept (when not identity) gives
    float32; MONOCHROME1 is inverted; colour comes back as RGB for grey conversion.
    """
    # pydicom warns about invalid values by quoting them (names, IDs...) and names the
    # file when it ends early: record every warning in here, where none is shown, and
    # turn value validation off. Both switches are process-wide, so DICOM reads take
    # turns; otherwise two overlapping reads could leave the switches flipped for good.
    with _DICOM_LOCK, warnings.catch_warnings(record=True) as caught, _quiet_pydicom_validation():
        warnings.simplefilter("always")
        return _read_dicom_quietly(path, size, caught)


_DICOM_LOCK = threading.Lock()


@contextlib.contextmanager
def _quiet_pydicom_validation() -> Iterator[None]:
    """Stop pydicom from validating (and so warning about and logging) values while reading."""
    settings = pydicom.config.settings
    previous = settings.reading_validation_mode
    settings.reading_validation_mode = pydicom.config.IGNORE
    try:
        yield
    finally:
        settings.reading_validation_mode = previous


def _read_dicom_quietly(path: Path, size: int, caught: list[warnings.WarningMessage]) -> _Decoded:
    redact = [str(path), path.name, path.stem]
    try:
        _check_deflated_expansion(path)  # pydicom inflates a Deflated dataset without any limit
        ds = pydicom.dcmread(path, force=False)
    except RejectedFile:
        raise
    except InvalidDicomError as exc:
        raise _corrupt("dicom", _scrub(str(exc), redact)) from None
    except Exception as exc:  # pydicom raises many types on damaged files
        raise _corrupt("dicom", _scrub(_describe_exception(exc), redact)) from None
    if any("end of file" in str(w.message).lower() for w in caught):
        raise _corrupt("dicom", "the file ends inside the pixel data")
    notes: list[str] = []
    ts_raw = ds.file_meta.get("TransferSyntaxUID")
    if ts_raw:
        ts = UID(str(ts_raw))
    else:
        ts = _guess_native_transfer_syntax(ds)
        ds.file_meta.TransferSyntaxUID = ts
        notes.append(f"no transfer syntax in the header; read as {ts.name}")
    _check_dicom_complete(ds, size, deflated=ts == pydicom.uid.DeflatedExplicitVRLittleEndian)

    try:
        identifiers = collect_identifiers(ds)
        facts = dicom_facts(ds, identifiers)
    except Exception as exc:
        raise _corrupt("dicom", _scrub(_describe_exception(exc), redact)) from None
    redact = [*redact, *identifiers]  # decoder messages must not repeat header values either

    try:
        decoded = _decode_dicom_pixels(ds, ts, facts)
    except RejectedFile:
        raise
    except Exception as exc:  # decoder plugins raise RuntimeError, ValueError, ...
        raise _corrupt("dicom", _scrub(_describe_exception(exc), redact)) from None
    decoded.notes[:0] = notes
    return decoded


_DEFLATED_HEADER_BUDGET = 8 << 20
"""Most bytes the elements before the pixel data of a Deflated DICOM file may inflate to."""
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # Float, DoubleFloat, (plain) PixelData


def _check_deflated_expansion(path: Path) -> None:
    """Refuse a Deflated Explicit VR file whose dataset inflates past its declared image.

    pydicom inflates the whole dataset in one call, without an output limit, before
    parsing it. So the dataset is inflated here first, in counted pieces: up to
    :data:`_DEFLATED_HEADER_BUDGET` to read Rows, Columns, frames and bits, then on to
    (those elements) + (the declared pixel bytes) + slack, never holding more than the
    header budget. Other transfer syntaxes return at once.
    """
    with path.open("rb") as fh:
        if fh.read(132)[128:] != b"DICM":
            return  # pydicom reports it
        meta = read_dataset(fh, is_implicit_VR=False, is_little_endian=True, stop_when=lambda tag, vr, length: tag >> 16 != 2)
        if str(meta.get("TransferSyntaxUID", "")).strip() != pydicom.uid.DeflatedExplicitVRLittleEndian:
            return
        data = fh.read()
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    head = inflater.decompress(data, _DEFLATED_HEADER_BUDGET)
    stream = io.BytesIO(head)
    header = read_dataset(stream, is_implicit_VR=False, is_little_endian=True, stop_when=lambda tag, vr, length: tag in _PIXEL_TAGS)
    pixel_start = stream.tell()
    if pixel_start + 12 > len(head) and inflater.unconsumed_tail:
        raise RejectedFile(
            f"the DICOM header inflates to more than {_DEFLATED_HEADER_BUDGET >> 20} MB before its pixel data: "
            "a damaged file or a decompression bomb; export it again uncompressed"
        )

    def number(keyword: str, default: int) -> int:
        try:
            return max(int(header.get(keyword) or default), 1)
        except (TypeError, ValueError):
            return default  # the full read rejects a malformed value with a better message

    rows, columns = number("Rows", 1), number("Columns", 1)
    frames, samples, bits = number("NumberOfFrames", 1), number("SamplesPerPixel", 1), number("BitsAllocated", 64)
    if (rows, columns) == (1, 1) or rows * columns * frames * samples > MAX_PIXELS:
        return  # no image, or too big: the full read rejects it before inflating anything more
    limit = pixel_start + 12 + math.ceil(rows * columns * frames * samples * bits / 8) + _EXPANSION_SLACK
    if len(head) + _inflated_size(inflater, inflater.unconsumed_tail, limit) > limit:
        raise _expands_too_far("the Deflated DICOM dataset", f"{columns} x {rows} x {frames} image", limit)


def _check_fragment_sizes(ds: Dataset, ts: UID, rows: int, columns: int, frames: int, samples: int) -> None:
    """Every compressed frame must declare (JPEG family) or decode to (RLE) the header's size.

    Decoders size their output from the codestream, not from Rows/Columns: a JPEG frame
    declaring 20000 x 20000 makes libjpeg allocate gigabytes for a 96 x 128 header, and an
    RLE segment can repeat runs far past its declared length. Both are refused here, before
    any frame is decoded.
    """
    if not ts.is_encapsulated or ts.is_deflated:
        return
    kind = "JPEG 2000" if str(ts) in _J2K_SYNTAXES else "RLE" if ts == pydicom.uid.RLELossless else "JPEG"
    for number, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=frames), start=1):
        if kind == "RLE":
            limit = rows * columns * math.ceil(_dicom_int(ds, "BitsAllocated", 8) / 8) * samples + _EXPANSION_SLACK
            if _rle_size(frame, limit) > limit:
                raise _expands_too_far(f"frame {number} (RLE)", f"{columns} x {rows} pixels", limit)
            continue
        size = _j2k_size(frame) if kind == "JPEG 2000" else _jpeg_size(frame)
        if size is None:
            raise _corrupt("dicom", f"frame {number} has no readable {kind} size header")
        if size != (columns, rows):
            raise RejectedFile(
                f"frame {number} declares {size[0]} x {size[1]} pixels in its {kind} data but {columns} x {rows} "
                "in the DICOM header: a damaged file or a decompression bomb; export it again"
            )


_J2K_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.4.201",
        "1.2.840.10008.1.2.4.202",
        "1.2.840.10008.1.2.4.203",
    }
)
# Start-of-frame markers: SOF0-3, 5-7, 9-11, 13-15 (JPEG) and SOF55 (JPEG-LS).
_JPEG_SOF = frozenset({*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0), 0xF7})


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the start-of-frame segment of a JPEG or JPEG-LS codestream, or None."""
    if data[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _JPEG_SOF:
            if pos + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return width, height
        if marker == 0xDA:  # start of scan before any frame header
            return None
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        pos += 2 + length
    return None


def _j2k_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the SIZ segment of a JPEG 2000 codestream (JP2 boxes skipped), or None."""
    start = data.find(b"\xff\x4f\xff\x51")  # SOC, then SIZ (always second)
    if start < 0 or start + 24 > len(data):
        return None
    xsiz, ysiz, xosiz, yosiz = struct.unpack(">IIII", data[start + 8 : start + 24])
    return xsiz - xosiz, ysiz - yosiz


def _rle_size(frame: bytes, limit: int) -> int:
    """Bytes the segments of one DICOM RLE frame decode to, counted without decoding (capped past ``limit``)."""
    if len(frame) < 64:
        return 0  # the decoder rejects the header
    count, *offsets = struct.unpack("<16I", frame[:64])
    bounds = [*offsets[: min(count, 15)], len(frame)]
    total = 0
    for start, end in itertools.pairwise(bounds):
        total += _packbits_size(frame[start:end], limit - total)  # DICOM RLE is PackBits per segment
        if total > limit:
            break
    return total


def _guess_native_transfer_syntax(ds: Dataset) -> UID:
    """The transfer syntax of a file whose meta header omits it, from how pydicom read it.

    Only uncompressed pixel data (defined length) can be read without knowing the
    codec; anything else, or a dataset pydicom could not read at all (e.g. a file cut
    inside its meta header), is rejected.
    """
    pixels = ds.get_item("PixelData") if "PixelData" in ds else None
    encoding = getattr(ds, "original_encoding", (None, None))
    native = {
        (True, True): pydicom.uid.ImplicitVRLittleEndian,
        (False, True): pydicom.uid.ExplicitVRLittleEndian,
        (False, False): pydicom.uid.ExplicitVRBigEndian,
    }.get(tuple(encoding))
    defined = pixels is not None and getattr(pixels, "length", 0) != 0xFFFFFFFF
    if native is None or not defined:
        raise _corrupt("dicom", "no transfer syntax in the file meta header")
    return native


def _decode_dicom_pixels(ds: Dataset, ts: UID, facts: DicomFacts) -> _Decoded:
    """Check the pixel header against MAX_PIXELS and the data, then decode every frame."""
    pixel_keyword = next((k for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData") if k in ds), None)
    sop_name = _sop_class_name(ds)
    if pixel_keyword is None:
        if sop_name is None:
            raise _corrupt("dicom", "the header ends before the SOP class and pixel data")
        if "Image Storage" in sop_name or "Rows" in ds:
            raise _corrupt("dicom", f"{sop_name} without pixel data")
        raise RejectedFile(f"DICOM without pixel data ({sop_name}); only image objects can be imported")

    rows, columns = _dicom_int(ds, "Rows"), _dicom_int(ds, "Columns")
    frames = _dicom_int(ds, "NumberOfFrames", 1)
    samples = _dicom_int(ds, "SamplesPerPixel", 1)
    if min(rows, columns, frames, samples) < 1:
        raise _corrupt("dicom", f"the header declares {columns} x {rows} x {frames} pixels")
    bomb = _too_many_pixels(columns, rows, frames, samples)
    if bomb is not None:
        raise bomb

    if not ts.is_transfer_syntax or ts.is_compressed:
        rejection = _ts_rejection(ts)
        if rejection is not None:
            raise rejection
        _check_fragment_sizes(ds, ts, rows, columns, frames, samples)
    else:
        default_bits = {"FloatPixelData": 32, "DoubleFloatPixelData": 64}.get(pixel_keyword)
        bits = _dicom_int(ds, "BitsAllocated", default_bits)
        expected = math.ceil(rows * columns * frames * samples * bits / 8)
        if str(ds.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422":
            expected = expected // 3 * 2
        actual = len(ds[pixel_keyword].value)
        if actual not in (expected, expected + expected % 2):  # odd lengths carry one pad byte
            raise RejectedFile(
                f"pixel data is {actual} bytes but the header declares {expected} "
                f"({columns} x {rows} x {frames} frame{'s' if frames > 1 else ''}, {bits}-bit); "
                "export it again or check Rows/Columns/NumberOfFrames"
            )

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    data = ds.pixel_array
    notes: list[str] = []
    colour: str | None = None
    if photometric == "PALETTE COLOR":
        data = pydicom.pixels.apply_color_lut(data, ds)
        colour = "palette"
    elif samples == 3:
        colour = "RGB"  # pydicom converts YBR to RGB by default
    elif samples != 1:
        raise RejectedFile(f"unsupported DICOM layout ({samples} samples per pixel); export as greyscale")
    elif photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise RejectedFile(f"unsupported DICOM photometric interpretation {photometric}; export as MONOCHROME2")

    sample_dims = 3 if colour else 2
    if data.ndim == sample_dims:
        data = data[np.newaxis]
    if data.shape[0] != frames:
        raise _corrupt("dicom", f"decoded {data.shape[0]} frames but the header declares {frames}")

    slope, intercept = _rescale(ds)
    if (slope, intercept) != (1.0, 0.0) and colour is None:
        data = (data.astype(np.float64) * slope + intercept).astype(np.float32)
        notes.append(f"applied rescale slope {slope:g} and intercept {intercept:g} (float32)")
    arrays = [np.ascontiguousarray(frame) for frame in data]
    if photometric == "MONOCHROME1":
        arrays = [_invert_within_range(a) for a in arrays]
        notes.append("inverted MONOCHROME1 to MONOCHROME2")
    views = _dicom_views(ds, frames)
    return _Decoded(arrays, [colour] * len(arrays), views, notes, facts)


