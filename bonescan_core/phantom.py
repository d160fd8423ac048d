"""Seeded synthetic whole-body bone scans (Tc-99m MDP), anterior and posterior views.

Real bone scans cannot ship with the repository, yet every part of the workbench (ingest, review,
training, the explorer) needs images that a nuclear-medicine reader would accept as plausible. This
module draws them: an analytic skeleton rendered as tracer uptake, soft-tissue background, kidneys
and bladder, optional metastases and benign look-alikes, gamma-camera blur and Poisson counts.

Conventions used throughout:

* Arrays are ``(height, width)`` with the head at row 0 and the feet near the last row.
* Anatomy is described in *body units*: ``u`` runs from 0 (vertex) to 1 (soles) along the patient,
  ``v`` is lateral distance in the same units, positive towards the patient's LEFT. Everything is
  drawn in anterior-view pixel coordinates, where the patient's left lies at higher column indices
  (the patient faces the camera). The posterior view is the left-right mirror, so a point at column
  ``c`` of the anterior array sits at column ``width - 1 - c`` of the posterior array, same row.
* Each structure has a depth ``d`` in [0, 1] (0 = just under the anterior skin, 1 = at the back).
  Soft-tissue attenuation makes it appear with weight ``1 - alpha * d`` in the anterior view and
  ``1 - alpha * (1 - d)`` in the posterior view, so the spine, ribs and kidneys are brighter
  posteriorly and the sternum, pubis and bladder anteriorly, without a 3-D model.

Speed matters (whole training sets are generated on the fly), so every primitive is evaluated with
numpy on a small bounding box only, the ribs and spine are drawn as closed-form fields, and the
Poisson sampler uses a lookup table instead of ``Generator.poisson`` (which costs ~15 ms per view).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

VIEWS = ("anterior", "posterior")
PRIMARY_CANCERS = ("breast", "prostate", "lung", "thyroid", "kidney", "other")
FINDING_KINDS = ("metastasis", "degenerative", "rib_fracture", "injection_site", "urine_contamination")

#: Smallest accepted image side: below this the ribs and vertebrae are sub-pixel and meaningless.
MIN_SIDE = 64

# Nominal geometry the pixel-sized parameters (blur, lesion radius) are quoted for.
_NOMINAL_HEIGHT = 1024
_NOMINAL_WIDTH = 256


@dataclass(frozen=True)
class Finding:
    """One focal abnormality (or look-alike) as it appears in one view.

    Attributes:
        kind: One of ``FINDING_KINDS``: "metastasis", "degenerative", "rib_fracture",
            "injection_site" or "urine_contamination".
        view: "anterior" or "posterior".
        row: Centre row in that view's array, ``0 <= row < height``.
        col: Centre column in that view's array, ``0 <= col < width``; the posterior column of a
            focus is ``width - 1 -`` its anterior column.
        radius: Approximate visible radius in pixels (> 0).
    """

    kind: str
    view: str
    row: int
    col: int
    radius: float


@dataclass(frozen=True)
class PhantomStudy:
    """One synthetic whole-body bone scan.

    Attributes:
        anterior: ``(height, width)`` uint16 counts, head at row 0, patient's left at high columns.
        posterior: ``(height, width)`` uint16 counts, the mirrored back view (patient's left at low
            columns). At 1024x256 bone peaks are roughly 100-600 counts and the background outside
            the body ~0-2; smaller matrices have proportionally more counts per pixel (the same scan
            rebinned, up to 16x), so a 256x64 study is much less noisy.
        metastatic: True when the study contains 1-10 metastases.
        findings: Metastases and benign look-alikes, one entry per view in which they are seen
            (every focus here is seen in both views, so each appears twice: anterior, posterior).
        sex: "F" or "M".
        age: Age in years, 35..85.
        primary_cancer: One of ``PRIMARY_CANCERS``, consistent with ``sex``.
    """

    anterior: np.ndarray
    posterior: np.ndarray
    metastatic: bool
    findings: tuple[Finding, ...]
    sex: str
    age: int
    primary_cancer: str

    @property
    def lesions(self) -> tuple[Finding, ...]:
        """Only the findings of kind "metastasis" (both views)."""
        return tuple(f for f in self.findings if f.kind == "metastasis")


@dataclass(frozen=True)
class ScannerShift:
    """How a second scanner (another hospital's camera and protocol) differs from the default one.

    Applied by :func:`make_study` to the same anatomy and findings: the matrix is rescaled, the
    counts (dose x acquisition time) scaled, extra Gaussian read-out noise added after the
    Poisson counts, and the stored values mapped through a linear intensity scale, as a vendor's
    export scaling or a baseline offset would do. All randomness comes from the study's own noise
    generator, so a seed gives the same shifted studies every time.

    Attributes:
        matrix_scale: Factor on both image sides (0.875: 1024x256 -> 896x224), > 0.
        count_scale: Factor on the expected counts (0.6: 60 % of the dose x time), > 0.
        read_noise: Standard deviation, in counts, of Gaussian noise added to every pixel (>= 0).
        gain: Factor of the stored intensity scale (stored = gain * counts + offset), > 0.
        offset: Added to every stored value (a baseline), in stored units (>= 0).
    """

    matrix_scale: float = 0.875
    count_scale: float = 0.6
    read_noise: float = 3.0
    gain: float = 1.25
    offset: float = 20.0

    def size(self, height: int, width: int) -> tuple[int, int]:
        """The shifted matrix ``(height, width)`` for a requested one."""
        return round(height * self.matrix_scale), round(width * self.matrix_scale)

    def apply(self, rng: np.random.Generator, counts: np.ndarray) -> np.ndarray:
        """Read-out noise and the intensity scale on uint16 counts of any shape; uint16 out, clipped to 0..65535."""
        values = counts.astype(np.float32)
        if self.read_noise > 0:
            values += rng.normal(0.0, self.read_noise, counts.shape).astype(np.float32)
        values = values * np.float32(self.gain) + np.float32(self.offset)
        return np.clip(np.rint(values), 0, 65535).astype(np.uint16)


#: "Looks like another scanner" (``bonescan demo --shift``, the Scans page's checkbox).
OTHER_SCANNER = ScannerShift()


# --------------------------------------------------------------------------------------------
# Per-study body description
# --------------------------------------------------------------------------------------------

# Relative heights of C1..C7, T1..T12, L1..L5; vertebrae grow caudally, which is what makes a
# real spine read as a spine rather than a ladder of equal rungs.
_VERT_REL_HEIGHT = np.array([1.0] * 7 + list(np.linspace(1.3, 1.8, 12)) + [2.1] * 5)
_VERT_TOP_U, _VERT_BOTTOM_U = 0.108, 0.445
# Vertebral half-width (body units) at C1, C7, T12, L5 (interpolated over the 24 levels).
_VERT_HW_KNOTS = ([0.0, 6.0, 18.0, 23.0], [0.012, 0.011, 0.016, 0.022])
# Uptake along the column: lumbar bodies are the hottest bone after the SI joints.
_VERT_AMP_KNOTS = ([0.0, 6.0, 12.0, 18.0, 23.0], [0.55, 0.62, 0.75, 0.85, 0.98])

# Ribs 1..12: lateral reach of the cage, drop of the posterior arc at its lateral end, and the
# medial end of the ossified anterior rib (costal cartilage takes up no tracer; ribs 11-12 float).
_RIB_W = np.array([0.045, 0.060, 0.070, 0.078, 0.084, 0.088, 0.090, 0.091, 0.090, 0.087, 0.075, 0.062])
_RIB_DROP = np.array([0.014, 0.022, 0.027, 0.031, 0.034, 0.037, 0.040, 0.043, 0.046, 0.050, 0.054, 0.056])
_RIB_VEND = np.array([0.022, 0.025, 0.028, 0.031, 0.036, 0.042, 0.052, 0.066, 0.076, 0.084, 9.0, 9.0])
_RIB_ANT_SLOPE = 0.62  # anterior ribs run infero-medially: du per unit of medial travel

# Soft-tissue silhouette of the trunk (u, half-width) before per-study shoulder/hip scaling.
_TRUNK_U = np.array([0.155, 0.172, 0.188, 0.205, 0.24, 0.29, 0.34, 0.37, 0.41, 0.46, 0.5, 0.53, 0.555])
_TRUNK_HW = np.array([0.036, 0.07, 0.112, 0.122, 0.116, 0.110, 0.103, 0.098, 0.103, 0.111, 0.114, 0.104, 0.06])


@dataclass
class _Arm:
    """One arm in body units (u, v); ``side`` is -1 for the patient's right, +1 for the left."""

    side: int
    shoulder: tuple[float, float]
    elbow: tuple[float, float]
    wrist: tuple[float, float]
    forearm_depth: float


@dataclass
class _Body:
    """Random anatomy of one patient plus the body-unit -> pixel mapping."""

    height: int
    width: int
    s: float  # pixels per body unit along the patient (rows)
    sx: float  # pixels per body unit across the patient (columns); ~0.7 s, see _sample_body
    r0: float  # row of the vertex
    c0: float  # column of the midline
    px: float  # pixel-size scale relative to a 1024x256 matrix (blur, lesion radii)
    sex: str
    pelvis: float  # lateral scale of the pelvis (wider in women)
    shoulder: float  # lateral scale of the shoulder girdle (wider in men)
    chest: float  # lateral scale of the rib cage
    knee_v: float
    ankle_v: float
    scol_amp: float
    scol_phase: float
    vert_bounds: np.ndarray  # (25,) u of the vertebral boundaries C1 top .. L5 bottom
    arms: tuple[_Arm, _Arm]
    alpha: float  # depth contrast between the views
    skull_gain: float  # skull uptake varies a lot between patients (age, sex, metabolic bone disease)
    limb_gain: float
    rib_gain: float

    @property
    def sm(self) -> float:
        """Geometric-mean pixel scale, used for radii of oblique structures."""
        return math.sqrt(self.s * self.sx)

    def rc(self, u: float, v: float) -> tuple[float, float]:
        """Body units -> (row, col) in the anterior view."""
        return self.r0 + u * self.s, self.c0 + v * self.sx

    def spine_v(self, u: np.ndarray | float) -> np.ndarray | float:
        """Lateral offset of the spinal axis (a mild scoliosis, zero at the skull and sacrum)."""
        w = np.clip((np.asarray(u) - 0.15) / 0.32, 0.0, 1.0)
        return self.scol_amp * np.sin(np.pi * w) * np.sin(2.0 * np.pi * w + self.scol_phase) * 1.5

    @property
    def vert_centres(self) -> np.ndarray:
        return 0.5 * (self.vert_bounds[:-1] + self.vert_bounds[1:])

    @property
    def rib_u(self) -> np.ndarray:
        """u of the 12 rib heads: each rib articulates at the upper half of its thoracic body."""
        b = self.vert_bounds
        return b[7:19] + 0.35 * (b[8:20] - b[7:19])

    @property
    def rib_w(self) -> np.ndarray:
        return _RIB_W * self.chest

    @property
    def rib_vs(self) -> float:
        """Medial start of the visible posterior rib (lateral edge of the transverse process)."""
        return 0.017

    def posterior_rib_u(self, k: np.ndarray | int, x: np.ndarray | float) -> np.ndarray:
        """u of posterior rib ``k`` (1..12) at lateral distance ``x`` (body units) from the spine."""
        i = np.asarray(k) - 1
        wk = self.rib_w[i]
        t = np.clip((np.asarray(x) - self.rib_vs) / (wk - self.rib_vs), 0.0, 1.3)
        return self.rib_u[i] + _RIB_DROP[i] * _rib_shape(t)

    def anterior_rib_u(self, k: np.ndarray | int, x: np.ndarray | float) -> np.ndarray:
        """u of the anterior arc of rib ``k`` at lateral distance ``x``."""
        i = np.asarray(k) - 1
        return self.rib_u[i] + _RIB_DROP[i] + _RIB_ANT_SLOPE * (self.rib_w[i] - np.asarray(x))


def _rib_shape(t: np.ndarray) -> np.ndarray:
    """Normalised drop of a posterior rib along its course (0 at the spine, 1 at the lateral end).

    Nearly flat medially and curving down laterally, the "gull wing" of posterior bone-scan ribs.
    """
    return 0.35 * t + 0.65 * t * t * t


def _sample_body(rng: np.random.Generator, height: int, width: int, sex: str) -> _Body:
    """Draw one patient's habitus, placement and pose."""
    male = sex == "M"
    px = math.sqrt((height / _NOMINAL_HEIGHT) * (width / _NOMINAL_WIDTH))
    stature = rng.uniform(0.88, 0.96) if male else rng.uniform(0.85, 0.94)
    s = stature * height
    r0 = rng.uniform(0.008, 0.025) * height
    r0 = min(r0, height - 2.0 - s)
    shoulder = rng.uniform(1.0, 1.08) if male else rng.uniform(0.92, 1.0)
    pelvis = rng.uniform(0.92, 1.0) if male else rng.uniform(1.02, 1.12)
    # The patient fills the matrix length, while the trunk (shoulder soft tissue) spans ~52-62% of
    # its width (arms included ~65-80%), the framing of a real whole-body scan. With a 4:1 matrix
    # that needs a lateral scale ~0.7x the vertical one, so the lateral scale is set separately.
    trunk_fraction = rng.uniform(0.52, 0.62)
    sx = trunk_fraction * width / (2.0 * 0.122 * shoulder)
    c0 = width / 2.0 + rng.uniform(-0.03, 0.03) * width
    chest = shoulder * rng.uniform(0.95, 1.03)

    bounds_rel = np.concatenate([[0.0], np.cumsum(_VERT_REL_HEIGHT * rng.uniform(0.96, 1.04, 24))])
    vert_bounds = _VERT_TOP_U + (_VERT_BOTTOM_U - _VERT_TOP_U) * bounds_rel / bounds_rel[-1]

    # Arms: the widest part of the patient; keep hand + soft tissue inside the matrix.
    room = (min(c0, width - 1 - c0) - 2.0) / sx
    pose = rng.choice(3, p=[0.6, 0.15, 0.25])  # 0: at the sides, 1: same but looser, 2: forearms over the pelvis
    arms = []
    for side in (-1, 1):
        shoulder_pt = (0.205, side * 0.108 * shoulder)
        theta = rng.uniform(0.02, 0.09) if pose != 1 else rng.uniform(0.06, 0.14)
        for _ in range(8):
            elbow = (shoulder_pt[0] + 0.172 * math.cos(theta), shoulder_pt[1] + side * 0.172 * math.sin(theta))
            if pose == 2:
                wrist = (elbow[0] + rng.uniform(0.075, 0.11), side * rng.uniform(0.02, 0.07))
                depth = 0.08
            else:
                phi = theta + rng.uniform(-0.02, 0.07)
                wrist = (elbow[0] + 0.145 * math.cos(phi), elbow[1] + side * 0.145 * math.sin(phi))
                depth = 0.5
            widest = max(abs(elbow[1]), abs(wrist[1])) + 0.05  # + hand, thumb and soft tissue
            if widest <= room:
                break
            theta *= 0.6
        arms.append(_Arm(side, shoulder_pt, elbow, wrist, depth))

    return _Body(
        height=height, width=width, s=s, sx=sx, r0=r0, c0=c0, px=px, sex=sex,
        pelvis=pelvis, shoulder=shoulder, chest=chest,
        knee_v=rng.uniform(0.045, 0.058) * pelvis, ankle_v=rng.uniform(0.035, 0.07),
        scol_amp=rng.uniform(0.0, 0.006), scol_phase=rng.uniform(0, 2 * np.pi),
        vert_bounds=vert_bounds, arms=(arms[0], arms[1]), alpha=rng.uniform(0.7, 0.82),
        skull_gain=rng.uniform(0.75, 1.4), limb_gain=rng.uniform(0.75, 1.15), rib_gain=rng.uniform(0.8, 1.2),
    )


# --------------------------------------------------------------------------------------------
# Rendering canvas: two depth buffers for bone/organs plus a max-combined soft-tissue buffer
# --------------------------------------------------------------------------------------------


class _Canvas:
    """Accumulates uptake in anterior-view pixel coordinates.

    ``front`` holds ``amp * (1 - d)`` and ``back`` holds ``amp * d``; the two views are then linear
    mixes of them (see ``views``), so every primitive is rendered once for both views.
    """

    def __init__(self, height: int, width: int):
        self.h, self.w = height, width
        self.front = np.zeros((height, width), np.float32)
        self.back = np.zeros((height, width), np.float32)
        self.soft = np.zeros((height, width), np.float32)
        self._rows = np.arange(height, dtype=np.float32)
        self._cols = np.arange(width, dtype=np.float32)
        self.gain = 1.0  # regional uptake multiplier (skull, limbs, ribs vary between patients)

    def window(self, r_lo: float, r_hi: float, c_lo: float, c_hi: float):
        """Clipped bounding box -> (slices, row column-vector, col row-vector) or None if empty."""
        r0, r1 = max(int(r_lo), 0), min(int(math.ceil(r_hi)) + 1, self.h)
        c0, c1 = max(int(c_lo), 0), min(int(math.ceil(c_hi)) + 1, self.w)
        if r0 >= r1 or c0 >= c1:
            return None
        return (slice(r0, r1), slice(c0, c1)), self._rows[r0:r1, None], self._cols[None, c0:c1]

    def deposit(self, sl: tuple[slice, slice], val: np.ndarray, amp: float, depth: float) -> None:
        amp *= self.gain
        if depth < 1.0:
            self.front[sl] += np.float32(amp * (1.0 - depth)) * val
        if depth > 0.0:
            self.back[sl] += np.float32(amp * depth) * val

    def deposit_soft(self, sl: tuple[slice, slice], val: np.ndarray, amp: float) -> None:
        # Max, not sum: overlapping limb/trunk silhouettes must not leave bright seams.
        view = self.soft[sl]
        np.maximum(view, np.float32(amp) * val, out=view)

    # -- primitives (all coordinates in pixels) ------------------------------------------------

    def capsule(self, a: tuple[float, float], b: tuple[float, float], ra: float, rb: float, amp: float,
                depth: float, soft: bool = False) -> None:
        """Tapered cylinder from ``a`` to ``b`` (row, col) with end radii ``ra``/``rb`` (pixels).

        The profile is the projected chord of a solid cylinder, sqrt(1 - (d/r)^2), which is what a
        long bone or limb looks like in projection.
        """
        (y0, x0), (y1, x1) = a, b
        ra, rb = max(ra, 0.6), max(rb, 0.6)
        rmax = max(ra, rb)
        win = self.window(min(y0, y1) - rmax, max(y0, y1) + rmax, min(x0, x1) - rmax, max(x0, x1) + rmax)
        if win is None:
            return
        sl, yy, xx = win
        dy, dx = y1 - y0, x1 - x0
        inv_len2 = 1.0 / max(dy * dy + dx * dx, 1e-6)
        py, px = yy - y0, xx - x0
        t = np.clip((py * dy + px * dx) * inv_len2, 0.0, 1.0)
        ey, ex = py - t * dy, px - t * dx
        r2 = (ra + (rb - ra) * t) ** 2 if ra != rb else ra * ra
        val = np.sqrt(np.clip(1.0 - (ey * ey + ex * ex) / r2, 0.0, None))
        if soft:
            self.deposit_soft(sl, val, amp)
        else:
            self.deposit(sl, val, amp, depth)

    def polyline(self, pts: list[tuple[float, float]], r: float, amp: float, depth: float, closed: bool = False) -> None:
        """Curved bone (crest, clavicle, mandible, obturator ring) of radius ``r`` through ``pts``.

        Uses the distance to the whole polyline rather than summing capsules, which would leave
        bright beads where consecutive segments overlap.
        """
        if closed:
            pts = [*pts, pts[0]]
        r = max(r, 0.6)
        ys, xs = [q[0] for q in pts], [q[1] for q in pts]
        win = self.window(min(ys) - r, max(ys) + r, min(xs) - r, max(xs) + r)
        if win is None:
            return
        sl, yy, xx = win
        d2 = None
        for (y0, x0), (y1, x1) in zip(pts[:-1], pts[1:], strict=True):
            dy, dx = y1 - y0, x1 - x0
            py, px = yy - y0, xx - x0
            t = np.clip((py * dy + px * dx) / max(dy * dy + dx * dx, 1e-6), 0.0, 1.0)
            ey, ex = py - t * dy, px - t * dx
            seg = ey * ey + ex * ex
            d2 = seg if d2 is None else np.minimum(d2, seg)
        self.deposit(sl, np.sqrt(np.clip(1.0 - d2 / (r * r), 0.0, None)), amp, depth)

    def polygon(self, pts: list[tuple[float, float]], amp: float, depth: float, edge: float) -> None:
        """Flat convex plate (scapular blade, iliac wing) with a soft edge ``edge`` pixels wide."""
        ys, xs = [q[0] for q in pts], [q[1] for q in pts]
        win = self.window(min(ys), max(ys), min(xs), max(xs))
        if win is None:
            return
        sl, yy, xx = win
        # Signed area gives the winding, so every edge's inward normal is consistent.
        area = sum(a[1] * b[0] - b[1] * a[0] for a, b in zip(pts, [*pts[1:], pts[0]], strict=True))
        orient = 1.0 if area > 0 else -1.0
        inside = None
        for (ay, ax), (by, bx) in zip(pts, [*pts[1:], pts[0]], strict=True):
            ey, ex = by - ay, bx - ax
            norm = math.hypot(ey, ex) or 1.0
            dist = ((yy - ay) * ex - (xx - ax) * ey) * np.float32(orient / norm)
            inside = dist if inside is None else np.minimum(inside, dist)
        self.deposit(sl, np.clip(inside / max(edge, 0.5), 0.0, 1.0), amp, depth)

    def ellipse(self, c: tuple[float, float], ry: float, rx: float, amp: float, depth: float,
                angle: float = 0.0, shell: float = 0.0, power: float = 0.5, soft: bool = False) -> None:
        """Projected ellipsoid centred at ``c`` with semi-axes ``ry``/``rx`` pixels.

        Args:
            angle: Rotation in radians (positive turns the ``rx`` axis towards increasing rows).
            shell: If > 0, render a hollow shell of that relative thickness (a bright rim, as for
                the calvarium) instead of a solid body.
            power: Exponent applied to (1 - q^2); 0.5 is a solid ellipsoid, smaller is flatter.
        """
        cy, cx = c
        ry, rx = max(ry, 0.6), max(rx, 0.6)
        rad = max(ry, rx)
        win = self.window(cy - rad, cy + rad, cx - rad, cx + rad)
        if win is None:
            return
        sl, yy, xx = win
        py, px = yy - cy, xx - cx
        if angle:
            ca, sa = math.cos(angle), math.sin(angle)
            py, px = py * ca - px * sa, py * sa + px * ca
        q2 = (py / ry) ** 2 + (px / rx) ** 2
        if shell > 0.0:
            inner = (1.0 - shell) ** 2
            val = np.sqrt(np.clip(1.0 - q2, 0.0, None)) - np.sqrt(np.clip(inner - q2, 0.0, None))
        elif power == 0.5:
            val = np.sqrt(np.clip(1.0 - q2, 0.0, None))
        else:
            val = np.clip(1.0 - q2, 0.0, None) ** power
        if soft:
            self.deposit_soft(sl, val, amp)
        else:
            self.deposit(sl, val, amp, depth)

    def gauss(self, c: tuple[float, float], sigma: float, amp: float, depth: float) -> None:
        cy, cx = c
        sigma = max(sigma, 0.5)
        rad = 3.0 * sigma
        win = self.window(cy - rad, cy + rad, cx - rad, cx + rad)
        if win is None:
            return
        sl, yy, xx = win
        val = np.exp(((yy - cy) ** 2 + (xx - cx) ** 2) * np.float32(-0.5 / sigma**2))
        self.deposit(sl, val, amp, depth)

    def views(self, alpha: float, texture: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Anterior and (not yet mirrored) posterior images, both in anterior coordinates.

        ``texture`` (same shape, ~1) modulates bone uptake so that no two vertebrae or ribs are
        identical, which is a large part of what makes real scans look real.
        """
        if texture is not None:
            self.front *= texture
            self.back *= texture
        a = np.float32(1.0 - alpha)
        ant = self.front + a * self.back
        ant += self.soft
        post = a * self.front
        post += self.back
        post += self.soft
        return ant, post


# --------------------------------------------------------------------------------------------
# Anatomy
# --------------------------------------------------------------------------------------------


def _draw_spine(cv: _Canvas, b: _Body) -> None:
    """Segmented cervical-thoracic-lumbar column: bright bodies, dim discs, posterior pedicles."""
    bounds = b.vert_bounds
    r_lo, r_hi = b.r0 + bounds[0] * b.s - 2, b.r0 + bounds[-1] * b.s + 2
    hw_max = 0.024 * b.sx + 2
    c_mid = b.c0 + b.scol_amp * 1.5 * b.sx
    win = cv.window(r_lo, r_hi, c_mid - hw_max - abs(b.scol_amp * 3 * b.sx), c_mid + hw_max + abs(b.scol_amp * 3 * b.sx))
    if win is None:
        return
    sl, yy, xx = win
    u = (yy[:, 0] - b.r0) / b.s
    idx = np.interp(u, bounds, np.arange(25.0))
    level = np.minimum(idx, 23.999)
    frac = level - np.floor(level)
    heights_px = np.diff(bounds)[np.floor(level).astype(int)] * b.s
    # Distance to the nearest disc in pixels; discs show as dim gaps ~20% of a body's height.
    disc = np.minimum(frac, 1.0 - frac) * heights_px
    disc_sigma = np.maximum(0.09 * heights_px, 0.6)
    along = 1.0 - 0.6 * np.exp(-0.5 * (disc / disc_sigma) ** 2)
    inside = (u >= bounds[0]) & (u <= bounds[-1])
    amp = np.interp(level, *_VERT_AMP_KNOTS) * along * inside
    hw = np.interp(level, *_VERT_HW_KNOTS) * b.sx
    centre = b.c0 + b.spine_v(u) * b.sx
    dx = (xx - centre[:, None]) / hw[:, None]
    dx2 = dx * dx
    body = np.sqrt(np.clip(1.0 - dx2 * dx2, 0.0, None))  # flat-topped: a vertebral body is box-like
    cv.deposit(sl, body * amp[:, None].astype(np.float32), 1.0, 0.7)
    # Pedicles/facets: paired posterior dots in the upper half of each body, the "ladder" that
    # makes the posterior lumbar spine look segmented.
    ped_r = np.abs(np.abs(dx) - 0.72) * hw[:, None]
    ped_u = (frac - 0.38) * heights_px
    ped_sigma = np.maximum(0.16 * hw, 0.6)[:, None]
    ped = np.exp(-0.5 * (ped_r**2 + (ped_u**2)[:, None]) / ped_sigma**2) * (inside * np.interp(level, *_VERT_AMP_KNOTS))[:, None]
    cv.deposit(sl, ped.astype(np.float32), 0.35, 1.0)


def _draw_ribs(cv: _Canvas, b: _Body) -> None:
    """All 24 ribs: 12 posterior arcs and 10 anterior arcs per side (ribs 11-12 float).

    Each rib's centre line is a closed-form function of the lateral distance from the spinal axis
    (``_Body.posterior_rib_u`` / ``anterior_rib_u``), evaluated once per column; the rib is then a
    Gaussian ridge around it in a thin band of rows, widened vertically where the rib slopes so
    that its true thickness stays constant.
    """
    sigma = max(0.0022 * b.s, 0.55)
    half = (float(b.rib_w.max()) + 0.012) * b.sx + 6
    c_lo, c_hi = max(int(b.c0 - half), 0), min(int(b.c0 + half) + 1, cv.w)
    cols = cv._cols[c_lo:c_hi]
    v = (cols - b.c0) / b.sx
    for k in range(1, 13):
        i = k - 1
        x = np.abs(v - float(b.spine_v(b.rib_u[i])))
        # Posterior arc (depth 0.95): fades in beside the transverse process and out at the lateral
        # end; tangential projection makes the lateral curve brighter than the medial shaft.
        t = (x - b.rib_vs) / (b.rib_w[i] - b.rib_vs)
        weight = np.clip(t / 0.12 + 0.3, 0.0, 1.0) * np.clip((1.06 - t) / 0.08, 0.0, 1.0)
        weight *= (0.75 + 0.55 * np.clip(t, 0.0, 1.0) ** 4) * (0.75 if k >= 11 else 1.0)
        _rib_ridge(cv, b, cols, b.r0 + b.posterior_rib_u(k, x) * b.s, weight, sigma, 0.46, 0.95)
        if k <= 10:
            # Anterior arc (depth 0.08): infero-medially from the lateral end to the costochondral
            # junction, where the cartilage (no uptake) takes over.
            vend = _RIB_VEND[i] * b.chest
            ta = (x - vend) / max(float(b.rib_w[i]) - vend, 1e-3)
            weight = np.clip(ta / 0.15, 0.0, 1.0) * np.clip((1.03 - ta) / 0.06, 0.0, 1.0)
            weight *= 0.7 + 0.5 * np.clip(ta, 0.0, 1.0) ** 3
            _rib_ridge(cv, b, cols, b.r0 + b.anterior_rib_u(k, x) * b.s, weight, sigma * 1.1, 0.2, 0.08)


def _rib_ridge(cv: _Canvas, b: _Body, cols: np.ndarray, centre: np.ndarray, weight: np.ndarray, sigma: float,
               amp: float, depth: float) -> None:
    """Deposit a Gaussian ridge along ``centre`` (row per column of ``cols``) where ``weight`` > 0."""
    keep = np.flatnonzero(weight > 0)
    if keep.size == 0:
        return
    j0, j1 = keep[0], keep[-1] + 1
    centre, weight = centre[j0:j1], weight[j0:j1]
    sig = sigma * np.sqrt(1.0 + np.gradient(centre) ** 2) if centre.size > 1 else np.full(1, sigma)
    reach = 3.5 * float(sig.max())
    win = cv.window(float(centre.min()) - reach, float(centre.max()) + reach, cols[j0], cols[j1 - 1])
    if win is None:
        return
    sl, yy, _ = win  # ``cols`` are in-image pixel columns, so the window spans exactly cols[j0:j1]
    z = (yy - centre[None, :]) / sig[None, :]
    val = np.exp(-0.5 * z * z) * weight[None, :]
    cv.deposit(sl, val.astype(np.float32), amp, depth)


def _draw_pelvis(cv: _Canvas, b: _Body) -> None:
    """Sacrum, bright sacroiliac joints, iliac wings with crests, acetabula, pubis and ischia."""
    p, sm = b.pelvis, b.sm
    # Sacrum: an inverted triangle below L5, drawn row-wise like the spine.
    u_top, u_bot = b.vert_bounds[-1], b.vert_bounds[-1] + 0.066
    win = cv.window(b.r0 + u_top * b.s, b.r0 + u_bot * b.s, b.c0 - 0.04 * p * b.sx, b.c0 + 0.04 * p * b.sx)
    if win is not None:
        sl, yy, xx = win
        w = np.clip(((yy - b.r0) / b.s - u_top) / (u_bot - u_top), 0.0, 1.0)
        hw = (0.03 - 0.024 * w) * p * b.sx
        segs = 1.0 - 0.25 * np.exp(-0.5 * ((w * 5.0 - np.rint(w * 5.0)) / 0.12) ** 2)  # sacral segments
        q = (xx - b.c0) / hw
        val = np.sqrt(np.clip(1.0 - q * q, 0.0, None)) * segs * (1.0 - 0.45 * w)
        cv.deposit(sl, val.astype(np.float32), 0.7, 0.85)
    for side in (-1, 1):
        def rc(u: float, v: float, side: int = side) -> tuple[float, float]:
            return b.rc(u, side * v * p)

        # Sacroiliac joints: the hottest normal bone on a posterior scan.
        cv.capsule(rc(u_top + 0.004, 0.03), rc(u_top + 0.04, 0.021), 0.0055 * sm, 0.0045 * sm, 0.6, 0.8)
        # Iliac wing: a thin fan-shaped plate of modest uptake, brighter along the crest.
        wing = [rc(0.43, 0.029), rc(0.412, 0.05), rc(0.408, 0.072), rc(0.416, 0.094), rc(0.437, 0.106),
                rc(0.47, 0.083), rc(0.476, 0.05)]
        cv.polygon(wing, 0.26, 0.6, edge=0.008 * sm)
        crest = [rc(0.432, 0.03), rc(0.413, 0.05), rc(0.409, 0.072), rc(0.417, 0.093), rc(0.437, 0.105), rc(0.452, 0.1)]
        cv.polyline(crest, 0.0055 * sm, 0.24, 0.55)
        # Acetabular roof over the femoral head.
        cv.polyline([rc(0.487, 0.037), rc(0.472, 0.05), rc(0.474, 0.068), rc(0.49, 0.078)], 0.006 * sm, 0.3, 0.5)
        cv.ellipse(rc(0.484, 0.056), 0.013 * b.s, 0.017 * b.sx, 0.36, 0.5)
        # Obturator ring: superior pubic ramus, symphysis, inferior ramus, ischium.
        ring = [rc(0.511 + 0.015 * math.sin(t) - 0.004 * math.cos(t), 0.031 + 0.021 * math.cos(t))
                for t in np.linspace(0, 2 * np.pi, 16)[:-1]]
        cv.polyline(ring, 0.005 * sm, 0.2, 0.3, closed=True)
        cv.gauss(rc(0.526, 0.05), 0.007 * sm, 0.14, 0.5)  # ischial tuberosity
    cv.gauss(b.rc(0.507, 0.0), 0.007 * sm, 0.22, 0.05)  # pubic symphysis


def _draw_skull_and_girdle(cv: _Canvas, b: _Body) -> None:
    """Skull, face, mandible, sternum, clavicles, scapulae, humeral heads."""
    sm, sh = b.sm, b.shoulder
    # Calvarium: an ellipsoidal shell projects as a bright rim around a moderately hot vault.
    head = b.rc(0.057, 0.0)
    cv.gain = b.skull_gain
    cv.ellipse(head, 0.053 * b.s, 0.049 * b.sx, 0.6, 0.5, shell=0.2)
    cv.ellipse(head, 0.05 * b.s, 0.046 * b.sx, 0.2, 0.5)
    cv.ellipse(b.rc(0.09, 0.0), 0.02 * b.s, 0.034 * b.sx, 0.2, 0.08, power=0.4)  # maxilla / orbits
    cv.gauss(b.rc(0.092, 0.0), 0.008 * sm, 0.1, 0.05)  # nasal / maxillary sinus region
    cv.gauss(b.rc(0.078, 0.0), 0.012 * sm, 0.16, 1.0)  # occiput / skull base
    for side in (-1, 1):
        cv.gauss(b.rc(0.082, side * 0.033), 0.006 * sm, 0.18, 0.6)  # petrous bones
        # Mandible: ramus and body meeting at the chin.
        jaw = [b.rc(0.078, side * 0.041), b.rc(0.108, side * 0.038), b.rc(0.122, side * 0.02), b.rc(0.128, 0.0)]
        cv.polyline(jaw, 0.0045 * sm, 0.34, 0.25)
    cv.gain = 1.0
    for side in (-1, 1):
        def rc(u: float, v: float, side: int = side) -> tuple[float, float]:
            return b.rc(u, side * v)

        # Clavicle: gentle S from the sternal notch to the acromion.
        cl = [rc(0.19, 0.016), rc(0.186, 0.045), rc(0.181, 0.08 * sh), rc(0.178, 0.104 * sh)]
        cv.polyline(cl, 0.0055 * sm, 0.36, 0.2)
        cv.gauss(rc(0.19, 0.016), 0.006 * sm, 0.18, 0.05)  # sternoclavicular joint
        cv.gauss(rc(0.18, 0.106 * sh), 0.006 * sm, 0.3, 0.4)  # acromioclavicular joint
        # Scapula (posterior): thin blade, brighter spine, lateral border and inferior angle.
        sup, glen, inf = rc(0.196, 0.052 * sh), rc(0.207, 0.097 * sh), rc(0.292, 0.068 * sh)
        cv.polygon([sup, glen, inf], 0.13, 0.95, edge=0.01 * sm)
        cv.capsule(rc(0.215, 0.05 * sh), rc(0.188, 0.104 * sh), 0.0045 * sm, 0.005 * sm, 0.26, 0.95)
        cv.capsule(glen, inf, 0.005 * sm, 0.004 * sm, 0.2, 0.95)
        cv.capsule(sup, inf, 0.003 * sm, 0.003 * sm, 0.1, 0.95)
        cv.gauss(inf, 0.006 * sm, 0.18, 0.95)
        cv.ellipse(glen, 0.014 * b.s, 0.008 * b.sx, 0.28, 0.6)
        # Humeral head: the bright round shoulder of a bone scan.
        arm = b.arms[0] if side < 0 else b.arms[1]
        cv.ellipse(b.rc(arm.shoulder[0] - 0.006, arm.shoulder[1] - side * 0.002), 0.017 * b.s, 0.018 * b.sx, 0.45, 0.5)
    # Sternum: manubrium, body, xiphoid; the most anterior bone in the chest.
    cv.ellipse(b.rc(0.203, 0.0), 0.013 * b.s, 0.019 * b.sx, 0.3, 0.02, power=0.3)
    cv.capsule(b.rc(0.218, 0.0), b.rc(0.285, 0.0), 0.0085 * sm, 0.007 * sm, 0.36, 0.02)
    cv.gauss(b.rc(0.292, 0.0), 0.004 * sm, 0.15, 0.02)


def _draw_limbs(cv: _Canvas, b: _Body) -> None:
    """Humeri, forearms, hands, femora, knees, tibiae/fibulae, ankles and feet (bone only)."""
    sm, p = b.sm, b.pelvis
    for arm in b.arms:
        side = arm.side
        sh, el, wr = b.rc(*arm.shoulder), b.rc(*arm.elbow), b.rc(*arm.wrist)
        cv.capsule(sh, el, 0.0095 * sm, 0.0085 * sm, 0.26, 0.5)
        cv.ellipse(el, 0.012 * b.s, 0.02 * b.sx, 0.38, 0.5)
        # Radius and ulna: two thin parallel bones.
        dy, dx = wr[0] - el[0], wr[1] - el[1]
        n = math.hypot(dy, dx) or 1.0
        oy, ox = -dx / n * 0.0055 * sm, dy / n * 0.0055 * sm
        for sgn in (-1, 1):
            cv.capsule((el[0] + sgn * oy, el[1] + sgn * ox), (wr[0] + sgn * oy, wr[1] + sgn * ox),
                       0.0048 * sm, 0.0042 * sm, 0.2, arm.forearm_depth)
        # Hand: bright carpus, then metacarpals and fingers that blur into a faint paddle at this
        # resolution (drawing separate phalanges looks like a rake), thumb on the lateral side.
        uy, ux = dy / n, dx / n
        along = math.atan2(-ux, uy)
        carp = (wr[0] + uy * 0.012 * b.s, wr[1] + ux * 0.012 * b.s)
        cv.ellipse(carp, 0.011 * sm, 0.012 * sm, 0.4, arm.forearm_depth)
        for j in range(4):
            off = (j - 1.5) * 0.0065 * sm / (0.0055 * sm)
            base = (carp[0] + uy * 0.012 * b.s + oy * off, carp[1] + ux * 0.012 * b.s + ox * off)
            cv.capsule(base, (base[0] + uy * 0.04 * b.s, base[1] + ux * 0.04 * b.s), 0.003 * sm, 0.0025 * sm, 0.09,
                       arm.forearm_depth)
        palm = (carp[0] + uy * 0.035 * b.s, carp[1] + ux * 0.035 * b.s)
        cv.ellipse(palm, 0.028 * b.s, 0.014 * sm, 0.08, arm.forearm_depth, angle=along, power=0.35)
        fingers = (carp[0] + uy * 0.078 * b.s, carp[1] + ux * 0.078 * b.s)
        cv.ellipse(fingers, 0.024 * b.s, 0.012 * sm, 0.05, arm.forearm_depth, angle=along, power=0.35)
        thumb_dir = (uy * 0.8 - ux * 0.6 * side, ux * 0.8 + uy * 0.6 * side)
        cv.capsule(carp, (carp[0] + thumb_dir[0] * 0.035 * b.s, carp[1] + thumb_dir[1] * 0.035 * b.s), 0.003 * sm,
                   0.0025 * sm, 0.08, arm.forearm_depth)

    for side in (-1, 1):
        def rc(u: float, v: float, side: int = side) -> tuple[float, float]:
            return b.rc(u, side * v)

        kv, av = b.knee_v, b.ankle_v
        # Proximal femur: neck, greater/lesser trochanters, shaft converging on the knee.
        cv.capsule(rc(0.486, 0.058 * p), rc(0.498, 0.082 * p), 0.0085 * sm, 0.009 * sm, 0.3, 0.5)
        cv.ellipse(rc(0.498, 0.09 * p), 0.013 * b.s, 0.014 * b.sx, 0.4, 0.5)
        cv.gauss(rc(0.52, 0.073 * p), 0.005 * sm, 0.18, 0.6)
        cv.capsule(rc(0.506, 0.086 * p), rc(0.7, kv + 0.004), 0.0115 * sm, 0.0105 * sm, 0.23, 0.5)
        # Knee: condyles, tibial plateau (metaphyses are hotter than shafts), patella anteriorly.
        cv.ellipse(rc(0.704, kv + 0.002), 0.013 * b.s, 0.024 * b.sx, 0.33, 0.5, power=0.35)
        cv.ellipse(rc(0.727, kv), 0.01 * b.s, 0.023 * b.sx, 0.3, 0.5, power=0.35)
        cv.ellipse(rc(0.702, kv + 0.002), 0.01 * b.s, 0.012 * b.sx, 0.2, 0.0)
        # Tibia and fibula.
        cv.capsule(rc(0.735, kv), rc(0.948, av), 0.011 * sm, 0.008 * sm, 0.24, 0.35)
        cv.capsule(rc(0.737, kv + 0.021), rc(0.952, av + 0.016), 0.0045 * sm, 0.004 * sm, 0.14, 0.6)
        # Ankle (malleoli, talus), calcaneus, and the foot seen end-on, turned slightly outwards.
        cv.ellipse(rc(0.956, av + 0.002), 0.011 * b.s, 0.02 * b.sx, 0.5, 0.5, power=0.4)
        cv.ellipse(rc(0.975, av + 0.012), 0.018 * b.s, 0.017 * b.sx, 0.38, 0.3, angle=-side * 0.35)
        cv.gauss(rc(0.986, av), 0.009 * sm, 0.42, 0.9)


def _draw_soft_tissue(cv: _Canvas, b: _Body, level: float) -> None:
    """Low, smooth background uptake inside the body silhouette (max-combined)."""
    # Trunk: row-wise half-width profile, chord-length (projected thickness) across.
    hw_u = _TRUNK_HW.copy()
    hw_u[2:5] *= b.shoulder
    hw_u[8:12] *= b.pelvis
    r_lo, r_hi = b.r0 + _TRUNK_U[0] * b.s, b.r0 + _TRUNK_U[-1] * b.s
    half = hw_u.max() * b.sx + 2
    win = cv.window(r_lo, r_hi, b.c0 - half, b.c0 + half)
    if win is not None:
        sl, yy, xx = win
        u = (yy[:, 0] - b.r0) / b.s
        hw = np.interp(u, _TRUNK_U, hw_u, left=1e-3, right=1e-3) * b.sx
        q = (xx - b.c0) / hw[:, None]
        cv.deposit_soft(sl, np.sqrt(np.clip(1.0 - q * q, 0.0, None)), level)
    cv.ellipse(b.rc(0.06, 0.0), 0.062 * b.s, 0.053 * b.sx, 0.7 * level, 0.5, soft=True)
    cv.capsule(b.rc(0.11, 0.0), b.rc(0.175, 0.0), 0.036 * b.sx, 0.042 * b.sx, 0.6 * level, 0.5, soft=True)
    for arm in b.arms:
        sh, el, wr = b.rc(*arm.shoulder), b.rc(*arm.elbow), b.rc(*arm.wrist)
        cv.capsule(sh, el, 0.03 * b.sx, 0.025 * b.sx, 0.55 * level, 0.5, soft=True)
        cv.capsule(el, wr, 0.025 * b.sx, 0.018 * b.sx, 0.45 * level, 0.5, soft=True)
        dy, dx = wr[0] - el[0], wr[1] - el[1]
        n = math.hypot(dy, dx) or 1.0
        tip = (wr[0] + dy / n * 0.09 * b.s, wr[1] + dx / n * 0.09 * b.s)
        cv.capsule(wr, tip, 0.02 * b.sx, 0.016 * b.sx, 0.35 * level, 0.5, soft=True)
    for side in (-1, 1):
        def rc(u: float, v: float, side: int = side) -> tuple[float, float]:
            return b.rc(u, side * v)

        kv, av = b.knee_v, b.ankle_v
        cv.capsule(rc(0.505, 0.062 * b.pelvis), rc(0.712, kv), 0.062 * b.sx, 0.04 * b.sx, 0.8 * level, 0.5, soft=True)
        cv.capsule(rc(0.712, kv), rc(0.8, kv - 0.002), 0.04 * b.sx, 0.042 * b.sx, 0.6 * level, 0.5, soft=True)
        cv.capsule(rc(0.8, kv - 0.002), rc(0.955, av), 0.042 * b.sx, 0.024 * b.sx, 0.55 * level, 0.5, soft=True)
        cv.ellipse(rc(0.975, av + 0.01), 0.026 * b.s, 0.028 * b.sx, 0.4 * level, 0.5, soft=True)


def _draw_organs(cv: _Canvas, b: _Body, kidney: float, bladder: float, bladder_size: float) -> tuple[float, float, float, float]:
    """Kidneys (faint, posterior) and bladder (bright, anterior-ish); returns the bladder ellipse."""
    for side in (-1, 1):
        # Right kidney (side -1) sits lower than the left; upper poles tilt medially.
        u = 0.36 + (0.01 if side < 0 else 0.0)
        c = b.rc(u, side * 0.05 + float(b.spine_v(u)))
        cv.ellipse(c, 0.031 * b.s, 0.018 * b.sx, kidney, 0.95, angle=-side * 0.25, power=0.6)
        cv.gauss((c[0], c[1] - side * 0.006 * b.sx), 0.006 * b.sm, 0.6 * kidney, 0.95)  # renal pelvis
    cy, cx = b.rc(0.483, 0.0)
    ry, rx = 0.018 * bladder_size * b.s, 0.027 * bladder_size * b.sx
    cv.ellipse((cy, cx), ry, rx, bladder, 0.25, power=0.3)
    return cy, cx, ry, rx


# --------------------------------------------------------------------------------------------
# Blur and counts
# --------------------------------------------------------------------------------------------


def _texture(rng: np.random.Generator, height: int, width: int, cell: int, amp: float) -> np.ndarray:
    """Smooth multiplicative field ~1 +/- ``amp`` varying over ``cell`` pixels, (height, width) float32.

    Bilinear upsampling of a coarse Gaussian grid by gathers (no BLAS: its worker threads would
    busy-spin and break the one-core budget).
    """
    gh, gw = height // cell + 2, width // cell + 2
    grid = rng.normal(0.0, amp, (gh, gw)).astype(np.float32)
    pos_r = np.arange(height, dtype=np.float32) / cell
    i = pos_r.astype(np.intp)
    fr = (pos_r - i)[:, None]
    rows = grid[i] * (1.0 - fr) + grid[i + 1] * fr  # (height, gw)
    pos_c = np.arange(width, dtype=np.float32) / cell
    j = pos_c.astype(np.intp)
    fc = pos_c - j
    field = rows[:, j] * (1.0 - fc) + rows[:, j + 1] * fc
    field += 1.0
    return np.maximum(field, 0.5, out=field)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (zero padding) of a (..., H, W) float32 stack: gamma-camera resolution."""
    rad = max(1, int(math.ceil(2.5 * sigma)))
    k = np.exp(-0.5 * (np.arange(rad + 1) / sigma) ** 2)
    k = (k / (k[0] + 2.0 * k[1:].sum())).astype(np.float32)
    out = img
    for axis in (-2, -1):
        n = out.shape[axis]
        pad = [(0, 0)] * out.ndim
        pad[axis] = (rad, rad)
        p = np.pad(out, pad)
        take = [slice(None)] * out.ndim
        res = out * k[0]
        for i in range(1, rad + 1):
            take[axis] = slice(rad - i, rad - i + n)
            lo = p[tuple(take)]
            take[axis] = slice(rad + i, rad + i + n)
            res += k[i] * (lo + p[tuple(take)])
        out = res
    return out


_SMALL_LAM = 16.0  # below this the table sampler is exact; above, a skew-corrected normal
_LAM_STEPS = 32  # table rows per count (lambda quantised to 1/32)
_U_STEPS = 4096  # quantile resolution of the table


@functools.lru_cache(maxsize=1)
def _poisson_table() -> np.ndarray:
    """Poisson quantile table T[lambda * 32, u * 4096] for lambda < 16 (built once, ~4 MB)."""
    lams = np.arange(int(_SMALL_LAM * _LAM_STEPS) + 2) / _LAM_STEPS
    k = np.arange(64)
    log_fact = np.concatenate([[0.0], np.cumsum(np.log(k[1:]))])
    with np.errstate(divide="ignore", invalid="ignore"):
        logpmf = k[None, :] * np.log(lams)[:, None] - lams[:, None] - log_fact[None, :]
    pmf = np.nan_to_num(np.exp(logpmf))
    pmf[0] = 0.0
    pmf[0, 0] = 1.0
    cdf = np.cumsum(pmf, axis=1)
    u = (np.arange(_U_STEPS) + 0.5) / _U_STEPS
    table = np.empty((lams.size, _U_STEPS), np.int16)
    for i in range(lams.size):
        table[i] = np.minimum(np.searchsorted(cdf[i], u, side="right"), k[-1])
    return table.ravel()


def _poisson(rng: np.random.Generator, lam: np.ndarray) -> np.ndarray:
    """Poisson counts for a float32 array of means, ~3x faster than ``Generator.poisson``.

    Means below 16 use an exact inverse-CDF table (lambda quantised to 1/32, u to 1/4096); larger
    means use a normal draw with a Cornish-Fisher skew term, indistinguishable at these counts.
    """
    out = np.empty(lam.shape, np.float32)
    small = lam < _SMALL_LAM
    ls = lam[small]
    idx = (ls * _LAM_STEPS + 0.5).astype(np.intp) * _U_STEPS
    idx += (rng.random(ls.size, dtype=np.float32) * _U_STEPS).astype(np.intp)
    out[small] = _poisson_table()[idx]
    big = ~small
    lb = lam[big]
    z = rng.standard_normal(lb.size, dtype=np.float32)
    out[big] = np.floor(lb + np.sqrt(lb) * z + (z * z - 1.0) * np.float32(1.0 / 6.0) + 0.5)
    return out


# --------------------------------------------------------------------------------------------
# Foci: metastases and look-alikes
# --------------------------------------------------------------------------------------------


@dataclass
class _Focus:
    kind: str
    row: float  # anterior coordinates
    col: float
    radius: float  # reported radius (pixels)
    blobs: list[tuple[float, float, float, float, float]]  # (drow, dcol, sigma_r, sigma_c, rel. amp)
    peak_a: float  # post-blur peak added in the anterior view (counts)
    peak_p: float


def _local_max(img: np.ndarray, row: float, col: float, rad: float) -> float:
    """Max of ``img`` within ``rad`` pixels of (row, col)."""
    h, w = img.shape
    r, c = int(round(row)), int(round(col))
    k = max(1, int(math.ceil(rad)))
    patch = img[max(r - k, 0):min(r + k + 1, h), max(c - k, 0):min(c + k + 1, w)]
    return float(patch.max()) if patch.size else 0.0


def _stamp(img: np.ndarray, focus: _Focus, peak: float, blur_sigma: float) -> None:
    """Add a focus to an already-blurred image as analytically blurred Gaussians."""
    h, w = img.shape
    for dr, dc, sr, sc, rel in focus.blobs:
        er, ec = math.hypot(sr, blur_sigma), math.hypot(sc, blur_sigma)
        cr, cc = focus.row + dr, focus.col + dc
        r0, r1 = max(int(cr - 3.5 * er), 0), min(int(cr + 3.5 * er) + 2, h)
        c0, c1 = max(int(cc - 3.5 * ec), 0), min(int(cc + 3.5 * ec) + 2, w)
        if r0 >= r1 or c0 >= c1:
            continue
        gr = np.exp(-0.5 * ((np.arange(r0, r1, dtype=np.float32) - cr) / er) ** 2)
        gc = np.exp(-0.5 * ((np.arange(c0, c1, dtype=np.float32) - cc) / ec) ** 2)
        img[r0:r1, c0:c1] += np.float32(peak * rel) * np.outer(gr, gc)


def _lesion_site(rng: np.random.Generator, b: _Body, primary: str) -> tuple[float, float, float]:
    """Random metastatic site as (u, v, depth); ~80% axial skeleton, the rest proximal long bones."""
    if rng.random() < 0.8:
        weights = {"spine": 0.38, "rib": 0.25, "pelvis": 0.2, "skull": 0.09, "sternum": 0.08}
        if primary == "prostate":
            weights.update(pelvis=0.34, spine=0.4, rib=0.16, skull=0.05, sternum=0.05)
        elif primary == "breast":
            weights.update(rib=0.3, sternum=0.1, skull=0.1, spine=0.32, pelvis=0.18)
        names = list(weights)
        prob = np.array([weights[n] for n in names])
        where = names[rng.choice(len(names), p=prob / prob.sum())]
    else:
        where = "humerus" if rng.random() < 0.4 else "femur"
    side = -1 if rng.random() < 0.5 else 1
    if where == "spine":
        lvl = rng.choice(24, p=_SPINE_LESION_P)
        u = float(b.vert_centres[lvl] + rng.uniform(-0.3, 0.3) * (b.vert_bounds[lvl + 1] - b.vert_bounds[lvl]))
        hw = float(np.interp(lvl, *_VERT_HW_KNOTS))
        return u, float(b.spine_v(u)) + rng.uniform(-0.6, 0.6) * hw, rng.uniform(0.55, 0.95)
    if where == "rib":
        k = int(rng.integers(2, 12))
        wk = float(b.rib_w[k - 1])
        if rng.random() < 0.6 or k >= 11:  # posterior arc
            x = rng.uniform(b.rib_vs + 0.008, wk * (0.8 if k >= 11 else 0.95))
            u = float(b.posterior_rib_u(k, x))
            return u, float(b.spine_v(u)) + side * x, 0.88  # ribs are drawn relative to the spinal axis
        k = min(k, 8)  # the ossified anterior arcs of ribs 9-10 are too short to host a lesion
        wk, vend = float(b.rib_w[k - 1]), _RIB_VEND[k - 1] * b.chest
        x = vend + rng.uniform(0.3, 0.85) * (wk - vend)
        u = float(b.anterior_rib_u(k, x))
        return u, float(b.spine_v(u)) + side * x, 0.12
    if where == "pelvis":
        sub = rng.choice(4, p=[0.45, 0.25, 0.15, 0.15])
        if sub == 0:  # iliac wing
            a = rng.uniform(0, 2 * np.pi)
            rr = math.sqrt(rng.uniform(0.0, 0.7))
            return 0.44 + 0.022 * rr * math.sin(a), side * (0.07 + 0.03 * rr * math.cos(a)) * b.pelvis, 0.6
        if sub == 1:  # sacrum
            u = b.vert_bounds[-1] + rng.uniform(0.005, 0.04)
            return float(u), rng.uniform(-0.015, 0.015) * b.pelvis, 0.85
        if sub == 2:  # acetabulum
            return rng.uniform(0.472, 0.49), side * rng.uniform(0.05, 0.07) * b.pelvis, 0.5
        return rng.uniform(0.515, 0.528), side * rng.uniform(0.03, 0.05) * b.pelvis, 0.35  # ischium
    if where == "skull":
        a = rng.uniform(0, 2 * np.pi)
        rr = rng.uniform(0.3, 0.92)
        return 0.057 + 0.053 * rr * math.sin(a), 0.047 * rr * math.cos(a), rng.uniform(0.2, 0.8)
    if where == "sternum":
        return rng.uniform(0.2, 0.28), 0.0, 0.03
    if where == "humerus":
        arm = b.arms[0] if side < 0 else b.arms[1]
        t = rng.uniform(0.0, 0.45)
        return (arm.shoulder[0] + t * (arm.elbow[0] - arm.shoulder[0]), arm.shoulder[1] + t * (arm.elbow[1] - arm.shoulder[1]),
                0.5)
    t = rng.uniform(0.0, 0.4)  # femur: neck/trochanter region to proximal shaft
    if t < 0.1:
        return 0.492, side * 0.072 * b.pelvis, 0.5
    return 0.506 + t * (0.7 - 0.506), side * (0.086 * b.pelvis + t * (b.knee_v - 0.086 * b.pelvis)), 0.5


_SPINE_LESION_P = np.array([0.4] * 7 + [1.0] * 12 + [1.3] * 5)
_SPINE_LESION_P = _SPINE_LESION_P / _SPINE_LESION_P.sum()


def _view_ratios(rng: np.random.Generator, depth: float, low: float, high: float) -> tuple[float, float]:
    """Contrast ratios (anterior, posterior) over local bone: the nearer view sees the higher one."""
    near = rng.uniform(low, high)
    far = 1.0 + (near - 1.0) * rng.uniform(0.5, 0.85)
    closeness_to_back = depth + rng.uniform(-0.15, 0.15)
    return (far, near) if closeness_to_back > 0.5 else (near, far)


def _make_lookalikes(rng: np.random.Generator, b: _Body, age: int, pxs: float) -> list[tuple[str, list]]:
    """Benign foci that mimic metastases, as (kind, [(u, v, depth, radius_px, ratio_a, ratio_p, blobs)])."""
    kinds = ["degenerative", "rib_fracture", "injection_site", "urine_contamination"]
    p = np.array([0.25 + 0.4 * (age - 35) / 50, 0.2, 0.25, 0.15])
    n_types = 1 if rng.random() < 0.7 else 2
    chosen = rng.choice(len(kinds), size=n_types, replace=False, p=p / p.sum())
    out = []
    for ci in chosen:
        kind = kinds[ci]
        foci = []
        if kind == "degenerative":
            joint = rng.choice(3, p=[0.4, 0.35, 0.25])
            facet_level = 22 + int(rng.integers(0, 2))  # L4-L5 or L5-S1
            weak = rng.uniform(0.4, 1.0)  # symmetric-ish: one side weaker
            strong_side = -1 if rng.random() < 0.5 else 1
            for side in (-1, 1):
                scale = 1.0 if side == strong_side else weak
                r = rng.uniform(3.0, 6.5) * pxs
                if joint == 0:  # medial compartment of the knee
                    u, v, d = 0.716, side * (b.knee_v - 0.008), 0.5
                elif joint == 1:  # glenohumeral / acromioclavicular
                    arm = b.arms[0] if side < 0 else b.arms[1]
                    u, v, d = arm.shoulder[0] - 0.012, arm.shoulder[1] - side * 0.004, 0.5
                else:  # L4-L5 / L5-S1 facet joints, posterior
                    u = float(b.vert_bounds[facet_level])
                    v, d = float(b.spine_v(u)) + side * 0.014, 0.9
                ra, rp = _view_ratios(rng, d, 1.4, 1.4 + 0.9 * scale)
                foci.append((u, v, d, r, ra, rp, None))
        elif kind == "rib_fracture":
            n = int(rng.integers(2, 5))
            k0 = int(rng.integers(4, 11 - n + 1))
            side = -1 if rng.random() < 0.5 else 1
            posterior = rng.random() < 0.5
            for k in range(k0, k0 + n):
                wk = float(b.rib_w[k - 1])
                x = wk * (rng.uniform(0.6, 0.7) if posterior else rng.uniform(0.93, 0.98))
                u = float(b.posterior_rib_u(k, x))
                d = 0.85 if posterior else 0.5
                ra, rp = _view_ratios(rng, d, 1.6, 3.0)
                foci.append((u, float(b.spine_v(u)) + side * x, d, rng.uniform(2.0, 3.5) * pxs, ra, rp, None))
        elif kind == "injection_site":
            arm = b.arms[0] if rng.random() < 0.5 else b.arms[1]
            if rng.random() < 0.6:  # antecubital fossa, just medial to the elbow
                u, v = arm.elbow[0] + 0.004, arm.elbow[1] - arm.side * 0.006
            else:  # dorsum of the wrist
                u, v = arm.wrist[0], arm.wrist[1] - arm.side * 0.004
            foci.append((u, v, 0.1, rng.uniform(2.0, 4.0) * pxs, -rng.uniform(3.0, 10.0), -rng.uniform(1.2, 4.0), None))
        else:  # urine contamination: irregular hot patch on skin/clothing, perineum or inner thigh
            if rng.random() < 0.5:
                u, v = rng.uniform(0.535, 0.59), rng.uniform(-0.012, 0.012)
            else:
                u, v = rng.uniform(0.54, 0.64), (-1 if rng.random() < 0.5 else 1) * rng.uniform(0.025, 0.045)
            blobs = []
            for _ in range(int(rng.integers(3, 7))):
                blobs.append((rng.normal(0, 6.0 * pxs), rng.normal(0, 3.0 * pxs), rng.uniform(1.5, 4.5) * pxs,
                              rng.uniform(1.0, 3.0) * pxs, rng.uniform(0.3, 1.0)))
            extent = max(math.hypot(br, bc) + max(sr, sc) for br, bc, sr, sc, _ in blobs)
            foci.append((u, v, 0.05, extent, -rng.uniform(1.0, 4.0), -rng.uniform(0.3, 1.5), blobs))
        out.append((kind, foci))
    return out


def _sample_primary(rng: np.random.Generator, sex: str) -> str:
    if sex == "F":
        prob = {"breast": 0.58, "prostate": 0.0, "lung": 0.14, "thyroid": 0.06, "kidney": 0.05, "other": 0.17}
    else:
        prob = {"breast": 0.01, "prostate": 0.55, "lung": 0.18, "thyroid": 0.03, "kidney": 0.07, "other": 0.16}
    p = np.array([prob[c] for c in PRIMARY_CANCERS])
    return PRIMARY_CANCERS[int(rng.choice(len(PRIMARY_CANCERS), p=p / p.sum()))]


def _check_size(height: int, width: int) -> None:
    if height < MIN_SIDE or width < MIN_SIDE:
        raise ValueError(f"phantom images must be at least {MIN_SIDE} px on each side, got height={height}, width={width}")


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def make_study(rng: np.random.Generator, metastatic: bool, height: int = 1024, width: int = 256,
               shift: ScannerShift | None = None) -> PhantomStudy:
    """Draw one synthetic whole-body bone scan.

    Args:
        rng: Source of all randomness; the study is a pure function of its state.
        metastatic: If True, place 1-10 metastases (~80% axial skeleton); otherwise none.
        height: Rows of each view (>= 64); anatomy scales with it.
        width: Columns of each view (>= 64).
        shift: Draw it as another scanner would (see :class:`ScannerShift`): the views are then
            ``shift.size(height, width)``; None (default) leaves every pixel as without it.

    Returns:
        A ``PhantomStudy`` whose ``anterior``/``posterior`` are ``(height, width)`` uint16 Poisson
        counts (at 1024x256: bone ~100-600, bladder often hotter, background ~0; smaller matrices
        scale counts per pixel with pixel area, at most 16x) and whose ``findings`` list every
        metastasis and benign look-alike once per view.

    Raises:
        ValueError: If a side is under 64 pixels.
    """
    height, width = int(height), int(width)
    if shift is not None:
        height, width = shift.size(height, width)
    _check_size(height, width)
    sex = "F" if rng.random() < 0.68 else "M"
    age = int(np.clip(np.rint(rng.normal(64.0, 11.0)), 35, 85))
    primary = _sample_primary(rng, sex)
    b = _sample_body(rng, height, width, sex)
    pxs = b.px

    cv = _Canvas(height, width)
    _draw_spine(cv, b)
    cv.gain = b.rib_gain
    _draw_ribs(cv, b)
    cv.gain = 1.0
    _draw_pelvis(cv, b)
    _draw_skull_and_girdle(cv, b)
    cv.gain = b.limb_gain
    _draw_limbs(cv, b)
    cv.gain = 1.0
    _draw_soft_tissue(cv, b, rng.uniform(0.03, 0.06))
    bladder = _draw_organs(cv, b, kidney=rng.uniform(0.1, 0.3), bladder=rng.uniform(0.9, 3.2),
                           bladder_size=rng.uniform(0.75, 1.3))

    # Counts per unit uptake (dose, uptake time, scan speed) for a 1024x256 matrix; a smaller matrix
    # has bigger pixels that collect proportionally more counts (it is the same scan rebinned),
    # capped so that hot bladders and injection sites stay inside uint16.
    counts = rng.uniform(160.0, 480.0) * min(1.0 / pxs**2, 16.0)
    if shift is not None:
        counts *= shift.count_scale  # no draw: the stream, and so the anatomy, stays the same
    ant, post = cv.views(b.alpha, _texture(rng, height, width, max(2, round(14 * pxs)), 0.12))
    blur_sigma = max(rng.uniform(1.5, 2.0) * pxs, 0.5)
    both = _blur(np.stack([ant, post]) * np.float32(counts), blur_sigma)
    base = (both[0].copy(), both[1].copy())  # reference for lesion contrast, before any foci

    # -- foci (anterior coordinates) ----------------------------------------------------------
    foci: list[_Focus] = []

    def too_close(kind: str, row: float, col: float, rad: float) -> bool:
        # Keep separate foci apart so each stays identifiable; the parts of one benign pattern
        # (bilateral facets, consecutive rib fractures) may sit close together.
        return any(math.hypot(row - f.row, col - f.col) < rad + f.radius + 4.0 * pxs
                   for f in foci if kind == "metastasis" or f.kind != kind)

    def add_focus(kind: str, u: float, v: float, radius: float, ra: float, rp: float, blobs: list | None) -> bool:
        row, col = b.rc(u, v)
        margin = radius + 2
        if not (margin <= row < height - margin and margin <= col < width - margin) or too_close(kind, row, col, radius):
            return False
        if blobs is None:
            sig = max(radius / 2.0, 0.5)
            blobs = [(0.0, 0.0, sig, sig, 1.0)]
        # Positive ratios are relative to local bone (max nearby, so the focus stands out even on a
        # thin rib next to the spine); negative ones are absolute multiples of the count scale.
        peaks = []
        for ratio, img in ((ra, base[0]), (rp, base[1])):
            if ratio > 0:
                # Floor at typical rib uptake: a lesion at the faint tip of a rib is still a bone lesion.
                local = max(_local_max(img, row, col, max(2.0, 0.6 * radius) + 1.0), 0.3 * counts)
                peaks.append((ratio - 1.0) * local)
            else:
                peaks.append(-ratio * counts)
        foci.append(_Focus(kind, row, col, radius, blobs, peaks[0], peaks[1]))
        return True

    has_lookalikes = rng.random() < (0.3 if metastatic else 0.5)
    if has_lookalikes:
        for kind, items in _make_lookalikes(rng, b, age, pxs):
            for u, v, _d, radius, ra, rp, blobs in items:
                add_focus(kind, u, v, radius, ra, rp, blobs)

    if metastatic:
        weights = np.exp(-0.25 * np.arange(10))
        n_target = 1 + int(rng.choice(10, p=weights / weights.sum()))
        by, bx, bry, brx = bladder
        placed = 0
        for _ in range(n_target * 30):
            if placed == n_target:
                break
            u, v, depth = _lesion_site(rng, b, primary)
            # 3-10 px at 1024x256; never below 1.5 px, or a lesion on a small matrix vanishes between ribs.
            radius = max(rng.uniform(3.0, 10.0) * pxs, 1.5)
            row, col = b.rc(u, v)
            # Keep metastases off the bladder: a hot bladder would hide them and break the contrast.
            if ((row - by) / (bry + radius + 3)) ** 2 + ((col - bx) / (brx + radius + 3)) ** 2 < 1.0:
                continue
            ra, rp = _view_ratios(rng, depth, 1.5, 4.0)
            placed += add_focus("metastasis", u, v, radius, ra, rp, None)
        if placed == 0:  # practically unreachable; guarantees the 1-lesion minimum
            row, col = b.rc(float(b.vert_centres[20]), 0.0)
            r = max(4.0 * pxs, 1.5)
            peaks = [1.0 * max(_local_max(img, row, col, 3.0), 0.3 * counts) for img in base]
            foci.append(_Focus("metastasis", row, col, r, [(0.0, 0.0, r / 2, r / 2, 1.0)], peaks[0], peaks[1]))

    for f in foci:
        _stamp(both[0], f, f.peak_a, blur_sigma)
        _stamp(both[1], f, f.peak_p, blur_sigma)

    both += np.float32(rng.uniform(0.1, 0.4))  # room background and scatter outside the body
    np.maximum(both, 0.0, out=both)
    # The sampler's draw count depends on the image content; a child generator keeps the parent
    # stream (and so every later study of a seeded cohort) independent of rendering details.
    noise_rng = np.random.default_rng(int(rng.integers(0, 2**63)))
    counts_img = np.clip(_poisson(noise_rng, both), 0, 65535).astype(np.uint16)
    if shift is not None:
        counts_img = shift.apply(noise_rng, counts_img)
    anterior = counts_img[0]
    posterior = np.ascontiguousarray(counts_img[1][:, ::-1])

    findings = []
    for f in foci:
        r, c = int(round(f.row)), int(round(f.col))
        rad = round(float(f.radius), 2)
        findings.append(Finding(f.kind, "anterior", r, c, rad))
        findings.append(Finding(f.kind, "posterior", r, width - 1 - c, rad))
    return PhantomStudy(anterior=anterior, posterior=posterior, metastatic=bool(metastatic), findings=tuple(findings),
                        sex=sex, age=age, primary_cancer=primary)


def make_studies(n_studies: int, seed: int, metastatic_fraction: float = 0.4, height: int = 1024,
                 width: int = 256, shift: ScannerShift | None = None) -> Iterator[PhantomStudy]:
    """Yield ``n_studies`` reproducible studies.

    Args:
        n_studies: Number of studies (>= 0).
        seed: Seed for ``numpy.random.default_rng``; the same seed gives identical studies.
        metastatic_fraction: Fraction in [0, 1]; exactly ``round(n_studies * fraction)`` studies
            are metastatic, in an order shuffled by the generator.
        height: Rows of each view (>= 64).
        width: Columns of each view (>= 64).
        shift: Another scanner's look (:class:`ScannerShift`); None: the default scanner.

    Yields:
        ``PhantomStudy`` objects (about 68% female).

    Raises:
        ValueError: On a negative count, a fraction outside [0, 1] or a side under 64 pixels
            (raised at the call, before the first study is drawn).
    """
    if n_studies < 0:
        raise ValueError(f"n_studies must be >= 0, got {n_studies}")
    if not 0.0 <= metastatic_fraction <= 1.0:
        raise ValueError(f"metastatic_fraction must be in [0, 1], got {metastatic_fraction}")
    _check_size(*(shift.size(int(height), int(width)) if shift is not None else (int(height), int(width))))
    rng = np.random.default_rng(seed)
    flags = np.zeros(n_studies, bool)
    flags[: round(n_studies * metastatic_fraction)] = True
    rng.shuffle(flags)
    return (make_study(rng, bool(flag), height, width, shift) for flag in flags)
