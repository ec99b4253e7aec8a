"""The users' and tokens' JSON API of the workspace server (the users' directory, ``studio.auth.users``).

* ``GET /api/users``, ``POST /api/users`` (admins): list; add a user (``{"name", "role",
  "password", "email"}``), answered with the user and its first personal token, whose ``secret``
  appears in this answer only.
* ``GET|PATCH|DELETE /api/users/{name}`` (admins): one user with its personal tokens; change its
  ``role``, ``password`` or ``quotas`` (the whole set of its own quotas: a key left out is the
  role's default, ``null`` no limit); remove it with every token of theirs.
* ``GET /api/tokens``, ``POST /api/tokens``: your own personal tokens (an admin may name another
  ``user``); a new one (``{"note", "expires_days"}``) with its ``secret``, shown once.
* ``DELETE /api/tokens/{id}``: revoke one of yours (admins: anyone's); it stops working at once.

No answer holds a password hash or a token's hash. A kernel's or a notebook run's token (which
acts for a person only while that work runs) may not manage users or tokens: it could otherwise
mint a personal token that outlives the work.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from studio import audit
from studio.auth.gate import Principal
from studio.auth.users import MAX_NOTE, Directory, TokenInfo, check_quotas
from studio.errors import ForbiddenError, InvalidRequestError, NotFoundError, StudioError
from studio.web import parse_body, read_body

# Credentials that act for a person only while some work of theirs runs.
_WORK_KINDS = frozenset({"kernel", "execution"})


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateUser(_Body):
    name: str = Field(max_length=200)
    role: str = "user"
    password: str | None = Field(None, max_length=1024)
    email: str | None = Field(None, max_length=320)


class UpdateUser(_Body):
    role: str | None = None
    password: str | None = Field(None, max_length=1024)
    quotas: dict[str, int | None] | None = None


class CreateToken(_Body):
    note: str = Field("", max_length=MAX_NOTE)
    expires_days: float | None = Field(None, gt=0, le=3650)
    user: str | None = Field(None, max_length=200)


def directory(request: Request) -> Directory:
    """The users' directory the workspace server opened at start (``app.state.identity``)."""
    found = getattr(getattr(request.app.state, "identity", None), "directory", None)
    if not isinstance(found, Directory):
        raise StudioError("The users' directory is not open.")
    return found


def _principal(request: Request) -> Principal:
    principal: Principal = request.user
    if principal.kind in _WORK_KINDS:
        raise ForbiddenError(
            f"A {principal.kind} token acts for {principal.name} only while that work runs; it may not manage users "
            "or tokens. Use a personal token or sign in."
        )
    return principal


def _admin(request: Request) -> Principal:
    principal = _principal(request)
    if not principal.is_admin:
        raise ForbiddenError("Only an admin may manage users.")
    return principal


def _token_json(info: TokenInfo, secret: str | None = None) -> dict[str, Any]:
    data = info.to_json()
    if secret is not None:
        data["secret"] = secret
    return data


def _user_json(found: Directory, name: str) -> dict[str, Any]:
    user = found.get_user(name)
    if user is None:
        raise NotFoundError(f"No user '{name}'.")
    data = user.to_json()
    data["tokens"] = [t.to_json() for t in found.list_tokens(user.name, kind="personal")]
    return data


# -- users ------------------------------------------------------------------------------------------


async def list_users(request: Request) -> Response:
    _admin(request)
    items = _users_json(directory(request))
    return JSONResponse({"total": len(items), "users": items}, headers={"Cache-Control": "no-store"})


async def create_user(request: Request) -> Response:
    _admin(request)
    body: CreateUser = parse_body(CreateUser, await read_body(request))
    found = directory(request)
    user, secret = await run_in_threadpool(found.add_user, body.name, body.role, body.password, body.email)
    token = found.list_tokens(user.name, kind="personal")[-1]
    login = "password" if body.password else "token only"
    audit.note(request, target=f"/api/users/{user.name}", role=user.role, login=login, token_id=token.id)
    return JSONResponse(
        {"user": user.to_json(), "token": _token_json(token, secret)},
        status_code=201,
        headers={"Cache-Control": "no-store"},
    )


async def get_user(request: Request) -> Response:
    _admin(request)
    return JSONResponse(_user_json(directory(request), request.path_params["name"]))


async def update_user(request: Request) -> Response:
    _admin(request)
    body: UpdateUser = parse_body(UpdateUser, await read_body(request))
    found = directory(request)
    name = request.path_params["name"]
    if found.get_user(name) is None:
        raise NotFoundError(f"No user '{name}'.")
    if body.role is None and body.password is None and body.quotas is None:
        raise InvalidRequestError("Nothing to change: send role, password or quotas.")
    quotas = check_quotas(body.quotas) if body.quotas is not None else None
    changed = [name for name in ("role", "password", "quotas") if getattr(body, name) is not None]
    audit.note(request, changed=changed, role=body.role, quotas=quotas)  # never the password itself
    if body.role is not None:
        found.set_role(name, body.role)
    if body.password is not None:
        await run_in_threadpool(found.set_password, name, body.password)
    if quotas is not None:
        found.set_quotas(name, quotas)
    return JSONResponse(_user_json(found, name))


async def delete_user(request: Request) -> Response:
    _admin(request)
    name = request.path_params["name"]
    directory(request).remove_user(name)
    return JSONResponse({"msg": "deleted", "name": name.strip().lower()})


# -- tokens -----------------------------------------------------------------------------------------


def _whose(request: Request, asked: str | None) -> str:
    """The user whose tokens a request is about: its own, or (admins only) the one it names."""
    principal = _principal(request)
    if asked is None or asked.strip().lower() == principal.name:
        return principal.name
    if not principal.is_admin:
        raise ForbiddenError("Only an admin may see or make another user's tokens.")
    return asked


async def list_tokens(request: Request) -> Response:
    user = _whose(request, request.query_params.get("user"))
    found = directory(request)
    if found.get_user(user) is None:
        raise NotFoundError(f"No user '{user}'.")
    items = [t.to_json() for t in found.list_tokens(user, kind="personal")]
    return JSONResponse({"total": len(items), "tokens": items}, headers={"Cache-Control": "no-store"})


async def create_token(request: Request) -> Response:
    body: CreateToken = parse_body(CreateToken, await read_body(request))
    user = _whose(request, body.user)
    expires = time.time() + body.expires_days * 86400 if body.expires_days is not None else None
    info, secret = directory(request).create_token(user, note=body.note, expires_at=expires)
    audit.note(request, target=f"/api/tokens/{info.id}", token_id=info.id, token_user=info.user, token_note=info.note)
    return JSONResponse(_token_json(info, secret), status_code=201, headers={"Cache-Control": "no-store"})


async def revoke_token(request: Request) -> Response:
    principal = _principal(request)
    token_id = request.path_params["token_id"]
    found = directory(request)
    info = found.get_token(token_id)
    if info is None or (info.user != principal.name and not principal.is_admin):
        raise NotFoundError(f"No token '{token_id}' of yours.")
    found.revoke_token(token_id)
    audit.note(request, token_id=token_id, token_user=info.user)
    return JSONResponse({"msg": "revoked", "id": token_id, "user": info.user})


# -- the Users and Tokens pages ---------------------------------------------------------------------


def _users_json(found: Directory) -> list[dict[str, Any]]:
    counts: dict[str, int] = {}
    for token in found.list_tokens(kind="personal"):
        if not token.expired:
            counts[token.user] = counts.get(token.user, 0) + 1
    return [{**user.to_json(), "tokenCount": counts.get(user.name, 0)} for user in found.list_users()]


def _page(request: Request, template: str, current: str, fill: Callable[[], dict[str, Any]], **context: Any) -> Response:
    """A page for whoever is signed in; what ``fill`` raises is shown on it, with its status."""
    from studio.workspaces.ui import templates

    principal: Principal = request.user
    values = {"user": principal.name, "role": principal.role, "current": current, "me": principal.name, "error": None}
    values.update(context)
    status = 200
    try:
        values.update(fill())
    except StudioError as exc:
        values["error"] = exc.msg
        status = exc.status_code
    return templates.TemplateResponse(request, template, values, status_code=status, headers={"Cache-Control": "no-store"})


async def users_page(request: Request) -> Response:
    def fill() -> dict[str, Any]:
        _admin(request)
        return {"users": _users_json(directory(request))}

    return _page(request, "users.html", "users", fill=fill)


async def user_rows(request: Request) -> Response:
    from studio.workspaces.ui import templates

    _admin(request)
    context = {"users": _users_json(directory(request)), "me": request.user.name}
    return templates.TemplateResponse(request, "_users.html", context, headers={"Cache-Control": "no-store"})


def _tokens_context(request: Request) -> dict[str, Any]:
    owner = _whose(request, request.query_params.get("user") or None)
    found = directory(request)
    if found.get_user(owner) is None:
        raise NotFoundError(f"No user '{owner}'.")
    owner = owner.strip().lower()
    return {"owner": owner, "tokens": [t.to_json() for t in found.list_tokens(owner, kind="personal")], "now": time.time()}


async def tokens_page(request: Request) -> Response:
    owner = (request.query_params.get("user") or request.user.name).strip().lower()
    return _page(request, "tokens.html", "tokens", owner=owner, fill=lambda: _tokens_context(request))


async def token_rows(request: Request) -> Response:
    from studio.workspaces.ui import templates

    return templates.TemplateResponse(request, "_tokens.html", _tokens_context(request), headers={"Cache-Control": "no-store"})


ROUTES = [
    Route("/users", users_page, methods=["GET"]),
    Route("/ui/users", user_rows, methods=["GET"]),
    Route("/tokens", tokens_page, methods=["GET"]),
    Route("/ui/tokens", token_rows, methods=["GET"]),
    Route("/api/users", list_users, methods=["GET"]),
    Route("/api/users", create_user, methods=["POST"]),
    Route("/api/users/{name}", get_user, methods=["GET"]),
    Route("/api/users/{name}", update_user, methods=["PATCH"]),
    Route("/api/users/{name}", delete_user, methods=["DELETE"]),
    Route("/api/tokens", list_tokens, methods=["GET"]),
    Route("/api/tokens", create_token, methods=["POST"]),
    Route("/api/tokens/{token_id}", revoke_token, methods=["DELETE"]),
]
