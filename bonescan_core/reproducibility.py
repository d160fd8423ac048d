"""What a run needs to be repeated: versions, commit, the weights file loaded, split, seeds, determinism.

``training.train_run`` stores :func:`record` as ``results["reproducibility"]`` (shown in
``bonescan runs --json`` under ``config`` and in the report). :func:`deterministic_ops`
switches on TensorFlow's deterministic kernels for one run (``TrainConfig.deterministic``,
``bonescan train --deterministic``) and restores the previous state afterwards, because the
worker process trains later runs too.

Importing this module does not import Keras; :func:`deterministic_ops` does.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bonescan_core import models, runs
from bonescan_core.heavy import keras_module, tensorflow_framework_config, tensorflow_module

PACKAGE = "bonescan"
PACKAGE_DIR = Path(__file__).resolve().parent
GIT_TIMEOUT_S = 5.0


def package_version() -> str | None:
    """The installed ``bonescan`` distribution's version (e.g. ``0.1.0``), or None when not installed."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit(folder: Path = PACKAGE_DIR) -> str | None:
    """``git rev-parse HEAD`` run in ``folder`` (40 hex), or None: no git, not a checkout, or git failed.

    Never raises: a package installed from a wheel simply has no commit.
    """
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True,
                              timeout=GIT_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and len(commit) == 40 else None


def loaded_weights_file(backbone: str, weights: str) -> Path | None:
    """The weights file a run loaded: the Keras cache file of the ImageNet weights
    (``models.imagenet_cached``), the user's file, or None for ``none`` (random initial weights)."""
    kind = models.weights_kind(weights)
    if kind == "imagenet":
        return models.imagenet_cached(backbone)
    if kind == "file":
        return Path(weights)
    return None


def weights_sha256(backbone: str, weights: str) -> str | None:
    """Hex sha256 of :func:`loaded_weights_file`, or None when there is no such file."""
    path = loaded_weights_file(backbone, weights)
    return runs.file_sha256(path) if path is not None and path.is_file() else None


def record(config: runs.TrainConfig, split_id: int, labels_hash: str | None, split_seed: int | None,
           feature_seed: int | None = None) -> dict[str, Any]:
    """The run's ``results["reproducibility"]``.

    Returns:
        ``{"package_version", "git_commit", "weights", "weights_file", "weights_sha256",
        "split_id", "labels_hash", "seeds": {"run", "split", "feature_init"}, "deterministic"}``:
        ``weights_file`` the name of the file loaded (None for ``none``), ``weights_sha256``
        its hex sha256 (None for ``none``), ``seeds.feature_init`` the fixed seed of fast
        mode's random backbones (None otherwise).
    """
    path = loaded_weights_file(config.backbone, config.weights)
    return {
        "package_version": package_version(),
        "git_commit": git_commit(),
        "weights": config.weights,
        "weights_file": path.name if path is not None else None,
        "weights_sha256": weights_sha256(config.backbone, config.weights),
        "split_id": split_id,
        "labels_hash": labels_hash,
        "seeds": {"run": config.seed, "split": split_seed, "feature_init": feature_seed},
        "deterministic": bool(config.deterministic),
    }


@contextlib.contextmanager
def deterministic_ops(enabled: bool, seed: int) -> Iterator[None]:
    """Within the block: Python, NumPy and backend seeds set (``keras.utils.set_random_seed``)
    and, on TensorFlow, deterministic op kernels; the previous op-determinism state is
    restored on exit. Does nothing when ``enabled`` is False."""
    if not enabled:
        yield
        return
    keras = keras_module()
    keras.utils.set_random_seed(seed)
    restore = None
    if keras.backend.backend() == "tensorflow":
        tf = tensorflow_module()
        tf_config = tensorflow_framework_config()
        was_on = bool(getattr(tf_config, "is_op_determinism_enabled", lambda: False)())
        tf.config.experimental.enable_op_determinism()
        if not was_on:
            restore = getattr(tf_config, "disable_op_determinism", None)
    try:
        yield
    finally:
        if restore is not None:
            restore()
