"""TIFF through tifffile, one frame per page; Pillow/libtiff for compressions tifffile cannot decode."""

from __future__ import annotations

import itertools
import logging
import lzma
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import tifffile

from bonescan_core.imaging.common import (
    _EXPANSION_SLACK,
    MAX_PAGES,
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
from bonescan_core.imaging.raster import _pillow_decode

# tifffile logs (rather than raises) some damage this module detects and reports itself;
# without any logging configured those lines would reach stderr via logging.lastResort.
logging.getLogger("tifffile").addHandler(logging.NullHandler())


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


