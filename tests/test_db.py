import sqlite3
import threading

import pytest

from bonescan_core import db as dbm


def test_new_database_is_migrated_with_wal_and_foreign_keys(tmp_path):
    with dbm.opened(tmp_path / "new.db") as db:
        assert {"patients", "studies", "images", "reviews", "settings", "_migrations"} <= set(db.table_names())
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert db.execute("PRAGMA busy_timeout").fetchone()[0] >= 5000
        assert dbm.schema_version(db) == dbm.MIGRATIONS[-1][0]


def test_reopening_applies_nothing_and_keeps_the_salt(tmp_path):
    path = tmp_path / "x.db"
    with dbm.opened(path) as db:
        salt = dbm.salt(db)
    with dbm.opened(path) as db:
        assert dbm.apply_migrations(db) == []
        assert dbm.salt(db) == salt
    with dbm.opened(tmp_path / "other.db") as other:
        assert dbm.salt(other) != salt, "each database gets its own salt"


def test_path_resolution_order(monkeypatch, tmp_path):
    monkeypatch.delenv(dbm.ENV_VAR, raising=False)
    assert str(dbm.resolve_path()) == "labels.db"
    monkeypatch.setenv(dbm.ENV_VAR, str(tmp_path / "env.db"))
    assert dbm.resolve_path() == tmp_path / "env.db"
    assert str(dbm.resolve_path("given.db")) == "given.db"


def test_write_rolls_back_everything_on_error(db):
    with pytest.raises(RuntimeError):
        with dbm.write(db):
            db["patients"].insert({"key": "k1", "created_at": dbm.utc_now()})
            raise RuntimeError("boom")
    assert db["patients"].count == 0


def test_foreign_keys_are_enforced(db):
    with pytest.raises(sqlite3.IntegrityError):
        with dbm.write(db):
            db["studies"].insert({"patient_id": 999, "key": "s", "origin": "import", "created_at": dbm.utc_now()})


def test_reviews_are_append_only(db):
    with dbm.write(db):
        pid = db["patients"].insert({"key": "p", "created_at": dbm.utc_now()}).last_pk
        sid = db["studies"].insert({"patient_id": pid, "key": "s", "origin": "import", "created_at": dbm.utc_now()}).last_pk
        db["reviews"].insert({"study_id": sid, "reviewer": "a", "created_at": dbm.utc_now(), "decision": "include",
                              "label": "metastatic", "criteria": "flare"})
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("UPDATE reviews SET label = 'non_metastatic'")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("DELETE FROM reviews")


def test_concurrent_writers_all_land(db_path):
    """Threads with their own short-lived connections: every write lands, none fails."""
    errors: list[BaseException] = []

    def writer(name: str) -> None:
        try:
            for i in range(20):
                with dbm.opened(db_path) as db, dbm.write(db):
                    db["patients"].insert({"key": f"{name}-{i}", "created_at": dbm.utc_now()})
        except BaseException as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(f"t{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with dbm.opened(db_path) as db:
        assert db["patients"].count == 80


def _study_with_review_and_flag(db):
    with dbm.write(db):
        pid = db["patients"].insert({"key": "p", "created_at": dbm.utc_now()}).last_pk
        sid = db["studies"].insert({"patient_id": pid, "key": "s", "origin": "import", "created_at": dbm.utc_now()}).last_pk
        rid = db["reviews"].insert({"study_id": sid, "reviewer": "a", "created_at": dbm.utc_now(), "decision": "include",
                                    "label": "metastatic", "criteria": "flare"}).last_pk
        fid = db["flags"].insert({"study_id": sid, "reason": "check T7", "flagged_by": "a", "created_at": dbm.utc_now()}).last_pk
    return sid, rid, fid


def test_insert_or_replace_cannot_rewrite_a_review_or_a_flag(db):
    """REPLACE deletes the old row without firing the delete trigger: an insert with a used id is refused."""
    sid, rid, fid = _study_with_review_and_flag(db)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("INSERT OR REPLACE INTO reviews (id, study_id, reviewer, created_at, decision, label, criteria)"
                   " VALUES (?, ?, 'a', '2020-01-01T00:00:00Z', 'include', 'non_metastatic', 'trauma')", [rid, sid])
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db["reviews"].insert({"id": rid, "study_id": sid, "reviewer": "mallory", "created_at": dbm.utc_now(),
                              "decision": "exclude", "exclusion_reason": "artifact"}, replace=True)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("REPLACE INTO flags (id, study_id, reason, flagged_by, created_at) VALUES (?, ?, 'x', 'm', 'now')", [fid, sid])
    review = db.execute("SELECT reviewer, label FROM reviews WHERE id = ?", [rid]).fetchone()
    flag = db.execute("SELECT reason, flagged_by FROM flags WHERE id = ?", [fid]).fetchone()
    assert (tuple(review), tuple(flag)) == (("a", "metastatic"), ("check T7", "a"))


def test_flags_are_append_only(db):
    _study_with_review_and_flag(db)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("UPDATE flags SET reason = 'nothing'")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("DELETE FROM flags")
    assert db["flags"].count == 1


def test_upgrading_keeps_open_flags_open_and_answered_ones_answered(tmp_path, monkeypatch):
    """A database made before 004 (flags answered by the clock) keeps the same open flags after it."""
    from bonescan_core import review as rv

    path = tmp_path / "old.db"
    monkeypatch.setattr(dbm, "MIGRATIONS", dbm.MIGRATIONS[:3])
    with dbm.opened(path) as db, dbm.write(db):
        pid = db["patients"].insert({"key": "p", "created_at": "2026-01-01T00:00:00Z"}).last_pk
        answered, open_ = (db["studies"].insert({"patient_id": pid, "key": k, "origin": "import",
                                                  "created_at": "2026-01-01T00:00:00Z"}).last_pk for k in ("s1", "s2"))
        for sid in (answered, open_):
            db["flags"].insert({"study_id": sid, "reason": f"flag {sid}", "flagged_by": "x", "created_at": "2026-01-02T00:00:00Z"})
        db["reviews"].insert({"study_id": answered, "reviewer": "a", "created_at": "2026-01-03T00:00:00Z",
                              "decision": "include", "label": "metastatic", "criteria": "flare"})
    monkeypatch.undo()
    with dbm.opened(path) as db:
        assert dbm.schema_version(db) == dbm.MIGRATIONS[-1][0]
        assert rv.open_flags(db) == {open_: [f"flag {open_}"]}


def test_the_data_version_moves_with_every_change_pages_derive_from(tmp_path):
    """Pages cache studies' labels under the data version: every insert, update or delete of a
    study, image, patient, review, reader or flag must move it (else a page shows a stale label),
    and unrelated writes must not (else the cache is useless)."""
    from conftest import add_bare_studies

    from bonescan_core import review as rv

    with dbm.opened(tmp_path / "v.db") as db:
        seen = [dbm.data_version(db)]

        def moved() -> bool:
            seen.append(dbm.data_version(db))
            return seen[-1] != seen[-2]

        (study,) = add_bare_studies(db, 1)
        assert moved()
        rv.add_review(db, rv.Review(study, "ann", "include", label="metastatic", criteria=("typical_pattern",)))
        assert moved()
        with dbm.write(db):
            db.execute("UPDATE patients SET sex = 'F'")
        assert moved()
        rv.set_adjudicator(db, "ann")
        assert moved()
        rv.set_adjudicator(db, "ann", adjudicator=False)
        assert moved()
        with dbm.write(db):
            db["settings"].insert({"key": "unrelated", "value": "x"})
        assert not moved()
        with dbm.write(db):
            db.execute("DELETE FROM studies WHERE id NOT IN (SELECT study_id FROM reviews)")
            db.execute("INSERT INTO flags (study_id, reason, flagged_by, created_at) VALUES (?, 'r', 'b', 'now')", [study])
        assert moved()
