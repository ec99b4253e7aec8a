"""``create_app(settings)``: the workspace server and Studio UI as an ASGI application.

Its lifespan builds the parts in dependency order and tears them down in reverse: the store, the
PySpark kernelspec for the JupyterLabs, the compute ``local`` (the embedded session service it
starts, or ``settings.livy_url``), then the workspace manager, which finds the JupyterLabs of a
previous run again, then the execution manager (notebook runs). Stopping the server stops every
notebook run, every JupyterLab and the session service it started. One error handler turns ``studio.errors`` into ``{"msg": ...}``.
"""

from __future__ import annotations

import contextlib
import logging
from typing import AsyncIterator
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from studio.config import Settings, is_loopback
from studio.kernel.install import write_kernelspec
from studio.store import Store
from studio.web import error_handlers
from studio.workspaces import routes, ui
from studio.workspaces.computes import LOCAL, ComputeManager
from studio.workspaces.executions import ExecutionManager
from studio.workspaces.jupyter import write_lab_defaults
from studio.workspaces.manager import WorkspaceManager
from studio.workspaces.session_service import EmbeddedSessionService

log = logging.getLogger("studio.workspaces")

_SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


class _SameOriginOnly:
    """Refuse what a web page on another site could make a browser send here.

    The server has no login yet and its API hands out JupyterLab tokens and starts code, so:
    a ``Host`` other than this machine's names is refused when bound to loopback (DNS
    rebinding), and a request that changes something is refused when its ``Origin`` is another
    site (cross-site requests; browsers always send Origin with them).
    """

    def __init__(self, app: ASGIApp, loopback_only: bool) -> None:
        self.app = app
        self.loopback_only = loopback_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = {name: value.decode("latin-1") for name, value in scope["headers"]}
            host = headers.get("host", "")
            problem = None
            if self.loopback_only and host and not is_loopback(urlsplit(f"//{host}").hostname or ""):
                problem = f"Host '{host}' is not this machine; open the Studio at http://127.0.0.1."
            origin = headers.get("origin")
            if problem is None and scope["method"] not in _SAFE_METHODS and origin and origin != "null":
                if urlsplit(origin).netloc != host:
                    problem = f"Cross-origin request from {origin} refused."
            if problem:
                await JSONResponse({"msg": problem}, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(settings: Settings) -> ASGIApp:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        settings.root.mkdir(parents=True, exist_ok=True)
        store = Store(settings.database_path)
        jupyter_dir = settings.state_dir / "jupyter"
        write_kernelspec(jupyter_dir)
        jupyter_config_dir = settings.state_dir / "jupyter-config"
        write_lab_defaults(jupyter_config_dir)
        computes = ComputeManager(settings, store)
        session_service: EmbeddedSessionService | None = None
        manager: WorkspaceManager | None = None
        executions: ExecutionManager | None = None
        try:
            if settings.livy_url:
                computes.register_managed(LOCAL, settings.livy_url)
            else:
                session_service = EmbeddedSessionService(
                    settings, settings.state_dir / "livy", port=settings.port, pool_size=settings.pool_size
                )
                computes.register_managed(LOCAL, await session_service.start())
            manager = WorkspaceManager(settings, store, computes, jupyter_dir, jupyter_config_dir)
            await manager.recover()
            executions = ExecutionManager(settings, store, manager, computes)
            await executions.recover()
            app.state.settings = settings
            app.state.store = store
            app.state.computes = computes
            app.state.workspaces = manager
            app.state.session_service = session_service
            app.state.executions = executions
            yield
        finally:
            if executions is not None:
                await executions.shutdown()  # before the session service their runs use
            if manager is not None:
                await manager.shutdown()
            if session_service is not None:
                await session_service.stop()
            await computes.close()
            store.close()

    app = Starlette(
        routes=[*routes.ROUTES, *ui.ROUTES],
        lifespan=lifespan,
        exception_handlers=error_handlers(log),
    )
    return _SameOriginOnly(app, loopback_only=is_loopback(settings.serve_host))
