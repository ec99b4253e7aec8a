"""Computes: named Livy endpoints that workspaces attach to.

A compute is a row (name, URL, owner) plus what its endpoint says when asked: ``GET /version``
(any Livy answers it), ``GET /studio/status`` (only the studio's own session service; a plain
Livy has none, which is fine) and ``GET /sessions``. Nothing is cached: a compute is asked when
it is listed, so the Studio page shows its state as of that moment.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx

from studio.config import Settings
from studio.errors import ComputeUnreachableError, ConflictError, NotFoundError
from studio.store import Store
from studio.workspaces.models import check_livy_url, check_name

log = logging.getLogger("studio.workspaces.computes")

LOCAL = "local"  # the compute `studio serve` registers itself: its embedded session service or --livy-url


@dataclass
class Compute:
    id: int
    name: str
    url: str
    owner: str | None
    managed: bool  # registered by `studio serve` at every start; not removable through the API
    created_at: float

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Compute":
        return cls(row["id"], row["name"], row["url"], row["owner"], bool(row["managed"]), row["created_at"])

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "url": self.url,
            "owner": self.owner,
            "managed": self.managed,
            "created_at": self.created_at,
        }


class ComputeManager:
    """Registers, lists and asks computes; raises only ``studio.errors``."""

    def __init__(self, settings: Settings, store: Store, owner: str | None = None) -> None:
        self.settings = settings
        self.store = store
        self.owner = owner or getpass.getuser()
        self._http = httpx.AsyncClient(timeout=settings.compute_timeout, trust_env=False)

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

    async def register(self, name: str, url: str) -> Compute:
        """Register a Livy endpoint after checking that it answers like one."""
        check_name(name, "Compute")
        url = check_livy_url(url)
        if self.find(name) is not None:
            raise ConflictError(f"A compute named '{name}' already exists.")
        await self.health(url, name)
        return self._insert(name, url, managed=False)

    def register_managed(self, name: str, url: str) -> Compute:
        """(Re-)register a compute `studio serve` provides itself; its URL may differ from the last run's."""
        url = check_livy_url(url)
        existing = self.find(name)
        if existing is None:
            return self._insert(name, url, managed=True)
        self.store.update("computes", existing.id, url=url, managed=1)
        return self.get(name)

    def _insert(self, name: str, url: str, managed: bool) -> Compute:
        compute_id = self.store.next_id("compute")
        self.store.insert(
            "computes",
            {"id": compute_id, "name": name, "url": url, "owner": self.owner, "managed": int(managed), "created_at": time.time()},
        )
        log.info("registered compute %s at %s", name, url)
        return self.get(name)

    def remove(self, name: str, attached: list[str]) -> None:
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

    # -- asking a compute -------------------------------------------------------------------

    async def health(self, url: str, name: str = "") -> dict[str, Any]:
        """``/version`` (required) and ``/studio/status`` (if it has one); ComputeUnreachableError otherwise."""
        label = f"Compute '{name}' at {url}" if name else f"Compute URL {url}"
        version = await self._get_json(url, "/version", label)
        if not isinstance(version, dict) or "version" not in version:
            raise ComputeUnreachableError(f"{label} answered GET /version without a version; is it a Livy endpoint?")
        status: Any = None
        try:
            status = await self._get_json(url, "/studio/status", label)
        except ComputeUnreachableError:
            status = None  # a plain Livy server: it has no such route
        return {"version": version.get("version"), "status": status if isinstance(status, dict) else None}

    async def sessions(self, url: str, name: str = "") -> list[dict[str, Any]]:
        """The compute's Livy sessions, reduced to what the Studio shows."""
        label = f"Compute '{name}' at {url}" if name else f"Compute URL {url}"
        body = await self._get_json(url, "/sessions?size=1000", label)
        sessions = body.get("sessions") if isinstance(body, dict) else None
        if not isinstance(sessions, list):
            raise ComputeUnreachableError(f"{label} answered GET /sessions without a session list.")
        return [_session_summary(session) for session in sessions if isinstance(session, dict)]

    async def describe(self, compute: Compute) -> dict[str, Any]:
        """The compute with its health and sessions; a compute that does not answer says why."""
        data = compute.to_json()
        try:
            health, sessions = await asyncio.gather(
                self.health(compute.url, compute.name), self.sessions(compute.url, compute.name)
            )
        except ComputeUnreachableError as exc:
            data.update(healthy=False, error=exc.msg, version=None, status=None, sessions=[])
            return data
        data.update(healthy=True, error=None, version=health["version"], status=health["status"], sessions=sessions)
        return data

    async def describe_all(self) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(self.describe(compute) for compute in self.list())))

    async def _get_json(self, url: str, path: str, label: str) -> Any:
        try:
            response = await self._http.get(url + path)
        except httpx.TimeoutException:
            raise ComputeUnreachableError(
                f"{label} did not answer GET {path} within {self.settings.compute_timeout:g}s."
            ) from None
        except httpx.HTTPError as exc:
            raise ComputeUnreachableError(f"{label} did not answer: {str(exc) or type(exc).__name__}.") from None
        if response.status_code != 200:
            raise ComputeUnreachableError(f"{label} answered HTTP {response.status_code} to GET {path}.")
        try:
            return response.json()
        except ValueError:
            raise ComputeUnreachableError(f"{label} answered GET {path} with something that is not JSON.") from None


def _session_summary(session: dict[str, Any]) -> dict[str, Any]:
    app_info = session.get("appInfo") if isinstance(session.get("appInfo"), dict) else {}
    return {
        "id": session.get("id"),
        "name": session.get("name"),
        "kind": session.get("kind"),
        "state": session.get("state"),
        "owner": session.get("owner"),
        "appId": session.get("appId"),
        "sparkUiUrl": app_info.get("sparkUiUrl"),
        "driverLogUrl": app_info.get("driverLogUrl"),
    }
