"""PNG and JPEG through Pillow (also the TIFF pages tifffile cannot decode without imagecodecs)."""

from __future__ import annotations

import contextlib
import re
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

from bonescan_core.imaging.common import (
    _FORMAT_LABEL,
    MAX_PIXELS,
    RejectedFile,
    _corrupt,
    _Decoded,
    _describe_exception,
    _scrub,
    _too_many_pixels,
    register_reader,
)

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


_PILLOW_LOCK = threading.Lock()


@contextlib.contextmanager
def _strict_pillow() -> Iterator[None]:
    """Pillow refuses truncated images for this read only, then gets back the process's own setting.

    A partially decoded image must never come back, but LOAD_TRUNCATED_IMAGES is Pillow's
    one process-wide switch, which another module may have relaxed on purpose. Pillow reads
    here take turns, so that two overlapping reads cannot leave it flipped for good.
    """
    with _PILLOW_LOCK:
        previous = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _pillow_decode(path: Path, fmt: str, frame_index: int = 0) -> tuple[np.ndarray, str | None, list[str]]:
    """Open, bomb-check and fully decode one image (or TIFF page) with Pillow, strictly.

    Returns:
        (array, colour layout, notes); see :func:`_pillow_to_array`.
    """
    with _strict_pillow():
        return _pillow_decode_strictly(path, fmt, frame_index)


def _pillow_decode_strictly(path: Path, fmt: str, frame_index: int) -> tuple[np.ndarray, str | None, list[str]]:
    """:func:`_pillow_decode` inside :func:`_strict_pillow`."""
    notes: list[str] = []
    pillow_format = {"png": "PNG", "jpeg": "JPEG", "tiff": "TIFF"}[fmt]
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


