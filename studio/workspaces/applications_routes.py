"""The Studio's view of the applications of its session service (the one behind compute ``local``).

* ``GET /ui/applications``: the Applications page (``applications.html`` + ``static/applications.js``,
  which polls the listing below and builds the rows with ``textContent``: names come from users).
* ``GET /api/applications``: every application with its state, ``stateDetails``, capacity (warm
  drivers, drivers in use, the maximum), its Livy endpoint, the compute that offers it in the Studio
  and its last five job runs (a user who is not an admin sees only their own runs, as the session
  service's access rules would show them).
* ``POST /api/applications/{name}/start`` and ``.../stop`` (admins): forwarded to the service.

The server asks the service with its own credential (the one it uses for ``local``), so the refusals
a person would get there are made here first: only admins start and stop. The service's own
refusals (a 409 for a state that cannot change so) come back as they are, ``{"msg"}`` and status.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from studio import audit
from studio.auth.gate import Principal
from studio.errors import NotFoundError, StudioError
from studio.workspaces import access
from studio.workspaces.computes import DEFAULT_APPLICATION, LOCAL, ComputeManager

RECENT_JOB_RUNS = 5


class _ServiceRefused(StudioError):
    """The session service's own answer, passed on with its status."""

    def __init__(self, status: int, msg: str) -> None:
        super().__init__(msg)
        self.status_code = status


def _computes(request: Request) -> ComputeManager:
    return request.app.state.computes


def _actor(request: Request) -> Principal:
    user: Principal = request.user
    return user


def _check(status: int, body: Any, what: str) -> Any:
    if 200 <= status < 300:
        return body
    msg = body.get("msg") if isinstance(body, dict) else None
    if status == 401:  # the server's own credential was refused: its configuration, not the browser's sign-in
        raise _ServiceRefused(502, f"The session service refused the Studio's credential for compute '{LOCAL}' ({what}): {msg}")
    raise _ServiceRefused(status, str(msg or f"The session service answered HTTP {status} to {what}."))


def _path(name: str, *rest: str) -> str:
    return "/applications/" + "/".join(quote(part, safe="") for part in (name, *rest))


def capacity(application: dict[str, Any]) -> dict[str, Any]:
    """warm / used / maximum drivers (and the rest of the service's capacity figures) in one flat shape."""
    found = application.get("capacity")
    raw: dict[str, Any] = found if isinstance(found, dict) else {}
    used: dict[str, Any] = raw["used"] if isinstance(raw.get("used"), dict) else raw
    limits: dict[str, Any] = {}
    for candidate in (raw.get("maximum"), raw.get("limits"), application.get("maximumCapacity")):
        if isinstance(candidate, dict):
            limits = candidate
            break
    return {
        "warm": used.get("warm"),
        "drivers": used.get("drivers"),
        "sessions": used.get("sessions"),
        "jobRuns": used.get("jobRuns"),
        "maxDrivers": limits.get("drivers"),
        "cpu": used.get("cpu"),
        "maxCpu": limits.get("cpu"),
        "memoryMB": used.get("memoryMB"),
        "maxMemory": limits.get("memoryMB", limits.get("memory")),
    }


def _owns(run: dict[str, Any], user: str) -> bool:
    return user in {str(run.get(key)) for key in ("createdBy", "owner", "proxyUser") if run.get(key)}


async def _describe(manager: ComputeManager, summary: dict[str, Any], actor: Principal) -> dict[str, Any]:
    key = str(summary.get("applicationId") or summary.get("id") or summary.get("name"))
    (status, body), (runs_status, runs_body) = await asyncio.gather(
        manager.ask_local("GET", _path(key)),
        manager.ask_local("GET", _path(key, "jobruns") + f"?maxResults={RECENT_JOB_RUNS}"),
    )
    application = dict(summary)
    if 200 <= status < 300 and isinstance(body, dict):
        detail = body.get("application")
        application.update(detail if isinstance(detail, dict) else body)
    runs: list[dict[str, Any]] = []
    if 200 <= runs_status < 300 and isinstance(runs_body, dict) and isinstance(runs_body.get("jobRuns"), list):
        runs = [r for r in runs_body["jobRuns"] if isinstance(r, dict)]
        if not actor.is_admin:
            runs = [r for r in runs if _owns(r, actor.name)]
    name = str(application.get("name") or "")
    compute = LOCAL if name == DEFAULT_APPLICATION else name
    found = manager.find(compute)
    usable = found is not None and found.managed and manager.allows(found, actor.name, actor.is_admin)
    application.update(
        capacitySummary=capacity(application),
        recentJobRuns=[
            {k: run.get(k) for k in ("id", "jobRunId", "name", "state", "stateDetails", "createdAt", "updatedAt")}
            for run in runs[:RECENT_JOB_RUNS]
        ],
        compute=compute if usable else None,
    )
    return application


async def list_applications(request: Request) -> Response:
    manager, actor = _computes(request), _actor(request)
    status, body = await manager.ask_local("GET", "/applications?maxResults=50")
    body = _check(status, body, "GET /applications")
    summaries = [a for a in (body.get("applications") or []) if isinstance(a, dict)] if isinstance(body, dict) else []
    await manager.sync_applications()
    items = list(await asyncio.gather(*(_describe(manager, summary, actor) for summary in summaries)))
    return JSONResponse({"applications": items, "isAdmin": actor.is_admin}, headers={"Cache-Control": "no-store"})


async def _change(request: Request, verb: str) -> Response:
    actor = _actor(request)
    access.check_admin(actor, f"{verb} applications")
    name = request.path_params["name"]
    audit.note(request, application=name)
    manager = _computes(request)
    if manager.find(LOCAL) is None:
        raise NotFoundError("This Studio has no compute 'local', so no session service to ask.")
    status, body = await manager.ask_local("POST", _path(name, verb))
    body = _check(status, body, f"POST {_path(name, verb)}")
    return JSONResponse(body if body is not None else {}, status_code=status if status != 204 else 200)


async def start_application(request: Request) -> Response:
    return await _change(request, "start")


async def stop_application(request: Request) -> Response:
    return await _change(request, "stop")


async def applications_page(request: Request) -> Response:
    from studio.workspaces.ui import templates

    actor = _actor(request)
    context = {"user": actor.name, "role": actor.role, "current": "applications", "is_admin": actor.is_admin}
    return templates.TemplateResponse(request, "applications.html", context, headers={"Cache-Control": "no-store"})


ROUTES = [
    Route("/ui/applications", applications_page, methods=["GET"]),
    Route("/api/applications", list_applications, methods=["GET"]),
    Route("/api/applications/{name}/start", start_application, methods=["POST"]),
    Route("/api/applications/{name}/stop", stop_application, methods=["POST"]),
]
