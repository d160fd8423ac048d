"""Read one whole-body bone-scan file into pixel arrays plus minimal de-identified facts.

Every way a file can be unusable ends in :class:`RejectedFile`, whose message is one
line that says what is wrong and what to do next, and never contains a path or
patient data. The format is decided by the file's content; the extension must agree.

Supported formats, each handled by one reader module in a registry keyed by format name
(see :data:`READERS`):

* TIFF (:mod:`.tiff`: tifffile; Pillow/libtiff for compressions tifffile cannot decode
  without imagecodecs, e.g. LZW), one frame per page.
* PNG and JPEG (:mod:`.raster`: Pillow).
* DICOM (:mod:`.dicom`: pydicom with the pylibjpeg plugins), one frame per DICOM frame;
  what leaves its header is decided by :mod:`bonescan_core.deidentify`.

:mod:`.common` holds what they share (limits, :class:`RejectedFile`, messages, the
registry); this module sniffs the format, runs the reader and applies the checks every
frame gets (grey conversion, dtype, counts clipped at zero, sanity).

Typical use::

    try:
        scan = read_scan(path)
    except RejectedFile as error:
        show(f"{path.name}: {error}")
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from bonescan_core.deidentify import DicomFacts, dicom_age_years

# The format modules register their readers in READERS when imported.
from bonescan_core.imaging import dicom, raster, tiff  # noqa: F401
from bonescan_core.imaging.common import (
    _FORMAT_LABEL,
    _PREFERRED_EXTENSION,
    EXTENSIONS,
    MAX_PAGES,
    MAX_PIXELS,
    MIN_SIDE,
    READERS,
    RejectedFile,
    ScanFile,
    ScanFrame,
    _corrupt,
    _Decoded,
    _describe_exception,
    _lower_first,
    _scrub,
    register_reader,
)

__all__ = [
    "EXTENSIONS",
    "MAX_PAGES",
    "MAX_PIXELS",
    "MIN_SIDE",
    "READERS",
    "DicomFacts",
    "RejectedFile",
    "ScanFile",
    "ScanFrame",
    "dicom_age_years",
    "read_scan",
    "register_reader",
    "sniff_format",
]


_ALLOWED_DTYPES = (np.uint8, np.uint16, np.int16, np.int32, np.float32)


# --------------------------------------------------------------------------- sniffing

_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"II*\x00", "tiff"),
    (0, b"MM\x00*", "tiff"),
    (0, b"II+\x00", "tiff"),  # BigTIFF
    (0, b"MM\x00+", "tiff"),
    (0, b"\x89PNG\r\n\x1a\n", "png"),
    (0, b"\xff\xd8\xff", "jpeg"),
)

# Recognisable non-importable content, for a more useful message than "not an image".
_OTHER_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"BM", "a BMP image"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "a JPEG 2000 image"),
    (b"\xff\x4f\xff\x51", "a JPEG 2000 codestream"),
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"\x1f\x8b", "a gzip archive"),
)


def _sniff_all(head: bytes) -> list[str]:
    """All formats whose signature ``head`` carries, most specific first.

    DICOM comes first: a DICOM file's 128-byte preamble may itself hold a TIFF header
    (dual-personality files), and the "DICM" marker is the stronger evidence.
    """
    found = []
    if head[128:132] == b"DICM":
        found.append("dicom")
    for offset, magic, fmt in _MAGIC:
        if head[offset : offset + len(magic)] == magic and fmt not in found:
            found.append(fmt)
    return found


def sniff_format(head: bytes) -> str | None:
    """Identify an image format from the first bytes of a file.

    Args:
        head: The first bytes of the file; 132 or more are needed to see DICOM.

    Returns:
        "tiff" (classic or BigTIFF, either byte order), "png", "jpeg", "dicom"
        ("DICM" at offset 128), or None.
    """
    found = _sniff_all(head)
    return found[0] if found else None



# Colour layout of a decoded array -> (source colour model for the note, has alpha last).
# Every layout but "grey+alpha" holds R, G, B in its first three channels.
_COLOUR_LAYOUTS: dict[str, tuple[str, bool]] = {
    "RGB": ("RGB", False),
    "RGBA": ("RGB", True),
    "grey+alpha": ("grey", True),
    "palette": ("palette colour", False),
    "palette+alpha": ("palette colour", True),
    "CMYK": ("CMYK", False),
    "YCbCr": ("YCbCr", False),
    "LAB": ("LAB", False),
    "HSV": ("HSV", False),
}


def _to_grey(arr: np.ndarray, colour: str, notes: list[str]) -> np.ndarray:
    """(H, W, C) colour -> (H, W) grey with ITU-R BT.601 luma; integer dtypes kept (rounded)."""
    source, alpha = _COLOUR_LAYOUTS[colour]
    if alpha:
        notes.append("ignored the alpha channel")
    if colour == "grey+alpha":
        return arr[..., 0]
    if arr.ndim != 3 or arr.shape[-1] < 3:
        raise RejectedFile("unsupported colour layout; export as greyscale or RGB")
    # float32 is exact enough for 8/16-bit samples (rint() of the weighted sum recovers v
    # when R == G == B == v); 32-bit samples need float64.
    work = np.float64 if arr.dtype.itemsize >= 4 else np.float32
    r, g, b = (arr[..., i].astype(work) for i in range(3))
    grey = work(0.299) * r + work(0.587) * g + work(0.114) * b
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        grey = np.clip(np.rint(grey), info.min, info.max).astype(arr.dtype)
    notes.append(f"converted {source} to grey")
    return grey


def _normalise_dtype(arr: np.ndarray, notes: list[str]) -> np.ndarray:
    """Native byte order and one of uint8, uint16, int16, int32, float32."""
    if arr.dtype.byteorder not in ("=", "|"):
        arr = arr.astype(arr.dtype.newbyteorder("="))
    kind = arr.dtype
    if kind in _ALLOWED_DTYPES:
        return arr
    if kind == np.bool_:  # bilevel: 0/255 like Pillow's 1-bit conversion
        return arr.astype(np.uint8) * np.uint8(255)
    if kind == np.int8:
        return arr.astype(np.int16)
    if np.issubdtype(kind, np.integer):
        info = np.iinfo(np.int32)
        if arr.size == 0 or (arr.min() >= info.min and arr.max() <= info.max):
            return arr.astype(np.int32)
        notes.append(f"converted {kind} to float32")
        return arr.astype(np.float32)
    if np.issubdtype(kind, np.floating):
        if kind != np.float16:
            notes.append(f"converted {kind} to float32")
        with np.errstate(over="ignore"):
            return arr.astype(np.float32)
    raise RejectedFile(f"unsupported sample type {kind}; export as 8/16-bit integer or float32 greyscale")


def _clip_negative(arr: np.ndarray, notes: list[str]) -> tuple[np.ndarray, int]:
    """Counts are never negative: set values below zero to zero (dtype kept).

    Lossy JPEG 2000 rings below zero around hot spots (pydicom's NM test file JPEG2000.dcm
    reaches -30); left in, the display window and the model's min-max would start there
    instead of at zero counts. Clipping here, where pixels are read, means the thumbnail,
    the viewers and the model input all see the same counts.

    Returns:
        (array, number of pixels clipped).
    """
    if arr.dtype.kind not in "if":
        return arr, 0
    negative = arr < 0
    clipped = int(np.count_nonzero(negative))
    if clipped:
        arr = np.where(negative, arr.dtype.type(0), arr)
        notes.append(f"set {clipped:,} negative pixel value{'s' if clipped > 1 else ''} to 0 (counts are never negative)")
    return arr, clipped


def _validate(arr: np.ndarray) -> str | None:
    """Why a decoded 2-D frame is unusable, or None."""
    height, width = arr.shape
    if height < MIN_SIDE or width < MIN_SIDE:
        return (
            f"implausibly small ({width} x {height} px; a whole-body scan is at least {MIN_SIDE} px on a side); "
            "export the full-size image"
        )
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        return "contains NaN or infinite values; export it again without invalid pixels"
    low = arr.min()
    if low == arr.max():
        value = f"{float(low):g}" if arr.dtype.kind == "f" else str(int(low))
        return f"blank image (every pixel is {value}): no signal; check the export"
    return None


def _finish(fmt: str, decoded: _Decoded) -> ScanFile:
    """Grey conversion, dtype normalisation and per-frame sanity checks."""
    notes = list(decoded.notes)
    frames: list[ScanFrame] = []
    count = len(decoded.arrays)
    if count == 0:
        raise _corrupt(fmt, "no frames")
    for number, (arr, colour, view) in enumerate(zip(decoded.arrays, decoded.colour, decoded.views, strict=True), 1):
        if colour is not None:
            arr = _to_grey(arr, colour, notes)
        if arr.ndim != 2:
            raise RejectedFile(f"unsupported image layout (shape {arr.shape}); export 2-D greyscale images")
        arr = np.ascontiguousarray(_normalise_dtype(arr, notes))
        if not arr.flags.writeable:  # decoders may return views of read-only buffers
            arr = arr.copy()
        problem = _validate(arr)  # before clipping: NaN and the file's own blankness come first
        if problem is None:
            arr, clipped = _clip_negative(arr, notes)
            problem = _validate(arr)
        if problem is not None:
            raise RejectedFile(f"frame {number} of {count}: {problem}" if count > 1 else problem)
        frames.append(ScanFrame(pixels=arr, view=view, clipped=clipped))
    unique_notes = tuple(dict.fromkeys(notes))
    return ScanFile(format=fmt, frames=tuple(frames), notes=unique_notes, dicom=decoded.dicom)


def _extension_format(path: Path) -> tuple[str, str | None]:
    """(shown extension, expected format or None when the extension is not accepted).

    A purely numeric suffix (DICOM files are often named by UID, "1.2.840.1234.5")
    counts as no extension.
    """
    suffix = path.suffix.lower()
    if re.fullmatch(r"\.\d+", suffix):
        suffix = ""
    return suffix, EXTENSIONS.get(suffix)


def read_scan(path: Path) -> ScanFile:
    """Read one scan file.

    Args:
        path: A TIFF, PNG, JPEG or DICOM file. The content decides the format; the
            extension must agree (files without an extension must be DICOM).

    Returns:
        The decoded frames (see :class:`ScanFrame` for shapes and dtypes), notes and,
        for DICOM, the minimal header facts.

    Raises:
        RejectedFile: For every unusable file (also unreadable paths); the message is
            one line without path or patient data and says what to do next.
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(132)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise RejectedFile(f"cannot read the file ({_lower_first(reason)}); check that it exists and is readable") from None
    if size == 0:
        raise RejectedFile("empty file (0 bytes); export it again")

    candidates = _sniff_all(head)
    suffix, expected = _extension_format(path)
    shown = f"the extension is {path.suffix}" if path.suffix else "the file has no extension"
    if not candidates:
        other = next((label for magic, label in _OTHER_MAGIC if head.startswith(magic)), None)
        if other is not None:
            raise RejectedFile(f"not an image this tool reads ({other}); export the scan as TIFF, PNG, JPEG or DICOM")
        hint = "; a DICOM file needs the 'DICM' marker at byte 128, so export it again" if expected == "dicom" else ""
        raise RejectedFile(f"not an image (TIFF, PNG, JPEG or DICOM expected){hint}")
    if expected in candidates:
        fmt = expected
    else:
        fmt = candidates[0]
        raise RejectedFile(f"content is {_FORMAT_LABEL[fmt]} but {shown}; rename it to {_PREFERRED_EXTENSION[fmt]}")

    reader = READERS[fmt]
    try:
        decoded = reader(path, size)
        return _finish(fmt, decoded)
    except RejectedFile:
        raise
    except MemoryError:
        raise RejectedFile("too large to decode in the available memory; export a smaller image") from None
    except Exception as exc:  # the contract: bad content never escapes as anything else
        raise _corrupt(fmt, _scrub(_describe_exception(exc), [str(path), path.name, path.stem])) from None

