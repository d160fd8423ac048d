"""The one boundary to third-party libraries that are slow to import.

Every bonescan_core module reaches Keras, TensorFlow and JAX only through the accessors here,
so a process that never trains or explains (the light CLI verbs, the label pages) never pays
for them: each is imported on its first call and cached. ``tests/test_architecture.py`` fails
when any other module imports tensorflow, jax, keras or pandas itself.

``sqlite_utils`` is imported here too, and every module takes it from here: sqlite-utils
imports pandas at import time when it is installed (Streamlit brings it), only to map
``pandas.Timestamp`` columns, which bonescan never stores; that costs ~0.4 s of a light
verb's start. pandas is hidden for that one import only, so a later ``import pandas``
anywhere in the process works as usual. When pandas is already loaded (the app), nothing
is hidden.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from types import ModuleType


def _import_sqlite_utils_without_pandas() -> ModuleType:
    """Import and return ``sqlite_utils`` with ``pandas`` hidden (unless either is loaded already)."""
    if "sqlite_utils" in sys.modules or "pandas" in sys.modules:
        import sqlite_utils
        return sqlite_utils
    sys.modules["pandas"] = None  # type: ignore[assignment]  # makes ``import pandas`` raise ImportError
    try:
        import sqlite_utils
    finally:
        del sys.modules["pandas"]
    return sqlite_utils


sqlite_utils = _import_sqlite_utils_without_pandas()


@functools.cache
def keras_module() -> ModuleType:
    """Import and return ``keras`` (quietening TensorFlow's C++ start-up logs first)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    return keras


@functools.cache
def tensorflow_module() -> ModuleType:
    """Import and return ``tensorflow`` (only on the TensorFlow backend's code paths)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow

    return tensorflow


@functools.cache
def tensorflow_framework_config() -> ModuleType:
    """TensorFlow's ``tensorflow.python.framework.config``: the one place that can tell whether op
    determinism is on and switch it off again (``tf.config.experimental`` only switches it on)."""
    from tensorflow.python.framework import config

    return config


@functools.cache
def jax_module() -> ModuleType:
    """Import and return ``jax`` (only on the JAX backend's code paths); ``jax_module().numpy`` is jax.numpy."""
    import jax
    import jax.numpy  # noqa: F401  # binds the submodule as ``jax.numpy``

    return jax


def lazy_module(name: str) -> ModuleType:
    """``name`` as a module that is imported on its first attribute access (the same object as ``import name``).

    For the CLI: it names every core module its verbs use at its top, and a light verb never
    executes the slow ones (pydicom behind ``ingest``, plotly behind ``report``, the training
    stack behind ``jobs``). The first access must not race another thread (CPython 3.11's
    ``LazyLoader`` is not thread-safe); the CLI's verbs touch their modules before starting any.
    """
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module
