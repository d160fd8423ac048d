"""Reader accounts and optional sign-in: password hashing, roles, throttled authentication.

Off by default (a single-user workstation needs none of it). When the ``sign_in`` setting is
``required`` (``bonescan account sign-in on``), the app asks every visitor to sign in, and
reviews carry the account name instead of a typed one.

Passwords are hashed with scrypt at OWASP's current guidance (N = 2^17, r = 8, p = 1:
128 MiB and a few hundred ms per hash), a random 16-byte salt per password, and the cost
parameters stored with the hash (``scrypt$n$r$p$salt_hex$hash_hex``), so older, cheaper
hashes keep verifying (and are re-hashed at the current cost on their next sign-in).
Comparison is constant-time. At most :data:`CONCURRENT_HASHES` hashes run at once in one
process, which bounds the memory unauthenticated visitors can make the server use.

Sign-in never hashes inside a write transaction (a hash takes far longer than any write,
and writers such as review saves and worker heartbeats must not wait for it): one short
write checks the throttles and records the attempt as a failure in advance, the password
is checked with no transaction open, and a second short write forgets the failure on
success. Recording first means two concurrent attempts on one name cannot both slip past
its delay.

Throttles, both stored in the database rather than slept out (so parallel sessions cannot
wait them out together, and no server thread sleeps); the clock is a parameter, so tests
need not wait:

* per attempted name, whether or not an account of that name exists (so the delay does
  not tell which names exist): after the k-th consecutive failure the name is refused for
  ``min(2 ** (k - 1), 30)`` seconds, without checking the password;
* globally: after :data:`GLOBAL_MAX_FAILURES` failed attempts within a
  :data:`GLOBAL_WINDOW_S` window, every attempt is refused until the window ends (this
  bounds the hashing an attacker cycling through many names can cause).

The failures table is pruned to :data:`MAX_FAILURE_ROWS` rows (oldest locks first) and rows
idle for a day, so guessed names cannot fill the disk.

Sessions (the app's, see ``app_pages/common.py``): each account has a ``session_epoch``
that changing its password or disabling (or enabling) it increments; a session remembers the
epoch it signed in with and ends when that no longer matches (:func:`session_account`).
Sessions also end after :func:`idle_limit_s` without activity.

Roles: ``reader`` (labels studies, flags them for re-review), ``adjudicator`` (labels, and
records the consensus), ``trainer`` (enqueues and cancels training runs, flags studies from
the evaluation), ``importer`` (imports and uploads scans, loads the demo dataset). The
command line is not checked: whoever can run ``bonescan`` can open the database file
directly.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from bonescan_core import db as dbm
from bonescan_core import errors
from bonescan_core.heavy import sqlite_utils

ROLES: dict[str, str] = {
    "reader": "labels studies and flags them for re-review",
    "adjudicator": "labels studies and records the consensus of disagreeing readers",
    "trainer": "enqueues and cancels training runs, and flags studies for re-review from an evaluation",
    "importer": "imports and uploads scans, and loads the demo dataset",
}
# What each action needs (any one of the roles listed).
ACTIONS: dict[str, frozenset[str]] = {
    "label": frozenset({"reader", "adjudicator"}),
    "adjudicate": frozenset({"adjudicator"}),
    "train": frozenset({"trainer"}),
    "import": frozenset({"importer"}),
    "flag": frozenset({"reader", "adjudicator", "trainer"}),
}
# The role a denial suggests for each action, and how it names the action.
_SUGGESTED = {"label": ("reader", "Labelling"), "adjudicate": ("adjudicator", "Recording the consensus"),
              "train": ("trainer", "Training"), "import": ("importer", "Importing scans"),
              "flag": ("reader", "Flagging a study for re-review")}
MIN_PASSWORD_LENGTH = 10
MAX_PASSWORD_LENGTH = 1024  # hashing cost grows with length; nobody types more
# OWASP's password storage guidance for scrypt: 128 * r * N = 128 MiB per hash.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**17, 8, 1
SALT_BYTES, HASH_BYTES = 16, 32
CONCURRENT_HASHES = 2  # per process: at most 2 x 128 MiB in flight
HASH_WAIT_S = 60.0  # how long an attempt waits for a free hashing slot before giving up
FIRST_DELAY_S, MAX_DELAY_S = 1.0, 30.0
GLOBAL_WINDOW_S, GLOBAL_MAX_FAILURES = 60.0, 30  # failed attempts (all names together) per window
MAX_FAILURE_ROWS = 1000  # the failures table never holds more rows than this
FORGET_AFTER_S = 86400.0  # a name nobody has tried for a day is forgotten
IDLE_ENV_VAR, DEFAULT_IDLE_MINUTES = "BONESCAN_SESSION_IDLE_MINUTES", 30.0
SETTING = "sign_in"  # key in the settings table: "required" or "off" (absent: off)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_hashing = threading.BoundedSemaphore(CONCURRENT_HASHES)


class AccountError(errors.InputError):
    """An account operation that cannot be done as asked; the message says what to do."""


class SignInFailed(errors.BonescanError):
    """Sign-in refused: wrong name or password, a throttled name, or a disabled account."""


@dataclass(frozen=True)
class Account:
    """One account. ``roles`` is a subset of :data:`ROLES`, in the catalogue's order;
    ``session_epoch`` counts the changes (password, disabled) that end open sessions."""

    name: str
    roles: tuple[str, ...]
    disabled: bool
    created_at: str
    session_epoch: int = 0

    def has(self, role: str) -> bool:
        """Whether the account holds ``role``."""
        return role in self.roles

    def as_json(self) -> dict:
        """``name``, ``roles`` (list), ``disabled`` (bool), ``created_at``."""
        return {"name": self.name, "roles": list(self.roles), "disabled": self.disabled, "created_at": self.created_at}


# --- password hashing ---------------------------------------------------------------------

def _maxmem(n: int, r: int, p: int) -> int:
    # What OpenSSL needs for these parameters (128 * r * (n + p + 2) bytes), plus slack;
    # the default limit (32 MiB) would refuse a later, costlier setting.
    return 128 * r * (n + p + 2) + 2**20


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    # At most CONCURRENT_HASHES at once: each takes 128 * r * n bytes while it runs.
    if not _hashing.acquire(timeout=HASH_WAIT_S):
        raise SignInFailed("The server is busy checking other sign-ins: try again in a minute.")
    try:
        return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=_maxmem(n, r, p), dklen=dklen)
    finally:
        _hashing.release()


def hash_password(password: str, *, n: int | None = None, r: int | None = None, p: int | None = None) -> str:
    """A salted scrypt hash: ``scrypt$n$r$p$salt_hex$hash_hex`` (the parameters travel with it).

    The cost defaults to the module's current :data:`SCRYPT_N`, :data:`SCRYPT_R`, :data:`SCRYPT_P`.
    """
    n, r, p = n or SCRYPT_N, r or SCRYPT_R, p or SCRYPT_P
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(password, salt, n, r, p, HASH_BYTES)
    return f"scrypt${n}${r}${p}${salt.hex()}${digest.hex()}"


def _parameters(stored: str) -> tuple[int, int, int] | None:
    """The (n, r, p) a stored hash was made with; None for a malformed one."""
    try:
        _, n, r, p, _, _ = stored.split("$")
        return int(n), int(r), int(p)
    except ValueError:
        return None


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches a hash from :func:`hash_password` (constant-time compare).

    A malformed hash or unknown scheme never matches.
    """
    try:
        scheme, n_text, r_text, p_text, salt_hex, digest_hex = stored.split("$")
        n, r, p = int(n_text), int(r_text), int(p_text)
        salt, expected = bytes.fromhex(salt_hex), bytes.fromhex(digest_hex)
    except ValueError:
        return False
    if scheme != "scrypt" or not expected:
        return False
    digest = _scrypt(password, salt, n, r, p, len(expected))
    return hmac.compare_digest(digest, expected)


_dummy_hashes: dict[tuple[int, int, int], str] = {}


def _dummy() -> str:
    """A hash to check against when no account has the name: the reply takes as long as a
    real check (at the current cost, which is what new and upgraded hashes use)."""
    key = (SCRYPT_N, SCRYPT_R, SCRYPT_P)
    if key not in _dummy_hashes:
        _dummy_hashes[key] = hash_password(secrets.token_hex(16))
    return _dummy_hashes[key]


# --- validation ---------------------------------------------------------------------------

def validate_name(name: str) -> str:
    """The name, stripped; AccountError unless it is 1-64 letters, digits, ``.``, ``_``, ``@``, ``-``."""
    name = (name or "").strip()
    if not _NAME.fullmatch(name):
        raise AccountError(f"account name {name!r} is not allowed: use 1-64 letters, digits, '.', '_', '@' or '-', "
                           "starting with a letter or digit")
    return name


def validate_roles(roles: Iterable[str]) -> tuple[str, ...]:
    """The roles in catalogue order, duplicates dropped; AccountError on none or an unknown one."""
    wanted = {role.strip().lower() for role in roles if role.strip()}
    unknown = sorted(wanted - set(ROLES))
    if unknown:
        raise AccountError(f"unknown role {', '.join(unknown)}; roles are {', '.join(ROLES)}")
    if not wanted:
        raise AccountError(f"give at least one role: {', '.join(ROLES)}")
    return tuple(role for role in ROLES if role in wanted)


def validate_password(password: str) -> None:
    """AccountError unless the password is long enough (and not absurdly long)."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError(f"password too short: use at least {MIN_PASSWORD_LENGTH} characters "
                           "(a few unrelated words are easy to remember)")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise AccountError(f"password too long: use at most {MAX_PASSWORD_LENGTH} characters")


# --- accounts -----------------------------------------------------------------------------

def _account(row) -> Account:
    return Account(row["name"], tuple(r for r in row["roles"].split(";") if r), bool(row["disabled"]), row["created_at"],
                   int(row["session_epoch"]))


def get_account(db: sqlite_utils.Database, name: str) -> Account | None:
    """The account called ``name`` (any letter case), or None."""
    rows = list(db.query("SELECT * FROM accounts WHERE name = ?", [(name or "").strip()]))
    return _account(rows[0]) if rows else None


def list_accounts(db: sqlite_utils.Database) -> list[Account]:
    """Every account, by name."""
    return [_account(row) for row in db.query("SELECT * FROM accounts ORDER BY name COLLATE NOCASE")]


def _require(db: sqlite_utils.Database, name: str) -> Account:
    account = get_account(db, name)
    if account is None:
        raise AccountError(f"no account named {name!r}; list them with `bonescan account list`")
    return account


def add_account(db: sqlite_utils.Database, name: str, password: str, roles: Iterable[str]) -> Account:
    """Create an account; AccountError if the name is taken (in any letter case) or invalid."""
    name = validate_name(name)
    roles = validate_roles(roles)
    validate_password(password)
    hashed = hash_password(password)
    with dbm.write(db):
        if (existing := get_account(db, name)) is not None:
            raise AccountError(f"an account named {existing.name!r} exists already; change it with "
                               "`bonescan account passwd` or `bonescan account roles`")
        now = dbm.utc_now()
        db["accounts"].insert({"name": name, "password_hash": hashed, "roles": ";".join(roles), "disabled": 0,
                               "created_at": now, "password_changed_at": now})
        db.execute("DELETE FROM sign_in_failures WHERE name = ?", [name])
    return _require(db, name)


def set_password(db: sqlite_utils.Database, name: str, password: str) -> None:
    """Replace an account's password, clear its failed-attempt delay and end its open sessions."""
    validate_password(password)
    hashed = hash_password(password)
    with dbm.write(db):
        account = _require(db, name)
        # A new epoch ends the account's open sessions (someone may know the old password).
        db.execute("UPDATE accounts SET password_hash = ?, password_changed_at = ?, session_epoch = session_epoch + 1"
                   " WHERE name = ?", [hashed, dbm.utc_now(), account.name])
        db.execute("DELETE FROM sign_in_failures WHERE name = ?", [account.name])


def set_roles(db: sqlite_utils.Database, name: str, roles: Iterable[str]) -> Account:
    """Replace an account's roles; returns the updated account."""
    roles = validate_roles(roles)
    with dbm.write(db):
        account = _require(db, name)
        db.execute("UPDATE accounts SET roles = ? WHERE name = ?", [";".join(roles), account.name])
    return _require(db, name)


def set_disabled(db: sqlite_utils.Database, name: str, disabled: bool = True) -> None:
    """Disable (or re-enable) an account. Accounts are never deleted: reviews carry their
    names, and a new account must not inherit an old reader's reviews.

    Either way the account's open sessions end (disabling then re-enabling between two
    reruns of a session must not leave it signed in).

    Refuses to disable the last enabled account while sign-in is required (nobody could
    sign in to the app).
    """
    with dbm.write(db):
        account = _require(db, name)
        if disabled and not account.disabled and sign_in_required(db):
            others = db.execute("SELECT COUNT(*) FROM accounts WHERE disabled = 0 AND name != ?", [account.name]).fetchone()[0]
            if not others:
                raise AccountError(f"{account.name} is the last enabled account and sign-in is on: add another account "
                                   "first, or turn sign-in off with `bonescan account sign-in off`")
        db.execute("UPDATE accounts SET disabled = ?, session_epoch = session_epoch + 1 WHERE name = ?",
                   [int(disabled), account.name])


# --- the sign-in setting ------------------------------------------------------------------

def sign_in_required(db: sqlite_utils.Database) -> bool:
    """Whether the app asks for a signed-in account (setting ``sign_in`` = ``required``)."""
    row = db.execute("SELECT value FROM settings WHERE key = ?", [SETTING]).fetchone()
    return bool(row and row[0] == "required")


def set_sign_in(db: sqlite_utils.Database, required: bool) -> None:
    """Turn the sign-in requirement on or off.

    Turning it on needs at least one enabled account (else nobody could use the app).
    """
    with dbm.write(db):
        if required and not db.execute("SELECT 1 FROM accounts WHERE disabled = 0").fetchone():
            raise AccountError("no enabled account yet: add one first with "
                               "`bonescan account add NAME --role reader`, then turn sign-in on")
        db["settings"].upsert({"key": SETTING, "value": "required" if required else "off"}, pk="key")


# --- authentication -----------------------------------------------------------------------

def delay_after(failures: int) -> float:
    """Seconds a name is refused after ``failures`` consecutive failed sign-ins (0 for none)."""
    if failures <= 0:
        return 0.0
    return min(FIRST_DELAY_S * 2 ** (failures - 1), MAX_DELAY_S)


def _prune_failures(db: sqlite_utils.Database, moment: float) -> None:
    """Forget names nobody has tried for a day, and keep at most MAX_FAILURE_ROWS rows.

    Evicting the earliest locks first loses only names whose delay has long passed: with
    the global cap, MAX_FAILURE_ROWS new names take far longer than MAX_DELAY_S to arrive.
    """
    db.execute("DELETE FROM sign_in_failures WHERE locked_until < ?", [moment - FORGET_AFTER_S])
    db.execute("DELETE FROM sign_in_failures WHERE name IN (SELECT name FROM sign_in_failures"
               " ORDER BY locked_until DESC LIMIT -1 OFFSET ?)", [MAX_FAILURE_ROWS])


def _reserve_attempt(db: sqlite_utils.Database, name: str, moment: float) -> tuple[int, dict | None]:
    """One short write: refuse a throttled attempt, else record it as a failure in advance.

    Returns the name's failure count with this attempt, and the account row (None if no
    account has the name). Raises SignInFailed (writing nothing) when throttled.
    """
    with dbm.write(db):
        row = db.execute("SELECT failures, locked_until FROM sign_in_failures WHERE name = ?", [name]).fetchone()
        failures, locked_until = (row[0], row[1]) if row else (0, 0.0)
        if moment < locked_until:
            wait = max(1, round(locked_until - moment + 0.49))
            raise SignInFailed(f"Too many failed sign-ins for this name: wait {wait} s and try again.")
        window = db.execute("SELECT started_s, failures FROM sign_in_window WHERE id = 1").fetchone()
        started, recent = (window[0], window[1]) if window and moment < window[0] + GLOBAL_WINDOW_S else (moment, 0)
        if recent >= GLOBAL_MAX_FAILURES:
            wait = max(1, round(started + GLOBAL_WINDOW_S - moment + 0.49))
            raise SignInFailed(f"Too many failed sign-ins on this bonescan: wait {wait} s and try again "
                               "(an administrator can check `sign_in_failures` in the database).")
        db.execute("INSERT INTO sign_in_window (id, started_s, failures) VALUES (1, ?, ?)"
                   " ON CONFLICT(id) DO UPDATE SET started_s = excluded.started_s, failures = excluded.failures",
                   [started, recent + 1])
        accounts = list(db.query("SELECT * FROM accounts WHERE name = ?", [name]))
        failures += 1
        db.execute(
            "INSERT INTO sign_in_failures (name, failures, locked_until, last_failure_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT(name) DO UPDATE SET failures = excluded.failures, locked_until = excluded.locked_until,"
            " last_failure_at = excluded.last_failure_at",
            [accounts[0]["name"] if accounts else name, failures, moment + delay_after(failures), dbm.utc_now()],
        )
        _prune_failures(db, moment)
    return failures, (accounts[0] if accounts else None)


def authenticate(db: sqlite_utils.Database, name: str, password: str, *,
                 now: Callable[[], float] = time.time) -> Account:
    """Check a name and password; returns the account, or raises SignInFailed.

    The failure message is the same whether or not the name exists. A name that failed
    recently is refused until its delay (:func:`delay_after`) has passed, and every name
    while the global cap is reached, without checking the password. A disabled account
    is refused (said only after the right password). No transaction is open while the
    password is hashed.

    Args:
        now: the clock, in seconds since the epoch (tests pass a fake one).
    """
    name = (name or "").strip()
    if not name or not password:
        raise SignInFailed("Enter your account name and password.")
    if not _NAME.fullmatch(name) or len(password) > MAX_PASSWORD_LENGTH:
        # No account can match, and the name rule is public: refuse without hashing or
        # storing the attempt (junk names would pile up, and cost a hash each).
        raise SignInFailed("Wrong account name or password.")
    moment = now()
    failures, row = _reserve_attempt(db, name, moment)
    stored = row["password_hash"] if row is not None else _dummy()
    if not (verify_password(password, stored) and row is not None):
        # The failure is recorded already, so there is nothing more to write.
        raise SignInFailed(f"Wrong account name or password. Wait {delay_after(failures):.0f} s before the next try.")
    upgraded = hash_password(password) if _parameters(stored) != (SCRYPT_N, SCRYPT_R, SCRYPT_P) else None
    with dbm.write(db):
        db.execute("DELETE FROM sign_in_failures WHERE name = ?", [row["name"]])
        db.execute("UPDATE sign_in_window SET failures = MAX(failures - 1, 0) WHERE id = 1 AND started_s <= ?", [moment])
        current = list(db.query("SELECT * FROM accounts WHERE name = ?", [row["name"]]))
        if not current or current[0]["password_hash"] != stored:
            # The password changed while this one was being checked: the old one no longer counts.
            current = []
        elif upgraded is not None:  # an older, cheaper hash: store one at today's cost
            db.execute("UPDATE accounts SET password_hash = ? WHERE name = ?", [upgraded, row["name"]])
    if not current:
        raise SignInFailed("Wrong account name or password.")
    account = _account(current[0])
    if account.disabled:
        raise SignInFailed("This account is disabled; ask an administrator (`bonescan account enable NAME`).")
    return account


# --- sessions -----------------------------------------------------------------------------

def idle_limit_s(environ: Mapping[str, str] = os.environ) -> float:
    """How long a signed-in session may stay idle before it ends, in seconds.

    ``$BONESCAN_SESSION_IDLE_MINUTES`` (a positive number of minutes), default 30. Raises
    InputError for anything else, rather than silently running with another limit.
    """
    text = environ.get(IDLE_ENV_VAR, "").strip()
    if not text:
        return DEFAULT_IDLE_MINUTES * 60.0
    try:
        minutes = float(text)
    except ValueError:
        minutes = float("nan")
    if not minutes > 0 or minutes == float("inf"):
        raise errors.InputError(f"{IDLE_ENV_VAR}={text!r} is not a positive number of minutes: set it to, e.g., 30, "
                                "or unset it for the default of 30")
    return minutes * 60.0


def session_expired(last_active: float, moment: float, limit_s: float) -> bool:
    """Whether a session last active at ``last_active`` (Unix seconds) has been idle too long at ``moment``."""
    return moment - last_active > limit_s


def session_account(db: sqlite_utils.Database, name: str, epoch: int) -> Account | None:
    """The account a session signed in as, read now; None when the session must end: the
    account is gone or disabled, or its ``session_epoch`` moved on since (password changed,
    disabled, re-enabled) from ``epoch``, the one the session signed in with."""
    account = get_account(db, name)
    if account is None or account.disabled or account.session_epoch != epoch:
        return None
    return account


# --- permissions --------------------------------------------------------------------------

def permits(account: Account | None, action: str, *, sign_in: bool) -> bool:
    """Whether ``action`` (a key of :data:`ACTIONS`) is allowed.

    With sign-in off everything is allowed (as before accounts existed); with it on, the
    signed-in account needs one of the action's roles.
    """
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}; one of {', '.join(ACTIONS)}")
    if not sign_in:
        return True
    return account is not None and not account.disabled and bool(ACTIONS[action] & set(account.roles))


def denial(action: str, account: Account | None = None) -> str:
    """What to tell a signed-in account that lacks the role for ``action``, with the command
    that grants it (``roles`` replaces the role list, so the command keeps the current roles).
    """
    needed, what = _SUGGESTED[action]
    name = account.name if account else "NAME"
    keep = [role for role in (account.roles if account else ()) if role != needed]
    command = f"bonescan account roles {name} " + " ".join(f"--role {role}" for role in [*keep, needed])
    return f"{what} needs the {needed} role; ask an administrator: {command}"


def require(account: Account | None, action: str, *, sign_in: bool) -> None:
    """PermissionDenied (with :func:`denial`'s message) unless :func:`permits`."""
    if not permits(account, action, sign_in=sign_in):
        raise errors.PermissionDenied(denial(action, account))


def session_permits(db: sqlite_utils.Database, session: tuple[str, int] | None, action: str) -> bool:
    """Whether a session may do ``action`` now: always with sign-in off; with it on, only a
    session signed in (``session`` = (account name, the epoch it signed in with), None if not
    signed in) whose account is still valid (:func:`session_account`) and holds a role for
    it, all read now, so a role taken away counts at once, even in an open session.

    A typed reviewer name is never an argument: with sign-in on, only a sign-in identifies.
    """
    required = sign_in_required(db)
    account = session_account(db, *session) if required and session is not None else None
    return permits(account, action, sign_in=required)


def has_role(db: sqlite_utils.Database, name: str, role: str) -> bool:
    """Whether an enabled account called ``name`` holds ``role``."""
    account = get_account(db, name)
    return bool(account and not account.disabled and account.has(role))
