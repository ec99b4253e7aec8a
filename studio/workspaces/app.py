"""``create_app(settings)``: the workspace server and Studio UI as an ASGI application.

Its lifespan builds the parts in dependency order and tears them down in reverse: the store, the
PySpark kernelspec for the JupyterLabs, the compute ``local`` (the embedded session service it
starts, or ``settings.livy_url``), then the workspace manager, which finds the JupyterLabs of a
previous run again, then the execution manager (notebook runs). Stopping the server stops the
session service it started and leaves the rest running for the next start on the same state
directory: notebook runs, JupyterLabs with their kernels, and the service's Spark sessions (with
``stop_sessions_on_exit`` it stops all of them). One error handler turns ``studio.errors`` into ``{"msg": ...}``.
The gate (``studio.auth.gate``) stands in front of every route.
"""

from __future__ import annotations

import contextlib
import logging
from typing import AsyncIterator

from starlette.applications import Starlette
from starlette.types import ASGIApp

from studio import audit, files
from studio.auth import oidc
from studio.auth.gate import ADMIN, Principal, gate, settings_token
from studio.auth.users import Directory
from studio.config import Settings
from studio.kernel.install import write_kernelspec
from studio.store import Store
from studio.web import error_handlers
from studio.workspaces import applications_routes, audit_routes, observe, routes, ui
from studio.workspaces.access import DirectoryIdentity, run_token_guard
from studio.workspaces import users_routes
from studio.workspaces.computes import LOCAL, ComputeManager
from studio.workspaces.executions import ExecutionManager
from studio.workspaces.jupyter import write_lab_defaults
from studio.workspaces.manager import WorkspaceManager
from studio.workspaces.session_service import EmbeddedSessionService

log = logging.getLogger("studio.workspaces")

# Every route of the server (the security tests walk this list: each must refuse a request without credentials).
ALL_ROUTES = [*routes.ROUTES, *ui.ROUTES, *users_routes.ROUTES, *audit_routes.ROUTES, *applications_routes.ROUTES, *observe.ROUTES]


def create_app(settings: Settings, url: str = "") -> ASGIApp:
    """The workspace server; ``url`` is where it listens (its workspaces' kernels call it back there)."""
    token = settings_token(settings)
    # What the built-in compute `local` is sent: the embedded service shares the studio's token.
    local_credential = (
        settings.livy_token.get_secret_value() if settings.livy_url and settings.livy_token is not None else token
    )
    # Then kernels and runs on `local` send a token of the person they act for, never the studio's.
    local_is_studio_token = local_credential == token
    parts: dict[str, WorkspaceManager] = {}

    def kernel_principal(secret: str) -> Principal | None:
        """A workspace's kernels (STUDIO_KERNEL_TOKEN) may only ask where their compute is."""
        manager = parts.get("workspaces")
        workspace_id = manager.workspace_for_kernel(secret) if manager is not None else None
        if workspace_id is None:
            return None
        path = f"/api/workspaces/{workspace_id}/connection"
        return Principal(f"workspace-{workspace_id}-kernels", kind="kernel", routes=frozenset({("GET", path)}), role="user")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        files.secure_state_dir(settings.state_dir, log)  # 0700, loose modes left by anyone fixed and logged
        settings.root.mkdir(parents=True, exist_ok=True)
        events = observe.start(app.state, settings)  # GET /events and webhooks: before anything changes state
        store = Store(settings.database_path)
        # Users and their tokens (shared with the embedded session service): a running workspace's
        # kernels and a notebook run act for a person with a token of theirs, revoked when they end.
        directory = Directory.for_settings(settings)
        identity = DirectoryIdentity(directory)
        jupyter_dir = settings.state_dir / "jupyter"
        write_kernelspec(jupyter_dir)
        jupyter_config_dir = settings.state_dir / "jupyter-config"
        write_lab_defaults(jupyter_config_dir)
        computes = ComputeManager(settings, store, local_credential, local_is_studio_token)
        session_service: EmbeddedSessionService | None = None
        manager: WorkspaceManager | None = None
        executions: ExecutionManager | None = None
        try:
            if settings.livy_url:
                computes.register_managed(LOCAL, settings.livy_url, ADMIN)
            else:
                session_service = EmbeddedSessionService(
                    settings, settings.state_dir / "livy", port=settings.port, pool_size=settings.pool_size, token=token
                )
                computes.register_managed(LOCAL, await session_service.start(), ADMIN)
            # Its applications' computes, at their URLs of this run, before workspaces attached to them are recovered.
            await computes.sync_applications(force=True)
            manager = WorkspaceManager(
                settings, store, computes, jupyter_dir, jupyter_config_dir, server_url=url, identity=identity
            )
            manager.events = events
            await manager.recover()
            parts["workspaces"] = manager
            executions = ExecutionManager(settings, store, manager, computes, identity)
            executions.events = events
            await executions.recover()
            app.state.settings = settings
            app.state.store = store
            app.state.computes = computes
            app.state.workspaces = manager
            app.state.session_service = session_service
            app.state.executions = executions
            app.state.identity = identity
            yield
        finally:
            parts.clear()
            if executions is not None:
                await executions.shutdown()  # before the session service their runs use
            if manager is not None:
                await manager.shutdown()
            if session_service is not None:
                await session_service.stop()
            await computes.close()
            store.close()
            directory.close()
            await observe.close(app.state)

    app = Starlette(
        routes=ALL_ROUTES,
        lifespan=lifespan,
        exception_handlers=error_handlers(log),
    )
    app.state.audit = trail = audit.Trail.for_settings(settings, "serve")
    gated = gate(
        run_token_guard(app),  # kernel and execution tokens: only a kernel's own connection here
        settings,
        realm="Spark Studio",
        bound_host=settings.serve_host,
        extra_tokens=kernel_principal,
        oidc=oidc.login_for(settings, token),  # single sign-on, when configured (the session service has none)
    )
    audited = audit.middleware(gated, settings, "serve", app.routes, trail)  # outermost: it also records what the gate refuses
    observe.install(app, gated)  # GET /metrics; sign-ins counted on their way to the trail
    return audited
