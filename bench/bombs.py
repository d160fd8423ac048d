"""Decompression-bomb benchmark: peak memory and time of importing each bomb of the test corpus.

Each bomb (``tests/bad_corpus.BOMBS``: small files whose compressed data expands far past
the image they declare) is written to a temp folder and read with ``imaging.read_scan`` in a
fresh interpreter; prints one JSON object: {bomb: {"bytes", "peak_mib", "seconds", "outcome"}}
plus the environment. ``peak_mib`` is the growth of the peak resident set during the read
(Linux ``ru_maxrss``); the goal is <= 2 x the declared decoded size + 100 MB (all of these
declare under 25 KB).

    python bench/bombs.py

Figures, never assertions: tests/test_imaging.py checks the bound itself.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bad_corpus import BOMBS, peak_memory_of_reading  # noqa: E402 - tests/ is on the path only after the lines above
from common import environment  # noqa: E402


def main() -> None:
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, (_reason, build) in BOMBS.items():
            path = Path(folder) / name
            path.write_bytes(build())
            results[name] = {"bytes": path.stat().st_size, **peak_memory_of_reading(path)}
    print(json.dumps({"bombs": results, "environment": environment()}, indent=2))


if __name__ == "__main__":
    main()
