"""The audit trail on the workspace server: ``GET /api/audit`` (JSON) and the Studio's Audit page
(``/audit``), both for admins only (403 for anyone else, itself recorded).

Filters (query parameters, all optional): ``user`` (exact), ``action`` (a part of it, any case:
``statements``, ``sign-in``, ``POST /api/workspaces``), ``target`` (that path and everything under
it: ``/sessions/3``), ``outcome`` (``201``, ``403``, ``ok``, ...), ``since`` and ``until`` (epoch
seconds, ISO 8601, or an age like ``2h``), ``limit`` (default 100, at most 1000) and ``before``
(the ``next`` of the previous page). Newest first.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from studio import audit
from studio.errors import ForbiddenError, InvalidRequestError
from studio.web import JSONResponse

FILTERS = ("user", "action", "target", "outcome", "since", "until")


def trail(request: Request) -> audit.Trail:
    return request.app.state.audit


def _admin(request: Request) -> None:
    if not request.user.is_admin:
        raise ForbiddenError("Only admins may read the audit trail.")


def _int(request: Request, name: str, default: int | None) -> int | None:
    raw = request.query_params.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequestError(f"'{name}' must be a whole number, got '{raw[:40]}'.") from None
    if value < 1:
        raise InvalidRequestError(f"'{name}' must be 1 or more, got {value}.")
    return value


def search(request: Request) -> tuple[list[audit.Record], int | None, int]:
    """The records the query parameters ask for, the cursor of the next page (or None) and the limit."""
    params = request.query_params
    limit = _int(request, "limit", audit.DEFAULT_LIMIT) or audit.DEFAULT_LIMIT
    if limit > audit.MAX_LIMIT:
        raise InvalidRequestError(f"'limit' is at most {audit.MAX_LIMIT}, got {limit}.")
    records = trail(request).query(
        user=params.get("user") or None,
        action=params.get("action") or None,
        target=params.get("target") or None,
        outcome=params.get("outcome") or None,
        since=audit.parse_time(params.get("since"), "since"),
        until=audit.parse_time(params.get("until"), "until"),
        before=_int(request, "before", None),
        limit=limit,
    )
    following = records[-1].id if len(records) == limit and records[-1].id > 1 else None
    return records, following, limit


async def list_records(request: Request) -> Response:
    _admin(request)
    records, following, limit = search(request)
    return JSONResponse(
        {"records": [record.to_json() for record in records], "next": following, "limit": limit},
        headers={"Cache-Control": "no-store"},
    )


async def page(request: Request) -> Response:
    from studio.workspaces.ui import templates

    filters = {name: request.query_params.get(name, "") for name in FILTERS}
    context: dict[str, Any] = {
        "user": request.user.name,
        "role": request.user.role,
        "current": "audit",
        "filters": filters,
        "error": None,
        "records": [],
        "older": None,
    }
    if not request.user.is_admin:
        context["error"] = "Only admins may read the audit trail."
        return templates.TemplateResponse(request, "audit.html", context, status_code=403)
    try:
        records, following, limit = search(request)
    except InvalidRequestError as exc:
        context["error"] = exc.msg
        return templates.TemplateResponse(request, "audit.html", context, status_code=400)
    context["records"] = [_shown(record) for record in records]
    if following is not None:
        kept = {name: value for name, value in filters.items() if value}
        context["older"] = "/audit?" + urlencode({**kept, "limit": limit, "before": following})
    return templates.TemplateResponse(request, "audit.html", context, headers={"Cache-Control": "no-store"})


def _shown(record: audit.Record) -> dict[str, Any]:
    """A record for the page: its detail as ``name=JSON`` text (the template escapes it)."""
    shown = record.to_json()
    shown["detail_text"] = [(key, json.dumps(value, ensure_ascii=False)) for key, value in record.detail.items()]
    return shown


ROUTES = [
    Route("/api/audit", list_records, methods=["GET"]),
    Route("/audit", page, methods=["GET"]),
]
