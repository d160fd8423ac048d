"""Synthetic bone-scan phantoms: shapes, determinism, class balance, lesion geometry and visibility."""

from __future__ import annotations

import numpy as np
import pytest

from bonescan_core.phantom import (
    FINDING_KINDS,
    PRIMARY_CANCERS,
    VIEWS,
    Finding,
    PhantomStudy,
    make_studies,
    make_study,
)

H, W = 1024, 256


@pytest.fixture(scope="module")
def full_size() -> list[PhantomStudy]:
    """Twelve full-size studies, half metastatic, shared by the geometry tests (~0.5 s)."""
    return list(make_studies(12, seed=2024, metastatic_fraction=0.5))


@pytest.fixture(scope="module")
def small() -> list[PhantomStudy]:
    """Forty 256x64 studies (the size the rest of the test suite uses)."""
    return list(make_studies(40, seed=7, metastatic_fraction=0.4, height=256, width=64))


def disk_and_ring(img: np.ndarray, row: int, col: int, radius: float, disk: float = 2.0) -> tuple[float, float]:
    """Mean counts in a small disk at (row, col) and the median of a ring just outside the lesion."""
    yy, xx = np.ogrid[: img.shape[0], : img.shape[1]]
    d = np.hypot(yy - row, xx - col)
    ring = (d >= radius + 3) & (d <= radius + 8)
    return float(img[d <= disk].mean()), float(np.median(img[ring]))


def box_mean(img: np.ndarray, k: int) -> np.ndarray:
    """k x k moving average; output[i, j] is the mean of img[i:i+k, j:j+k]."""
    c = np.cumsum(np.cumsum(np.pad(img.astype(float), ((1, 0), (1, 0))), 0), 1)
    return (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) / (k * k)


def test_shapes_dtypes_and_metadata(full_size):
    for s in full_size:
        for view in VIEWS:
            img = getattr(s, view)
            assert img.shape == (H, W)
            assert img.dtype == np.uint16
        assert s.sex in ("F", "M")
        assert 35 <= s.age <= 85
        assert s.primary_cancer in PRIMARY_CANCERS
        assert not (s.sex == "F" and s.primary_cancer == "prostate")
        assert all(isinstance(f, Finding) and f.kind in FINDING_KINDS and f.view in VIEWS for f in s.findings)


def test_counts_look_like_a_bone_scan(full_size):
    for s in full_size:
        for img in (s.anterior, s.posterior):
            # Bone peaks in the 100-600 range; outside the body (outer columns) essentially empty.
            assert 80 <= np.percentile(img, 99.5) <= 900
            assert img[:, :6].mean() < 2.0 and img[:, -6:].mean() < 2.0
            # The patient is narrower than the matrix and spans most of its length.
            cols = np.flatnonzero(box_mean(img, 9).max(axis=0) > 5)
            rows = np.flatnonzero(box_mean(img, 9).max(axis=1) > 5)
            assert 0.45 * W < np.ptp(cols) < 0.97 * W
            assert np.ptp(rows) > 0.75 * H


def test_same_seed_is_identical_and_different_seed_differs():
    a = list(make_studies(3, seed=11, height=256, width=64))
    b = list(make_studies(3, seed=11, height=256, width=64))
    c = list(make_studies(3, seed=12, height=256, width=64))
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.anterior, y.anterior) and np.array_equal(x.posterior, y.posterior)
        assert x.findings == y.findings and (x.sex, x.age, x.primary_cancer) == (y.sex, y.age, y.primary_cancer)
    assert not all(np.array_equal(x.anterior, z.anterior) for x, z in zip(a, c, strict=True))


def test_make_study_is_a_pure_function_of_the_rng_state():
    s1 = make_study(np.random.default_rng(5), True, 256, 64)
    s2 = make_study(np.random.default_rng(5), True, 256, 64)
    assert np.array_equal(s1.anterior, s2.anterior) and s1.findings == s2.findings


@pytest.mark.parametrize(("n", "fraction"), [(10, 0.35), (10, 0.25), (7, 0.5), (5, 0.0), (5, 1.0), (0, 0.4)])
def test_exact_metastatic_count(n, fraction):
    studies = list(make_studies(n, seed=3, metastatic_fraction=fraction, height=64, width=64))
    assert len(studies) == n
    assert sum(s.metastatic for s in studies) == round(n * fraction)


def test_metastatic_order_is_shuffled():
    flags = [s.metastatic for s in make_studies(20, seed=1, metastatic_fraction=0.5, height=64, width=64)]
    assert sum(flags) == 10 and flags != sorted(flags, reverse=True) and flags != sorted(flags)


def test_lesion_counts(small):
    for s in small:
        lesions = s.lesions
        assert all(f.kind == "metastasis" for f in lesions)
        n_ant = sum(f.view == "anterior" for f in lesions)
        if s.metastatic:
            assert 1 <= n_ant <= 10
        else:
            assert lesions == ()


def test_posterior_findings_mirror_anterior(small, full_size):
    for s in small + full_size:
        width = s.anterior.shape[1]
        ant = sorted((f.kind, f.row, width - 1 - f.col, f.radius) for f in s.findings if f.view == "anterior")
        post = sorted((f.kind, f.row, f.col, f.radius) for f in s.findings if f.view == "posterior")
        assert ant == post


def test_lesions_lie_in_the_body_and_are_hot(full_size):
    n_checked = 0
    for s in full_size:
        for f in s.lesions:
            img = (s.anterior if f.view == "anterior" else s.posterior).astype(float)
            assert 0 <= f.row < H and 0 <= f.col < W
            assert 3.0 <= f.radius <= 10.0
            centre, ring = disk_and_ring(img, f.row, f.col, f.radius)
            background = img[:, :6].mean()
            assert centre > 10 * background + 20, "lesion centre is outside the body"
            # Hotter than the surrounding bone/soft tissue, in BOTH views.
            assert centre > 1.1 * ring, f"{f} not hot: centre {centre:.0f} vs ring median {ring:.0f}"
            n_checked += 1
    assert n_checked >= 6


def test_lesions_hot_at_small_size(small):
    # At 256x64 a lesion is only 1.5-2.5 px, so compare its peak with the ring just outside it.
    n_checked = 0
    for s in small:
        for f in s.lesions:
            img = (s.anterior if f.view == "anterior" else s.posterior).astype(float)
            yy, xx = np.ogrid[: img.shape[0], : img.shape[1]]
            d = np.hypot(yy - f.row, xx - f.col)
            ring = np.median(img[(d >= f.radius + 2) & (d <= f.radius + 5)])
            assert img[d <= 1.5].max() > 1.15 * ring, f
            n_checked += 1
    assert n_checked >= 20


def test_posterior_spine_brighter_and_views_differ(full_size):
    for s in full_size:
        ant, post = s.anterior.astype(float), s.posterior[:, ::-1].astype(float)
        assert not np.array_equal(ant, post)
        band = slice(int(0.25 * H), int(0.42 * H))
        mid = int(round((ant[band].sum(0) * np.arange(W)).sum() / ant[band].sum()))
        spine = (band, slice(mid - 4, mid + 5))
        assert post[spine].mean() > 1.15 * ant[spine].mean()


def test_bladder_is_the_hottest_midline_pelvic_region():
    h, w, k = 512, 128, 5
    checked = 0
    for s in make_studies(24, seed=9, metastatic_fraction=0.0, height=h, width=w):
        if s.findings:  # keep urine contamination / injection / degenerative foci out of the way
            continue
        img = s.anterior.astype(float)
        sm = box_mean(img, k)
        r0, r1 = int(0.35 * h), int(0.65 * h)
        centre = (img[r0:r1].sum(0) * np.arange(w)).sum() / img[r0:r1].sum()
        c0, c1 = int(centre - 0.12 * w), int(centre + 0.12 * w)
        sub = sm[r0:r1, c0:c1]
        rr, cc = np.unravel_index(sub.argmax(), sub.shape)
        row, col = rr + r0 + k // 2, cc + c0 + k // 2
        # The midline is where the lumbar spine runs, just above the hottest spot.
        lumbar_rows = slice(row - int(0.12 * h), row - int(0.05 * h))
        mid = int(np.argmax(img[lumbar_rows].mean(0)))
        assert abs(col - mid) < 0.08 * w, "hottest pelvic region is off the midline"
        # Far hotter than the lumbar spine above it: a soft-tissue reservoir, not bone ...
        lumbar = sm[row - k // 2 - int(0.12 * h): row - k // 2 - int(0.05 * h), mid - int(0.03 * w) - k // 2: mid + int(0.03 * w) - k // 2]
        assert sub.max() > 1.5 * lumbar.max()
        # ... and far hotter than the thighs' soft tissue below it.
        thighs = np.median(img[row + int(0.1 * h): row + int(0.15 * h), int(mid - 0.1 * w): int(mid + 0.1 * w)])
        assert sub.max() > 5 * thighs
        checked += 1
    assert checked >= 5


def test_about_68_percent_female_with_consistent_primaries():
    studies = list(make_studies(60, seed=4, metastatic_fraction=0.4, height=64, width=64))
    assert 0.55 < np.mean([s.sex == "F" for s in studies]) < 0.82
    assert all(s.primary_cancer != "prostate" for s in studies if s.sex == "F")
    primaries = {s.primary_cancer for s in studies}
    assert {"breast", "prostate", "lung"} <= primaries


def test_lookalikes_in_both_classes(small):
    benign = [s for s in small if not s.metastatic]
    with_lookalikes = np.mean([bool(s.findings) for s in benign])
    assert 0.25 < with_lookalikes < 0.75
    assert any(f.kind != "metastasis" for s in small if s.metastatic for f in s.findings)
    kinds = {f.kind for s in small for f in s.findings}
    assert {"metastasis", "degenerative"} <= kinds


def test_rib_fracture_foci_are_vertically_aligned():
    found = 0
    for s in make_studies(30, seed=21, metastatic_fraction=0.0, height=256, width=64):
        foci = [f for f in s.findings if f.kind == "rib_fracture" and f.view == "anterior"]
        if foci:
            found += 1
            assert 2 <= len(foci) <= 4
            cols = [f.col for f in foci]
            rows = sorted(f.row for f in foci)
            assert max(cols) - min(cols) <= 3
            assert all(b > a for a, b in zip(rows, rows[1:], strict=False))
    assert found >= 2


@pytest.mark.parametrize(("height", "width"), [(256, 64), (64, 64), (512, 128), (300, 90)])
def test_small_and_odd_sizes(height, width):
    s = make_study(np.random.default_rng(0), True, height, width)
    assert s.anterior.shape == s.posterior.shape == (height, width)
    assert s.anterior.dtype == s.posterior.dtype == np.uint16
    assert s.anterior.max() > 0 and all(0 <= f.row < height and 0 <= f.col < width for f in s.findings)


@pytest.mark.parametrize(("height", "width"), [(63, 256), (1024, 63), (10, 10), (0, 0)])
def test_bad_sizes_raise(height, width):
    with pytest.raises(ValueError, match="at least 64"):
        make_study(np.random.default_rng(0), False, height, width)
    with pytest.raises(ValueError, match="at least 64"):
        make_studies(2, seed=0, height=height, width=width)


@pytest.mark.parametrize("fraction", [-0.1, 1.01, float("nan")])
def test_bad_fraction_raises(fraction):
    with pytest.raises(ValueError, match="metastatic_fraction"):
        make_studies(4, seed=0, metastatic_fraction=fraction)


def test_negative_count_raises():
    with pytest.raises(ValueError, match="n_studies"):
        make_studies(-1, seed=0)
