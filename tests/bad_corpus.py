"""Generated corpora of bad and good scan files for ``bonescan_core.imaging``.

Every file is produced by code (numpy, Pillow, tifffile, pydicom, or a few hand-packed
headers where a decompression bomb has to be declared without being built); pydicom's own
test files are used for the real-world compressed DICOM cases. No opaque binaries.

* :func:`make_bad_corpus` writes files that must be rejected and returns
  {file name: a distinctive substring of the rejection reason}.
* :func:`make_good_corpus` writes files that must decode and returns
  {file name: :class:`GoodCase`}.

DICOM files built here carry the made-up patient data in :data:`PHI`, so tests can check
that rejection messages never repeat it and that :class:`DicomFacts` lists all of it.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pydicom
import tifffile
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    JPEG2000MC,
    MPEG2MPML,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)

NM_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.20"
BASIC_TEXT_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.11"
UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root for example UIDs

# Made-up patient data planted in every synthesized DICOM file.
PHI: dict[str, str] = {
    "PatientName": "Testperson^Alicia^Marie",
    "PatientID": "PID-778899",
    "OtherPatientIDs": "ALT-5566",
    "PatientBirthDate": "19760312",
    "PatientAddress": "12 Quarry Lane, Dunmore",
    "InstitutionName": "Dunmore General Hospital",
    "InstitutionAddress": "1 Hill Road, Dunmore",
    "ReferringPhysicianName": "Referrer^Robert",
    "PerformingPhysicianName": "Performer^Petra",
    "NameOfPhysiciansReadingStudy": "Reader^Rhona",
    "OperatorsName": "Operator^Otto",
    "AccessionNumber": "ACC20210042",
    "StudyID": "STUDY-314",
    "StationName": "NMCAM07",
    "DeviceSerialNumber": "SN-99812",
    "StudyInstanceUID": UID_ROOT + "7001",
    "SeriesInstanceUID": UID_ROOT + "7002",
    "SOPInstanceUID": UID_ROOT + "7003",
    "FrameOfReferenceUID": UID_ROOT + "7004",
    "StudyDate": "20210614",
    "StudyTime": "101530",
}
# The parts of PHI that a message must never contain (name components included).
PHI_STRINGS: tuple[str, ...] = (
    *PHI.values(),
    "Testperson",
    "Alicia",
    "Referrer",
    "Performer",
    "Operator^Otto",
)

RGB_LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class GoodCase:
    """What a good file must decode to.

    Attributes:
        format: Expected ScanFile.format.
        shapes: (H, W) of each frame.
        dtype: numpy dtype name of every frame.
        pixels: Exact expected arrays per frame (None where not knowable, e.g. lossy JPEG).
        atol: Tolerance for ``pixels`` (0 = exact).
        value_range: (min, max) expected over all frames, or None.
        views: Expected frame views, or None to skip the check.
        note: Substring expected in the joined notes, or None.
        facts: Expected DicomFacts fields (sex, age_years, study_year...), or None.
    """

    format: str
    shapes: tuple[tuple[int, int], ...]
    dtype: str
    pixels: tuple[np.ndarray, ...] | None = None
    atol: float = 0
    value_range: tuple[float, float] | None = None
    views: tuple[str | None, ...] | None = None
    note: str | None = None
    facts: dict[str, object] | None = None


# --------------------------------------------------------------------------- helpers


def gradient(height: int, width: int, dtype: str = "uint16", top: int = 4000, seed: int = 0) -> np.ndarray:
    """A deterministic, non-constant (height, width) image with values in [0, top]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    spread = max(1, top // (7 * height + 3 * width))  # use the whole range up to top
    base = ((y * 7 + x * 3) * spread) % (top + 1)
    noise = rng.integers(0, 3, size=(height, width))
    return np.clip(base + noise, 0, top).astype(dtype)


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 grey of an (H, W, 3) integer image, rounded, same dtype."""
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    return np.rint(RGB_LUMA[0] * r + RGB_LUMA[1] * g + RGB_LUMA[2] * b).astype(rgb.dtype)


def tiff_bytes(data: np.ndarray, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, data, **kwargs)
    return buffer.getvalue()


def pillow_bytes(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def crafted_png(width: int, height: int, depth: int, colour_type: int, idat: bytes) -> bytes:
    """A PNG with an arbitrary IHDR and the given (already compressed) IDAT payload."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def crafted_tiff(width: int, height: int, payload: bytes) -> bytes:
    """A little-endian baseline TIFF declaring width x height 8-bit grey, holding only ``payload``."""
    entries = [  # tag, type (3 SHORT, 4 LONG), value
        (256, 4, width),
        (257, 4, height),
        (258, 3, 8),
        (259, 3, 1),
        (262, 3, 1),
        (273, 4, 0),  # StripOffsets, patched below
        (277, 3, 1),
        (278, 4, height),
        (279, 4, len(payload)),
    ]
    data_offset = 8 + 2 + 12 * len(entries) + 4
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        value = data_offset if tag == 273 else value
        packed = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, 1) + packed
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + payload


def patch_jpeg_size(jpeg: bytes, width: int, height: int) -> bytes:
    """Rewrite the SOF0 frame size of a baseline JPEG (pixels stay the small original)."""
    at = jpeg.index(b"\xff\xc0")
    return jpeg[: at + 5] + struct.pack(">HH", height, width) + jpeg[at + 9 :]


def _file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = UID(transfer_syntax)
    return meta


def nm_dataset(
    frames: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    phi: bool = True,
    **attributes: object,
) -> Dataset:
    """An uncompressed explicit-VR NM image holding ``frames``.

    Args:
        frames: (H, W) or (F, H, W) uint8/uint16/int16, or (H, W, 3) uint8 RGB when
            photometric is "RGB".
        photometric: PhotometricInterpretation.
        phi: Plant :data:`PHI`.
        **attributes: Extra/overriding DICOM attributes by keyword.
    """
    ds = Dataset()
    ds.file_meta = _file_meta(NM_IMAGE_STORAGE, PHI["SOPInstanceUID"], ExplicitVRLittleEndian)
    ds.SOPClassUID = NM_IMAGE_STORAGE
    ds.Modality = "NM"
    ds.SeriesDescription = "WHOLE BODY"
    if phi:
        for keyword, value in PHI.items():
            setattr(ds, keyword, value)
        ds.PatientSex = "F"
        ds.PatientAge = "045Y"
    colour = photometric == "RGB"
    multi = frames.ndim == (4 if colour else 3)
    ds.Rows, ds.Columns = frames.shape[-3:-1] if colour else frames.shape[-2:]
    if multi:
        ds.NumberOfFrames = frames.shape[0]
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = frames.dtype.itemsize * 8
    ds.BitsStored = ds.BitsAllocated
    ds.HighBit = ds.BitsAllocated - 1
    ds.PixelRepresentation = 1 if frames.dtype.kind == "i" else 0
    ds.PixelData = np.ascontiguousarray(frames).tobytes()
    ds["PixelData"].VR = "OB" if ds.BitsAllocated == 8 else "OW"
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def dicom_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def encapsulated(ds: Dataset, transfer_syntax: str, fragments: list[bytes]) -> Dataset:
    """``ds`` with its pixel data replaced by encapsulated ``fragments`` under ``transfer_syntax``."""
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    ds.PixelData = encapsulate(fragments)
    ds["PixelData"].VR = "OB"
    return ds


def view_item(meaning: str) -> Dataset:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "TEST", "99TEST", meaning
    item = Dataset()
    item.ViewCodeSequence = Sequence([code])
    return item


def testdata(name: str) -> bytes:
    path = get_testdata_file(name)
    if path is None:  # pydicom ships these files in its wheel
        raise FileNotFoundError(f"pydicom test file {name} is missing")
    return Path(path).read_bytes()


# --------------------------------------------------------------------------- shared sources


@cache
def _tiff16() -> bytes:
    return tiff_bytes(gradient(256, 128))


@cache
def _tiff_two_pages() -> bytes:
    return tiff_bytes(np.stack([gradient(128, 96), gradient(128, 96, seed=1)]))


@cache
def _png8() -> bytes:
    return pillow_bytes(Image.fromarray(gradient(256, 128, "uint8", top=250)), "PNG")


@cache
def _jpeg8() -> bytes:
    return pillow_bytes(Image.fromarray(gradient(256, 128, "uint8", top=250)), "JPEG", quality=90)


@cache
def _nm_uncompressed() -> bytes:
    return dicom_bytes(nm_dataset(gradient(128, 96)))


@cache
def _nm_jpeg() -> bytes:
    image = gradient(128, 96, "uint8", top=250)
    ds = nm_dataset(image)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    return dicom_bytes(encapsulated(ds, JPEGBaseline8Bit, [pillow_bytes(Image.fromarray(image), "JPEG")]))


def _cut(source: Callable[[], bytes], keep: int) -> Callable[[], bytes]:
    """Builder for ``source`` cut to its first ``keep`` bytes (negative: drop that many from the end)."""
    return lambda: source()[:keep]


def _cut_fraction(source: Callable[[], bytes], fraction: float) -> Callable[[], bytes]:
    return lambda: source()[: int(len(source()) * fraction)]


def _dicom_pixel_offset(data: bytes) -> int:
    """Byte offset of the (7FE0,0010) Pixel Data tag in an explicit-VR little-endian file."""
    return data.rindex(b"\xe0\x7f\x10\x00")


# --------------------------------------------------------------------------- bad builders


def _sr() -> bytes:
    ds = Dataset()
    ds.file_meta = _file_meta(BASIC_TEXT_SR_STORAGE, PHI["SOPInstanceUID"], ExplicitVRLittleEndian)
    ds.SOPClassUID = BASIC_TEXT_SR_STORAGE
    ds.Modality = "SR"
    for keyword, value in PHI.items():
        setattr(ds, keyword, value)
    ds.ValueType, ds.CompletionFlag, ds.VerificationFlag = "CONTAINER", "COMPLETE", "UNVERIFIED"
    return dicom_bytes(ds)


def _mpeg2() -> bytes:
    return dicom_bytes(encapsulated(nm_dataset(gradient(128, 96)), MPEG2MPML, [b"\x00\x00\x01\xb3" + b"\x00" * 60]))


def _jpeg2000_part2() -> bytes:
    return dicom_bytes(encapsulated(nm_dataset(gradient(128, 96)), JPEG2000MC, [b"\xff\x4f\xff\x51" + b"\x00" * 60]))


def _jpeg_xl() -> bytes:
    # pydicom 3.0 refuses to write a transfer syntax it does not know, so write MPEG-2
    # (a UID of the same length) and swap the UID in the file meta.
    data = _mpeg2()
    old, new = str(MPEG2MPML).encode() + b"\x00", b"1.2.840.10008.1.2.4.110\x00"
    assert len(old) == len(new) and data.count(old) == 1
    return data.replace(old, new)


def _short_pixels() -> bytes:
    ds = nm_dataset(gradient(128, 96))
    ds.PixelData = ds.PixelData[:4096]
    return dicom_bytes(ds)


def _long_pixels() -> bytes:
    ds = nm_dataset(gradient(128, 96))
    ds.PixelData = ds.PixelData + b"\x00" * 1024
    return dicom_bytes(ds)


def _dicom_bomb() -> bytes:
    ds = nm_dataset(gradient(128, 96))
    ds.Rows, ds.Columns, ds.NumberOfFrames = 65535, 65535, 10
    return dicom_bytes(ds)


def _blank_second_frame() -> bytes:
    frames = np.stack([gradient(128, 96), np.full((128, 96), 3, np.uint16)])
    return dicom_bytes(nm_dataset(frames))


def _garbage_after_dicm() -> bytes:
    rng = np.random.default_rng(7)
    return b"\x00" * 128 + b"DICM" + rng.integers(0, 256, 600, dtype=np.uint8).tobytes()


def _corrupt_png_crc() -> bytes:
    data = bytearray(_png8())
    data[data.index(b"IDAT") + 20] ^= 0xFF
    return bytes(data)


def _float_with(value: float) -> np.ndarray:
    image = gradient(128, 96).astype(np.float32)
    image[40:42, 30:33] = value
    return image


def _tiff_samples(count: int) -> Callable[[], bytes]:
    return lambda: tiff_bytes(
        np.stack([gradient(96, 96, "uint8", top=250, seed=i) for i in range(count)], -1),
        photometric="minisblack",
        planarconfig="contig",
    )


# --------------------------------------------------------------------------- decompression bombs
# Small files whose declared image is small (so the declared-size check passes) but whose
# compressed data expands far beyond it. Each is about 0.3-4 MB and expands to 256 MB or more.

BOMB_EXPANDED_BYTES = 256 << 20
"""How far the bombs below expand (bytes of decoded output they would produce unchecked)."""


def deflated_zeros(prefix: bytes = b"", zeros: int = BOMB_EXPANDED_BYTES, *, wrapper: bool = True) -> bytes:
    """A deflate stream of ``prefix`` then ``zeros`` zero bytes (zlib-wrapped, or raw deflate).

    Built in well under a second without holding the output: after a sync flush, each further
    MiB of zeros compresses to the same bytes (the window already holds only zeros), so that
    piece is repeated; the zlib trailer's Adler-32 is computed over the whole output.
    """
    block = bytes(1 << 20)
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = packer.compress(prefix) + packer.flush(zlib.Z_SYNC_FLUSH)
    first = packer.compress(block) + packer.flush(zlib.Z_SYNC_FLUSH)
    repeated = packer.compress(block) + packer.flush(zlib.Z_SYNC_FLUSH)
    blocks, rest = divmod(zeros, len(block))
    assert blocks >= 2, "at least 2 MiB of zeros"
    tail = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)  # a fresh final block for the rest
    stream = head + first + repeated * (blocks - 1) + tail.compress(bytes(rest)) + tail.flush()
    if not wrapper:
        return stream
    checksum = zlib.adler32(prefix)
    for _ in range(blocks):
        checksum = zlib.adler32(block, checksum)
    checksum = zlib.adler32(bytes(rest), checksum)
    return b"\x78\xda" + stream + struct.pack(">I", checksum)


def _tiff_zlib_bomb() -> bytes:
    """A 128 x 96 8-bit TIFF whose one zlib strip inflates to 256 MB."""
    data = bytearray(crafted_tiff(96, 128, deflated_zeros()))
    # crafted_tiff writes Compression (259) = 1; make it 8 (Adobe deflate) in place.
    at = data.index(struct.pack("<HHI", 259, 3, 1))
    data[at + 8 : at + 10] = struct.pack("<H", 8)
    return bytes(data)


def _tiff_many_pages(count: int = 20_000) -> bytes:
    """``count`` one-pixel pages: cheap to store, slow and memory-hungry to list."""
    return tiff_bytes(np.ones((count, 1, 1), np.uint8), photometric="minisblack", metadata=None)


def _dicom_deflated_bomb() -> bytes:
    """A Deflated Explicit VR DICOM (128 x 96 x 16-bit image) with 256 MB of trailing padding."""
    ds = nm_dataset(gradient(128, 96))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    deflated = dicom_bytes(ds)
    meta_end = _meta_end(deflated)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    plain = dicom_bytes(ds)
    body = plain[_meta_end(plain) :]
    # (FFFC,FFFC) Data Set Trailing Padding, OB, 256 MB of zeros.
    padding = struct.pack("<HH2sHI", 0xFFFC, 0xFFFC, b"OB", 0, BOMB_EXPANDED_BYTES)
    return deflated[:meta_end] + deflated_zeros(body + padding, wrapper=False)


def _meta_end(data: bytes) -> int:
    """Offset of the first element after the file meta group of a DICOM file."""
    (group_length,) = struct.unpack("<I", data[140:144])  # (0002,0000) UL value
    return 144 + group_length


def _dicom_rle_bomb() -> bytes:
    """RLE Lossless, 128 x 96 x 8-bit declared; the one segment repeats runs to 256 MB."""
    ds = nm_dataset(gradient(128, 96, "uint8", top=250))
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    runs = b"\x81\x00" * (BOMB_EXPANDED_BYTES // 128)  # each pair: repeat 0x00 128 times
    header = struct.pack("<16I", 1, 64, *([0] * 14))
    return dicom_bytes(encapsulated(ds, RLELossless, [header + runs]))


def _dicom_jpeg_bomb() -> bytes:
    """JPEG Baseline DICOM declaring 128 x 96 whose codestream declares 20000 x 20000."""
    image = gradient(128, 96, "uint8", top=250)
    ds = nm_dataset(image)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    jpeg = patch_jpeg_size(pillow_bytes(Image.fromarray(image), "JPEG"), 20_000, 20_000)
    return dicom_bytes(encapsulated(ds, JPEGBaseline8Bit, [jpeg]))


_PEAK_SCRIPT = """
import json, resource, sys, time
from bonescan_core.imaging import RejectedFile, read_scan
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
try:
    scan = read_scan(sys.argv[1])
    outcome = "imported " + str(len(scan.frames)) + " frame(s)"
except RejectedFile as error:
    outcome = "rejected: " + str(error)
seconds = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_mib": round((peak - before) / 1024, 1), "seconds": round(seconds, 3), "outcome": outcome}))
"""


def peak_memory_of_reading(path: Path) -> dict[str, object]:
    """Read ``path`` with ``imaging.read_scan`` in a fresh interpreter and report what it cost.

    Returns:
        {"peak_mib": growth of the peak resident memory during the read (MiB, Linux
        ru_maxrss), "seconds": wall time of the read, "outcome": "imported N frame(s)" or
        "rejected: <reason>"}.
    """
    done = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(path)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


BOMBS: dict[str, tuple[str, Callable[[], bytes]]] = {
    "bomb_zlib.tif": ("expands to more than its declared", _tiff_zlib_bomb),
    "bomb_pages.tif": ("more than 256 pages", _tiff_many_pages),
    "bomb_deflated.dcm": ("expands to more than its declared", _dicom_deflated_bomb),
    "bomb_rle.dcm": ("expands to more than its declared", _dicom_rle_bomb),
    "bomb_jpeg.dcm": ("declares 20000 x 20000 pixels in its JPEG data", _dicom_jpeg_bomb),
}
"""Decompression bombs: {file name: (reason substring, builder)}; also part of the bad corpus."""


_BAD_BUILDERS: dict[str, tuple[str, Callable[[], bytes]]] = {
    # empty / not an image / wrong name
    "empty.png": ("empty file (0 bytes)", lambda: b""),
    "notes.png": ("not an image (TIFF, PNG, JPEG or DICOM expected)", lambda: b"Scan list for Monday\n" * 20),
    "README": ("not an image (TIFF, PNG, JPEG or DICOM expected)", lambda: b"just some text, no image here\n"),
    "text.dcm": ("not an image (TIFF, PNG, JPEG or DICOM expected)", lambda: b"x" * 400),
    "animation.png": (
        "not an image this tool reads (a GIF image)",
        lambda: pillow_bytes(Image.fromarray(gradient(80, 80, "uint8", top=200)), "GIF"),
    ),
    "png_named.tif": ("content is PNG but the extension is .tif; rename it to .png", _png8),
    "jpeg_named.dcm": ("content is JPEG but the extension is .dcm; rename it to .jpg", _jpeg8),
    "png_named.bmp": ("content is PNG but the extension is .bmp; rename it to .png", _png8),
    "png_without_extension": ("content is PNG but the file has no extension; rename it to .png", _png8),
    # truncated TIFF (several offsets, including a page lost from the IFD chain)
    "trunc_header.tif": ("truncated or corrupt TIFF", _cut(_tiff16, 8)),
    "trunc_ifd.tif": ("truncated or corrupt TIFF", lambda: _tiff16()[: _tiff16().index(b"\x00\x01", 8) + 40]),
    "trunc_mid.tif": ("truncated or corrupt TIFF", _cut_fraction(_tiff16, 0.5)),
    "trunc_tail.tif": ("truncated or corrupt TIFF", _cut(_tiff16, -3)),
    "trunc_page2.tif": ("truncated or corrupt TIFF", _cut_fraction(_tiff_two_pages, 0.6)),
    # truncated / damaged PNG
    "trunc_header.png": ("truncated or corrupt PNG", _cut(_png8, 33)),
    "trunc_mid.png": ("truncated or corrupt PNG", _cut_fraction(_png8, 0.5)),
    "trunc_tail.png": ("truncated or corrupt PNG", _cut(_png8, -4)),
    "bad_crc.png": ("checksum mismatch", _corrupt_png_crc),
    # truncated JPEG
    "trunc_header.jpg": ("truncated or corrupt JPEG", _cut(_jpeg8, 150)),
    "trunc_mid.jpg": ("truncated or corrupt JPEG", _cut_fraction(_jpeg8, 0.5)),
    "trunc_tail.jpg": ("truncated or corrupt JPEG", _cut(_jpeg8, -2)),
    # truncated / damaged DICOM: pydicom's real JPEG Extended NM file and synthesized ones with PHI
    "trunc_meta.dcm": ("truncated or corrupt DICOM", _cut(lambda: testdata("JPGExtended.dcm"), 140)),
    "trunc_header.dcm": ("truncated or corrupt DICOM", _cut(lambda: testdata("JPGExtended.dcm"), 1000)),
    "trunc_fragment.dcm": ("truncated or corrupt DICOM", _cut_fraction(lambda: testdata("JPGExtended.dcm"), 0.7)),
    "trunc_delimiter.dcm": ("truncated or corrupt DICOM", _cut(lambda: testdata("JPGExtended.dcm"), -2)),
    "trunc_phi_header.dcm": ("truncated or corrupt DICOM", _cut(_nm_uncompressed, 400)),
    "trunc_phi_pixels.dcm": ("truncated or corrupt DICOM", _cut_fraction(_nm_uncompressed, 0.6)),
    "trunc_phi_pixel_tag.dcm": (
        "truncated or corrupt DICOM",
        lambda: _nm_uncompressed()[: _dicom_pixel_offset(_nm_uncompressed()) + 6],
    ),
    "trunc_phi_jpeg.dcm": ("truncated or corrupt DICOM", _cut(_nm_jpeg, -12)),
    "garbage_after_dicm.dcm": ("truncated or corrupt DICOM", _garbage_after_dicm),
    # DICOM that is not an importable image
    "structured_report.dcm": ("DICOM without pixel data (Basic Text SR Storage)", _sr),
    "mpeg2.dcm": ("not a still image format", _mpeg2),
    "jpeg2000_part2.dcm": ("cannot be decoded here", _jpeg2000_part2),
    "jpeg_xl.dcm": ("transfer syntax JPEG XL Lossless (1.2.840.10008.1.2.4.110) cannot be decoded here", _jpeg_xl),
    "short_pixels.dcm": ("pixel data is 4096 bytes but the header declares 24576", _short_pixels),
    "long_pixels.dcm": ("pixel data is 25600 bytes but the header declares 24576", _long_pixels),
    # decompression bombs: declared sizes over MAX_PIXELS with tiny payloads
    "bomb_huge.png": (
        "declares 100000 x 100000 x 1 pixels, over the 40-megapixel limit",
        lambda: crafted_png(100_000, 100_000, 8, 0, zlib.compress(b"\x00" * 64)),
    ),
    "bomb_48mp.png": (
        "declares 8000 x 6000 x 1 pixels, over the 40-megapixel limit",
        lambda: crafted_png(8000, 6000, 8, 0, zlib.compress(b"\x00" * 64)),
    ),
    "bomb_huge.jpg": ("over the 40-megapixel limit", lambda: patch_jpeg_size(_jpeg8(), 60000, 60000)),
    # Pillow only warns for this one (between 1x and 2x Image.MAX_IMAGE_PIXELS); the module's own check rejects it.
    "bomb_100mp.jpg": (
        "declares 10000 x 10000 x 1 pixels, over the 40-megapixel limit",
        lambda: patch_jpeg_size(_jpeg8(), 10000, 10000),
    ),
    "bomb_48mp.jpg": (
        "declares 8000 x 6000 x 1 pixels, over the 40-megapixel limit",
        lambda: patch_jpeg_size(_jpeg8(), 8000, 6000),
    ),
    "bomb.tif": (
        "declares 100000 x 100000 x 1 pixels, over the 40-megapixel limit",
        lambda: crafted_tiff(100_000, 100_000, b"\x00" * 16),
    ),
    "bomb.dcm": ("declares 65535 x 65535 x 10 pixels, over the 40-megapixel limit", _dicom_bomb),
    **BOMBS,
    # decodes, but is not a usable scan
    "blank.png": (
        "blank image (every pixel is 7): no signal",
        lambda: pillow_bytes(Image.fromarray(np.full((256, 128), 7, np.uint8)), "PNG"),
    ),
    "blank_frame2.dcm": ("frame 2 of 2: blank image (every pixel is 3)", _blank_second_frame),
    "small.png": (
        "implausibly small (32 x 32 px; a whole-body scan is at least 64 px on a side)",
        lambda: pillow_bytes(Image.fromarray(gradient(32, 32, "uint8", top=250)), "PNG"),
    ),
    "narrow.tif": ("implausibly small (40 x 300 px", lambda: tiff_bytes(gradient(300, 40))),
    "nan.tif": ("contains NaN or infinite values", lambda: tiff_bytes(_float_with(np.nan))),
    "inf.tif": ("contains NaN or infinite values", lambda: tiff_bytes(_float_with(-np.inf))),
    "two_channels.tif": ("unsupported TIFF layout (2 samples per pixel)", _tiff_samples(2)),
    "five_samples.tif": ("unsupported TIFF layout (5 samples per pixel)", _tiff_samples(5)),
    "cmyk.tif": (
        "unsupported TIFF colour model (SEPARATED)",
        lambda: tiff_bytes(np.zeros((96, 96, 4), np.uint8) + np.arange(4, dtype=np.uint8), photometric="separated"),
    ),
}

BAD_CASE_NAMES: tuple[str, ...] = tuple(_BAD_BUILDERS)


def make_bad_corpus(folder: Path) -> dict[str, str]:
    """Write every bad file into ``folder``.

    Returns:
        {file name: a distinctive substring of the expected rejection reason}.
    """
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    for name, (substring, build) in _BAD_BUILDERS.items():
        (folder / name).write_bytes(build())
        expected[name] = substring
    return expected


# --------------------------------------------------------------------------- good builders


def _good_tiff_thumbnail() -> tuple[bytes, GoodCase]:
    full = gradient(200, 100)
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer) as writer:
        writer.write(full)
        writer.write(full[::4, ::4], subfiletype=1)  # reduced-resolution preview
    return buffer.getvalue(), GoodCase("tiff", ((200, 100),), "uint16", (full,), note="skipped 1 thumbnail")


def _good_miniswhite() -> tuple[bytes, GoodCase]:
    image = gradient(100, 80, "uint8", top=200)
    inverted = (int(image.min()) + int(image.max()) - image.astype(int)).astype(np.uint8)
    return tiff_bytes(image, photometric="miniswhite"), GoodCase("tiff", ((100, 80),), "uint8", (inverted,), note="inverted")


def _good_rgb_png() -> tuple[bytes, GoodCase]:
    rgb = np.stack([gradient(96, 80, "uint8", top=250, seed=s) for s in range(3)], -1)
    return pillow_bytes(Image.fromarray(rgb), "PNG"), GoodCase(
        "png", ((96, 80),), "uint8", (luma(rgb),), note="converted RGB to grey"
    )


def _good_rgb16_png() -> tuple[bytes, GoodCase]:
    grey = gradient(70, 80, "uint16", top=60000)
    rgb = np.stack([grey] * 3, -1).astype(">u2")
    rows = b"".join(b"\x00" + row.tobytes() for row in rgb)
    expected = (grey >> 8).astype(np.uint8)  # Pillow keeps the high byte of each sample
    return crafted_png(80, 70, 16, 2, zlib.compress(rows)), GoodCase(
        "png", ((70, 80),), "uint8", (expected,), note="reduced to 8 bits"
    )


def _good_la_png() -> tuple[bytes, GoodCase]:
    grey = gradient(96, 80, "uint8", top=250)
    alpha = np.full_like(grey, 255)
    data = pillow_bytes(Image.fromarray(np.stack([grey, alpha], -1), mode="LA"), "PNG")
    return data, GoodCase("png", ((96, 80),), "uint8", (grey,), note="ignored the alpha channel")


def _good_palette_png() -> tuple[bytes, GoodCase]:
    grey = gradient(96, 80, "uint8", top=250)
    image = Image.fromarray(grey).convert("P")  # Pillow's default (web) palette
    expected = luma(np.asarray(image.convert("RGB")))
    return pillow_bytes(image, "PNG"), GoodCase("png", ((96, 80),), "uint8", (expected,), note="palette")


def _good_lzw_tiff() -> tuple[bytes, GoodCase]:
    image = gradient(160, 96, "uint16", top=60000)
    data = pillow_bytes(Image.fromarray(image), "TIFF", compression="tiff_lzw")
    return data, GoodCase("tiff", ((160, 96),), "uint16", (image,))


def _good_jpeg() -> tuple[bytes, GoodCase]:
    image = gradient(256, 128, "uint8", top=250)
    return _jpeg8(), GoodCase("jpeg", ((256, 128),), "uint8", (image,), atol=40)


def _good_signed_dicom() -> tuple[bytes, GoodCase]:
    stored = (gradient(128, 96, "int32", top=3000) - 1000).astype(np.int16)
    image = np.maximum(stored, 0)  # counts are never negative: read with the negatives set to zero
    ds = nm_dataset(stored, ImageID="ANT")
    facts = {
        "sex": "F",
        "age_years": 45,
        "study_year": 2021,
        "patient_id": PHI["PatientID"],
        "study_uid": PHI["StudyInstanceUID"],
    }
    return dicom_bytes(ds), GoodCase(
        "dicom", ((128, 96),), "int16", (image,), views=("anterior",), facts=facts, note="negative pixel values to 0"
    )


def _good_nm_two_frames() -> tuple[bytes, GoodCase]:
    frames = np.stack([gradient(1024, 256, seed=1), gradient(1024, 256, seed=2, top=900)])
    ds = nm_dataset(frames)
    del ds.PatientAge  # age must come from birth date (19760312) and study date (20210614)
    ds.SeriesDescription = "WB ANT/POST"  # ambiguous text: the detector codes must win
    # Detector 1 looks posterior, detector 2 anterior; frame 1 came from detector 2.
    ds.DetectorInformationSequence = Sequence([view_item("posterior projection"), view_item("anterior projection")])
    ds.NumberOfDetectors = 2
    ds.DetectorVector = [2, 1]
    ds.FrameIncrementPointer = 0x00540020
    facts = {"sex": "F", "age_years": 45, "study_year": 2021}
    return dicom_bytes(ds), GoodCase(
        "dicom", ((1024, 256), (1024, 256)), "uint16", tuple(frames), views=("anterior", "posterior"), facts=facts
    )


def _good_monochrome1() -> tuple[bytes, GoodCase]:
    image = gradient(128, 96, top=1000)
    inverted = (int(image.min()) + int(image.max()) - image.astype(int)).astype(np.uint16)
    return dicom_bytes(nm_dataset(image, photometric="MONOCHROME1")), GoodCase(
        "dicom", ((128, 96),), "uint16", (inverted,), note="inverted MONOCHROME1"
    )


def _good_rescaled() -> tuple[bytes, GoodCase]:
    image = gradient(128, 96, top=1000)
    ds = nm_dataset(image, RescaleSlope="0.5", RescaleIntercept="-10")
    expected = np.maximum((image.astype(np.float64) * 0.5 - 10).astype(np.float32), 0)
    return dicom_bytes(ds), GoodCase("dicom", ((128, 96),), "float32", (expected,), note="rescale")


def _good_rgb_dicom() -> tuple[bytes, GoodCase]:
    rgb = np.stack([gradient(96, 80, "uint8", top=250, seed=s) for s in range(3)], -1)
    return dicom_bytes(nm_dataset(rgb, photometric="RGB")), GoodCase(
        "dicom", ((96, 80),), "uint8", (luma(rgb),), note="converted RGB to grey"
    )


def _good_compressed(transfer_syntax: UID) -> Callable[[], tuple[bytes, GoodCase]]:
    def build() -> tuple[bytes, GoodCase]:
        image = gradient(128, 96, top=4000)
        ds = nm_dataset(image)
        ds.compress(transfer_syntax, image)  # pydicom's own encoders (RLE native, J2K via pylibjpeg-openjpeg)
        return dicom_bytes(ds), GoodCase("dicom", ((128, 96),), "uint16", (image,))

    return build


def _good_jpeg_dicom() -> tuple[bytes, GoodCase]:
    image = gradient(128, 96, "uint8", top=250)
    return _nm_jpeg(), GoodCase("dicom", ((128, 96),), "uint8", (image,), atol=40)


def _good_deflated() -> tuple[bytes, GoodCase]:
    image = gradient(128, 96)
    ds = nm_dataset(image)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return dicom_bytes(ds), GoodCase("dicom", ((128, 96),), "uint16", (image,))


def _good_without_transfer_syntax() -> tuple[bytes, GoodCase]:
    """An uncompressed file whose meta header lost its Transfer Syntax UID element."""
    image = gradient(128, 96)
    data = dicom_bytes(nm_dataset(image))
    start = data.index(b"\x02\x00\x10\x00UI")
    (length,) = struct.unpack("<H", data[start + 6 : start + 8])
    removed = 8 + length
    data = data[:start] + data[start + removed :]
    # (0002,0000) File Meta Information Group Length: its UL value sits at byte 140.
    (group_length,) = struct.unpack("<I", data[140:144])
    data = data[:140] + struct.pack("<I", group_length - removed) + data[144:]
    return data, GoodCase("dicom", ((128, 96),), "uint16", (image,), note="no transfer syntax in the header")


def _good_text_view(description: str, view: str | None) -> Callable[[], tuple[bytes, GoodCase]]:
    def build() -> tuple[bytes, GoodCase]:
        image = gradient(128, 96)
        return dicom_bytes(nm_dataset(image, SeriesDescription=description)), GoodCase(
            "dicom", ((128, 96),), "uint16", (image,), views=(view,)
        )

    return build


def _mr_small() -> np.ndarray:
    return pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array


def _good_testdata(
    name: str, shape: tuple[int, int], dtype: str, value_range: tuple[float, float] | None, same_as_mr_small: bool = False
) -> Callable[[], tuple[bytes, GoodCase]]:
    def build() -> tuple[bytes, GoodCase]:
        pixels = (_mr_small(),) if same_as_mr_small else None
        return testdata(name), GoodCase("dicom", (shape,), dtype, pixels, value_range=value_range)

    return build


def _simple(data: Callable[[], bytes], case: GoodCase) -> Callable[[], tuple[bytes, GoodCase]]:
    return lambda: (data(), case)


_G8 = gradient(256, 128, "uint8", top=250)
_G16 = gradient(256, 128, "uint16", top=60000)
_F32 = (gradient(128, 96, "float32", top=1000) / 7).astype(np.float32)
_PAGES = (gradient(128, 96), gradient(128, 96, seed=1))

_GOOD_BUILDERS: dict[str, Callable[[], tuple[bytes, GoodCase]]] = {
    "u8.tif": _simple(lambda: tiff_bytes(_G8), GoodCase("tiff", ((256, 128),), "uint8", (_G8,))),
    "u16.tif": _simple(lambda: tiff_bytes(_G16), GoodCase("tiff", ((256, 128),), "uint16", (_G16,))),
    "pages2.tif": _simple(_tiff_two_pages, GoodCase("tiff", ((128, 96), (128, 96)), "uint16", _PAGES)),
    "f32.tif": _simple(lambda: tiff_bytes(_F32), GoodCase("tiff", ((128, 96),), "float32", (_F32,))),
    "bigtiff.tif": _simple(lambda: tiff_bytes(_G16, bigtiff=True), GoodCase("tiff", ((256, 128),), "uint16", (_G16,))),
    "deflate.tiff": _simple(lambda: tiff_bytes(_G16, compression="zlib"), GoodCase("tiff", ((256, 128),), "uint16", (_G16,))),
    "lzw16.tif": _good_lzw_tiff,
    "thumbnail.tif": _good_tiff_thumbnail,
    "miniswhite.tif": _good_miniswhite,
    "g8.png": _simple(_png8, GoodCase("png", ((256, 128),), "uint8", (gradient(256, 128, "uint8", top=250),))),
    "g16.png": _simple(lambda: pillow_bytes(Image.fromarray(_G16), "PNG"), GoodCase("png", ((256, 128),), "uint16", (_G16,))),
    "rgb.png": _good_rgb_png,
    "rgb16.png": _good_rgb16_png,
    "la.png": _good_la_png,
    "palette.png": _good_palette_png,
    "photo.jpg": _good_jpeg,
    "photo.JPEG": _good_jpeg,
    "signed16.dcm": _good_signed_dicom,
    "nm_two_frames.dcm": _good_nm_two_frames,
    "monochrome1.dcm": _good_monochrome1,
    "rescaled.dcm": _good_rescaled,
    "rgb.dcm": _good_rgb_dicom,
    "rle.dcm": _good_compressed(RLELossless),
    "j2k_lossless.dcm": _good_compressed(JPEG2000Lossless),
    "jpeg_baseline.dcm": _good_jpeg_dicom,
    "deflated.dcm": _good_deflated,
    "no_transfer_syntax.dcm": _good_without_transfer_syntax,
    "post_therapy_ant.dcm": _good_text_view("WB POST THERAPY ANT", "anterior"),
    "ant_and_post.dcm": _good_text_view("WB ANT POST", None),
    "IM000001": _simple(_nm_uncompressed, GoodCase("dicom", ((128, 96),), "uint16", (gradient(128, 96),))),
    UID_ROOT + "7003": _simple(_nm_uncompressed, GoodCase("dicom", ((128, 96),), "uint16", (gradient(128, 96),))),
    "JPGExtended.dcm": _good_testdata("JPGExtended.dcm", (1024, 256), "uint16", (0, 264)),
    "JPEG2000.dcm": _good_testdata("JPEG2000.dcm", (1024, 256), "int16", (0, 245)),  # lossy: rings down to -30
    "MR_small_jpeg_ls_lossless.dcm": _good_testdata("MR_small_jpeg_ls_lossless.dcm", (64, 64), "int16", None, True),
    "MR_small_RLE.dcm": _good_testdata("MR_small_RLE.dcm", (64, 64), "int16", None, True),
    "image_dfl.dcm": _good_testdata("image_dfl.dcm", (512, 512), "uint8", (0, 255)),
}

GOOD_CASE_NAMES: tuple[str, ...] = tuple(_GOOD_BUILDERS)


def make_good_corpus(folder: Path) -> dict[str, GoodCase]:
    """Write every good file into ``folder``.

    Returns:
        {file name: what it must decode to}.
    """
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    for name, build in _GOOD_BUILDERS.items():
        data, case = build()
        (folder / name).write_bytes(data)
        expected[name] = case
    return expected
