"""The audit trail: who did what, from where, to what, and how it ended; records are never rewritten.

Both servers (``studio serve`` and the ``studio livy`` it starts, which shares its identity
directory through ``STUDIO_IDENTITY_DIR``) append to one trail in ``Settings.identity_dir``:

* ``audit.db``: SQLite (WAL, 0600), table ``records``; triggers refuse every ``UPDATE`` and
  ``DELETE``. This is what ``GET /api/audit``, the Studio's Audit page and ``studio audit`` read.
* ``audit.jsonl``: the same records, one JSON object a line, appended with one ``write()`` each
  right after the record is committed, for a log shipper to follow (``STUDIO_AUDIT_FILE`` puts
  it elsewhere). A file renamed away (logrotate) is noticed at the next record, which starts a
  new file; the studio itself neither rotates nor prunes anything.

A record: ``id`` (1, 2, ...), ``time`` (epoch seconds; ``timestamp`` is the same in ISO 8601
UTC), ``server`` (``serve`` or ``livy``), ``user`` and ``auth`` (who, as the gate authenticated
them, and how: token, personal, kernel, password, cookie, ...; none when they did not),
``client`` (the peer address), ``action`` (the route's template: ``POST
/sessions/{session_id}/statements``; or a name like ``sign-in``), ``target`` (the object's path:
``/sessions/3/statements/7``), ``outcome`` (the HTTP status, or ``ok``/``denied``/``failed`` for
what is not a request), ``detail`` (JSON), and for statements ``code_sha256`` and ``first_line``
(the first non-blank line, cut at 120 characters). ``hash`` chains each record to the one before
(SHA-256 of the previous hash and this record's canonical JSON), so a record changed or removed
in the file, or in a shipped copy, is found by ``studio audit --verify``.

Nothing secret enters a record: no token, password or cookie (requests are described by their
route, path and a chosen few fields), conf values of secret-looking keys are redacted
(``studio.redact``), URLs lose their ``user:password@``, and a statement's first line has
``secret = "..."``-style values and things that look like Spark Studio tokens blanked.

What is recorded (``AuditMiddleware``, outermost in both apps, so it also sees what the gate
refuses): every request that may change something (POST, PUT, PATCH, DELETE) except the few
that only read (completion, inspect, a session-body check), every request refused with 401 or
403, and requests a route marks (opening a workspace's JupyterLab). Routes add detail with
``note(request, ...)``. Refusals of requests without valid credentials are recorded up to 60 a
minute per client address (``DeniedLimit``): anyone who reaches the port could otherwise fill the
disk with them; what is left out is logged and counted in that client's next record.

A trail that cannot be written (a full disk, a broken file): the failure is logged with the
record, and every request that would change something is refused with 507 while it lasts (an
unaudited action is what the trail exists to prevent); reads go on. Each such request first tries
the trail again with a record ``audit-trail-resumed`` (saying since when it failed, and why): once
that is written, the request goes ahead. Requests that would change something are also refused
while the trail's disk has less than 1 MiB free.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

from starlette.requests import Request
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from studio import files, redact
from studio.errors import InvalidRequestError, StorageFullError
from studio.store import Migration, migrate

if TYPE_CHECKING:
    from studio.auth.gate import Gate
    from studio.config import Settings

log = logging.getLogger("studio.audit")

DATABASE = "audit.db"
JSON_LINES = "audit.jsonl"
LOCK_FILE = "audit.lock"
MIN_FREE_BYTES = 1024 * 1024
FIRST_LINE_CHARS = 120
MAX_TEXT = 500  # characters of any one string in a record's detail
MAX_PATH = 300
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
GENESIS = "0" * 64  # the "previous hash" of the first record

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
DENIED = frozenset({401, 403})
# POSTs that change nothing: answered by a running session without running the user's code as a
# statement (Tab completion, Shift-Tab inspection) or only checking a body. Recorded when denied.
READ_ONLY_POSTS = frozenset(
    {"POST /studio/sessions/check", "POST /sessions/{session_id}/completion", "POST /sessions/{session_id}/inspect"}
)
# Never refused for want of a trail: signing out only takes a right away.
NEVER_REFUSED = frozenset({"/logout"})

COLUMNS = ("id", "time", "server", "user", "auth", "client", "action", "target", "outcome", "detail", "code_sha256", "first_line")

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "the audit trail: records that are never rewritten, each chained to the one before",
        (
            """CREATE TABLE records (
    id INTEGER PRIMARY KEY, time REAL NOT NULL, server TEXT NOT NULL, user TEXT, auth TEXT, client TEXT,
    action TEXT NOT NULL, target TEXT NOT NULL DEFAULT '', outcome TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '{}',
    code_sha256 TEXT, first_line TEXT, hash TEXT NOT NULL
)""",
            "CREATE INDEX records_time ON records (time)",
            "CREATE INDEX records_user ON records (user, id)",
            "CREATE TRIGGER records_never_updated BEFORE UPDATE ON records "
            "BEGIN SELECT RAISE(ABORT, 'audit records are never rewritten'); END",
            "CREATE TRIGGER records_never_deleted BEFORE DELETE ON records "
            "BEGIN SELECT RAISE(ABORT, 'audit records are never deleted'); END",
        ),
    ),
)


# -- records --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    id: int
    time: float
    server: str
    user: str | None
    auth: str | None
    client: str | None
    action: str
    target: str
    outcome: str
    detail: dict[str, Any]
    code_sha256: str | None
    first_line: str | None
    hash: str

    def base(self) -> dict[str, Any]:
        """The fields the hash covers."""
        return {name: getattr(self, name) for name in COLUMNS}

    def to_json(self) -> dict[str, Any]:
        return {**self.base(), "timestamp": iso(self.time), "hash": self.hash}

    @classmethod
    def from_row(cls, row: sqlite3.Row | dict[str, Any]) -> "Record":
        values = {name: row[name] for name in (*COLUMNS, "hash")}
        detail = values["detail"]
        values["detail"] = json.loads(detail) if isinstance(detail, str) else (detail or {})
        return cls(**values)


def chain(previous: str, base: dict[str, Any]) -> str:
    """The hash of a record: SHA-256 of the previous record's hash and this record's canonical JSON."""
    text = json.dumps(base, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{previous}\n{text}".encode()).hexdigest()


def verify(records: Iterable[dict[str, Any] | Record]) -> list[str]:
    """Problems in a sequence of records in id order (from the database or the JSON lines): a
    changed record, or one missing or added between two others. Empty: the chain holds."""
    problems: list[str] = []
    previous: Record | None = None
    for item in records:
        record = item if isinstance(item, Record) else Record.from_row(item)
        if previous is not None and record.id != previous.id + 1:
            problems.append(f"records {previous.id + 1}..{record.id - 1} are missing")
        before = GENESIS if previous is None and record.id == 1 else (previous.hash if previous else None)
        if before is not None and chain(before, record.base()) != record.hash:
            problems.append(f"record {record.id} does not match its hash (changed, or the one before it was)")
        previous = record
    return problems


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str | None, name: str = "since") -> float | None:
    """Epoch seconds from epoch seconds, ISO 8601 (a time without an offset is UTC), or an age
    like ``90s``, ``15m``, ``2h``, ``7d`` (that long ago)."""
    if text is None or not text.strip():
        return None
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    relative = _RELATIVE.match(text)
    if relative:
        return time.time() - float(relative.group(1)) * _UNITS[relative.group(2)]
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    except ValueError:
        raise InvalidRequestError(
            f"'{name}' must be epoch seconds, an ISO 8601 time (2025-01-31T09:00:00Z) or an age like 15m, 2h, 7d; "
            f"got '{text[:40]}'."
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


# -- what may enter a record ---------------------------------------------------------------------

_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][\w+.-]*://)[^/\s@]*@")
_STUDIO_TOKEN = re.compile(r"sst_[A-Za-z0-9_-]{16,}")
# name = value, name: value, f(name=value), {"name": "value"}, conf.set("name", "value"), where the
# name looks secret (studio.redact's rule) and the value is a literal (quoted, or a bare word that is
# not the start of a call or an attribute: `keys = df.select('key')` is left alone)
_SECRET_ASSIGNMENT = re.compile(
    r"""(?P<name>[\w.\-]*(?:pass(?:word|wd|phrase)|secret|token|credential|key)[\w.\-]*)(?P<quote>["']?)"""
    r"""(?P<sep>\s*[:=]\s*|\s*,\s*(?=["']))(?P<value>"[^"]*"?|'[^']*'?|[^\s,;(){}\[\]"'=]+(?![(\[\w.]))""",
    re.IGNORECASE,
)


def strip_userinfo(text: str) -> str:
    """A URL without its ``user:password@`` (``https://***@host/...``)."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}***@", text)


def scrub(text: str) -> str:
    """``text`` without credentials in URLs, Spark Studio tokens or values of secret-looking names."""
    text = _SECRET_ASSIGNMENT.sub(lambda m: f"{m['name']}{m['quote']}{m['sep']}{redact.REDACTED}", strip_userinfo(text))
    return _STUDIO_TOKEN.sub(redact.REDACTED, text)


def first_line(code: str) -> str:
    """The first non-blank line of ``code``, cut at ``FIRST_LINE_CHARS`` and scrubbed."""
    line = next((line.strip() for line in code.splitlines() if line.strip()), "")
    if len(line) > FIRST_LINE_CHARS:
        line = line[: FIRST_LINE_CHARS - 1] + "…"
    return scrub(line)


def code_sha256(code: str) -> str:
    return hashlib.sha256(code.encode("utf-8", "surrogatepass")).hexdigest()


# Detail keys that name a secret-looking word but hold no secret.
_SAFE_KEYS = frozenset({"token_id", "token_user", "token_kind", "token_note", "token_expires_at"})


def clean(value: Any, key: str = "") -> Any:
    """A detail value as it may be recorded: secret-looking keys redacted, strings scrubbed and cut."""
    if key and key not in _SAFE_KEYS and redact.is_secret(key):
        return redact.REDACTED
    if isinstance(value, str):
        value = scrub(value)
        return value if len(value) <= MAX_TEXT else value[: MAX_TEXT - 1] + "…"
    if isinstance(value, dict):
        return {str(k): clean(v, str(k)) for k, v in list(value.items())[:50]}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [clean(v) for v in list(value)[:50]]
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return clean(str(value))


def _no_room(exc: BaseException) -> bool:
    """A write that failed for want of room: ENOSPC or EDQUOT, SQLite's SQLITE_FULL, or an I/O
    error of SQLite (growing its -wal or -shm file on a full disk)."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    code = getattr(exc, "sqlite_errorcode", None)
    if code == sqlite3.SQLITE_FULL or "database or disk is full" in str(exc):
        return True
    return code is not None and code & 0xFF == sqlite3.SQLITE_IOERR


def _cut(text: str | None, size: int) -> str | None:
    if text is None:
        return None
    return text if len(text) <= size else text[: size - 1] + "…"


# -- the trail ------------------------------------------------------------------------------------


class Trail:
    """One process's writer and reader of the audit trail; safe from any thread, and beside other
    processes on the same files (a file lock keeps the records and the JSON lines in one order)."""

    def __init__(self, identity_dir: Path, json_lines: Path | None = None, server: str = "serve") -> None:
        self.dir = identity_dir
        self.path = identity_dir / DATABASE
        self.json_lines = json_lines or identity_dir / JSON_LINES
        self.server = server
        self.failing: str | None = None  # why the last write failed; None once one succeeds
        self.failed_at: float | None = None  # since when it fails
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._lines_fd: int | None = None

    @classmethod
    def for_settings(cls, settings: "Settings", server: str) -> "Trail":
        return cls(settings.identity_dir, settings.audit_file, server)

    # -- files ------------------------------------------------------------------------------

    def open(self) -> "Trail":
        """Open the database and the JSON-lines file now (a server does at its start, so that a
        trail it cannot write is said at once); writes open them anyway."""
        with self._lock:
            self._open()
            self._lines()
        return self

    def _open(self) -> sqlite3.Connection:
        if self._db is not None:
            return self._db
        files.private_dir(self.dir)
        files.private_file(self.path)  # SQLite gives the -wal and -shm files this mode
        self._lock_fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=15)
        db.row_factory = sqlite3.Row
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            migrate(db, self.path, MIGRATIONS)
        except BaseException:
            db.close()
            os.close(self._lock_fd)
            self._lock_fd = None
            raise
        self._db = db
        return db

    def _lines(self) -> int:
        """The JSON-lines file, opened again when it was renamed or removed since (rotation)."""
        path = self.json_lines
        if self._lines_fd is not None:
            try:
                now, held = os.stat(path), os.fstat(self._lines_fd)
                if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                    return self._lines_fd
            except FileNotFoundError:
                pass
            os.close(self._lines_fd)
            self._lines_fd = None
        self._lines_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return self._lines_fd

    def close(self) -> None:
        with self._lock:
            for fd in (self._lines_fd, self._lock_fd):
                if fd is not None:
                    os.close(fd)
            self._lines_fd = self._lock_fd = None
            if self._db is not None:
                self._db.close()
                self._db = None

    # -- writing ----------------------------------------------------------------------------

    def ready(self) -> str | None:
        """None when a record can be written now, else why not (a disk without room, a failed write).
        After a failed write it tries again, with a record saying that the trail resumes and since
        when it could not be written (the records of that time are in the server's log only)."""
        for folder in {self.dir, self.json_lines.parent}:
            try:
                info = os.statvfs(folder)
            except OSError:
                continue
            if info.f_bavail * info.f_frsize < MIN_FREE_BYTES and info.f_blocks:
                return f"the disk is full: less than {MIN_FREE_BYTES // 1024} KiB are free in {folder}"
        if self.failing is not None:
            with self._lock:
                try:
                    self._resume()
                except (sqlite3.Error, OSError) as exc:
                    self._failed(exc, None)
        return self.failing

    def write(
        self,
        action: str,
        outcome: str | int,
        *,
        user: str | None = None,
        auth: str | None = None,
        client: str | None = None,
        target: str = "",
        detail: dict[str, Any] | None = None,
        code: str | None = None,
        at: float | None = None,
    ) -> Record | None:
        """Append one record (its statement ``code`` only as hash and first line); the record, or
        None when it could not be written (then it is in the log, and ``failing`` says why)."""
        base: dict[str, Any] = {
            "time": time.time() if at is None else at,
            "server": self.server,
            "user": _cut(user, 200),
            "auth": _cut(auth, 40),
            "client": _cut(client, 100),
            "action": _cut(action, 200) or "",
            "target": _cut(scrub(target), MAX_PATH) or "",
            "outcome": str(outcome),
            "detail": clean(detail or {}),
            "code_sha256": code_sha256(code) if code is not None else None,
            "first_line": first_line(code) if code is not None else None,
        }
        with self._lock:
            try:
                if self.failing is not None:
                    self._resume()
                return self._append(base)
            except (sqlite3.Error, OSError) as exc:
                self._failed(exc, base)
                return None

    def _append(self, base: dict[str, Any]) -> Record:
        """Into the database, then (once committed) onto the JSON lines, under the file lock that
        keeps every process's records and lines in one order. Holds ``self._lock``."""
        db = self._open()
        assert self._lock_fd is not None
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            record = self._insert(db, base)
            data = (json.dumps(record.to_json(), ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8", "backslashreplace")
            written = os.write(self._lines(), data)
            if written != len(data):
                raise OSError(errno.ENOSPC, f"only {written} of {len(data)} bytes of record {record.id} reached {self.json_lines}")
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        return record

    def _resume(self) -> None:
        """After a failure: a record that the trail is written again, and since when it was not."""
        detail = {"failed": self.failing, "since": iso(self.failed_at or time.time())}
        self._append(
            {
                "time": time.time(), "server": self.server, "user": None, "auth": None, "client": None,
                "action": "audit-trail-resumed", "target": "", "outcome": "ok", "detail": clean(detail),
                "code_sha256": None, "first_line": None,
            }
        )
        log.warning("the audit trail is written again (%s); it could not be from %s: %s", self.path, detail["since"], self.failing)
        self.failing = self.failed_at = None

    def _failed(self, exc: BaseException, base: dict[str, Any] | None) -> None:
        why = f"the disk is full: {exc}" if _no_room(exc) else str(exc)
        self.failing = f"{self.path} or {self.json_lines} could not be written ({why})"
        self.failed_at = self.failed_at or time.time()
        shown = json.dumps(base, ensure_ascii=False, default=str) if base is not None else "(none)"
        log.warning("%s; the record: %s", self.failing, shown)

    def _insert(self, db: sqlite3.Connection, base: dict[str, Any]) -> Record:
        db.execute("BEGIN IMMEDIATE")
        try:
            last = db.execute("SELECT id, hash FROM records ORDER BY id DESC LIMIT 1").fetchone()
            values = {"id": (last["id"] + 1) if last else 1, **base}
            digest = chain(last["hash"] if last else GENESIS, values)
            db.execute(
                f"INSERT INTO records ({', '.join(COLUMNS)}, hash) VALUES ({', '.join('?' * len(COLUMNS))}, ?)",  # noqa: S608 - fixed column names
                (*(json.dumps(values[c], ensure_ascii=False) if c == "detail" else values[c] for c in COLUMNS), digest),
            )
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        return Record(**values, hash=digest)

    # -- reading ----------------------------------------------------------------------------

    def query(
        self,
        *,
        user: str | None = None,
        action: str | None = None,
        target: str | None = None,
        outcome: str | None = None,
        since: float | None = None,
        until: float | None = None,
        before: int | None = None,
        limit: int = DEFAULT_LIMIT,
    ) -> list[Record]:
        """Records newest first. ``action``: a part of it, any case (``statements``, ``POST /api``);
        ``target``: that path and everything under it (``/sessions/3`` finds ``/sessions/3/statements/7``,
        not ``/sessions/30``); ``since``/``until``: epoch seconds, inclusive; ``before``: ids below it."""
        where: list[str] = []
        params: list[Any] = []
        if user:
            where.append("user = ?")
            params.append(user)
        if action:
            where.append("instr(lower(action), lower(?)) > 0")
            params.append(action)
        if target:
            prefix = target.rstrip("/") or "/"
            where.append("(target = ? OR substr(target, 1, ?) = ?)")
            params += [prefix, len(prefix) + 1, prefix + "/" if prefix != "/" else "/"]
        if outcome:
            where.append("outcome = ?")
            params.append(outcome)
        if since is not None:
            where.append("time >= ?")
            params.append(since)
        if until is not None:
            where.append("time <= ?")
            params.append(until)
        if before is not None:
            where.append("id < ?")
            params.append(before)
        # fixed clauses only; every value is bound with ?
        sql = "SELECT * FROM records" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id DESC LIMIT ?"  # noqa: S608
        params.append(max(1, min(limit, MAX_LIMIT)))
        with self._lock:
            rows = self._open().execute(sql, params).fetchall()
        return [Record.from_row(row) for row in rows]

    def all(self) -> Iterator[Record]:
        """Every record, oldest first (for ``verify``), read a page at a time."""
        last = 0
        while True:
            with self._lock:
                rows = self._open().execute("SELECT * FROM records WHERE id > ? ORDER BY id LIMIT 5000", (last,)).fetchall()
            if not rows:
                return
            for row in rows:
                yield Record.from_row(row)
            last = rows[-1]["id"]


# -- studio audit ---------------------------------------------------------------------------------


def command(args: Any, settings: "Settings") -> int:
    """``studio audit``: the records of the trail in the identity directory, newest first, for
    people (one line each) or programs (``--json``, as in the JSON-lines file); ``--verify``
    checks the hash chain of the database and of the JSON-lines file."""
    trail = Trail.for_settings(settings, "cli")
    if not trail.path.is_file():
        print(f"studio audit: there is no audit trail in {trail.dir} (nothing recorded yet, or another --state-dir)", file=sys.stderr)
        return 1
    try:
        if args.verify:
            return _verify(trail)
        if not 1 <= args.limit <= MAX_LIMIT:
            print(f"studio audit: --limit must be 1 to {MAX_LIMIT}, got {args.limit}", file=sys.stderr)
            return 2
        try:
            records = trail.query(
                user=args.user,
                action=args.action,
                target=args.target,
                outcome=args.outcome,
                since=parse_time(args.since, "since"),
                until=parse_time(args.until, "until"),
                before=args.before,
                limit=args.limit,
            )
        except InvalidRequestError as exc:
            print(f"studio audit: {exc.msg}", file=sys.stderr)
            return 2
        for record in records:
            print(json.dumps(record.to_json(), ensure_ascii=False) if args.json else describe(record))
        return 0
    finally:
        trail.close()


def describe(record: Record) -> str:
    """One line for people: time, id, who (how, from where), action, target, outcome, statement, detail."""
    who = record.user or "-"
    if record.auth:
        who += f" ({record.auth})"
    if record.client:
        who += f" @{record.client}"
    parts = [iso(record.time).replace("T", " "), f"#{record.id}", record.server, who, record.action, record.target or "-", record.outcome]
    if record.code_sha256:
        parts.append(f"{record.first_line!r} sha256:{record.code_sha256[:16]}")
    if record.detail:
        parts.append(json.dumps(record.detail, ensure_ascii=False, separators=(",", ":")))
    return "  ".join(parts)


def _verify(trail: Trail) -> int:
    count = 0

    def counted() -> Iterator[Record]:
        nonlocal count
        for record in trail.all():
            count += 1
            yield record

    problems = verify(counted())
    lines: list[dict[str, Any]] = []
    if trail.json_lines.is_file():
        with trail.json_lines.open(encoding="utf-8") as handle:
            for number, text in enumerate(handle, 1):
                try:
                    lines.append(json.loads(text))
                except ValueError:
                    problems.append(f"{trail.json_lines}:{number} is not a JSON record")
        problems += [f"{trail.json_lines}: {problem}" for problem in verify(lines)]
    for problem in problems:
        print(f"studio audit: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"{trail.path}: {count} records, the chain holds; {trail.json_lines}: {len(lines)} lines, the chain holds")
    return 0


def record_local(identity_dir: Path, action: str, target: str = "", **detail: Any) -> Record | None:
    """A change made on this machine without a server (``studio users``, ``studio tokens``): on
    record as the operating system's user (``auth`` ``local``), server ``cli``. A trail that cannot
    be written is said on standard error (the change itself is made)."""
    import getpass

    from studio.config import Settings

    try:
        who = getpass.getuser()
    except (KeyError, OSError):
        who = f"uid {os.getuid()}"
    trail = Trail(identity_dir, Settings(identity_dir=identity_dir).audit_file, server="cli")
    try:
        record = trail.write(action, "ok", user=who, auth="local", target=target, detail=detail)
    finally:
        trail.close()
    if record is None:
        print(f"studio: warning: {trail.failing}", file=sys.stderr)
    return record


# -- notes from routes ----------------------------------------------------------------------------

NOTE = "studio.audit"


@dataclass
class Note:
    """What a route adds to its request's record (``note``)."""

    action: str | None = None
    user: str | None = None
    auth: str | None = None
    target: str | None = None
    code: str | None = None
    record: bool = False  # record this request even though its method only reads
    detail: dict[str, Any] = field(default_factory=dict)


def note(
    request: Request | Scope,
    *,
    action: str | None = None,
    user: str | None = None,
    auth: str | None = None,
    target: str | None = None,
    code: str | None = None,
    record: bool = False,
    **detail: Any,
) -> None:
    """Add to the record of this request: another ``action`` name, the ``user`` and ``auth`` (a
    sign-in names who tried, and how), the ``target`` (a create names what it made), a statement's ``code`` (kept as its
    SHA-256 and first line only), ``record=True`` for a read that matters, and ``detail`` (its
    None values left out).
    Does nothing for a request that is not behind an ``AuditMiddleware``."""
    scope = request.scope if isinstance(request, Request) else request
    found = scope.get(NOTE)
    if not isinstance(found, Note):
        return
    if action is not None:
        found.action = action
    if user is not None:
        found.user = user
    if auth is not None:
        found.auth = auth
    if target is not None:
        found.target = target
    if code is not None:
        found.code = code
    found.record = found.record or record
    found.detail.update({key: value for key, value in detail.items() if value is not None})


def sign_in_hook(known_user: Callable[[str], bool]) -> Callable[..., None]:
    """The gate's ``on_sign_in``: a browser sign-in, failed sign-in or sign-out becomes the record
    of its request, as ``sign-in`` or ``sign-out`` with how (``auth``: password, token,
    studio-token, token-url, oidc). A failed sign-in names the user it tried only when that user
    exists (``known_user``): what someone typed as a user name may be a password or a token (a
    name the identity provider asserted is kept, as ``claimed``)."""

    def on_sign_in(user: str, client: str, outcome: str, method: str, *, scope: Scope) -> None:
        if outcome == "signed-out":
            note(scope, action="sign-out", user=user or None, auth=method, record=True)
            return
        name = user.strip().lower()
        detail: dict[str, Any] = {"result": outcome}
        if outcome != "ok" and name and not known_user(name):
            # typed names may be secrets; one the identity provider asserted (oidc) is not
            detail["claimed"] = name if method == "oidc" else "not a user of this studio"
            name = ""
        note(scope, action="sign-in", user=name or None, auth=method, record=True, **detail)

    return on_sign_in


# -- the middleware -------------------------------------------------------------------------------


class DeniedLimit:
    """At most ``per_window`` records of refused, unauthenticated requests per client address and
    ``window`` seconds: anyone who can reach the port could otherwise fill the trail's disk with
    401s (and so have every change refused with 507). What is left out is logged when it starts,
    and counted in the client's next record (``detail.unrecorded``)."""

    def __init__(self, per_window: int = 60, window: float = 60.0) -> None:
        self.per_window = per_window
        self.window = window
        self._seen: dict[str, list[float]] = {}  # client -> [window start, recorded, unrecorded]

    def admit(self, client: str) -> tuple[bool, int]:
        """(whether to record this one, how many of this client's were left out before it)."""
        now = time.monotonic()
        entry = self._seen.get(client)
        if entry is None or now - entry[0] >= self.window:
            if entry is None and len(self._seen) >= 10_000:
                self._prune(now)
            self._seen[client] = [now, 1, 0]
            return True, int(entry[2]) if entry else 0
        if entry[1] < self.per_window:
            entry[1] += 1
            return True, 0
        entry[2] += 1
        if entry[2] == 1:
            log.warning(
                "more than %d refused unauthenticated requests from %s in %gs: the rest of them are not recorded",
                self.per_window, client, self.window,
            )
        return False, 0

    def _prune(self, now: float) -> None:
        for client, (start, _, unrecorded) in list(self._seen.items()):
            if now - start >= self.window:
                del self._seen[client]
                if unrecorded:
                    log.warning("%d refused unauthenticated requests from %s were not recorded", unrecorded, client)


class AuditMiddleware:
    """Records the requests that matter (see the module docstring); stands outside the gate."""

    def __init__(self, app: ASGIApp, trail: Trail, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.trail = trail
        self.routes = routes
        self.denied = DeniedLimit()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._lifespan_send(send))
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        template = self.template(scope)
        changing = method not in SAFE_METHODS and template not in READ_ONLY_POSTS
        scope[NOTE] = found = Note()
        if changing and scope["path"] not in NEVER_REFUSED:
            problem = self.trail.ready()
            if problem is not None:
                await self._refuse(scope, receive, send, template, problem)
                return
        status: list[int] = []

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, capture)
        except BaseException:
            if changing or found.record:
                self._record(scope, template, status[0] if status else 500, found)
            raise
        outcome = status[0] if status else None
        if changing or found.record or outcome in DENIED:
            self._record(scope, template, outcome if outcome is not None else "no response", found)

    def template(self, scope: Scope) -> str:
        """``METHOD /route/{template}``, or ``METHOD /the/path`` when no route has it."""
        path = scope["path"]
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is not Match.NONE:
                path = getattr(route, "path", path) or path
                break
        return f"{scope['method']} {_cut(path, MAX_PATH)}"

    def _record(self, scope: Scope, template: str, outcome: int | str, found: Note) -> Record | None:
        principal = scope.get("user")
        name = getattr(principal, "name", None) if getattr(principal, "is_authenticated", False) else None
        kind = getattr(principal, "kind", None) if name is not None else None
        client = scope.get("client")
        if name is None and outcome in DENIED:
            admitted, unrecorded = self.denied.admit(str(client[0]) if client else "")
            if not admitted:
                return None
            if unrecorded:
                found.detail["unrecorded"] = unrecorded
        try:
            return self.trail.write(
                found.action or template,
                outcome,
                user=found.user or name,
                auth=found.auth or kind,
                client=str(client[0]) if client else None,
                target=found.target or scope["path"],
                detail=found.detail,
                code=found.code,
            )
        except Exception:  # noqa: BLE001 - recording must never break the request
            log.exception("recording %s failed", template)
            return None

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, template: str, problem: str) -> None:
        from studio.web import JSONResponse

        message = (
            f"The audit trail cannot be written ({problem}), so this request was not carried out: nothing changed. "
            "Try again once it can be."
        )
        log.warning("%s %s refused with 507: %s", scope["method"], scope["path"], problem)
        if self.trail.failing is None:  # short of room, but the refusal may still fit
            note(scope, reason=problem)
            found = scope[NOTE]
            assert isinstance(found, Note)
            self._record(scope, template, StorageFullError.status_code, found)
        await JSONResponse({"msg": message}, status_code=StorageFullError.status_code)(scope, receive, send)

    def _lifespan_send(self, send: Send) -> Send:
        async def wrapped(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                try:
                    self.trail.open()
                except Exception as exc:  # noqa: BLE001 - requests that change something get 507 with the reason
                    self.trail.failing = f"the audit trail {self.trail.path} cannot be opened: {exc}"
                    self.trail.failed_at = time.time()
                    log.error("%s", self.trail.failing)
            elif message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                self.trail.close()
            await send(message)

        return wrapped


def middleware(
    gate: "Gate", settings: "Settings", server: str, routes: Sequence[BaseRoute], trail: Trail | None = None
) -> AuditMiddleware:
    """Put ``gate`` (with the app behind it) behind the audit trail of these settings, and have it
    tell the trail of every browser sign-in (``sign_in_hook``)."""

    def known_user(name: str) -> bool:
        directory = gate.directory
        return directory is not None and directory.get_user(name) is not None

    gate.on_sign_in = sign_in_hook(known_user)
    return AuditMiddleware(gate, trail or Trail.for_settings(settings, server), routes)
