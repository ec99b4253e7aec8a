"""What both web applications share: reading and parsing request bodies (a size limit, strict JSON
into a pydantic model, every problem an ``InvalidRequestError`` naming the field), one set of error
handlers that turn ``studio.errors`` and Starlette's own HTTP errors into Livy's ``{"msg": ...}``
shape with the right status code, and one JSON response that is valid JSON for every value Python
or Spark can produce."""

from __future__ import annotations

import errno
import json
import logging
import math
from typing import Any, Awaitable, Callable

from pydantic import BaseModel, ValidationError
from starlette import responses
from starlette.exceptions import HTTPException
from starlette.requests import Request

from studio.errors import InvalidRequestError, PayloadTooLargeError, StudioError

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

async def read_body(request: Request) -> bytes:
    """The request body, refused with 413 beyond ``settings.max_request_bytes`` (declared or streamed)."""
    limit = request.app.state.settings.max_request_bytes
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise PayloadTooLargeError(f"Request body of {int(length):,} bytes is over the {limit:,}-byte limit.")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"Request body is over the {limit:,}-byte limit.")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_body(model: type[BaseModel], raw: bytes) -> Any:
    """Parse and validate a JSON body into ``model``; every problem is an InvalidRequestError."""
    if not raw.strip():
        raise InvalidRequestError("Rejected, Reason: the request body is empty; send a JSON object.")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"Malformed JSON in the request body: {exc}.") from None
    if not isinstance(data, dict):
        raise InvalidRequestError(f"The request body must be a JSON object, got {type(data).__name__}.")
    where = _lone_surrogate(data)
    if where is not None:
        where = where.encode("utf-8", "backslashreplace").decode("utf-8")
        # JSON's \\udcff escape can name half a character, which no UTF-8 store or log can hold.
        raise InvalidRequestError(f'Field "{where}" holds text that is not valid Unicode (a lone surrogate escape like \\udcff).')
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequestError(_validation_message(model, exc)) from None


def _lone_surrogate(value: Any, where: str = "") -> str | None:
    """Where in ``value`` a string holds a lone surrogate, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "body"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        path = f"{where}.{key}" if where else str(key)
        found = _lone_surrogate(key, path) if isinstance(key, str) else None
        found = found or _lone_surrogate(item, path)
        if found is not None:
            return found
    return None


def _validation_message(model: type[BaseModel], exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "body"
        if err["type"] == "extra_forbidden":
            known = ", ".join(sorted(model.model_fields))
            problems.append(f'Unrecognized field "{field}" (known fields: {known})')
        elif err["type"] == "missing":
            problems.append(f'Field "{field}" is required')
        else:
            got = json.dumps(err.get("input"), default=str)
            if len(got) > 80:
                got = got[:77] + "..."
            problems.append(f'Field "{field}": {err["msg"]} (got {got})')
    return "; ".join(problems) + "."


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

    async def os_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, OSError)
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise exc  # to ``unhandled``
        # A file the request needed (a log, a result, a worker's settings) could not be written.
        log.warning("%s %s: the state disk is full: %s", request.method, request.url.path, exc)
        message = f"The state disk is full ({exc.strerror}): this request could not be completed. Try again once there is room."
        return JSONResponse({"msg": message}, status_code=507)

    async def unhandled(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"msg": f"Unhandled error: {type(exc).__name__}: {exc}"}, status_code=500)

    return {StudioError: studio_error, HTTPException: http_error, OSError: os_error, Exception: unhandled}
