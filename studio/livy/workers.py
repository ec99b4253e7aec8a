"""The service's handle on one session worker process.

A ``WorkerProcess`` is a ``studio.process.ChildProcess`` (``python -P -m studio.worker``, in a
process group of its own with its driver JVM) and the conversation with it over a Unix socket
in the worker's work folder (``studio.worker.protocol``). ``start`` spawns it; ``stop(now=False)``
asks politely, then SIGTERM and SIGKILL to the group; ``kill`` skips the politeness. Everything
the worker says arrives on one reader task and resolves the future that waits for it.

Workers outlive the service: ``detach`` lets go of a worker and leaves it running (a service
that stops keeping its sessions), ``adopt`` finds it again in the next run of the service from
its record (pid and create time, so a reused pid is never taken for it), and ``attach`` connects
to it and learns its state; results it finished meanwhile arrive again until the service
acknowledges them (``ack``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from studio.auth.credentials import without_secrets
from studio.config import Settings
from studio.errors import WorkerDiedError, WorkerStartError
from studio.livy.logs import LogFile
from studio.process import ChildProcess, ShutdownStep, describe_exit, python_command, renice_group
from studio.worker import protocol
from studio.worker.protocol import RESULTS_DIR, SOCKET_NAME

log = logging.getLogger("studio.livy.workers")

_ids = itertools.count(1)

__all__ = ["ShutdownStep", "WorkerProcess", "WorkerSpec", "describe_exit", "describe_worker_exit"]


@dataclass
class WorkerSpec:
    """What a worker is started with. Everything here is fixed for the life of its JVM."""

    conf: dict[str, str]
    app_name: str
    warmup: bool
    env: dict[str, str] = field(default_factory=dict)
    user: str | None = None  # the Spark user of a cold worker's session (a warm one learns it on activate)
    application_id: str | None = None  # the application whose pool or session it serves
    shape: str = ""  # a warm worker's driver shape (a digest of its conf): the pool takes back only its own
    # Shared-driver mode (studio.livy.shared): the start message's "mode", "connect_url", "connect_token",
    # "spark_ui_url" and "app_id" (the token reaches the worker only over its 0600 socket).
    shared: dict[str, Any] | None = None


def describe_worker_exit(code: int | None, adopted: bool) -> str:
    """An exit for people; an adopted worker's exit code cannot be known (it is not our child)."""
    if adopted and code == 0:
        return "ended (its exit code is unknown: the service was restarted since it started it)"
    return describe_exit(code)


class WorkerProcess:
    """One child ``python -m studio.worker`` and the conversation with it."""

    def __init__(self, settings: Settings, spec: WorkerSpec, worker_id: str | None = None) -> None:
        self.settings = settings
        self.spec = spec
        self.id = worker_id or f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{next(_ids)}"
        self.log = LogFile(settings.log_dir / f"worker-{self.id}.log")
        self.workdir = settings.state_dir / "work" / f"worker-{self.id}"
        self.info: dict[str, Any] = {}
        self.on_progress: Callable[[dict[str, Any]], None] | None = None
        self.on_output: Callable[[dict[str, Any]], None] | None = None  # a running statement's printed text
        self.on_started: Callable[[WorkerProcess], None] | None = None  # spawned: record it (the store)
        self.started_at = 0.0
        self.ready_at = 0.0
        self.process: ChildProcess | None = None
        self.adopted = False
        self.session_id: int | None = None  # the session it was handed to (kept in its record)
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[tuple[str, Any], asyncio.Future[Any]] = {}
        self._unclaimed: dict[int, dict[str, Any]] = {}  # results nobody waited for yet (replayed on attach)
        self._attached: asyncio.Future[dict[str, Any]] | None = None
        self._requests = itertools.count(1)
        self._tasks: list[asyncio.Task[Any]] = []
        self.ready: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.shutdown_step: ShutdownStep | None = None
        self._stopping = False  # stop() was called: a start still under way must not leave a process
        self._spawning = False
        self._spawned = asyncio.Event()
        self._hurry_on_connect = False

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def record(self) -> dict[str, Any]:
        """What the store keeps so that a later run of the service can ``adopt`` this worker."""
        record = self.process.record if self.process else None
        return {
            "process": record.to_json() if record else None,
            "app_name": self.spec.app_name,
            "warmup": self.spec.warmup,
            "application_id": self.spec.application_id,
            "shape": self.spec.shape,
            "mode": "shared" if self.spec.shared else "dedicated",
            "started_at": time.time() - (time.monotonic() - self.started_at),
        }

    # -- lifecycle --------------------------------------------------------------------------

    def command(self) -> list[str]:
        return list(self.settings.worker_command) or python_command("studio.worker")

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
        os.chmod(self.workdir, 0o700)
        # The service binds the worker's socket and hands it over listening, so connecting below
        # cannot race the child's start; the worker accepts on it for life (later services too).
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            (self.workdir / SOCKET_NAME).unlink(missing_ok=True)
            with protocol.socket_address(self.workdir) as address:
                listener.bind(address)
            os.chmod(self.workdir / SOCKET_NAME, 0o600)
            listener.listen(8)
            env = {**without_secrets(dict(os.environ)), **self.spec.env}  # the worker runs the user's code
            command = [
                *self.command(),
                "--listen-fd",
                str(listener.fileno()),
                "--orphan-timeout",
                f"{self.settings.worker_orphan_timeout:g}",
            ]
            self.process = ChildProcess(
                command,
                name=f"worker {self.id}",
                cwd=self.workdir,
                env=env,
                output=self.log.path,
                pass_fds=(listener.fileno(),),
                stop_timeout=self.settings.stop_timeout,
                nice=nice,
            )
            self.process.start()
        finally:
            listener.close()
        self.started_at = time.monotonic()
        if self.on_started is not None:
            self.on_started(self)
        await self._connect()
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
                "user": self.spec.user,
                "session": self.session_id,
                **(self.spec.shared or {}),
            }
        )
        if self._hurry_on_connect:  # claimed before it could be told
            self._send({"op": "hurry"})

    async def _connect(self) -> None:
        with protocol.socket_address(self.workdir) as address:
            reader, self._writer = await asyncio.open_unix_connection(path=address, limit=protocol.MAX_LINE_BYTES)
        self._tasks = [
            asyncio.create_task(self._read(reader), name=f"worker-{self.id}-reader"),
            asyncio.create_task(self._wait(), name=f"worker-{self.id}-wait"),
        ]

    @classmethod
    def adopt(cls, settings: Settings, worker_id: str, record: dict[str, Any]) -> "WorkerProcess | None":
        """The worker a previous run of the service started, if it still runs (pid and create time
        match); None otherwise. ``attach`` then connects to it."""
        process = ChildProcess.adopt(record.get("process"), name=f"worker {worker_id}", stop_timeout=settings.stop_timeout)
        if process is None:
            return None
        spec = WorkerSpec(
            conf={},
            app_name=str(record.get("app_name") or ""),
            warmup=bool(record.get("warmup")),
            application_id=record.get("application_id"),
            shape=str(record.get("shape") or ""),
        )
        worker = cls(settings, spec, worker_id)
        worker.process = process
        worker.adopted = True
        started_at = float(record.get("started_at") or time.time())
        worker.started_at = time.monotonic() - max(0.0, time.time() - started_at)
        return worker

    async def attach(self, timeout: float = 10.0) -> dict[str, Any]:
        """Connect to an adopted worker and learn its state (protocol ``attached``). What it finished
        while no service listened follows: printed text to ``on_output``, results to ``result()``.
        Raises WorkerDiedError when it cannot be reached in ``timeout`` seconds."""
        self._attached = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(self._connect(), timeout)
            self._send({"op": "attach"})
            state = await asyncio.wait_for(asyncio.shield(self._attached), timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise WorkerDiedError(f"Worker {self.id} (pid {self.pid}) did not answer after the restart: {exc or 'timeout'}.") from None
        if state.get("ready"):
            self._dispatch(state["ready"])
        elif state.get("failed"):
            self._dispatch({"op": "failed", "message": state["failed"]})
        return state

    async def detach(self) -> None:
        """Let go of the worker and leave it running: the next service adopts it (it stops
        itself after STUDIO_WORKER_ORPHAN_TIMEOUT if none does)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    async def wait_ready(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait for Spark to be up; on timeout the worker is killed and WorkerStartError raised."""
        timeout = self.settings.worker_start_timeout if timeout is None else timeout
        if self.adopted:  # it has been starting since before this run of the service
            timeout = max(1.0, timeout - (time.monotonic() - self.started_at))
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
        """None while the worker runs (or before it started), else its exit code (negative: killed by
        that signal; 0 when unknown, for an adopted worker)."""
        return None if self.process is None else self.process.poll()

    async def stop(self, now: bool = False) -> ShutdownStep:
        """Stop the worker and everything in its process group; returns the step that worked."""
        self._stopping = True
        if self._spawning:
            await self._spawned.wait()  # then there is a process to stop, or none at all
        if self.process is None:
            step = ShutdownStep.ALREADY_GONE
        else:
            step = await self.process.stop(now, polite=self._polite_stop)
            if not self.exited.done():
                self._on_exit(self.process.poll() or 0)
        self.shutdown_step = step
        for task in self._tasks:
            task.cancel()
        return step

    async def kill(self) -> None:
        await self.stop(now=True)

    def _polite_stop(self) -> None:
        self._send({"op": "shutdown"})  # ConnectionError: ChildProcess goes on to SIGTERM at once

    # -- operations -------------------------------------------------------------------------

    async def activate(self, conf: dict[str, str], session_id: int, user: str | None = None) -> dict[str, Any]:
        """Hand a warm worker to a session: apply runtime conf, then make ``user`` its Spark user.
        Reply has ok, static, error, identity_error."""
        message = {"op": "activate", "conf": conf, "session": session_id, "user": user}
        return await self._request("activated", None, message)

    async def execute(self, statement_id: int, code: str, kind: str, max_rows: int, user: str | None = None) -> dict[str, Any]:
        """Run one statement (sent by ``user``); returns Livy's output. Raises WorkerDiedError if the worker exits."""
        message = {"op": "execute", "id": statement_id, "code": code, "kind": kind, "max_rows": max_rows, "user": user}
        reply = await self._request("result", statement_id, message)
        return reply["output"]

    async def result(self, statement_id: int) -> dict[str, Any]:
        """The output of a statement the worker already has (sent by an earlier run of the service)."""
        reply = await self._request("result", statement_id, None)
        return reply["output"]

    def ack(self, statement_id: int) -> None:
        """The statement's result is recorded: the worker may forget it."""
        try:
            self._send({"op": "ack", "id": statement_id})
        except (ConnectionError, OSError):
            pass

    def hurry(self) -> None:
        """A session waits for this starting pool worker: it skips the rest of its warm-up."""
        try:
            self._send({"op": "hurry"})
        except (ConnectionError, OSError):
            self._hurry_on_connect = True

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
        if self.process is None or self.process.pgid is None:
            return False
        return renice_group(self.process.pgid, value)

    # -- plumbing ---------------------------------------------------------------------------

    def _send(self, message: dict[str, Any]) -> None:
        if self._writer is None or self._writer.is_closing():
            raise ConnectionError(f"worker {self.id} is not connected")
        self._writer.write(protocol.encode(message))

    async def _request(self, reply_op: str, key: Any, message: dict[str, Any] | None) -> dict[str, Any]:
        if reply_op == "result" and key in self._unclaimed:
            return self._unclaimed.pop(key)
        if self.exited.done():
            raise WorkerDiedError(f"The session's worker {describe_worker_exit(self.exited.result(), self.adopted)}.")
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[(reply_op, key)] = future
        try:
            if message is not None:
                try:
                    self._send(message)
                except (ConnectionError, OSError) as exc:
                    # Hung up: it is exiting (its exit is noticed a moment later) or unreachable.
                    raise WorkerDiedError(f"The session's worker cannot be reached ({exc}); see the session log.") from None
            return await future
        finally:
            self._pending.pop((reply_op, key), None)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await reader.readline()
            except (ConnectionError, asyncio.LimitOverrunError, ValueError) as exc:
                log.warning("worker %s: connection error: %s", self.id, exc)
                break
            if not line:
                break
            try:
                message = protocol.decode(line)
            except ValueError as exc:
                log.warning("worker %s sent a bad message: %s", self.id, exc)
                continue
            self._dispatch(message)
        # The worker hung up. It does so only when it exits (or another service took it over):
        # give it the stop timeout to be gone, else nobody can reach it any more, so it is stopped.
        if self.process is not None and not self._stopping:
            try:
                await asyncio.wait_for(asyncio.shield(self.exited), self.settings.stop_timeout)
            except asyncio.TimeoutError:
                log.warning("worker %s (pid %s) hung up but still runs; stopping it", self.id, self.pid)
                asyncio.get_running_loop().create_task(self.stop(now=True))

    def _dispatch(self, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == "ready":
            self.info = message
            # An adopted worker was ready long ago: its start took what it says, from its recorded start.
            adopted = self.adopted and message.get("startup_seconds") is not None
            self.ready_at = self.started_at + float(message["startup_seconds"]) if adopted else time.monotonic()
            if not self.ready.done():
                self.ready.set_result(message)
        elif op == "failed":
            if not self.ready.done():
                self.ready.set_exception(WorkerStartError(f"Spark did not start: {message.get('message')}"))
                self.ready.exception()  # marks it retrieved; waiters still get it
        elif op == "attached":
            if self._attached is not None and not self._attached.done():
                self._attached.set_result(message)
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
            elif op == "result" and key is not None:
                self._unclaimed[int(key)] = message  # a replayed result; the session claims it (or ignores it)

    async def _wait(self) -> None:
        assert self.process is not None
        code = await self.process.wait()
        self._on_exit(code)

    def _on_exit(self, code: int) -> None:
        if self.exited.done():
            return
        if self._writer is not None:
            self._writer.close()
        self.exited.set_result(code)
        described = describe_worker_exit(code, self.adopted)
        error = WorkerDiedError(f"The session's worker {described}; see the session log.")
        if not self.ready.done():
            self.ready.set_exception(WorkerStartError(f"The worker {described} before Spark was ready; see the session log."))
            self.ready.exception()  # marks it retrieved; waiters still get it
        for future in list(self._pending.values()):
            if not future.done():
                future.set_exception(error)
        if self._attached is not None and not self._attached.done():
            self._attached.set_exception(error)
            self._attached.exception()
