"""Several readers at once never lose or duplicate a review (processes, not threads)."""

import multiprocessing as mp

from bonescan_core import db as dbm
from bonescan_core import review as rv

WRITERS, WRITES = 3, 25


def write_reviews(db_path: str, reviewer: str, study_ids: list[int], start: mp.Event) -> None:
    start.wait()  # all processes begin together, so their writes really overlap
    for i in range(WRITES):
        with dbm.opened(db_path) as db:  # a short-lived connection per save, as the page does
            label = "metastatic" if i % 2 else "non_metastatic"
            criteria = ("typical_pattern",) if i % 2 else ("no_abnormal_uptake",)
            rv.add_review(db, rv.Review(study_ids[i % len(study_ids)], reviewer, "include", label=label,
                                        criteria=criteria, note=f"{reviewer}-{i}"))


def test_three_processes_twenty_five_writes_each(db_path, db, studies):
    context = mp.get_context("spawn")
    start = context.Event()
    processes = [context.Process(target=write_reviews, args=(str(db_path), f"reader{n}", studies, start)) for n in range(WRITERS)]
    for process in processes:
        process.start()
    start.set()
    for process in processes:
        process.join(timeout=120)
    assert [p.exitcode for p in processes] == [0] * WRITERS
    notes = [row[0] for row in db.execute("SELECT note FROM reviews").fetchall()]
    assert len(notes) == WRITERS * WRITES
    assert sorted(notes) == sorted(f"reader{n}-{i}" for n in range(WRITERS) for i in range(WRITES))
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
