"""The session service that ``studio serve`` starts when it is given no ``--livy-url``.

It is a child ``python -m studio livy`` (its own process, so a Spark driver that misbehaves never
takes the workspace server down with it), started through ``studio.workspaces.die_with_parent``
so that it is told to stop even when the workspace server is killed with SIGKILL: it holds
warm Spark drivers and a port, and nothing else would ever stop it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

from studio.config import Settings
from studio.errors import StudioError
from studio.livy.workers import describe_exit

log = logging.getLogger("studio.workspaces.session_service")

_ANNOUNCE = "listening on "


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
            return True
        except OSError:
            return False


class EmbeddedSessionService:
    """``start`` / ``poll`` / ``stop`` of one child ``studio livy`` on 127.0.0.1."""

    def __init__(
        self, settings: Settings, state_dir: Path, port: int, pool_size: int | None = None, token: str = ""
    ) -> None:
        self.settings = settings
        self.token = token  # the studio's own: the service and the Studio share one secret
        self.state_dir = state_dir
        self.port = port
        self.pool_size = pool_size
        self.url = ""
        self._process: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task[None] | None = None

    @property
    def log_path(self) -> Path:
        return self.state_dir / "service.log"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def command(self, port: int) -> list[str]:
        command = [
            sys.executable, "-P", "-m", "studio.workspaces.die_with_parent", str(os.getpid()), "--",
            sys.executable, "-P", "-m", "studio", "livy", "--host", "127.0.0.1", "--port", str(port),
            "--state-dir", str(self.state_dir),
        ]  # fmt: skip
        if self.pool_size is not None:
            command += ["--pool", str(self.pool_size)]
        if self.settings.insecure_no_auth:
            command.append("--insecure-no-auth")
        return command

    async def start(self, timeout: float = 120.0) -> str:
        """Start the service and return its URL once it listens."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        port = self.port
        if port and not _port_is_free("127.0.0.1", port):
            log.warning("port %d is taken; the embedded session service takes a free port instead", port)
            port = 0
        # Its own session: a Ctrl-C in the terminal reaches only `studio serve`, which then stops it in order.
        with open(self.log_path, "ab") as log_handle:
            self._process = await asyncio.create_subprocess_exec(
                *self.command(port),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=log_handle,
                start_new_session=True,
                cwd=str(self.state_dir),
                # The token travels in the environment, not on the command line, where `ps` shows it to everyone.
                env={**os.environ, "STUDIO_TOKEN": self.token} if self.token else None,
            )
        assert self._process.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = await asyncio.wait_for(self._process.stdout.readline(), max(remaining, 0.01))
            except asyncio.TimeoutError:
                await self.stop()
                raise StudioError(f"The session service did not start within {timeout:.0f}s; see {self.log_path}.")
            if not line:
                code = await self._process.wait()
                raise StudioError(f"The session service {describe_exit(code)} before it listened; see {self.log_path}.")
            text = line.decode(errors="replace")
            if _ANNOUNCE in text:
                self.url = text.split(_ANNOUNCE, 1)[1].split()[0]
                break
        # Anything it prints later must not fill the pipe and block it.
        self._drain = asyncio.create_task(self._drain_stdout(), name="session-service-stdout")
        log.info("embedded session service (pid %s) listens on %s", self.pid, self.url)
        return self.url

    async def _drain_stdout(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        with open(self.log_path, "ab") as log_handle:
            while line := await self._process.stdout.readline():
                log_handle.write(line)
                log_handle.flush()

    def poll(self) -> int | None:
        return None if self._process is None else self._process.returncode

    async def stop(self, timeout: float = 90.0) -> None:
        """SIGTERM (it stops its sessions and workers), then SIGKILL to its group if it hangs."""
        if self._process is None:
            return
        if self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self._process.wait(), timeout)
            except asyncio.TimeoutError:
                log.error("the session service did not stop within %.0fs; killing it", timeout)
                try:
                    os.killpg(self._process.pid, signal.SIGKILL)
                except OSError as exc:
                    if exc.errno != errno.ESRCH:
                        raise
                await self._process.wait()
        if self._drain is not None:
            with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
                await asyncio.wait_for(self._drain, 5)
