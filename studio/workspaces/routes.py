"""Thin JSON endpoints of the workspace server: parse, call a manager, shape the answer.

Errors are ``{"msg": ...}`` with the status of the ``studio.errors`` class the manager raised:
400 bad input, 403 not the user's to see or change (``studio.workspaces.access``), 404 unknown
id, 409 wrong state or a taken name, 429 over a quota, 502 a compute that does not answer. Start
and stop answer 202: the work goes on in the background and the state says how far it got.
Every manager call names the user it acts for (``request.user``); listings hold only what that
user may see.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

import studio
from studio import audit
from studio.auth.gate import Principal
from studio.errors import InvalidRequestError, NotFoundError
from studio.web import parse_body, read_body
from studio.workspaces import access
from studio.workspaces.computes import ComputeManager
from studio.workspaces.executions import ExecutionManager
from studio.workspaces.manager import WorkspaceManager, counts_by_state
from studio.workspaces.models import (
    AttachCompute,
    CreateCompute,
    CreateWorkspace,
    SetAllowedUsers,
    SetCollaborators,
    StartExecution,
    UpdateWorkspace,
)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def workspaces(request: Request) -> WorkspaceManager:
    return request.app.state.workspaces


def computes(request: Request) -> ComputeManager:
    return request.app.state.computes


def executions(request: Request) -> ExecutionManager:
    return request.app.state.executions


def actor(request: Request) -> Principal:
    """Who the request acts for (the gate's principal)."""
    user: Principal = request.user
    return user


def _bearer(request: Request) -> str | None:
    scheme, _, credential = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() not in ("bearer", "token"):
        return None
    return credential.strip() or None


def _flag(request: Request, name: str) -> bool:
    raw = request.query_params.get(name, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise InvalidRequestError(f"'{name}' must be true or false, got '{raw}'.")


def _workspace_json(request: Request, workspace: Any, status_code: int = 200) -> Response:
    audit.note(request, target=f"/api/workspaces/{workspace.id}", workspace=workspace.name)
    return JSONResponse(workspaces(request).to_json(workspace), status_code=status_code)


# -- server --------------------------------------------------------------------------------


async def health(request: Request) -> Response:
    """Open (no credentials): for load balancers and service managers; says nothing else."""
    return JSONResponse({"status": "ok"})


async def whoami(request: Request) -> Response:
    return JSONResponse({"user": actor(request).name, "role": actor(request).role})


async def status(request: Request) -> Response:
    state = request.app.state
    return JSONResponse(
        {
            "version": studio.__version__,
            "root": str(state.settings.root),
            "workspaces": counts_by_state(workspaces(request).visible(actor(request))),
            "computes": len(computes(request).visible(actor(request))),
            "embeddedSessionService": state.session_service.url if state.session_service else None,
        }
    )


# -- workspaces ----------------------------------------------------------------------------


async def list_workspaces(request: Request) -> Response:
    manager = workspaces(request)
    items = [manager.to_json(w) for w in manager.visible(actor(request))]
    return JSONResponse({"total": len(items), "workspaces": items})


async def create_workspace(request: Request) -> Response:
    body = parse_body(CreateWorkspace, await read_body(request))
    audit.note(request, compute=body.compute, repository_url=body.repository_url, start=body.start)
    if body.compute:
        await computes(request).sync_applications(missing=body.compute)  # an application created a moment ago
    workspace = await workspaces(request).create(body, actor(request))
    return _workspace_json(request, workspace, 201)


async def get_workspace(request: Request) -> Response:
    return _workspace_json(request, workspaces(request).get_for(actor(request), request.path_params["workspace_id"]))


async def update_workspace(request: Request) -> Response:
    body = parse_body(UpdateWorkspace, await read_body(request))
    audit.note(request, changed=body.model_dump(exclude_unset=True))
    return _workspace_json(request, workspaces(request).update(request.path_params["workspace_id"], body, actor(request)))


async def delete_workspace(request: Request) -> Response:
    result = await workspaces(request).delete(
        request.path_params["workspace_id"],
        actor(request),
        force=_flag(request, "force"),
        remove_files=_flag(request, "remove_files"),
    )
    audit.note(request, workspace=result.get("name"), force=_flag(request, "force"), remove_files=_flag(request, "remove_files"))
    return JSONResponse(result)


async def start_workspace(request: Request) -> Response:
    return _workspace_json(request, workspaces(request).start(request.path_params["workspace_id"], actor(request)), 202)


async def stop_workspace(request: Request) -> Response:
    return _workspace_json(request, workspaces(request).stop(request.path_params["workspace_id"], actor(request)), 202)


async def share_workspace(request: Request) -> Response:
    """``PUT {"collaborators": [names]}``: who besides its owner may use it (owner or admin)."""
    body = parse_body(SetCollaborators, await read_body(request))
    audit.note(request, collaborators=body.collaborators)
    workspace = workspaces(request).share(request.path_params["workspace_id"], body.collaborators, actor(request))
    return _workspace_json(request, workspace)


async def attach_workspace(request: Request) -> Response:
    body = parse_body(AttachCompute, await read_body(request))
    audit.note(request, compute=body.compute)
    await computes(request).sync_applications(missing=body.compute)  # an application created a moment ago
    workspace = await workspaces(request).attach(request.path_params["workspace_id"], body.compute, actor(request))
    return _workspace_json(request, workspace)


async def detach_workspace(request: Request) -> Response:
    return _workspace_json(request, workspaces(request).detach(request.path_params["workspace_id"], actor(request)))


async def open_workspace(request: Request) -> Response:
    """To the workspace's JupyterLab, with its token: the token is in this redirect only, never in a
    listing, and only for the person the workspace runs for."""
    audit.note(request, record=True)  # a read, but it hands out the JupyterLab: recorded
    target = workspaces(request).lab_url(request.path_params["workspace_id"], actor(request))
    return RedirectResponse(target, status_code=303, headers={"Cache-Control": "no-store"})


async def workspace_connection(request: Request) -> Response:
    """For the workspace's kernels (their STUDIO_KERNEL_TOKEN as the Bearer token): its compute's Livy
    URL and the credentials to send; anyone else is refused."""
    connection = workspaces(request).connection(request.path_params["workspace_id"], _bearer(request))
    return JSONResponse(connection, headers={"Cache-Control": "no-store"})


async def workspace_log(request: Request) -> Response:
    return PlainTextResponse(workspaces(request).log_text(request.path_params["workspace_id"], actor(request)))


# -- computes ------------------------------------------------------------------------------


async def list_computes(request: Request) -> Response:
    """The computes the user may use, with their health and sessions (a user's own sessions only;
    ``?check=false``: only the records, at once). Never a credential."""
    manager, user = computes(request), actor(request)
    await manager.sync_applications()  # the session service's applications are computes
    if "check" in request.query_params and not _flag(request, "check"):
        items = [compute.to_json() for compute in manager.visible(user)]
    else:
        items = await manager.describe_all(user)
    for item in items:
        item["workspaces"] = workspaces(request).attached_to(item["name"], user)
    return JSONResponse({"total": len(items), "computes": items})


async def create_compute(request: Request) -> Response:
    """Admins only: a compute holds credentials that act for everyone who uses it."""
    user = actor(request)
    access.check_admin(user, "register computes")
    body = parse_body(CreateCompute, await read_body(request))
    allowed = access.check_user_names(body.allowed_users, "allowed_users", request.app.state.identity)
    credential = "basic" if body.username else "bearer" if body.token or body.password else None
    audit.note(request, target=f"/api/computes/{body.name}", compute=body.name, url=body.url, auth=credential, allowed_users=allowed)
    compute = await computes(request).register(
        body.name, body.url, owner=user.name, user=body.username, token=body.token or body.password, allowed_users=allowed
    )
    return JSONResponse(await computes(request).describe(compute, user), status_code=201)


async def get_compute(request: Request) -> Response:
    manager, user = computes(request), actor(request)
    await manager.sync_applications(missing=request.path_params["name"])
    item = await manager.describe(manager.get_for(user, request.path_params["name"]), user)
    item["workspaces"] = workspaces(request).attached_to(item["name"], user)
    return JSONResponse(item)


async def update_compute(request: Request) -> Response:
    """Admins only: ``PATCH {"allowed_users": [names]}`` (empty: everyone may use it)."""
    user = actor(request)
    access.check_admin(user, "change computes")
    body = parse_body(SetAllowedUsers, await read_body(request))
    allowed = access.check_user_names(body.allowed_users, "allowed_users", request.app.state.identity)
    audit.note(request, allowed_users=allowed)
    compute = computes(request).set_allowed_users(request.path_params["name"], allowed)
    return JSONResponse(compute.to_json())


async def delete_compute(request: Request) -> Response:
    access.check_admin(actor(request), "remove computes")
    name = request.path_params["name"]
    computes(request).remove(name, workspaces(request).attached_to(name))
    return JSONResponse({"msg": "deleted", "name": name})


# -- notebook executions -------------------------------------------------------------------


async def list_executions(request: Request) -> Response:
    """``?status=RUNNING,FAILED`` and ``?workspace=NAME_OR_ID`` filter; newest first."""
    items = executions(request).list(request.query_params.get("status"), request.query_params.get("workspace"), actor(request))
    return JSONResponse({"total": len(items), "executions": [e.to_json() for e in reversed(items)]})


async def start_execution(request: Request) -> Response:
    body = parse_body(StartExecution, await read_body(request))
    audit.note(request, notebook=body.notebook, workspace=body.workspace, compute=body.compute, parameters=sorted(body.parameters))
    if body.compute:
        await computes(request).sync_applications(missing=body.compute)  # an application created a moment ago
    execution = await executions(request).start(body, actor(request))
    audit.note(request, target=f"/api/executions/{execution.id}")
    return JSONResponse(execution.to_json(), status_code=201)


async def get_execution(request: Request) -> Response:
    return JSONResponse(executions(request).get_for(actor(request), request.path_params["execution_id"]).to_json())


async def stop_execution(request: Request) -> Response:
    execution = executions(request).stop(request.path_params["execution_id"], actor(request))
    return JSONResponse(execution.to_json(), status_code=202)


async def execution_output(request: Request) -> Response:
    """The output notebook (a download) or its HTML rendering (shown, sandboxed: no scripts, no
    access to this origin, since notebook outputs are arbitrary HTML)."""
    execution = executions(request).get_for(actor(request), request.path_params["execution_id"])
    kind = request.path_params["kind"]
    if kind not in ("ipynb", "html"):
        raise NotFoundError(f"No output '{kind}': an execution's output is output.ipynb or output.html.")
    path = execution.output_path if kind == "ipynb" else execution.html_path
    if not path.is_file():
        raise NotFoundError(f"Execution {execution.id} has no output {kind} yet (it is {execution.status.value}).")
    filename = f"{execution.name or 'notebook'}-execution-{execution.id}.{kind}"
    if kind == "ipynb":
        return FileResponse(path, media_type="application/x-ipynb+json", filename=filename)
    return FileResponse(
        path,
        media_type="text/html; charset=utf-8",
        filename=filename,
        content_disposition_type="inline",
        headers={"Content-Security-Policy": "sandbox"},
    )


async def execution_log(request: Request) -> Response:
    execution = executions(request).get_for(actor(request), request.path_params["execution_id"])
    try:
        text = execution.log_path.read_text(errors="replace")
    except OSError:
        text = ""
    return PlainTextResponse(text)


async def execution_driver_log(request: Request) -> Response:
    """The end of the run's Spark driver log, kept with its record (the service's own link dies with the session)."""
    execution = executions(request).get_for(actor(request), request.path_params["execution_id"])
    path = execution.folder / "driver.log"
    if not path.is_file():
        raise NotFoundError(f"Execution {execution.id} has no driver log (it is {execution.status.value}).")
    return FileResponse(path, media_type="text/plain; charset=utf-8")


ROUTES = [
    Route("/health", health, methods=["GET"]),
    Route("/api/whoami", whoami, methods=["GET"]),
    Route("/api/status", status, methods=["GET"]),
    Route("/api/workspaces", list_workspaces, methods=["GET"]),
    Route("/api/workspaces", create_workspace, methods=["POST"]),
    Route("/api/workspaces/{workspace_id}", get_workspace, methods=["GET"]),
    Route("/api/workspaces/{workspace_id}", update_workspace, methods=["PATCH"]),
    Route("/api/workspaces/{workspace_id}", delete_workspace, methods=["DELETE"]),
    Route("/api/workspaces/{workspace_id}/start", start_workspace, methods=["POST"]),
    Route("/api/workspaces/{workspace_id}/stop", stop_workspace, methods=["POST"]),
    Route("/api/workspaces/{workspace_id}/collaborators", share_workspace, methods=["PUT"]),
    Route("/api/workspaces/{workspace_id}/attach", attach_workspace, methods=["POST"]),
    Route("/api/workspaces/{workspace_id}/detach", detach_workspace, methods=["POST"]),
    Route("/api/workspaces/{workspace_id}/log", workspace_log, methods=["GET"]),
    Route("/api/workspaces/{workspace_id}/open", open_workspace, methods=["GET"]),
    Route("/api/workspaces/{workspace_id}/connection", workspace_connection, methods=["GET"]),
    Route("/api/executions", list_executions, methods=["GET"]),
    Route("/api/executions", start_execution, methods=["POST"]),
    Route("/api/executions/{execution_id}", get_execution, methods=["GET"]),
    Route("/api/executions/{execution_id}/stop", stop_execution, methods=["POST"]),
    Route("/api/executions/{execution_id}/output.{kind:str}", execution_output, methods=["GET"]),
    Route("/api/executions/{execution_id}/log", execution_log, methods=["GET"]),
    Route("/api/executions/{execution_id}/driver.log", execution_driver_log, methods=["GET"]),
    Route("/api/computes", list_computes, methods=["GET"]),
    Route("/api/computes", create_compute, methods=["POST"]),
    Route("/api/computes/{name}", get_compute, methods=["GET"]),
    Route("/api/computes/{name}", update_compute, methods=["PATCH"]),
    Route("/api/computes/{name}", delete_compute, methods=["DELETE"]),
]
