"""Folder-import rate: files per second with one decode process and with two.

Writes N whole-body-like files (default 2,000: 1024 x 256 uint16, half TIFF, half PNG, named
``NNNN-<0|1>-<A|P>`` so they pair into studies) to a temporary folder: a few seeded phantom
views, each file with its own Poisson counts so every file is distinct. Then imports the
folder with ``--jobs 1`` and ``--jobs 2`` into fresh databases (the ``bonescan import`` code
path, :func:`bonescan_core.ingest.import_files`) and prints one JSON object: files/s of each,
their ratio (goal ≥ 1.8 on 2 cores), the load average before and after, and the environment.
``cpu_ms_per_file`` splits the CPU time between the importing process (planning, content
hashes, unpickling, writes) and the decode workers; ``cpu_bound_ratio_on_idle_cores`` is the
ratio those CPU times allow on ``--jobs`` idle cores, a check on a measured ratio taken while
other work shares the machine.

    python bench/import_rate.py --files 2000
    python bench/import_rate.py --files 2000 --rounds 3   # interleaved rounds: the spread of the ratio

Figures, never assertions. On a shared machine other work changes the ratio: read it with the
load average.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment  # noqa: E402 - bench/ is on the path only after the lines above

from bonescan_core import db as dbm  # noqa: E402
from bonescan_core.ingest import import_files  # noqa: E402
from bonescan_core.phantom import make_studies  # noqa: E402


def write_files(folder: Path, n_files: int, seed: int = 0) -> None:
    """``n_files`` distinct files in ``folder``: TIFF for even study numbers, 16-bit PNG for odd."""
    rng = np.random.default_rng(seed)
    bases = [(study.anterior.astype(np.float64), study.posterior.astype(np.float64)) for study in make_studies(4, seed)]
    for index in range(n_files):
        study, view = divmod(index, 2)
        mean = bases[study % len(bases)][view]
        pixels = rng.poisson(mean).astype(np.uint16)
        name = f"{study:05d}-{study % 2}-{'AP'[view]}"
        if study % 2 == 0:
            tifffile.imwrite(folder / f"{name}.tif", pixels)
        else:
            Image.fromarray(pixels).save(folder / f"{name}.png")


def rate(folder: Path, db_path: Path, jobs: int) -> dict:
    """Import the folder into a fresh database; files/s over the whole import, and CPU seconds
    per file spent in this process and in its (reaped) decode workers."""
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with dbm.opened(db_path) as db:
        start, cpu_start = time.perf_counter(), time.process_time()
        outcomes = import_files(db, [folder], jobs=jobs)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    workers = children.ru_utime + children.ru_stime - children_before.ru_utime - children_before.ru_stime
    imported = sum(o.status == "imported" for o in outcomes)
    return {"jobs": jobs, "files": len(outcomes), "imported": imported, "seconds": round(seconds, 2),
            "files_per_s": round(len(outcomes) / seconds, 1),
            "cpu_ms_per_file": {"importer": round(1000 * cpu / len(outcomes), 1), "workers": round(1000 * workers / len(outcomes), 1)}}


def cpu_bound_ratio(one: dict, many: dict, cores: int) -> float:
    """The ratio the CPU times allow on ``cores`` idle cores: the parallel import is limited by
    all its CPU time shared over the cores, and by the importing process alone (one core)."""
    single = one["cpu_ms_per_file"]["importer"] + one["cpu_ms_per_file"]["workers"]
    main, workers = many["cpu_ms_per_file"]["importer"], many["cpu_ms_per_file"]["workers"]
    return round(single / max((main + workers) / cores, main), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000, help="files to write and import (default 2000)")
    parser.add_argument("--jobs", type=int, default=2, help="decode processes of the parallel run (default 2)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds of (one process, parallel), the order alternating, each into fresh databases; "
                             "every round's ratio is printed (default 1)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bonescan-import-rate-") as tmp:
        folder = Path(tmp) / "scans"
        folder.mkdir()
        write_files(folder, args.files)
        for round_number in range(args.rounds):
            load_before = os.getloadavg()
            order = (1, args.jobs) if round_number % 2 == 0 else (args.jobs, 1)
            measured = {jobs: rate(folder, Path(tmp) / f"round{round_number}-jobs{jobs}.db", jobs) for jobs in order}
            load_after = os.getloadavg()
            one, many = measured[1], measured[args.jobs]
            print(json.dumps({"round": round_number + 1, "order": list(order), "one_process": one, "parallel": many,
                              "ratio": round(many["files_per_s"] / one["files_per_s"], 2),
                              "cpu_bound_ratio_on_idle_cores": cpu_bound_ratio(one, many, args.jobs),
                              "load_average_before": [round(x, 2) for x in load_before],
                              "load_average_after": [round(x, 2) for x in load_after],
                              "environment": environment()}), flush=True)
            for jobs in order:
                for suffix in ("", "-wal", "-shm"):
                    (Path(tmp) / f"round{round_number}-jobs{jobs}.db{suffix}").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
