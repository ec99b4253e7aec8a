"""The users' directory: who may sign in, with what role, and their API tokens.

One SQLite file, ``<identity_dir>/users.db`` (WAL, mode 0600 in a 0700 folder), shared by
``studio serve``, the ``studio livy`` it starts (``STUDIO_IDENTITY_DIR``) and the ``studio users``
and ``studio tokens`` commands, whether or not a server runs: every request looks its credential
up again, so a removed user, a revoked token or a changed role takes effect at once in both.

* **Users** have a name (``^[a-z_][a-z0-9._-]{0,63}$`` after lowercasing: it becomes the Spark
  user and parts of paths), a role (``admin`` or ``user``), a source (``local``, or ``oidc`` for
  one made by single sign-on), an optional password (argon2id, ``argon2-cffi``) and optional
  quotas that override the role's (``studio.auth.quotas``). ``admin`` is built in: its password is
  the studio's token (``studio.auth.tokens``, checked by the gate, never stored here); it cannot be
  removed, demoted or given another password.
* **Tokens** are 256 random bits (``secrets``), shown once when made and kept as their SHA-256 (a
  fast hash is right for a random secret; passwords, which people choose, get argon2). Each has an
  id, a note, an optional expiry and the time it was last used. Kinds: ``personal`` (made by a user
  or an admin, for Livy clients, CI, ``studio run``), ``kernel`` (scope ``workspace:<id>``: a running
  workspace's kernels acting for whoever started it) and ``execution`` (scope ``execution:<id>``: a
  notebook run acting for its owner); the last two are revoked with ``revoke_scope`` when their
  workspace stops or their run ends.

Nothing here is cached across requests except a verified password, for a few minutes and only
while the user's stored hash is unchanged (argon2 is slow on purpose; a client sending HTTP Basic
with a password on every request should not pay it each time).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from studio import files
from studio.auth.gate import ADMIN, Principal
from studio.auth.quotas import QUOTAS
from studio.auth.tokens import TOKEN_PREFIX
from studio.errors import ConflictError, InvalidRequestError, NotFoundError
from studio.store import Migration, migrate

if TYPE_CHECKING:
    from studio.config import Settings

log = logging.getLogger("studio.auth.users")

DATABASE = "users.db"
ROLES = ("admin", "user")
SOURCES = ("local", "oidc")
TOKEN_KINDS = ("personal", "kernel", "execution")
NAME_PATTERN = re.compile(r"^[a-z_][a-z0-9._-]{0,63}$")
MAX_NOTE = 200
MAX_PASSWORD = 1024
LAST_USED_RESOLUTION = 60.0  # seconds: last_used_at is written at most this often per token
PASSWORD_CACHE_SECONDS = 300.0
# argon2id with OWASP's recommended minimum (19 MiB, 2 passes, 1 lane): each check takes tens of
# milliseconds of one core, which a studio on a small machine can afford at sign-in.
ARGON2_TIME_COST, ARGON2_MEMORY_KIB, ARGON2_LANES = 2, 19 * 1024, 1

MIGRATIONS = (
    Migration(
        1,
        "users and their tokens",
        (
            """CREATE TABLE users (
                name TEXT PRIMARY KEY,
                role TEXT NOT NULL,
                source TEXT NOT NULL DEFAULT 'local',
                email TEXT,
                password_hash TEXT,
                created_at REAL NOT NULL,
                quotas TEXT NOT NULL DEFAULT '{}'
            )""",
            """CREATE TABLE tokens (
                id TEXT PRIMARY KEY,
                user TEXT NOT NULL REFERENCES users(name),
                kind TEXT NOT NULL,
                note TEXT NOT NULL DEFAULT '',
                digest TEXT NOT NULL UNIQUE,
                created_at REAL NOT NULL,
                expires_at REAL,
                last_used_at REAL,
                scope TEXT
            )""",
            "CREATE INDEX tokens_by_user ON tokens(user)",
            "CREATE INDEX tokens_by_scope ON tokens(kind, scope)",
        ),
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


@dataclass(frozen=True)
class User:
    name: str
    role: str  # "admin" | "user"
    source: str  # "local" | "oidc"
    email: str | None
    created_at: float
    quotas: dict[str, int | None] = field(default_factory=dict)
    has_password: bool = False

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def to_json(self) -> dict[str, Any]:
        """What the API shows (never a hash)."""
        return {
            "name": self.name,
            "role": self.role,
            "source": self.source,
            "email": self.email,
            "createdAt": self.created_at,
            "quotas": dict(self.quotas),
            "hasPassword": self.has_password,
            "builtIn": self.name == ADMIN,
        }


@dataclass(frozen=True)
class TokenInfo:
    id: str
    user: str
    kind: str
    note: str
    created_at: float
    expires_at: float | None
    last_used_at: float | None
    scope: str | None

    @property
    def expired(self) -> bool:
        return self.expires_at is not None and self.expires_at <= time.time()

    def to_json(self) -> dict[str, Any]:
        """What the API shows (never the secret, never its hash)."""
        return {
            "id": self.id,
            "user": self.user,
            "kind": self.kind,
            "note": self.note,
            "createdAt": self.created_at,
            "expiresAt": self.expires_at,
            "lastUsedAt": self.last_used_at,
            "scope": self.scope,
            "expired": self.expired,
        }


def normalize_name(name: str) -> str:
    """The user name as stored (lowercase), or InvalidRequestError saying what a name may be."""
    if not isinstance(name, str):
        raise InvalidRequestError("A user name must be text.")
    normalized = name.strip().lower()
    if not NAME_PATTERN.fullmatch(normalized):
        raise InvalidRequestError(
            f"'{name[:80]}' is not a valid user name: 1 to 64 characters, lowercase letters, digits, '.', '_' and "
            "'-', starting with a letter or '_' (it becomes the Spark user and part of paths)."
        )
    return normalized


def token_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def new_token_secret() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def generate_password() -> str:
    """A password for someone to type or paste once (about 120 random bits)."""
    return secrets.token_urlsafe(15)


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise InvalidRequestError(f"Unknown role '{role}'; a role is one of: {', '.join(ROLES)}.")
    return role


def _check_password(password: str) -> str:
    if not isinstance(password, str) or not password:
        raise InvalidRequestError("A password must not be empty.")
    if len(password) > MAX_PASSWORD:
        raise InvalidRequestError(f"A password may have at most {MAX_PASSWORD} characters.")
    return password


def check_quotas(quotas: dict[str, int | None]) -> dict[str, int | None]:
    """Known keys, each a whole number >= 0 or None (no limit)."""
    if not isinstance(quotas, dict):
        raise InvalidRequestError("Quotas must be an object of quota name to a number or null.")
    checked: dict[str, int | None] = {}
    for key, value in quotas.items():
        if key not in QUOTAS:
            raise InvalidRequestError(f"Unknown quota '{key}'; the quotas are: {', '.join(QUOTAS)}.")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise InvalidRequestError(f"Quota '{key}' must be a whole number >= 0, or null for no limit.")
        checked[key] = value
    return checked


class Directory:
    """Users and tokens in ``<identity_dir>/users.db``; safe to use from any thread, and from
    several processes at once (SQLite WAL)."""

    def __init__(self, identity_dir: Path) -> None:
        files.private_dir(identity_dir)
        self.path = identity_dir / DATABASE
        files.private_file(self.path)  # SQLite gives the -wal and -shm files this mode
        self._lock = threading.Lock()
        self._hasher = PasswordHasher(time_cost=ARGON2_TIME_COST, memory_cost=ARGON2_MEMORY_KIB, parallelism=ARGON2_LANES)
        self._dummy_hash = ""  # made at the first check of an unknown user: the same work as a known one
        self._verified: dict[tuple[str, bytes], tuple[str, float]] = {}  # (name, mac of password) -> (hash, until)
        self._cache_key = secrets.token_bytes(32)
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=15)
        self._db.row_factory = sqlite3.Row
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            found = migrate(self._db, self.path, MIGRATIONS)
            if found != SCHEMA_VERSION:
                log.info("users' directory %s at schema version %d (was %d)", self.path, SCHEMA_VERSION, found)
            self._db.execute(
                "INSERT OR IGNORE INTO users (name, role, source, created_at) VALUES (?, 'admin', 'local', ?)",
                (ADMIN, time.time()),
            )
        except BaseException:
            self._db.close()
            raise

    @classmethod
    def for_settings(cls, settings: "Settings") -> "Directory":
        return cls(settings.identity_dir)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "Directory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------------------

    def _all(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def _one(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Row | None:
        with self._lock:
            row: sqlite3.Row | None = self._db.execute(sql, params).fetchone()
            return row

    def _write(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        with self._lock:
            return self._db.execute(sql, params).rowcount

    @staticmethod
    def _user(row: sqlite3.Row) -> User:
        return User(
            name=row["name"],
            role=row["role"],
            source=row["source"],
            email=row["email"],
            created_at=row["created_at"],
            quotas=json.loads(row["quotas"] or "{}"),
            has_password=row["password_hash"] is not None,
        )

    @staticmethod
    def _token(row: sqlite3.Row) -> TokenInfo:
        return TokenInfo(
            id=row["id"],
            user=row["user"],
            kind=row["kind"],
            note=row["note"],
            created_at=row["created_at"],
            expires_at=row["expires_at"],
            last_used_at=row["last_used_at"],
            scope=row["scope"],
        )

    def _require(self, name: str) -> User:
        user = self.get_user(name)
        if user is None:
            raise NotFoundError(f"No user '{name}'.")
        return user

    # -- users ------------------------------------------------------------------------------------

    def add_user(
        self,
        name: str,
        role: str = "user",
        password: str | None = None,
        email: str | None = None,
        source: str = "local",
    ) -> tuple[User, str]:
        """Make a user; returns it with its first personal token (shown once)."""
        name = normalize_name(name)
        _check_role(role)
        if source not in SOURCES:
            raise InvalidRequestError(f"Unknown user source '{source}'.")
        password_hash = self._hasher.hash(_check_password(password)) if password is not None else None
        try:
            self._write(
                "INSERT INTO users (name, role, source, email, password_hash, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (name, role, source, email, password_hash, time.time()),
            )
        except sqlite3.IntegrityError:
            raise ConflictError(f"User '{name}' exists already.") from None
        _, secret = self.create_token(name, note="first token")
        return self._require(name), secret

    def get_user(self, name: str) -> User | None:
        try:
            name = normalize_name(name)
        except InvalidRequestError:
            return None
        row = self._one("SELECT * FROM users WHERE name = ?", (name,))
        return self._user(row) if row is not None else None

    def list_users(self) -> list[User]:
        return [self._user(row) for row in self._all("SELECT * FROM users ORDER BY name")]

    def remove_user(self, name: str) -> None:
        """Remove a user and every token of theirs (``admin`` cannot be removed)."""
        user = self._require(name)
        if user.name == ADMIN:
            raise InvalidRequestError("The built-in administrator 'admin' cannot be removed.")
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM tokens WHERE user = ?", (user.name,))
                self._db.execute("DELETE FROM users WHERE name = ?", (user.name,))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def set_password(self, name: str, password: str) -> None:
        user = self._require(name)
        if user.name == ADMIN:
            raise InvalidRequestError(
                "The password of 'admin' is the studio's token: set STUDIO_TOKEN, or replace the file 'token' in the "
                "state directory and restart."
            )
        password_hash = self._hasher.hash(_check_password(password))
        self._write("UPDATE users SET password_hash = ? WHERE name = ?", (password_hash, user.name))

    def set_role(self, name: str, role: str) -> None:
        user = self._require(name)
        _check_role(role)
        if user.name == ADMIN and role != "admin":
            raise InvalidRequestError("The built-in administrator 'admin' stays an admin.")
        self._write("UPDATE users SET role = ? WHERE name = ?", (role, user.name))

    def set_quotas(self, name: str, quotas: dict[str, int | None]) -> None:
        """Replace the user's own quotas: a key absent means the role's default, None no limit."""
        user = self._require(name)
        checked = check_quotas(quotas)
        self._write("UPDATE users SET quotas = ? WHERE name = ?", (json.dumps(checked, sort_keys=True), user.name))

    def check_password(self, name: str, password: str) -> User | None:
        """The user when ``password`` is theirs; None otherwise (also for ``admin``, whose password
        is the studio's token, which the gate checks). Takes argon2's time whether or not the user exists."""
        try:
            name = normalize_name(name)
        except InvalidRequestError:
            name = ""
        row = self._one("SELECT * FROM users WHERE name = ?", (name,)) if name else None
        stored = row["password_hash"] if row is not None else None
        if not password or len(password) > MAX_PASSWORD:
            return None
        if row is None or stored is None:
            if not self._dummy_hash:
                self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(16))
            self._verify(self._dummy_hash, password)
            return None
        key = (name, hmac.new(self._cache_key, password.encode("utf-8", "surrogateescape"), hashlib.sha256).digest())
        cached = self._verified.get(key)
        now = time.monotonic()
        if cached is not None and cached[0] == stored and cached[1] > now:
            return self._user(row)
        if not self._verify(stored, password):
            self._verified.pop(key, None)
            return None
        if self._hasher.check_needs_rehash(stored):
            stored = self._hasher.hash(password)
            self._write("UPDATE users SET password_hash = ? WHERE name = ?", (stored, name))
        if len(self._verified) > 1000:
            self._verified = {k: v for k, v in self._verified.items() if v[1] > now}
        self._verified[key] = (stored, now + PASSWORD_CACHE_SECONDS)
        return self._user(row)

    def _verify(self, stored: str, password: str) -> bool:
        try:
            return self._hasher.verify(stored, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def upsert_oidc_user(self, name: str, email: str | None, role: str | None = None) -> User:
        """The user single sign-on names: made (source ``oidc``, no password, no token) when new;
        otherwise its email, and its role when ``role`` is given, are updated."""
        name = normalize_name(name)
        if role is not None:
            _check_role(role)
        if name == ADMIN and role not in (None, "admin"):
            role = None
        with self._lock:
            self._db.execute(
                "INSERT INTO users (name, role, source, email, created_at) VALUES (?, ?, 'oidc', ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET email = excluded.email, role = COALESCE(?, users.role)",
                (name, role or "user", email, time.time(), role),
            )
        return self._require(name)

    # -- tokens -----------------------------------------------------------------------------------

    def create_token(
        self,
        user: str,
        note: str = "",
        expires_at: float | None = None,
        kind: str = "personal",
        scope: str | None = None,
    ) -> tuple[TokenInfo, str]:
        """A new token for ``user``: its record and its secret (shown once, kept only as SHA-256)."""
        owner = self._require(user)
        if kind not in TOKEN_KINDS:
            raise InvalidRequestError(f"Unknown token kind '{kind}'; kinds: {', '.join(TOKEN_KINDS)}.")
        note = (note or "").strip()
        if len(note) > MAX_NOTE:
            raise InvalidRequestError(f"A token's note may have at most {MAX_NOTE} characters.")
        now = time.time()
        if expires_at is not None and expires_at <= now:
            raise InvalidRequestError("A token's expiry must be in the future.")
        secret = new_token_secret()
        token_id = secrets.token_hex(6)
        self._write(
            "INSERT INTO tokens (id, user, kind, note, digest, created_at, expires_at, scope) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (token_id, owner.name, kind, note, token_digest(secret), now, expires_at, scope),
        )
        row = self._one("SELECT * FROM tokens WHERE id = ?", (token_id,))
        assert row is not None
        return self._token(row), secret

    def get_token(self, token_id: str) -> TokenInfo | None:
        row = self._one("SELECT * FROM tokens WHERE id = ?", (token_id,))
        return self._token(row) if row is not None else None

    def list_tokens(self, user: str | None = None, kind: str | None = None) -> list[TokenInfo]:
        sql, params = "SELECT * FROM tokens WHERE 1=1", []
        if user is not None:
            sql += " AND user = ?"
            params.append(normalize_name(user))
        if kind is not None:
            sql += " AND kind = ?"
            params.append(kind)
        return [self._token(row) for row in self._all(sql + " ORDER BY created_at, id", tuple(params))]

    def revoke_token(self, token_id: str, user: str | None = None) -> bool:
        """Revoke (delete) a token; with ``user``, only one of theirs. Whether one was revoked."""
        if user is not None:
            return self._write("DELETE FROM tokens WHERE id = ? AND user = ?", (token_id, normalize_name(user))) > 0
        return self._write("DELETE FROM tokens WHERE id = ?", (token_id,)) > 0

    def revoke_scope(self, kind: str, scope: str) -> int:
        """Revoke every token of ``kind`` for ``scope`` (e.g. the kernels' of ``workspace:7``); how many."""
        return self._write("DELETE FROM tokens WHERE kind = ? AND scope = ?", (kind, scope))

    def principal_for_token(self, secret: str) -> Principal | None:
        """Who a token acts for: valid, unexpired, unrevoked, and its user still exists. None otherwise."""
        if not secret or len(secret) > 512:
            return None
        row = self._one(
            "SELECT tokens.id, tokens.kind, tokens.scope, tokens.expires_at, tokens.last_used_at, users.name, users.role "
            "FROM tokens JOIN users ON users.name = tokens.user WHERE tokens.digest = ?",
            (token_digest(secret),),
        )
        if row is None:
            return None
        now = time.time()
        if row["expires_at"] is not None and row["expires_at"] <= now:
            return None
        if row["last_used_at"] is None or now - row["last_used_at"] >= LAST_USED_RESOLUTION:
            try:
                self._write("UPDATE tokens SET last_used_at = ? WHERE id = ?", (now, row["id"]))
            except sqlite3.Error as exc:  # busy or full: the credential is still good
                log.debug("could not record the use of token %s: %s", row["id"], exc)
        return Principal(row["name"], kind=row["kind"], role=row["role"], scope=row["scope"])
