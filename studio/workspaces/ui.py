"""The Studio web UI: server-rendered pages, plus fragments that a little JavaScript re-fetches.

The page and its live parts come from the same templates: ``/`` renders everything, and
``/ui/workspaces``, ``/ui/executions`` and ``/ui/computes`` render just the workspace rows, the
latest 50 notebook executions and the compute list,
which ``static/studio.js`` polls and swaps in. Actions go through the JSON API, so the UI shows
the API's own error messages. Every asset is in this package; nothing is fetched from the
internet. Each part shows only what the signed-in user may see (``studio.workspaces.access``),
and offers only the actions the API would allow that user; Jinja escapes everything.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

import studio
from studio.urls import http_url
from studio.workspaces import access
from studio.workspaces.models import OPEN_STATES, RUNNING_STATES, WorkspaceState
from studio.workspaces.routes import actor, computes, executions, workspaces

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=str(HERE / "templates"))

# Workspace states in a transition get a pulsing badge.
_BUSY_STATES = {WorkspaceState.STARTING, WorkspaceState.ATTACHING, WorkspaceState.STOPPING, WorkspaceState.DELETING}


def ago(timestamp: float | None) -> str:
    """'just now', '5 s ago', '3 min ago', '2 h ago', '4 d ago'."""
    if not timestamp:
        return "never"
    seconds = max(0.0, time.time() - timestamp)
    if seconds < 2:
        return "just now"
    if seconds < 60:
        return f"{seconds:.0f} s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 86400:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} d ago"


def duration(seconds: float | None) -> str:
    if not seconds:
        return "never"
    if seconds < 120:
        return f"{seconds:g} s"
    if seconds < 7200:
        return f"{seconds / 60:g} min"
    return f"{seconds / 3600:g} h"


templates.env.filters["ago"] = ago
templates.env.filters["duration"] = duration
# A compute chooses its sessions' URLs: only http(s) ones become links (no javascript: in an href).
templates.env.filters["http_url"] = http_url


def _workspace_rows(request: Request) -> list[dict[str, Any]]:
    manager, user = workspaces(request), actor(request)
    rows = []
    for workspace in manager.visible(user):
        data = manager.to_json(workspace)
        state = workspace.state
        runs_for = data["running_for"]
        openable = state in OPEN_STATES and data["url"] is not None
        data.update(
            state_class=state.value.lower(),
            busy=state in _BUSY_STATES,
            running=state in RUNNING_STATES,
            # Its JupyterLab acts for whoever started it: only they get to open it.
            can_open=openable and runs_for in (None, user.name),
            runs_for_other=runs_for if runs_for and runs_for != user.name else None,
            can_start=state in (WorkspaceState.IDLE, WorkspaceState.FAILED),
            can_stop=state in RUNNING_STATES or state is WorkspaceState.FAILED,
            can_attach=state not in _BUSY_STATES,
            can_manage=access.may_manage_workspace(user, workspace.owner),
        )
        rows.append(data)
    return rows


def _context(request: Request) -> dict[str, Any]:
    user = actor(request)
    return {
        "workspaces": _workspace_rows(request),
        "compute_names": [compute.name for compute in computes(request).visible(user)],
        "executions": _execution_rows(request),
        "user": user.name,
        "role": user.role,
        "is_admin": user.is_admin,
    }


def _execution_rows(request: Request, latest: int = 50) -> list[dict[str, Any]]:
    return [e.to_json() for e in reversed(executions(request).list(actor=actor(request))[-latest:])]


async def page(request: Request) -> Response:
    await computes(request).sync_applications()  # the session service's applications are computes
    context = _context(request)
    context.update(
        computes=await computes(request).describe_all(actor(request)),
        root=str(request.app.state.settings.root),
        version=studio.__version__,
    )
    _add_attached(request, context["computes"])
    return templates.TemplateResponse(request, "index.html", context)


async def workspace_rows(request: Request) -> Response:
    return templates.TemplateResponse(request, "_workspaces.html", _context(request))


async def execution_rows(request: Request) -> Response:
    return templates.TemplateResponse(request, "_executions.html", {"executions": _execution_rows(request)})


async def compute_list(request: Request) -> Response:
    items = await computes(request).describe_all(actor(request))
    _add_attached(request, items)
    return templates.TemplateResponse(request, "_computes.html", {"computes": items, "is_admin": actor(request).is_admin})


def _add_attached(request: Request, items: list[dict[str, Any]]) -> None:
    for item in items:
        item["workspaces"] = workspaces(request).attached_to(item["name"], actor(request))


ROUTES = [
    Route("/", page, methods=["GET"]),
    Route("/ui/workspaces", workspace_rows, methods=["GET"]),
    Route("/ui/executions", execution_rows, methods=["GET"]),
    Route("/ui/computes", compute_list, methods=["GET"]),
    Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
]
