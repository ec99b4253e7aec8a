"""The notebook's remote Spark session: where it lives, starting it lazily, keeping it alive,
restarting it with new settings, and deleting it when the kernel shuts down.

A session outlives a restart of its service, so while it lives every harmless call is tried again
for ``reconnect_timeout`` seconds when the service does not answer (``LivyClient``), and in a
workspace the compute's address is asked again meanwhile (the Studio may have restarted it on
another port): the notebook carries on with the same session without anyone doing anything."""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import httpx

from studio.auth.credentials import authorization, credentials_for
from studio.livy_client import LivyClient, LivyError

DEFAULT_URL = "http://127.0.0.1:8998"
# The service stops a session whose kernel stopped sending heartbeats (a killed kernel).
HEARTBEAT_TIMEOUT = 120
HEARTBEAT_INTERVAL = 30.0
# How long a cell waits for a service that does not answer (restarting) before it fails.
RECONNECT_TIMEOUT = 180.0


@dataclass(frozen=True)
class Endpoint:
    """Where the kernel's cells go, where that came from, and the Authorization header to send."""

    url: str
    source: str
    authorization: str | None


def _workspace_endpoint(server: str, workspace_id: str, kernel_token: str) -> Endpoint:
    """Ask the workspace server which compute this workspace is attached to (and its credentials)."""
    url = f"{server.rstrip('/')}/api/workspaces/{workspace_id}/connection"
    try:
        response = httpx.get(url, headers={"Authorization": f"Bearer {kernel_token}"}, timeout=10, trust_env=False)
    except httpx.HTTPError as exc:
        raise LivyError(
            f"Cannot reach the Studio at {server} to find this workspace's compute ({exc}); if the Studio was restarted "
            "on another port, restart the workspace."
        ) from None
    try:
        body = response.json()
    except ValueError:
        body = {}
    if response.status_code != 200:
        raise LivyError(str(body.get("msg") or f"The Studio answered {response.status_code}"), status=response.status_code)
    return Endpoint(
        str(body["livy_url"]),
        f"workspace compute '{body.get('compute', '?')}'",
        authorization(body.get("user"), body.get("token")),
    )


def _current_server(started_with: str) -> str:
    """Where the Studio listens now: it writes that into its state directory (STUDIO_SERVER_FILE) at every
    start, and a kernel may outlive a restart of the Studio on another port."""
    path = os.environ.get("STUDIO_SERVER_FILE")
    if path:
        try:
            return str(json.loads(open(path).read())["url"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return started_with


def resolve_endpoint() -> Endpoint:
    """The first found of:

    1. in a workspace of the Studio (JupyterLab started by ``studio serve`` sets STUDIO_SERVER_URL,
       STUDIO_WORKSPACE_ID and STUDIO_KERNEL_TOKEN): the compute the workspace is attached to, as the
       Studio says, with the compute's credentials. Nothing in the workspace's folder counts, so a
       cloned repository cannot send cells elsewhere;
    2. STUDIO_LIVY_URL (``studio run --livy-url`` sets it);
    3. http://127.0.0.1:8998.

    Outside a workspace the credentials come from ``studio.auth.credentials`` (STUDIO_LIVY_TOKEN, or
    the local studio's token for a service on this machine). It is resolved again for every new
    session, so an attach takes effect without a kernel restart.
    """
    server, workspace_id, kernel_token = (
        os.environ.get(name, "") for name in ("STUDIO_SERVER_URL", "STUDIO_WORKSPACE_ID", "STUDIO_KERNEL_TOKEN")
    )
    server = _current_server(server)
    if server and workspace_id and kernel_token:
        return _workspace_endpoint(server, workspace_id, kernel_token)
    url, source = (os.environ["STUDIO_LIVY_URL"], "STUDIO_LIVY_URL") if os.environ.get("STUDIO_LIVY_URL") else (DEFAULT_URL, "default")
    return Endpoint(url, source, authorization(*credentials_for(url)))


class RemoteSession:
    def __init__(
        self,
        startup_timeout: float,
        reconnect_timeout: float = RECONNECT_TIMEOUT,
        on_reconnect: Callable[[str], None] | None = None,
    ) -> None:
        self.startup_timeout = startup_timeout
        self.reconnect_timeout = reconnect_timeout
        self.on_reconnect = on_reconnect  # told when the service stops and starts answering
        self.idle_timeout: float | None = None  # seconds without a statement before the service stops it
        self.last_activity = 0.0  # monotonic time of this kernel's last statement, cancel or start
        self.config: dict[str, Any] = {}  # the %%configure body
        self.good_config: dict[str, Any] = {}  # the settings of the last session that started
        self.lost: dict[str, Any] | None = None  # the last session that ended under this kernel, and why
        self.client: LivyClient | None = None
        self.url = ""
        self.url_source = ""
        self.info: dict[str, Any] | None = None  # the Livy session, once started
        self._stop_heartbeat = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._connect_lock = threading.Lock()

    @property
    def id(self) -> int | None:
        return None if self.info is None else int(self.info["id"])

    @property
    def started(self) -> bool:
        return self.info is not None

    def connect(self) -> LivyClient:
        """The client for the current endpoint (resolved again while no session runs)."""
        with self._connect_lock:
            if self.client is not None and self.started:
                return self.client
            endpoint = resolve_endpoint()
            if self.client is None or endpoint.url != self.url or endpoint.authorization != self.client.authorization:
                if self.client is not None:
                    self.client.close()
                self.client = LivyClient(endpoint.url, authorization=endpoint.authorization)
                self.client.on_reconnect = self.on_reconnect
            self.url, self.url_source = endpoint.url, endpoint.source
            return self.client

    def prepare_in_background(self) -> None:
        """Build the HTTP client and ask the service what it is, without starting a session.

        Done in a thread while the kernel starts and waits for its first cell: building the client
        imports httpx's transport stack (~0.1-0.2 s here), which would otherwise be paid by the
        first Spark cell. Failures are ignored: the first remote cell connects and reports them.
        """

        def prepare() -> None:
            try:
                self.connect().is_studio
            except Exception:  # noqa: BLE001, S110 - reported by the first remote cell instead
                pass

        threading.Thread(target=prepare, name="studio-prepare", daemon=True).start()

    def body(self, config: dict[str, Any] | None = None) -> dict[str, Any]:
        """POST /sessions body for ``config`` (default: the current %%configure settings)."""
        body: dict[str, Any] = {"kind": "pyspark", "heartbeatTimeoutInSecond": HEARTBEAT_TIMEOUT}
        if os.environ.get("STUDIO_SESSION_NAME"):
            # Set by `studio run`, which deletes the session by this name when the run ends,
            # whatever happened to the kernel.
            body["name"] = os.environ["STUDIO_SESSION_NAME"]
        return {**body, **(self.config if config is None else config)}

    def check(self, config: dict[str, Any]) -> bool:
        """Ask the service whether a session with ``config`` would be accepted, without starting one.

        LivyError (status 400, the service's reason) when it would be refused; False when the service
        cannot check (a plain Livy): the start itself will tell. The name of the session that the new
        one replaces is left out: it is free by the time the new one starts."""
        body = self.body(config)
        if self.info is not None and body.get("name") == self.info.get("name"):
            body.pop("name", None)
        return self.connect().check_session(body)

    def start(self, on_wait: Callable[[dict[str, Any], float], None] | None = None) -> dict[str, Any]:
        """Create the session and wait until it is idle; on failure nothing is kept, so a later cell retries."""
        client = self.connect()
        created = client.create_session(self.body())
        try:
            self.info = client.wait_for_session(created["id"], self.startup_timeout, on_wait) if created["state"] != "idle" else created
        except LivyError as exc:
            why = ""
            try:
                why = _start_failure(client.log(created["id"], size=200))
                client.delete_session(created["id"])
            except LivyError:
                pass
            raise LivyError(f"The Spark session did not start: {exc}\n{why}".rstrip()) from None
        except KeyboardInterrupt:
            client.delete_session(created["id"])
            raise
        self.good_config, self.lost = dict(self.config), None
        self._carry_on(client)
        self._start_heartbeat()
        return self.info

    def _carry_on(self, client: LivyClient) -> None:
        """The session lives: from now on the client rides out a restart of its service, and the
        service says after how long without a statement it stops the session."""
        client.reconnect_timeout = self.reconnect_timeout
        if self.url_source.startswith("workspace"):
            client.relocate = self._relocate
        described = client.describe_session(int(self.info["id"])) if self.info else None
        self.idle_timeout = float(described["idleTimeout"]) if described and described.get("idleTimeout") else None
        self.last_activity = time.monotonic()

    def _relocate(self) -> tuple[str, str | None] | None:
        """Where the workspace's compute is now (the Studio may have restarted it elsewhere)."""
        try:
            endpoint = resolve_endpoint()
        except LivyError:
            return None
        self.url = endpoint.url
        return endpoint.url, endpoint.authorization

    def idle_seconds(self) -> float | None:
        """How long the session has been without a statement of this kernel (None: no session)."""
        return time.monotonic() - self.last_activity if self.started and self.last_activity else None

    def end_reason(self, session_id: int) -> str | None:
        """Why the service ended a session (its ``reason``), if it says."""
        if self.client is None:
            return None
        described = self.client.describe_session(session_id)
        return str(described["reason"]) if described and described.get("reason") else None

    def refresh(self) -> dict[str, Any] | None:
        if self.client is None or self.id is None:
            return None
        self.info = self.client.get_session(self.id)
        return self.info

    def delete(self) -> None:
        self._stop_heartbeat.set()
        if self.client is not None:
            self.client.reconnect_timeout = 0.0  # a kernel that shuts down does not wait for a service
        if self.client is not None and self.id is not None:
            try:
                self.client.delete_session(self.id)
            except LivyError:
                pass
        self.info = None

    def forget(self, reason: str = "") -> None:
        """The session is gone on the server (dead, deleted elsewhere): start a new one next time.
        It is remembered (``lost``) so %%info and %%logs can still name it."""
        self._stop_heartbeat.set()
        if self.client is not None:
            self.client.reconnect_timeout = 0.0
        if self.info is not None:
            self.lost = {"id": self.id, "name": self.info.get("name"), "reason": reason}
        self.info = None

    def close(self) -> None:
        self.delete()
        if self.client is not None:
            self.client.close()
            self.client = None

    def _start_heartbeat(self) -> None:
        self._stop_heartbeat = stop = threading.Event()
        client, session_id = self.client, self.id

        def beat() -> None:
            while not stop.wait(HEARTBEAT_INTERVAL):
                try:
                    client.request("GET", f"/sessions/{session_id}/state", ok=(200, 404), retry=False)  # type: ignore[union-attr]
                except Exception:  # noqa: BLE001, S110 - a failed beat (the client moving meanwhile) must not end the beating
                    pass

        self._heartbeat = threading.Thread(target=beat, name="studio-heartbeat", daemon=True)
        self._heartbeat.start()


def _start_failure(lines: list[str]) -> str:
    """Why a session did not start, from its log: the service's "failed to start" line with the
    exception under it (without its stack frames), else the log's last lines."""
    start = max((i for i, line in enumerate(lines) if "failed to start:" in line), default=None)
    picked = lines[start:] if start is not None else lines[-10:]
    kept = [line for line in picked if line.strip() and not line.lstrip().startswith(("at ", "... "))]
    return "\n".join(kept[:8] if start is not None else kept)
