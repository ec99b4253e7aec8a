"""studio.files.private_file on a SQLite database this process already has open: it must not open
and close the file (closing any descriptor drops all of this process's POSIX locks on the file,
SQLite's too), or another process reads a stale database. Two connections to one database in one
process are ordinary here: the users' directory is opened by the gate and by the app."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

from studio import files


def test_a_second_connection_in_the_process_keeps_other_processes_reading_the_latest(tmp_path):
    database = tmp_path / "users.db"

    def connect() -> sqlite3.Connection:
        files.private_file(database)
        connection = sqlite3.connect(database, isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("CREATE TABLE IF NOT EXISTS names (name TEXT)")
        return connection

    def seen_by_another_process() -> list[str]:
        code = "import sqlite3, sys; print(','.join(r[0] for r in sqlite3.connect(sys.argv[1]).execute('SELECT name FROM names ORDER BY name')))"
        done = subprocess.run([sys.executable, "-c", code, str(database)], capture_output=True, text=True, timeout=60, check=True)
        return [name for name in done.stdout.strip().split(",") if name]

    first = connect()
    first.execute("SELECT 1").fetchall()
    second = connect()
    try:
        expected = []
        for name in ("alice", "bob", "carol"):
            second.execute("INSERT INTO names VALUES (?)", (name,))
            expected.append(name)
            assert seen_by_another_process() == expected
    finally:
        first.close()
        second.close()
    assert database.stat().st_mode & 0o077 == 0
