"""Reader accounts and optional sign-in: hashing, roles, throttling, the migration, the
``account`` verb, and the app with sign-in required (AppTest)."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from conftest import REPO, add_bare_studies, run_cli
from streamlit.testing.v1 import AppTest

from bonescan_core import accounts, errors, jobs, runs
from bonescan_core import db as dbm
from bonescan_core import review as rv
from bonescan_core.ingest import add_demo_studies

PASSWORD = "correct horse battery"
DEFAULT_COST = (accounts.SCRYPT_N, accounts.SCRYPT_R, accounts.SCRYPT_P)  # before the fixture below lowers N


@pytest.fixture(autouse=True)
def cheap_hashes(monkeypatch):
    """Hash at N = 2^12 in these tests: the behaviour does not depend on the cost, and at the
    real cost (128 MiB, ~0.3-2 s a hash) the file would take minutes.
    test_the_default_cost_is_owasp_guidance checks the real one."""
    monkeypatch.setattr(accounts, "SCRYPT_N", 2**12)


class Clock:
    """A settable clock for authenticate(now=...)."""

    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# --- hashing ------------------------------------------------------------------------------

def test_hashes_are_salted_record_their_parameters_and_verify():
    first, second = accounts.hash_password(PASSWORD), accounts.hash_password(PASSWORD)
    assert first != second, "a random salt per hash"
    scheme, n, r, p, salt, digest = first.split("$")
    assert (scheme, int(n), int(r), int(p)) == ("scrypt", accounts.SCRYPT_N, 8, 1)
    assert len(bytes.fromhex(salt)) == 16 and len(bytes.fromhex(digest)) == 32
    assert PASSWORD not in first
    assert accounts.verify_password(PASSWORD, first) and accounts.verify_password(PASSWORD, second)
    assert not accounts.verify_password(PASSWORD + "!", first)
    assert not accounts.verify_password("", first)


def test_the_default_cost_is_owasp_guidance(monkeypatch):
    assert DEFAULT_COST == (2**17, 8, 1), "OWASP: scrypt N=2^17, r=8, p=1"
    monkeypatch.setattr(accounts, "SCRYPT_N", DEFAULT_COST[0])
    stored = accounts.hash_password(PASSWORD)  # 128 MiB: more than hashlib's default maxmem of 32 MiB
    assert stored.startswith("scrypt$131072$8$1$") and accounts.verify_password(PASSWORD, stored)


def test_verification_uses_the_parameters_stored_with_the_hash():
    cheap = accounts.hash_password(PASSWORD, n=2**10, r=4, p=2)
    assert cheap.startswith("scrypt$1024$4$2$")
    assert accounts.verify_password(PASSWORD, cheap)
    assert not accounts.verify_password("something else entirely", cheap)
    for broken in ("", "plain", "md5$1$2$3$00$00", cheap.rsplit("$", 1)[0] + "$zz", cheap.rsplit("$", 1)[0] + "$"):
        assert not accounts.verify_password(PASSWORD, broken)


# --- validation ---------------------------------------------------------------------------

def test_roles_are_validated_and_kept_in_catalogue_order():
    assert accounts.validate_roles(["trainer", "reader", "READER "]) == ("reader", "trainer")
    with pytest.raises(accounts.AccountError, match="unknown role admin"):
        accounts.validate_roles(["reader", "admin"])
    with pytest.raises(accounts.AccountError, match="at least one role"):
        accounts.validate_roles([])


def test_add_account_refuses_short_passwords_bad_names_and_taken_names(db):
    with pytest.raises(accounts.AccountError, match="at least 10 characters"):
        accounts.add_account(db, "ann", "short", ["reader"])
    for bad in ("", " ", "ann smith", "-ann", "a" * 65, "ann;drop"):
        with pytest.raises(accounts.AccountError, match="not allowed"):
            accounts.add_account(db, bad, PASSWORD, ["reader"])
    account = accounts.add_account(db, " ann ", PASSWORD, ["reader"])
    assert (account.name, account.roles, account.disabled) == ("ann", ("reader",), False)
    with pytest.raises(accounts.AccountError, match="exists already"):
        accounts.add_account(db, "ANN", PASSWORD, ["trainer"])
    stored = db.execute("SELECT password_hash FROM accounts").fetchall()
    assert len(stored) == 1 and stored[0][0].startswith("scrypt$") and PASSWORD not in stored[0][0]


def test_roles_and_passwords_can_be_changed(db):
    accounts.add_account(db, "ann", PASSWORD, ["reader"])
    assert accounts.set_roles(db, "Ann", ["reader", "trainer"]).roles == ("reader", "trainer")
    accounts.set_password(db, "ann", "another long passphrase")
    clock = Clock()
    with pytest.raises(accounts.SignInFailed):
        accounts.authenticate(db, "ann", PASSWORD, now=clock)
    clock.t += 60
    assert accounts.authenticate(db, "ann", "another long passphrase", now=clock).name == "ann"
    with pytest.raises(accounts.AccountError, match="no account named"):
        accounts.set_roles(db, "nobody", ["reader"])


# --- authentication -----------------------------------------------------------------------

def test_authenticate_accepts_the_right_password_in_any_name_case(db):
    accounts.add_account(db, "ann", PASSWORD, ["reader", "trainer"])
    account = accounts.authenticate(db, "ANN", PASSWORD, now=Clock())
    assert (account.name, account.roles) == ("ann", ("reader", "trainer")), "the stored spelling is the identity"


def test_wrong_password_and_unknown_name_fail_alike(db):
    accounts.add_account(db, "ann", PASSWORD, ["reader"])
    with pytest.raises(accounts.SignInFailed) as wrong_password:
        accounts.authenticate(db, "ann", "not the password", now=Clock())
    with pytest.raises(accounts.SignInFailed) as unknown_name:
        accounts.authenticate(db, "zed", "not the password", now=Clock())
    assert str(wrong_password.value) == str(unknown_name.value)
    assert "Wrong account name or password" in str(unknown_name.value)
    # ... and so does the delay that follows: it is kept per attempted name, account or not.
    with pytest.raises(accounts.SignInFailed) as ann_locked:
        accounts.authenticate(db, "ann", PASSWORD, now=Clock())
    with pytest.raises(accounts.SignInFailed) as zed_locked:
        accounts.authenticate(db, "zed", PASSWORD, now=Clock())
    assert str(ann_locked.value) == str(zed_locked.value)


def test_impossible_names_are_refused_without_being_stored(db):
    for name in ("x" * 5000, "ann smith", "<script>"):
        with pytest.raises(accounts.SignInFailed, match="Wrong account name or password"):
            accounts.authenticate(db, name, PASSWORD, now=Clock())
    with pytest.raises(accounts.SignInFailed, match="Enter your account name and password"):
        accounts.authenticate(db, "ann", "", now=Clock())
    assert db["sign_in_failures"].count == 0


def test_failures_delay_the_next_attempt_doubling_up_to_a_cap(db):
    accounts.add_account(db, "ann", PASSWORD, ["reader"])
    clock = Clock()
    for failures, delay in ((1, 1), (2, 2), (3, 4)):
        with pytest.raises(accounts.SignInFailed, match=f"Wait {delay} s"):
            accounts.authenticate(db, "ann", "guess number one", now=clock)
        # Inside the delay even the right password is refused, unchecked.
        clock.t += delay - 0.01
        with pytest.raises(accounts.SignInFailed, match="Too many failed sign-ins"):
            accounts.authenticate(db, "ann", PASSWORD, now=clock)
        assert db.execute("SELECT failures FROM sign_in_failures").fetchone()[0] == failures, "a refusal is no new failure"
        clock.t += 0.01
    assert accounts.authenticate(db, "ann", PASSWORD, now=clock).name == "ann"
    assert db["sign_in_failures"].count == 0, "success clears the record"
    assert [accounts.delay_after(k) for k in (0, 1, 2, 5, 6, 50)] == [0, 1, 2, 16, 30, 30]


def test_other_names_are_not_delayed(db):
    accounts.add_account(db, "ann", PASSWORD, ["reader"])
    accounts.add_account(db, "bob", PASSWORD, ["reader"])
    clock = Clock()
    with pytest.raises(accounts.SignInFailed):
        accounts.authenticate(db, "ann", "guess number one", now=clock)
    assert accounts.authenticate(db, "bob", PASSWORD, now=clock).name == "bob"


# --- sign-in never blocks writers; throttles and their table are bounded ---------------------

def test_no_transaction_is_open_while_passwords_are_hashed_so_saves_go_through(db_path, monkeypatch):
    """Three threads guess passwords; inside every hash, the hashing thread's connection has
    no transaction open, and a review save from another connection gets the write lock (it
    is given 5 s: the short sign-in writes take milliseconds, but a lock held by the hashing
    thread itself, as before, would never be released while it waits)."""
    with dbm.opened(db_path) as db:
        study = add_bare_studies(db, 1)[0]
        accounts.add_account(db, "ann", PASSWORD, ["reader"])
    real_scrypt = hashlib.scrypt
    attackers: dict[int, object] = {}  # thread id -> that thread's connection
    seen: list[tuple[bool, int]] = []  # (hashing connection in a transaction?, review saved meanwhile)
    problems: list[BaseException] = []

    def watched_scrypt(*args, **kwargs):
        own = attackers.get(threading.get_ident())
        if own is not None:
            in_transaction = own.conn.in_transaction
            saver = dbm.connect(db_path)
            try:
                saver.conn.execute("PRAGMA busy_timeout = 5000")
                saved = rv.add_review(saver, rv.Review(study, f"reader{len(seen)}", "include", "metastatic", ("flare",)))
            finally:
                saver.close()
            seen.append((in_transaction, saved))
        return real_scrypt(*args, **kwargs)

    monkeypatch.setattr(hashlib, "scrypt", watched_scrypt)

    def attack(thread: int) -> None:
        with dbm.opened(db_path) as db:
            attackers[threading.get_ident()] = db
            for attempt in range(3):
                try:
                    accounts.authenticate(db, "ann" if attempt == 0 else f"guess{thread}x{attempt}", "not the password")
                except accounts.SignInFailed:
                    pass
                except BaseException as error:  # noqa: BLE001 - reported below
                    problems.append(error)

    threads = [threading.Thread(target=attack, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert problems == []
    assert len(seen) >= 6 and not any(in_transaction for in_transaction, _ in seen)
    with dbm.opened(db_path) as db:
        assert db["reviews"].count == len(seen), "every save made during a hash was stored"


def test_a_second_attempt_on_a_name_being_checked_is_refused(db_path, monkeypatch):
    """The attempt is recorded before hashing, so a concurrent one cannot slip past the delay."""
    with dbm.opened(db_path) as db:
        accounts.add_account(db, "ann", PASSWORD, ["reader"])
    real_scrypt, rivals = hashlib.scrypt, []

    def scrypt_with_a_rival(*args, **kwargs):
        if not rivals:  # while the first attempt hashes, a second session tries the same name
            with dbm.opened(db_path) as other:
                try:
                    accounts.authenticate(other, "ann", PASSWORD, now=Clock())
                except accounts.SignInFailed as refusal:
                    rivals.append(str(refusal))
                except sqlite3.OperationalError as error:  # the old code: the first attempt held the lock
                    rivals.append(repr(error))
        return real_scrypt(*args, **kwargs)

    monkeypatch.setattr(hashlib, "scrypt", scrypt_with_a_rival)
    with monkeypatch.context() as patch:
        patch.setattr(dbm, "BUSY_TIMEOUT_S", 2.0)
        with dbm.opened(db_path) as db:
            assert accounts.authenticate(db, "ann", PASSWORD, now=Clock()).name == "ann"
            assert db["sign_in_failures"].count == 0, "the success forgot the recorded attempt"
    assert len(rivals) == 1 and rivals[0].startswith("Too many failed sign-ins for this name")


def test_an_old_cheaper_hash_still_verifies_and_is_upgraded_at_sign_in(db):
    accounts.add_account(db, "ann", PASSWORD, ["reader"])
    old = accounts.hash_password(PASSWORD, n=2**10, r=4, p=1)
    with dbm.write(db):
        db.execute("UPDATE accounts SET password_hash = ? WHERE name = 'ann'", [old])
    with pytest.raises(accounts.SignInFailed):
        accounts.authenticate(db, "ann", "not the password", now=Clock())
    assert db.execute("SELECT password_hash FROM accounts").fetchone()[0] == old, "a wrong password changes nothing"
    assert accounts.authenticate(db, "ann", PASSWORD, now=Clock(2_000_000.0)).name == "ann"
    stored = db.execute("SELECT password_hash FROM accounts").fetchone()[0]
    assert stored != old and stored.startswith(f"scrypt${accounts.SCRYPT_N}$8$1$")
    assert accounts.authenticate(db, "ann", PASSWORD, now=Clock(3_000_000.0)).name == "ann"


def test_the_failures_table_stays_bounded(db, monkeypatch):
    monkeypatch.setattr(accounts, "MAX_FAILURE_ROWS", 10)
    clock = Clock()
    for i in range(40):
        clock.t += 60  # a minute apart: the global cap is not what stops them here
        with pytest.raises(accounts.SignInFailed, match="Wrong account name or password"):
            accounts.authenticate(db, f"guess{i}", "not the password", now=clock)
        assert db["sign_in_failures"].count <= 10
    kept = {row[0] for row in db.execute("SELECT name FROM sign_in_failures")}
    assert kept == {f"guess{i}" for i in range(30, 40)}, "the most recent names are kept"
    clock.t += accounts.FORGET_AFTER_S + 60
    with pytest.raises(accounts.SignInFailed):
        accounts.authenticate(db, "latest", "not the password", now=clock)
    assert [row[0] for row in db.execute("SELECT name FROM sign_in_failures")] == ["latest"], "a day later, forgotten"


def test_a_global_cap_stops_guessing_across_many_names_without_hashing(db, monkeypatch):
    accounts.add_account(db, "ann", PASSWORD, ["reader"])
    monkeypatch.setattr(accounts, "GLOBAL_MAX_FAILURES", 5)
    clock = Clock()
    for _ in range(8):  # successes do not count towards the cap
        assert accounts.authenticate(db, "ann", PASSWORD, now=clock).name == "ann"
    for i in range(5):
        with pytest.raises(accounts.SignInFailed, match="Wrong account name or password"):
            accounts.authenticate(db, f"guess{i}", "not the password", now=clock)
    real_scrypt, hashes = hashlib.scrypt, []
    monkeypatch.setattr(hashlib, "scrypt", lambda *args, **kwargs: hashes.append(1) or real_scrypt(*args, **kwargs))
    clock.t += accounts.GLOBAL_WINDOW_S - 1
    with pytest.raises(accounts.SignInFailed, match="Too many failed sign-ins on this bonescan: wait 1 s"):
        accounts.authenticate(db, "ann", PASSWORD, now=clock)
    assert hashes == [], "refused without hashing"
    clock.t += 1
    assert accounts.authenticate(db, "ann", PASSWORD, now=clock).name == "ann"


# --- sessions -----------------------------------------------------------------------------

def test_a_password_change_or_disabling_ends_sessions_but_a_role_change_does_not(db):
    accounts.add_account(db, "ann", PASSWORD, ["reader"])
    accounts.add_account(db, "bob", PASSWORD, ["reader"])
    epoch = accounts.authenticate(db, "ann", PASSWORD, now=Clock()).session_epoch
    assert accounts.session_account(db, "ann", epoch).roles == ("reader",)
    accounts.set_roles(db, "ann", ["reader", "trainer"])  # roles are re-read on every action instead
    assert accounts.session_account(db, "ann", epoch).roles == ("reader", "trainer")
    accounts.set_password(db, "ann", "another long passphrase")
    assert accounts.session_account(db, "ann", epoch) is None
    epoch = accounts.get_account(db, "ann").session_epoch
    accounts.set_disabled(db, "ann")
    assert accounts.session_account(db, "ann", epoch) is None
    accounts.set_disabled(db, "ann", False)
    assert accounts.session_account(db, "ann", epoch) is None, "disabled and enabled again: still ended"
    assert accounts.session_account(db, "ann", accounts.get_account(db, "ann").session_epoch) is not None
    assert accounts.session_account(db, "zed", 0) is None


def test_the_idle_limit_is_configurable():
    assert accounts.idle_limit_s({}) == 30 * 60
    assert accounts.idle_limit_s({"BONESCAN_SESSION_IDLE_MINUTES": " 5 "}) == 300
    assert accounts.idle_limit_s({"BONESCAN_SESSION_IDLE_MINUTES": "0.5"}) == 30
    for bad in ("0", "-1", "soon", "nan", "inf"):
        with pytest.raises(errors.InputError, match="BONESCAN_SESSION_IDLE_MINUTES"):
            accounts.idle_limit_s({"BONESCAN_SESSION_IDLE_MINUTES": bad})
    assert accounts.session_expired(0.0, 1801.0, 1800.0) and not accounts.session_expired(0.0, 1800.0, 1800.0)


def test_disabled_account_is_refused_until_enabled(db):
    accounts.add_account(db, "ann", PASSWORD, ["reader"])
    accounts.set_disabled(db, "ann")
    with pytest.raises(accounts.SignInFailed, match="disabled"):
        accounts.authenticate(db, "ann", PASSWORD, now=Clock())
    with pytest.raises(accounts.SignInFailed, match="Wrong account name or password"):
        accounts.authenticate(db, "ann", "not the password", now=Clock(2_000_000.0))  # says nothing without the password
    accounts.set_disabled(db, "ann", False)
    assert accounts.authenticate(db, "ann", PASSWORD, now=Clock(3_000_000.0)).name == "ann"


# --- the setting and permissions ----------------------------------------------------------

def test_sign_in_is_off_by_default_and_needs_an_enabled_account(db):
    assert not accounts.sign_in_required(db)
    with pytest.raises(accounts.AccountError, match="no enabled account"):
        accounts.set_sign_in(db, True)
    accounts.add_account(db, "ann", PASSWORD, ["reader"])
    accounts.set_sign_in(db, True)
    assert accounts.sign_in_required(db)
    with pytest.raises(accounts.AccountError, match="last enabled account"):
        accounts.set_disabled(db, "ann")
    accounts.set_sign_in(db, False)
    assert not accounts.sign_in_required(db)
    accounts.set_disabled(db, "ann")  # allowed with sign-in off


def test_permissions_follow_roles_only_with_sign_in_on():
    reader = accounts.Account("ann", ("reader",), False, "")
    trainer = accounts.Account("tom", ("trainer",), False, "")
    judge = accounts.Account("jo", ("adjudicator",), False, "")
    for action in accounts.ACTIONS:
        assert accounts.permits(None, action, sign_in=False)
        assert not accounts.permits(None, action, sign_in=True)
    assert accounts.permits(reader, "label", sign_in=True) and not accounts.permits(reader, "train", sign_in=True)
    assert not accounts.permits(reader, "adjudicate", sign_in=True)
    assert accounts.permits(trainer, "train", sign_in=True) and not accounts.permits(trainer, "label", sign_in=True)
    assert accounts.permits(judge, "label", sign_in=True) and accounts.permits(judge, "adjudicate", sign_in=True)
    assert accounts.denial("train", reader) == ("Training needs the trainer role; ask an administrator: "
                                                "bonescan account roles ann --role reader --role trainer")
    with pytest.raises(errors.PermissionDenied, match="trainer role"):
        accounts.require(reader, "train", sign_in=True)


def test_importing_needs_the_importer_role_and_flagging_a_reading_role():
    importer = accounts.Account("ida", ("importer",), False, "")
    for roles in (("reader",), ("adjudicator",), ("trainer",)):
        account = accounts.Account("ann", roles, False, "")
        assert accounts.permits(account, "flag", sign_in=True) and not accounts.permits(account, "import", sign_in=True)
    assert accounts.permits(importer, "import", sign_in=True)
    assert not any(accounts.permits(importer, action, sign_in=True) for action in ("label", "adjudicate", "train", "flag"))
    assert accounts.permits(None, "import", sign_in=False) and accounts.permits(None, "flag", sign_in=False)
    reader = accounts.Account("ann", ("reader",), False, "")
    assert accounts.denial("import", reader) == ("Importing scans needs the importer role; ask an administrator: "
                                                 "bonescan account roles ann --role reader --role importer")


def test_a_session_permits_by_its_account_never_by_a_typed_name(db):
    accounts.add_account(db, "ann", PASSWORD, ["reader"])
    assert accounts.session_permits(db, None, "label"), "sign-in off: everything, as before accounts"
    accounts.set_sign_in(db, True)
    assert not accounts.session_permits(db, None, "label"), "not signed in: nothing, whatever name was typed"
    epoch = accounts.get_account(db, "ann").session_epoch
    assert accounts.session_permits(db, ("ann", epoch), "label")
    assert not accounts.session_permits(db, ("ann", epoch), "import")
    assert not accounts.session_permits(db, ("ann", epoch + 1), "label"), "a session from an older password"


def test_with_sign_in_on_adjudicators_are_the_accounts_with_the_role(db, studies):
    rv.set_adjudicator(db, "ann")  # the sign-in-off list, which anyone may edit in the app
    accounts.add_account(db, "ann", PASSWORD, ["reader"])
    accounts.add_account(db, "jo", PASSWORD, ["adjudicator"])
    assert rv.is_adjudicator(db, "ann") and rv.adjudicators(db) == ["ann"]
    accounts.set_sign_in(db, True)
    assert not rv.is_adjudicator(db, "ann") and rv.is_adjudicator(db, "jo") and rv.adjudicators(db) == ["jo"]
    consensus = rv.Review(studies[0], "ann", "include", "metastatic", ("flare",), adjudication=True)
    with pytest.raises(rv.ReviewError, match="adjudicator role"):
        rv.add_review(db, consensus)
    rv.add_review(db, rv.Review(studies[0], "jo", "include", "metastatic", ("flare",), adjudication=True))
    assert rv.study_statuses(db, [studies[0]])[studies[0]].adjudicated == "metastatic"


# --- migration ----------------------------------------------------------------------------

def test_migration_upgrades_an_existing_database_keeping_its_rows(tmp_path, monkeypatch):
    path = tmp_path / "old.db"
    with monkeypatch.context() as patch:
        patch.setattr(dbm, "MIGRATIONS", [m for m in dbm.MIGRATIONS if m[0] < "003"])
        with dbm.opened(path) as old:
            assert "accounts" not in old.table_names()
            ids = add_bare_studies(old, 3)
            with dbm.write(old):  # a review as the code of that time wrote it (later columns did not exist)
                old["reviews"].insert({"study_id": ids[0], "reviewer": "ann", "created_at": dbm.utc_now(),
                                       "decision": "include", "label": "metastatic", "criteria": "flare"})
            salt = dbm.salt(old)
    with dbm.opened(path) as db:
        assert "003_accounts" in {row[0] for row in db.execute("SELECT name FROM _migrations")}
        assert {"accounts", "sign_in_failures"} <= set(db.table_names())
        assert db["studies"].count == 3 and db["reviews"].count == 1 and dbm.salt(db) == salt
        assert not accounts.sign_in_required(db)
        assert dbm.apply_migrations(db) == []


# --- the command line ---------------------------------------------------------------------

def run_cli_with_input(stdin: str, *args: str, db_path) -> subprocess.CompletedProcess[str]:
    """Like conftest.run_cli, with ``stdin`` piped in (for --password-stdin)."""
    return subprocess.run([sys.executable, "-m", "bonescan_core", "--db", str(db_path), *args], input=stdin,
                          capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def add_by_cli(db_path, name, *roles, password=PASSWORD):
    return run_cli_with_input(password + "\n", "account", "add", name, *[f"--role={role}" for role in roles],
                              "--password-stdin", db_path=db_path)


def test_cli_add_list_and_sign_in_on_off(db_path):
    refused = run_cli("account", "sign-in", "on", db_path=db_path)
    assert refused.returncode == 2 and "bonescan account add" in refused.stderr
    assert add_by_cli(db_path, "ann", "reader", "trainer").returncode == 0
    short = add_by_cli(db_path, "bob", "reader", password="short")
    assert short.returncode == 2 and "at least 10 characters" in short.stderr
    assert add_by_cli(db_path, "bob", "boss").returncode == 2
    listed = run_cli("account", "list", "--json", db_path=db_path)
    assert listed.returncode == 0
    assert json.loads(listed.stdout) == [{"name": "ann", "roles": ["reader", "trainer"], "disabled": False,
                                          "created_at": json.loads(listed.stdout)[0]["created_at"]}]
    assert run_cli("account", "sign-in", db_path=db_path).stdout.strip() == "off"
    assert run_cli("account", "sign-in", "on", db_path=db_path).returncode == 0
    assert run_cli("account", "sign-in", db_path=db_path).stdout.strip() == "on"
    with dbm.opened(db_path) as db:
        assert accounts.sign_in_required(db)
        assert accounts.authenticate(db, "ann", PASSWORD, now=Clock()).roles == ("reader", "trainer")
    assert run_cli("account", "roles", "ann", "--role", "adjudicator", db_path=db_path).returncode == 0
    assert run_cli("account", "sign-in", "off", db_path=db_path).returncode == 0
    with dbm.opened(db_path) as db:
        assert not accounts.sign_in_required(db)
        assert accounts.get_account(db, "ann").roles == ("adjudicator",)


def test_cli_passwd_and_disable(db_path):
    assert add_by_cli(db_path, "ann", "reader").returncode == 0
    changed = run_cli_with_input("a brand new passphrase\n", "account", "passwd", "ann", "--password-stdin",
                                 db_path=db_path)
    assert changed.returncode == 0, changed.stderr
    assert run_cli("account", "disable", "ann", db_path=db_path).returncode == 0
    with dbm.opened(db_path) as db:
        with pytest.raises(accounts.SignInFailed, match="disabled"):
            accounts.authenticate(db, "ann", "a brand new passphrase", now=Clock())
    no_terminal = run_cli("account", "passwd", "ann", db_path=db_path)  # stdin is not a terminal here
    assert no_terminal.returncode == 2 and "--password-stdin" in no_terminal.stderr


def test_cli_accepts_the_importer_role(db_path):
    assert add_by_cli(db_path, "ida", "importer").returncode == 0
    changed = run_cli("account", "roles", "ida", "--role", "importer", "--role", "reader", db_path=db_path)
    assert changed.returncode == 0, changed.stderr
    with dbm.opened(db_path) as db:
        assert accounts.get_account(db, "ida").roles == ("reader", "importer")
    assert "importer" in run_cli("account", "add", "--help", db_path=db_path).stdout


def test_account_verb_imports_no_heavy_library(db_path):
    code = (
        "import sys, io, contextlib\n"
        "from bonescan_core.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        f"    assert main(['--db', {str(db_path)!r}, 'account', 'list', '--json']) == 0\n"
        "print([m for m in ('tensorflow', 'keras', 'streamlit', 'torch', 'jax', 'pandas') if sys.modules.get(m)])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert result.stdout.strip() == "[]"


# --- the app with sign-in required --------------------------------------------------------

TIMEOUT = 60


def signed_in_db(db_path, **roles_by_name):
    with dbm.opened(db_path) as db:
        for name, roles in roles_by_name.items():
            accounts.add_account(db, name, PASSWORD, roles)
        accounts.set_sign_in(db, True)


def open_app(page: str | None = None, reviewer: str | None = None) -> AppTest:
    app = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=TIMEOUT)
    if reviewer:
        app.query_params["reviewer"] = reviewer
    app.run()
    if page:
        app.switch_page(page).run()
    return app


def sign_in(app: AppTest, name: str, password: str = PASSWORD) -> AppTest:
    app.text_input(key="si_name").input(name)
    app.text_input(key="si_password").input(password)
    next(b for b in app.get("form_submit_button") if b.label == "Sign in").click()
    return app.run()


def test_review_page_shows_only_the_sign_in_form_until_signed_in(db_path):
    with dbm.opened(db_path) as db:
        add_demo_studies(db, 2, seed=5)
    signed_in_db(db_path, ann=["reader"])
    app = open_app("app_pages/review.py", reviewer="mallory")
    assert not app.exception, [e.value for e in app.exception]
    assert [t.value for t in app.title] == ["Sign in"]
    assert "rv_study" not in app.session_state and not [b for b in app.button if b.key == "rv_metastatic"]
    assert not [t for t in app.text_input if t.key == "reviewer_input"], "no free name box"
    sign_in(app, "ann", "not the password")
    assert any("Wrong account name or password" in e.value for e in app.error)
    assert "rv_study" not in app.session_state
    assert app.text_input(key="si_password").value == "", "the password is not kept in the session"


def test_signed_in_reader_labels_under_the_account_name(db_path):
    with dbm.opened(db_path) as db:
        add_demo_studies(db, 3, seed=6)
    signed_in_db(db_path, ann=["reader"])
    app = open_app(reviewer="mallory")  # ?reviewer= is ignored with sign-in on
    sign_in(app, "ann")
    assert not app.exception, [e.value for e in app.exception]
    assert any("Signed in as **ann** (reader)" in m.value for m in app.sidebar.markdown)
    app.switch_page("app_pages/review.py").run()
    first = app.session_state["rv_study"]
    app.checkbox(key=f"rv_{first}_typical_pattern").check()
    app.button(key="rv_metastatic").click().run()
    assert not app.exception, [e.value for e in app.exception]
    with dbm.opened(db_path) as db:
        readers = [row["reviewer"] for row in rv.history(db, first) if row["reviewer"] != "reference"]
    assert readers == ["ann"]
    app.button(key="sign_out").click().run()
    assert [t.value for t in app.title] == ["Sign in"]


def test_a_disabled_account_is_signed_out_at_the_next_rerun(db_path):
    signed_in_db(db_path, ann=["reader"], bob=["reader"])
    app = open_app()
    sign_in(app, "ann")
    assert [t.value for t in app.title] != ["Sign in"]
    with dbm.opened(db_path) as db:
        accounts.set_disabled(db, "ann")
    app.run()
    assert [t.value for t in app.title] == ["Sign in"]


def fill_train_form(app: AppTest):
    app.multiselect(key="tr_backbones").set_value(["vgg19"])
    app.radio(key="tr_weights").set_value("none")
    app.selectbox(key="tr_mode").set_value("full")
    return next(b for b in app.get("form_submit_button") if b.label == "Train")


def test_reader_without_trainer_role_cannot_enqueue(db_path, monkeypatch):
    monkeypatch.setenv("BONESCAN_AUTOSTART_WORKER", "0")
    with dbm.opened(db_path) as db:
        add_demo_studies(db, 12, seed=4)
    signed_in_db(db_path, ann=["reader"])
    app = open_app()
    sign_in(app, "ann")
    app.switch_page("app_pages/train.py").run()
    assert not app.exception, [e.value for e in app.exception]
    assert any("Training needs the trainer role; ask an administrator: bonescan account roles ann "
               "--role reader --role trainer" in w.value for w in app.warning)
    assert fill_train_form(app).disabled
    with dbm.opened(db_path) as db:
        assert runs.list_runs(db) == []


def test_a_trainer_role_taken_away_counts_at_once(db_path, monkeypatch):
    monkeypatch.setenv("BONESCAN_AUTOSTART_WORKER", "0")
    with dbm.opened(db_path) as db:
        add_demo_studies(db, 12, seed=4)
    signed_in_db(db_path, tom=["reader", "trainer"])
    app = open_app()
    sign_in(app, "tom")
    app.switch_page("app_pages/train.py").run()
    assert not any("trainer role" in w.value for w in app.warning)
    submit = fill_train_form(app)
    assert not submit.disabled
    with dbm.opened(db_path) as db:  # an administrator takes the role away while the page is open
        accounts.set_roles(db, "tom", ["reader"])
    submit.click()
    app.run()
    # The rerun re-reads the roles: the button is disabled, and Streamlit drops its click.
    assert any("Training needs the trainer role" in w.value for w in app.warning)
    assert fill_train_form(app).disabled
    with dbm.opened(db_path) as db:
        assert runs.list_runs(db) == []
        accounts.set_roles(db, "tom", ["reader", "trainer"])
    app.run()
    fill_train_form(app).click()
    app.run()
    assert not app.exception, [e.value for e in app.exception]
    with dbm.opened(db_path) as db:
        assert [run.backbone for run in runs.list_runs(db)] == ["vgg19"]


def test_a_reader_role_taken_away_stops_the_next_save(db_path):
    with dbm.opened(db_path) as db:
        add_demo_studies(db, 2, seed=7)
    signed_in_db(db_path, ann=["reader"])
    app = open_app()
    sign_in(app, "ann")
    app.switch_page("app_pages/review.py").run()
    first = app.session_state["rv_study"]
    app.checkbox(key=f"rv_{first}_typical_pattern").check()
    with dbm.opened(db_path) as db:
        accounts.set_roles(db, "ann", ["trainer"])
    app.button(key="rv_metastatic").click().run()
    assert not app.exception, [e.value for e in app.exception]
    assert any("Labelling needs the reader role" in w.value for w in app.warning)
    with dbm.opened(db_path) as db:
        assert [row["reviewer"] for row in rv.history(db, first) if row["reviewer"] == "ann"] == []


def test_adjudicator_role_shows_the_consensus_box_and_agreement_hides_the_name_editor(db_path):
    with dbm.opened(db_path) as db:
        add_demo_studies(db, 2, seed=8)
        rv.set_adjudicator(db, "ann")  # from before sign-in: no longer counts
    signed_in_db(db_path, ann=["reader"], jo=["adjudicator"])
    app = open_app()
    sign_in(app, "ann")
    app.switch_page("app_pages/review.py").run()
    first = app.session_state["rv_study"]
    assert not [c for c in app.checkbox if c.key == f"rv_{first}_adjudication"]
    app.switch_page("app_pages/agreement.py").run()
    assert not app.exception, [e.value for e in app.exception]
    assert not [b for b in app.button if b.key in ("ag_make", "ag_remove")], "roles are set with the CLI only"
    assert any("jo" == m.value for m in app.markdown)

    app = open_app()
    sign_in(app, "jo")
    app.switch_page("app_pages/review.py").run()
    first = app.session_state["rv_study"]
    app.checkbox(key=f"rv_{first}_adjudication").check()
    app.checkbox(key=f"rv_{first}_flare").check()
    app.button(key="rv_metastatic").click().run()
    assert not app.exception, [e.value for e in app.exception]
    with dbm.opened(db_path) as db:
        consensus = [row for row in rv.history(db, first) if row["adjudication"]]
    assert [(row["reviewer"], row["label"]) for row in consensus] == [("jo", "metastatic")]


def test_a_session_open_from_before_sign_in_cannot_save_under_its_typed_name(db_path):
    """The reported case: a Review page opened with sign-in off, the name 'ann' typed; an
    administrator then creates the account ann and turns sign-in on. The page's next click
    (a callback, which runs before the router's gate) must not store a review as ann."""
    with dbm.opened(db_path) as db:
        add_demo_studies(db, 2, seed=9)
        rv.set_adjudicator(db, "ann")
    app = open_app("app_pages/review.py", reviewer="ann")
    first = app.session_state["rv_study"]
    app.checkbox(key=f"rv_{first}_adjudication").check()
    app.checkbox(key=f"rv_{first}_flare").check()
    signed_in_db(db_path, ann=["reader", "adjudicator"])
    app.button(key="rv_metastatic").click().run()
    assert not app.exception, [e.value for e in app.exception]
    assert [t.value for t in app.title] == ["Sign in"]
    with dbm.opened(db_path) as db:
        assert [row for row in rv.history(db, first) if row["reviewer"] == "ann"] == []
    sign_in(app, "ann")
    assert [t.value for t in app.title] == ["Review"]
    assert not [e.value for e in app.error], "no stale refusal from before the sign-in"


def test_changing_the_password_ends_open_sessions(db_path):
    signed_in_db(db_path, ann=["reader"], bob=["reader"])
    ann, bob = sign_in(open_app(), "ann"), sign_in(open_app(), "bob")
    with dbm.opened(db_path) as db:
        accounts.set_password(db, "ann", "a brand new passphrase")
    ann.run()
    bob.run()
    assert [t.value for t in ann.title] == ["Sign in"]
    assert any("password was changed" in i.value for i in ann.info)
    assert [t.value for t in bob.title] != ["Sign in"], "other accounts' sessions go on"
    sign_in(ann, "ann", "a brand new passphrase")
    assert [t.value for t in ann.title] != ["Sign in"]


def test_disabling_and_enabling_between_two_reruns_still_ends_the_session(db_path):
    signed_in_db(db_path, ann=["reader"], bob=["reader"])
    app = sign_in(open_app(), "ann")
    with dbm.opened(db_path) as db:
        accounts.set_disabled(db, "ann")
        accounts.set_disabled(db, "ann", False)
    app.run()
    assert [t.value for t in app.title] == ["Sign in"]


def test_an_idle_session_ends(db_path, monkeypatch):
    monkeypatch.setenv("BONESCAN_SESSION_IDLE_MINUTES", "10")
    signed_in_db(db_path, ann=["reader"])
    app = sign_in(open_app(), "ann")
    ticket = app.session_state["signed_in_session"]
    app.session_state["signed_in_session"] = {**ticket, "last_active": time.time() - 9 * 60}
    app.run()
    assert [t.value for t in app.title] != ["Sign in"], "9 minutes idle: still signed in"
    assert app.session_state["signed_in_session"]["last_active"] > time.time() - 60, "a rerun is activity"
    app.session_state["signed_in_session"] = {**ticket, "last_active": time.time() - 11 * 60}
    app.run()
    assert [t.value for t in app.title] == ["Sign in"]
    assert any("10 minutes without activity" in i.value for i in app.info)


def test_the_cancel_callback_rechecks_the_session(db_path, monkeypatch):
    monkeypatch.setenv("BONESCAN_AUTOSTART_WORKER", "0")
    signed_in_db(db_path, tom=["trainer"])
    with dbm.opened(db_path) as db:
        run_id = jobs.enqueue(db, "vgg19", {"backbone": "vgg19", "mode": "full", "epochs": 1}, "a queued run")
    app = sign_in(open_app(), "tom")
    app.switch_page("app_pages/train.py").run()
    cancel = app.button(key=f"tr_cancel_{run_id}")
    with dbm.opened(db_path) as db:  # someone learnt tom's password; the administrator changes it
        accounts.set_password(db, "tom", "a brand new passphrase")
    cancel.click().run()
    assert not app.exception, [e.value for e in app.exception]
    assert [t.value for t in app.title] == ["Sign in"]
    with dbm.opened(db_path) as db:
        assert runs.get(db, run_id).status == "queued"


def test_importing_needs_the_importer_role_in_the_app(db_path):
    signed_in_db(db_path, ann=["reader"], ida=["importer"])
    app = sign_in(open_app(), "ann")
    assert any("Importing scans needs the importer role" in w.value for w in app.warning)
    assert app.button(key="load_demo").disabled and app.button(key="import_folder_button").disabled
    app = sign_in(open_app(), "ida")
    assert not any("importer role" in w.value for w in app.warning)
    app.number_input(key="demo_studies").set_value(10)
    load = app.button(key="load_demo")
    with dbm.opened(db_path) as db:  # the role is taken away while the page is open
        accounts.set_roles(db, "ida", ["reader"])
    load.click().run()
    assert not app.exception, [e.value for e in app.exception]
    with dbm.opened(db_path) as db:
        assert db["studies"].count == 0
        accounts.set_roles(db, "ida", ["importer"])
    app.run()
    app.button(key="load_demo").click().run()
    with dbm.opened(db_path) as db:
        assert db["studies"].count == 10


def done_run_with_predictions(db_path) -> int:
    """A finished run over 6 demo studies, every image predicted in the test subset (no model:
    Grad-CAM says it is unavailable, which the explorer shows and carries on)."""
    with dbm.opened(db_path) as db:
        add_demo_studies(db, 6, seed=12)
        with dbm.write(db):
            run = db["runs"].insert({"backbone": "vgg19", "status": "done", "config": "{}", "config_hash": "x",
                                     "created_at": dbm.utc_now(), "threshold": 0.5}).last_pk
            for number, (image,) in enumerate(db.execute("SELECT id FROM images ORDER BY id").fetchall()):
                db["predictions"].insert({"run_id": run, "image_id": image, "subset": "test", "label": number % 2,
                                          "probability": (number % 5) / 5 + 0.1})
    return run


def test_flagging_for_re_review_needs_a_reading_role(db_path):
    done_run_with_predictions(db_path)
    signed_in_db(db_path, ida=["importer"], bob=["reader"])
    app = sign_in(open_app(), "ida")
    app.switch_page("app_pages/evaluate.py").run()
    assert not app.exception, [e.value for e in app.exception]
    flag = next(b for b in app.button if b.key.startswith("ex_flag_"))
    assert flag.disabled
    assert any("Flagging a study for re-review needs the reader role" in c.value for c in app.caption)
    app = sign_in(open_app(), "bob")
    app.switch_page("app_pages/evaluate.py").run()
    next(b for b in app.button if b.key.startswith("ex_flag_")).click().run()
    assert not app.exception, [e.value for e in app.exception]
    with dbm.opened(db_path) as db:
        flags = [(row["flagged_by"], row["reason"]) for row in db["flags"].rows]
    assert flags == [("bob", rv.BLIND_FLAG_REASON)]  # no outcome, no probability for a reader reading blind


def test_a_mistyped_idle_limit_is_said_not_ignored(db_path, monkeypatch):
    signed_in_db(db_path, ann=["reader"])
    app = sign_in(open_app(), "ann")
    monkeypatch.setenv("BONESCAN_SESSION_IDLE_MINUTES", "half an hour")
    app.run()
    assert not app.exception, [e.value for e in app.exception]
    assert any("BONESCAN_SESSION_IDLE_MINUTES" in e.value for e in app.error)
    assert [t.value for t in app.title] == [], "no page is shown"
