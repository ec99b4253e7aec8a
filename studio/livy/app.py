"""``create_app(settings)``: the session service as an ASGI application.

Its lifespan builds the parts in dependency order (store, class-data archive, pool, session
and batch managers, culler) and tears them down in reverse. Sessions outlive the service: at
start it finds the workers an earlier run left (the store's worker records) and carries on with
their sessions; at stop it lets go of them and leaves them running, unless it was told to stop
everything (``stop_sessions_on_exit``). Batches stop with it. One error handler turns
``studio.errors`` into Livy's ``{"msg": ...}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send

from studio.auth.gate import ADMIN, Principal, gate
from studio import audit, files
from studio.config import Settings
from studio.errors import StudioError
from studio.livy import sparkconf
from studio.auth.users import Directory
from studio.livy.access import Access
from studio.livy.batches import BatchManager
from studio.livy import observe
from studio.livy import jobruns
from studio.events import EventBus
from studio.livy.applications import Application, Applications
from studio.livy.cds import CdsArchive
from studio.livy.pool import WorkerPool
from studio.livy import application_routes
from studio.livy.routes import APPLICATION_LIVY_ROUTES, ROUTES
from studio.livy.sessions import SessionManager
from studio.livy.connect_drivers import ConnectDrivers
from studio.livy.connect_endpoint import ConnectEndpoint
from studio.livy.shared import MemoryAdmission, SharedSessions
from studio.livy.workers import WorkerProcess, WorkerSpec
from studio.store import Store
from studio.web import JSONResponse, error_handlers

log = logging.getLogger("studio.livy")

WARM_APP_NAME = "spark-studio-session"
_ACCEPT = re.compile(r"application/vnd\.livy\.v([\w.]+)\+json")


class _AcceptVersion:
    """Livy's optional ``Accept: application/vnd.livy.v0.1+json``; another version gives 406."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if name == b"accept":
                    match = _ACCEPT.search(value.decode("latin-1"))
                    if match and match.group(1) != "0.1":
                        response = JSONResponse(
                            {"msg": f"Unsupported API version in Accept header: {match.group(0)}; use v0.1."},
                            status_code=406,
                        )
                        await response(scope, receive, send)
                        return
        await self.app(scope, receive, send)


class Service:
    """The parts of a running session service, built in dependency order."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        files.secure_state_dir(settings.state_dir, log)  # 0700, loose modes left by anyone fixed and logged
        self._lock = _lock_state_dir(settings.state_dir)
        self.store = Store(settings.database_path)
        # Batches (job runs) do not outlive the service: their records say so in both views (Livy's and EMR's).
        unfinished = self.store.unfinished("batches")
        for row in unfinished:
            reason = "the service stopped before it finished"
            self.store.update("batches", row["id"], state="dead", run_state="FAILED", state_details=reason, reason=reason, ended_at=time.time())
        if unfinished:
            log.info("marked %d batches (job runs) of an earlier run failed", len(unfinished))
        self.cds = CdsArchive(settings)
        self.events = EventBus()
        self.applications = Applications(settings, self.store, self._pool_for, self.events)
        if settings.applications_file is not None:
            self.applications.declare(settings.applications_file)
        self.sessions = SessionManager(settings, self.store, self.applications, self.new_worker, self.base_conf, self.events)
        self.drivers = ConnectDrivers(settings, self.base_conf, self.store)
        self.shared = SharedSessions(settings, self.applications, self.drivers, self.new_worker, MemoryAdmission(settings))
        self.shared.is_busy = self.sessions.any_busy
        self.sessions.shared = self.shared
        self.applications.equip_shared = self.shared.equip
        self.applications.release_shared = lambda app: self.shared.stop_application(app.id)
        self.connect_endpoint: ConnectEndpoint | None = None
        self.connect_port: int | None = None  # where the Connect endpoint listens, once it does
        self.batches = BatchManager(settings, self.store, self.base_conf, self.sessions.dedicated_count, self.applications, self.events)
        self._tasks: list[asyncio.Task[Any]] = []

    @property
    def pool(self) -> WorkerPool:
        """The default application's pool."""
        return self.applications.default.pool

    def _pool_for(self, app: Application) -> WorkerPool:
        """An application's warm pool: drivers of its shape, never more than its maximumCapacity holds."""

        def new_warm_worker() -> WorkerProcess:
            conf = sparkconf.overlay(self.base_conf(), app.driver_conf())
            return self.new_worker(WorkerSpec(conf, WARM_APP_NAME, True, application_id=app.id, shape=app.shape()))

        pool = WorkerPool(self.settings, new_warm_worker, size=app.initial_capacity, name=app.name)
        pool.has_room = lambda: app.room_for(app.driver_memory_mb(), app.driver_cores()) is None
        return pool

    def base_conf(self) -> dict[str, str]:
        return sparkconf.base_conf(self.settings, self.cds.java_options())

    def new_worker(self, spec: WorkerSpec) -> WorkerProcess:
        spec.env = {**sparkconf.worker_env(self.settings), **spec.env}
        worker = WorkerProcess(self.settings, spec)
        worker.on_started = self._record_worker
        return worker

    def _record_worker(self, worker: WorkerProcess) -> None:
        """A worker was spawned: its record, so that a later start finds it (see ``restore``)."""
        self.store.insert("workers", {"id": worker.id, "session_id": worker.session_id, "process": worker.record()}, defer=True)
        self._watch_worker(worker)

    def _watch_worker(self, worker: WorkerProcess) -> None:
        worker.exited.add_done_callback(lambda _: self.store.update("workers", worker.id, defer=True, ended_at=time.time()))

    async def restore(self) -> None:
        """Find the workers an earlier run of the service left running and carry on with their
        sessions; warm idle ones go back to the pool. Workers nobody wants are stopped."""
        started = time.monotonic()
        by_session: dict[int, WorkerProcess] = {}
        unwanted: list[WorkerProcess] = []
        pooled: list[WorkerProcess] = []
        for row in self.store.unfinished("workers"):
            worker = WorkerProcess.adopt(self.settings, str(row["id"]), row["process"])
            if worker is None:  # gone (or its pid belongs to another process by now)
                self.store.update("workers", row["id"], ended_at=time.time())
                continue
            self._watch_worker(worker)
            if row["session_id"] is None:
                pooled.append(worker)
            else:
                if int(row["session_id"]) in by_session:  # only the newest worker of a session counts
                    unwanted.append(by_session[int(row["session_id"])])
                by_session[int(row["session_id"])] = worker
        sessions = self.store.unfinished("sessions")
        unwanted += await self.sessions.restore(sessions, by_session)
        attached = await asyncio.gather(*(self._attach_pooled(w) for w in pooled))
        unwanted += [w for w, ok in zip(pooled, attached) if not ok]
        candidates = [w for w, ok in zip(pooled, attached) if ok]
        for app in self.applications.list():
            if not app.accepts_work:
                continue
            # A warm worker goes back to the pool of its application if that still wants drivers of its shape.
            default_id = self.applications.default.id
            mine = [w for w in candidates if (w.spec.application_id or default_id) == app.id and w.spec.shape in ("", app.shape())]
            candidates = [w for w in candidates if w not in mine]
            unwanted += await app.pool.adopt(mine)
        unwanted += candidates
        for worker in unwanted:
            log.info("stopping worker %s (pid %s): no session or pool place wants it", worker.id, worker.pid)
        await asyncio.gather(*(w.stop() for w in unwanted), return_exceptions=True)
        if sessions or pooled:
            log.info("restart: sessions and workers found again in %.2fs", time.monotonic() - started)

    async def _attach_pooled(self, worker: WorkerProcess) -> bool:
        """A warm worker of the pool, attached; False when it is no longer a clean warm worker."""
        try:
            state = await worker.attach()
        except Exception as exc:  # noqa: BLE001 - any failure: it is stopped
            log.warning("warm worker %s could not be attached: %s", worker.id, exc)
            return False
        return state.get("session") is None and not state.get("statements")

    async def start(self, authenticate: Callable[[str], Principal | None] | None = None) -> None:
        await self.drivers.restore()  # users' shared drivers first: the lean sessions restored next run on them
        await self.restore()
        self.applications.start_pools()
        self._tasks.append(asyncio.create_task(self._cull_forever(), name="culler"))
        if self.cds.enabled and not self.cds.exists():
            self._tasks.append(asyncio.create_task(self._build_cds(), name="cds"))
        if self.settings.connect_port >= 0 and authenticate is not None:
            await self._start_connect_endpoint(authenticate)

    async def _start_connect_endpoint(self, authenticate: Callable[[str], Principal | None]) -> None:
        """The Spark Connect endpoint: any Connect client reaches its user's shared driver with the studio's
        credentials. A port in use leaves the service up without it (and says so)."""

        def application_for(name: str | None) -> Application:
            return self.applications.get(name) if name else self.applications.default

        endpoint = ConnectEndpoint(self.settings, self.drivers, authenticate, application_for)
        try:
            port = await endpoint.start()
        except (OSError, RuntimeError) as exc:
            log.warning("the Spark Connect endpoint could not listen on 127.0.0.1:%s (%s); it is off (STUDIO_CONNECT_PORT)", self.settings.connect_port, exc)
            return
        self.connect_endpoint, self.connect_port = endpoint, port
        log.info("Spark Connect endpoint: sc://localhost:%d, on the loopback only (shared-driver applications; the studio's credentials as the token)", port)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.settings.stop_sessions_on_exit:
            await self.sessions.shutdown()
        else:
            await self.sessions.detach()
            live = self.sessions.live_count()
            if live:
                log.info(
                    "leaving %d session(s) running for the next start on %s (each stops itself after %gs without "
                    "a service; --stop-sessions-on-exit stops them with the service)",
                    live,
                    self.settings.state_dir,
                    self.settings.worker_orphan_timeout,
                )
        await self.batches.shutdown()
        if self.connect_endpoint is not None:
            await self.connect_endpoint.stop()
        await self.applications.close()
        for pool in self.applications.pools():
            if self.settings.stop_sessions_on_exit:
                await pool.shutdown()
            else:
                await pool.detach()
        await self.shared.shutdown(keep=not self.settings.stop_sessions_on_exit)
        await asyncio.sleep(0)  # the exit callbacks of the last stopped workers write their records first
        self.store.close()
        os.close(self._lock)  # the next service on this state directory may start now

    async def _cull_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.cull_interval)
            for manager in (self.sessions, self.batches):
                try:
                    await manager.cull()
                except Exception:  # noqa: BLE001 - the culler must survive anything
                    log.exception("culling failed")
            try:
                await self.applications.stop_idle()
            except Exception:  # noqa: BLE001
                log.exception("stopping idle applications failed")
            try:
                await self.shared.stop_idle()
            except Exception:  # noqa: BLE001
                log.exception("stopping idle shared drivers failed")

    async def _build_cds(self) -> None:
        # Filling the pool comes first: the training run would only slow it down.
        await self.pool.wait_until_full(timeout=900)
        log.info("building the driver class-data archive in the background (once per installation)")
        try:
            await self.cds.build()
        except Exception:  # noqa: BLE001
            log.exception("building the class-data archive failed")


LOCK_WAIT_SECONDS = 60.0


def connect_authenticator(settings: Settings, principal_for: Callable[[str], Principal | None]) -> Callable[[str], Principal | None]:
    """The Connect endpoint's check of a bearer secret: what the gate accepts, for a principal that may
    start sessions (a token scoped to other routes may not reach a driver)."""

    def authenticate(secret: str) -> Principal | None:
        if settings.insecure_no_auth:
            return Principal(ADMIN, kind="unauthenticated")
        principal = principal_for(secret) if secret else None
        if principal is None or not principal.may("POST", "/sessions"):
            return None
        return principal

    return authenticate


def _lock_state_dir(state_dir: Path) -> int:
    """One session service per state directory, since each takes over every worker it records.
    A service that starts while the previous one still lets go of them (a restart: the new process
    may start before the old one has quite stopped) waits for it, at most ``LOCK_WAIT_SECONDS``.
    The lock goes with the process, however it ends; workers do not inherit it."""
    path = state_dir / "livy.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    waiting = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            if time.monotonic() > deadline:
                os.close(fd)
                raise StudioError(
                    f"Another session service (pid {holder}) uses the state directory {state_dir}; stop it, or give "
                    "this one a state directory of its own (--state-dir)."
                ) from None
            if not waiting:
                log.info("waiting for the session service that used %s before (pid %s) to stop", state_dir, holder)
                waiting = True
            time.sleep(0.05)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


# Every route of the service (the security tests walk this list: each must refuse a request without credentials).
ALL_ROUTES = [*ROUTES, *application_routes.ROUTES, *APPLICATION_LIVY_ROUTES, *observe.ROUTES, *jobruns.ROUTES]


def create_app(settings: Settings) -> ASGIApp:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        service = Service(settings)
        app.state.settings = settings
        app.state.service = service
        app.state.sessions = service.sessions
        app.state.batches = service.batches
        app.state.pool = service.pool
        app.state.applications = service.applications
        app.state.events = service.events
        app.state.cds = service.cds
        app.state.access = Access.for_settings(settings)
        app.state.directory = Directory.for_settings(settings)  # users' own quotas (the gate keeps its own)
        observe.install(app.state)  # /metrics and /events: the bus, the registry, the sessions' hooks, webhooks
        await service.start(connect_authenticator(settings, gated.principal_for))
        try:
            yield
        finally:
            await service.stop()
            await observe.close(app.state)
            app.state.directory.close()

    app = Starlette(
        routes=ALL_ROUTES,
        lifespan=lifespan,
        exception_handlers=error_handlers(log),
    )
    # Livy's own clients authenticate with HTTP Basic (LDAP mode), so the service invites it too.
    gated = gate(_AcceptVersion(app), settings, realm="Spark Studio session service", bound_host=settings.host, basic_challenge=True)
    return audit.middleware(gated, settings, "livy", app.routes)  # outermost: it also records what the gate refuses
