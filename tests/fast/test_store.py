"""The store: schema version and migrations, ids, JSON columns. A real SQLite file each time."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from studio.store import MIGRATIONS, SCHEMA_VERSION, Migration, NewerDatabaseError, Store, migrate, schema_version

# The schema of the versions before schema versions existed, word for word (studio/store.py's
# _SCHEMA then), and the column they added at start when it was missing.
OLD_SCHEMA = """
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
    managed INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL
);
"""


def old_database(path: Path, with_auth_column: bool = True) -> None:
    """A database as the versions before schema versions left it, with a row in every table."""
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    if with_auth_column:
        db.execute("ALTER TABLE computes ADD COLUMN auth TEXT")
    db.execute("INSERT INTO counters VALUES ('session', 7), ('batch', 3)")
    db.execute(
        "INSERT INTO sessions (id, name, kind, owner, state, created_at, request) "
        "VALUES (6, 'etl', 'pyspark', 'admin', 'idle', 1.0, '{\"kind\": \"pyspark\"}')"
    )
    db.execute(
        "INSERT INTO batches (id, owner, state, created_at, request) VALUES (2, 'admin', 'success', 1.0, '{}')"
    )
    db.execute(
        "INSERT INTO workspaces (id, name, state, created_at, process) VALUES (1, 'sales', 'Idle', 1.0, NULL)"
    )
    db.execute(
        "INSERT INTO executions (id, notebook, state, created_at, parameters) "
        "VALUES (1, 'a.ipynb', 'FINISHED', 1.0, '{\"day\": \"2026-11-22\"}')"
    )
    db.execute("INSERT INTO computes (id, name, url, created_at) VALUES (1, 'local', 'http://127.0.0.1:8998', 1.0)")
    db.commit()
    db.close()


def version_of(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return schema_version(db)
    finally:
        db.close()


def test_versions_count_up_from_one_without_gaps():
    assert [migration.version for migration in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
    assert SCHEMA_VERSION == MIGRATIONS[-1].version


def test_a_fresh_database_gets_the_newest_version_and_every_table(tmp_path):
    store = Store(tmp_path / "state" / "studio.db")
    try:
        for table in ("sessions", "batches", "workspaces", "executions", "computes"):
            assert store.all(table) == []
        assert store.next_id("session") == 0
        assert store.next_id("session") == 1
    finally:
        store.close()
    assert version_of(tmp_path / "state" / "studio.db") == SCHEMA_VERSION
    assert (tmp_path / "state" / "studio.db").stat().st_mode & 0o077 == 0


@pytest.mark.parametrize("with_auth_column", [True, False], ids=["with-computes-auth", "before-computes-auth"])
def test_an_old_database_migrates_and_keeps_its_rows(tmp_path, with_auth_column):
    path = tmp_path / "studio.db"
    old_database(path, with_auth_column)
    assert version_of(path) == 0
    store = Store(path)
    try:
        session = store.get("sessions", 6)
        assert session is not None
        assert (session["name"], session["state"], session["request"]) == ("etl", "idle", {"kind": "pyspark"})
        assert store.all("batches")[0]["state"] == "success"
        assert store.all("workspaces")[0]["name"] == "sales"
        assert store.get("executions", 1)["parameters"] == {"day": "2026-11-22"}
        assert store.get("computes", 1)["auth"] is None
        store.update("computes", 1, auth={"token": "t"})
        assert store.get("computes", 1)["auth"] == {"token": "t"}
        assert store.next_id("session") == 7  # ids keep counting across the upgrade
    finally:
        store.close()
    assert version_of(path) == SCHEMA_VERSION
    Store(path).close()  # and a second start has nothing to do


def test_a_newer_database_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "studio.db"
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.execute("CREATE TABLE from_the_future (x)")
    db.commit()
    db.close()
    before = path.read_bytes()
    with pytest.raises(NewerDatabaseError) as caught:
        Store(path)
    message = str(caught.value)
    assert f"schema version {SCHEMA_VERSION + 1}" in message
    assert f"up to {SCHEMA_VERSION}" in message
    assert "newer Spark Studio" in message
    assert str(path) in message
    assert version_of(path) == SCHEMA_VERSION + 1
    assert path.read_bytes() == before


def test_a_failing_migration_leaves_the_database_as_it_was(tmp_path):
    path = tmp_path / "studio.db"
    old_database(path)

    def fail(db: sqlite3.Connection) -> None:
        raise RuntimeError("half way")

    add_column = "ALTER TABLE sessions ADD COLUMN x"
    broken = (*MIGRATIONS, Migration(SCHEMA_VERSION + 1, "adds a column, then fails", (add_column, fail)))
    db = sqlite3.connect(path, isolation_level=None)
    try:
        with pytest.raises(RuntimeError, match="half way"):
            migrate(db, path, broken)
        assert schema_version(db) == 0
        assert "x" not in {row[1] for row in db.execute("PRAGMA table_info(sessions)")}
        assert not db.in_transaction
        # the same migrations without the failing step apply on the next start
        fixed = (*MIGRATIONS, Migration(SCHEMA_VERSION + 1, "adds a column", (add_column,)))
        assert migrate(db, path, fixed) == 0
        assert schema_version(db) == SCHEMA_VERSION + 1
        assert migrate(db, path, fixed) == SCHEMA_VERSION + 1
    finally:
        db.close()


def test_json_columns_round_trip_and_unfinished_work_is_closed(tmp_path):
    store = Store(tmp_path / "studio.db")
    try:
        store.insert("sessions", {"id": 0, "kind": "pyspark", "state": "idle", "request": {"conf": {"a": "b"}}})
        store.insert("sessions", {"id": 1, "kind": "pyspark", "state": "dead", "ended_at": 5.0})
        assert store.get("sessions", 0)["request"] == {"conf": {"a": "b"}}
        assert store.get("sessions", 1)["request"] == {}
        assert store.mark_unfinished("sessions", "dead", "the service stopped") == 1
        assert store.get("sessions", 0)["reason"] == "the service stopped"
        assert store.get("sessions", 1)["ended_at"] == 5.0
        store.delete("sessions", 0)
        assert store.get("sessions", 0) is None
    finally:
        store.close()


def test_two_servers_starting_on_one_file_migrate_it_once(tmp_path):
    # `studio serve` and its `studio livy` may start together on one state directory.
    import threading

    path = tmp_path / "studio.db"
    old_database(path)
    stores: list[Store] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        barrier.wait()
        try:
            stores.append(Store(path))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for store in stores:
        store.close()
    assert not errors and len(stores) == 4
    assert version_of(path) == SCHEMA_VERSION


def test_the_servers_refuse_a_newer_database_in_one_line_before_anything_starts(tmp_path):
    from studio.cli import build_parser
    from studio.store import check_schema

    check_schema(tmp_path / "missing" / "studio.db")  # nothing yet: the store will make it
    assert not (tmp_path / "missing").exists()
    path = tmp_path / "state" / "studio.db"
    Store(path).close()
    check_schema(path)
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(NewerDatabaseError):
        check_schema(path)
    for argv in (["livy", "--port", "0"], ["serve", "--port", "0", "--livy-url", "http://127.0.0.1:9"]):
        args = build_parser().parse_args([*argv, "--state-dir", str(tmp_path / "state")])
        with pytest.raises(SystemExit) as caught:
            args.func(args)
        assert str(caught.value).startswith(f"studio: The database {path} has schema version {SCHEMA_VERSION + 1}")
    assert version_of(path) == SCHEMA_VERSION + 1


def test_a_full_disk_refuses_what_must_be_on_record_and_holds_back_the_rest_in_order(tmp_path):
    """SQLite's own limit on the file's pages stands in for a full disk: a write beyond it fails with
    SQLITE_FULL ("database or disk is full"), as on a disk without room (tests/test_load.py fills a
    real one under a running service)."""
    from studio.errors import StorageFullError

    store = Store(tmp_path / "studio.db")
    store.insert("sessions", {"id": 1, "name": None, "kind": "pyspark", "owner": "admin", "state": "idle"})
    store.add_statement(1, 0, code="0", kind="pyspark", state="waiting")
    (pages,) = store._db.execute("PRAGMA page_count").fetchone()
    store._db.execute(f"PRAGMA max_page_count = {pages}")  # the store's own connection: no room from here
    with pytest.raises(StorageFullError) as refused:
        for statement_id in range(1, 100):
            store.add_statement(1, statement_id, code="x" * 4000, kind="pyspark", state="waiting")
    assert refused.value.status_code == 507 and "disk is full" in refused.value.msg
    accepted = [row["id"] for row in store.statements(1)]
    # Work under way is held back, in order, and a write that must be on record is refused meanwhile.
    assert store.update_statement(1, 0, defer=True, state="available", output="x" * 8000) is False
    assert store.update_statement(1, 0, defer=True, state="cancelled") is False
    assert store.update("sessions", 1, defer=True, state="dead", reason="r" * 8000) is False
    assert store.holding == 3
    with pytest.raises(StorageFullError):
        store.update("sessions", 1, state="idle")
    with pytest.raises(StorageFullError):
        store.next_id("session")
    assert store.flush() is False and store.statements(1)[0]["state"] == "waiting"
    # Room again: the held writes land in the order they were made, then the rest goes on as usual.
    store._db.execute("PRAGMA max_page_count = 1000000")
    assert store.flush() is True and store.holding == 0
    assert store.statements(1)[0]["state"] == "cancelled" and store.statements(1)[0]["output"] == "x" * 8000
    assert store.get("sessions", 1)["state"] == "dead"
    store.add_statement(1, 100, code="1", kind="pyspark", state="waiting")
    assert [row["id"] for row in store.statements(1)] == [*accepted, 100]
    assert store._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    store.close()


def test_migration_4_adds_collaborators_starters_and_allowed_users_to_existing_rows(tmp_path):
    path = tmp_path / "studio.db"
    db = sqlite3.connect(path, isolation_level=None)
    try:
        migrate(db, path, MIGRATIONS[:3])  # a database of the version before per-user access
        db.execute("INSERT INTO workspaces (id, name, owner, state, created_at) VALUES (1, 'sales', 'admin', 'Idle', 1.0)")
        db.execute("INSERT INTO computes (id, name, url, created_at) VALUES (1, 'local', 'http://127.0.0.1:8998', 1.0)")
    finally:
        db.close()
    assert version_of(path) == 3
    store = Store(path)
    try:
        workspace, compute = store.get("workspaces", 1), store.get("computes", 1)
        assert (workspace["owner"], workspace["collaborators"], workspace["started_by"]) == ("admin", None, None)
        assert compute["allowed_users"] is None  # everyone may use it, as before
        store.update("workspaces", 1, collaborators=["ana", "bo"], started_by="ana")
        store.update("computes", 1, allowed_users=["ana"])
        assert store.get("workspaces", 1)["collaborators"] == ["ana", "bo"]
        assert store.get("workspaces", 1)["started_by"] == "ana"
        assert store.get("computes", 1)["allowed_users"] == ["ana"]
    finally:
        store.close()
    assert version_of(path) >= 4
