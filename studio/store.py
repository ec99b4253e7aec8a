"""Persistence only: rows in SQLite, no live processes.

The session service keeps its live objects (sessions with their workers, batches with their
spark-submit processes) in memory; a row here is their record: ids keep counting across
restarts, and finished work stays on record with its log path. The workspace server keeps its
workspaces, computes and notebook executions here; a workspace row also holds what is needed to find its JupyterLab
again after a restart (``process``: pid, port, token), never the live process itself.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from studio import files

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    id INTEGER PRIMARY KEY, name TEXT, kind TEXT NOT NULL, owner TEXT, state TEXT NOT NULL,
    created_at REAL NOT NULL, ended_at REAL, app_id TEXT, log_path TEXT, request TEXT NOT NULL,
    reason TEXT
);
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY, name TEXT, owner TEXT, state TEXT NOT NULL,
    created_at REAL NOT NULL, ended_at REAL, app_id TEXT, log_path TEXT, request TEXT NOT NULL,
    reason TEXT
);
CREATE TABLE IF NOT EXISTS workspaces (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, description TEXT NOT NULL DEFAULT '', owner TEXT,
    repository_url TEXT, compute TEXT, idle_timeout REAL, state TEXT NOT NULL, reason TEXT,
    created_at REAL NOT NULL, updated_at REAL, state_changed_at REAL, last_activity REAL, process TEXT
);
CREATE TABLE IF NOT EXISTS executions (
    id INTEGER PRIMARY KEY, name TEXT, owner TEXT, workspace_id INTEGER, workspace TEXT, notebook TEXT NOT NULL,
    parameters TEXT, compute TEXT, livy_url TEXT, kernel TEXT, cell_timeout REAL, state TEXT NOT NULL, reason TEXT,
    created_at REAL NOT NULL, started_at REAL, ended_at REAL, state_changed_at REAL, exit_code INTEGER, warnings TEXT
);
CREATE TABLE IF NOT EXISTS computes (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, url TEXT NOT NULL, owner TEXT,
    managed INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, auth TEXT
);
"""

# Columns added after a table was first created: (table, column, declaration). Added at start when missing.
_ADDED_COLUMNS = (("computes", "auth", "TEXT"),)

# table -> its columns that hold JSON (encoded on the way in, decoded on the way out)
_JSON_COLUMNS: dict[str, tuple[str, ...]] = {
    "sessions": ("request",),
    "batches": ("request",),
    "workspaces": ("process",),
    "computes": ("auth",),
    "executions": ("parameters", "warnings"),
}
_TABLES = tuple(_JSON_COLUMNS)


class Store:
    """A small typed wrapper over one SQLite file (WAL mode; safe to call from any thread)."""

    def __init__(self, path: Path) -> None:
        files.private_dir(path.parent)
        files.private_file(path)  # SQLite gives the -wal and -shm files the same mode
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        for table, column, declaration in _ADDED_COLUMNS:
            present = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in present:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def next_id(self, counter: str) -> int:
        """The next id of a counter ("session", "batch"), never reused."""
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO counters(name, value) VALUES (?, 0)", (counter,))
            self._db.execute("UPDATE counters SET value = value + 1 WHERE name = ?", (counter,))
            (value,) = self._db.execute("SELECT value FROM counters WHERE name = ?", (counter,)).fetchone()
        return int(value) - 1

    def insert(self, table: str, row: dict[str, Any]) -> None:
        assert table in _TABLES
        if table in ("sessions", "batches"):
            row = {**row, "request": row.get("request", {})}
        row = _encode(table, {**row, "created_at": row.get("created_at", time.time())})
        columns = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self._lock:
            self._db.execute(f"INSERT OR REPLACE INTO {table} ({columns}) VALUES ({marks})", tuple(row.values()))

    def update(self, table: str, row_id: int, **fields: Any) -> None:
        assert table in _TABLES
        if not fields:
            return
        fields = _encode(table, fields)
        assignments = ", ".join(f"{name} = ?" for name in fields)
        with self._lock:
            self._db.execute(f"UPDATE {table} SET {assignments} WHERE id = ?", (*fields.values(), row_id))

    def get(self, table: str, row_id: int) -> dict[str, Any] | None:
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
        with self._lock:
            self._db.execute(f"DELETE FROM {table} WHERE id = ?", (row_id,))

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
