"""Who may do what in the workspace server: per-user access to workspaces, executions and computes.

The rules (issue 12; EMR Studio's workspace collaboration, JupyterHub's admin and user roles):

* An **admin** sees and changes everything, and alone registers, changes and removes computes.
* A **workspace** has an owner (who created it) and collaborators (user names). The owner, the
  collaborators and admins may see it, open its JupyterLab, start and stop it, attach it to a
  compute, run executions on it and read their outputs. Only the owner and admins rename, share
  (set its collaborators) and delete it.
* A running workspace acts for whoever started it (``started_by``): its kernels hold a token of
  that user, so its JupyterLab is opened by that user only, never by anyone else (not even an
  admin: the JupyterLab's token is a key to act as that person).
* An **execution** is seen (and stopped) by its owner, by whoever may see its workspace, and by admins.
* A **compute** is used (seen, attached, run on) by the users in its ``allowed_users``, by everyone
  when that list is empty, and by admins. Nobody but the server ever sees its credentials.

Anyone else gets 403 (``ForbiddenError``) with a message saying what they may not do; listings
leave out what the user may not see. ``Identity`` is the part of the users' directory
(``studio.auth.users``) the workspace server uses: tokens that act for a person, and quotas.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Protocol

from starlette.responses import JSONResponse

from studio.errors import ForbiddenError, InvalidRequestError

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

    from studio.auth.gate import Principal
    from studio.auth.users import Directory

log = logging.getLogger("studio.workspaces.access")

MAX_COLLABORATORS = 100
_USER_NAME = re.compile(r"[a-z_][a-z0-9._-]{0,63}")  # studio.auth.users' names, after lowercasing


class Identity(Protocol):
    """What the workspace server asks the users' directory (``studio.auth.users.Directory``)."""

    def user_exists(self, name: str) -> bool: ...

    def role(self, name: str) -> str | None: ...

    def quotas(self, name: str) -> Mapping[str, int | None]: ...

    def token_for(self, user: str, kind: str, scope: str, note: str) -> str: ...

    def revoke(self, kind: str, scope: str) -> int: ...


class DirectoryIdentity:
    """``Identity`` over the users' directory that both servers share."""

    def __init__(self, directory: "Directory") -> None:
        self.directory = directory

    def user_exists(self, name: str) -> bool:
        return self.directory.get_user(name) is not None

    def role(self, name: str) -> str | None:
        user = self.directory.get_user(name)
        return user.role if user is not None else None

    def quotas(self, name: str) -> Mapping[str, int | None]:
        user = self.directory.get_user(name)
        return dict(user.quotas) if user is not None else {}

    def token_for(self, user: str, kind: str, scope: str, note: str) -> str:
        _, secret = self.directory.create_token(user, note=note, kind=kind, scope=scope)
        return secret

    def revoke(self, kind: str, scope: str) -> int:
        return self.directory.revoke_scope(kind, scope)


def kernel_scope(workspace_id: int) -> str:
    return f"workspace:{workspace_id}"


def execution_scope(execution_id: int) -> str:
    return f"execution:{execution_id}"


# -- workspaces ---------------------------------------------------------------------------------


def may_see_workspace(actor: "Principal", owner: str | None, collaborators: Iterable[str]) -> bool:
    return actor.is_admin or actor.name == owner or actor.name in collaborators


def may_manage_workspace(actor: "Principal", owner: str | None) -> bool:
    return actor.is_admin or actor.name == owner


def check_see_workspace(actor: "Principal", asked: str, owner: str | None, collaborators: Iterable[str]) -> None:
    """403 for one who may not see the workspace; the message names it as it was asked for (its id
    or name) and tells nothing else about it (not its name, not its owner)."""
    if not may_see_workspace(actor, owner, collaborators):
        raise ForbiddenError(
            f"{actor.name} may not use workspace {asked}: only its owner, its collaborators and admins may."
        )


def check_manage_workspace(actor: "Principal", name: str, owner: str | None, what: str) -> None:
    if not may_manage_workspace(actor, owner):
        raise ForbiddenError(f"{actor.name} may not {what} workspace '{name}': only its owner ({owner}) and admins may.")


def check_user_names(names: object, what: str, identity: Identity | None = None) -> list[str]:
    """A list of user names (lowercased, as the directory keeps them), without repeats, in the
    order given, each one a user of the directory (when there is one); InvalidRequestError otherwise."""
    if not isinstance(names, list):
        raise InvalidRequestError(f"'{what}' must be a list of user names.")
    if len(names) > MAX_COLLABORATORS:
        raise InvalidRequestError(f"'{what}' may name at most {MAX_COLLABORATORS} users.")
    found: list[str] = []
    for name in names:
        if not isinstance(name, str) or not _USER_NAME.fullmatch(name.strip().lower()):
            raise InvalidRequestError(f"'{what}' holds {name!r}, which is not a user name.")
        name = name.strip().lower()
        if name not in found:
            found.append(name)
    if identity is not None:
        unknown = [name for name in found if not identity.user_exists(name)]
        if unknown:
            raise InvalidRequestError(f"'{what}' names no user {', '.join(repr(n) for n in unknown)}; add the users first.")
    return found


# -- executions ---------------------------------------------------------------------------------


def may_see_execution(
    actor: "Principal", owner: str | None, workspace_owner: str | None, collaborators: Iterable[str] | None
) -> bool:
    """Admin, the execution's owner, or whoever may see its workspace (``collaborators`` None: the
    workspace is gone, so only the owner and admins)."""
    if actor.is_admin or actor.name == owner:
        return True
    return collaborators is not None and may_see_workspace(actor, workspace_owner, collaborators)


# -- computes -----------------------------------------------------------------------------------


def may_use_compute(actor_name: str, is_admin: bool, allowed_users: Iterable[str] | None) -> bool:
    allowed = list(allowed_users or [])
    return is_admin or not allowed or actor_name in allowed


def check_admin(actor: "Principal", what: str) -> None:
    if not actor.is_admin:
        raise ForbiddenError(f"Only admins may {what}; {actor.name} is a {actor.role}.")


# -- tokens that act for a person inside their running work --------------------------------------

# A `kernel` token (a running workspace's kernels) and an `execution` token (a notebook run) act for
# a person on the session service, where their Spark sessions are. On the workspace server they are
# good for one thing only, as the kernels' own secret was before there were users: a kernel asks
# where its own workspace's compute is. Everything else is refused, so code in a notebook cannot
# share, delete or open its person's workspaces with the token it was given.
_RUN_TOKEN_KINDS = frozenset({"kernel", "execution"})


def run_token_guard(app: "ASGIApp") -> "ASGIApp":
    """ASGI middleware (inside the gate, which has set ``scope["user"]``): refuse kernel and execution
    tokens everywhere but their own workspace's ``GET /api/workspaces/{id}/connection``."""

    async def guarded(scope: "Scope", receive: "Receive", send: "Send") -> None:
        user = scope.get("user") if scope["type"] in ("http", "websocket") else None
        kind = getattr(user, "kind", None)
        if kind in _RUN_TOKEN_KINDS:
            own = str(getattr(user, "scope", None) or "")
            wanted = f"/api/workspaces/{own.removeprefix('workspace:')}/connection" if own.startswith("workspace:") else None
            if not (kind == "kernel" and scope.get("method") == "GET" and scope["path"] == wanted):
                message = f"A {kind} token acts for its person on the session service; here it may only ask for its workspace's connection."
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
                    return
                await JSONResponse({"msg": message}, status_code=403)(scope, receive, send)
                return
        await app(scope, receive, send)

    return guarded
