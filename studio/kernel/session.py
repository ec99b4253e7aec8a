"""The notebook's remote Spark session: where it lives, starting it lazily, keeping it alive,
restarting it with new settings, and deleting it when the kernel shuts down."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Callable

from studio.kernel.livy_client import LivyClient, LivyError

DEFAULT_URL = "http://127.0.0.1:8998"
COMPUTE_FILE = Path(".studio") / "compute.json"
# The service stops a session whose kernel stopped sending heartbeats (a killed kernel).
HEARTBEAT_TIMEOUT = 120
HEARTBEAT_INTERVAL = 30.0


def _compute_file(folder: Path) -> tuple[str, str] | None:
    candidate = folder / COMPUTE_FILE
    if candidate.is_file():
        try:
            compute = json.loads(candidate.read_text())
            return str(compute["livy_url"]), f"workspace compute '{compute.get('name', '?')}' ({candidate})"
        except (ValueError, KeyError, OSError):
            return None
    return None


def resolve_livy_url() -> tuple[str, str]:
    """(URL, where it came from), first found of:

    1. the compute attached to the workspace the kernel runs in: the workspace server writes
       ``<workspace>/.studio/compute.json`` and starts JupyterLab with STUDIO_WORKSPACE_DIR;
    2. STUDIO_LIVY_URL (``studio run --livy-url`` sets it);
    3. a ``.studio/compute.json`` above the kernel's working directory (the notebook's folder);
    4. http://127.0.0.1:8998.

    It is resolved again for every new session, so an attach takes effect without a kernel restart.
    """
    if os.environ.get("STUDIO_WORKSPACE_DIR"):
        found = _compute_file(Path(os.environ["STUDIO_WORKSPACE_DIR"]))
        if found:
            return found
    if os.environ.get("STUDIO_LIVY_URL"):
        return os.environ["STUDIO_LIVY_URL"], "STUDIO_LIVY_URL"
    for folder in (Path.cwd(), *Path.cwd().parents):
        found = _compute_file(folder)
        if found:
            return found
    return DEFAULT_URL, "default"


class RemoteSession:
    def __init__(self, startup_timeout: float) -> None:
        self.startup_timeout = startup_timeout
        self.config: dict[str, Any] = {}  # the %%configure body
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
            url, source = resolve_livy_url()
            if self.client is None or (not self.started and url != self.url):
                if self.client is not None:
                    self.client.close()
                self.client = LivyClient(url)
                self.url, self.url_source = url, source
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
            except Exception:  # noqa: BLE001 - reported by the first remote cell instead
                pass

        threading.Thread(target=prepare, name="studio-prepare", daemon=True).start()

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"kind": "pyspark", "heartbeatTimeoutInSecond": HEARTBEAT_TIMEOUT}
        if os.environ.get("STUDIO_SESSION_NAME"):
            # Set by `studio run`, which deletes the session by this name when the run ends,
            # whatever happened to the kernel.
            body["name"] = os.environ["STUDIO_SESSION_NAME"]
        return {**body, **self.config}

    def start(self, on_wait: Callable[[dict[str, Any], float], None] | None = None) -> dict[str, Any]:
        """Create the session and wait until it is idle; on failure nothing is kept, so a later cell retries."""
        client = self.connect()
        created = client.create_session(self.body())
        try:
            self.info = client.wait_for_session(created["id"], self.startup_timeout, on_wait) if created["state"] != "idle" else created
        except LivyError as exc:
            log_tail = ""
            try:
                log_tail = "\n".join(client.log(created["id"], size=30))
                client.delete_session(created["id"])
            except LivyError:
                pass
            raise LivyError(f"The Spark session did not start: {exc}\n{log_tail}".rstrip()) from None
        except KeyboardInterrupt:
            client.delete_session(created["id"])
            raise
        self._start_heartbeat()
        return self.info

    def refresh(self) -> dict[str, Any] | None:
        if self.client is None or self.id is None:
            return None
        self.info = self.client.get_session(self.id)
        return self.info

    def delete(self) -> None:
        self._stop_heartbeat.set()
        if self.client is not None and self.id is not None:
            try:
                self.client.delete_session(self.id)
            except LivyError:
                pass
        self.info = None

    def forget(self) -> None:
        """The session is gone on the server (dead, deleted elsewhere): start a new one next time."""
        self._stop_heartbeat.set()
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
                    client.request("GET", f"/sessions/{session_id}/state", ok=(200, 404))  # type: ignore[union-attr]
                except LivyError:
                    pass

        self._heartbeat = threading.Thread(target=beat, name="studio-heartbeat", daemon=True)
        self._heartbeat.start()
