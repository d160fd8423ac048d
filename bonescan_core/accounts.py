"""Reader accounts and optional sign-in: password hashing, roles, throttled authentication.

Off by default (a single-user workstation needs none of it). When the ``sign_in`` setting is
``required`` (``bonescan account sign-in on``), the app asks every visitor to sign in, and
reviews carry the account name instead of a typed one.

Passwords are hashed with scrypt (memory-hard: about 16 MiB and 50 ms per hash at the
default cost), a random 16-byte salt per password, and the cost parameters stored with the
hash (``scrypt$n$r$p$salt_hex$hash_hex``), so the cost can be raised later without breaking
stored hashes. Comparison is constant-time.

Failed sign-ins are throttled per attempted name, whether or not an account of that name
exists (so the delay does not tell which names exist): after the k-th consecutive failure
the name is refused for ``min(2 ** (k - 1), 30)`` seconds, without checking the password.
The refusal is stored in the database rather than slept out, so a guessing script cannot
wait in parallel sessions, and the app's server thread is never put to sleep. The clock is
a parameter, so tests need not wait.

Roles: ``reader`` (labels studies), ``adjudicator`` (labels, and records the consensus),
``trainer`` (enqueues and cancels training runs). The command line is not checked: whoever
can run ``bonescan`` can open the database file directly.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import sqlite_utils

from bonescan_core import db as dbm
from bonescan_core import errors

ROLES: dict[str, str] = {
    "reader": "labels studies",
    "adjudicator": "labels studies and records the consensus of disagreeing readers",
    "trainer": "enqueues and cancels training runs",
}
# What each action needs (any one of the roles listed).
ACTIONS: dict[str, frozenset[str]] = {
    "label": frozenset({"reader", "adjudicator"}),
    "adjudicate": frozenset({"adjudicator"}),
    "train": frozenset({"trainer"}),
}
MIN_PASSWORD_LENGTH = 10
MAX_PASSWORD_LENGTH = 1024  # hashing cost grows with length; nobody types more
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1  # 128 * r * n = 16 MiB per hash
SALT_BYTES, HASH_BYTES = 16, 32
FIRST_DELAY_S, MAX_DELAY_S = 1.0, 30.0
SETTING = "sign_in"  # key in the settings table: "required" or "off" (absent: off)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


class AccountError(errors.InputError):
    """An account operation that cannot be done as asked; the message says what to do."""


class SignInFailed(errors.BonescanError):
    """Sign-in refused: wrong name or password, a throttled name, or a disabled account."""


@dataclass(frozen=True)
class Account:
    """One account. ``roles`` is a subset of :data:`ROLES`, in the catalogue's order."""

    name: str
    roles: tuple[str, ...]
    disabled: bool
    created_at: str

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


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """A salted scrypt hash: ``scrypt$n$r$p$salt_hex$hash_hex`` (the parameters travel with it)."""
    salt = secrets.token_bytes(SALT_BYTES)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=_maxmem(n, r, p), dklen=HASH_BYTES)
    return f"scrypt${n}${r}${p}${salt.hex()}${digest.hex()}"


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
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=_maxmem(n, r, p),
                            dklen=len(expected))
    return hmac.compare_digest(digest, expected)


_dummy_hash: str | None = None


def _dummy() -> str:
    """A hash to check against when no account has the name: the reply takes as long as a real check."""
    global _dummy_hash
    if _dummy_hash is None:
        _dummy_hash = hash_password(secrets.token_hex(16))
    return _dummy_hash


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
    return Account(row["name"], tuple(r for r in row["roles"].split(";") if r), bool(row["disabled"]), row["created_at"])


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
    """Replace an account's password (and clear its failed-attempt delay)."""
    validate_password(password)
    hashed = hash_password(password)
    with dbm.write(db):
        account = _require(db, name)
        db.execute("UPDATE accounts SET password_hash = ?, password_changed_at = ? WHERE name = ?",
                   [hashed, dbm.utc_now(), account.name])
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
        db.execute("UPDATE accounts SET disabled = ? WHERE name = ?", [int(disabled), account.name])


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


def authenticate(db: sqlite_utils.Database, name: str, password: str, *,
                 now: Callable[[], float] = time.time) -> Account:
    """Check a name and password; returns the account, or raises SignInFailed.

    The failure message is the same whether or not the name exists. A name that failed
    recently is refused until its delay (:func:`delay_after`) has passed, without checking
    the password. A disabled account is refused (said only after the right password).

    Args:
        now: the clock, in seconds since the epoch (tests pass a fake one).
    """
    name = (name or "").strip()
    if not name or not password:
        raise SignInFailed("Enter your account name and password.")
    if not _NAME.fullmatch(name) or len(password) > MAX_PASSWORD_LENGTH:
        # No account can match: refuse without storing the attempt (junk names would pile up).
        verify_password(password[:MAX_PASSWORD_LENGTH], _dummy())
        raise SignInFailed("Wrong account name or password.")
    # One write transaction: concurrent attempts on one name queue up, so none slips
    # past the delay. A check takes ~50 ms; the lock is held that long.
    with dbm.write(db):
        moment = now()
        row = db.execute("SELECT failures, locked_until FROM sign_in_failures WHERE name = ?", [name]).fetchone()
        failures, locked_until = (row[0], row[1]) if row else (0, 0.0)
        if moment < locked_until:
            wait = max(1, round(locked_until - moment + 0.49))
            raise SignInFailed(f"Too many failed sign-ins for this name: wait {wait} s and try again.")
        rows = list(db.query("SELECT * FROM accounts WHERE name = ?", [name]))
        matched = verify_password(password, rows[0]["password_hash"] if rows else _dummy()) and bool(rows)
        if not matched:
            failures += 1
            db.execute(
                "INSERT INTO sign_in_failures (name, failures, locked_until, last_failure_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT(name) DO UPDATE SET failures = excluded.failures, locked_until = excluded.locked_until,"
                " last_failure_at = excluded.last_failure_at",
                [rows[0]["name"] if rows else name, failures, moment + delay_after(failures), dbm.utc_now()],
            )
            # Forget names nobody has tried for a day, so guessed names do not pile up.
            db.execute("DELETE FROM sign_in_failures WHERE locked_until < ?", [moment - 86400])
            wrong = SignInFailed(f"Wrong account name or password. Wait {delay_after(failures):.0f} s before the next try.")
        else:
            wrong = None
            db.execute("DELETE FROM sign_in_failures WHERE name = ?", [name])
    if wrong is not None:  # raised outside the transaction, so the failure count is kept
        raise wrong
    account = _account(rows[0])
    if account.disabled:
        raise SignInFailed("This account is disabled; ask an administrator (`bonescan account enable NAME`).")
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
    needed = {"train": "trainer", "adjudicate": "adjudicator", "label": "reader"}[action]
    name = account.name if account else "NAME"
    keep = [role for role in (account.roles if account else ()) if role != needed]
    command = f"bonescan account roles {name} " + " ".join(f"--role {role}" for role in [*keep, needed])
    what = {"train": "Training", "adjudicate": "Recording the consensus", "label": "Labelling"}[action]
    return f"{what} needs the {needed} role; ask an administrator: {command}"


def require(account: Account | None, action: str, *, sign_in: bool) -> None:
    """PermissionDenied (with :func:`denial`'s message) unless :func:`permits`."""
    if not permits(account, action, sign_in=sign_in):
        raise errors.PermissionDenied(denial(action, account))


def may(db: sqlite_utils.Database, name: str, action: str) -> bool:
    """Whether the reader called ``name`` may do ``action`` now, by the roles stored now
    (always True with sign-in off). Pages ask this before acting, so a role taken away
    takes effect at once, even in an open session.
    """
    required = sign_in_required(db)
    return permits(get_account(db, name) if required else None, action, sign_in=required)


def has_role(db: sqlite_utils.Database, name: str, role: str) -> bool:
    """Whether an enabled account called ``name`` holds ``role``."""
    account = get_account(db, name)
    return bool(account and not account.disabled and account.has(role))
