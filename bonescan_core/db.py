"""The one SQLite file that holds everything: connection, schema migrations, transactions.

Connections are short-lived: open one per operation with :func:`connect` (Streamlit runs
sessions on several threads; a connection must not cross threads). Every connection turns
on WAL (readers never block the writer), ``synchronous=FULL`` (a commit is on disk when it
returns), foreign keys and a busy timeout (a writer waits for another writer instead of
failing). WAL needs shared memory between the processes, so one database belongs to one
host: never on a network file system. Writes go through :func:`write`, which takes the
write lock up front (``BEGIN IMMEDIATE``) so two writers queue instead of deadlocking.

The schema is versioned by an ordered list of migrations; applied ones are recorded in the
``_migrations`` table, so opening an old database upgrades it in place.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import secrets
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

from bonescan_core import errors
from bonescan_core.heavy import sqlite_utils

DEFAULT_DB = "labels.db"
ENV_VAR = "BONESCAN_DB"
BUSY_TIMEOUT_S = 30.0


def resolve_path(path: str | os.PathLike[str] | None = None) -> Path:
    """The database path: ``path`` if given, else ``$BONESCAN_DB``, else ``./labels.db``."""
    return Path(path or os.environ.get(ENV_VAR) or DEFAULT_DB)


def utc_now() -> str:
    """Current UTC time as ISO 8601 with microseconds, e.g. ``2026-11-26T15:13:10.123456Z``."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# What each SQLite result code that blames the file (not the statement) asks the user to do.
# Keys are primary codes; extended ones (SQLITE_IOERR_SHORT_READ, ...) map to their primary.
_FILE_PROBLEMS = {
    "SQLITE_NOTADB": "is not a SQLite database (damaged, or another kind of file); restore it from a backup or choose another --db path",
    "SQLITE_CORRUPT": "is damaged; restore it from a backup (keep the damaged copy for the record) or choose another --db path",
    "SQLITE_READONLY": "is read-only (the file or its folder); give this user write permission on both, or copy it somewhere writable",
    "SQLITE_PERM": "is read-only (the file or its folder); give this user write permission on both, or copy it somewhere writable",
    # WAL keeps two files beside the database (-wal, -shm): a read-only folder cannot hold them.
    "SQLITE_CANTOPEN": ("cannot be opened: the file or its folder is read-only or not readable (SQLite keeps -wal and -shm files "
                        "beside it); give this user write permission on both, or copy it somewhere writable"),
    "SQLITE_IOERR": "could not be read or written (a disk or file system error); check the disk, and keep the database on a local disk",
    "SQLITE_FULL": "cannot grow because the disk is full; free some space and try again",
}


def unavailable(path: str | os.PathLike[str], error: sqlite3.Error) -> errors.DatabaseUnavailable | None:
    """The :class:`errors.DatabaseUnavailable` that ``error`` means for the file at ``path``, or None
    when the fault is the statement's (a constraint, a bug), which keeps its own exception."""
    name = getattr(error, "sqlite_errorname", "") or ""
    problem = _FILE_PROBLEMS.get("_".join(name.split("_")[:2]))
    if problem is None:
        return None
    return errors.DatabaseUnavailable(f"database {path} {problem} (SQLite: {error})")


def connect(path: str | os.PathLike[str] | None = None, *, migrate: bool = True) -> sqlite_utils.Database:
    """Open the database (creating and migrating it on first use).

    Args:
        path: database file; see :func:`resolve_path`.
        migrate: apply pending migrations (cheap when none are pending).

    Returns:
        A sqlite_utils.Database over a connection owned by the calling thread. Close it
        when done (or use :func:`opened`).

    Raises:
        errors.DatabaseUnavailable: the folder does not exist, or the file is not SQLite, is
            damaged, read-only or cannot be opened (the message says which and what to do).
    """
    db_path = resolve_path(path)
    if db_path.parent and not db_path.parent.exists():
        raise errors.DatabaseUnavailable(f"database folder {db_path.parent} does not exist; create it or choose another --db path")
    conn = None
    try:
        conn = sqlite3.connect(str(db_path), timeout=BUSY_TIMEOUT_S)
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        conn.execute("PRAGMA journal_mode = WAL")
        # FULL: a commit returns only after the WAL is on disk, so a saved review survives a power cut
        # (NORMAL could lose the last commits; it is never corrupt). Costs an fsync per commit: docs/security.md.
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        db = sqlite_utils.Database(conn)
        if migrate:
            apply_migrations(db)
    except sqlite3.Error as error:
        if conn is not None:
            conn.close()
        if (problem := unavailable(db_path, error)) is not None:
            raise problem from error
        raise
    return db


def idle_connection(path: str | os.PathLike[str]) -> sqlite3.Connection | None:
    """A connection that reads nothing and holds no transaction (it never blocks a writer or a
    checkpoint), for a long-lived process to keep open beside its short-lived ones: SQLite
    removes the WAL and its index when the last connection closes, and every short-lived
    connection after that would rebuild them (2-3x the cost of an open, measured at 50,000
    studies). Usable from any thread. None when the file cannot be read as a database: it is
    only a speed-up, and :func:`connect` says what is wrong with the file."""
    connection = None
    try:
        connection = sqlite3.connect(str(path), check_same_thread=False)
        connection.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
    except sqlite3.Error:
        if connection is not None:
            connection.close()
        return None
    return connection


@contextlib.contextmanager
def opened(path: str | os.PathLike[str] | None = None) -> Iterator[sqlite_utils.Database]:
    """``with opened(path) as db:`` — a connection that is closed on exit.

    A SQLite error inside the block that blames the file (damaged pages found by a later query,
    a write to a read-only database) is raised as :class:`errors.DatabaseUnavailable`.
    """
    db = connect(path)
    try:
        yield db
    except sqlite3.Error as error:
        if (problem := unavailable(resolve_path(path), error)) is not None:
            raise problem from error
        raise
    finally:
        db.close()


@contextlib.contextmanager
def write(db: sqlite_utils.Database) -> Iterator[sqlite_utils.Database]:
    """One write transaction: all of it is stored, or none of it (on any exception).

    ``BEGIN IMMEDIATE`` takes the write lock at the start, so a concurrent writer waits
    (busy timeout) rather than failing later when it tries to upgrade a read lock.
    sqlite-utils calls inside nest as savepoints.
    """
    db.conn.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        if db.conn.in_transaction:
            db.conn.execute("ROLLBACK")
        raise
    else:
        db.conn.execute("COMMIT")


# --- migrations -------------------------------------------------------------------------

def _m001_foundation(db: sqlite_utils.Database) -> None:
    """Patients, studies, images, reviews, reviewers, flags, settings (salt)."""
    # One statement per execute: sqlite3's executescript would COMMIT our transaction.
    for statement in _FOUNDATION_SQL:
        db.execute(statement)
    db["settings"].insert({"key": "salt", "value": secrets.token_hex(32)})


_FOUNDATION_SQL = [
    """CREATE TABLE settings (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL
        )""",
    """CREATE TABLE patients (
            id INTEGER PRIMARY KEY,
            key TEXT NOT NULL UNIQUE,          -- salted hash; never the original identifier
            sex TEXT CHECK (sex IN ('F', 'M', 'O')),
            age_band TEXT,                     -- e.g. '40-49', '90+'; never an exact age or date
            primary_cancer TEXT,
            created_at TEXT NOT NULL
        )""",
    """CREATE TABLE studies (
            id INTEGER PRIMARY KEY,
            patient_id INTEGER NOT NULL REFERENCES patients(id),
            key TEXT NOT NULL UNIQUE,          -- salted hash of the grouping key (UID or path)
            study_year INTEGER,                -- year only
            origin TEXT NOT NULL CHECK (origin IN ('import', 'demo')),
            created_at TEXT NOT NULL
        )""",
    "CREATE INDEX studies_patient ON studies(patient_id)",
    """CREATE TABLE images (
            id INTEGER PRIMARY KEY,
            study_id INTEGER NOT NULL REFERENCES studies(id),
            view TEXT CHECK (view IN ('anterior', 'posterior')),
            frame INTEGER NOT NULL DEFAULT 0,  -- page/frame index within the source file
            source TEXT NOT NULL,              -- original file name (no folders)
            format TEXT NOT NULL,              -- tiff | png | jpeg | dicom | phantom
            height INTEGER NOT NULL,
            width INTEGER NOT NULL,
            dtype TEXT NOT NULL,
            pixels BLOB NOT NULL,              -- lossless, see pixelstore.encode_pixels
            pixel_sha256 TEXT NOT NULL UNIQUE, -- of dtype, shape and pixel bytes
            thumbnail BLOB NOT NULL,           -- 8-bit PNG, inverted (NM display)
            display_max REAL NOT NULL,         -- 99.5th percentile: a default upper window
            truth TEXT,                        -- phantom ground truth (JSON findings); NULL for real scans
            created_at TEXT NOT NULL
        )""",
    "CREATE INDEX images_study ON images(study_id)",
    """CREATE TABLE reviews (
            id INTEGER PRIMARY KEY,
            study_id INTEGER NOT NULL REFERENCES studies(id),
            reviewer TEXT NOT NULL,
            created_at TEXT NOT NULL,          -- UTC ISO 8601
            decision TEXT NOT NULL CHECK (decision IN ('include', 'exclude')),
            label TEXT CHECK (label IN ('metastatic', 'non_metastatic')),
            criteria TEXT NOT NULL DEFAULT '', -- criterion ids joined by ';'
            exclusion_reason TEXT,
            artifacts TEXT NOT NULL DEFAULT '',-- artifact ids joined by ';'
            confidence INTEGER CHECK (confidence BETWEEN 1 AND 5),
            note TEXT NOT NULL DEFAULT '',
            adjudication INTEGER NOT NULL DEFAULT 0 CHECK (adjudication IN (0, 1)),  -- the consensus, by an adjudicator
            CHECK ((decision = 'exclude') = (exclusion_reason IS NOT NULL)),
            CHECK (decision = 'exclude' OR label IS NOT NULL)
        )""",
    "CREATE INDEX reviews_study ON reviews(study_id, reviewer, id)",
    """CREATE TABLE reviewers (
            name TEXT PRIMARY KEY,
            adjudicator INTEGER NOT NULL DEFAULT 0 CHECK (adjudicator IN (0, 1)),
            created_at TEXT NOT NULL
        )""",
    """CREATE TABLE flags (                -- 'flag for re-review' (append-only, like reviews)
            id INTEGER PRIMARY KEY,
            study_id INTEGER NOT NULL REFERENCES studies(id),
            reason TEXT NOT NULL,
            flagged_by TEXT NOT NULL,
            created_at TEXT NOT NULL
        )""",
    "CREATE INDEX flags_study ON flags(study_id)",
    # The audit trail: a correction is a new row, never an edit.
    """CREATE TRIGGER reviews_no_update BEFORE UPDATE ON reviews
        BEGIN SELECT RAISE(ABORT, 'reviews are append-only: add a new review instead'); END""",
    """CREATE TRIGGER reviews_no_delete BEFORE DELETE ON reviews
        BEGIN SELECT RAISE(ABORT, 'reviews are append-only: add a new review instead'); END""",
]


def _m002_training(db: sqlite_utils.Database) -> None:
    """Splits, runs (the job queue), epochs, predictions, cached features and Grad-CAM maps."""
    for statement in _TRAINING_SQL:
        db.execute(statement)


_TRAINING_SQL = [
    """CREATE TABLE splits (
            id INTEGER PRIMARY KEY,
            seed INTEGER NOT NULL,
            test_fraction REAL NOT NULL,
            val_fraction REAL NOT NULL,        -- of the non-test part
            labels_hash TEXT NOT NULL,         -- sha256 of the (study, label) pairs it was made from
            created_at TEXT NOT NULL
        )""",
    """CREATE TABLE split_members (
            split_id INTEGER NOT NULL REFERENCES splits(id),
            study_id INTEGER NOT NULL REFERENCES studies(id),
            subset TEXT NOT NULL CHECK (subset IN ('train', 'val', 'test')),
            label TEXT NOT NULL CHECK (label IN ('metastatic', 'non_metastatic')),  -- the label when split
            PRIMARY KEY (split_id, study_id)
        )""",
    """CREATE TABLE runs (
            id INTEGER PRIMARY KEY,
            backbone TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed', 'cancelled', 'interrupted')),
            config TEXT NOT NULL,              -- JSON: every setting, split id, labels hash, versions, device
            config_hash TEXT NOT NULL,         -- of the settings that define the run (duplicate detection)
            split_id INTEGER REFERENCES splits(id),
            created_at TEXT NOT NULL,
            started_at TEXT,
            finished_at TEXT,
            heartbeat_at TEXT,                 -- the worker writes it while the run is alive
            worker_pid INTEGER,
            device TEXT,
            progress TEXT,                     -- JSON: phase, epoch, epochs, batch, batches, loss, metrics, eta_s
            cancel_requested INTEGER NOT NULL DEFAULT 0,
            error TEXT,
            threshold REAL,                    -- chosen on validation
            images_per_second REAL,            -- training throughput over the training epochs
            weights_path TEXT,                 -- relative to the runs/ folder beside the database
            weights_sha256 TEXT
        )""",
    "CREATE INDEX runs_status ON runs(status)",
    """CREATE TABLE epochs (
            run_id INTEGER NOT NULL REFERENCES runs(id),
            epoch INTEGER NOT NULL,            -- 1-based, counted across phases
            phase TEXT NOT NULL,               -- head | finetune | full
            loss REAL, val_loss REAL,
            metrics TEXT NOT NULL DEFAULT '{}',-- JSON: accuracy, auc, val_accuracy, val_auc, ...
            seconds REAL,
            train_images_per_second REAL,
            PRIMARY KEY (run_id, epoch)
        )""",
    """CREATE TABLE predictions (
            run_id INTEGER NOT NULL REFERENCES runs(id),
            image_id INTEGER NOT NULL REFERENCES images(id),
            subset TEXT NOT NULL CHECK (subset IN ('train', 'val', 'test')),
            label INTEGER NOT NULL CHECK (label IN (0, 1)),   -- 1 = metastatic
            probability REAL NOT NULL,
            PRIMARY KEY (run_id, image_id)
        )""",
    """CREATE TABLE features (               -- fast mode: backbone outputs, computed once
            backbone TEXT NOT NULL,
            weights TEXT NOT NULL,             -- 'imagenet', 'none' or the weights file's sha256
            height INTEGER NOT NULL,
            width INTEGER NOT NULL,
            image_id INTEGER NOT NULL REFERENCES images(id),
            vector BLOB NOT NULL,              -- float16 pooled feature vector
            PRIMARY KEY (backbone, weights, height, width, image_id)
        )""",
    """CREATE TABLE explanations (           -- Grad-CAM maps, cached per run and image
            run_id INTEGER NOT NULL REFERENCES runs(id),
            image_id INTEGER NOT NULL REFERENCES images(id),
            heatmap BLOB NOT NULL,             -- encoded like pixels: float16 (h, w) in 0..1
            PRIMARY KEY (run_id, image_id)
        )""",
]


def _m003_accounts(db: sqlite_utils.Database) -> None:
    """Reader accounts and the failed sign-in record (see accounts.py); sign-in off by default."""
    for statement in _ACCOUNTS_SQL:
        db.execute(statement)
    db.execute("INSERT OR IGNORE INTO settings (key, value) VALUES ('sign_in', 'off')")


_ACCOUNTS_SQL = [
    """CREATE TABLE accounts (
            name TEXT PRIMARY KEY COLLATE NOCASE,  -- the reviewer name on this reader's reviews
            password_hash TEXT NOT NULL,       -- scrypt$n$r$p$salt_hex$hash_hex
            roles TEXT NOT NULL,               -- reader, adjudicator, trainer joined by ';'
            disabled INTEGER NOT NULL DEFAULT 0 CHECK (disabled IN (0, 1)),  -- never deleted: reviews name them
            created_at TEXT NOT NULL,
            password_changed_at TEXT NOT NULL
        )""",
    # Keyed by the attempted name, account or not, so the delay does not reveal which names exist.
    """CREATE TABLE sign_in_failures (
            name TEXT PRIMARY KEY COLLATE NOCASE,
            failures INTEGER NOT NULL,         -- consecutive; the row is deleted on success
            locked_until REAL NOT NULL,        -- Unix seconds; attempts before it are refused unchecked
            last_failure_at TEXT NOT NULL
        )""",
]


def _m004_append_only(db: sqlite_utils.Database) -> None:
    """Close the audit trail's gaps: no insert may reuse a review's or flag's id (``INSERT OR
    REPLACE`` deletes the old row without firing a delete trigger), flags become append-only
    like reviews, and a flag records the newest review id when it was raised, so that "answered
    by a later review" means stored later, whatever time an imported review carries."""
    for statement in _APPEND_ONLY_SQL:
        db.execute(statement)


_APPEND_ONLY_SQL = [
    # The newest review id when the flag was raised; a review with a larger id answers the flag.
    "ALTER TABLE flags ADD COLUMN after_review_id INTEGER NOT NULL DEFAULT 0",
    # Flags raised before this migration: the newest review stored by then, by the clock (the
    # only record there is). The triggers below forbid any later update.
    """UPDATE flags SET after_review_id = COALESCE(
            (SELECT MAX(r.id) FROM reviews r WHERE r.created_at <= flags.created_at), 0)""",
    # BEFORE INSERT fires before the conflict resolution, so OR REPLACE never gets to delete.
    """CREATE TRIGGER reviews_no_replace BEFORE INSERT ON reviews
        WHEN EXISTS (SELECT 1 FROM reviews WHERE id = NEW.id)
        BEGIN SELECT RAISE(ABORT, 'reviews are append-only: add a new review instead'); END""",
    """CREATE TRIGGER flags_no_replace BEFORE INSERT ON flags
        WHEN EXISTS (SELECT 1 FROM flags WHERE id = NEW.id)
        BEGIN SELECT RAISE(ABORT, 'flags are append-only: add a new flag instead'); END""",
    """CREATE TRIGGER flags_no_update BEFORE UPDATE ON flags
        BEGIN SELECT RAISE(ABORT, 'flags are append-only: add a new flag instead'); END""",
    """CREATE TRIGGER flags_no_delete BEFORE DELETE ON flags
        BEGIN SELECT RAISE(ABORT, 'flags are append-only: add a new flag instead'); END""",
]


def _m005_sign_in_sessions(db: sqlite_utils.Database) -> None:
    """Per-account session epoch (a password change or disabling ends open sessions) and the
    global failed sign-in window (see accounts.py)."""
    db.execute("ALTER TABLE accounts ADD COLUMN session_epoch INTEGER NOT NULL DEFAULT 0")
    db.execute("""CREATE TABLE sign_in_window (
            id INTEGER PRIMARY KEY CHECK (id = 1),  -- one row: all names together
            started_s REAL NOT NULL,           -- Unix seconds the current window began
            failures INTEGER NOT NULL          -- failed (or still unchecked) attempts in it
        )""")
    db.execute("CREATE INDEX sign_in_failures_by_lock ON sign_in_failures (locked_until)")


def _m006_clipped_pixels(db: sqlite_utils.Database) -> None:
    """images.clipped_pixels: how many negative values the file held (set to zero on import)."""
    db.execute("ALTER TABLE images ADD COLUMN clipped_pixels INTEGER NOT NULL DEFAULT 0")


def _m007_cohorts(db: sqlite_utils.Database) -> None:
    """studies.cohort (every study belongs to one, ``default`` until named; see cohorts.py) and
    splits.cohorts, the JSON list of cohorts a split was made from (earlier splits: ``["default"]``,
    the only cohort there was)."""
    db.execute("ALTER TABLE studies ADD COLUMN cohort TEXT NOT NULL DEFAULT 'default'")
    db.execute("CREATE INDEX studies_cohort ON studies(cohort)")
    db.execute("ALTER TABLE splits ADD COLUMN cohorts TEXT")
    db.execute("""UPDATE splits SET cohorts = '["default"]'""")


# The settings a run's ``config`` held when this migration was written (``runs.TrainConfig``'s
# fields then); a migration keeps its own copy so that later changes to the class cannot change
# what it does to an old database.
_SETTING_NAMES_008 = frozenset({
    "backbone", "weights", "mode", "epochs", "batch_size", "learning_rate", "finetune_learning_rate", "image_size",
    "seed", "split_id", "augment", "view_mode", "threshold_rule", "patience", "dropout", "class_weights",
    "max_train_images",
})


def _m008_run_results(db: sqlite_utils.Database) -> None:
    """Runs keep their results apart from their settings: ``runs.results`` (JSON) takes the
    facts training learned (split, labels hash, sample counts, versions, device, notes, ...)
    that used to be mixed into ``runs.config``, which keeps the settings only."""
    db.execute("ALTER TABLE runs ADD COLUMN results TEXT NOT NULL DEFAULT '{}'")  # JSON: what training learned
    for run_id, config, split_id in db.execute("SELECT id, config, split_id FROM runs").fetchall():
        try:
            data = json.loads(config or "{}")
        except ValueError:
            continue  # not JSON: left as it is (the run cannot be read as settings either way)
        if not isinstance(data, dict):
            continue
        settings = {key: value for key, value in data.items() if key in _SETTING_NAMES_008}
        results = {key: value for key, value in data.items() if key not in _SETTING_NAMES_008}
        if results and split_id is not None:
            results["split_id"] = split_id  # the split it trained on, a result as in runs written since
        db.execute("UPDATE runs SET config = ?, results = ? WHERE id = ?",
                   [json.dumps(settings, sort_keys=True), json.dumps(results, sort_keys=True), run_id])


def _m009_imported_files(db: sqlite_utils.Database) -> None:
    """imported_files: the salted content hash of every file an import stored (or found all
    stored), so a re-run after a kill skips it without decoding (ingest.file_key)."""
    db.execute("""CREATE TABLE imported_files (
            key TEXT PRIMARY KEY,              -- salted SHA-256 of the file's bytes; never a name or path
            study_id INTEGER REFERENCES studies(id),  -- NULL: every frame was stored already
            created_at TEXT NOT NULL
        )""")


def _m010_predictions_v2(db: sqlite_utils.Database) -> None:
    """Predictions for studies a run never saw and for the study as the unit.

    ``predictions`` is rebuilt (SQLite cannot change a CHECK in place): subset ``external``
    joins train/val/test (a run's model applied to studies outside its split; their label is
    NULL when the study has none yet), and ``raw_probability`` keeps the model's output before
    calibration (NULL: the run is not calibrated, ``probability`` is the raw output).
    ``study_predictions`` holds one row per study: the run's study-level probability (the
    aggregate over a per-image run's views, or the one output of a run that sees a study whole).
    """
    for statement in _PREDICTIONS_V2_SQL:
        db.execute(statement)


_PREDICTIONS_V2_SQL = [
    """CREATE TABLE predictions_v2 (
            run_id INTEGER NOT NULL REFERENCES runs(id),
            image_id INTEGER NOT NULL REFERENCES images(id),
            subset TEXT NOT NULL CHECK (subset IN ('train', 'val', 'test', 'external')),
            label INTEGER CHECK (label IN (0, 1)),            -- 1 = metastatic; NULL only for external
            probability REAL NOT NULL,                        -- calibrated when the run is
            raw_probability REAL,                             -- before calibration; NULL: not calibrated
            CHECK (label IS NOT NULL OR subset = 'external'),
            PRIMARY KEY (run_id, image_id)
        )""",
    """INSERT INTO predictions_v2 (run_id, image_id, subset, label, probability)
        SELECT run_id, image_id, subset, label, probability FROM predictions""",
    "DROP TABLE predictions",
    "ALTER TABLE predictions_v2 RENAME TO predictions",
    """CREATE TABLE study_predictions (
            run_id INTEGER NOT NULL REFERENCES runs(id),
            study_id INTEGER NOT NULL REFERENCES studies(id),
            subset TEXT NOT NULL CHECK (subset IN ('train', 'val', 'test', 'external')),
            label INTEGER CHECK (label IN (0, 1)),            -- NULL only for external
            probability REAL NOT NULL,                        -- calibrated when the run is
            raw_probability REAL,                             -- before calibration; NULL: not calibrated
            CHECK (label IS NOT NULL OR subset = 'external'),
            PRIMARY KEY (run_id, study_id)
        )""",
    "CREATE INDEX study_predictions_study ON study_predictions(study_id)",
]


# The tables whose rows decide what the Scans, Review and Agreement pages show (studies, their
# images and patients, reads, readers' roles, flags): any change to them bumps the data version.
DATA_VERSION_TABLES = ("patients", "studies", "images", "reviews", "reviewers", "flags")


def _m011_data_version(db: sqlite_utils.Database) -> None:
    """A counter that every insert, update or delete of :data:`DATA_VERSION_TABLES` bumps (by
    triggers, so no writer can forget it): pages cache what they derive from those tables under
    it and recompute only when it moved, never showing a stale label (:func:`data_version`)."""
    for statement in _DATA_VERSION_SQL:
        db.execute(statement)


_DATA_VERSION_SQL = [
    "CREATE TABLE data_version (id INTEGER PRIMARY KEY CHECK (id = 1), value INTEGER NOT NULL)",
    "INSERT INTO data_version (id, value) VALUES (1, 0)",
    *(f"""CREATE TRIGGER data_version_{table}_{operation.lower()} AFTER {operation} ON {table}
            BEGIN UPDATE data_version SET value = value + 1 WHERE id = 1; END"""
      for table in DATA_VERSION_TABLES for operation in ("INSERT", "UPDATE", "DELETE")),
]


def data_version(db: sqlite_utils.Database) -> int:
    """The data version: it changes whenever a row of :data:`DATA_VERSION_TABLES` changes, in
    the same transaction (one indexed read; a cache keyed by it is never stale)."""
    return int(db.execute("SELECT value FROM data_version WHERE id = 1").fetchone()[0])


def _m012_repeat_groups(db: sqlite_utils.Database) -> None:
    """Runs trained as repeats (``train --repeats K``: K seeds, or K splits) form a group:
    ``runs.repeat_group`` is the id of the group's first run (NULL: a run trained alone).
    A column rather than a setting: it says how runs were queued together, not how one is
    trained, so it stays out of the settings and of their identity hash."""
    db.execute("ALTER TABLE runs ADD COLUMN repeat_group INTEGER REFERENCES runs(id)")
    db.execute("CREATE INDEX runs_repeat_group ON runs(repeat_group)")


def _m013_reviews_by_reader(db: sqlite_utils.Database) -> None:
    """An index of reviews by reader: the Review page asks for one reader's read studies on
    every rerun (``review.read_by``), a scan of every review without it."""
    db.execute("CREATE INDEX reviews_reader ON reviews(reviewer, study_id)")


def _m014_prediction_jobs(db: sqlite_utils.Database) -> None:
    """prediction_jobs: a run's locked model over studies outside its split, queued for the
    worker beside training runs (``prediction.py``): which studies, progress, heartbeat, cancel
    and outcome, with the same statuses as runs."""
    db.execute("""CREATE TABLE prediction_jobs (
            id INTEGER PRIMARY KEY,
            run_id INTEGER NOT NULL REFERENCES runs(id),
            status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed', 'cancelled', 'interrupted')),
            study_ids TEXT NOT NULL,           -- JSON list of the study ids to predict, sorted
            selection TEXT NOT NULL,           -- how they were chosen: cohort NAME, studies, unread
            progress TEXT,                     -- JSON: phase, batch, batches, eta_s
            result TEXT,                       -- JSON: counts when done
            cancel_requested INTEGER NOT NULL DEFAULT 0,
            error TEXT,
            worker_pid INTEGER,
            created_at TEXT NOT NULL,
            started_at TEXT,
            finished_at TEXT,
            heartbeat_at TEXT
        )""")
    db.execute("CREATE INDEX prediction_jobs_status ON prediction_jobs(status)")


def _m015_localisation(db: sqlite_utils.Database) -> None:
    """What Grad-CAM localisation is measured against, and what puts maps on one scale.

    ``lesions``: lesion points, one row per (image, row, col) in the stored image's pixels
    (``source`` ``phantom`` or ``manifest``; see ``lesions.py``). The metastases of phantoms
    stored before this migration are copied from ``images.truth`` (its own copy of that rule,
    so later changes cannot change what it does to an old database).
    ``explanations.probability``: the model's probability (before calibration) from the forward
    pass that made the map, so a cached map can be shown on the shared scale and answer with its
    probability; maps stored before take it from the run's prediction of the image, if any.
    ``explanations.peak_row, peak_col, peak_value``: where the stored map peaks (stored image's
    pixels) and its maximum, so the pointing game reads three numbers, not a map; NULL for maps
    stored before (their readers compute them from the map).
    """
    db.execute("""CREATE TABLE lesions (
            id INTEGER PRIMARY KEY,
            image_id INTEGER NOT NULL REFERENCES images(id),
            row REAL NOT NULL CHECK (row >= 0),       -- stored image's pixels, 0 = top row
            col REAL NOT NULL CHECK (col >= 0),
            source TEXT NOT NULL CHECK (source IN ('phantom', 'manifest')),
            UNIQUE (image_id, row, col)
        )""")
    for image_id, truth in db.execute("SELECT id, truth FROM images WHERE truth IS NOT NULL").fetchall():
        try:
            findings = json.loads(truth)
        except ValueError:
            continue
        for finding in findings if isinstance(findings, list) else []:
            if isinstance(finding, dict) and finding.get("kind") == "metastasis":
                db.execute("INSERT OR IGNORE INTO lesions (image_id, row, col, source) VALUES (?, ?, ?, 'phantom')",
                           [image_id, float(finding["row"]), float(finding["col"])])
    db.execute("ALTER TABLE explanations ADD COLUMN probability REAL")  # before calibration; NULL: not known
    db.execute("ALTER TABLE explanations ADD COLUMN peak_row INTEGER")  # NULL: not computed, or no positive value
    db.execute("ALTER TABLE explanations ADD COLUMN peak_col INTEGER")
    db.execute("ALTER TABLE explanations ADD COLUMN peak_value REAL")  # the stored map's maximum; NULL: not computed
    db.execute("""UPDATE explanations SET probability = (
            SELECT COALESCE(p.raw_probability, p.probability) FROM predictions p
            WHERE p.run_id = explanations.run_id AND p.image_id = explanations.image_id)""")


def _m016_split_grouping(db: sqlite_utils.Database) -> None:
    """What a split's grouping really is. ``patients.identified``: 1 when the patient's identity
    is known (a DICOM PatientID, a manifest ``patient_id``, a demo phantom), 0 when it is not
    (a file without DICOM or manifest: its study is its own patient); NULL for patients stored
    before this migration, whose key (a salted hash) no longer tells, counted as identified.
    ``splits.grouping``: ``patient`` (every study's patient known, so a patient's studies share
    a subset) or ``study`` (some are not: for those the split is by study only); splits made
    before this migration say ``patient``, as they were made and described."""
    db.execute("ALTER TABLE patients ADD COLUMN identified INTEGER CHECK (identified IN (0, 1))")
    db.execute("ALTER TABLE splits ADD COLUMN grouping TEXT NOT NULL DEFAULT 'patient' CHECK (grouping IN ('patient', 'study'))")


def _m017_assisted_reads(db: sqlite_utils.Database) -> None:
    """``reviews.assisted``: 1 when the reader saw a run's opinion of the study (probability and
    Grad-CAM map, ``assist.model_visible``) before saving the review; 0 for every earlier review,
    none of which could have."""
    db.execute("ALTER TABLE reviews ADD COLUMN assisted INTEGER NOT NULL DEFAULT 0 CHECK (assisted IN (0, 1))")


def _m018_evaluation_cache(db: sqlite_utils.Database) -> None:
    """A finished run's assessment, stored once per (run, arguments, inputs) so the Evaluate page's
    first load reads it instead of bootstrapping again (``assessment.stored_evaluation``).
    ``key``: the arguments (threshold, subset, unit, resamples, seed) as JSON; ``stamp``: what the
    result was computed from (the data version and the run's own rows), a row whose stamp no
    longer matches is recomputed and replaced; ``result``: ``EvaluationResult.to_record`` JSON."""
    db.execute("""CREATE TABLE evaluation_cache (
            run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
            key TEXT NOT NULL,
            stamp TEXT NOT NULL,
            result TEXT NOT NULL,
            created_at TEXT NOT NULL,
            PRIMARY KEY (run_id, key)
        )""")


def _m019_day_offsets(db: sqlite_utils.Database) -> None:
    """Intervals between a patient's studies without their dates (``bonescan_core.priors``).
    ``studies.day_offset``: days from the patient's first dated study (0 for that study), NULL
    when the study's date is unknown. ``patients.day_anchor``: the first study's day, sealed by
    a pad that only the patient's original identifier (never stored) gives back, so that an
    earlier study imported later can shift the offsets; NULL while no study of the patient has
    a date. Studies stored before this migration keep NULL: their dates were never kept."""
    db.execute("ALTER TABLE studies ADD COLUMN day_offset INTEGER CHECK (day_offset >= 0)")
    db.execute("ALTER TABLE patients ADD COLUMN day_anchor INTEGER")


MIGRATIONS: list[tuple[str, Callable[[sqlite_utils.Database], None]]] = [
    ("001_foundation", _m001_foundation),
    ("002_training", _m002_training),
    ("003_accounts", _m003_accounts),
    ("004_append_only", _m004_append_only),
    ("005_sign_in_sessions", _m005_sign_in_sessions),
    ("006_clipped_pixels", _m006_clipped_pixels),
    ("007_cohorts", _m007_cohorts),
    ("008_run_results", _m008_run_results),
    ("009_imported_files", _m009_imported_files),
    ("010_predictions_v2", _m010_predictions_v2),
    ("011_data_version", _m011_data_version),
    ("012_repeat_groups", _m012_repeat_groups),
    ("013_reviews_by_reader", _m013_reviews_by_reader),
    ("014_prediction_jobs", _m014_prediction_jobs),
    ("015_localisation", _m015_localisation),
    ("016_split_grouping", _m016_split_grouping),
    ("017_assisted_reads", _m017_assisted_reads),
    ("018_evaluation_cache", _m018_evaluation_cache),
    ("019_day_offsets", _m019_day_offsets),
]


def apply_migrations(db: sqlite_utils.Database) -> list[str]:
    """Apply pending migrations in order, each in its own transaction.

    Returns:
        Names of the migrations applied now (empty when the schema is current).
    """
    db.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
    done = {row[0] for row in db.execute("SELECT name FROM _migrations").fetchall()}
    applied = []
    for name, migration in MIGRATIONS:
        if name in done:
            continue
        with write(db):
            # Another process may have migrated while we waited for the lock.
            if db.execute("SELECT 1 FROM _migrations WHERE name = ?", [name]).fetchone():
                continue
            migration(db)
            db["_migrations"].insert({"name": name, "applied_at": utc_now()})
        applied.append(name)
    return applied


def schema_version(db: sqlite_utils.Database) -> str:
    """Name of the newest applied migration."""
    row = db.execute("SELECT name FROM _migrations ORDER BY name DESC LIMIT 1").fetchone()
    return row[0] if row else ""


def salt(db: sqlite_utils.Database) -> str:
    """This database's secret salt for pseudonymous keys (created with the database)."""
    return db.execute("SELECT value FROM settings WHERE key = 'salt'").fetchone()[0]
