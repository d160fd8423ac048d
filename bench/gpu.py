"""GPU training benchmark: images/s of the three backbones, float32 against mixed precision.

For the lent GPU machine (``device`` tool), which has JAX but no TensorFlow: it runs with
``KERAS_BACKEND=jax`` (chosen by itself when TensorFlow is missing and JAX is there). One JSON
line per (precision, backbone): ``bench/pipeline.py``'s ``measure`` (imported, not copied) at
the default size 646x220 with batch size 16: ``ceiling_ips`` (training images/s on batches
already in memory), ``pipeline_ips`` (through the real input pipeline: database → decode →
resize → augment → model) and their ``ratio``; plus the precision, the GPU's name from
nvidia-smi, JAX's devices and the library versions.

Under JAX, importing ``tensorflow`` is refused here as if it were not installed (the GPU
machine has none): an import attempt is listed in ``tensorflow_import_attempts``, and a code
path that really needs TensorFlow fails as it would there. The one attempt expected is Keras's
own guarded probe in ``keras.utils.set_random_seed`` (``if tf.available: ...``, called by
``models.build_model``), which goes on without it; ``tensorflow_loaded`` must stay false.

On the GPU machine (repo root; ``.whl/`` holds keras, namex, optree (cp312), sqlite-utils,
sqlite-fts4, click-default-group and pydicom; the machine has jax, numpy, h5py, pillow, ...),
``run`` with ``carry: [".whl"]`` and ``timeout_s: 600``::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; \\
    nvidia-smi --query-gpu=name,memory.total --format=csv; \\
    KERAS_BACKEND=jax PYTHONUNBUFFERED=1 python3 bench/gpu.py 2>&1 | tee $OUT/gpu.log

Each (precision, backbone) compiles two train steps (pipeline and ceiling); if the six do not
fit one call, split them: ``--precisions float32`` in one call, ``--precisions mixed_float16``
in the next (or fewer ``--backbones``).

Here (CPU) as a smoke test of the whole path, under TensorFlow and, with a CPU JAX on
PYTHONPATH, under JAX (about 3 minutes each on 2 cores):

    python bench/gpu.py --quick --backbones resnet50 --size 64x32
    KERAS_BACKEND=jax PYTHONPATH=/path/to/jax python bench/gpu.py --quick --backbones resnet50 --size 64x32

Timings, never assertions: nothing in the test suite checks them.
"""

from __future__ import annotations

import argparse
import gc
import importlib.abc
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

import common

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class RefuseTensorFlow(importlib.abc.MetaPathFinder):
    """Makes ``import tensorflow`` fail as on a machine without it, and remembers who tried."""

    def __init__(self) -> None:
        self.attempts: list[str] = []

    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            self.attempts.append(name)
            raise ModuleNotFoundError(f"No module named {name!r} (refused by bench/gpu.py on the JAX path)", name=name)
        return None


def choose_backend() -> str:
    """KERAS_BACKEND as set; else jax where TensorFlow is missing and JAX is installed."""
    if "KERAS_BACKEND" not in os.environ and importlib.util.find_spec("tensorflow") is None \
            and importlib.util.find_spec("jax") is not None:
        os.environ["KERAS_BACKEND"] = "jax"
    return os.environ.get("KERAS_BACKEND", "tensorflow")


def devices(backend: str) -> dict:
    from bonescan_core.devices import gpu_names

    found: dict = {"gpus": gpu_names() or None}  # nvidia-smi's names; None without a driver
    if backend == "jax":
        import jax

        found["jax_backend"] = jax.default_backend()
        found["jax_devices"] = [device.device_kind for device in jax.devices()]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 timed steps in 1 round instead of 20 in 3")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps (default 20, --quick 3)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds, the best counts (default 3, --quick 1)")
    parser.add_argument("--backbones", default="resnet50,vgg19,densenet121")
    parser.add_argument("--size", default="646x220", help="HxW (default 646x220, the app's default)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--precisions", default="float32,mixed_float16", help="Keras dtype policies, in order")
    args = parser.parse_args()
    backend = choose_backend()
    refuser = None
    if backend == "jax":
        refuser = RefuseTensorFlow()
        sys.meta_path.insert(0, refuser)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import pipeline  # bench/pipeline.py: measure, make_demo_db

    from bonescan_core.heavy import keras_module

    keras = keras_module()
    steps = args.steps or (3 if args.quick else 20)
    rounds = args.rounds or (1 if args.quick else 3)
    size = tuple(int(v) for v in args.size.split("x"))
    found = devices(backend)
    with tempfile.TemporaryDirectory(prefix="bonescan-bench-") as folder:
        db_path = pipeline.make_demo_db(Path(folder), n_studies=(args.batch_size * (steps + 1)) // 2 + 2)
        try:
            for precision in args.precisions.split(","):
                for backbone in args.backbones.split(","):
                    # Set for every model: measure() builds under the global policy, and
                    # clear_session() below resets it to float32.
                    keras.mixed_precision.set_global_policy(precision)
                    result = pipeline.measure(db_path, backbone, size, args.batch_size, steps, rounds)  # best of alternating rounds
                    used = keras.mixed_precision.global_policy().name
                    keras.backend.clear_session()
                    gc.collect()
                    print(json.dumps({
                        "bench": "gpu", **result, "precision": used,
                        "images_per_second": result["ceiling_ips"], **found,
                        "tensorflow_loaded": "tensorflow" in sys.modules,
                        "tensorflow_import_attempts": sorted(set(refuser.attempts)) if refuser else None,
                        **common.environment(backend=keras.backend.backend()),
                    }), flush=True)
        finally:
            keras.mixed_precision.set_global_policy("float32")


if __name__ == "__main__":
    main()
