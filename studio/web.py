"""What both web applications share: one set of error handlers that turn ``studio.errors`` and
Starlette's own HTTP errors into Livy's ``{"msg": ...}`` shape with the right status code."""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from studio.errors import StudioError

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
