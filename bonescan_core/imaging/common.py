"""What every format reader shares: limits, the rejection, the decoded shapes, messages, the registry.

Package-internal; the public names are re-exported by :mod:`bonescan_core.imaging`.
"""

from __future__ import annotations

import lzma
import re
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bonescan_core.deidentify import DicomFacts
from bonescan_core.errors import InputError

MIN_SIDE = 64
"""Smallest plausible side of a whole-body scan, in pixels."""

MAX_PIXELS = 40_000_000
"""Most pixels (all frames and samples together) a file may declare; checked before decoding."""

MAX_PAGES = 256
"""Most TIFF pages (directories) a file may hold; counted lazily before any page is listed in full."""

_EXPANSION_SLACK = 1 << 16
"""Bytes a compressed piece may expand beyond its declared size (padding, trailing elements)."""

EXTENSIONS: dict[str, str] = {
    ".tif": "tiff",
    ".tiff": "tiff",
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".dcm": "dicom",
    ".dicom": "dicom",
    ".ima": "dicom",
    "": "dicom",
}
"""Accepted (lower-case) extensions and the format their content must have."""

# Extension suggested in rename advice.
_PREFERRED_EXTENSION = {"tiff": ".tif", "png": ".png", "jpeg": ".jpg", "dicom": ".dcm"}
_FORMAT_LABEL = {"tiff": "TIFF", "png": "PNG", "jpeg": "JPEG", "dicom": "DICOM"}

_MAX_MESSAGE_DETAIL = 140  # characters of a decoder's own message kept in a rejection


class RejectedFile(InputError):
    """A file that cannot be imported; str(error) says why and what to do next (one line, no path)."""


@dataclass(frozen=True)
class ScanFrame:
    """One 2-D image of a scan.

    Attributes:
        pixels: Array of shape (H, W), dtype uint8, uint16, int16, int32 (signed DICOM
            stays signed) or float32; every value finite and >= 0 (counts); not constant.
        view: "anterior" or "posterior" when file-internal metadata (DICOM only) says
            so unambiguously, else None. File names are never consulted.
        clipped: How many pixels were below zero in the file and were set to zero
            (ringing of lossy compression, a negative rescale intercept).
    """

    pixels: np.ndarray
    view: str | None
    clipped: int = 0



@dataclass(frozen=True)
class ScanFile:
    """A decoded scan file.

    Attributes:
        format: "tiff", "png", "jpeg" or "dicom".
        frames: One frame per TIFF page / DICOM frame; at least one.
        notes: Short notes for the import line, e.g. "converted RGB to grey".
        dicom: Facts from the DICOM header, None for other formats.
    """

    format: str
    frames: tuple[ScanFrame, ...]
    notes: tuple[str, ...]
    dicom: DicomFacts | None


@dataclass
class _Decoded:
    """What a reader hands back before the common checks.

    Attributes:
        arrays: One array per frame, (H, W) or (H, W, samples) for colour.
        colour: For each array, None (grey) or a key of :data:`_COLOUR_LAYOUTS`
            saying how the last axis is laid out and what the source colour model was.
        views: One entry per array.
        notes: Notes gathered so far.
        dicom: Header facts (DICOM reader only).
    """

    arrays: list[np.ndarray]
    colour: list[str | None]
    views: list[str | None]
    notes: list[str] = field(default_factory=list)
    dicom: DicomFacts | None = None



# --------------------------------------------------------------------------- messages


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _scrub(text: str, redact: Iterable[str]) -> str:
    """Remove file paths, names and known identifiers from a decoder's message.

    Decoders quote file names (Pillow, pydicom warnings) and occasionally values; a
    file name can itself be patient data, so none of it may reach the message.
    """
    text = _one_line(text)
    text = re.sub(r"<_io\.\w+ name=[^>]*>", "the file", text)
    for secret in sorted({s for s in redact if s and len(s) >= 2}, key=len, reverse=True):
        # Whole words only, so a short name part does not mangle ordinary words.
        text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])", "…", text)
    if len(text) > _MAX_MESSAGE_DETAIL:
        text = text[: _MAX_MESSAGE_DETAIL - 1].rstrip() + "…"
    return text


def _corrupt(fmt: str, detail: str) -> RejectedFile:
    return RejectedFile(f"truncated or corrupt {_FORMAT_LABEL[fmt]} ({detail}); export it again")


def _describe_exception(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _too_many_pixels(width: int, height: int, frames: int = 1, samples: int = 1) -> RejectedFile | None:
    """The decompression-bomb rejection for declared dimensions, or None when within budget."""
    total = width * height * frames * samples
    if total <= MAX_PIXELS:
        return None
    extra = f" x {samples} samples" if samples > 1 else ""
    return RejectedFile(
        f"declares {width} x {height} x {frames} pixels{extra}, over the "
        f"{MAX_PIXELS // 1_000_000}-megapixel limit; export a smaller image or one frame per file"
    )


def _expands_too_far(what: str, declared: str, limit: int) -> RejectedFile:
    """The rejection for compressed data that inflates past what its header declares."""
    return RejectedFile(
        f"{what} expands to more than its declared {declared} (over {limit:,} bytes): "
        "a damaged file or a decompression bomb; export it again uncompressed"
    )


def _inflated_size(inflater: zlib._Decompress | lzma.LZMADecompressor, data: bytes, limit: int) -> int:
    """Bytes that ``data`` inflates to with ``inflater``, counted in 1 MiB pieces that are dropped.

    Returns:
        The inflated size, or ``limit + 1`` as soon as it is known to exceed ``limit``:
        memory stays at one piece, whatever the data claims.
    """
    piece = 1 << 20
    total = 0
    if isinstance(inflater, lzma.LZMADecompressor):
        total += len(inflater.decompress(data, piece))
        while total <= limit and not inflater.eof and not inflater.needs_input:
            total += len(inflater.decompress(b"", piece))
        return total
    pending = data
    while True:
        total += len(inflater.decompress(pending, piece))
        pending = inflater.unconsumed_tail
        if total > limit or not pending:
            break
    if total <= limit:
        total += len(inflater.flush())  # bounded: every input byte has been consumed
    return min(total, limit + 1)


# --------------------------------------------------------------------------- registry

Reader = Callable[[Path, int], _Decoded]
READERS: dict[str, Reader] = {}
"""Format name -> reader(path, file_size). Readers raise RejectedFile for bad content."""


def register_reader(fmt: str) -> Callable[[Reader], Reader]:
    """Decorator registering ``reader`` as the decoder for ``fmt`` (replacing any other)."""

    def decorate(reader: Reader) -> Reader:
        READERS[fmt] = reader
        return reader

    return decorate



def _packbits_size(data: bytes, limit: int) -> int:
    """Bytes a PackBits strip decodes to (stops counting once over ``limit``), without decoding it."""
    total = pos = 0
    while pos < len(data) and total <= limit:
        header = data[pos]
        if header < 128:  # copy the next header + 1 bytes
            total += header + 1
            pos += header + 2
        elif header > 128:  # repeat the next byte 257 - header times
            total += 257 - header
            pos += 2
        else:  # 128: no-op
            pos += 1
    return total



def _invert_within_range(arr: np.ndarray) -> np.ndarray:
    """Invert brightness as ``min + max - v``: same dtype, same value range, no overflow."""
    if arr.size == 0:
        return arr
    low, high = arr.min(), arr.max()
    if np.issubdtype(arr.dtype, np.floating):
        return (low + high - arr).astype(arr.dtype)
    return (int(low) + int(high) - arr.astype(np.int64)).astype(arr.dtype)


