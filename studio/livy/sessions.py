"""Interactive sessions: their states, statements, timeouts and workers.

A ``Session`` is the live object (its worker, its statement queue); its row in the store is
only the record. The ``SessionManager`` raises only ``studio.errors`` and knows nothing of HTTP.

Activity is counted as Livy counts it: on create, statement submit, cancel, completion and
when a session goes from busy to idle; GETs do not count. With ``heartbeatTimeoutInSecond``
any request about the session refreshes its heartbeat. Unlike Livy, a busy session is never
stopped for being idle (a long cell is not inactivity).

Sessions survive a restart of the service (Livy's recovery mode, always on): the store keeps
each session and its statements (code, state, output, timings) and the process record of its
worker, and workers outlive the service. A service that stops keeping its sessions lets go of them
(``detach``); the next one takes them back (``restore``): it adopts every live worker, learns what it did
meanwhile, and carries on with each statement where it was (a running one finishes and its
output arrives, a waiting one runs). A session whose worker did not survive is dead, with the
reason, and so are its unfinished statements: nothing accepted is ever silently missing.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import logging
import os
import shutil
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from studio import redact
from studio.config import Settings
from studio.errors import (
    CapacityError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    SessionNotActiveError,
    StorageFullError,
    StudioError,
    TooManySessionsError,
    WorkerError,
)
from studio.events import Event, EventBus
from studio.livy import sparkconf
from studio.livy.applications import Application, Applications, memory_mb
from studio.livy.access import Parties
from studio.livy.logs import LogFile, RetainedLogs
from studio.livy.models import (
    SESSION_TRANSITIONS,
    STATEMENT_TRANSITIONS,
    CompletionRequest,
    CreateSession,
    CreateStatement,
    InspectRequest,
    SessionKind,
    SessionState,
    StatementState,
    check_transition,
    parse_duration,
    parse_kind,
    view,
)
from studio.livy.pool import WorkerPool, available_memory_mb
from studio.livy.shared import SharedSessions
from studio.livy.workers import WorkerProcess, WorkerSpec, describe_worker_exit
from studio.store import Store

log = logging.getLogger("studio.livy.sessions")


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Statement:
    id: int
    code: str
    kind: SessionKind
    state: StatementState = StatementState.WAITING
    output: dict[str, Any] | None = None
    progress: float = 0.0
    started: int = 0
    completed: int = 0
    jobs: list[dict[str, Any]] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    output_size: int = 0  # characters of its output as JSON (counts against max_session_output_bytes)
    # What it printed while it ran (worker ``output`` messages), for ``?stream=``; the worker caps it
    # at max_output_bytes. ``unstreamed``: the output's text/plain that is not in it.
    stream: list[str] = field(default_factory=list)
    stream_length: int = 0
    unstreamed: str | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # set (and replaced) on new output or a final state
    request_key: str | None = None  # the client's Idempotency-Key: a retried POST finds this statement
    user: str | None = None  # who sent it (its jobs' description names them; not kept across a restart)

    def set_state(self, new: StatementState) -> None:
        check_transition(STATEMENT_TRANSITIONS, self.state, new, f"statement {self.id}")
        self.state = new
        if new.is_final:
            self.progress = 1.0
            self.completed = now_ms()
            self.done.set()
            self._changed()

    def add_output(self, text: str, unstreamed: str | None, replay: bool = False) -> None:
        if replay:  # everything it printed so far, again (a worker that a restarted service attached)
            self.stream, self.stream_length = [], 0
        if text:
            self.stream.append(text)
            self.stream_length += len(text)
        if unstreamed is not None:
            self.unstreamed = unstreamed
        self._changed()

    def _changed(self) -> None:
        event, self.changed = self.changed, asyncio.Event()
        event.set()

    def stream_json(self, start: int) -> dict[str, Any]:
        """Spark Studio's extension: what it printed from character ``start`` on (Livy clients never ask)."""
        if len(self.stream) > 1:
            self.stream[:] = ["".join(self.stream)]
        start = min(max(0, start), self.stream_length)
        stream: dict[str, Any] = {"from": start, "text": self.stream[0][start:] if self.stream else "", "total": self.stream_length}
        if self.state.is_final and self.unstreamed is not None:
            stream["unstreamed"] = self.unstreamed
        return stream

    def to_json(self, detail: bool = False, stream: int | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "code": self.code,
            "state": self.state.value,
            "output": self.output,
            "progress": self.progress,
            "started": self.started,
            "completed": self.completed,
        }
        if detail:
            data["jobs"] = self.jobs
        if stream is not None:
            data["stream"] = self.stream_json(stream)
        return data


class Session:
    """One interactive session and its worker."""

    def __init__(self, session_id: int, body: CreateSession, kind: SessionKind, conf: dict[str, str]) -> None:
        self.id = session_id
        self.body = body
        self.name = body.name
        self.kind = kind
        self.conf = conf  # the Spark conf the session asked for (as shown in its JSON)
        self.owner: str | None = None
        self.state = SessionState.STARTING
        self.worker: WorkerProcess | None = None
        self.log: LogFile | None = None
        self.app_id: str | None = None
        self.spark_ui_url: str | None = None
        self.warm = False
        self.statements: OrderedDict[int, Statement] = OrderedDict()
        self.next_statement_id = 0
        self.queue: asyncio.Queue[int] = asyncio.Queue()
        self.runner: asyncio.Task[None] | None = None
        self.created = time.monotonic()
        self.created_epoch = time.time()
        self.last_activity = self.created
        self.last_heartbeat = self.created
        self.heartbeat_timeout = float(body.heartbeatTimeoutInSecond or 0)
        self.ttl = parse_duration(body.ttl, "ttl")
        self.idle_timeout = parse_duration(body.idleTimeout, "idleTimeout")
        self.ended: float | None = None  # monotonic time it reached a final state
        self.stopped = asyncio.Event()  # set on reaching a final state (a DELETE waits for it)
        self.reason = ""
        self.sql_num_rows: int | None = None
        self.resumed: set[int] = set()  # statements an earlier run of the service sent to the worker
        self.unacked: set[int] = set()  # finished statements whose record a full disk holds back (the worker keeps them)
        self.application_id = ""  # the application it runs in (studio.livy.applications)
        self.application_name = "default"
        self.driver_memory_mb = 1024  # what its driver counts against its application's maximumCapacity
        self.driver_cores = 1.0
        self.first_result = False  # a statement of it has finished (the time to first result is measured once)
        self.shared_user: str | None = None  # shared-driver mode: the user whose driver it runs on
        self.on_change: Callable[["Session", SessionState, SessionState], None] | None = None

    @property
    def spark_user(self) -> str | None:
        """The user its driver runs as (``SPARK_USER``): its proxyUser, else its owner (``studio.livy.access``)."""
        return self.body.proxyUser or self.owner

    @property
    def active(self) -> bool:
        return self.state in (SessionState.IDLE, SessionState.BUSY)

    @property
    def live(self) -> bool:
        return self.state in (SessionState.STARTING, SessionState.IDLE, SessionState.BUSY)

    def set_state(self, new: SessionState) -> None:
        check_transition(SESSION_TRANSITIONS, self.state, new, f"session {self.id}")
        old, self.state = self.state, new
        if new.is_final:
            self.ended = time.monotonic()
            self.stopped.set()
        if self.on_change is not None:
            self.on_change(self, old, new)

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    def idle_timeout_setting(self, default: float) -> tuple[float, str]:
        """(seconds of inactivity after which it is stopped, 0 for never; where that comes from).

        ``idleTimeout`` and ``ttl`` are both the session's own inactivity timeout, ``idleTimeout``
        first: Livy's documentation of the session object calls ``ttl`` "the timeout for this inactive
        session", and Livy 0.8 enforces it so; Livy 0.9 added ``idleTimeout`` for that and enforces ``ttl``
        as a lifetime since start only with ``livy.server.session.ttl-check`` (off by default)."""
        if self.idle_timeout is not None:
            return self.idle_timeout, "its idleTimeout"
        if self.ttl is not None:
            return self.ttl, "its ttl"
        return default, "STUDIO_SESSION_IDLE_TIMEOUT"

    def to_json(self, base_url: str) -> dict[str, Any]:
        body = self.body
        return {
            "id": self.id,
            "name": self.name,
            "appId": self.app_id,
            "owner": self.owner,
            "proxyUser": self.spark_user,  # as Livy with impersonation on: whom the driver runs as
            "state": self.state.value,
            "kind": self.kind.value,
            "appInfo": {
                "driverLogUrl": f"{base_url}ui/session/{self.id}/log",
                "sparkUiUrl": self.spark_ui_url,
                "executorLogUrls": None,
            },
            "log": self.log.tail(10) if self.log else [],
            "ttl": body.ttl,
            "idleTimeout": body.idleTimeout,
            "driverMemory": body.driverMemory,
            "driverCores": body.driverCores or 0,
            "executorMemory": body.executorMemory,
            "executorCores": body.executorCores or 0,
            "conf": redact.conf(body.conf),
            "archives": body.archives,
            "files": body.files,
            "heartbeatTimeoutInSecond": body.heartbeatTimeoutInSecond,
            "jars": body.jars,
            "numExecutors": body.numExecutors or 0,
            "pyFiles": body.pyFiles,
            "queue": body.queue,
        }


class SessionManager:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        applications: Applications,
        new_worker: Callable[[WorkerSpec], WorkerProcess],
        base_conf: Callable[[], dict[str, str]],
        events: EventBus | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.applications = applications
        self.events = events
        self._new_worker = new_worker
        self._base_conf = base_conf
        self.sessions: dict[int, Session] = {}
        self._creating = 0  # creates under way (they hold a place against their owner's quota and the memory)
        self._creating_dedicated = 0  # and those of dedicated drivers against max_sessions
        self._creating_by: Counter[str] = Counter()  # and against their owner's quota
        self._creating_names: set[str] = set()
        self.retained_logs = RetainedLogs()
        self._background: set[asyncio.Task[Any]] = set()
        self._pending: dict[int, tuple[str, int, float]] = {}  # creates under way: (application id, MB, cores)
        # Hooks for the metrics (studio.livy.observe): seconds from create to first result, and per statement.
        self.on_first_result: Callable[[Session, float], None] = lambda session, seconds: None
        self.on_statement_done: Callable[[Session, Statement, float], None] = lambda session, statement, seconds: None
        applications.session_usage = self.usage_of
        applications.pools_busy = self.any_busy
        self.shared: SharedSessions | None = None  # shared-driver mode (set by the service)

    @property
    def pool(self) -> WorkerPool:
        """The default application's pool (the one pool of the versions before applications)."""
        return self.applications.default.pool

    def usage_of(self, app: Application) -> builtins.list[tuple[int, float]]:
        """(driver MB, cores) of each live session of ``app`` and each create under way in it."""
        live = [(s.driver_memory_mb, s.driver_cores) for s in self.sessions.values() if s.live and s.application_id == app.id]
        return live + [(mb, cores) for app_id, mb, cores in self._pending.values() if app_id == app.id]

    # -- lookup ---------------------------------------------------------------------------

    def list(
        self, start: int, size: int, visible: Callable[[Session], bool] | None = None, application: Application | None = None
    ) -> tuple[int, list[Session]]:
        """A page of the sessions ``visible`` keeps (all without it), in id order, and how many it keeps;
        with ``application``, only that application's."""
        ordered = [
            self.sessions[k]
            for k in sorted(self.sessions)
            if (visible is None or visible(self.sessions[k])) and (application is None or self.sessions[k].application_id == application.id)
        ]
        return len(ordered), view(ordered, start, size)

    def in_application(self, session: Session, application: Application | None) -> Session:
        """``session`` when it runs in ``application`` (None: any), else 404 as if it did not exist:
        each application's Livy endpoint shows only its own sessions."""
        if application is not None and session.application_id != application.id:
            raise NotFoundError(f"Session '{session.id}' not found in application '{application.name}'.")
        return session

    def get(self, key: str | int, visible: Callable[[Session], bool] | None = None) -> Session:
        """A session by id, or by name (Livy accepts both in every /sessions/{id} route).

        A name passes from session to session (a new one may take the name of one that is no
        longer live), so a name means its live session, else the newest that had it; among those
        ``visible`` keeps (the caller's own) first, so another user's live session of the same name
        never hides one's own ended one. The caller checks its access to what this returns."""
        text = str(key)
        if text.lstrip("-").isdigit():
            session = self.sessions.get(int(text))
        else:
            named = [s for s in self.sessions.values() if s.name == text]
            if visible is not None and any(visible(s) for s in named):
                named = [s for s in named if visible(s)]
            live = [s for s in named if s.live]
            session = live[0] if live else (max(named, key=lambda s: s.id) if named else None)
        if session is None:
            raise NotFoundError(f"Session '{text}' not found.")
        return session

    def _live_named(self, name: str) -> Session | None:
        return next((s for s in self.sessions.values() if s.live and s.name == name), None)

    def any_busy(self) -> bool:
        return any(s.state is SessionState.BUSY for s in self.sessions.values())

    def live_count(self) -> int:
        return sum(1 for s in self.sessions.values() if s.live)

    def dedicated_count(self) -> int:
        """Live sessions with a driver of their own: what STUDIO_MAX_SESSIONS counts."""
        return sum(1 for s in self.sessions.values() if s.live and s.shared_user is None)

    def _admit_memory(self, app: Application, spark_user: str | None) -> None:
        """The session's footprint fits in the memory budget with everything that runs (measured), or 400."""
        shared = self.shared
        if shared is None:
            return
        admission = shared.admission
        live = [(s.worker.pid if s.worker else None, "lean" if s.shared_user else "dedicated") for s in self.sessions.values() if s.live]
        pooled = [(pid, "dedicated") for pool in self.applications.pools() for pid in pool.pids()]
        pending = admission.estimate("lean") * (self._creating - self._creating_dedicated) + admission.estimate("dedicated") * self._creating_dedicated
        if app.shared:
            user = shared.user_of(spark_user)
            needed = admission.estimate("lean") + (admission.estimate("driver") if shared.needs_driver(app, user) else 0)
            what = "a shared-driver session" + (" and its user's driver" if shared.needs_driver(app, user) else "")
        else:
            needed, what = admission.estimate("dedicated"), "a session with a driver of its own"
        admission.admit(shared.used_mb([*live, *pooled]) + pending, needed, what)

    def held_by(self, owner: str) -> int:
        """Live sessions of ``owner`` and its creates under way: what its quota counts."""
        return sum(1 for s in self.sessions.values() if s.live and s.owner == owner) + self._creating_by[owner]

    def heartbeat(self, session: Session) -> None:
        session.last_heartbeat = time.monotonic()

    # -- create ---------------------------------------------------------------------------

    def validate(self, body: CreateSession) -> tuple[SessionKind, dict[str, str]]:
        """Everything about a create request that can be checked without starting anything
        (``POST /studio/sessions/check`` and ``create`` share it, so both word a refusal alike).
        Returns the kind and the requested conf; name uniqueness and capacity are create's."""
        kind = parse_kind(body.kind, statement=False) or SessionKind.SHARED
        if body.name is not None and (body.name.strip().lstrip("-").isdigit() or not body.name.strip()):
            raise InvalidRequestError(f"Rejected, Reason: session name '{body.name}' must not be a number or empty.")
        if body.heartbeatTimeoutInSecond < 0:
            raise InvalidRequestError("Rejected, Reason: heartbeatTimeoutInSecond must not be negative.")
        parse_duration(body.ttl, "ttl")
        parse_duration(body.idleTimeout, "idleTimeout")
        sparkconf.check_settings(body)
        requested = sparkconf.requested_conf(body)
        _int_conf(sparkconf.split_service_conf(requested)[1], "livy.rsc.sql.num-rows")
        return kind, requested

    async def create(
        self,
        body: CreateSession,
        owner: str | None = None,
        quota: Callable[[], None] | None = None,
        application: Application | None = None,
    ) -> Session:
        """Start a session for ``owner`` in ``application`` (the default one without it); ``body.proxyUser``
        is its Spark user, checked by the caller (``studio.livy.access``). ``quota`` raises
        QuotaExceededError when the owner has no room left (it reads ``held_by``); it is asked after the
        request is found valid and before anything starts. A stopped application with auto-start on
        starts (``Applications.ensure_started``)."""
        app = application or self.applications.default
        kind, requested = self.validate(body)
        if body.name is not None and (body.name in self._creating_names or self._live_named(body.name)):
            raise InvalidRequestError(f"Rejected, Reason: a session named '{body.name}' already exists.")
        spark_conf, service_conf = sparkconf.split_service_conf(requested)
        beyond = sparkconf.beyond_shape(spark_conf, app.driver_conf())
        if app.shared and sparkconf.needs_own_jvm(beyond):
            raise InvalidRequestError(
                f"Rejected, Reason: application '{app.name}' runs sessions on a shared Spark driver (driverMode SHARED), "
                f"whose settings are the application's; this session asks for "
                f"{', '.join(sorted(k for k in beyond if not k.startswith('spark.sql.')))}. Only runtime SQL conf "
                "(spark.sql.*) may differ per session; use an application with driverMode DEDICATED for a driver of your own."
            )
        if sparkconf.needs_own_jvm(beyond) and app.definition.interactiveConfiguration.offShapeSessions == "REFUSE":
            raise InvalidRequestError(
                f"Rejected, Reason: application '{app.name}' runs only drivers of its own shape, and this session asks for "
                f"{', '.join(sorted(k for k in beyond if not k.startswith('spark.sql.')))}; use an application of that shape."
            )
        if quota is not None:
            quota()
        self._admit_memory(app, body.proxyUser or owner)
        live = self.dedicated_count() + self._creating_dedicated
        if not app.shared and live >= self.settings.max_sessions:
            raise TooManySessionsError(
                f"Rejected, too many sessions: {live} of {self.settings.max_sessions} are live "
                "(STUDIO_MAX_SESSIONS); delete one first."
            )
        await self.applications.ensure_started(app)
        # The name and the capacity are held from here: creating can wait on a worker, and a second
        # request meanwhile must not take the same name or the last place.
        if body.name is not None:
            self._creating_names.add(body.name)
        self._creating += 1
        self._creating_dedicated += 0 if app.shared else 1
        self._creating_by[owner or ""] += 1
        try:
            return await self._create(body, owner, kind, requested, beyond, service_conf, app)
        finally:
            self._creating -= 1
            self._creating_dedicated -= 0 if app.shared else 1
            self._creating_by[owner or ""] -= 1
            self._creating_names.discard(body.name or "")

    async def _create(
        self,
        body: CreateSession,
        owner: str | None,
        kind: SessionKind,
        requested: dict[str, str],
        spark_conf: dict[str, str],
        service_conf: dict[str, str],
        app: Application,
    ) -> Session:
        """``spark_conf`` is what the session asks for beyond its application's driver shape."""
        session_id = self.store.next_id("session")
        session = Session(session_id, body, kind, requested)
        session.owner = owner
        session.sql_num_rows = _int_conf(service_conf, "livy.rsc.sql.num-rows")
        session.application_id, session.application_name = app.id, app.name
        driver = sparkconf.overlay(app.driver_conf(), spark_conf)
        session.driver_memory_mb = memory_mb(driver.get("spark.driver.memory", "1g"), "spark.driver.memory") or 1024
        session.driver_cores = float(driver.get("spark.driver.cores", "1"))

        if app.shared:
            return await self._create_shared(session, body, kind, spark_conf, app)
        own_jvm = sparkconf.needs_own_jvm(spark_conf)
        # While it is created it holds its place in the application's capacity (another create must not take it).
        self._pending[session_id] = (app.id, session.driver_memory_mb, session.driver_cores)
        try:
            worker, claim = await self._warm_worker(session, app, spark_conf, own_jvm)
            if worker is None and claim is None:
                self._pending.pop(session_id, None)
                self.applications.admit_session(app, session.driver_memory_mb, session.driver_cores, warm=False)
                self._pending[session_id] = (app.id, session.driver_memory_mb, session.driver_cores)
                app.pool_misses += 1
                free = available_memory_mb()
                if free is not None and free < self.settings.min_available_memory_mb:
                    raise CapacityError(
                        f"Not enough memory to start another Spark session: {free} MB available, "
                        f"{self.settings.min_available_memory_mb} MB needed (STUDIO_MIN_AVAILABLE_MEMORY_MB)."
                    )
            try:
                self.store.insert(
                    "sessions",
                    {
                        "id": session_id,
                        "name": body.name,
                        "kind": kind.value,
                        "owner": owner,
                        "state": session.state.value,
                        "request": body.model_dump(),
                        "application_id": app.id,
                    },
                )
            except StorageFullError:
                if worker is not None:
                    app.pool.discard(worker)  # activated for this session: it cannot go back to the pool
                if claim is not None:
                    claim.cancel()
                raise
            session.on_change = self._state_changed
            self.sessions[session_id] = session
        finally:
            self._pending.pop(session_id, None)
        self._publish(session, None, session.state)
        if worker is not None:
            app.pool.commit(worker)
            app.pool_hits += 1
            self._hand_over(session, worker)
        elif claim is not None:
            self._spawn(self._start_claimed(session, app, claim, spark_conf))
        else:
            self._start_own(session, app, spark_conf)
        session.runner = asyncio.create_task(self._run_statements(session), name=f"session-{session_id}")
        return session

    async def _create_shared(
        self, session: Session, body: CreateSession, kind: SessionKind, spark_conf: dict[str, str], app: Application
    ) -> Session:
        """A lean session on its user's shared driver: a warm lean worker at once when the driver runs and
        its pool has one, else (in the background) the driver started and a lean worker of its own."""
        assert self.shared is not None
        user = self.shared.user_of(session.spark_user)
        session.shared_user = user
        session.driver_memory_mb, session.driver_cores = 0, 0.0  # the driver's memory is counted once, as the driver's
        self.shared.hold(app, user)
        worker: WorkerProcess | None = None
        claim: "asyncio.Future[WorkerProcess] | None" = None
        pool = self.shared.pool(app, user)
        try:
            if pool is not None:
                worker, claim = await self._warm_worker(session, app, spark_conf, False, pool)
            self.store.insert(
                "sessions",
                {
                    "id": session.id,
                    "name": body.name,
                    "kind": kind.value,
                    "owner": session.owner,
                    "state": session.state.value,
                    "request": body.model_dump(),
                    "application_id": app.id,
                },
            )
        except BaseException:
            if worker is not None and pool is not None:
                pool.discard(worker)
            if claim is not None:
                claim.cancel()
            self.shared.let_go(app.id, user)
            raise
        session.on_change = self._state_changed
        self.sessions[session.id] = session
        self._publish(session, None, session.state)
        if worker is not None and pool is not None:
            pool.commit(worker)
            app.pool_hits += 1
            self._hand_over(session, worker)
        elif claim is not None and pool is not None:
            self._spawn(self._start_claimed(session, app, claim, spark_conf, pool))
        else:
            app.pool_misses += 1
            self._spawn(self._start_lean(session, app, spark_conf))
        session.runner = asyncio.create_task(self._run_statements(session), name=f"session-{session.id}")
        return session

    async def _start_lean(self, session: Session, app: Application, spark_conf: dict[str, str]) -> None:
        """A lean worker of the session's own on its user's driver, which is started first when it is not running."""
        assert self.shared is not None and session.shared_user is not None
        try:
            driver = await self.shared.driver(app, session.shared_user)
        except Exception as exc:  # noqa: BLE001 - any failure to start the driver ends this session, not the service
            if session.state is SessionState.STARTING:
                message = getattr(exc, "msg", None) or f"{type(exc).__name__}: {exc}"
                log.warning("session %d: the shared driver of %s did not start: %s", session.id, session.shared_user, message)
                self._finish(session, SessionState.DEAD, f"its user's shared Spark driver did not start: {message}")
            return
        if session.state is not SessionState.STARTING:
            return
        pool = self.shared.pool(app, session.shared_user)
        if pool is not None:  # the driver came up with its pool: a warm lean worker may be ready already
            worker = pool.take()
            if worker is not None and await self._activate_for(session, app, worker, spark_conf, pool):
                if session.state is not SessionState.STARTING:
                    pool.discard(worker)
                    return
                pool.commit(worker)
                app.pool_hits += 1
                self._hand_over(session, worker)
                return
        spec = self.shared.spec(app, session.shared_user, driver, warm=False, session_name=session.name or f"livy-session-{session.id}")
        spec.conf = dict(spark_conf)  # runtime SQL conf, set on its Connect session when it starts
        worker = self._new_worker(spec)
        self._attach(session, worker)
        await self._start_cold(session, worker)

    async def _warm_worker(
        self, session: Session, app: Application, spark_conf: dict[str, str], own_jvm: bool, pool: WorkerPool | None = None
    ) -> tuple[WorkerProcess | None, "asyncio.Future[WorkerProcess] | None"]:
        """A warm worker of the application's shape, activated for the session; else the promise of the
        one its pool is starting (``claim``); else neither (the session needs a driver of its own).
        ``pool``: another pool than the application's (a user's shared driver's)."""
        pool = pool or app.pool
        if own_jvm or not pool.size:
            return None, None
        worker = pool.take()
        if worker is not None:
            if await self._activate_for(session, app, worker, spark_conf, pool):
                return worker, None
            return None, None
        if app.shared:
            return None, pool.claim()
        if not app.pool.unclaimed_starting():  # that driver is counted already; a new one must fit
            held = self._pending.pop(session.id, None)  # (the session's own place is the one asked about)
            try:
                if app.room_for(session.driver_memory_mb, session.driver_cores) is not None:
                    return None, None
            finally:
                if held is not None:
                    self._pending[session.id] = held
        return None, app.pool.claim()

    async def _activate_for(
        self, session: Session, app: Application, worker: WorkerProcess, spark_conf: dict[str, str], pool: WorkerPool | None = None
    ) -> bool:
        """Give a warm worker the session's runtime conf and user: True when it took them; False when it
        cannot serve this session (it went back to the pool, or was stopped). Bad conf raises."""
        pool = pool or app.pool
        reply = await self._activate(pool, worker, spark_conf, session.id, session.spark_user)
        if reply is None:
            return False
        if reply.get("identity_error"):
            # Its conf is applied and its identity half set: it cannot serve this session or go back.
            log.warning("warm worker %s could not take the user %s (%s); starting a cold one", worker.id, session.spark_user, reply["identity_error"])
            pool.discard(worker)
            return False
        if reply.get("error"):
            pool.give_back(worker)
            raise InvalidRequestError(f"Rejected, Reason: invalid conf: {reply['error']}")
        if not reply.get("ok"):
            log.info("session %d needs its own JVM for %s", session.id, ", ".join(reply.get("static", [])))
            pool.give_back(worker)
            return False
        return True

    def _hand_over(self, session: Session, worker: WorkerProcess) -> None:
        session.warm = True
        self._attach(session, worker)
        worker.log.append(f"handed out of the warm pool to session {session.id}")
        worker.renice(0)
        self._became_ready(session)

    def _start_own(self, session: Session, app: Application, spark_conf: dict[str, str]) -> None:
        """A cold driver of the session's own: the application's shape with the session's settings over it."""
        spec = WorkerSpec(
            conf=sparkconf.overlay(self._base_conf(), app.driver_conf(), {**spark_conf, **sparkconf.user_conf(session.spark_user)}),
            app_name=session.name or f"livy-session-{session.id}",
            warmup=False,
            env=sparkconf.user_env(session.spark_user),
            user=session.spark_user,
            application_id=app.id,
        )
        worker = self._new_worker(spec)
        self._attach(session, worker)
        self._spawn(self._start_cold(session, worker))

    async def _start_claimed(
        self,
        session: Session,
        app: Application,
        claim: "asyncio.Future[WorkerProcess]",
        spark_conf: dict[str, str],
        pool: WorkerPool | None = None,
    ) -> None:
        """The session waits for the warm worker its application's pool is starting; if that fails, or
        the worker cannot take the session, it gets a cold one after all."""
        pool = pool or app.pool
        try:
            worker: WorkerProcess | None = await asyncio.wait_for(asyncio.shield(claim), self.settings.worker_start_timeout)
        except (WorkerError, OSError, asyncio.TimeoutError, asyncio.CancelledError) as exc:
            claim.cancel()
            if session.state is SessionState.STARTING:
                log.info("session %d: the warm driver it waited for did not come (%s); starting one of its own", session.id, exc or type(exc).__name__)
            worker = None
        if session.state is not SessionState.STARTING:  # deleted meanwhile
            if worker is not None:
                pool.give_back(worker)
            return
        try:
            ok = worker is not None and await self._activate_for(session, app, worker, spark_conf, pool)
        except InvalidRequestError as exc:
            self._finish(session, SessionState.DEAD, exc.msg)
            return
        if session.state is not SessionState.STARTING:
            if worker is not None and ok:
                pool.discard(worker)
            return
        if ok and worker is not None:
            app.pool_hits += 1
            self._hand_over(session, worker)
        else:
            app.pool_misses += 1
            if app.shared:
                await self._start_lean(session, app, spark_conf)
            else:
                self._start_own(session, app, spark_conf)

    async def _activate(
        self, pool: WorkerPool, worker: WorkerProcess, conf: dict[str, str], session_id: int, user: str | None
    ) -> dict[str, Any] | None:
        try:
            return await asyncio.wait_for(worker.activate(conf, session_id, user), 30)
        except (WorkerError, asyncio.TimeoutError, ConnectionError, OSError) as exc:
            log.warning("warm worker %s failed on hand-out (%s); starting a cold one", worker.id, exc)
            pool.discard(worker)
            return None

    def _state_changed(self, session: Session, old: SessionState, new: SessionState) -> None:
        self._publish(session, old, new)
        if new.is_final and session.shared_user is not None and self.shared is not None:
            self.shared.let_go(session.application_id, session.shared_user)
        if new.is_final:
            app = self.applications.find(session.application_id)
            if app is not None:
                self.applications.touch(app)  # its idle time (auto-stop) counts from its last session's end
            self._spawn(self.applications.notify_room())

    def _publish(self, session: Session, old: SessionState | None, new: SessionState) -> None:
        if self.events is not None:
            reason = session.reason if new.is_final else ""
            self.events.publish(
                Event("session", str(session.id), new.value, old.value if old else None, reason, name=session.name, owner=session.owner, application=session.application_name)
            )

    def _attach(self, session: Session, worker: WorkerProcess) -> None:
        session.worker = worker
        session.log = worker.log
        worker.session_id = session.id
        worker.on_progress = lambda message: self._on_progress(session, message)
        worker.on_output = lambda message: self._on_output(session, message)
        worker.exited.add_done_callback(lambda fut: self._on_worker_exit(session, worker, fut.result()))
        self.store.update("sessions", session.id, defer=True, log_path=str(worker.log.path))
        self.store.update("workers", worker.id, defer=True, session_id=session.id)  # a warm one's row exists already

    async def _start_cold(self, session: Session, worker: WorkerProcess) -> None:
        await self._await_ready(session, worker, start=True)

    async def _await_ready(self, session: Session, worker: WorkerProcess, start: bool) -> None:
        try:
            if start:
                await worker.start()
            await worker.wait_ready()
        except (WorkerError, OSError) as exc:
            if session.state is SessionState.STARTING:
                message = getattr(exc, "msg", str(exc))
                worker.log.append(f"session {session.id} failed to start: {message}")
                await worker.stop(now=True)
                self._finish(session, SessionState.DEAD, f"failed to start: {message}")
            return
        if session.state is SessionState.STARTING:
            self._became_ready(session)

    def _became_ready(self, session: Session) -> None:
        assert session.worker is not None
        session.app_id = session.worker.info.get("app_id")
        session.spark_ui_url = session.worker.info.get("spark_ui_url")
        if self.shared is not None:  # what a session of its kind takes, for the next admission
            admission = self.shared.admission
            admission.learn("lean" if session.shared_user else "dedicated", admission.measure(session.worker.pid))
        session.set_state(SessionState.IDLE)
        session.touch()
        self.store.update("sessions", session.id, defer=True, state=session.state.value, app_id=session.app_id)

    # -- statements -----------------------------------------------------------------------

    def add_statement(
        self, session: Session, body: CreateStatement, request_key: str | None = None, user: str | None = None
    ) -> Statement:
        """Queue a statement sent by ``user``. A ``request_key`` (the client's Idempotency-Key header)
        that this session has seen gives back that statement instead: a client that lost the answer to
        its POST (the service restarted meanwhile) sends it again without running the code twice."""
        if request_key:
            for known in reversed(session.statements.values()):
                if known.request_key == request_key:
                    return known
        if session.state is SessionState.STARTING:
            raise ConflictError(
                f"Session {session.id} is starting; it accepts statements once its state is idle."
            )
        if not session.active:
            raise SessionNotActiveError(
                f"requirement failed: Session isn't active. Session {session.id} is {session.state.value}."
            )
        size = len(body.code.encode("utf-8"))
        if size > self.settings.max_code_bytes:
            raise PayloadTooLargeError(
                f"Statement code is {size:,} bytes; the limit is {self.settings.max_code_bytes:,} "
                "(STUDIO_MAX_CODE_BYTES)."
            )
        kind = parse_kind(body.kind, statement=True) or (
            SessionKind.SQL if session.kind is SessionKind.SQL else SessionKind.PYSPARK
        )
        statement = Statement(session.next_statement_id, body.code, kind, request_key=request_key or None, user=user)
        # Recorded before anything else knows of it: accepted means it survives a restart of the
        # service, and one that cannot be recorded (a full disk: 507) was never there at all.
        self.store.add_statement(
            session.id, statement.id, code=statement.code, kind=kind.value, state=statement.state.value, request_key=statement.request_key
        )
        session.next_statement_id += 1
        session.statements[statement.id] = statement
        self._evict(session)
        session.touch()
        if session.state is SessionState.IDLE:
            session.set_state(SessionState.BUSY)
        session.queue.put_nowait(statement.id)
        return statement

    def _evict(self, session: Session, keep: int | None = None) -> None:
        """Forget the oldest finished statements beyond ``retained_statements`` (Livy keeps 100) or
        beyond ``max_session_output_bytes`` of output; ``keep`` (the one that just finished, which
        its client has yet to read) is never forgotten."""
        excess = len(session.statements) - self.settings.retained_statements
        excess_bytes = sum(s.output_size for s in session.statements.values()) - self.settings.max_session_output_bytes
        for sid in list(session.statements):
            if excess <= 0 and excess_bytes <= 0:
                break
            statement = session.statements[sid]
            if statement.state.is_final and sid != keep:
                del session.statements[sid]
                self.store.forget_statements(session.id, sid, defer=True)
                if session.worker is not None:
                    session.worker.result_file(sid).unlink(missing_ok=True)
                excess -= 1
                excess_bytes -= statement.output_size

    def result_file(self, session: Session, statement_id: int) -> Path:
        """The Arrow result of a finished statement (written by the kernel's magics)."""
        statement = self.get_statement(session, statement_id)
        path = session.worker.result_file(statement.id) if session.worker is not None else None
        if not statement.state.is_final or path is None or not path.is_file():
            raise NotFoundError(f"Statement {statement_id} of session {session.id} has no Arrow result.")
        return path

    def get_statement(self, session: Session, statement_id: int) -> Statement:
        statement = session.statements.get(statement_id)
        if statement is None:
            raise NotFoundError(f"Statement {statement_id} not found in session {session.id}.")
        return statement

    async def wait_statement(self, statement: Statement, timeout: float, stream_from: int | None = None) -> None:
        """Wait up to ``timeout`` seconds for the statement to be final, or, with ``stream_from``,
        for it to print past that offset (whichever comes first)."""
        deadline = time.monotonic() + timeout
        while not statement.state.is_final:
            # The last chunk (with ``unstreamed``) comes just before the result: wait for that, so a
            # statement that printed costs its client no extra round trip.
            last_chunk_in = statement.unstreamed is not None
            if stream_from is not None and statement.stream_length > stream_from and not last_chunk_in:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            event = statement.done if stream_from is None or last_chunk_in else statement.changed
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except asyncio.TimeoutError:
                return

    async def _run_statements(self, session: Session) -> None:
        """Runs the session's statements one at a time, in order, like Livy's interpreter thread.
        A statement that an earlier run of the service sent (``resumed``) is not sent again: its
        result is awaited."""
        while True:
            statement_id = await session.queue.get()
            statement = session.statements.get(statement_id)
            worker = session.worker
            resumed = statement_id in session.resumed
            session.resumed.discard(statement_id)
            if statement is None or worker is None or not (statement.state is StatementState.WAITING or resumed):
                self._maybe_idle(session)
                continue
            try:
                if resumed:
                    output = await worker.result(statement.id)
                else:
                    # Not recorded as running (a write less per statement): after a restart the worker
                    # says whether it had it (then it is running, since when the worker says) or not.
                    statement.set_state(StatementState.RUNNING)
                    statement.started = now_ms()
                    output = await worker.execute(
                        statement.id,
                        statement.code,
                        statement.kind.value,
                        session.sql_num_rows or self.settings.sql_num_rows,
                        statement.user,
                    )
            except WorkerError as exc:
                output = {"status": "error", "ename": "SessionWorkerDied", "evalue": exc.msg, "traceback": []}
            recorded = True
            if not statement.state.is_final:
                statement.output = {"status": output.get("status", "error"), "execution_count": statement.id, **output}
                statement.set_state(
                    StatementState.CANCELLED
                    if statement.state is StatementState.CANCELLING
                    else StatementState.AVAILABLE
                )
                recorded = self._record(session, statement)
                self._evict(session, keep=statement.id)
                self._measure(session, statement)
            if recorded:
                worker.ack(statement.id)  # recorded: the worker may forget it
            else:
                # A full disk holds its record back: the worker keeps the result (a restart meanwhile
                # gets it from there) until the record is written (``acknowledge_recorded``).
                session.unacked.add(statement.id)
            self._maybe_idle(session)

    def _measure(self, session: Session, statement: Statement) -> None:
        try:
            if statement.started:
                self.on_statement_done(session, statement, max(0.0, (now_ms() - statement.started) / 1000))
            if not session.first_result:
                session.first_result = True
                self.on_first_result(session, time.monotonic() - session.created)
        except Exception:  # noqa: BLE001 - metrics never fail a statement
            log.exception("measuring statement %d of session %d failed", statement.id, session.id)

    def _record(self, session: Session, statement: Statement) -> bool:
        """Write a statement's state (and, once final, its output and what it printed) to the store;
        False when a full disk holds the write back (it is written once there is room)."""
        fields: dict[str, Any] = {"state": statement.state.value, "started": statement.started}
        if statement.state.is_final:
            text = json.dumps(statement.output, ensure_ascii=False, default=str) if statement.output is not None else None
            statement.output_size = len(text or "")
            fields.update(
                output=text,
                progress=statement.progress,
                completed=statement.completed,
                stream="".join(statement.stream) if statement.stream else None,
                unstreamed=statement.unstreamed,
            )
        return self.store.update_statement(session.id, statement.id, defer=True, **fields)

    def acknowledge_recorded(self) -> None:
        """Once what a full disk held back is written: the workers may forget those results."""
        if not self.store.flush():
            return
        for session in self.sessions.values():
            if session.unacked and session.worker is not None:
                for statement_id in sorted(session.unacked):
                    session.worker.ack(statement_id)
            session.unacked.clear()

    def _maybe_idle(self, session: Session) -> None:
        """busy -> idle once nothing runs or waits (Livy: idle only after the last statement)."""
        if session.state is not SessionState.BUSY:
            return
        if any(not s.state.is_final for s in session.statements.values()):
            return
        session.set_state(SessionState.IDLE)
        session.touch()

    def _on_output(self, session: Session, message: dict[str, Any]) -> None:
        statement = session.statements.get(int(message.get("id", -1)))
        if statement is not None and not statement.state.is_final:
            statement.add_output(str(message.get("text") or ""), message.get("unstreamed"), bool(message.get("replay")))

    def _on_progress(self, session: Session, message: dict[str, Any]) -> None:
        statement = session.statements.get(int(message.get("id", -1)))
        if statement is not None and not statement.state.is_final:
            statement.progress = float(message.get("progress", 0.0))
            statement.jobs = list(message.get("jobs", []))

    def cancel_statement(self, session: Session, statement_id: int) -> None:
        session.touch()
        statement = session.statements.get(statement_id)
        if statement is None or statement.state.is_final or statement.state is StatementState.CANCELLING:
            return  # Livy answers "canceled" for finished and unknown statements too
        if statement.state is StatementState.WAITING:
            statement.set_state(StatementState.CANCELLED)
            self._record(session, statement)
            self._maybe_idle(session)
            return
        statement.set_state(StatementState.CANCELLING)
        self._record(session, statement)  # a restart meanwhile cancels it again
        if session.worker is not None:
            session.worker.cancel(statement.id)
        self._spawn(self._cancel_deadline(session, statement))

    async def _cancel_deadline(self, session: Session, statement: Statement) -> None:
        await asyncio.sleep(self.settings.cancel_timeout + 1.0)
        if statement.state is StatementState.CANCELLING:
            # Livy's job-cancel timeout: record the statement as cancelled; the session stays busy
            # until the code really returns.
            statement.output = {
                "status": "error",
                "execution_count": statement.id,
                "ename": "CancelTimeout",
                "evalue": f"the statement did not stop within {self.settings.cancel_timeout:.0f}s of cancel; "
                "it keeps the session busy until it returns",
                "traceback": [],
            }
            statement.set_state(StatementState.CANCELLED)
            self._record(session, statement)

    async def complete(self, session: Session, body: CompletionRequest) -> builtins.list[str]:
        session.touch()
        if not session.active or session.worker is None:
            raise ConflictError(f"Session {session.id} is {session.state.value}; completion needs an active session.")
        if (parse_kind(body.kind, statement=True) or SessionKind.PYSPARK) is SessionKind.SQL:
            return []
        cursor = len(body.code) if body.cursor is None else body.cursor
        try:
            return await asyncio.wait_for(session.worker.complete(body.code, cursor), 10)
        except (asyncio.TimeoutError, WorkerError):
            return []

    async def inspect(self, session: Session, body: InspectRequest) -> dict[str, Any]:
        session.touch()
        if not session.active or session.worker is None:
            raise ConflictError(f"Session {session.id} is {session.state.value}; inspection needs an active session.")
        cursor = len(body.code) if body.cursor is None else body.cursor
        try:
            return await asyncio.wait_for(session.worker.inspect(body.code, cursor, body.detail_level), 10)
        except (asyncio.TimeoutError, WorkerError):
            return {"found": False, "data": {}}

    # -- stopping -------------------------------------------------------------------------

    async def delete(self, session: Session) -> None:
        """DELETE, as in Livy: stop the session (its running and queued statements end cancelled),
        then remove it from every Livy route at once, which frees its name. Its log stays readable
        at its driverLogUrl for the retention time (``retained_logs``)."""
        if session.live:
            await self.stop(session, SessionState.KILLED, "deleted by the client")
        elif not session.state.is_final:  # shutting down already (culled, or a second DELETE)
            await session.stopped.wait()
        if self.sessions.get(session.id) is session:
            del self.sessions[session.id]
            if session.log is not None:
                self.retained_logs.keep(session.id, session.log)
            session.statements.clear()  # outputs can be large, and no route reaches them any more
            self.store.forget_statements(session.id, defer=True)

    def driver_log(self, key: str, visible: Callable[[Session], bool] | None = None) -> tuple[LogFile | None, Parties]:
        """The log behind ``appInfo.driverLogUrl``: of a listed session, or of one DELETEd within
        the retention time (by id: its name may belong to another session by now); with whose it is
        (the caller checks its access)."""
        try:
            session = self.get(key, visible)
            return session.log, Parties(session.owner, session.spark_user)
        except NotFoundError:
            kept = self.retained_logs.get(int(key)) if key.isdigit() else None
            if kept is None:
                raise
            return kept, self.parties(int(key))

    def parties(self, session_id: int) -> Parties:
        """Owner and Spark user of a session from its record (one no route lists any more)."""
        row = self.store.get("sessions", session_id)
        if row is None:
            return Parties(None, None)
        return Parties(row.get("owner"), (row.get("request") or {}).get("proxyUser") or row.get("owner"))

    async def stop(self, session: Session, final: SessionState, reason: str) -> None:
        self._begin_stop(session, reason)
        await self._complete_stop(session, final, reason)

    def _begin_stop(self, session: Session, reason: str) -> None:
        session.set_state(SessionState.SHUTTING_DOWN)
        if session.log is not None:
            session.log.append(f"session {session.id} stopping: {reason}")
        # Queued statements will never run, and the running one is cancelled (its Spark jobs and
        # its Python code), so a busy worker is free to stop within about a second.
        for statement in session.statements.values():
            if statement.state is StatementState.WAITING:
                statement.set_state(StatementState.CANCELLED)
            elif statement.state is StatementState.RUNNING:
                statement.set_state(StatementState.CANCELLING)
                if session.worker is not None:
                    session.worker.cancel(statement.id)

    async def _complete_stop(self, session: Session, final: SessionState, reason: str) -> None:
        worker = session.worker
        if worker is not None:
            step = await worker.stop()
            if session.log is not None:
                session.log.append(f"session {session.id} stopped ({step.value})")
        self._finish(session, final, reason)

    def _finish(self, session: Session, final: SessionState, reason: str) -> None:
        if session.state.is_final:
            return
        session.reason = reason
        session.set_state(final)
        for statement in session.statements.values():
            if statement.state is StatementState.RUNNING:
                statement.set_state(StatementState.CANCELLING)
            if statement.state is StatementState.CANCELLING and statement.output is None:
                statement.output = {
                    "status": "error",
                    "execution_count": statement.id,
                    "ename": "SessionStopped",
                    "evalue": f"the session stopped ({reason}) before this statement finished",
                    "traceback": [],
                }
            if not statement.state.is_final:
                statement.set_state(StatementState.CANCELLED)
                self._record(session, statement)
        if session.runner is not None:
            session.runner.cancel()
        if session.worker is not None:  # Arrow results go with the session; the user's files stay
            shutil.rmtree(session.worker.results_dir, ignore_errors=True)
        self.store.update("sessions", session.id, defer=True, state=final.value, ended_at=time.time(), reason=reason)

    def _on_worker_exit(self, session: Session, worker: WorkerProcess, code: int) -> None:
        if session.worker is not worker or not session.live:
            return  # we stopped it (or it was replaced)
        reason = f"the session's worker {describe_worker_exit(code, worker.adopted)}"
        worker.log.append(f"session {session.id} is dead: {reason}")
        log.warning("session %d is dead: %s", session.id, reason)
        for statement in session.statements.values():
            if statement.state in (StatementState.RUNNING, StatementState.CANCELLING):
                statement.output = {
                    "status": "error",
                    "execution_count": statement.id,
                    "ename": "SessionWorkerDied",
                    "evalue": f"{reason} while this statement ran; see the session log",
                    "traceback": [],
                }
                statement.set_state(
                    StatementState.CANCELLED
                    if statement.state is StatementState.CANCELLING
                    else StatementState.AVAILABLE
                )
                self._record(session, statement)
        self._finish(session, SessionState.DEAD, reason)
        self._spawn(worker.stop(now=True))  # reap what may be left of its process group

    # -- restart --------------------------------------------------------------------------

    async def restore(
        self, rows: Sequence[dict[str, Any]], workers: dict[int, WorkerProcess]
    ) -> builtins.list[WorkerProcess]:
        """Carry on with the sessions an earlier run of the service left live (``rows``, from the
        store) and their adopted ``workers`` (by session id). Every session comes back with its id,
        name, owner, kind, settings and statements; one whose worker is gone or does not answer is
        dead, with the reason. Returns the workers that belong to no live session (to be stopped)."""
        sessions = []
        for row in rows:
            try:
                sessions.append(self._revive(row))
            except Exception:  # noqa: BLE001 - one unreadable record must not keep the others down
                log.exception("session %s could not be restored", row.get("id"))
                self.store.update("sessions", row["id"], state=SessionState.DEAD.value, ended_at=time.time(), reason="its record could not be read after a restart")
        await asyncio.gather(*(self._resume(session, workers.pop(session.id, None)) for session in sessions))
        self.store.forget_statements_of_ended_sessions()
        if sessions:
            log.info(
                "restored %d session(s): %s",
                len(sessions),
                ", ".join(f"{s.id} ({s.state.value})" for s in sessions),
            )
        return builtins.list(workers.values())

    def _revive(self, row: dict[str, Any]) -> Session:
        """A Session object from its record and its statements' records (no worker yet)."""
        body = CreateSession.model_validate(row["request"])
        requested = sparkconf.requested_conf(body)
        session = Session(int(row["id"]), body, SessionKind(row["kind"]), requested)
        session.owner = row.get("owner")
        session.app_id = row.get("app_id")
        app = self.applications.find(row.get("application_id")) or self.applications.default
        session.application_id, session.application_name = app.id, app.name
        driver = sparkconf.overlay(app.driver_conf(), sparkconf.beyond_shape(sparkconf.split_service_conf(requested)[0], app.driver_conf()))
        session.driver_memory_mb = memory_mb(driver.get("spark.driver.memory", "1g"), "spark.driver.memory") or 1024
        session.driver_cores = float(driver.get("spark.driver.cores", "1"))
        if app.shared and self.shared is not None:  # its lean worker runs on its user's driver (found again by the drivers' restore)
            session.shared_user = self.shared.user_of(session.spark_user)
            session.driver_memory_mb, session.driver_cores = 0, 0.0
            self.shared.hold(app, session.shared_user)
        session.on_change = self._state_changed
        session.sql_num_rows = _int_conf(sparkconf.split_service_conf(requested)[1], "livy.rsc.sql.num-rows")
        session.created_epoch = float(row["created_at"])
        session.created = _monotonic(session.created_epoch)
        if row.get("log_path"):
            session.log = LogFile(Path(row["log_path"]))
        last = session.created_epoch
        for record in self.store.statements(session.id):
            statement = Statement(
                int(record["id"]),
                record["code"],
                SessionKind(record["kind"]),
                state=StatementState(record["state"]),
                output=json.loads(record["output"]) if record["output"] else None,
                progress=float(record["progress"] or 0.0),
                started=int(record["started"] or 0),
                completed=int(record["completed"] or 0),
                request_key=record["request_key"],
            )
            if record["stream"]:
                statement.stream, statement.stream_length = [record["stream"]], len(record["stream"])
            statement.unstreamed = record["unstreamed"]
            statement.output_size = len(record["output"] or "")
            if statement.state.is_final:
                statement.done.set()
            session.statements[statement.id] = statement
            last = max(last, statement.started / 1000, statement.completed / 1000, float(record["created_at"]))
        session.next_statement_id = max(session.statements, default=-1) + 1
        session.first_result = any(st.state.is_final for st in session.statements.values())
        session.last_activity = _monotonic(last)  # GETs never counted; statements did
        self.sessions[session.id] = session
        return session

    async def _resume(self, session: Session, worker: WorkerProcess | None) -> None:
        if worker is None:
            self._lost(session, "its worker ended while the service was not running")
            return
        self._attach(session, worker)
        try:
            state = await worker.attach()
        except WorkerError as exc:
            log.warning("session %d: %s", session.id, exc.msg)
            self._lost(session, "its worker did not answer after the service restarted")
            await worker.kill()
            return
        if not state.get("started"):  # the service stopped between spawning it and sending it its settings
            self._lost(session, "its worker had not been given its settings when the service stopped")
            await worker.kill()
            return
        self._reconcile(session, worker, state)
        session.runner = asyncio.create_task(self._run_statements(session), name=f"session-{session.id}")
        if worker.ready.done() and worker.ready.exception() is None:
            session.app_id = worker.info.get("app_id")
            session.spark_ui_url = worker.info.get("spark_ui_url")
            busy = any(not s.state.is_final for s in session.statements.values())
            session.state = SessionState.BUSY if busy else SessionState.IDLE
            self.store.update("sessions", session.id, defer=True, state=session.state.value, app_id=session.app_id)
        elif not worker.ready.done():  # a cold worker that was still starting: wait on
            self._spawn(self._await_ready(session, worker, start=False))
        worker.log.append(f"session {session.id} carried on by a restarted service (pid {os.getpid()})")

    def _reconcile(self, session: Session, worker: WorkerProcess, state: dict[str, Any]) -> None:
        """Line up the recorded statements with what the worker says it has (see protocol ``attached``)."""
        known = {int(k): v for k, v in (state.get("statements") or {}).items()}
        started = {int(k): int(v) for k, v in (state.get("started_ms") or {}).items()}
        last_id = int(state.get("last_id", -1))
        queue: list[int] = []
        for statement in session.statements.values():
            if statement.state.is_final:
                continue
            if statement.id in known:
                # The worker has it (queued, running or done): its result comes; it is not sent again.
                if statement.state is StatementState.WAITING:
                    statement.state = StatementState.RUNNING  # sent before the restart (running is not recorded)
                statement.started = started.get(statement.id) or statement.started or now_ms()
                session.resumed.add(statement.id)
                queue.append(statement.id)
                if statement.state is StatementState.CANCELLING:
                    worker.cancel(statement.id)
            elif statement.id > last_id:
                # The worker never had it: it runs now (or stays cancelled if that was asked).
                if statement.state is StatementState.CANCELLING:
                    statement.state = StatementState.CANCELLED
                    statement.completed = now_ms()
                    statement.done.set()
                else:
                    statement.state = StatementState.WAITING
                    statement.started = 0
                    queue.append(statement.id)
                self._record(session, statement)
            else:
                # The worker ran it and forgot it, which it does only once its result was recorded: the
                # record did not survive (a lost write). Say so rather than show it running for ever.
                statement.output = _error(
                    statement.id, "StatementLost", "the service restarted and this statement's result was not kept; run it again"
                )
                statement.state = StatementState.AVAILABLE
                statement.completed = now_ms()
                statement.done.set()
                self._record(session, statement)
        for sid in known:
            if sid not in session.resumed:
                worker.ack(sid)  # recorded already (a replay of a result whose acknowledgement was lost)
        for sid in sorted(queue):
            session.queue.put_nowait(sid)

    def _lost(self, session: Session, reason: str) -> None:
        """The session's worker is gone across a restart: the session is dead, and every statement
        it had not finished is failed with the reason (none is left looking alive)."""
        for statement in session.statements.values():
            if statement.state.is_final:
                continue
            ran = statement.state in (StatementState.RUNNING, StatementState.CANCELLING)
            statement.output = _error(
                statement.id, "SessionWorkerDied", f"{reason}; this statement {'did not finish' if ran else 'never ran'}"
            )
            statement.state = StatementState.AVAILABLE if ran else StatementState.CANCELLED
            statement.completed = now_ms()
            statement.done.set()
            self._record(session, statement)
        if session.log is not None:
            session.log.append(f"session {session.id} is dead: {reason}")
        log.warning("session %d is dead: %s", session.id, reason)
        self._finish(session, SessionState.DEAD, reason)

    async def detach(self) -> None:
        """The service stops and keeps its sessions: let go of every worker and leave it running, with
        every record as it is, for the next start to ``restore`` (nothing is marked ended)."""
        for task in list(self._background):
            task.cancel()
        runners = [s.runner for s in self.sessions.values() if s.runner is not None]
        for runner in runners:
            runner.cancel()
        await asyncio.gather(*runners, return_exceptions=True)
        await asyncio.gather(
            *(s.worker.detach() for s in self.sessions.values() if s.worker is not None and not s.state.is_final),
            return_exceptions=True,
        )

    def describe(self, key: str, visible: Callable[[Session], bool] | None = None) -> dict[str, Any]:
        """Spark Studio's view of a session (``GET /studio/sessions/{id}``): its state and, once it
        ended, why; while it is idle, how long until it is stopped for that. Also for a session that
        no Livy route shows any more (DELETEd, retention over, before a restart), from its record.
        ``owner`` and ``proxyUser`` say whose it is (the caller checks its access before answering)."""
        try:
            session = self.get(key, visible)
        except NotFoundError:
            row = self.store.get("sessions", int(key)) if key.isdigit() else None
            if row is None:
                raise
            return {
                "id": row["id"], "name": row["name"], "owner": row["owner"], "proxyUser": (row.get("request") or {}).get("proxyUser") or row["owner"],
                "state": row["state"], "reason": row["reason"], "endedAt": row["ended_at"], "listed": False,
            }  # fmt: skip
        now = time.monotonic()
        idle_timeout, source = session.idle_timeout_setting(self.settings.session_idle_timeout)
        idle = now - session.last_activity if session.state is SessionState.IDLE else 0.0
        return {
            "id": session.id,
            "name": session.name,
            "owner": session.owner,
            "proxyUser": session.spark_user,
            "state": session.state.value,
            "reason": session.reason or None,
            "endedAt": time.time() - (now - session.ended) if session.ended is not None else None,
            "listed": True,
            "application": session.application_name,
            "warm": session.warm,
            "driverMode": "shared" if session.shared_user else "dedicated",
            "sharedDriverUser": session.shared_user,
            "driverMemoryMB": session.driver_memory_mb,
            "idleSeconds": round(idle, 1),
            "idleTimeout": idle_timeout or None,
            "idleTimeoutSource": source,
            "stopsInSeconds": round(max(0.0, idle_timeout - idle), 1) if idle_timeout and session.state is SessionState.IDLE else None,
            "heartbeatTimeout": session.heartbeat_timeout or None,
        }

    # -- culling --------------------------------------------------------------------------

    def expiry_reason(self, session: Session, now: float) -> str | None:
        """Why a live session should be stopped now, or None (named predicates, as jupyter_server culls)."""
        if session.heartbeat_timeout and now - session.last_heartbeat > session.heartbeat_timeout:
            return f"no heartbeat for {now - session.last_heartbeat:.0f}s (heartbeatTimeoutInSecond={session.heartbeat_timeout:g})"
        idle_timeout, source = session.idle_timeout_setting(self.settings.session_idle_timeout)
        if session.state is SessionState.IDLE and idle_timeout and now - session.last_activity > idle_timeout:
            return f"it was inactive for {now - session.last_activity:.0f}s ({source} is {idle_timeout:g}s)"
        return None

    async def cull(self) -> None:
        if self.store.holding or any(s.unacked for s in self.sessions.values()):
            self.acknowledge_recorded()
        now = time.monotonic()
        for session in list(self.sessions.values()):
            try:
                if session.live:
                    reason = self.expiry_reason(session, now)
                    if reason:
                        log.info("stopping session %d: %s", session.id, reason)
                        # Stops run side by side: one slow worker must not delay the other expiries.
                        self._begin_stop(session, reason)
                        self._spawn(self._complete_stop(session, SessionState.DEAD, reason))
                elif session.ended is not None and now - session.ended > self.settings.session_state_retain:
                    self.sessions.pop(session.id, None)
                    self.store.forget_statements(session.id, defer=True)
            except Exception:  # noqa: BLE001 - one session's failure must not stop the culler
                log.exception("culling session %d failed", session.id)
        self.retained_logs.cull(self.settings.session_state_retain)

    async def shutdown(self) -> None:
        live = [s for s in self.sessions.values() if s.live]
        await asyncio.gather(
            *(self.stop(s, SessionState.DEAD, "the service is shutting down") for s in live), return_exceptions=True
        )
        for task in list(self._background):
            task.cancel()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _monotonic(epoch: float) -> float:
    """The monotonic clock's reading at wall-clock time ``epoch`` (for times kept across restarts)."""
    return time.monotonic() - max(0.0, time.time() - epoch)


def _error(statement_id: int, ename: str, evalue: str) -> dict[str, Any]:
    return {"status": "error", "execution_count": statement_id, "ename": ename, "evalue": evalue, "traceback": []}


def _int_conf(conf: dict[str, str], key: str) -> int | None:
    if key not in conf:
        return None
    try:
        return max(1, int(conf[key]))
    except ValueError:
        raise InvalidRequestError(f"Rejected, Reason: {key} must be an integer, got '{conf[key]}'.") from None


__all__ = ["Session", "SessionManager", "Statement", "StudioError"]
