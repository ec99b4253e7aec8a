"""EMR Serverless's application operations over HTTP (``studio.livy.applications`` does the work).

    POST   /applications                       CreateApplication   (admins)
    GET    /applications                       ListApplications    (?states=STARTED&states=...&maxResults=)
    GET    /applications/{application}         GetApplication
    PATCH  /applications/{application}         UpdateApplication   (admins; CREATED or STOPPED only)
    POST   /applications/{application}/start   StartApplication    (admins)
    POST   /applications/{application}/stop    StopApplication     (admins)
    DELETE /applications/{application}         DeleteApplication   (admins; CREATED or STOPPED only)

Any signed-in user may see the applications (they choose among them); only admins shape capacity.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from studio import audit
from studio.errors import ForbiddenError, InvalidRequestError
from studio.livy.applications import Application, Applications, ApplicationState
from studio.web import JSONResponse, read_body

MAX_RESULTS = 50  # EMR's default page


def _applications(request: Request) -> Applications:
    return request.app.state.applications


def _admin(request: Request, what: str) -> None:
    if not request.user.is_admin:
        raise ForbiddenError(f"Only admins may {what} applications.")


async def _json(request: Request) -> object:
    raw = await read_body(request)
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"Malformed JSON in the request body: {exc}.") from None


def _base(request: Request) -> str:
    return str(request.base_url)


def connect_string(request: Request, app: Application) -> str | None:
    """How a Spark Connect client reaches its user's driver of ``app`` (shared mode), with a placeholder
    where the caller's own secret goes (an API response never carries one)."""
    port = getattr(request.app.state.service, "connect_port", None)
    if not app.shared or port is None:
        return None
    # The endpoint listens on the loopback only (pyspark sends a token without TLS only to localhost).
    target = "" if app.is_default else f";x-studio-application={app.name}"
    return f"sc://localhost:{port}/;token=<your studio token>{target}"


def _described(request: Request, app: Application) -> dict[str, Any]:
    return {**app.to_json(_base(request)), "sparkConnect": connect_string(request, app)}


async def create_application(request: Request) -> Response:
    _admin(request, "create")
    app = await _applications(request).create(await _json(request))
    audit.note(request, target=f"/applications/{app.id}", name=app.name)
    return JSONResponse({"applicationId": app.id, "name": app.name, "arn": app.summary_json()["arn"]})


async def list_applications(request: Request) -> Response:
    states = set(request.query_params.getlist("states"))
    unknown = states - {s.value for s in ApplicationState}
    if unknown:
        raise InvalidRequestError(f"Unknown application state(s): {', '.join(sorted(unknown))}.")
    raw = request.query_params.get("maxResults") or str(MAX_RESULTS)
    if not raw.isdigit() or not 1 <= int(raw) <= 50:
        raise InvalidRequestError("maxResults must be a whole number from 1 to 50.")
    offset = request.query_params.get("nextToken") or "0"
    if not offset.isdigit():
        raise InvalidRequestError("nextToken is not one this service gave.")
    apps = _applications(request).list(states or None)
    page = apps[int(offset) : int(offset) + int(raw)]
    following = int(offset) + int(raw)
    return JSONResponse(
        {
            "applications": [{**a.summary_json(), "livyEndpoint": a.livy_endpoint(_base(request))} for a in page],
            "nextToken": str(following) if following < len(apps) else None,
        }
    )


async def get_application(request: Request) -> Response:
    app = _applications(request).get(request.path_params["application"])
    return JSONResponse({"application": _described(request, app)})


async def update_application(request: Request) -> Response:
    _admin(request, "update")
    app = await _applications(request).update(request.path_params["application"], await _json(request))
    audit.note(request, target=f"/applications/{app.id}", name=app.name)
    return JSONResponse({"application": _described(request, app)})


async def start_application(request: Request) -> Response:
    _admin(request, "start")
    await _applications(request).start(request.path_params["application"])
    return JSONResponse({})


async def stop_application(request: Request) -> Response:
    _admin(request, "stop")
    await _applications(request).stop(request.path_params["application"])
    return JSONResponse({})


async def delete_application(request: Request) -> Response:
    _admin(request, "delete")
    await _applications(request).delete(request.path_params["application"])
    return JSONResponse({})


ROUTES = [
    Route("/applications", create_application, methods=["POST"]),
    Route("/applications", list_applications, methods=["GET"]),
    Route("/applications/{application}", get_application, methods=["GET"]),
    Route("/applications/{application}", update_application, methods=["PATCH"]),
    Route("/applications/{application}", delete_application, methods=["DELETE"]),
    Route("/applications/{application}/start", start_application, methods=["POST"]),
    Route("/applications/{application}/stop", stop_application, methods=["POST"]),
]
