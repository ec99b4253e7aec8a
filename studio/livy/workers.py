"""The service's handle on one session worker process.

A ``WorkerProcess`` follows jupyter_client's provisioner contract: ``start`` spawns the child in
a process group of its own, ``poll`` says whether it still runs, ``stop(now=False)`` asks
politely, then sends SIGTERM and SIGKILL to the whole group (the driver JVM and any Python
workers of Spark live in it), and ``kill`` skips the politeness. Everything the worker says
arrives on one reader task and resolves the future that waits for it.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from studio.auth.credentials import without_secrets
from studio.config import Settings
from studio.errors import WorkerDiedError, WorkerStartError
from studio.livy.logs import LogFile
from studio.process import ShutdownStep, describe_exit, renice_group
from studio.worker import protocol
from studio.worker.protocol import RESULTS_DIR

log = logging.getLogger("studio.livy.workers")

_ids = itertools.count(1)


@dataclass
class WorkerSpec:
    """What a worker is started with. Everything here is fixed for the life of its JVM."""

    conf: dict[str, str]
    app_name: str
    warmup: bool
    env: dict[str, str] = field(default_factory=dict)


class WorkerProcess:
    """One child ``python -m studio.worker`` and the conversation with it."""

    def __init__(self, settings: Settings, spec: WorkerSpec) -> None:
        self.settings = settings
        self.spec = spec
        self.id = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{next(_ids)}"
        self.log = LogFile(settings.log_dir / f"worker-{self.id}.log")
        self.workdir = settings.state_dir / "work" / f"worker-{self.id}"
        self.info: dict[str, Any] = {}
        self.on_progress: Callable[[dict[str, Any]], None] | None = None
        self.on_output: Callable[[dict[str, Any]], None] | None = None  # a running statement's printed text
        self.started_at = 0.0
        self.ready_at = 0.0
        self._process: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[tuple[str, Any], asyncio.Future[Any]] = {}
        self._requests = itertools.count(1)
        self._tasks: list[asyncio.Task[Any]] = []
        self.ready: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.shutdown_step: ShutdownStep | None = None
        self._stopping = False  # stop() was called: a start still under way must not leave a process
        self._spawning = False
        self._spawned = asyncio.Event()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    # -- lifecycle --------------------------------------------------------------------------

    def command(self) -> list[str]:
        return list(self.settings.worker_command) or [sys.executable, "-P", "-m", "studio.worker"]

    async def start(self, nice: int = 0) -> None:
        """Spawn the worker and send it its start message; ``ready`` resolves when Spark is up."""
        self._spawning = True
        try:
            await self._spawn(nice)
        finally:
            self._spawning = False
            self._spawned.set()
        if self._stopping:
            raise WorkerStartError(f"Worker {self.id} was stopped while it started.")

    async def _spawn(self, nice: int) -> None:
        if self._stopping:
            return
        self.settings.log_dir.mkdir(parents=True, exist_ok=True)
        self.workdir.mkdir(parents=True, exist_ok=True)
        parent, child = socket.socketpair()
        env = {**without_secrets(dict(os.environ)), **self.spec.env}  # the worker runs the user's code
        with open(self.log.path, "ab") as log_handle:
            self._process = await asyncio.create_subprocess_exec(
                *self.command(),
                "--fd",
                str(child.fileno()),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_handle,
                stderr=asyncio.subprocess.STDOUT,
                pass_fds=(child.fileno(),),
                start_new_session=True,
                cwd=str(self.workdir),
                env=env,
            )
        child.close()
        self.started_at = time.monotonic()
        if nice:
            # Right after exec, before the child can start its JVM: every thread inherits it.
            try:
                os.setpriority(os.PRIO_PROCESS, self._process.pid, nice)
            except OSError:
                pass
        reader, self._writer = await asyncio.open_unix_connection(sock=parent, limit=protocol.MAX_LINE_BYTES)
        self._tasks = [
            asyncio.create_task(self._read(reader), name=f"worker-{self.id}-reader"),
            asyncio.create_task(self._wait(), name=f"worker-{self.id}-wait"),
        ]
        settings = self.settings
        self._send(
            {
                "op": "start",
                "master": settings.master,
                "conf": self.spec.conf,
                "app_name": self.spec.app_name,
                "warmup": self.spec.warmup,
                "warmup_seconds": settings.pool_warmup_seconds,
                "log_level": settings.spark_log_level,
                "max_output_bytes": settings.max_output_bytes,
                "cancel_timeout": settings.cancel_timeout,
                "stop_timeout": settings.stop_timeout,
            }
        )

    async def wait_ready(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait for Spark to be up; on timeout the worker is killed and WorkerStartError raised."""
        timeout = self.settings.worker_start_timeout if timeout is None else timeout
        try:
            return await asyncio.wait_for(asyncio.shield(self.ready), timeout)
        except asyncio.TimeoutError:
            message = (
                f"Worker {self.id} did not start in {timeout:.0f}s; raise STUDIO_WORKER_START_TIMEOUT "
                "or check the worker log."
            )
            self.log.append(message)
            if not self.ready.done():
                self.ready.set_exception(WorkerStartError(message))
                self.ready.exception()  # retrieved here, so asyncio does not warn about it
            await self.kill()
            raise WorkerStartError(message) from None

    def poll(self) -> int | None:
        """None while the worker runs, else its exit code (negative: killed by that signal)."""
        return None if self._process is None else self._process.returncode

    async def stop(self, now: bool = False) -> ShutdownStep:
        """Stop the worker and everything in its process group; returns the step that worked."""
        self._stopping = True
        if self._spawning:
            await self._spawned.wait()  # then there is a process to stop, or none at all
        step = await self._stop(now)
        self.shutdown_step = step
        await self._reap_group()
        for task in self._tasks:
            task.cancel()
        return step

    async def kill(self) -> None:
        await self.stop(now=True)

    async def _stop(self, now: bool) -> ShutdownStep:
        if self._process is None or self.poll() is not None:
            return ShutdownStep.ALREADY_GONE
        timeout = self.settings.stop_timeout
        if not now:
            try:
                self._send({"op": "shutdown"})
                await asyncio.wait_for(asyncio.shield(self.exited), timeout)
                return ShutdownStep.POLITE
            except (asyncio.TimeoutError, ConnectionError, OSError):
                pass
        for sig, step in ((signal.SIGTERM, ShutdownStep.SIGTERM), (signal.SIGKILL, ShutdownStep.SIGKILL)):
            if now and sig is signal.SIGTERM:
                continue
            self._signal_group(sig)
            try:
                await asyncio.wait_for(asyncio.shield(self.exited), timeout)
                return step
            except asyncio.TimeoutError:
                continue
        log.error("Worker %s (pid %s) never died", self.id, self.pid)
        return ShutdownStep.SIGKILL

    def _signal_group(self, sig: int) -> bool:
        """Signal the worker's process group; False when it is gone already."""
        if self._process is None:
            return False
        try:
            os.killpg(self._process.pid, sig)
            return True
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                return False
            if exc.errno == errno.EPERM:
                return False
            raise

    async def _reap_group(self) -> None:
        """After the worker exits, give the rest of its group (the JVM) time to exit, then kill it."""
        deadline = time.monotonic() + self.settings.stop_timeout
        while time.monotonic() < deadline:
            if not self._signal_group(0):
                return
            await asyncio.sleep(0.05)
        self._signal_group(signal.SIGKILL)

    # -- operations -------------------------------------------------------------------------

    async def activate(self, conf: dict[str, str], session_id: int) -> dict[str, Any]:
        """Hand a warm worker to a session: apply runtime conf. Reply has ok, static, error."""
        return await self._request("activated", None, {"op": "activate", "conf": conf, "session": session_id})

    async def execute(self, statement_id: int, code: str, kind: str, max_rows: int) -> dict[str, Any]:
        """Run one statement; returns Livy's output. Raises WorkerDiedError if the worker exits."""
        message = {"op": "execute", "id": statement_id, "code": code, "kind": kind, "max_rows": max_rows}
        reply = await self._request("result", statement_id, message)
        return reply["output"]

    def cancel(self, statement_id: int) -> None:
        try:
            self._send({"op": "cancel", "id": statement_id})
        except (ConnectionError, OSError):
            pass

    async def complete(self, code: str, cursor: int) -> list[str]:
        req = next(self._requests)
        reply = await self._request("completion", req, {"op": "complete", "req": req, "code": code, "cursor": cursor})
        return list(reply.get("candidates", []))

    async def inspect(self, code: str, cursor: int, detail_level: int) -> dict[str, Any]:
        req = next(self._requests)
        message = {"op": "inspect", "req": req, "code": code, "cursor": cursor, "detail_level": detail_level}
        reply = await self._request("inspection", req, message)
        return {"found": bool(reply.get("found")), "data": reply.get("data", {})}

    @property
    def results_dir(self) -> Path:
        """Where the worker writes statements' Arrow results (see studio.worker.helpers)."""
        return self.workdir / RESULTS_DIR

    def result_file(self, statement_id: int) -> Path:
        return self.results_dir / f"{statement_id}.arrow"

    def renice(self, value: int = 0) -> bool:
        """Set every thread of every process in the worker's group to ``value`` (needs privilege to lower)."""
        if self._process is None:
            return False
        return renice_group(self._process.pid, value)

    # -- plumbing ---------------------------------------------------------------------------

    def _send(self, message: dict[str, Any]) -> None:
        if self._writer is None or self._writer.is_closing():
            raise ConnectionError(f"worker {self.id} is not connected")
        self._writer.write(protocol.encode(message))

    async def _request(self, reply_op: str, key: Any, message: dict[str, Any]) -> dict[str, Any]:
        if self.exited.done():
            raise WorkerDiedError(f"The session's worker {describe_exit(self.exited.result())}.")
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[(reply_op, key)] = future
        try:
            self._send(message)
            return await future
        finally:
            self._pending.pop((reply_op, key), None)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await reader.readline()
            except (ConnectionError, asyncio.LimitOverrunError, ValueError) as exc:
                log.warning("worker %s: connection error: %s", self.id, exc)
                return
            if not line:
                return
            try:
                message = protocol.decode(line)
            except ValueError as exc:
                log.warning("worker %s sent a bad message: %s", self.id, exc)
                continue
            self._dispatch(message)

    def _dispatch(self, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == "ready":
            self.info = message
            self.ready_at = time.monotonic()
            if not self.ready.done():
                self.ready.set_result(message)
        elif op == "failed":
            if not self.ready.done():
                self.ready.set_exception(WorkerStartError(f"Spark did not start: {message.get('message')}"))
                self.ready.exception()  # marks it retrieved; waiters still get it
        elif op == "progress":
            if self.on_progress is not None:
                self.on_progress(message)
        elif op == "output":
            if self.on_output is not None:
                self.on_output(message)
        else:
            key = message.get("id") if op == "result" else message.get("req")
            # "completion" and "inspection" replies are matched by their request number.
            future = self._pending.get((op, key))
            if future is not None and not future.done():
                future.set_result(message)

    async def _wait(self) -> None:
        assert self._process is not None
        code = await self._process.wait()
        if self._writer is not None:
            self._writer.close()
        self.exited.set_result(code)
        error = WorkerDiedError(f"The session's worker {describe_exit(code)}; see the session log.")
        if not self.ready.done():
            self.ready.set_exception(
                WorkerStartError(f"The worker {describe_exit(code)} before Spark was ready; see the session log.")
            )
            self.ready.exception()  # marks it retrieved; waiters still get it
        for future in list(self._pending.values()):
            if not future.done():
                future.set_exception(error)

