"""Persistence only: rows in SQLite, no live processes.

The session service keeps its live objects (sessions with their workers, batches with their
spark-submit processes) in memory; a row here is their record: ids keep counting across
restarts, and finished work stays on record with its log path. The workspace server keeps its
workspaces, computes and notebook executions here; a workspace row also holds what is needed to find its JupyterLab
again after a restart (``process``: pid, port, token), never the live process itself.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio import files
from studio.errors import StorageFullError

log = logging.getLogger(__name__)

# Schema version and migrations
# ----------------------------------
# The database's schema version is SQLite's ``PRAGMA user_version`` (0 in a new file, and in the
# files of versions before migrations existed). At start, every migration above that version runs
# in order, all in one transaction, which also sets the new version: a start that fails half way
# leaves the file as it was. A database newer than this code is refused (its rows may mean things
# this code does not know), never opened or changed.
#
# To change the schema, APPEND a migration with the next version; never edit one that has been
# committed (some database out there already ran it). A step is one SQL statement (no
# ``executescript``: it commits on its own), or a function of the connection for work SQL
# cannot say (look at the data first, copy a table). Add JSON columns and tables to
# ``_JSON_COLUMNS`` below as well.


class NewerDatabaseError(RuntimeError):
    """The database was written by a newer Spark Studio (its schema version is above ours)."""


Step = str | Callable[[sqlite3.Connection], None]


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    steps: tuple[Step, ...]


def _baseline_computes_auth(db: sqlite3.Connection) -> None:
    # computes.auth came after the first release, as an ALTER at start; the oldest files lack it.
    if "auth" not in _columns(db, "computes"):
        db.execute("ALTER TABLE computes ADD COLUMN auth TEXT")


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "baseline: the tables of the versions before schema versions (IF NOT EXISTS: they may be there)",
        (
            "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
            """CREATE TABLE IF NOT EXISTS sessions (
    id INTEGER PRIMARY KEY, name TEXT, kind TEXT NOT NULL, owner TEXT, state TEXT NOT NULL,
    created_at REAL NOT NULL, ended_at REAL, app_id TEXT, log_path TEXT, request TEXT NOT NULL,
    reason TEXT
)""",
            """CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY, name TEXT, owner TEXT, state TEXT NOT NULL,
    created_at REAL NOT NULL, ended_at REAL, app_id TEXT, log_path TEXT, request TEXT NOT NULL,
    reason TEXT
)""",
            """CREATE TABLE IF NOT EXISTS workspaces (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, description TEXT NOT NULL DEFAULT '', owner TEXT,
    repository_url TEXT, compute TEXT, idle_timeout REAL, state TEXT NOT NULL, reason TEXT,
    created_at REAL NOT NULL, updated_at REAL, state_changed_at REAL, last_activity REAL, process TEXT
)""",
            """CREATE TABLE IF NOT EXISTS executions (
    id INTEGER PRIMARY KEY, name TEXT, owner TEXT, workspace_id INTEGER, workspace TEXT, notebook TEXT NOT NULL,
    parameters TEXT, compute TEXT, livy_url TEXT, kernel TEXT, cell_timeout REAL, state TEXT NOT NULL, reason TEXT,
    created_at REAL NOT NULL, started_at REAL, ended_at REAL, state_changed_at REAL, exit_code INTEGER, warnings TEXT
)""",
            """CREATE TABLE IF NOT EXISTS computes (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, url TEXT NOT NULL, owner TEXT,
    managed INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, auth TEXT
)""",
            _baseline_computes_auth,
        ),
    ),
    Migration(
        2,
        "sessions survive a restart of the service: their statements, and the process records of their workers",
        (
            # One row per statement of a session the service still shows (rows of a session go when it
            # leaves the API). ``output`` is Livy's output as JSON text; ``request_key`` the client's
            # Idempotency-Key, so a POST retried across a restart does not run twice.
            """CREATE TABLE statements (
    session_id INTEGER NOT NULL, id INTEGER NOT NULL, code TEXT NOT NULL, kind TEXT NOT NULL, state TEXT NOT NULL,
    output TEXT, progress REAL NOT NULL DEFAULT 0, started INTEGER NOT NULL DEFAULT 0,
    completed INTEGER NOT NULL DEFAULT 0, stream TEXT, unstreamed TEXT, request_key TEXT, created_at REAL NOT NULL,
    PRIMARY KEY (session_id, id)
)""",
            # A session worker (warm in the pool: session_id NULL) and what finds it again: ``process``
            # is studio.process's record (pid, create time, group) with the worker's own details.
            """CREATE TABLE workers (
    id TEXT PRIMARY KEY, session_id INTEGER, process TEXT NOT NULL, created_at REAL NOT NULL, ended_at REAL
)""",
        ),
    ),
    Migration(
        3,
        "executions survive a restart of studio serve: the process record of each one's `studio run`",
        (
            # studio.process's record (pid, create time, group) of the run's `studio run` child, kept
            # while it runs, so the next server adopts it and follows its events file.
            "ALTER TABLE executions ADD COLUMN process TEXT",
        ),
    ),
    Migration(
        4,
        "per-user access: a workspace's collaborators and who its running JupyterLab acts for; who may use a compute",
        (
            # JSON lists of user names. A workspace is seen, opened, started and run by its owner, its
            # collaborators and admins; ``started_by`` is the user its running kernels act for (NULL
            # while it is stopped). A compute with an empty (or NULL) ``allowed_users`` is everyone's.
            "ALTER TABLE workspaces ADD COLUMN collaborators TEXT",
            "ALTER TABLE workspaces ADD COLUMN started_by TEXT",
            "ALTER TABLE computes ADD COLUMN allowed_users TEXT",
        ),
    ),
    Migration(
        5,
        "applications as in EMR Serverless: their records, and the application of each session and batch (job run)",
        (
            # ``definition`` is the application's EMR-style definition as JSON (studio.livy.applications);
            # ``id`` its EMR-style id (16 lowercase letters and digits). Sessions and batches of the
            # versions before belong to the application ``default`` (NULL here).
            """CREATE TABLE applications (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, state TEXT NOT NULL, state_details TEXT NOT NULL DEFAULT '',
    definition TEXT NOT NULL, declared INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, updated_at REAL NOT NULL
)""",
            "ALTER TABLE sessions ADD COLUMN application_id TEXT",
            "ALTER TABLE batches ADD COLUMN application_id TEXT",
        ),
    ),
    Migration(
        6,
        "job runs as in EMR Serverless: a batch's job run state, its reason, its StartJobRun request and times",
        (
            # A batch is a job run (studio.livy.batches): ``run_state`` is its EMR state (SUBMITTED ...
            # CANCELLED), the one stored truth its Livy ``state`` is derived from; ``state_details``
            # says why in words; ``job_run`` is the StartJobRun request as JSON (NULL for a Livy
            # batch); ``client_token`` makes a StartJobRun retried after a lost answer start one run.
            "ALTER TABLE batches ADD COLUMN run_state TEXT",
            "ALTER TABLE batches ADD COLUMN state_details TEXT",
            "ALTER TABLE batches ADD COLUMN job_run TEXT",
            "ALTER TABLE batches ADD COLUMN client_token TEXT",
            "ALTER TABLE batches ADD COLUMN updated_at REAL",
            "ALTER TABLE batches ADD COLUMN started_at REAL",
        ),
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


def schema_version(db: sqlite3.Connection) -> int:
    """The schema version a database file says it has (0: new, or made before versions existed)."""
    (version,) = db.execute("PRAGMA user_version").fetchone()
    return int(version)


def check_schema(path: Path) -> None:
    """Refuse a database that a newer Spark Studio wrote (``NewerDatabaseError``) before anything
    starts; a missing file is fine (the store creates it). Changes nothing."""
    if not path.is_file():
        return
    db = sqlite3.connect(str(path))
    try:
        found = schema_version(db)
    finally:
        db.close()
    if found > SCHEMA_VERSION:
        raise _newer(path, found, SCHEMA_VERSION)


def _newer(path: Path, found: int, latest: int) -> NewerDatabaseError:
    return NewerDatabaseError(
        f"The database {path} has schema version {found}, but this Spark Studio knows versions up to "
        f"{latest}: a newer Spark Studio wrote it. Upgrade Spark Studio, or start with another --state-dir."
    )


def migrate(db: sqlite3.Connection, path: Path, migrations: tuple[Migration, ...] = MIGRATIONS) -> int:
    """Bring a database up to the newest schema in one transaction; return the version it had.

    ``db`` must be in autocommit mode (``isolation_level=None``). Raises ``NewerDatabaseError``
    for a database newer than ``migrations`` know, leaving it untouched.
    """
    latest = migrations[-1].version
    # IMMEDIATE takes the write lock first, so two servers starting on one file migrate once.
    db.execute("BEGIN IMMEDIATE")
    try:
        found = schema_version(db)
        if found > latest:
            raise _newer(path, found, latest)
        for migration in migrations:
            if migration.version <= found:
                continue
            for step in migration.steps:
                if isinstance(step, str):
                    db.execute(step)
                else:
                    step(db)
        if found != latest:
            db.execute(f"PRAGMA user_version = {int(latest)}")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return found


# table -> its columns that hold JSON (encoded on the way in, decoded on the way out)
_JSON_COLUMNS: dict[str, tuple[str, ...]] = {
    "applications": ("definition",),
    "sessions": ("request",),
    "batches": ("request", "job_run"),
    "workspaces": ("process", "collaborators"),
    "computes": ("auth", "allowed_users"),
    "executions": ("parameters", "warnings", "process"),
    "workers": ("process",),
}
_TABLES = tuple(_JSON_COLUMNS)


# A full disk
# -----------
# SQLite answers a write it has no room for with SQLITE_FULL ("database or disk is full"), or with
# an I/O error when growing its -wal or -shm file failed; either way the statement is rolled back
# and the file stays sound. The store turns that into ``StorageFullError`` (507): a request whose
# record cannot be written is refused, nothing done. A write about work already under way (a
# statement's result, a state change, a worker's record) is ``defer``red instead: it is held in
# memory, in order, and written before the next write or at the next ``flush()`` once there is room;
# any write that comes while some are held waits behind them (a non-deferred one is refused until
# they are written), so the rows never see the writes out of order.


class Store:
    """A small typed wrapper over one SQLite file (WAL mode; safe to call from any thread)."""

    def __init__(self, path: Path) -> None:
        files.private_dir(path.parent)
        files.private_file(path)  # SQLite gives the -wal and -shm files the same mode
        self.path = path
        self._lock = threading.Lock()
        self._held: list[tuple[str, tuple[Any, ...]]] = []  # deferred writes a full disk held back, in order
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        try:
            found = migrate(self._db, path)
        except BaseException:
            self._db.close()
            raise
        if found != SCHEMA_VERSION:
            log.info("database %s migrated from schema version %d to %d", path, found, SCHEMA_VERSION)

    def close(self) -> None:
        with self._lock:
            if self._held:
                log.error("closing %s with %d write(s) a full disk held back; they are lost", self.path, len(self._held))
            self._db.close()

    # -- writes ----------------------------------------------------------------------------

    def _is_full(self, exc: sqlite3.Error) -> bool:
        """Whether a failed write failed for want of room (SQLITE_FULL, or an I/O error on a full disk)."""
        code = getattr(exc, "sqlite_errorcode", None)
        if code == sqlite3.SQLITE_FULL or "database or disk is full" in str(exc):
            return True
        if code is not None and code & 0xFF == sqlite3.SQLITE_IOERR:
            try:
                room = os.statvfs(self.path.parent)
            except OSError:
                return False
            return room.f_bavail * room.f_frsize < 1 << 20
        return False

    def _full(self, exc: sqlite3.Error) -> StorageFullError:
        return StorageFullError(
            f"The state disk is full ({exc}): this request could not be recorded, so nothing was done. "
            "Try again once there is room on the server's state disk."
        )

    def _flush_held(self) -> bool:
        """Write what a full disk held back, in order (call with the lock held); True when nothing is held."""
        while self._held:
            sql, params = self._held[0]
            try:
                self._db.execute(sql, params)
            except sqlite3.Error as exc:
                if self._is_full(exc):
                    return False
                log.error("a held-back write failed and is dropped: %s (%s)", exc, sql[:80])
            self._held.pop(0)
            if not self._held:
                log.warning("the state disk has room again: every held-back write is now on record")
        return True

    def _write(self, sql: str, params: tuple[Any, ...], defer: bool = False) -> sqlite3.Cursor | None:
        """Execute one write. Without room: ``StorageFullError``, or with ``defer`` it is held back
        (see *A full disk* above) and None is returned."""
        with self._lock:
            if self._held and not self._flush_held():
                if defer:
                    self._held.append((sql, params))
                    return None
                raise self._full(sqlite3.OperationalError("database or disk is full"))
            try:
                return self._db.execute(sql, params)
            except sqlite3.Error as exc:
                if not self._is_full(exc):
                    raise
                if not defer:
                    raise self._full(exc) from None
                log.warning("the state disk is full (%s): holding writes back until there is room", exc)
                self._held.append((sql, params))
                return None

    @property
    def holding(self) -> int:
        """Writes a full disk holds back (0: everything is on record)."""
        return len(self._held)

    def flush(self) -> bool:
        """Write what a full disk held back, if there is room now; True when everything is on record."""
        with self._lock:
            return self._flush_held()

    def next_id(self, counter: str) -> int:
        """The next id of a counter ("session", "batch"), never reused."""
        self._write("INSERT OR IGNORE INTO counters(name, value) VALUES (?, 0)", (counter,))
        with self._lock:
            try:
                self._db.execute("UPDATE counters SET value = value + 1 WHERE name = ?", (counter,))
            except sqlite3.Error as exc:
                if self._is_full(exc):
                    raise self._full(exc) from None
                raise
            (value,) = self._db.execute("SELECT value FROM counters WHERE name = ?", (counter,)).fetchone()
        return int(value) - 1

    def insert(self, table: str, row: dict[str, Any], defer: bool = False) -> bool:
        """Insert (or replace) a row; False when a full disk held it back (``defer``)."""
        assert table in _TABLES
        if table in ("sessions", "batches"):
            row = {**row, "request": row.get("request", {})}
        row = _encode(table, {**row, "created_at": row.get("created_at", time.time())})
        columns = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        return self._write(f"INSERT OR REPLACE INTO {table} ({columns}) VALUES ({marks})", tuple(row.values()), defer) is not None

    def update(self, table: str, row_id: int | str, defer: bool = False, **fields: Any) -> bool:
        """Set fields of a row; False when a full disk held it back (``defer``)."""
        assert table in _TABLES
        if not fields:
            return True
        fields = _encode(table, fields)
        assignments = ", ".join(f"{name} = ?" for name in fields)
        return self._write(f"UPDATE {table} SET {assignments} WHERE id = ?", (*fields.values(), row_id), defer) is not None

    def get(self, table: str, row_id: int | str) -> dict[str, Any] | None:
        assert table in _TABLES
        with self._lock:
            row = self._db.execute(f"SELECT * FROM {table} WHERE id = ?", (row_id,)).fetchone()
        return _row(table, row) if row else None

    def all(self, table: str) -> list[dict[str, Any]]:
        """Every row of a table, oldest first."""
        assert table in _TABLES
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM {table} ORDER BY id").fetchall()
        return [_row(table, row) for row in rows]

    def delete(self, table: str, row_id: int) -> None:
        assert table in _TABLES
        self._write(f"DELETE FROM {table} WHERE id = ?", (row_id,))

    def unfinished(self, table: str) -> list[dict[str, Any]]:
        """The rows of work not recorded as ended (``ended_at`` unset), oldest first."""
        assert table in _TABLES
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM {table} WHERE ended_at IS NULL ORDER BY created_at, id").fetchall()
        return [_row(table, row) for row in rows]

    # -- statements (keyed by session and statement id) -------------------------------------

    def add_statement(self, session_id: int, statement_id: int, **fields: Any) -> None:
        """Record an accepted statement; ``StorageFullError`` when there is no room (never held back:
        a statement is accepted only once it is on record)."""
        columns = {"session_id": session_id, "id": statement_id, "created_at": time.time(), **fields}
        names = ", ".join(columns)
        marks = ", ".join("?" for _ in columns)
        self._write(f"INSERT OR REPLACE INTO statements ({names}) VALUES ({marks})", tuple(columns.values()))

    def update_statement(self, session_id: int, statement_id: int, defer: bool = False, **fields: Any) -> bool:
        """Set fields of a statement's row; False when a full disk held it back (``defer``)."""
        if not fields:
            return True
        assignments = ", ".join(f"{name} = ?" for name in fields)
        sql = f"UPDATE statements SET {assignments} WHERE session_id = ? AND id = ?"
        return self._write(sql, (*fields.values(), session_id, statement_id), defer) is not None

    def statements(self, session_id: int) -> list[dict[str, Any]]:
        """The statements of a session, in id order."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM statements WHERE session_id = ? ORDER BY id", (session_id,)).fetchall()
        return [dict(row) for row in rows]

    def forget_statements(self, session_id: int, statement_id: int | None = None, defer: bool = False) -> None:
        """Delete one statement of a session, or all of them."""
        if statement_id is None:
            self._write("DELETE FROM statements WHERE session_id = ?", (session_id,), defer)
        else:
            self._write("DELETE FROM statements WHERE session_id = ? AND id = ?", (session_id, statement_id), defer)

    def forget_statements_of_ended_sessions(self) -> int:
        """Delete the statements of sessions that ended (no route shows them after a restart)."""
        with self._lock:
            cursor = self._db.execute(
                "DELETE FROM statements WHERE session_id IN (SELECT id FROM sessions WHERE ended_at IS NOT NULL)"
            )
        return cursor.rowcount

    def mark_unfinished(self, table: str, state: str, reason: str) -> int:
        """Close the records of work a previous run of the service left unfinished."""
        assert table in _TABLES
        with self._lock:
            cursor = self._db.execute(
                f"UPDATE {table} SET state = ?, ended_at = ?, reason = ? WHERE ended_at IS NULL",
                (state, time.time(), reason),
            )
        return cursor.rowcount


def _encode(table: str, fields: dict[str, Any]) -> dict[str, Any]:
    return {
        name: (json.dumps(value) if name in _JSON_COLUMNS[table] and value is not None else value)
        for name, value in fields.items()
    }


def _row(table: str, row: sqlite3.Row) -> dict[str, Any]:
    data = dict(row)
    for name in _JSON_COLUMNS[table]:
        if data.get(name) is not None:
            data[name] = json.loads(data[name])
    return data
