"""Computes: named Livy endpoints that workspaces attach to.

A compute is a row (name, URL, owner, credentials) plus what its endpoint says when asked:
``GET /version`` (any Livy answers it), ``GET /studio/status`` (only the studio's own session
service; a plain Livy has none, which is fine) and ``GET /sessions``. Nothing is cached: a compute
is asked when it is listed, so the Studio page shows its state as of that moment.

Credentials (a token, or a user name and password for HTTP Basic) are kept in the store, sent
only to that compute, given only to the kernels of workspaces attached to it (through the
server, never through a file), and never shown: listings say only which kind they are. A URL with
``user:password@`` in it is split into the URL and credentials. The built-in compute ``local``
is asked by the server with the studio's own token (or ``STUDIO_LIVY_TOKEN`` for a ``--livy-url``
of another studio), but the studio's token never leaves the server: kernels and executions send a
token of the person they act for instead (``sends_own_token``).

Only admins register, change and remove computes. Each compute has ``allowed_users``: the users who
may see it, attach workspaces to it and run on it (empty: everyone); admins may use every compute.
Anyone else is told 403, and listings leave it out.

Applications (EMR Serverless's, ``studio.livy.applications``) are computes too. The built-in ``local``
is its session service's ``default`` application; every other application of that service is offered
as a compute of the same name at ``<local URL>/applications/<name>`` (its own Livy endpoint), asked
with the same credentials as ``local`` and usable by the same people (``allowed_users`` follows
``local``'s). They are managed like ``local``: ``sync_applications`` registers, moves and forgets
them from the service's ``GET /applications``, and nobody removes them through the API.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import httpx

from studio.auth.credentials import authorization
from studio.auth.gate import Principal
from studio.config import Settings
from studio.errors import ComputeUnreachableError, ConflictError, ForbiddenError, InvalidRequestError, NotFoundError
from studio.store import Store
from studio.workspaces.access import may_use_compute
from studio.workspaces.models import check_livy_url, check_name

log = logging.getLogger("studio.workspaces.computes")

LOCAL = "local"  # the compute `studio serve` registers itself: its embedded session service or --livy-url
DEFAULT_APPLICATION = "default"  # the session service's application that `local` (its root URL) is
# Seconds during which a listing of computes does not ask the session service for its applications
# again: the Studio page polls the compute list every few seconds, and one ask per poll is plenty.
APPLICATIONS_SYNC_SECONDS = 2.0


@dataclass
class Compute:
    id: int
    name: str
    url: str
    owner: str | None
    managed: bool  # registered by `studio serve` at every start; not removable through the API
    created_at: float
    auth: dict[str, str | None] | None = None  # {"user", "token"}; never leaves the server except to kernels
    allowed_users: list[str] = field(default_factory=list)  # who may use it besides admins; empty: everyone

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Compute":
        return cls(
            row["id"],
            row["name"],
            row["url"],
            row["owner"],
            bool(row["managed"]),
            row["created_at"],
            row.get("auth"),
            list(row.get("allowed_users") or []),
        )

    @property
    def application(self) -> str | None:
        """The session service's application this compute is (None for `local` and registered computes)."""
        return self.name if self.managed and self.name != LOCAL else None

    def to_json(self) -> dict[str, Any]:
        auth = self.auth or {}
        return {
            "id": self.id,
            "name": self.name,
            "url": self.url,
            "owner": self.owner,
            "managed": self.managed,
            "application": self.application,
            "created_at": self.created_at,
            "auth": ("basic" if auth.get("user") else "bearer") if auth.get("token") else None,
            "allowed_users": list(self.allowed_users),
        }


def split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """(URL without ``user:password@``, user, password): credentials never stay in a stored URL."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None, None
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment)), user, password


class ComputeManager:
    """Registers, lists and asks computes; raises only ``studio.errors``."""

    def __init__(
        self, settings: Settings, store: Store, local_credential: str | None = None, local_is_studio_token: bool = False
    ) -> None:
        self.settings = settings
        self.store = store
        self.local_credential = local_credential  # what the server sends the built-in `local` compute
        # `local_credential` is the studio's own token: kernels and runs send a token of their person instead.
        self.local_is_studio_token = local_is_studio_token
        self._http = httpx.AsyncClient(timeout=settings.compute_timeout, trust_env=False)
        self._applications_synced = 0.0  # monotonic time of the last successful sync_applications
        self._applications_lock = asyncio.Lock()
        self._shadowed: set[str] = set()  # application names a registered compute already has (warned once)

    async def close(self) -> None:
        await self._http.aclose()

    def list(self) -> list[Compute]:
        return [Compute.from_row(row) for row in self.store.all("computes")]

    def get(self, name: str) -> Compute:
        for compute in self.list():
            if compute.name == name:
                return compute
        raise NotFoundError(f"Compute '{name}' not found.")

    def find(self, name: str) -> Compute | None:
        try:
            return self.get(name)
        except NotFoundError:
            return None

    @staticmethod
    def allows(compute: Compute, user: str, is_admin: bool) -> bool:
        """Whether ``user`` may use the compute: an admin, or one in its ``allowed_users`` (empty: everyone)."""
        return may_use_compute(user, is_admin, compute.allowed_users)

    def visible(self, actor: Principal) -> builtins.list[Compute]:
        """The computes ``actor`` may use."""
        return [c for c in self.list() if self.allows(c, actor.name, actor.is_admin)]

    def get_for(self, actor: Principal, name: str) -> Compute:
        """The compute, if ``actor`` may use it; 403 otherwise."""
        compute = self.get(name)
        if not self.allows(compute, actor.name, actor.is_admin):
            raise ForbiddenError(f"{actor.name} may not use compute '{name}'; an admin can allow it.")
        return compute

    def set_allowed_users(self, name: str, users: builtins.list[str]) -> Compute:
        compute = self.get(name)
        if compute.application is not None:
            raise ConflictError(
                f"Compute '{name}' is an application of the session service of compute '{LOCAL}' and is usable by "
                f"whoever may use '{LOCAL}'; change the allowed users of '{LOCAL}'."
            )
        self.store.update("computes", compute.id, allowed_users=users)
        if name == LOCAL and compute.managed:  # its applications follow
            for other in self.list():
                if other.application is not None:
                    self.store.update("computes", other.id, allowed_users=users)
        log.info("compute %s: allowed to %s", name, ", ".join(users) or "everyone")
        return self.get(name)

    # -- the local session service's applications --------------------------------------------

    async def sync_applications(self, force: bool = False, missing: str | None = None) -> None:
        """Make the computes match the applications of the session service behind ``local``.

        Why here, and why when computes are looked at: the session service owns applications (they
        are created, changed and deleted there, by ``studio applications``, its API or its config
        file), so the Studio keeps no second truth about them; it mirrors the service's list into
        managed compute records, because workspaces and executions name computes and a record is what
        attaches, checks credentials and shows up in listings. Asking on every listing (at most every
        ``APPLICATIONS_SYNC_SECONDS``), when a name that is not known yet is asked for (``missing``: an
        application created a moment ago) and at start is enough, and costs nothing while nobody looks,
        unlike a polling loop. A service that does not answer (restarting) or has no applications (a
        plain Livy behind ``--livy-url``) changes nothing; only a successful listing forgets the computes
        of applications that are gone.
        """
        if missing is not None:
            if self.find(missing) is not None:
                return
            force = True
        if not force and time.monotonic() - self._applications_synced < APPLICATIONS_SYNC_SECONDS:
            return
        async with self._applications_lock:
            if not force and time.monotonic() - self._applications_synced < APPLICATIONS_SYNC_SECONDS:
                return  # another request synced while this one waited
            local = self.find(LOCAL)
            if local is None or not local.managed:
                return
            applications = await self._applications(local)
            if applications is None:
                return
            self._applications_synced = time.monotonic()
            self._mirror(local, applications)

    async def _applications(self, local: Compute) -> builtins.list[dict[str, Any]] | None:
        """The service's application summaries (every page), or None when it cannot say."""
        found: builtins.list[dict[str, Any]] = []
        token: str | None = None
        for _ in range(100):  # pages; a service that repeats its nextToken must not keep us here
            path = "/applications?maxResults=50" + (f"&nextToken={quote(token, safe='')}" if token else "")
            try:
                body = await self._get_json(local.url, path, f"Compute '{LOCAL}' at {local.url}", self.authorization(local))
            except ComputeUnreachableError as exc:
                log.debug("applications of %s not synced: %s", local.url, exc.msg)
                return None
            items = body.get("applications") if isinstance(body, dict) else None
            if not isinstance(items, list):
                return None
            found += [item for item in items if isinstance(item, dict)]
            token = body.get("nextToken") if isinstance(body.get("nextToken"), str) else None
            if not token:
                break
        # A summary does not say whether the application is for the Studio (interactiveConfiguration):
        # its full record does. One that cannot be read now is taken as its summary says.
        details = await asyncio.gather(*(self._application(local, item) for item in found))
        return [{**item, **detail} for item, detail in zip(found, details)]

    async def _application(self, local: Compute, summary: dict[str, Any]) -> dict[str, Any]:
        key = summary.get("applicationId") or summary.get("id") or summary.get("name")
        if not isinstance(key, str) or summary.get("name") == DEFAULT_APPLICATION:
            return {}
        try:
            body = await self._get_json(
                local.url, f"/applications/{quote(key, safe='')}", f"Compute '{LOCAL}' at {local.url}", self.authorization(local)
            )
        except ComputeUnreachableError:
            return {}
        detail = body.get("application") if isinstance(body, dict) else None
        return detail if isinstance(detail, dict) else {}

    def _mirror(self, local: Compute, applications: builtins.list[dict[str, Any]]) -> None:
        wanted: dict[str, str] = {}
        for item in applications:
            name = item.get("name")
            if not isinstance(name, str) or name == DEFAULT_APPLICATION or item.get("default") is True:
                continue  # the default application is `local` itself
            if item.get("state") == "TERMINATED":
                continue
            interactive = item.get("interactiveConfiguration")
            if isinstance(interactive, dict) and (
                interactive.get("studioEnabled") is False or interactive.get("livyEndpointEnabled") is False
            ):
                continue  # its operator keeps it out of the Studio (EMR's studioEnabled), or it has no Livy endpoint
            try:
                check_name(name, "Compute")
            except InvalidRequestError:
                continue  # an application name no compute may have: it stays reachable through its own URL only
            wanted[name] = f"{local.url.rstrip('/')}/applications/{quote(name, safe='')}"
        for compute in self.list():
            if compute.application is not None and compute.name not in wanted:
                self.store.delete("computes", compute.id)
                log.info("compute %s forgotten: the application is gone", compute.name)
        for name, url in wanted.items():
            existing = self.find(name)
            if existing is not None and not existing.managed:
                if name not in self._shadowed:  # a registered compute has the name: it keeps it
                    self._shadowed.add(name)
                    log.warning("application %s is not offered as a compute: a registered compute has its name", name)
                continue
            if existing is None:
                self._insert(name, url, local.owner or LOCAL, managed=True, allowed_users=local.allowed_users)
            elif existing.url != url or existing.allowed_users != local.allowed_users:
                self.store.update("computes", existing.id, url=url, allowed_users=list(local.allowed_users))

    async def register(
        self,
        name: str,
        url: str,
        owner: str,
        user: str | None = None,
        token: str | None = None,
        allowed_users: builtins.list[str] | None = None,
    ) -> Compute:
        """Register a Livy endpoint (with the credentials it wants) after checking that it answers like one."""
        check_name(name, "Compute")
        url, url_user, url_password = split_credentials(check_livy_url(url))
        user, token = user or url_user, token or url_password
        if self.find(name) is not None:
            raise ConflictError(f"A compute named '{name}' already exists.")
        auth = {"user": user, "token": token} if token else None
        await self.health(url, name, authorization(user, token))
        return self._insert(name, url, owner, managed=False, auth=auth, allowed_users=allowed_users)

    def register_managed(self, name: str, url: str, owner: str) -> Compute:
        """(Re-)register a compute `studio serve` provides itself; its URL may differ from the last run's."""
        url = check_livy_url(url)
        existing = self.find(name)
        if existing is None:
            return self._insert(name, url, owner, managed=True)
        self.store.update("computes", existing.id, url=url, managed=1)
        return self.get(name)

    def _insert(
        self,
        name: str,
        url: str,
        owner: str,
        managed: bool,
        auth: dict[str, str | None] | None = None,
        allowed_users: builtins.list[str] | None = None,
    ) -> Compute:
        compute_id = self.store.next_id("compute")
        self.store.insert(
            "computes",
            {
                "id": compute_id,
                "name": name,
                "url": url,
                "owner": owner,
                "managed": int(managed),
                "created_at": time.time(),
                "auth": auth,
                "allowed_users": list(allowed_users or []),
            },
        )
        log.info("registered compute %s at %s", name, url)
        return self.get(name)

    def remove(self, name: str, attached: builtins.list[str]) -> None:
        """Forget a compute; refused while workspaces are attached to it or when `studio serve` provides it."""
        compute = self.get(name)
        if compute.managed:
            raise ConflictError(f"Compute '{name}' is provided by studio serve itself and cannot be removed.")
        if attached:
            raise ConflictError(
                f"Compute '{name}' is attached to workspace(s) {', '.join(sorted(attached))}; detach them first."
            )
        self.store.delete("computes", compute.id)
        log.info("removed compute %s", name)

    def sends_own_token(self, compute: Compute) -> bool:
        """Whether whoever uses the compute (a kernel, a run) sends a token of the person it acts for:
        the built-in compute, which the server asks with the studio's own token, never handed out."""
        return compute.managed and self.local_is_studio_token

    def credentials(self, compute: Compute) -> tuple[str | None, str | None]:
        """(user, token) the server sends the compute: its own, or the studio's for the built-in one."""
        if compute.managed:
            return None, self.local_credential
        auth = compute.auth or {}
        return auth.get("user"), auth.get("token")

    def authorization(self, compute: Compute) -> str | None:
        return authorization(*self.credentials(compute))

    # -- asking a compute -------------------------------------------------------------------

    async def check(self, compute: Compute) -> dict[str, Any]:
        """The health of a registered compute (with its credentials)."""
        if compute.application is not None:
            return await self._application_health(compute)
        return await self.health(compute.url, compute.name, self.authorization(compute))

    async def _application_health(self, compute: Compute) -> dict[str, Any]:
        """An application's endpoint: its session listing (the endpoint and the credentials work), the
        service's version from its root (an application's endpoint serves the Livy API of sessions and
        batches) and, as its status, the application's state and capacity (``GET /applications/{name}``)."""
        label = f"Compute '{compute.name}' at {compute.url}"
        auth = self.authorization(compute)
        local = self.get(LOCAL)
        version, _, record = await asyncio.gather(
            self._get_json(local.url, "/version", label, auth),
            self._get_json(compute.url, "/sessions?size=1", label, auth),
            self._get_json(local.url, f"/applications/{quote(compute.name, safe='')}", label, auth),
        )
        application = record.get("application") if isinstance(record, dict) else None
        status = None
        if isinstance(application, dict):
            status = {key: application.get(key) for key in ("applicationId", "state", "stateDetails", "capacity")}
        return {"version": version.get("version") if isinstance(version, dict) else None, "status": status}

    async def health(self, url: str, name: str = "", auth: str | None = None) -> dict[str, Any]:
        """``/version`` (required), a session listing (so that wrong credentials show now, not at the first
        cell; Livy leaves /version open) and ``/studio/status`` (if it has one); ComputeUnreachableError otherwise."""
        label = f"Compute '{name}' at {url}" if name else f"Compute URL {url}"
        version = await self._get_json(url, "/version", label, auth)
        if not isinstance(version, dict) or "version" not in version:
            raise ComputeUnreachableError(f"{label} answered GET /version without a version; is it a Livy endpoint?")
        await self._get_json(url, "/sessions?size=1", label, auth)
        status: Any = None
        try:
            status = await self._get_json(url, "/studio/status", label, auth)
        except ComputeUnreachableError:
            status = None  # a plain Livy server: it has no such route
        return {"version": version.get("version"), "status": status if isinstance(status, dict) else None}

    async def sessions(self, compute: Compute) -> builtins.list[dict[str, Any]]:
        """The compute's Livy sessions, reduced to what the Studio shows."""
        label = f"Compute '{compute.name}' at {compute.url}"
        body = await self._get_json(compute.url, "/sessions?size=1000", label, self.authorization(compute))
        sessions = body.get("sessions") if isinstance(body, dict) else None
        if not isinstance(sessions, list):
            raise ComputeUnreachableError(f"{label} answered GET /sessions without a session list.")
        return [_session_summary(session) for session in sessions if isinstance(session, dict)]

    async def describe(self, compute: Compute, actor: Principal | None = None) -> dict[str, Any]:
        """The compute with its health and sessions; a compute that does not answer says why. For a
        user who is not an admin, only the user's own sessions."""
        data = compute.to_json()
        try:
            health, sessions = await asyncio.gather(self.check(compute), self.sessions(compute))
        except ComputeUnreachableError as exc:
            data.update(healthy=False, error=exc.msg, version=None, status=None, sessions=[])
            return data
        if actor is not None and not actor.is_admin:
            sessions = [s for s in sessions if actor.name in (s.get("owner"), s.get("proxyUser"))]
        data.update(healthy=True, error=None, version=health["version"], status=health["status"], sessions=sessions)
        return data

    async def describe_all(self, actor: Principal | None = None) -> builtins.list[dict[str, Any]]:
        """Every compute (``actor`` may use) with its health and sessions."""
        await self.sync_applications()
        found = self.list() if actor is None else self.visible(actor)
        return list(await asyncio.gather(*(self.describe(compute, actor) for compute in found)))

    async def ask_local(self, method: str, path: str) -> tuple[int, Any]:
        """(status, JSON body) of ``method path`` on the session service behind ``local``, sent with the
        server's own credential (for the Studio's applications page: listing, start, stop). The service's
        refusals come back as they are ({"msg"} with its status); ComputeUnreachableError when it does
        not answer."""
        local = self.get(LOCAL)
        auth = self.authorization(local)
        label = f"Compute '{LOCAL}' at {local.url}"
        try:
            response = await self._http.request(
                method, local.url.rstrip("/") + path, headers={"Authorization": auth} if auth else None,
                json={} if method == "POST" else None,
            )
        except httpx.TimeoutException:
            raise ComputeUnreachableError(f"{label} did not answer {method} {path} within {self.settings.compute_timeout:g}s.") from None
        except httpx.HTTPError as exc:
            raise ComputeUnreachableError(f"{label} did not answer: {str(exc) or type(exc).__name__}.") from None
        try:
            body = response.json() if response.content else None
        except ValueError:
            body = {"msg": response.text.strip()[:500] or response.reason_phrase}
        return response.status_code, body

    async def _get_json(self, url: str, path: str, label: str, auth: str | None = None) -> Any:
        try:
            response = await self._http.get(url + path, headers={"Authorization": auth} if auth else None)
        except httpx.TimeoutException:
            raise ComputeUnreachableError(
                f"{label} did not answer GET {path} within {self.settings.compute_timeout:g}s."
            ) from None
        except httpx.HTTPError as exc:
            raise ComputeUnreachableError(f"{label} did not answer: {str(exc) or type(exc).__name__}.") from None
        if response.status_code in (401, 403):
            raise ComputeUnreachableError(
                f"{label} refused the credentials (HTTP {response.status_code} to GET {path}); register it with the "
                "token or user name and password it expects."
            )
        if response.status_code != 200:
            raise ComputeUnreachableError(f"{label} answered HTTP {response.status_code} to GET {path}.")
        try:
            return response.json()
        except ValueError:
            raise ComputeUnreachableError(f"{label} answered GET {path} with something that is not JSON.") from None


def _session_summary(session: dict[str, Any]) -> dict[str, Any]:
    app_info = session.get("appInfo")
    if not isinstance(app_info, dict):
        app_info = {}
    return {
        "id": session.get("id"),
        "name": session.get("name"),
        "kind": session.get("kind"),
        "state": session.get("state"),
        "owner": session.get("owner"),
        "proxyUser": session.get("proxyUser"),
        "appId": session.get("appId"),
        "sparkUiUrl": app_info.get("sparkUiUrl"),
        "driverLogUrl": app_info.get("driverLogUrl"),
    }
