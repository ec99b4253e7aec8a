"""Starting a studio server (``studio livy`` or ``studio serve``) as a child process, and knowing
when it listens without reading its console.

``ServiceLauncher("livy", args, ready_file=..., log_path=...)`` runs
``python -P -m studio livy ARGS --ready-file FILE`` as a ``studio.process.ChildProcess`` (its
output appended to ``log_path``). The server writes FILE once it listens, atomically and 0600:
JSON with at least ``url`` and ``pid`` (``studio.cli.ready_info``); the ``listening on`` line it
prints is for people only. ``start()`` (async) or ``start_sync()`` wait for that file, for at
most ``timeout`` seconds, and raise ``ServiceStartError`` naming the log when the server exits or
the time runs out (it is killed then). A file left by an earlier server is removed first, and
one that names another pid is not believed.

``die_with_parent`` (the default) makes the child get SIGTERM when the process that started it
dies, even by SIGKILL: a session service holds a port and warm Spark drivers that nothing else
would ever stop. Used by ``studio serve`` (its embedded session service), ``studio run`` (the
service of a run without ``--livy-url``), ``studio bench`` and the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from studio.errors import ServiceStartError
from studio.process import ChildProcess, ShutdownStep, describe_exit, python_command

_POLL_SECONDS = 0.05


class ServiceLauncher:
    """One child ``studio livy`` or ``studio serve``; ``url`` once it listens."""

    def __init__(
        self,
        service: str,
        args: Sequence[str],
        *,
        ready_file: Path,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
        die_with_parent: bool = True,
        stop_timeout: float = 90.0,
    ) -> None:
        self.service = service
        self.ready_file = ready_file
        self.log_path = log_path
        command = python_command("studio", service, *args, "--ready-file", str(ready_file))
        self.process = ChildProcess(
            command,
            name=f"studio {service}",
            cwd=cwd,
            env=env,
            output=log_path,
            die_with_parent=die_with_parent,
            stop_timeout=stop_timeout,
        )
        self.info: dict[str, Any] = {}  # the ready file's content

    @property
    def url(self) -> str:
        return str(self.info.get("url", ""))

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def _spawn(self) -> None:
        self.ready_file.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.ready_file.unlink()  # an earlier server's
        try:
            self.process.start()
        except OSError as exc:
            raise ServiceStartError(f"studio {self.service} could not be started: {exc}") from None

    def check_ready(self) -> dict[str, Any] | None:
        """The ready file's content once the server listens; None before; ServiceStartError if it exited."""
        try:
            info = json.loads(self.ready_file.read_text())
        except (OSError, ValueError):
            info = None
        if isinstance(info, dict) and info.get("pid") == self.process.pid and info.get("url"):
            self.info = info
            return info
        code = self.process.poll()
        if code is not None:
            raise ServiceStartError(
                f"studio {self.service} {describe_exit(code)} before it listened; see {self.log_path}."
            )
        return None

    def _timed_out(self, timeout: float) -> ServiceStartError:
        return ServiceStartError(f"studio {self.service} did not listen within {timeout:.0f}s; see {self.log_path}.")

    async def start(self, timeout: float = 120.0) -> str:
        """Start the server and return its URL once it listens."""
        self._spawn()
        deadline = time.monotonic() + timeout
        while self.check_ready() is None:
            if time.monotonic() > deadline:
                await self.process.kill()
                raise self._timed_out(timeout)
            await asyncio.sleep(_POLL_SECONDS)
        return self.url

    def start_sync(self, timeout: float = 120.0) -> str:
        """``start`` for code without an event loop."""
        self._spawn()
        deadline = time.monotonic() + timeout
        while self.check_ready() is None:
            if time.monotonic() > deadline:
                self.process.stop_sync(now=True)
                raise self._timed_out(timeout)
            time.sleep(_POLL_SECONDS)
        return self.url

    def poll(self) -> int | None:
        return self.process.poll()

    async def stop(self, now: bool = False, timeout: float | None = None) -> ShutdownStep:
        """SIGTERM (the server stops what it started), then SIGKILL to its group if it hangs."""
        return await self.process.stop(now, timeout=timeout)

    def stop_sync(self, now: bool = False, timeout: float | None = None) -> ShutdownStep:
        return self.process.stop_sync(now, timeout=timeout)
