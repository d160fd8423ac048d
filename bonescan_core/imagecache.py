"""Training images on disk: decoded, normalised and fitted once, read per batch, never all in memory.

A training run used to hold every sample as float16 in memory (282 KB an image at 646 x 220:
23 GB for 82,544 images). Now each image's model frame (``preprocess.prepare_image``: min-max
to [0, 1], fitted into (H, W)) is written once to a folder beside the runs, and batches are
read from there while the model trains (``preprocess.image_batches`` reads ahead in background
threads). What a run keeps in memory is its sample list and one key per image.

Layout: ``<runs root>/cache/v<PREPROCESS_VERSION>/<H>x<W>/<sha[:2]>/<sha>.npy``, where
``runs root`` is ``runs.runs_root(db_path)`` (``runs/`` beside the database) and ``sha`` the
image's ``pixel_sha256`` (of dtype, shape and pixel bytes): an entry depends only on the
pixels, the frame size and the preprocessing code, so it is shared by every run, backbone,
view mode (a composite's halves are frames of their own size) and database in that folder.
Each entry is a ``.npy`` file, float16 (H, W) in [0, 1], exactly the values the in-memory path
(``preprocess.load_images``) computes. Bump :data:`PREPROCESS_VERSION` whenever
``prepare_image`` would give other values: old entries are then never read again.

Safety: an entry is written to a temporary name and renamed into place, so a killed run leaves
no half-written entry under an entry's name (only a ``*.tmp`` file that nothing reads and
``bonescan cache --clear`` removes). Before a run trains, every entry it needs is checked:
its length and its ``.npy`` header (dtype and shape) must be exactly those of its frame; a
missing, truncated or damaged entry is decoded again and rewritten. Every read checks both
again. No fsync: a crash of the machine may leave a short entry, which that check catches.

``BONESCAN_IMAGE_CACHE=memory`` keeps the in-memory path (``disk``, the default, uses this
cache); an in-memory database has no runs folder and always uses memory.
"""

from __future__ import annotations

import io
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bonescan_core import errors, pixelstore, preprocess, runs
from bonescan_core.heavy import sqlite_utils
from bonescan_core.preprocess import Sample

PREPROCESS_VERSION = 1  # bump when preprocess.prepare_image changes what it returns
CACHE_FOLDER = "cache"
ENV_VAR = "BONESCAN_IMAGE_CACHE"
MODES = ("disk", "memory")
DTYPE = np.dtype("<f2")


class CacheUnavailable(errors.Unavailable):
    """An entry cannot be written or read (disk full, no permission, removed or damaged during a run)."""


def _header(size: tuple[int, int]) -> bytes:
    """The exact ``.npy`` header (magic, version 1.0, dict, padding) of a float16 (H, W) C-order array."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": DTYPE.str, "fortran_order": False, "shape": tuple(size)})
    return buffer.getvalue()


class ImageCache:
    """One cache folder (see the module docstring for its layout).

    Attributes:
        root: ``<runs root>/cache``; nothing else is written there.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._headers: dict[tuple[int, int], bytes] = {}

    @classmethod
    def beside(cls, db_path: str | os.PathLike[str]) -> ImageCache:
        """The cache of the database at ``db_path``: ``runs.runs_root(db_path) / "cache"``."""
        return cls(runs.runs_root(db_path) / CACHE_FOLDER)

    # --- one entry ------------------------------------------------------------------------------

    def header(self, size: tuple[int, int]) -> bytes:
        size = (int(size[0]), int(size[1]))
        if size not in self._headers:
            self._headers[size] = _header(size)
        return self._headers[size]

    def entry_bytes(self, size: tuple[int, int]) -> int:
        """The exact length of an entry of frame ``size``: header + H * W * 2."""
        return len(self.header(size)) + int(size[0]) * int(size[1]) * DTYPE.itemsize

    def folder(self, size: tuple[int, int]) -> Path:
        return self.root / f"v{PREPROCESS_VERSION}" / f"{int(size[0])}x{int(size[1])}"

    def path(self, sha: str, size: tuple[int, int]) -> Path:
        """Where the entry of image ``sha`` at frame ``size`` lives."""
        return self.folder(size) / sha[:2] / f"{sha}.npy"

    def state(self, sha: str, size: tuple[int, int]) -> str:
        """``ok``, ``missing`` or ``damaged`` (wrong length, or a header that is not this frame's)."""
        header = self.header(size)
        try:
            with open(self.path(sha, size), "rb") as handle:
                length = os.fstat(handle.fileno()).st_size
                start = handle.read(len(header))
        except FileNotFoundError:
            return "missing"
        return "ok" if length == self.entry_bytes(size) and start == header else "damaged"

    def read(self, sha: str, size: tuple[int, int]) -> np.ndarray:
        """The entry as a read-only float16 (H, W) array in [0, 1].

        Raises:
            CacheUnavailable: the entry is missing, or not exactly this frame's length and header.
        """
        path = self.path(sha, size)
        expected = self.entry_bytes(size)
        try:
            with open(path, "rb") as handle:
                data = handle.read(expected + 1)
        except FileNotFoundError as error:
            raise CacheUnavailable(f"the image cache entry {path} was removed during the run; train again "
                                   "(missing entries are rebuilt before training starts)") from error
        header = self.header(size)
        if len(data) != expected or not data.startswith(header):
            raise CacheUnavailable(f"the image cache entry {path} is damaged ({len(data)} bytes, expected {expected}); "
                                   "train again (damaged entries are rebuilt before training starts)")
        return np.frombuffer(data, dtype=DTYPE, offset=len(header)).reshape(int(size[0]), int(size[1]))

    def write(self, sha: str, size: tuple[int, int], image: np.ndarray) -> None:
        """Store ``image`` ((H, W) in [0, 1], cast to float16) atomically: a temporary file, then a rename.

        Raises:
            CacheUnavailable: the file cannot be written (disk full, no permission).
        """
        data = np.ascontiguousarray(image, dtype=DTYPE)
        if data.shape != (int(size[0]), int(size[1])):
            raise ValueError(f"a {data.shape} image for a {size} cache entry")
        path = self.path(sha, size)
        temporary = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(temporary, "wb") as handle:
                handle.write(self.header(size))
                handle.write(data.tobytes())
            os.replace(temporary, path)
        except OSError as error:
            temporary.unlink(missing_ok=True)
            raise CacheUnavailable(f"cannot write the image cache at {self.root} ({error.strerror or error}); free disk "
                                   "space there, or train with BONESCAN_IMAGE_CACHE=memory") from error

    # --- many entries ---------------------------------------------------------------------------

    def ensure(
        self,
        db: sqlite_utils.Database,
        samples: Sequence[Sample],
        size: tuple[int, int],
        view_mode: str = "per_image",
        cancelled: Callable[[], bool] | None = None,
    ) -> tuple[dict[int, str], dict[str, float]]:
        """Make sure every frame the samples need is in the cache: check each, decode what is missing or damaged.

        Args:
            samples: from ``preprocess.list_samples`` with the same ``view_mode``.
            size: (H, W).
            cancelled: polled every 32 decoded images (``preprocess.map_blobs``); True stops
                with ``InterruptedError`` (what is written stays valid).

        Returns:
            ({image_id: pixel_sha256} of the samples' images, counts): ``reused`` entries found
            intact, ``decoded`` images decoded (for ``missing`` and ``damaged`` entries),
            ``check_s`` and ``decode_s`` seconds spent checking and decoding.
        """
        started = time.perf_counter()
        frames: dict[int, set[tuple[int, int]]] = {}
        for sample in samples:
            for image_id, frame in preprocess.frame_sizes(sample, view_mode, size):
                frames.setdefault(image_id, set()).add(frame)
        ids = sorted(frames)
        shas: dict[int, str] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ", ".join("?" for _ in chunk)
            shas.update(db.execute(f"SELECT id, pixel_sha256 FROM images WHERE id IN ({marks})", chunk).fetchall())
        counts = {"reused": 0, "missing": 0, "damaged": 0}
        todo: dict[int, list[tuple[int, int]]] = {}
        for image_id in ids:
            for frame in sorted(frames[image_id]):
                state = self.state(shas[image_id], frame)
                counts["reused" if state == "ok" else state] += 1
                if state != "ok":
                    todo.setdefault(image_id, []).append(frame)
        checked = time.perf_counter()

        def decode(image_id: int, blobs: Mapping[int, bytes]) -> None:
            pixels = pixelstore.decode_pixels(blobs[image_id])
            for frame in todo[image_id]:
                self.write(shas[image_id], frame, preprocess.prepare_image(pixels, frame))

        for _ in preprocess.map_blobs(db, list(todo), lambda image_id: (image_id,), decode, cancelled):
            pass
        facts = {**counts, "decoded": len(todo), "check_s": round(checked - started, 3),
                 "decode_s": round(time.perf_counter() - checked, 3)}
        return shas, facts

    def summary(self) -> dict[str, Any]:
        """What the cache holds: ``path``, ``version`` (the current one), ``entries``, ``bytes``,
        ``unfinished`` (temporary files of writes cut short) and ``sizes``: one
        ``{"version", "size", "entries", "bytes"}`` per frame folder (older versions included)."""
        sizes = []
        unfinished = 0
        for version_dir in sorted(p for p in self.root.glob("v*") if p.is_dir()):
            for size_dir in sorted(p for p in version_dir.iterdir() if p.is_dir()):
                entries = n_bytes = 0
                for file in size_dir.glob("*/*"):
                    if file.name.endswith(".tmp"):
                        unfinished += 1
                    elif file.suffix == ".npy":
                        entries += 1
                        n_bytes += file.stat().st_size
                sizes.append({"version": int(version_dir.name[1:]) if version_dir.name[1:].isdigit() else version_dir.name,
                              "size": size_dir.name, "entries": entries, "bytes": n_bytes})
        return {"path": str(self.root), "version": PREPROCESS_VERSION, "entries": sum(s["entries"] for s in sizes),
                "bytes": sum(s["bytes"] for s in sizes), "unfinished": unfinished, "sizes": sizes}

    def clear(self) -> dict[str, Any]:
        """Remove the whole cache folder. Returns ``{"path", "removed_entries", "removed_bytes"}``.

        Raises:
            CacheUnavailable: a file could not be removed (permission).
        """
        before = self.summary()
        try:
            if self.root.exists():
                shutil.rmtree(self.root)
        except OSError as error:
            raise CacheUnavailable(f"cannot remove {self.root} ({error.strerror or error}); check its permissions") from error
        return {"path": str(self.root), "removed_entries": before["entries"], "removed_bytes": before["bytes"]}


class DiskImages:
    """The samples' frames as a read-only array-like, read from the cache on every access.

    Behaves like the (N, H, W) (fusion: (N, 2, H, W)) float16 array ``preprocess.load_images``
    returns, for what the training pipeline does with one: ``len``, ``shape``, ``dtype``,
    indexing by an int, a slice or an int array (returns a new float16 NumPy array), and
    ``[..., None]`` (the same samples with a trailing channel axis, read lazily as well).
    Safe to read from several threads.
    """

    def __init__(self, cache: ImageCache, samples: Sequence[Sample], size: tuple[int, int], view_mode: str,
                 shas: Mapping[int, str], channel: bool = False) -> None:
        self.cache, self.samples, self.size, self.view_mode = cache, list(samples), (int(size[0]), int(size[1])), view_mode
        self.shas = shas
        self.channel = channel
        frame = (2, *self.size) if view_mode == "fusion" else self.size
        self.shape: tuple[int, ...] = (len(self.samples), *frame, *((1,) if channel else ()))
        self.dtype = np.dtype(np.float16)
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return len(self.samples)

    def _fit(self, image_id: int, frame: tuple[int, int]) -> np.ndarray:
        return self.cache.read(self.shas[image_id], frame)

    def _frame(self, index: int) -> np.ndarray:
        return preprocess.sample_frame(self.samples[index], self.view_mode, self.size, self._fit)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, tuple) and len(index) == 2 and index[0] is Ellipsis and index[1] is None and not self.channel:
            return DiskImages(self.cache, self.samples, self.size, self.view_mode, self.shas, channel=True)
        if isinstance(index, (int, np.integer)):
            return self[np.array([int(index)])][0]
        picked = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index)
        if picked.dtype == bool or picked.ndim != 1:
            raise TypeError("DiskImages takes an int, a slice, a 1-D int array or [..., None]")
        out = np.empty((len(picked), *self.shape[1:]), dtype=np.float16)
        for row, i in enumerate(picked):
            frame = self._frame(int(i))
            out[row] = frame[..., None] if self.channel else frame
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        data = self[:]
        return data if dtype is None else data.astype(dtype)


def mode() -> str:
    """``disk`` or ``memory``, from ``$BONESCAN_IMAGE_CACHE`` (default ``disk``)."""
    value = os.environ.get(ENV_VAR, "disk").strip().lower() or "disk"
    if value not in MODES:
        raise errors.InputError(f"{ENV_VAR}={value!r} is not a cache mode; set it to disk or memory")
    return value


def for_database(db: sqlite_utils.Database) -> ImageCache | None:
    """The cache beside ``db``'s file, or None (an in-memory database, or ``BONESCAN_IMAGE_CACHE=memory``)."""
    if mode() == "memory":
        return None
    row = db.execute("PRAGMA database_list").fetchone()  # (seq, name, file); file is '' in memory
    return ImageCache.beside(row[2]) if row and row[2] else None


def training_images(
    db: sqlite_utils.Database,
    samples: Sequence[Sample],
    size: tuple[int, int],
    view_mode: str = "per_image",
    cancelled: Callable[[], bool] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """The samples' frames for training: from the disk cache (filled first), or in memory.

    Returns:
        (images, facts): a :class:`DiskImages` and :meth:`ImageCache.ensure`'s counts with
        ``"mode": "disk"``, or ``preprocess.load_images``'s array and ``{"mode": "memory"}``.
        The values are the same either way.
    """
    cache = for_database(db)
    if cache is None:
        started = time.perf_counter()
        images = preprocess.load_images(db, samples, size, view_mode, cancelled=cancelled)
        return images, {"mode": "memory", "decoded": len({i for s in samples for i in s.image_ids}),
                        "decode_s": round(time.perf_counter() - started, 3)}
    shas, facts = cache.ensure(db, samples, size, view_mode, cancelled)
    return DiskImages(cache, samples, size, view_mode, shas), {"mode": "disk", **facts}
