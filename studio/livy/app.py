"""``create_app(settings)``: the session service as an ASGI application.

Its lifespan builds the parts in dependency order (store, class-data archive, pool, session
and batch managers, culler) and tears them down in reverse, so stopping the service stops
every worker and batch it started. One error handler turns ``studio.errors`` into Livy's
``{"msg": ...}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send

from studio.auth.gate import gate
from studio import files
from studio.config import Settings
from studio.livy import sparkconf
from studio.livy.batches import BatchManager
from studio.livy.cds import CdsArchive
from studio.livy.pool import WorkerPool
from studio.livy.routes import ROUTES
from studio.livy.sessions import SessionManager
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
        self.store = Store(settings.database_path)
        for table in ("sessions", "batches"):
            closed = self.store.mark_unfinished(table, "dead", "the service stopped before it finished")
            if closed:
                log.info("marked %d %s of an earlier run dead", closed, table)
        self.cds = CdsArchive(settings)
        self.pool = WorkerPool(settings, lambda: self.new_worker(WorkerSpec(self.base_conf(), WARM_APP_NAME, True)))
        self.sessions = SessionManager(settings, self.store, self.pool, self.new_worker, self.base_conf)
        self.batches = BatchManager(settings, self.store, self.base_conf, self.sessions.live_count)
        self._tasks: list[asyncio.Task[Any]] = []

    def base_conf(self) -> dict[str, str]:
        return sparkconf.base_conf(self.settings, self.cds.java_options())

    def new_worker(self, spec: WorkerSpec) -> WorkerProcess:
        spec.env = {**sparkconf.worker_env(self.settings), **spec.env}
        return WorkerProcess(self.settings, spec)

    async def start(self) -> None:
        self.pool.start()
        self._tasks.append(asyncio.create_task(self._cull_forever(), name="culler"))
        if self.cds.enabled and not self.cds.exists():
            self._tasks.append(asyncio.create_task(self._build_cds(), name="cds"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.sessions.shutdown()
        await self.batches.shutdown()
        await self.pool.shutdown()
        self.store.close()

    async def _cull_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.cull_interval)
            for manager in (self.sessions, self.batches):
                try:
                    await manager.cull()
                except Exception:  # noqa: BLE001 - the culler must survive anything
                    log.exception("culling failed")

    async def _build_cds(self) -> None:
        # Filling the pool comes first: the training run would only slow it down.
        await self.pool.wait_until_full(timeout=900)
        log.info("building the driver class-data archive in the background (once per installation)")
        try:
            await self.cds.build()
        except Exception:  # noqa: BLE001
            log.exception("building the class-data archive failed")


def create_app(settings: Settings) -> ASGIApp:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        service = Service(settings)
        app.state.settings = settings
        app.state.service = service
        app.state.sessions = service.sessions
        app.state.batches = service.batches
        app.state.pool = service.pool
        app.state.cds = service.cds
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = Starlette(
        routes=ROUTES,
        lifespan=lifespan,
        exception_handlers=error_handlers(log),
    )
    # Livy's own clients authenticate with HTTP Basic (LDAP mode), so the service invites it too.
    return gate(_AcceptVersion(app), settings, realm="Spark Studio session service", bound_host=settings.host, basic_challenge=True)
