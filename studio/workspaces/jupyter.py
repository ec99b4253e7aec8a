"""The workspace server's handle on one workspace's JupyterLab server.

``JupyterLabProcess`` follows the same contract as the session service's ``WorkerProcess``
(jupyter_client's provisioner, jupyterhub's Spawner): ``start`` spawns ``jupyter lab`` in a
process group of its own, bound to 127.0.0.1 on a free port, with a random token and the
workspace's folder as its root; ``wait_ready`` polls its ``/api/status`` with that token;
``poll`` says whether it still runs; ``stop(now=False)`` asks it to shut down (which shuts down
its kernels), then sends SIGTERM and SIGKILL. The process itself is a ``studio.process.ChildProcess``
with ``descendants=True``: Jupyter starts every kernel in a session of its own, so a signal to
JupyterLab's group does not reach them, and ``stop`` signals every process that descends from
JupyterLab too, so no kernel survives its workspace.

The process outlives the workspace server on purpose: after a restart, crash or SIGKILL of
``studio serve`` the next one finds it again by pid, create time and token (``adopt``), the way
jupyterhub's ``Spawner.poll`` relies on a stored pid. So that none runs forever when no server
comes back, each JupyterLab applies its workspace's idle timeout itself (``idle_limits``, with
jupyter_server's own settings): it culls kernels that stay idle that long and then shuts itself
down; the margin over the idle timeout lets a running server's culler always act first.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import math
import os
import re
import secrets
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from studio.auth.credentials import without_secrets
from studio.config import Settings
from studio.errors import JupyterLabError
from studio.process import ChildProcess, ShutdownStep, describe_exit, python_command

log = logging.getLogger("studio.workspaces.jupyter")

_POLL_SECONDS = 0.2


# Defaults for every workspace's JupyterLab (a user's own settings still win): never fetch the
# Jupyter news feed or check for updates, and so never ask about it in a toast either.
LAB_DEFAULTS = {
    "@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False},
}


def write_lab_defaults(config_dir: Path) -> Path:
    """``<config_dir>/labconfig/default_setting_overrides.json``; put ``config_dir`` on JUPYTER_CONFIG_PATH."""
    path = config_dir / "labconfig" / "default_setting_overrides.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(LAB_DEFAULTS, indent=2) + "\n")
    return path


def idle_limits(idle_timeout: float, cull_interval: float) -> list[str]:
    """JupyterLab's own idle settings for a workspace whose idle timeout is ``idle_timeout`` seconds
    (0: never stopped for idleness, so none).

    They matter when no ``studio serve`` watches the JupyterLab (one stopped without
    ``--stop-sessions-on-exit``, or crashed, and not started again): the JupyterLab culls each kernel
    that has been idle (not busy) that long and that no browser is connected to
    (``MappingKernelManager.cull_idle_timeout``; ``cull_connected`` and ``cull_busy`` stay off, as
    in Jupyter, so an open notebook's kernel is never taken from someone editing it), and once it has
    no kernel and no activity for that long it shuts itself down
    (``ServerApp.shutdown_no_activity_timeout``, checked by jupyter_server once a minute). The
    limit is the idle timeout plus two of the Studio's cull intervals: a server that watches
    stops the workspace after the idle timeout, within one interval, before the JupyterLab's own
    limit is reached, so the reason it records is its own."""
    if idle_timeout <= 0:
        return []
    limit = math.ceil(idle_timeout + 2 * cull_interval)
    interval = max(1, min(300, math.ceil(cull_interval)))  # jupyter_server's default is 300
    return [
        f"--ServerApp.shutdown_no_activity_timeout={limit}",
        f"--MappingKernelManager.cull_idle_timeout={limit}",
        f"--MappingKernelManager.cull_interval={interval}",
        "--MappingKernelManager.cull_connected=False",
        "--MappingKernelManager.cull_busy=False",
    ]


# jupyter_server's line when shutdown_no_activity_timeout ends it, and ours before each start.
_SELF_SHUTDOWN = re.compile(r"No kernels for (\d+) seconds; shutting down\.")
_START_MARK = "starting JupyterLab on port"


def self_shutdown(log_path: Path) -> int | None:
    """Seconds without activity after which the JupyterLab last started with this log shut itself
    down (its idle limit, ``idle_limits``), or None if its log does not say so."""
    try:
        with open(log_path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 256 * 1024))
            text = handle.read().decode(errors="replace")
    except OSError:
        return None
    since_start = text.rsplit(_START_MARK, 1)[-1]
    found = _SELF_SHUTDOWN.findall(since_start)
    return int(found[-1]) if found else None


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (JupyterLab binds it a moment later, port_retries=0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class JupyterLabProcess:
    """One ``jupyter lab`` child serving one workspace folder."""

    def __init__(
        self,
        settings: Settings,
        folder: Path,
        log_path: Path,
        layout_dir: Path,
        env: dict[str, str],
        idle_timeout: float = 0.0,
    ) -> None:
        self.settings = settings
        self.folder = folder
        self.log_path = log_path
        self.layout_dir = layout_dir  # JupyterLab's saved layout (open tabs) for this workspace only
        self.env = env
        self.idle_timeout = idle_timeout  # the workspace's, at start: JupyterLab applies it itself (idle_limits)
        self.port = 0
        self.token = ""
        self.started_at = 0.0  # wall-clock time of the spawn
        self.ready_at = 0.0  # when this server first answered it (or found it again)
        self.shutdown_step: ShutdownStep | None = None
        self._process: ChildProcess | None = None
        self._stopping = False
        self._http = httpx.AsyncClient(timeout=5.0, trust_env=False)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    # -- addresses --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def lab_url(self) -> str:
        """JupyterLab's address with its token; the token becomes a cookie on first visit."""
        return f"{self.url}/lab?token={self.token}"

    def state(self) -> dict[str, Any]:
        """What the store keeps so that a restarted server can find this process again."""
        record = self._process.record if self._process is not None else None
        return {
            **(record.to_json() if record is not None else {"pid": None}),
            "port": self.port,
            "token": self.token,
            "started_at": self.started_at,
            "log_path": str(self.log_path),
        }

    @classmethod
    async def adopt(
        cls, settings: Settings, folder: Path, layout_dir: Path, env: dict[str, str], state: dict[str, Any]
    ) -> "JupyterLabProcess | None":
        """The JupyterLab a previous server started, if it still runs (the same process: pid and
        create time) and answers with its token."""
        lab = cls(settings, folder, Path(state.get("log_path") or ""), layout_dir, env)
        lab.port = int(state.get("port") or 0)
        lab.token = str(state.get("token") or "")
        lab.started_at = float(state.get("started_at") or 0.0)
        lab._process = ChildProcess.adopt(
            _with_create_time(state),
            name=f"JupyterLab of {folder.name}",
            stop_timeout=settings.jupyterlab_stop_timeout,
            descendants=True,
        )
        if lab._process is None or not lab.port:
            await lab.close()
            return None
        try:
            status = await lab.status()
        except JupyterLabError:
            await lab.close()
            return None
        # Its idle time goes on from where it was: JupyterLab kept counting while no server watched
        # (and applies its idle limit itself), so a restart neither resets nor shortens it.
        lab.ready_at = parse_time(status.get("started")) or time.time()
        return lab

    # -- lifecycle --------------------------------------------------------------------------

    def command(self) -> list[str]:
        base = list(self.settings.jupyterlab_command) or python_command("jupyterlab")
        return [
            *base,
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            f"--ServerApp.root_dir={self.folder}",
            f"--LabApp.workspaces_dir={self.layout_dir}",
            # Nothing may be fetched from the internet at run time: no news feed, no update check.
            "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            # Without a studio serve that watches it, it stops itself after the workspace's idle timeout.
            *idle_limits(self.idle_timeout, self.settings.workspace_cull_interval),
            # Jupyter refuses to run as root without it; containers often run as root.
            *(["--allow-root"] if os.geteuid() == 0 else []),
        ]

    async def start(self) -> None:
        """Spawn JupyterLab; ``wait_ready`` tells when it answers."""
        if self._stopping:
            raise JupyterLabError(f"JupyterLab for {self.folder.name} was stopped while it started.")
        self.port = free_port()
        self.token = secrets.token_urlsafe(32)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.layout_dir.mkdir(parents=True, exist_ok=True)
        # The token travels in the environment, not on the command line, where `ps` shows it to everyone.
        # The studio's own secrets stay out: JupyterLab and its kernels run the user's code.
        env = {**without_secrets(dict(os.environ)), **self.env, "JUPYTER_TOKEN": self.token}
        env.pop("JUPYTER_TOKEN_FILE", None)
        with open(self.log_path, "ab") as log_handle:
            log_handle.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {_START_MARK} {self.port}\n".encode())
        self._process = ChildProcess(
            self.command(),
            name=f"JupyterLab of {self.folder.name}",
            cwd=self.folder,
            env=env,
            output=self.log_path,
            stop_timeout=self.settings.jupyterlab_stop_timeout,
            descendants=True,  # its kernels, which run in sessions of their own
        )
        try:
            self._process.start()
        except OSError as exc:
            raise JupyterLabError(f"JupyterLab could not be started: {exc}") from None
        self.started_at = time.time()

    async def wait_ready(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait until JupyterLab answers ``/api/status``; JupyterLabError if it exits, is stopped or times out."""
        timeout = self.settings.jupyterlab_start_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            if self._stopping:
                raise JupyterLabError(f"JupyterLab for {self.folder.name} was stopped while it started.")
            code = self.poll()
            if code is not None:
                raise JupyterLabError(
                    f"JupyterLab {describe_exit(code)} before it answered: {self.log_tail()}",
                    log_message=f"log: {self.log_path}",
                )
            try:
                status = await self.status()
                self.ready_at = time.time()
                return status
            except JupyterLabError:
                pass
            if time.monotonic() > deadline:
                await self.kill()
                raise JupyterLabError(
                    f"JupyterLab did not answer within {timeout:.0f}s; raise STUDIO_JUPYTERLAB_START_TIMEOUT "
                    f"or read its log ({self.log_path})."
                )
            await asyncio.sleep(_POLL_SECONDS)

    def poll(self) -> int | None:
        """None while JupyterLab runs, else its exit code (0 when it was not our child and is gone)."""
        return self._process.poll() if self._process is not None else 0

    async def wait_exit(self) -> int:
        """Wait until JupyterLab exits; its exit code (0 if unknown)."""
        return await self._process.wait() if self._process is not None else 0

    async def stop(self, now: bool = False) -> ShutdownStep:
        """Stop JupyterLab and every kernel it started; returns the step that worked.

        The polite step is JupyterLab's own ``/api/shutdown``, which shuts its kernels down cleanly
        (a PySpark kernel ends its Livy session); one that never answered cannot be asked."""
        self._stopping = True
        try:
            if self._process is None:
                step = ShutdownStep.ALREADY_GONE
            else:
                polite = self._ask_shutdown if self.ready_at else None
                step = await self._process.stop(now, polite=polite)
        finally:
            await self.close()
        self.shutdown_step = step
        return step

    async def _ask_shutdown(self) -> None:
        await self._http.post(f"{self.url}/api/shutdown", headers=self._auth())

    async def kill(self) -> None:
        await self.stop(now=True)

    async def close(self) -> None:
        await self._http.aclose()

    # -- talking to it ----------------------------------------------------------------------

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"}

    async def status(self) -> dict[str, Any]:
        """JupyterLab's ``/api/status`` (started, last_activity, kernels, connections)."""
        return await self._get("/api/status")

    async def kernels(self) -> list[dict[str, Any]]:
        """Its kernels with ``execution_state``; asking does not count as activity."""
        return await self._get("/api/kernels?no_track_activity=1")

    async def last_activity(self) -> tuple[float, bool]:
        """(epoch seconds of the last activity, whether a kernel is busy right now).

        JupyterLab counts API requests and kernel messages; its startup, before it answered, and
        the time a restarted server had no eye on it do not count as idleness, hence ``ready_at``.
        """
        status = await self.status()
        kernels = await self.kernels()
        busy = any(kernel.get("execution_state") == "busy" for kernel in kernels)
        return max(parse_time(status.get("last_activity")) or 0.0, self.ready_at), busy

    async def _get(self, path: str) -> Any:
        try:
            response = await self._http.get(f"{self.url}{path}", headers=self._auth())
        except httpx.HTTPError as exc:
            raise JupyterLabError(f"JupyterLab on port {self.port} did not answer: {exc}") from None
        if response.status_code != 200:
            raise JupyterLabError(f"JupyterLab on port {self.port} answered {response.status_code} to {path}.")
        return response.json()

    def log_tail(self, lines: int = 3) -> str:
        """The log lines that explain a failure: its critical and error lines, else its last lines."""
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()[-40:]
        except OSError:
            return "(no log)"
        serious = [line for line in text if line.startswith(("[C ", "[E ")) or "Error" in line]
        chosen = (serious or text)[-lines:]
        return " | ".join(line.strip() for line in chosen) or "(empty log)"


def parse_time(value: object) -> float | None:
    """Jupyter's ISO 8601 UTC times ('2026-01-01T10:00:00.123456Z') as epoch seconds."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _with_create_time(state: dict[str, Any]) -> dict[str, Any]:
    """A process record of an older version kept /proc's start ticks instead of psutil's create
    time; the one becomes the other (boot time + ticks / clock rate), so an upgrade finds its
    running JupyterLabs again."""
    if state.get("create_time") is None and state.get("start_ticks") is not None:
        try:
            create_time = psutil.boot_time() + int(state["start_ticks"]) / os.sysconf("SC_CLK_TCK")
        except (TypeError, ValueError, OSError):
            return state
        return {**state, "create_time": create_time}
    return state
