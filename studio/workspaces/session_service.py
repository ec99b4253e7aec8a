"""The session service that ``studio serve`` starts when it is given no ``--livy-url``.

It is a child ``python -P -m studio livy`` (its own process, so a Spark driver that misbehaves never
takes the workspace server down with it), started by ``studio.launcher`` (readiness from its ready
file) so that it is told to stop even when the workspace server is killed with SIGKILL: it holds
a port, and nothing else would ever stop it. Stopping, it leaves its sessions running for the next
`studio serve` on the same state folder, whose session service carries on with them (unless
``stop_sessions_on_exit``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from pathlib import Path

import psutil

from studio.config import Settings
from studio.launcher import ServiceLauncher
from studio.process import ShutdownStep

log = logging.getLogger("studio.workspaces.session_service")


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
        self._launcher: ServiceLauncher | None = None

    @property
    def log_path(self) -> Path:
        return self.state_dir / "service.log"

    @property
    def pid(self) -> int | None:
        return self._launcher.pid if self._launcher else None

    def args(self, port: int) -> list[str]:
        args = ["--host", "127.0.0.1", "--port", str(port), "--state-dir", str(self.state_dir)]
        if self.pool_size is not None:
            args += ["--pool", str(self.pool_size)]
        if self.settings.insecure_no_auth:
            args.append("--insecure-no-auth")
        if self.settings.stop_sessions_on_exit:
            args.append("--stop-sessions-on-exit")
        return args

    async def start(self, timeout: float = 120.0) -> str:
        """Start the service and return its URL once it listens; ServiceStartError if it does not."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        await self._previous_gone()
        port = self.port
        if port and not _port_is_free("127.0.0.1", port):
            log.warning("port %d is taken; the embedded session service takes a free port instead", port)
            port = 0
        self._launcher = ServiceLauncher(
            "livy",
            self.args(port),
            ready_file=self.state_dir / "service.ready.json",
            log_path=self.log_path,
            cwd=self.state_dir,
            # The token travels in the environment, not on the command line, where `ps` shows it to everyone.
            # Both servers share one users' directory (users, tokens, the audit trail): this server's.
            env={
                **os.environ,
                "STUDIO_IDENTITY_DIR": str(self.settings.identity_dir),
                # and one audit trail: its JSON lines too, wherever they are (an absolute path: the service runs elsewhere)
                **({"STUDIO_AUDIT_FILE": str(self.settings.audit_file)} if self.settings.audit_file else {}),
                **({"STUDIO_TOKEN": self.token} if self.token else {}),
            },
            die_with_parent=True,
        )
        self.url = await self._launcher.start(timeout)
        log.info("embedded session service (pid %s) listens on %s", self.pid, self.url)
        return self.url

    async def _previous_gone(self, timeout: float = 30.0) -> None:
        """After a crash of `studio serve`, the session service it started was told to stop and may
        still be letting go of its sessions, holding the port: wait for it, so that the new one gets
        the same port and carries on with the same sessions (their clients keep their URL)."""
        try:
            pid = int(json.loads((self.state_dir / "service.ready.json").read_text())["pid"])
            previous = psutil.Process(pid)
            if "livy" not in previous.cmdline():
                return
        except (OSError, ValueError, KeyError, TypeError, psutil.Error):
            return  # none (a clean stop removes the file), or its pid is another process's by now
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if not previous.is_running() or previous.status() == psutil.STATUS_ZOMBIE:
                    return
            except psutil.Error:
                return
            await asyncio.sleep(0.1)

    def poll(self) -> int | None:
        return None if self._launcher is None else self._launcher.poll()

    async def stop(self, timeout: float = 90.0) -> ShutdownStep | None:
        """SIGTERM, then SIGKILL to its group if it hangs. Its sessions keep running for the next start
        on the same state folder (unless ``stop_sessions_on_exit``): a restart of the Studio keeps them."""
        if self._launcher is None:
            return None
        step = await self._launcher.stop(timeout=timeout)
        if step is ShutdownStep.SIGKILL:
            log.error("the session service did not stop within %.0fs; it was killed", timeout)
        return step
