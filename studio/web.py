"""What both web applications share: one set of error handlers that turn ``studio.errors`` and
Starlette's own HTTP errors into Livy's ``{"msg": ...}`` shape with the right status code, and
one JSON response that is valid JSON for every value Python or Spark can produce."""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Awaitable, Callable

from starlette import responses
from starlette.exceptions import HTTPException
from starlette.requests import Request

from studio.errors import StudioError

# Spark's own JSON writer (to_json, DataFrame.toJSON) writes these floats as strings too.
_FLOAT_NAMES = {math.inf: "Infinity", -math.inf: "-Infinity"}


def json_safe(value: Any) -> Any:
    """``value`` with every float that JSON cannot hold (NaN, ±Infinity) as the strings "NaN",
    "Infinity", "-Infinity", and every lone surrogate (``"\udcff"``: undecodable bytes of a file
    name, say) as its backslash escape, so the text survives as UTF-8."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        return _FLOAT_NAMES.get(value, value)
    if isinstance(value, dict):
        return {json_safe(k) if isinstance(k, str) else k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dumps(content: Any) -> bytes:
    """Compact UTF-8 JSON that every client can parse (see ``json_safe``)."""
    try:
        text = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return text.encode("utf-8")
    except (ValueError, UnicodeEncodeError):
        # Only values that need it pay for the walk: most responses hold neither case.
        return json.dumps(json_safe(content), ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


class JSONResponse(responses.JSONResponse):
    """Starlette's JSONResponse, but never invalid JSON and never a failed encode: a NaN in a
    statement's output must not turn every later listing of the session into a 500."""

    def render(self, content: Any) -> bytes:
        return dumps(content)

Handler = Callable[[Request, Exception], Awaitable[JSONResponse]]


def error_handlers(log: logging.Logger) -> dict[Any, Handler]:
    """``exception_handlers`` for a Starlette app; unexpected errors are logged with their traceback."""

    async def studio_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StudioError)
        if exc.log_message:
            log.info("%s: %s", exc.msg, exc.log_message)
        return JSONResponse({"msg": exc.msg}, status_code=exc.status_code)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        message = exc.detail
        if exc.status_code == 404:
            message = f"No such resource: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}"
        return JSONResponse({"msg": message}, status_code=exc.status_code)

    async def unhandled(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"msg": f"Unhandled error: {type(exc).__name__}: {exc}"}, status_code=500)

    return {StudioError: studio_error, HTTPException: http_error, Exception: unhandled}
