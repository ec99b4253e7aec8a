"""Thin HTTP endpoints of the Livy API. They parse, check the caller's access
(``studio.livy.access``), call a manager, and shape the answer; status codes are Livy's (201 on
creates, 200 on cancel and DELETE)."""

from __future__ import annotations

from typing import Any, Callable

from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import Route

import studio
from studio import audit
from studio.auth import quotas
from studio.errors import InvalidRequestError, NotFoundError
from studio.livy.applications import Application, Applications
from studio.livy.access import Access, Owned, Parties, quota_overrides
from studio.livy.application_routes import connect_string
from studio.livy.batches import Batch, BatchManager
from studio.livy.models import (
    CompletionRequest,
    CreateBatch,
    CreateSession,
    CreateStatement,
    InspectRequest,
    view,
)
from studio.livy.sessions import Session, SessionManager
from studio.web import JSONResponse, parse_body, read_body

LIVY_VERSION = "0.9.0-incubating"
MAX_WAIT_SECONDS = 60.0


def _sessions(request: Request) -> SessionManager:
    return request.app.state.sessions


def _batches(request: Request) -> BatchManager:
    return request.app.state.batches


def _base_url(request: Request) -> str:
    return str(request.base_url)


def _int_param(request: Request, name: str, default: int | None) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise InvalidRequestError(f"'{name}' must be an integer, got '{raw}'.") from None


def _float_param(request: Request, name: str) -> float:
    raw = request.query_params.get(name)
    if not raw:
        return 0.0
    try:
        return max(0.0, min(float(raw), MAX_WAIT_SECONDS))
    except ValueError:
        raise InvalidRequestError(f"'{name}' must be a number of seconds, got '{raw}'.") from None


def _access(request: Request) -> Access:
    return request.app.state.access


def _visible(request: Request) -> Callable[[Owned], bool]:
    """Whether the caller may view a session or batch (``GET /sessions`` lists only those)."""
    access, caller = _access(request), request.user
    return lambda item: access.may_view(caller, item)


def _application(request: Request) -> Application:
    """The application whose Livy endpoint the request is on: ``/applications/{application}/...`` (by
    id or name), else the service's root, which is the application ``default``."""
    applications: Applications = request.app.state.applications
    key = request.path_params.get("application")
    if key is None:
        return applications.default
    application = applications.get(key)
    if not application.definition.interactiveConfiguration.livyEndpointEnabled:
        raise NotFoundError(f"Application '{application.name}' has no Livy endpoint (interactiveConfiguration.livyEndpointEnabled is false).")
    return application


def _session(request: Request, modify: bool = False) -> Session:
    """The session in the path, if the caller may view it (``modify``: change it), else 403. Any
    request about it that passes refreshes its heartbeat (Livy)."""
    manager = _sessions(request)
    key = request.path_params["session_id"]
    session = manager.in_application(manager.get(key, _visible(request)), _application(request))
    _access(request).check(request.user, session, f"session '{key}'", modify)
    manager.heartbeat(session)
    return session


def _batch(request: Request, modify: bool = False) -> Batch:
    key = request.path_params["batch_id"]
    batch = _batches(request).get(key, _visible(request), application=_application(request))
    _access(request).check(request.user, batch, f"batch '{key}'", modify)
    return batch


def _spark_user(request: Request, proxy_user: str | None) -> str:
    """The Spark user of what this request creates: Livy's ``?doAs=`` wins over the body's
    ``proxyUser``; an admin may name anyone, a user only itself (else 403)."""
    return _access(request).spark_user(request.user, request.query_params.get("doAs") or proxy_user)


def _quota(request: Request) -> Callable[[], None]:
    """429 when the caller already has as many live sessions and batches as its quota allows."""
    caller, state = request.user, request.app.state

    def check() -> None:
        in_use = state.sessions.held_by(caller.name) + state.batches.held_by(caller.name)
        overrides = quota_overrides(state.directory, caller.name)
        quotas.check(state.settings, caller.name, caller.role, "sessions", in_use, overrides)

    return check


# -- general -------------------------------------------------------------------------------


async def version(request: Request) -> Response:
    return JSONResponse(
        {
            "version": LIVY_VERSION,
            "user": None,
            "revision": f"spark-studio {studio.__version__}",
            "branch": None,
            "date": None,
            "url": "spark-studio",
        }
    )


async def health(request: Request) -> Response:
    """Open (no credentials): for load balancers and service managers; says nothing about sessions."""
    return JSONResponse({"status": "ok"})


async def whoami(request: Request) -> Response:
    """Who this request authenticated as: the ``owner`` of the sessions and batches it creates."""
    return JSONResponse({"user": request.user.name, "role": request.user.role})


async def status(request: Request) -> Response:
    """Service health and the warm pool (an extension; Livy has no such route)."""
    state = request.app.state
    return JSONResponse(
        {
            "version": studio.__version__,
            "livyVersion": LIVY_VERSION,
            "master": state.settings.master,
            "pool": state.pool.status(),
            "liveSessions": state.sessions.live_count(),
            "liveBatches": state.batches.live_count(),
            "maxSessions": state.settings.max_sessions,
            "classDataArchive": str(state.cds.path) if state.cds.exists() else None,
            "driverMode": "shared" if _application(request).shared else "dedicated",
            "sparkConnect": connect_string(request, _application(request)),
            "memoryBudgetMB": state.service.shared.admission.budget_mb,
            "sharedDrivers": [
                d for d in state.service.shared.status() if request.user.is_admin or d["user"] == request.user.name
            ],
        }
    )


# -- sessions ------------------------------------------------------------------------------


async def list_sessions(request: Request) -> Response:
    start = _int_param(request, "from", 0) or 0
    size = _int_param(request, "size", 100)
    total, page = _sessions(request).list(start, 100 if size is None else size, _visible(request), _application(request))
    base = _base_url(request)
    # Livy echoes ``from`` as given, also a negative one (its page then starts at 0).
    return JSONResponse({"from": start, "total": total, "sessions": [s.to_json(base) for s in page]})


def _owner(request: Request) -> str:
    """Who the request acts for, as the gate authenticated it (never a header the client chooses)."""
    return str(request.user.name)


async def create_session(request: Request) -> Response:
    body = parse_body(CreateSession, await read_body(request))
    body = body.model_copy(update={"proxyUser": _spark_user(request, body.proxyUser)})
    session = await _sessions(request).create(body, owner=_owner(request), quota=_quota(request), application=_application(request))
    audit.note(request, target=f"/sessions/{session.id}", kind=body.kind, name=body.name, proxyUser=body.proxyUser, conf=body.conf or None)
    return JSONResponse(session.to_json(_base_url(request)), status_code=201, headers={"Location": f"/{session.id}"})


async def check_session(request: Request) -> Response:
    """``POST /studio/sessions/check`` (an extension): would ``POST /sessions`` accept this body?
    200 ``{"msg": "ok"}``, or the 400 that POST /sessions would give, worded alike. Nothing starts;
    name uniqueness, capacity and quota are not checked (they can change before the real create);
    ``proxyUser`` is (403 for a user naming another)."""
    body = parse_body(CreateSession, await read_body(request))
    _spark_user(request, body.proxyUser)
    _sessions(request).validate(body)
    return JSONResponse({"msg": "ok"})


async def get_session(request: Request) -> Response:
    return JSONResponse(_session(request).to_json(_base_url(request)))


async def describe_session(request: Request) -> Response:
    """``GET /studio/sessions/{id}`` (an extension): the session's state, why it ended, and while it
    is idle how long until it is stopped for that; also for a session no Livy route shows any more.
    Like any request about a live session, it refreshes its heartbeat."""
    manager = _sessions(request)
    key = request.path_params["session_id"]
    description = manager.describe(key, _visible(request))
    _access(request).check(request.user, Parties(description["owner"], description["proxyUser"]), f"session '{key}'")
    if description.get("listed"):
        manager.heartbeat(manager.get(key))
    return JSONResponse(description)


async def session_state(request: Request) -> Response:
    session = _session(request)
    return JSONResponse({"id": session.id, "state": session.state.value})


async def delete_session(request: Request) -> Response:
    await _sessions(request).delete(_session(request, modify=True))
    return JSONResponse({"msg": "deleted"})


def _log_page(log: Any, request: Request, item_id: int) -> Response:
    start = _int_param(request, "from", None)
    size = _int_param(request, "size", None)
    limit = request.app.state.settings.max_log_page_lines
    if size is not None and size > limit:
        raise InvalidRequestError(
            f"'size' of {size:,} lines is over the {limit:,} lines one log request may read "
            "(STUDIO_MAX_LOG_PAGE_LINES); read the log in pages with 'from' and 'size'."
        )
    if log is None:
        return JSONResponse({"id": item_id, "from": 0, "total": 0, "log": []})
    first, total, lines = log.page(start, size, limit)
    return JSONResponse({"id": item_id, "from": first, "total": total, "log": lines})


def _log_text(log: Any) -> Response:
    """A whole log as text, streamed from its file (it can be far larger than a JSON page)."""
    if log is None or not log.path.is_file():
        return PlainTextResponse("")
    return FileResponse(log.path, media_type="text/plain; charset=utf-8")


async def session_log(request: Request) -> Response:
    session = _session(request)
    return _log_page(session.log, request, session.id)


async def session_log_text(request: Request) -> Response:
    """``appInfo.driverLogUrl``: also for a session DELETEd within the retention time."""
    key = request.path_params["session_id"]
    log, parties = _sessions(request).driver_log(key, _visible(request))
    _access(request).check(request.user, parties, f"session '{key}'")
    return _log_text(log)


# -- statements ----------------------------------------------------------------------------


async def list_statements(request: Request) -> Response:
    session = _session(request)
    statements = list(session.statements.values())
    if request.query_params.get("order") == "desc":
        statements.reverse()
    total = len(statements)
    start = _int_param(request, "from", 0) or 0
    size = _int_param(request, "size", None)
    page = view(statements, start, total if size is None else size)
    return JSONResponse({"total_statements": total, "statements": [s.to_json() for s in page]})


async def create_statement(request: Request) -> Response:
    session = _session(request, modify=True)
    body = parse_body(CreateStatement, await read_body(request))
    audit.note(request, code=body.code, session=session.id, kind=body.kind)
    manager = _sessions(request)
    # An extension no Livy client sends: with it, a POST retried after a lost answer runs once.
    statement = manager.add_statement(session, body, request.headers.get("idempotency-key"), user=request.user.name)
    audit.note(request, target=f"/sessions/{session.id}/statements/{statement.id}", statement=statement.id)
    stream = _stream_param(request)
    await manager.wait_statement(statement, _float_param(request, "wait"), stream)
    return JSONResponse(
        statement.to_json(detail=bool(request.query_params.get("detail")), stream=stream),
        status_code=201,
        headers={"Location": f"/{session.id}/statements/{statement.id}"},
    )


async def get_statement(request: Request) -> Response:
    session = _session(request)
    manager = _sessions(request)
    statement = manager.get_statement(session, _path_int(request, "statement_id"))
    stream = _stream_param(request)
    await manager.wait_statement(statement, _float_param(request, "wait"), stream)
    return JSONResponse(statement.to_json(detail=bool(request.query_params.get("detail")), stream=stream))


def _stream_param(request: Request) -> int | None:
    """``?stream=N`` (an extension): add what the statement printed from character N on, and let
    ``?wait=`` return as soon as there is more of it. Without it the answer is exactly Livy's."""
    start = _int_param(request, "stream", None)
    if start is not None and start < 0:
        raise InvalidRequestError(f"'stream' must be a character offset of 0 or more, got {start}.")
    return start


def _path_int(request: Request, name: str) -> int:
    raw = request.path_params[name]
    try:
        return int(raw)
    except ValueError:
        raise InvalidRequestError(f"Statement id must be an integer, got '{raw}'.") from None


async def cancel_statement(request: Request) -> Response:
    session = _session(request, modify=True)
    _sessions(request).cancel_statement(session, _path_int(request, "statement_id"))
    return JSONResponse({"msg": "canceled"})


async def statement_arrow(request: Request) -> Response:
    session = _session(request)
    path = _sessions(request).result_file(session, _path_int(request, "statement_id"))
    return FileResponse(path, media_type="application/vnd.apache.arrow.stream")


async def inspect(request: Request) -> Response:
    session = _session(request, modify=True)  # it evaluates names in the session, as completion does
    body = parse_body(InspectRequest, await read_body(request))
    return JSONResponse(await _sessions(request).inspect(session, body))


async def completion(request: Request) -> Response:
    session = _session(request, modify=True)
    body = parse_body(CompletionRequest, await read_body(request))
    candidates = await _sessions(request).complete(session, body)
    return JSONResponse({"candidates": candidates})


# -- batches -------------------------------------------------------------------------------


async def list_batches(request: Request) -> Response:
    start = _int_param(request, "from", 0) or 0
    size = _int_param(request, "size", 100)
    total, page = _batches(request).list(start, 100 if size is None else size, _visible(request), application=_application(request))
    base = _base_url(request)
    return JSONResponse({"from": start, "total": total, "sessions": [b.to_json(base) for b in page]})


async def create_batch(request: Request) -> Response:
    body = parse_body(CreateBatch, await read_body(request))
    body = body.model_copy(update={"proxyUser": _spark_user(request, body.proxyUser)})
    batch = await _batches(request).create(body, owner=_owner(request), quota=_quota(request), application=_application(request))
    audit.note(request, target=f"/batches/{batch.id}", name=body.name, file=body.file, className=body.className, proxyUser=body.proxyUser, conf=body.conf or None)
    return JSONResponse(batch.to_json(_base_url(request)), status_code=201, headers={"Location": f"/{batch.id}"})


async def get_batch(request: Request) -> Response:
    return JSONResponse(_batch(request).to_json(_base_url(request)))


async def batch_state(request: Request) -> Response:
    batch = _batch(request)
    return JSONResponse({"id": batch.id, "state": batch.state.value})


async def batch_log(request: Request) -> Response:
    batch = _batch(request)
    return _log_page(batch.log, request, batch.id)


async def batch_log_text(request: Request) -> Response:
    """``appInfo.driverLogUrl``: also for a batch DELETEd within the retention time."""
    key = request.path_params["batch_id"]
    log, parties = _batches(request).driver_log(key, _visible(request))
    _access(request).check(request.user, parties, f"batch '{key}'")
    return _log_text(log)


async def delete_batch(request: Request) -> Response:
    await _batches(request).delete(_batch(request, modify=True))
    return JSONResponse({"msg": "deleted"})


ROUTES = [
    Route("/version", version, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
    Route("/studio/status", status, methods=["GET"]),
    Route("/studio/whoami", whoami, methods=["GET"]),
    Route("/studio/sessions/check", check_session, methods=["POST"]),
    Route("/studio/sessions/{session_id}", describe_session, methods=["GET"]),
    Route("/sessions", list_sessions, methods=["GET"]),
    Route("/sessions", create_session, methods=["POST"]),
    Route("/sessions/{session_id}", get_session, methods=["GET"]),
    Route("/sessions/{session_id}", delete_session, methods=["DELETE"]),
    Route("/sessions/{session_id}/state", session_state, methods=["GET"]),
    Route("/sessions/{session_id}/log", session_log, methods=["GET"]),
    Route("/sessions/{session_id}/statements", list_statements, methods=["GET"]),
    Route("/sessions/{session_id}/statements", create_statement, methods=["POST"]),
    Route("/sessions/{session_id}/statements/{statement_id}", get_statement, methods=["GET"]),
    Route("/sessions/{session_id}/statements/{statement_id}/cancel", cancel_statement, methods=["POST"]),
    Route("/sessions/{session_id}/statements/{statement_id}/arrow", statement_arrow, methods=["GET"]),
    Route("/sessions/{session_id}/completion", completion, methods=["POST"]),
    Route("/sessions/{session_id}/inspect", inspect, methods=["POST"]),
    Route("/batches", list_batches, methods=["GET"]),
    Route("/batches", create_batch, methods=["POST"]),
    Route("/batches/{batch_id}", get_batch, methods=["GET"]),
    Route("/batches/{batch_id}", delete_batch, methods=["DELETE"]),
    Route("/batches/{batch_id}/state", batch_state, methods=["GET"]),
    Route("/batches/{batch_id}/log", batch_log, methods=["GET"]),
    # Every application's own Livy endpoint: the same routes under /applications/{application} (added below).
    Route("/ui/session/{session_id}/log", session_log_text, methods=["GET"]),
    Route("/ui/batch/{batch_id}/log", batch_log_text, methods=["GET"]),
]

# The Livy API of each application, as EMR Serverless gives each application its own endpoint.
APPLICATION_LIVY_ROUTES = [
    Route(f"/applications/{{application}}{route.path}", route.endpoint, methods=sorted(route.methods or ()))
    for route in ROUTES
    # and what our own clients ask a Livy endpoint first (is it the studio's? whoami, check, describe)
    if route.path.startswith(("/sessions", "/batches", "/version", "/studio/"))
]
