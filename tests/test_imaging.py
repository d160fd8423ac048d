"""bonescan_core.imaging: every bad file rejected with a useful, PHI-free reason; every good
file decoded exactly; DICOM facts and identifiers; sniffing; age parsing."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from bad_corpus import (
    BAD_CASE_NAMES,
    BOMBS,
    GOOD_CASE_NAMES,
    PHI,
    PHI_STRINGS,
    GoodCase,
    dicom_bytes,
    encapsulated,
    gradient,
    make_bad_corpus,
    make_good_corpus,
    nm_dataset,
    peak_memory_of_reading,
    pillow_bytes,
    tiff_bytes,
)
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import JPEGBaseline8Bit

from bonescan_core import imaging, ingest, pixelstore, preprocess
from bonescan_core.errors import InputError
from bonescan_core.imaging import (
    EXTENSIONS,
    MAX_PIXELS,
    MIN_SIDE,
    READERS,
    RejectedFile,
    ScanFile,
    dicom_age_years,
    read_scan,
    sniff_format,
)

ACRONYM_START = ("DICOM ", "TIFF ", "PNG ", "JPEG ")


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("bad")
    return folder, make_bad_corpus(folder)


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, GoodCase]]:
    folder = tmp_path_factory.mktemp("good")
    return folder, make_good_corpus(folder)


def assert_well_formed(message: str, path: Path) -> None:
    """One line, lower-case start (or a format acronym), no path, no file name, no PHI."""
    assert message and "\n" not in message and message == message.strip()
    assert message[0].islower() or message.startswith(ACRONYM_START), message
    assert str(path.parent) not in message
    assert path.name not in message
    for secret in PHI_STRINGS:
        assert secret not in message, f"PHI {secret!r} in {message!r}"


def rejection(path: Path) -> str:
    with pytest.raises(RejectedFile) as info:
        read_scan(path)
    return str(info.value)


# --------------------------------------------------------------------------- bad corpus


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # bomb_100mp.jpg, expected
@pytest.mark.parametrize("name", BAD_CASE_NAMES)
def test_bad_file_is_rejected_with_its_reason(bad: tuple[Path, dict[str, str]], name: str) -> None:
    folder, expected = bad
    message = rejection(folder / name)
    assert expected[name] in message
    assert_well_formed(message, folder / name)


def test_dicom_rejections_were_given_phi_to_leak(bad: tuple[Path, dict[str, str]]) -> None:
    """The PHI check above means something: many rejected DICOM files carry the planted values."""
    folder, expected = bad
    carriers = [name for name in expected if PHI["PatientName"].encode() in (folder / name).read_bytes()]
    assert len(carriers) >= 10
    assert {"structured_report.dcm", "trunc_phi_pixels.dcm", "short_pixels.dcm", "bomb.dcm", "mpeg2.dcm"} <= set(carriers)


def test_corpora_are_complete(bad: tuple[Path, dict[str, str]], good: tuple[Path, dict[str, GoodCase]]) -> None:
    assert set(bad[1]) == set(BAD_CASE_NAMES) and set(good[1]) == set(GOOD_CASE_NAMES)
    assert (bad[0] / "empty.png").stat().st_size == 0
    # The truncation cases cover every format at two offsets or more.
    for suffix in (".tif", ".png", ".jpg", ".dcm"):
        assert sum(n.startswith("trunc_") and n.endswith(suffix) for n in BAD_CASE_NAMES) >= 2


# --------------------------------------------------------------------------- good corpus


@pytest.mark.parametrize("name", GOOD_CASE_NAMES)
def test_good_file_decodes_exactly(good: tuple[Path, dict[str, GoodCase]], name: str) -> None:
    folder, expected = good
    case = expected[name]
    scan = read_scan(folder / name)
    assert isinstance(scan, ScanFile)
    assert scan.format == case.format
    assert [f.pixels.shape for f in scan.frames] == list(case.shapes)
    for frame in scan.frames:
        assert frame.pixels.dtype == np.dtype(case.dtype)
        assert frame.pixels.ndim == 2 and frame.pixels.flags.writeable
        assert np.isfinite(frame.pixels).all() and frame.pixels.min() < frame.pixels.max()
        assert min(frame.pixels.shape) >= MIN_SIDE
    if case.pixels is not None:
        for frame, want in zip(scan.frames, case.pixels, strict=True):
            if case.atol:
                assert np.abs(frame.pixels.astype(float) - want.astype(float)).mean() < case.atol / 4
                assert np.abs(frame.pixels.astype(float) - want.astype(float)).max() <= case.atol
            else:
                np.testing.assert_array_equal(frame.pixels, want)
    if case.value_range is not None:
        assert (min(f.pixels.min() for f in scan.frames), max(f.pixels.max() for f in scan.frames)) == case.value_range
    if case.views is not None:
        assert tuple(f.view for f in scan.frames) == case.views
    if case.note is not None:
        assert case.note in " | ".join(scan.notes)
    else:
        assert not any("converted" in note for note in scan.notes)
    assert (scan.dicom is not None) == (case.format == "dicom")
    if case.facts:
        for key, value in case.facts.items():
            assert getattr(scan.dicom, key) == value, key
    if case.format != "dicom":
        assert all(f.view is None for f in scan.frames)


def test_values_above_8_bits_survive(good: tuple[Path, dict[str, GoodCase]]) -> None:
    folder, _ = good
    for name in ("u16.tif", "g16.png", "lzw16.tif"):
        pixels = read_scan(folder / name).frames[0].pixels
        assert pixels.dtype == np.uint16 and pixels.max() > 255, name


# --------------------------------------------------------------------------- DICOM facts


def test_dicom_facts_and_identifiers(good: tuple[Path, dict[str, GoodCase]]) -> None:
    folder, _ = good
    facts = read_scan(folder / "signed16.dcm").dicom
    assert facts is not None
    assert (facts.sex, facts.age_years, facts.study_year) == ("F", 45, 2021)
    assert facts.patient_id == PHI["PatientID"] and facts.study_uid == PHI["StudyInstanceUID"]
    identifiers = set(facts.identifiers)
    missing = set(PHI.values()) - identifiers
    assert not missing
    # Name parts and an ISO birth date, because file names spell them that way.
    assert {"Testperson", "Alicia", "Marie", "Referrer", "Robert", "1976-03-12"} <= identifiers
    # The standard's own UIDs (SOP class, transfer syntax) identify nobody.
    assert not any(value.startswith("1.2.840.10008.") for value in identifiers)


def test_repr_never_shows_identifiers(good: tuple[Path, dict[str, GoodCase]]) -> None:
    folder, _ = good
    text = repr(read_scan(folder / "signed16.dcm"))
    assert "DicomFacts(" in text and "sex='F'" in text
    for secret in PHI_STRINGS:
        assert secret not in text


@pytest.mark.parametrize(
    ("age", "birth", "study", "years"),
    [
        ("045Y", None, None, 45),
        ("006M", None, None, 0),
        ("030M", None, None, 2),
        ("010W", None, None, 0),
        ("003D", None, None, 0),
        ("45", None, None, 45),
        ("nonsense", "19600615", "20210614", 60),
        (None, "19600615", "20210615", 61),
        ("", "1960.06.15", "2021.06.16", 61),
        (None, "19600615", None, None),
        (None, None, "20210615", None),
        (None, "20300101", "20210615", None),
        ("999Y", None, None, None),
    ],
)
def test_dicom_age_years(age: str | None, birth: str | None, study: str | None, years: int | None) -> None:
    assert dicom_age_years(age, birth, study) == years


def test_missing_decoder_plugin_names_what_to_install(
    good: tuple[Path, dict[str, GoodCase]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import pydicom.pixels

    class Unavailable:
        is_available = False

    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda uid: Unavailable())
    folder, _ = good
    message = rejection(folder / "j2k_lossless.dcm")
    assert "cannot be decoded here; install pylibjpeg-openjpeg, or export it uncompressed" in message
    assert "JPEG 2000 Image Compression (Lossless Only) (1.2.840.10008.1.2.4.90)" in message


# --------------------------------------------------------------------------- decompression bombs

# Every bomb declares at most 128 x 96 16-bit pixels; the goal is a peak of at most
# 2 x the declared decoded size + 100 MB while importing any file.
_BOMB_DECLARED_MIB = 128 * 96 * 2 / 2**20
_BOMB_PEAK_LIMIT_MIB = 2 * _BOMB_DECLARED_MIB + 100


@pytest.mark.parametrize("name", list(BOMBS))
def test_bomb_is_rejected_within_its_memory_bound(bad: tuple[Path, dict[str, str]], name: str) -> None:
    """Read in a fresh interpreter: the peak memory growth is measured, not estimated."""
    folder, _ = bad
    reason, _build = BOMBS[name]
    cost = peak_memory_of_reading(folder / name)
    assert str(cost["outcome"]).startswith("rejected: "), cost
    assert reason in str(cost["outcome"])
    assert float(cost["peak_mib"]) <= _BOMB_PEAK_LIMIT_MIB, cost  # unchecked, these reached 260 MiB to 1.9 GiB


def test_tiff_at_the_page_cap_is_read(tmp_path: Path) -> None:
    path = tmp_path / "pages.tif"
    path.write_bytes(tiff_bytes(np.stack([gradient(64, 64, seed=i) for i in range(imaging.MAX_PAGES)])))
    assert len(read_scan(path).frames) == imaging.MAX_PAGES
    path.write_bytes(tiff_bytes(np.stack([gradient(64, 64, seed=i) for i in range(imaging.MAX_PAGES + 1)])))
    assert f"more than {imaging.MAX_PAGES} pages" in rejection(path)


@pytest.mark.parametrize("compression", ["zlib", "packbits", "lzma"])
def test_compressed_tiff_within_its_declared_size_is_read(tmp_path: Path, compression: str) -> None:
    """The expansion check counts a strip's real output: honest compressed strips pass it."""
    image = gradient(256, 128)
    path = tmp_path / f"{compression}.tif"
    if compression == "packbits":  # tifffile writes PackBits only with imagecodecs; Pillow can
        path.write_bytes(pillow_bytes(Image.fromarray(image), "TIFF", compression="packbits"))
    else:
        path.write_bytes(tiff_bytes(image, compression=compression, rowsperstrip=32))
    np.testing.assert_array_equal(read_scan(path).frames[0].pixels, image)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("name", ["bomb_huge.png", "bomb_100mp.jpg", "bomb_huge.jpg"])
def test_pillow_bombs_are_rejected_whatever_pillows_own_limit(
    bad: tuple[Path, dict[str, str]], monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """The declared-size check is this module's own, per call: it holds when another module
    has switched Pillow's process-wide limit off."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    folder, expected = bad
    assert expected[name] in rejection(folder / name)


# --------------------------------------------------------------------------- process-wide state


def test_rejected_file_is_an_input_error() -> None:
    assert issubclass(RejectedFile, InputError)


_PILLOW_STATE_SCRIPT = """
import sys
from PIL import ImageFile
ImageFile.LOAD_TRUNCATED_IMAGES = True  # what another module of the process may have chosen
from bonescan_core.imaging import RejectedFile, read_scan
assert ImageFile.LOAD_TRUNCATED_IMAGES is True, "importing imaging changed Pillow"
try:
    read_scan(sys.argv[1])
except RejectedFile as error:
    print(error)
assert ImageFile.LOAD_TRUNCATED_IMAGES is True, "reading changed Pillow"
"""


@pytest.mark.parametrize("name", ["trunc_mid.jpg", "trunc_tail.jpg", "trunc_mid.png"])
def test_pillow_setting_is_left_alone_and_truncation_still_rejected(bad: tuple[Path, dict[str, str]], name: str) -> None:
    """Pillow's LOAD_TRUNCATED_IMAGES belongs to the process: reads stay strict without changing it."""
    folder, expected = bad
    done = subprocess.run([sys.executable, "-c", _PILLOW_STATE_SCRIPT, str(folder / name)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert expected[name] in done.stdout


# --------------------------------------------------------------------------- negative counts


def test_lossy_jpeg2000_negative_counts_are_clipped_and_counted(db, tmp_path: Path) -> None:
    """pydicom's lossy NM whole body (signed; rings down to -30): zero counts must look and
    normalise as zero, in the thumbnail, the viewer and the model input alike."""
    source = Path(get_testdata_file("JPEG2000.dcm"))
    raw = pydicom.dcmread(source).pixel_array
    negative = int((raw < 0).sum())
    assert raw.min() == -30 and negative > 0  # the file really holds negative values

    frame = read_scan(source).frames[0]
    assert frame.pixels.dtype == np.int16 and frame.pixels.min() == 0
    np.testing.assert_array_equal(frame.pixels, np.maximum(raw, 0))
    assert frame.clipped == negative

    background = raw == 0  # the body's surroundings: no counts
    assert (pixelstore.to_display(frame.pixels)[background] == 255).all()  # white, not grey
    assert (preprocess.minmax(frame.pixels)[background] == 0).all()

    shutil.copy(source, tmp_path / "nm_whole_body.dcm")
    outcome = ingest.import_files(db, [tmp_path / "nm_whole_body.dcm"])[0]
    assert outcome.status == "imported", outcome
    row = next(db.query("SELECT clipped_pixels, pixels FROM images"))
    assert row["clipped_pixels"] == negative
    assert pixelstore.decode_pixels(row["pixels"]).min() == 0


# --------------------------------------------------------------------------- truncation sweep


def _sweep_sources() -> dict[str, bytes]:
    image8 = gradient(96, 80, "uint8", top=250)
    jpeg_ds = nm_dataset(image8)
    jpeg_ds.BitsAllocated, jpeg_ds.BitsStored, jpeg_ds.HighBit = 8, 8, 7
    two_pages = np.stack([gradient(80, 72), gradient(80, 72, seed=1)])
    return {
        "sweep.tif": tiff_bytes(two_pages),
        "sweep.png": pillow_bytes(Image.fromarray(image8), "PNG"),
        "sweep.jpg": pillow_bytes(Image.fromarray(image8), "JPEG"),
        "sweep.dcm": dicom_bytes(nm_dataset(gradient(96, 80))),
        "sweep_jpeg.dcm": dicom_bytes(encapsulated(jpeg_ds, JPEGBaseline8Bit, [pillow_bytes(Image.fromarray(image8), "JPEG")])),
    }


@pytest.mark.parametrize("name", ["sweep.tif", "sweep.png", "sweep.jpg", "sweep.dcm", "sweep_jpeg.dcm"])
def test_every_truncation_is_rejected(tmp_path: Path, name: str) -> None:
    data = _sweep_sources()[name]
    path = tmp_path / name
    path.write_bytes(data)
    read_scan(path)  # the whole file is fine
    cuts = sorted({*np.linspace(1, len(data) - 1, 40).astype(int).tolist(), *range(len(data) - 9, len(data))})
    for cut in cuts:
        path.write_bytes(data[:cut])
        message = rejection(path)
        assert re.search(r"truncated or corrupt|not an image", message), (cut, message)
        assert_well_formed(message, path)


# --------------------------------------------------------------------------- sniffing, paths, registry


@pytest.mark.parametrize(
    ("head", "fmt"),
    [
        (b"II*\x00\x08\x00\x00\x00", "tiff"),
        (b"MM\x00*\x00\x00\x00\x08", "tiff"),
        (b"II+\x00\x08\x00\x00\x00", "tiff"),
        (b"MM\x00+\x00\x08\x00\x00", "tiff"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "png"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "jpeg"),
        (b"\x00" * 128 + b"DICM\x02\x00", "dicom"),
        (b"II*\x00" + b"\x00" * 124 + b"DICM", "dicom"),  # dual-personality: DICOM wins
        (b"GIF89a", None),
        (b"\xff\xd8", None),
        (b"hello world", None),
        (b"", None),
    ],
)
def test_sniff_format(head: bytes, fmt: str | None) -> None:
    assert sniff_format(head) == fmt


def test_unreadable_paths_are_rejected(tmp_path: Path) -> None:
    assert "cannot read the file" in rejection(tmp_path / "missing.png")
    assert "cannot read the file" in rejection(tmp_path)


def test_extension_table_and_registry() -> None:
    assert set(READERS) == set(EXTENSIONS.values()) == {"tiff", "png", "jpeg", "dicom"}
    assert MAX_PIXELS == 40_000_000 and MIN_SIDE == 64


def test_readers_are_looked_up_in_the_registry(good: tuple[Path, dict[str, GoodCase]], monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_png(path: Path, size: int) -> imaging._Decoded:
        return imaging._Decoded([gradient(80, 70, "uint8", top=9)], [None], [None], ["fake reader"])

    monkeypatch.setitem(READERS, "png", fake_png)
    folder, _ = good
    scan = read_scan(folder / "g8.png")
    assert scan.notes == ("fake reader",) and scan.frames[0].pixels.shape == (80, 70)


def test_unexpected_decoder_errors_become_rejections(
    good: tuple[Path, dict[str, GoodCase]], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(path: Path, size: int) -> imaging._Decoded:
        raise KeyError(f"surprise in {path}")

    monkeypatch.setitem(READERS, "tiff", broken)
    folder, _ = good
    message = rejection(folder / "u8.tif")
    assert message.startswith("truncated or corrupt TIFF (KeyError") and "u8.tif" not in message


def test_concurrent_reads_leave_global_state_alone(good: tuple[Path, dict[str, GoodCase]]) -> None:
    import warnings
    from concurrent.futures import ThreadPoolExecutor

    import pydicom

    folder, expected = good
    names = ["signed16.dcm", "nm_two_frames.dcm", "g16.png", "pages2.tif", "JPEG2000.dcm", "rle.dcm"] * 4
    filters_before, mode_before = list(warnings.filters), pydicom.config.settings.reading_validation_mode
    with ThreadPoolExecutor(max_workers=8) as pool:
        scans = list(pool.map(lambda n: read_scan(folder / n), names))
    assert [len(s.frames) for s in scans] == [len(expected[n].shapes) for n in names]
    assert warnings.filters == filters_before
    assert pydicom.config.settings.reading_validation_mode == mode_before
