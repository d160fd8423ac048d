"""Read one whole-body bone-scan file into pixel arrays plus minimal de-identified facts.

Every way a file can be unusable ends in :class:`RejectedFile`, whose message is one
line that says what is wrong and what to do next, and never contains a path or
patient data. The format is decided by the file's content; the extension must agree.

Supported formats, each handled by one reader in a registry keyed by format name
(see :data:`READERS`):

* TIFF (tifffile; Pillow/libtiff for compressions tifffile cannot decode without
  imagecodecs, e.g. LZW), one frame per page.
* PNG and JPEG (Pillow).
* DICOM (pydicom with the pylibjpeg plugins), one frame per DICOM frame.

Typical use::

    try:
        scan = read_scan(path)
    except RejectedFile as error:
        show(f"{path.name}: {error}")
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import itertools
import logging
import lzma
import math
import os
import re
import struct
import threading
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import tifffile
from PIL import Image, ImageFile
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

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

# Pillow must never hand back a partially decoded image; the module relies on this.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# tifffile logs (rather than raises) some damage this module detects and reports itself;
# without any logging configured those lines would reach stderr via logging.lastResort.
logging.getLogger("tifffile").addHandler(logging.NullHandler())

_ALLOWED_DTYPES = (np.uint8, np.uint16, np.int16, np.int32, np.float32)
_MAX_MESSAGE_DETAIL = 140  # characters of a decoder's own message kept in a rejection


class RejectedFile(ValueError):
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
class DicomFacts:
    """The only things that leave a DICOM header.

    Raw identifiers are here ONLY so the caller can hash them; never store or print
    them. They are excluded from ``repr`` so that logging a ScanFile does not leak them.

    Attributes:
        study_uid: StudyInstanceUID, or None.
        patient_id: PatientID, or None.
        identifiers: Every identifying string value in the header (names and their
            components, IDs, instance UIDs, accession, institution, physicians, dates
            and times, address...) and every free-text value (LO, SH, LT, ST, UT, UC, AE)
            of four or more characters, so the caller can make sure none of them reaches
            storage. Well-known DICOM UIDs (1.2.840.10008.*) are left out.
        sex: "F", "M", "O" or None.
        age_years: From PatientAge ("045Y" -> 45, "006M" -> 0), else from
            PatientBirthDate and StudyDate; None if unknown or implausible.
        study_year: Year of the study only, or None.
    """

    study_uid: str | None = field(repr=False)
    patient_id: str | None = field(repr=False)
    identifiers: tuple[str, ...] = field(repr=False)
    sex: str | None
    age_years: int | None
    study_year: int | None


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


# --------------------------------------------------------------------------- Pillow (PNG, JPEG)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_png_structure(path: Path, size: int) -> tuple[int, int, int, int]:
    """Walk the PNG chunk list: every chunk inside the file, CRCs right, IEND present.

    Pillow stops reading after the last IDAT, so a PNG that lost its tail (or has a
    damaged chunk) decodes silently; this walk is what makes truncation visible.
    The walk checks the IHDR dimensions against MAX_PIXELS first, before reading on.

    Returns:
        (width, height, bit depth, colour type) from IHDR.
    """
    with path.open("rb") as fh:
        fh.seek(len(_PNG_SIGNATURE))
        pos = len(_PNG_SIGNATURE)
        ihdr: tuple[int, int, int, int] | None = None
        while True:
            header = fh.read(8)
            if len(header) < 8:
                raise _corrupt("png", f"the file ends at byte {pos} before the IEND chunk")
            length, ctype = struct.unpack(">I4s", header)
            name = ctype.decode("latin-1")
            if not re.fullmatch(rb"[A-Za-z]{4}", ctype) or length > 2**31 - 1:
                raise _corrupt("png", f"invalid chunk header at byte {pos}")
            if pos + 12 + length > size:
                raise _corrupt("png", f"chunk {name} runs {pos + 12 + length - size} bytes past the end of the file")
            if ihdr is None:
                if ctype != b"IHDR" or length != 13:
                    raise _corrupt("png", "the IHDR chunk is missing")
                data = fh.read(13)
                width, height, depth, colour = struct.unpack(">IIBB", data[:10])
                ihdr = (width, height, depth, colour)
                bomb = _too_many_pixels(width, height)
                if bomb is not None:
                    raise bomb
                crc = zlib.crc32(ctype + data)
            else:
                crc = zlib.crc32(ctype)
                remaining = length
                while remaining:
                    block = fh.read(min(remaining, 1 << 20))
                    crc = zlib.crc32(block, crc)
                    remaining -= len(block)
            (stored,) = struct.unpack(">I", fh.read(4))
            if stored != crc:
                raise _corrupt("png", f"checksum mismatch in chunk {name}")
            pos += 12 + length
            if ctype == b"IEND":
                return ihdr


def _pillow_to_array(im: Image.Image, notes: list[str]) -> tuple[np.ndarray, str | None]:
    """Turn a loaded Pillow image into a numpy array plus its colour layout.

    Returns:
        (array, colour): array (H, W) for grey modes, (H, W, C) for colour; colour is
        None or a layout of :data:`_COLOUR_LAYOUTS`. 16-bit grey modes come back as
        uint16 with values unchanged.
    """
    mode = im.mode
    if mode in ("L", "F"):
        return np.asarray(im), None
    if mode.startswith("I;16"):
        # Pillow's I;16 variants carry their byte order (and sign) in the dtype; make it native.
        arr = np.asarray(im)
        return arr.astype(arr.dtype.newbyteorder("=")), None
    if mode == "I":
        arr = np.asarray(im)
        # 16-bit PNGs and TIFFs may surface as 32-bit "I": give uint16 back exactly.
        if arr.size and arr.min() >= 0 and arr.max() <= 0xFFFF:
            return arr.astype(np.uint16), None
        return arr, None
    if mode == "1":
        return np.asarray(im.convert("L")), None
    if mode in ("LA", "La"):
        return np.asarray(im), "grey+alpha"
    if mode in ("RGB", "RGBX"):
        return np.asarray(im)[..., :3], "RGB"
    if mode in ("RGBA", "RGBa"):
        return np.asarray(im), "RGBA"
    if mode in ("P", "PA"):
        if mode == "PA" or "transparency" in im.info:
            return np.asarray(im.convert("RGBA")), "palette+alpha"
        return np.asarray(im.convert("RGB")), "palette"
    if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(im.convert("RGB")), mode
    raise RejectedFile(f"unsupported pixel layout (Pillow mode {mode}); export as 8- or 16-bit greyscale")


def _pillow_decode(path: Path, fmt: str, frame_index: int = 0) -> tuple[np.ndarray, str | None, list[str]]:
    """Open, bomb-check and fully decode one image (or TIFF page) with Pillow.

    Returns:
        (array, colour layout, notes); see :func:`_pillow_to_array`.
    """
    notes: list[str] = []
    pillow_format = {"png": "PNG", "jpeg": "JPEG", "tiff": "TIFF"}[fmt]
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # in case another module relaxed it since import
    with path.open("rb") as fh:
        # Pillow raises over 2 x Image.MAX_IMAGE_PIXELS (and only warns above 1 x, which is
        # already over MAX_PIXELS and rejected below, before decoding).
        try:
            im = Image.open(fh, formats=[pillow_format])
        except Image.DecompressionBombError as exc:
            match = re.search(r"\((\d+) pixels\)", str(exc))
            declared = f"{int(match.group(1)):,} pixels" if match else "too many pixels"
            raise RejectedFile(
                f"declares {declared}, over the {MAX_PIXELS // 1_000_000}-megapixel limit; export a smaller image"
            ) from None
        except Exception as exc:  # Pillow raises many types for broken headers
            raise _corrupt(fmt, _scrub(_describe_exception(exc), [str(path), path.name, path.stem])) from None
        with im:
            width, height = im.size
            frames = getattr(im, "n_frames", 1) if fmt != "tiff" else 1
            bomb = _too_many_pixels(width, height, frames)
            if bomb is not None:
                raise bomb
            try:
                if frame_index:
                    im.seek(frame_index)
                im.load()  # force the full decode so truncation surfaces here
                arr, colour = _pillow_to_array(im, notes)
            except RejectedFile:
                raise
            except Exception as exc:
                raise _corrupt(fmt, _scrub(_describe_exception(exc), [str(path), path.name, path.stem])) from None
            if frames > 1:
                notes.append(f"animated {_FORMAT_LABEL[fmt]}: imported the first of {frames} frames only")
            return np.array(arr), colour, notes


@register_reader("png")
def _read_png(path: Path, size: int) -> _Decoded:
    """PNG: chunk-structure check, then Pillow. 8/16-bit grey exact; colour -> grey later."""
    _width, _height, depth, colour_type = _check_png_structure(path, size)
    arr, colour, notes = _pillow_decode(path, "png")
    if depth == 16 and colour_type in (2, 4, 6):
        notes.append("16-bit colour was reduced to 8 bits by the decoder")
    return _Decoded([arr], [colour], [None], notes)


@register_reader("jpeg")
def _read_jpeg(path: Path, size: int) -> _Decoded:
    """JPEG via Pillow (8-bit grey or colour; lossy, so values are approximate)."""
    arr, colour, notes = _pillow_decode(path, "jpeg")
    return _Decoded([arr], [colour], [None], notes)


# --------------------------------------------------------------------------- TIFF

_TIFF_MINISWHITE, _TIFF_MINISBLACK, _TIFF_RGB, _TIFF_PALETTE = 0, 1, 2, 3
_TIFF_YCBCR, _TIFF_JPEG_COMPRESSIONS = 6, (6, 7)


def _tiff_layout(page: tifffile.TiffPage) -> str | None:
    """Colour layout of a TIFF page (see :class:`_Decoded`), or raise RejectedFile."""
    photometric = int(page.photometric)
    samples = int(page.samplesperpixel)
    # One extra sample that is declared alpha (1 associated, 2 unassociated) may be dropped;
    # an "unspecified" extra sample is real data we cannot place.
    alpha = tuple(int(e) for e in (page.extrasamples or ())) in ((1,), (2,))
    if photometric in (_TIFF_MINISBLACK, _TIFF_MINISWHITE, _TIFF_PALETTE):
        if samples == 1:
            return None
        if samples == 2 and alpha and photometric != _TIFF_PALETTE:
            return "grey+alpha"
    elif photometric == _TIFF_RGB or (photometric == _TIFF_YCBCR and page.compression in _TIFF_JPEG_COMPRESSIONS):
        # tifffile hands JPEG-compressed YCbCr back as RGB.
        if samples == 3:
            return "RGB"
        if samples == 4 and alpha:
            return "RGBA"
    else:
        name = getattr(page.photometric, "name", str(photometric))
        raise RejectedFile(f"unsupported TIFF colour model ({name}); export as greyscale or RGB")
    raise RejectedFile(f"unsupported TIFF layout ({samples} samples per pixel); export as greyscale or RGB")


# Bytes per value of each TIFF field type (BYTE, ASCII, SHORT, LONG, RATIONAL, ..., IFD8).
_TIFF_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8}


def _check_tiff_directories(tif: tifffile.TiffFile, pages: list[tifffile.TiffPage], size: int) -> None:
    """Walk every image directory (IFD) in the raw file.

    tifffile logs (does not raise) when the chain of IFDs points past the end of the
    file, and silently drops tags whose values lie past it; either way it returns a
    plausible but incomplete image. So: every IFD, and every value it stores out of
    line, must lie inside the file, and the last IFD must end the chain.
    """
    fmt = tif.tiff
    with open(tif.filehandle.path, "rb") as fh:
        next_ifd = 0
        for number, page in enumerate(pages, start=1):
            fh.seek(page.offset)
            raw = fh.read(fmt.tagnosize)
            if len(raw) < fmt.tagnosize:
                raise _corrupt("tiff", f"image directory {number} is cut off")
            (tagno,) = struct.unpack(fmt.tagnoformat, raw)
            table = fh.read(tagno * fmt.tagsize + fmt.offsetsize)
            if len(table) < tagno * fmt.tagsize + fmt.offsetsize:
                raise _corrupt("tiff", f"image directory {number} is cut off")
            for entry in range(tagno):
                chunk = table[entry * fmt.tagsize : (entry + 1) * fmt.tagsize]
                tag, kind, count, value = struct.unpack(fmt.tagheaderformat, chunk)
                nbytes = count * _TIFF_TYPE_SIZES.get(kind, 0)
                if nbytes > fmt.tagoffsetthreshold:
                    (offset,) = struct.unpack(fmt.offsetformat, value)
                    if offset + nbytes > size:
                        raise _corrupt("tiff", f"tag {tag} of page {number} points past the end of the file")
            (next_ifd,) = struct.unpack(fmt.offsetformat, table[-fmt.offsetsize :])
    if next_ifd != 0:
        raise _corrupt("tiff", "the chain of pages points past the end of the file or is broken")


def _check_tiff_strips(pages: list[tifffile.TiffPage], size: int) -> None:
    """Every strip/tile of the pages to decode must lie inside the file.

    tifffile fills strips whose offset or byte count is zero with a "nodata" value,
    and an uncompressed page whose strips are too short for its declared size would
    be read from whatever follows.
    """
    for number, page in enumerate(pages, start=1):
        offsets, counts = page.dataoffsets, page.databytecounts
        if len(offsets) == 0 or len(offsets) != len(counts):
            raise _corrupt("tiff", f"page {number} has no usable strip or tile table")
        for offset, count in zip(offsets, counts, strict=True):
            if offset == 0 or count == 0:
                raise _corrupt("tiff", f"page {number} has missing strips or tiles")
            if offset + count > size:
                raise _corrupt("tiff", f"page {number} needs data up to byte {offset + count} but the file has {size}")
        if page.compression == 1 and page.bitspersample % 8 == 0:
            expected = page.imagelength * page.imagewidth * page.imagedepth * page.samplesperpixel * page.bitspersample // 8
            if sum(counts) < expected:
                raise _corrupt("tiff", f"page {number} holds {sum(counts)} bytes of pixels but declares {expected}")


# TIFF compressions tifffile decodes here and whose output this module can bound before
# decoding: none, Adobe/old deflate (zlib), PackBits, LZMA. Every other compression is
# decoded by Pillow's libtiff, which writes into a buffer of the declared page size.
_TIFF_NONE, _TIFF_DEFLATES, _TIFF_PACKBITS, _TIFF_LZMA = 1, (8, 32946), 32773, 34925
_TIFF_BOUNDED_COMPRESSIONS = frozenset({_TIFF_NONE, *_TIFF_DEFLATES, _TIFF_PACKBITS, _TIFF_LZMA})


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


def _check_tiff_expansion(path: Path, pages: list[tifffile.TiffPage]) -> None:
    """Every compressed strip/tile must decode to no more than its declared size (plus slack).

    tifffile inflates a strip completely before cutting it to size, so a strip of a few
    hundred KB of zlib data could otherwise fill gigabytes. Each strip is inflated here in
    1 MiB pieces that are counted and dropped, before tifffile decodes it for real.
    """
    with path.open("rb") as fh:
        for number, page in enumerate(pages, start=1):
            compression = int(page.compression)
            if compression == _TIFF_NONE or compression not in _TIFF_BOUNDED_COMPRESSIONS:
                continue
            # page.chunks: the shape of one strip/tile (samples included when interleaved).
            limit = math.prod(page.chunks) * max(1, math.ceil(page.bitspersample / 8)) + _EXPANSION_SLACK
            for offset, count in zip(page.dataoffsets, page.databytecounts, strict=True):
                fh.seek(offset)
                data = fh.read(count)
                if compression == _TIFF_PACKBITS:
                    inflated = _packbits_size(data, limit)
                elif compression == _TIFF_LZMA:
                    inflated = _inflated_size(lzma.LZMADecompressor(), data, limit)
                else:
                    inflated = _inflated_size(zlib.decompressobj(), data, limit)
                if inflated > limit:
                    raise _expands_too_far(
                        f"TIFF page {number}", f"{page.imagewidth} x {page.imagelength} pixels", limit
                    )


def _tiff_page_array(page: tifffile.TiffPage) -> np.ndarray:
    """Decode one TIFF page with tifffile into (H, W) or (H, W, samples)."""
    arr = page.asarray(squeeze=False)  # (separate samples, depth, H, W, contiguous samples)
    sep, depth, height, width, contig = arr.shape
    if depth != 1:
        raise RejectedFile(f"TIFF page is a {depth}-slice volume; export 2-D images")
    arr = np.moveaxis(arr[:, 0], 0, -1).reshape(height, width, contig * sep)
    return arr[..., 0] if arr.shape[-1] == 1 else arr


def _apply_tiff_palette(arr: np.ndarray, page: tifffile.TiffPage) -> np.ndarray:
    """Map palette indices through the TIFF colormap -> (H, W, 3), uint8 for 8-bit palettes."""
    cmap = page.colormap  # (3, 2**bits) uint16
    if cmap is None:
        raise _corrupt("tiff", "palette image without a colour map")
    index = np.clip(arr.astype(np.int64), 0, cmap.shape[1] - 1)
    rgb = np.moveaxis(cmap[:, index], 0, -1)
    if page.bitspersample <= 8:
        rgb = np.rint(rgb / 257.0).astype(np.uint8)
    return rgb


@register_reader("tiff")
def _read_tiff(path: Path, size: int) -> _Decoded:
    """TIFF via tifffile, one frame per page (reduced-resolution/mask pages skipped).

    Compressions that tifffile cannot decode without imagecodecs (LZW, JPEG, ...) are
    decoded page by page with Pillow's libtiff instead.
    """
    redact = [str(path), path.name, path.stem]
    notes: list[str] = []
    arrays: list[np.ndarray] = []
    colours: list[str | None] = []
    try:
        with tifffile.TiffFile(path) as tif:
            # Pages load one by one as the iterator asks: stop one past the cap, so a file of
            # thousands of tiny pages costs no more than MAX_PAGES of them.
            all_pages = list(itertools.islice(tif.pages, MAX_PAGES + 1))
            if len(all_pages) > MAX_PAGES:
                raise RejectedFile(
                    f"TIFF holds more than {MAX_PAGES} pages; export the whole-body views as separate files"
                )
            if not all_pages:
                raise _corrupt("tiff", "no image directory could be read")
            keep = [
                (i, p)
                for i, p in enumerate(all_pages)
                if not (int(getattr(p, "subfiletype", 0)) & 0b101)  # reduced-resolution or mask
            ]
            if len(keep) < len(all_pages):
                skipped = len(all_pages) - len(keep)
                notes.append(f"skipped {skipped} thumbnail/mask page{'s' if skipped > 1 else ''}")
            if not keep:
                raise RejectedFile("TIFF holds only thumbnails or masks; export the full-size image")
            # Decompression-bomb check on declared shapes, before any pixel is decoded.
            total = sum(p.imagelength * p.imagewidth * p.imagedepth * p.samplesperpixel for _, p in keep)
            if total > MAX_PIXELS:
                big = max((p for _, p in keep), key=lambda p: p.imagelength * p.imagewidth)
                frames = sum(p.imagedepth for _, p in keep)
                raise _too_many_pixels(big.imagewidth, big.imagelength, frames, big.samplesperpixel) or RejectedFile(
                    f"declares {total:,} pixels, over the {MAX_PIXELS // 1_000_000}-megapixel limit; "
                    "export a smaller image or one frame per file"
                )
            _check_tiff_directories(tif, all_pages, size)
            _check_tiff_strips([p for _, p in keep], size)
            _check_tiff_expansion(path, [p for _, p in keep])
            for index, page in keep:
                layout = _tiff_layout(page)
                if page.compression in _TIFF_BOUNDED_COMPRESSIONS:
                    arr = _tiff_page_array(page)
                    if int(page.photometric) == _TIFF_PALETTE:
                        arr, layout = _apply_tiff_palette(arr, page), "palette"
                    inverted_already = False
                else:
                    arr, layout, more = _pillow_decode(path, "tiff", index)
                    notes.extend(more)
                    inverted_already = True  # Pillow applies white-is-zero itself
                    if arr.shape[:2] != (page.imagelength, page.imagewidth):
                        raise _corrupt("tiff", "decoded page size differs from its header")
                if int(page.photometric) == _TIFF_MINISWHITE and layout is None and not inverted_already:
                    arr = _invert_within_range(arr)
                    notes.append("inverted white-is-zero TIFF to black-is-zero")
                arrays.append(arr)
                colours.append(layout)
    except RejectedFile:
        raise
    except Exception as exc:  # tifffile raises TiffFileError, ValueError, IndexError, ...
        raise _corrupt("tiff", _scrub(_describe_exception(exc), redact)) from None
    return _Decoded(arrays, colours, [None] * len(arrays), notes)


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

# Named non-PN/UI/DA/DT/TM attributes that identify a patient, institution, person or device.
_IDENTIFYING_KEYWORDS = frozenset(
    {
        "PatientID",
        "IssuerOfPatientID",
        "OtherPatientIDs",
        "PatientAddress",
        "PatientTelephoneNumbers",
        "PatientTelecomInformation",
        "MedicalRecordLocator",
        "MilitaryRank",
        "BranchOfService",
        "RegionOfResidence",
        "CountryOfResidence",
        "EthnicGroup",
        "Occupation",
        "PatientComments",
        "AdditionalPatientHistory",
        "PatientState",
        "InsurancePlanIdentification",
        "InstitutionName",
        "InstitutionAddress",
        "InstitutionalDepartmentName",
        "ReferringPhysicianAddress",
        "ReferringPhysicianTelephoneNumbers",
        "PersonAddress",
        "PersonTelephoneNumbers",
        "AccessionNumber",
        "StudyID",
        "AdmissionID",
        "RequestedProcedureID",
        "ScheduledProcedureStepID",
        "PerformedProcedureStepID",
        "FillerOrderNumberImagingServiceRequest",
        "PlacerOrderNumberImagingServiceRequest",
        "StationName",
        "DeviceSerialNumber",
        "DeviceUID",
        "DetectorID",
        "PlateID",
        "CassetteID",
        "GantryID",
        "ImageComments",
        "StudyComments",
        "ContentCreatorName",
        "ResponsibleOrganization",
        "ResponsiblePerson",
        "IssuerOfAdmissionID",
        "ServiceEpisodeID",
        "ClinicalTrialSubjectID",
        "ClinicalTrialSponsorName",
        "ClinicalTrialSiteName",
        "ClinicalTrialSiteID",
        "ClinicalTrialProtocolID",
        "TextValue",
    }
)
_IDENTIFYING_VRS = frozenset({"PN", "UI", "DA", "DT", "TM"})
# Free text (descriptions, comments, labels, codes, AE titles) can hold anything, names
# included; PS3.15 Annex E removes nearly all of it. Its values of _MIN_FREE_TEXT or more
# characters count as identifiers too, so that a file named after, say, its StudyDescription
# is stored under a neutral name.
_FREE_TEXT_VRS = frozenset({"LO", "SH", "LT", "ST", "UT", "UC", "AE"})
_MIN_FREE_TEXT = 4
_STANDARD_UID_ROOT = "1.2.840.10008."  # the DICOM standard's own UIDs identify nobody


def _ts_rejection(ts: UID) -> RejectedFile | None:
    """Why the pixel data of transfer syntax ``ts`` cannot be decoded here, or None if it can."""
    from pydicom.pixels import get_decoder

    name = _TS_NAMES.get(str(ts)) or (ts.name if ts.name != str(ts) else "unknown")
    label = f"transfer syntax {name} ({ts})"
    if str(ts).startswith(_VIDEO_TS_PREFIXES):
        return RejectedFile(f"{label} is video, not a still image format; export the frames uncompressed")
    if str(ts) in _JPIP_TS:
        return RejectedFile(f"{label} keeps the pixels on a JPIP server, not in the file; export it uncompressed")
    try:
        decoder = get_decoder(ts)
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


def _digits_date(value: object) -> _dt.date | None:
    """A DA/DT value (YYYYMMDD, or old YYYY.MM.DD) as a date, or None."""
    digits = re.sub(r"[^0-9]", "", str(value or ""))[:8]
    if len(digits) < 8:
        return None
    try:
        return _dt.date(int(digits[:4]), int(digits[4:6]), int(digits[6:8]))
    except ValueError:
        return None


def dicom_age_years(patient_age: str | None, birth_date: str | None = None, study_date: str | None = None) -> int | None:
    """Age in whole years at the study.

    Args:
        patient_age: DICOM AS value such as "045Y", "006M", "010W", "003D" (a bare
            number is read as years).
        birth_date: DICOM DA value YYYYMMDD, used when patient_age is unusable.
        study_date: DICOM DA value YYYYMMDD of the study.

    Returns:
        Age in years (0..130), or None when unknown or implausible.
    """
    if patient_age:
        match = re.fullmatch(r"\s*(\d{1,3})\s*([DWMY]?)\s*", str(patient_age), flags=re.IGNORECASE)
        if match:
            number, unit = int(match.group(1)), (match.group(2) or "Y").upper()
            years = {"Y": number, "M": number // 12, "W": number // 52, "D": number // 365}[unit]
            return years if 0 <= years <= 130 else None
    born, seen = _digits_date(birth_date), _digits_date(study_date)
    if born is None or seen is None:
        return None
    years = seen.year - born.year - ((seen.month, seen.day) < (born.month, born.day))
    return years if 0 <= years <= 130 else None


def _collect_identifiers(ds: Dataset) -> tuple[str, ...]:
    """Every identifying string in ``ds`` (recursively, file meta included)."""
    found: dict[str, None] = {}  # ordered set

    def add(text: str) -> None:
        text = text.strip().strip("\x00").strip()
        if text and not text.startswith(_STANDARD_UID_ROOT):
            found.setdefault(text, None)

    def visit(_: Dataset, elem: DataElement) -> None:
        named = elem.VR in _IDENTIFYING_VRS or elem.keyword in _IDENTIFYING_KEYWORDS
        if not named and elem.VR not in _FREE_TEXT_VRS:
            return
        if elem.VR in ("SQ", "OB", "OW", "UN") or elem.value is None:
            return
        values = elem.value if isinstance(elem.value, (list, tuple, MultiValue)) else [elem.value]
        for value in values:
            if isinstance(value, bytes):
                continue
            text = str(value)
            if not named and len(text.strip()) < _MIN_FREE_TEXT:
                continue  # short codes ("NM", "DCM") identify nobody, and redacting them would garble messages
            add(text)
            if elem.VR == "PN":
                # Names reach file names in any order and separator: keep the parts too.
                for part in re.split(r"[\^=]", text):
                    add(part)
            elif elem.VR == "DA":
                day = _digits_date(text)
                if day is not None:
                    add(day.isoformat())

    for container in (ds.file_meta, ds):
        try:
            container.walk(visit)
        except Exception:  # a malformed value must not hide the rest: go element by element
            for elem in container.iterall():
                try:
                    visit(container, elem)
                except Exception:
                    continue
    return tuple(found)


def _dicom_facts(ds: Dataset, identifiers: tuple[str, ...]) -> DicomFacts:
    def text(keyword: str) -> str | None:
        try:
            value = str(ds.get(keyword) or "").strip()
        except Exception:  # an undecodable value is simply unknown
            return None
        return value or None

    sex = (text("PatientSex") or "").upper()
    study_date = next((d for d in map(text, ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")) if d), None)
    day = _digits_date(study_date)
    year = day.year if day else None
    if year is None and study_date and re.match(r"\d{4}", study_date):
        year = int(study_date[:4])
    return DicomFacts(
        study_uid=text("StudyInstanceUID"),
        patient_id=text("PatientID"),
        identifiers=identifiers,
        sex=sex if sex in ("F", "M", "O") else None,
        age_years=dicom_age_years(text("PatientAge"), text("PatientBirthDate"), study_date),
        study_year=year if year is not None and 1900 <= year <= 2200 else None,
    )


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
        identifiers = _collect_identifiers(ds)
        facts = _dicom_facts(ds, identifiers)
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
        from pydicom.pixels import apply_color_lut

        data = apply_color_lut(data, ds)
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


# --------------------------------------------------------------------------- common post-processing


def _invert_within_range(arr: np.ndarray) -> np.ndarray:
    """Invert brightness as ``min + max - v``: same dtype, same value range, no overflow."""
    if arr.size == 0:
        return arr
    low, high = arr.min(), arr.max()
    if np.issubdtype(arr.dtype, np.floating):
        return (low + high - arr).astype(arr.dtype)
    return (int(low) + int(high) - arr.astype(np.int64)).astype(arr.dtype)


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
