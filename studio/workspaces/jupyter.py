"""The workspace server's handle on one workspace's JupyterLab server.

``JupyterLabProcess`` follows the same contract as the session service's ``WorkerProcess``
(jupyter_client's provisioner, jupyterhub's Spawner): ``start`` spawns ``jupyter lab`` in a
process group of its own, bound to 127.0.0.1 on a free port, with a random token and the
workspace's folder as its root; ``wait_ready`` polls its ``/api/status`` with that token;
``poll`` says whether it still runs; ``stop(now=False)`` asks it to shut down (which shuts down
its kernels), then sends SIGTERM and SIGKILL. Jupyter starts every kernel in a session of its
own, so a signal to JupyterLab's group does not reach them: ``stop`` also signals every process
that descends from JupyterLab, so no kernel survives its workspace.

The process outlives the workspace server on purpose: after a crash or SIGKILL of
``studio serve`` the next one finds it again by pid, start time and token (``adopt``), the way
jupyterhub's ``Spawner.poll`` relies on a stored pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import errno
import json
import logging
import os
import secrets
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from studio.auth.credentials import without_secrets
from studio.config import Settings
from studio.errors import JupyterLabError
from studio.livy.workers import ShutdownStep, describe_exit

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


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (JupyterLab binds it a moment later, port_retries=0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class JupyterLabProcess:
    """One ``jupyter lab`` child serving one workspace folder."""

    def __init__(
        self, settings: Settings, folder: Path, log_path: Path, layout_dir: Path, env: dict[str, str]
    ) -> None:
        self.settings = settings
        self.folder = folder
        self.log_path = log_path
        self.layout_dir = layout_dir  # JupyterLab's saved layout (open tabs) for this workspace only
        self.env = env
        self.port = 0
        self.token = ""
        self.pid: int | None = None
        self.started_at = 0.0  # wall-clock time of the spawn
        self.ready_at = 0.0  # when this server first answered it (or found it again)
        self.shutdown_step: ShutdownStep | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._start_ticks: int | None = None  # /proc start time: tells our pid from a reused one
        self._stopping = False
        self._spawning = False
        self._spawned = asyncio.Event()
        self._http = httpx.AsyncClient(timeout=5.0, trust_env=False)

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
        return {
            "pid": self.pid,
            "start_ticks": self._start_ticks,
            "port": self.port,
            "token": self.token,
            "started_at": self.started_at,
            "log_path": str(self.log_path),
        }

    @classmethod
    async def adopt(
        cls, settings: Settings, folder: Path, layout_dir: Path, env: dict[str, str], state: dict[str, Any]
    ) -> "JupyterLabProcess | None":
        """The JupyterLab a previous server started, if it still runs and answers with its token."""
        lab = cls(settings, folder, Path(state.get("log_path") or ""), layout_dir, env)
        lab.pid = state.get("pid")
        lab.port = int(state.get("port") or 0)
        lab.token = str(state.get("token") or "")
        lab.started_at = float(state.get("started_at") or 0.0)
        lab._start_ticks = state.get("start_ticks")
        lab._spawned.set()
        if not lab.pid or not lab.port or lab.poll() is not None:
            await lab.close()
            return None
        try:
            await lab.status()
        except JupyterLabError:
            await lab.close()
            return None
        lab.ready_at = time.time()
        return lab

    # -- lifecycle --------------------------------------------------------------------------

    def command(self) -> list[str]:
        base = list(self.settings.jupyterlab_command) or [sys.executable, "-P", "-m", "jupyterlab"]
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
            # Jupyter refuses to run as root without it; containers often run as root.
            *(["--allow-root"] if os.geteuid() == 0 else []),
        ]

    async def start(self) -> None:
        """Spawn JupyterLab; ``wait_ready`` tells when it answers."""
        self._spawning = True
        try:
            if not self._stopping:
                await self._spawn()
        finally:
            self._spawning = False
            self._spawned.set()
        if self._stopping:
            raise JupyterLabError(f"JupyterLab for {self.folder.name} was stopped while it started.")

    async def _spawn(self) -> None:
        self.port = free_port()
        self.token = secrets.token_urlsafe(32)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.layout_dir.mkdir(parents=True, exist_ok=True)
        # The token travels in the environment, not on the command line, where `ps` shows it to everyone.
        # The studio's own secrets stay out: JupyterLab and its kernels run the user's code.
        env = {**without_secrets(dict(os.environ)), **self.env, "JUPYTER_TOKEN": self.token}
        env.pop("JUPYTER_TOKEN_FILE", None)
        with open(self.log_path, "ab") as log_handle:
            log_handle.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting JupyterLab on port {self.port}\n".encode())
            log_handle.flush()
            self._process = await asyncio.create_subprocess_exec(
                *self.command(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_handle,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                cwd=str(self.folder),
                env=env,
            )
        self.pid = self._process.pid
        self.started_at = time.time()
        self._start_ticks = _start_ticks(self.pid)

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
        if self._process is not None:
            return self._process.returncode
        if self.pid is None:
            return 0
        return None if _alive(self.pid, self._start_ticks) else 0

    async def wait_exit(self) -> int:
        """Wait until JupyterLab exits; its exit code (0 if unknown)."""
        if self._process is not None:
            return await self._process.wait()
        while (code := self.poll()) is None:
            await asyncio.sleep(1.0)
        return code

    async def stop(self, now: bool = False) -> ShutdownStep:
        """Stop JupyterLab and every kernel it started; returns the step that worked."""
        self._stopping = True
        if self._spawning:
            await self._spawned.wait()  # then there is a process to stop, or none at all
        try:
            step = await self._stop(now)
        finally:
            await self.close()
        self.shutdown_step = step
        return step

    async def kill(self) -> None:
        await self.stop(now=True)

    async def close(self) -> None:
        await self._http.aclose()

    async def _stop(self, now: bool) -> ShutdownStep:
        if self.pid is None or self.poll() is not None:
            return ShutdownStep.ALREADY_GONE
        timeout = self.settings.jupyterlab_stop_timeout
        descendants = self._descendants()
        step = ShutdownStep.SIGKILL
        stopped = False
        if not now and self.ready_at:  # one that never answered cannot be asked
            # /api/shutdown shuts the kernels down cleanly (a PySpark kernel ends its Livy session) and exits.
            # Its answer may never come (the server stops its loop), so wait for the exit instead.
            request = asyncio.create_task(self._http.post(f"{self.url}/api/shutdown", headers=self._auth()))
            stopped = await self._wait_exit(timeout)
            request.cancel()
            with contextlib.suppress(httpx.HTTPError, asyncio.CancelledError):
                await request
            step = ShutdownStep.POLITE
        for sig, sig_step in ((signal.SIGTERM, ShutdownStep.SIGTERM), (signal.SIGKILL, ShutdownStep.SIGKILL)):
            if stopped:
                break
            if now and sig is signal.SIGTERM:
                continue
            descendants |= self._descendants()
            self._signal(sig, descendants)
            stopped = await self._wait_exit(timeout)
            step = sig_step
        if not stopped:
            log.error("JupyterLab of %s (pid %s) never died", self.folder.name, self.pid)
        await self._reap(descendants, timeout)
        return step

    async def _wait_exit(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.wait_exit(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def _descendants(self) -> set[tuple[int, int | None]]:
        """(pid, start ticks) of every process below JupyterLab: kernels and what they started."""
        if self.pid is None or self.poll() is not None:
            return set()
        return {(pid, _start_ticks(pid)) for pid in _descendants_of(self.pid)}

    def _signal(self, sig: int, descendants: set[tuple[int, int | None]]) -> None:
        assert self.pid is not None
        _killpg(self.pid, sig)
        for pid, ticks in descendants:
            if _alive(pid, ticks):
                # Kernels lead process groups of their own; signal the whole group.
                with contextlib.suppress(OSError):
                    os.killpg(os.getpgid(pid), sig)
                with contextlib.suppress(OSError):
                    os.kill(pid, sig)

    async def _reap(self, descendants: set[tuple[int, int | None]], timeout: float) -> None:
        """After JupyterLab is gone, give its orphaned kernels a moment, then kill what is left."""
        assert self.pid is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            left = {item for item in descendants if _alive(*item)} | ({(self.pid, None)} if _group_alive(self.pid) else set())
            if not left:
                return
            await asyncio.sleep(0.1)
        for pid, ticks in descendants:
            if _alive(pid, ticks):
                log.warning("killing process %s left behind by JupyterLab of %s", pid, self.folder.name)
                with contextlib.suppress(OSError):
                    os.killpg(os.getpgid(pid), signal.SIGKILL)
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        _killpg(self.pid, signal.SIGKILL)

    # -- talking to it ----------------------------------------------------------------------

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"}

    async def status(self) -> dict[str, Any]:
        """JupyterLab's ``/api/status`` (started, last_activity, kernels, connections)."""
        return await self._get("/api/status")

    async def kernels(self) -> list[dict[str, Any]]:
        """Its kernels with ``execution_state``; asking does not count as activity."""
        return await self._get("/api/kernels?no_track_activity=1")  # type: ignore[return-value]

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


# -- /proc helpers (Linux) -------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read().decode("ascii", "replace")
    except OSError:
        return None
    # Fields after the command name (which may contain spaces) start after the last ')'.
    return stat[stat.rfind(")") + 2 :].split()


def _start_ticks(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def _alive(pid: int, start_ticks: int | None) -> bool:
    """The process runs (not a zombie) and is the one we knew, not a later one with a reused pid."""
    fields = _stat_fields(pid)
    if not fields or fields[0] in ("Z", "X"):
        return False
    return start_ticks is None or (len(fields) > 19 and int(fields[19]) == start_ticks)


def _descendants_of(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields and len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, queue = [], [root]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def _killpg(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except OSError as exc:
        if exc.errno in (errno.ESRCH, errno.EPERM):
            return False
        raise


def _group_alive(pgid: int) -> bool:
    """A live (non-zombie) process is still in the group."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields and len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
                return True
    return False
