"""Shared drivers: one Spark Connect server JVM per (application, user).

In an application whose ``driverMode`` is SHARED, a user's sessions are lean workers that talk
Spark Connect to one driver of that user (never of two users: a JVM is one Spark user, one set of
temp views and caches, one classpath). ``ConnectDrivers`` keeps those drivers: ``ensure`` finds
the running one or starts it and waits until it answers, ``stop_idle`` (the culler) stops one
that has had no session and no endpoint call for its application's idle time.

A driver is ``spark-submit --class org.apache.spark.sql.connect.service.SparkConnectServer
spark-internal`` as a ``studio.process.ChildProcess`` (a process group of its own, so stopping
it takes its Python UDF workers along). Its conf comes in a 0600 properties file in a 0700
folder (``state_dir/connect/<id>``), never on a command line: the service's base conf, then the
application's driver conf, then the user's, then the loopback binding and a free port. Its
token (``secrets.token_urlsafe``) reaches it only in the environment variable
``SPARK_CONNECT_AUTHENTICATE_TOKEN``, which Spark Connect reads; it is never on a command line, in
a log, or written to a file. A later run of the service that adopts the driver reads the token
back from the JVM's own environment (``/proc/<pid>/environ`` through psutil: readable by the
same user only, exactly who could read a 0600 file), so there is no copy of it at rest at all.

Ready means the port accepts and a real Connect call works with the token: the spark.app.id
asked through ``Config``, then ``select 1`` through ``ExecutePlan``, in a session released after.
The probe speaks gRPC with the few protobuf fields it needs encoded by hand, because importing
pyspark's Connect client would pull pandas and pyarrow into the service (about 120 MB).

Drivers outlive the service as session workers do: ``shutdown(keep=True)`` lets go of them and
leaves a record (``driver.json``, no secret in it) in each driver's folder; ``restore`` adopts
them in the next run by pid and create time, and the culler stops them when idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import re
import secrets
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import grpc  # type: ignore[import-untyped, unused-ignore]
import grpc.aio  # type: ignore[import-untyped, unused-ignore]
import psutil

from studio import files
from studio.config import Settings
from studio.errors import WorkerStartError
from studio.livy import sparkconf
from studio.livy.logs import LogFile
from studio.process import ChildProcess, describe_exit, descendants_of, group_members, memory_mb

if TYPE_CHECKING:
    from studio.livy.applications import Application

log = logging.getLogger("studio.livy.connect_drivers")

SERVER_CLASS = "org.apache.spark.sql.connect.service.SparkConnectServer"
TOKEN_VARIABLE = "SPARK_CONNECT_AUTHENTICATE_TOKEN"  # noqa: S105 - the name of the variable, not a token
SERVICE = "spark.connect.SparkConnectService"
RECORD_NAME = "driver.json"
# Spark Connect's own limit for one message (spark.connect.grpc.maxInboundMessageSize, 128 MiB); gRPC's
# Python default of 4 MiB would refuse a large Arrow batch or artifact chunk passing through.
MAX_MESSAGE_BYTES = 128 * 1024 * 1024 + 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
# Conf the studio decides for a shared driver: an application cannot move its binding off the loopback
# or give it a token of its own (the studio's token would then not open it).
OWN_KEYS = frozenset(
    {
        "spark.connect.grpc.binding.address",
        "spark.connect.grpc.binding.port",
        "spark.connect.authenticate.token",
        "spark.master",
    }
)
# The environment pyspark uses to switch spark-submit itself into Connect mode (see pyspark's local_server).
_CONNECT_CLIENT_VARIABLES = ("SPARK_REMOTE", "SPARK_LOCAL_REMOTE", "SPARK_CONNECT_MODE_ENABLED", "SPARK_API_MODE")

_UI_BOUND = re.compile(r"Bound SparkUI to \S+, and started at (https?://\S+)")
_UI_HOST = re.compile(r"Start Jetty (\S+):\d+ for SparkUI")
_UI_PORT = re.compile(r"Successfully started service 'SparkUI' on port (\d+)")
_BIND_FAILED = re.compile(r"BindException|Address already in use|Failed to bind")

_ids = itertools.count(1)

# The driver's log: Spark's layout, at the service's level for Spark drivers (STUDIO_SPARK_LOG_LEVEL), but
# always the lines that say where its UI and its Connect service listen. At INFO a Connect server logs
# several lines per query, which would fill the disk of a long-lived shared driver.
LOG4J_PROPERTIES = """\
rootLogger.level = {level}
rootLogger.appenderRef.stderr.ref = console
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{{yy/MM/dd HH:mm:ss}} %p %c{{1}}: %m%n%ex
logger.connect.name = org.apache.spark.sql.connect.service.SparkConnectServer
logger.connect.level = info
logger.ports.name = org.apache.spark.util.Utils
logger.ports.level = info
logger.jetty.name = org.apache.spark.ui.JettyUtils
logger.jetty.level = info
"""


def spark_submit() -> str:
    from pyspark.find_spark_home import _find_spark_home

    return os.path.join(_find_spark_home(), "bin", "spark-submit")


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now (the JVM binds it a moment later; a lost race is retried once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _quote(path: Path) -> str:
    text = str(path)
    return f'"{text}"' if " " in text else text


def _port_accepts(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# -- the few protobuf fields the probe needs (spark/connect/base.proto) -------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes | str) -> bytes:
    """A length-delimited field (string or message)."""
    data = payload.encode() if isinstance(payload, str) else payload
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """The top-level fields of a protobuf message: (number, value); ValueError when it is no message."""
    position = 0

    def varint() -> int:
        nonlocal position
        shift = result = 0
        while True:
            if position >= len(data) or shift > 63:
                raise ValueError("truncated varint")
            byte = data[position]
            position += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result
            shift += 7

    while position < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, varint()
        elif wire == 2:
            length = varint()
            if position + length > len(data):
                raise ValueError("truncated field")
            yield number, data[position : position + length]
            position += length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            yield number, data[position : position + size]
            position += size
        else:
            raise ValueError(f"unsupported wire type {wire}")


def config_get_request(session_id: str, user: str, keys: list[str]) -> bytes:
    """ConfigRequest{session_id, user_context{user_id}, operation{get{keys}}, client_type}."""
    get = b"".join(_field(1, key) for key in keys)
    return _field(1, session_id) + _field(2, _field(1, user)) + _field(3, _field(2, get)) + _field(4, "spark-studio")


def config_pairs(response: bytes) -> dict[str, str]:
    """The key-value pairs of a ConfigResponse (field 2: KeyValue{key=1, value=2})."""
    pairs: dict[str, str] = {}
    for number, value in _fields(response):
        if number == 2 and isinstance(value, bytes):
            parts = {n: v for n, v in _fields(value) if isinstance(v, bytes)}
            pairs[parts.get(1, b"").decode()] = parts.get(2, b"").decode()
    return pairs


def sql_request(session_id: str, user: str, query: str) -> bytes:
    """ExecutePlanRequest{session_id, user_context, plan{root: Relation{sql{query}}}, client_type}."""
    plan = _field(1, _field(10, _field(1, query)))
    return _field(1, session_id) + _field(2, _field(1, user)) + _field(3, plan) + _field(4, "spark-studio")


def release_session_request(session_id: str, user: str) -> bytes:
    return _field(1, session_id) + _field(2, _field(1, user)) + _field(3, "spark-studio")


ARROW_BATCH = 2  # ExecutePlanResponse.arrow_batch: the rows of the result


async def probe(channel: grpc.aio.Channel, token: str, user: str, run_query: bool, timeout: float = 60.0) -> str:
    """A real Connect call with the token: the driver's spark.app.id (Config), and with ``run_query``
    ``select 1`` to its end (ExecutePlan). The probe's session is released after. Raises
    grpc.aio.AioRpcError (or ValueError for an answer that is not Spark Connect's)."""
    session_id = str(uuid.uuid4())
    metadata = (("authorization", f"Bearer {token}"),)
    try:
        call = channel.unary_unary(f"/{SERVICE}/Config")
        answer = await call(config_get_request(session_id, user, ["spark.app.id"]), metadata=metadata, timeout=timeout)
        app_id = config_pairs(answer).get("spark.app.id", "")
        if run_query:
            rows = False
            stream = channel.unary_stream(f"/{SERVICE}/ExecutePlan")(sql_request(session_id, user, "select 1"), metadata=metadata, timeout=timeout)
            async for response in stream:  # ends without an error once the whole result is sent
                rows = rows or any(number == ARROW_BATCH for number, _ in _fields(response))
            if not rows:
                raise ValueError("select 1 ended without its row")
        return app_id
    finally:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.TimeoutError):
            release = channel.unary_unary(f"/{SERVICE}/ReleaseSession")
            await release(release_session_request(session_id, user), metadata=metadata, timeout=10)


# -- one driver ------------------------------------------------------------------------------


class ConnectDriver:
    """One Spark Connect server JVM of one (application, user)."""

    def __init__(self, settings: Settings, application_id: str, user: str, driver_id: str | None = None) -> None:
        self.settings = settings
        self.application_id = application_id
        self.user = user
        self.id = driver_id or f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{next(_ids)}"
        self.log = LogFile(settings.log_dir / f"connect-{self.id}.log")
        self.folder = settings.state_dir / "connect" / self.id
        self.port = 0
        self.shape = ""  # its application's driver shape when it started (a changed application restarts it once idle)
        self.conf: dict[str, str] = {}
        self.info: dict[str, Any] = {}
        self.sessions = 0
        self.calls = 0  # endpoint calls in flight: a driver in use through the endpoint is not idle
        self.idle_since = time.monotonic()
        self.started_at = 0.0
        self.process: ChildProcess | None = None
        self.adopted = False
        self.stopping = False
        self._token = ""
        self._channel: grpc.aio.Channel | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.exited: asyncio.Future[int] = loop.create_future()

    def __repr__(self) -> str:  # never the token
        return f"<ConnectDriver {self.id} application={self.application_id} user={self.user} port={self.port}>"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def client_url(self) -> str:
        """How a lean worker reaches it (the token comes separately, never in a URL)."""
        return f"sc://localhost:{self.port}/;user_id={self.user}"

    def token(self) -> str:
        """For the lean workers (over their 0600 socket) and the endpoint's forwarded calls only."""
        return self._token

    def is_ready(self) -> bool:
        return self.ready.done() and not self.ready.cancelled() and self.ready.exception() is None and not self.exited.done()

    def hold(self) -> None:
        """A session (or a warm lean worker) runs on it."""
        self.sessions += 1

    def let_go(self) -> None:
        self.sessions = max(0, self.sessions - 1)
        if self.sessions == 0:
            self.idle_since = time.monotonic()

    @contextlib.contextmanager
    def in_use(self) -> Iterator[None]:
        """An endpoint call to it is under way."""
        self.calls += 1
        try:
            yield
        finally:
            self.calls -= 1
            self.idle_since = time.monotonic()

    def idle_seconds(self) -> float:
        """How long it has had no session and no call (0 while it has either)."""
        if self.sessions or self.calls:
            return 0.0
        return time.monotonic() - self.idle_since

    def channel(self) -> grpc.aio.Channel:
        """A gRPC channel to it (one per driver, made in the running loop)."""
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}", options=CHANNEL_OPTIONS)
        return self._channel

    def record(self) -> dict[str, Any]:
        """What ``driver.json`` keeps for a later run of the service: no secret (see the module)."""
        record = self.process.record if self.process else None
        return {
            "id": self.id,
            "application_id": self.application_id,
            "user": self.user,
            "port": self.port,
            "shape": self.shape,
            "process": record.to_json() if record else None,
            "info": self.info,
            "started_at": time.time() - (time.monotonic() - self.started_at),
        }

    def _write_record(self) -> None:
        with contextlib.suppress(OSError):
            files.write_private_json(self.folder / RECORD_NAME, self.record())

    # -- start -----------------------------------------------------------------------------

    def command(self, app_name: str) -> list[str]:
        properties = self.folder / "spark.properties"
        return [
            spark_submit(),
            "--master",
            self.settings.master,
            "--class",
            SERVER_CLASS,
            "--name",
            app_name,
            "--properties-file",
            str(properties),
            "--load-spark-defaults",
            "spark-internal",
        ]

    def environment(self) -> dict[str, str]:
        env = {**sparkconf.child_env(self.settings), **sparkconf.user_env(self.user)}
        for name in _CONNECT_CLIENT_VARIABLES:
            env.pop(name, None)
        env["SPARK_CONNECT_MODE"] = "0"  # spark-submit itself stays a classic launcher (start-connect-server.sh does so)
        env[TOKEN_VARIABLE] = self._token
        return env

    async def start(self, conf: dict[str, str], app_name: str = "") -> None:
        """Spawn the JVM and return at once; ``wait_ready`` tells when it answers."""
        self._token = secrets.token_urlsafe(32)
        self.port = free_port()
        self.conf = {k: v for k, v in conf.items() if k not in OWN_KEYS}
        self.conf["spark.connect.grpc.binding.address"] = "127.0.0.1"
        self.conf["spark.connect.grpc.binding.port"] = str(self.port)
        files.private_dir(self.folder.parent)
        files.private_dir(self.folder)
        self.settings.log_dir.mkdir(parents=True, exist_ok=True)
        log_config = self.folder / "log4j2.properties"
        fd = os.open(log_config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(LOG4J_PROPERTIES.format(level=self.settings.spark_log_level.lower()))
        option = f"-Dlog4j2.configurationFile={_quote(log_config)}"
        self.conf = sparkconf.overlay(self.conf, {"spark.driver.extraJavaOptions": option})
        sparkconf.write_properties(self.folder / "spark.properties", self.conf)
        command = self.command(app_name or f"spark-studio-shared-{self.user}")
        self.log.append(f"starting a shared Spark Connect driver for {self.user} on 127.0.0.1:{self.port}", source="StudioConnect")
        self.process = ChildProcess(
            command,
            name=f"connect driver {self.id}",
            cwd=self.folder,
            env=self.environment(),
            output=self.log.path,
            stop_timeout=self.settings.stop_timeout,
        )
        try:
            self.process.start()
        except OSError as exc:
            message = f"The shared driver could not be started: {exc}"
            self._fail(message)
            self.exited.set_result(127)
            raise WorkerStartError(message) from None
        self.started_at = time.monotonic()
        self.idle_since = self.started_at
        self._write_record()
        self._tasks = [
            asyncio.create_task(self._watch_exit(), name=f"connect-{self.id}-exit"),
            asyncio.create_task(self._become_ready(run_query=True), name=f"connect-{self.id}-ready"),
        ]

    @classmethod
    def adopt(cls, settings: Settings, record: dict[str, Any]) -> "ConnectDriver | None":
        """The driver a previous run of the service left, if it still runs (pid and create time) and its
        token can be read back from its environment; None otherwise. It is probed again before use."""
        process = ChildProcess.adopt(record.get("process"), name=f"connect driver {record.get('id')}", stop_timeout=settings.stop_timeout)
        if process is None:
            return None
        token = _token_of(process)
        if not token:
            log.warning("shared driver %s (pid %s): its token cannot be read back; stopping it", record.get("id"), process.pid)
            asyncio.get_running_loop().create_task(process.stop())
            return None
        driver = cls(settings, str(record["application_id"]), str(record["user"]), str(record["id"]))
        driver.process = process
        driver.adopted = True
        driver.port = int(record["port"])
        driver.shape = str(record.get("shape") or "")
        driver._token = token
        started_at = float(record.get("started_at") or time.time())
        driver.started_at = time.monotonic() - max(0.0, time.time() - started_at)
        driver.idle_since = time.monotonic()  # a full idle period from the restart: its sessions may still come back
        driver._tasks = [
            asyncio.create_task(driver._watch_exit(), name=f"connect-{driver.id}-exit"),
            asyncio.create_task(driver._become_ready(run_query=False), name=f"connect-{driver.id}-ready"),
        ]
        return driver

    async def _watch_exit(self) -> None:
        assert self.process is not None
        code = await self.process.wait()
        if not self.exited.done():
            self.exited.set_result(code)
        if not self.stopping:
            described = describe_exit(code)
            self.log.append(f"the shared driver {described}", source="StudioConnect")
            log.warning("shared driver %s of %s %s", self.id, self.user, described)
        self._fail(f"The shared driver {describe_exit(code)} before it was ready; see its log {self.log.path.name}.")

    async def _become_ready(self, run_query: bool) -> None:
        """Until ready: the port accepts, then the probe (retried while the server finishes its start)."""
        while not self.exited.done() and not self.stopping:
            if not await asyncio.to_thread(_port_accepts, self.port):
                await asyncio.sleep(0.25)
                continue
            try:
                app_id = await probe(self.channel(), self._token, self.user, run_query)
            except (grpc.aio.AioRpcError, ValueError) as exc:
                if isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    # Not ours: another server took the port before this JVM could.
                    self._fail(f"The shared driver's port {self.port} answers with another token.")
                    return
                log.debug("shared driver %s not ready yet: %s", self.id, exc)
                await asyncio.sleep(0.5)
                continue
            self.info = {"app_id": app_id or None, "spark_ui_url": self._ui_url(), "jvm_pid": self._jvm_pid()}
            self._write_record()
            if not self.ready.done():
                self.ready.set_result(self.info)
            if self.adopted:
                self.log.append(f"shared driver answers the restarted service ({self.info['app_id']})", source="StudioConnect")
            else:
                ready_in = time.monotonic() - self.started_at
                self.log.append(f"shared driver ready ({self.info['app_id']}) after {ready_in:.1f}s", source="StudioConnect")
            return

    def _fail(self, message: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(WorkerStartError(message))
            self.ready.exception()  # retrieved here: waiters still get it, asyncio does not warn

    def _ui_url(self) -> str | None:
        try:
            text = self.log.path.read_text(errors="replace")
        except OSError:
            return None
        if found := _UI_BOUND.search(text):
            return found.group(1)
        ports = _UI_PORT.findall(text)
        if not ports:
            return None
        hosts = _UI_HOST.findall(text)
        wildcard = "0.0.0.0"  # noqa: S104 - an address read from the log, never bound here
        host = hosts[-1] if hosts and hosts[-1] not in (wildcard, "") else self.settings.spark_local_ip
        return f"http://{host}:{ports[-1]}"

    def _jvm_pid(self) -> int | None:
        """spark-submit execs the JVM, so it is the child itself; else the java of its group."""
        if self.process is None or self.process.pid is None:
            return None
        candidates = [self.process.pid, *(p.pid for p in group_members(self.process.pgid or self.process.pid))]
        for pid in candidates:
            with contextlib.suppress(psutil.Error):
                if psutil.Process(pid).name() == "java":
                    return pid
        return self.process.pid

    async def wait_ready(self, timeout: float) -> dict[str, Any]:
        """Wait until it answers; on timeout it is killed and WorkerStartError raised."""
        try:
            return await asyncio.wait_for(asyncio.shield(self.ready), timeout)
        except asyncio.TimeoutError:
            message = f"The shared driver {self.id} did not answer within {timeout:.0f}s; see its log {self.log.path.name}."
            self.log.append(message, source="StudioConnect")
            self._fail(message)
            await self.stop()
            raise WorkerStartError(message) from None

    def bind_failed(self) -> bool:
        """Its start failed because another process took its port first."""
        try:
            return bool(_BIND_FAILED.search(self.log.path.read_text(errors="replace")))
        except OSError:
            return False

    # -- measure and stop --------------------------------------------------------------------

    def memory_mb(self) -> float:
        """PSS (else RSS) of the JVM and everything it started (Python UDF workers), in MB."""
        if self.process is None or self.process.pid is None or self.exited.done():
            return 0.0
        members = {p.pid: p for p in group_members(self.process.pgid or self.process.pid)}
        members.update({p.pid: p for p in descendants_of(self.process.pid)})
        return memory_mb(members.values())

    async def stop(self) -> None:
        """SIGTERM to its group (the JVM ends its Spark application), SIGKILL if it hangs; its folder goes."""
        self.stopping = True
        self._fail(f"The shared driver {self.id} was stopped.")
        if self.process is not None:
            await self.process.stop()
            if not self.exited.done():
                self.exited.set_result(self.process.poll() or 0)
        await self._close()
        shutil.rmtree(self.folder, ignore_errors=True)

    async def detach(self) -> None:
        """Let go of it and leave it running; its record stays for ``adopt``."""
        self._write_record()
        await self._close()

    async def _close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._channel is not None:
            channel, self._channel = self._channel, None
            with contextlib.suppress(Exception):
                await channel.close()


def _token_of(process: ChildProcess) -> str:
    """The token in an adopted JVM's environment (same user only; see the module)."""
    try:
        return str(psutil.Process(process.pid).environ().get(TOKEN_VARIABLE, ""))
    except (psutil.Error, OSError):
        return ""


# -- all of them -----------------------------------------------------------------------------


class ConnectDrivers:
    """The shared drivers of the service, by (application id, user)."""

    def __init__(self, settings: Settings, base_conf: Callable[[], dict[str, str]], store: Any = None) -> None:
        self.settings = settings
        self.base_conf = base_conf
        self.store = store  # not used: records live in each driver's own 0700 folder (no migration needed)
        self._drivers: dict[tuple[str, str], ConnectDriver] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self.on_change: Callable[[ConnectDriver, str], None] | None = None  # (driver, "started"|"ready"|"stopped")

    @property
    def root(self) -> Path:
        return self.settings.state_dir / "connect"

    def start_timeout(self) -> float:
        return float(getattr(self.settings, "connect_start_timeout", self.settings.worker_start_timeout))

    def get(self, app_id: str, user: str) -> ConnectDriver | None:
        driver = self._drivers.get((app_id, user))
        return driver if driver is not None and not driver.exited.done() and not driver.stopping else None

    def all(self) -> list[ConnectDriver]:
        return [d for d in self._drivers.values() if not d.exited.done() and not d.stopping]

    def driver_conf(self, app: "Application", user: str) -> dict[str, str]:
        return sparkconf.overlay(self.base_conf(), app.driver_conf(), sparkconf.user_conf(user))

    async def ensure(self, app: "Application", user: str) -> ConnectDriver:
        """The running driver of ``user`` in ``app``, or a new one; returns once it answers. Raises
        WorkerStartError when it cannot start (a driver that failed is stopped)."""
        key = (app.id, user)
        lock = self._locks.setdefault(key, asyncio.Lock())
        for attempt in (1, 2):
            async with lock:
                driver = self.get(app.id, user)
                if driver is not None and driver.ready.done() and not driver.is_ready():
                    await self._stop(driver)  # failed but still there (its port answered with another token)
                    driver = None
                if driver is not None and driver.shape != app.shape() and not driver.sessions and not driver.calls:
                    log.info("shared driver %s of %s: its application changed; starting it again", driver.id, user)
                    await self._stop(driver)
                    driver = None
                if driver is None:
                    driver = await self._start(app, user)
            try:
                await driver.wait_ready(self.start_timeout())
                return driver
            except WorkerStartError:
                retry = attempt == 1 and driver.bind_failed()  # another process took its port before the JVM bound it
                await self._stop(driver)
                if not retry:
                    raise
        raise AssertionError("unreachable")

    async def _start(self, app: "Application", user: str) -> ConnectDriver:
        driver = ConnectDriver(self.settings, app.id, user)
        driver.shape = app.shape()
        self._drivers[(app.id, user)] = driver
        driver.exited.add_done_callback(lambda _: self._forget(driver))
        await driver.start(self.driver_conf(app, user), app_name=f"spark-studio-shared-{app.name}-{user}")
        self._notify(driver, "started")
        driver.ready.add_done_callback(lambda f: self._notify(driver, "ready") if not f.exception() else None)
        return driver

    def _forget(self, driver: ConnectDriver) -> None:
        key = (driver.application_id, driver.user)
        if self._drivers.get(key) is driver:
            del self._drivers[key]
            self._notify(driver, "stopped")

    def _notify(self, driver: ConnectDriver, what: str) -> None:
        if self.on_change is not None:
            try:
                self.on_change(driver, what)
            except Exception:  # noqa: BLE001 - a listener must not break the drivers
                log.exception("a shared-driver listener failed")

    async def _stop(self, driver: ConnectDriver) -> None:
        await driver.stop()
        self._forget(driver)

    async def stop_idle(self, idle_minutes_of: Callable[[str], float | None]) -> None:
        """Stop each driver that has had no session and no endpoint call for its application's idle
        minutes (None: never). A driver still starting is left alone."""
        for driver in list(self._drivers.values()):
            if not driver.is_ready() or driver.sessions or driver.calls:
                continue
            minutes = idle_minutes_of(driver.application_id)
            if minutes is None or driver.idle_seconds() < minutes * 60:
                continue
            log.info("stopping shared driver %s of %s: idle for %.1f minute(s)", driver.id, driver.user, driver.idle_seconds() / 60)
            driver.log.append(f"stopped after {minutes:g} minute(s) without a session", source="StudioConnect")
            await self._stop(driver)

    async def stop_application(self, app_id: str) -> None:
        drivers = [d for (a, _), d in list(self._drivers.items()) if a == app_id]
        await asyncio.gather(*(self._stop(d) for d in drivers), return_exceptions=True)

    async def shutdown(self, keep: bool) -> None:
        """keep=True: let go of every driver and leave it running for the next run (``restore``);
        keep=False: stop them all."""
        drivers = list(self._drivers.values())
        if keep:
            ready = [d for d in drivers if d.is_ready()]
            starting = [d for d in drivers if not d.is_ready()]  # half-started: nothing to come back to
            await asyncio.gather(*(d.detach() for d in ready), return_exceptions=True)
            await asyncio.gather(*(self._stop(d) for d in starting), return_exceptions=True)
            if ready:
                log.info("leaving %d shared driver(s) running for the next start", len(ready))
        else:
            await asyncio.gather(*(self._stop(d) for d in drivers), return_exceptions=True)
        self._drivers.clear()

    async def restore(self) -> None:
        """Adopt the drivers an earlier run left running; remove what is left of the others."""
        if not self.root.is_dir():
            return
        for folder in sorted(self.root.iterdir()):
            try:
                record = json.loads((folder / RECORD_NAME).read_text())
            except (OSError, ValueError):
                record = None
            driver = ConnectDriver.adopt(self.settings, record) if isinstance(record, dict) else None
            key = (str(record.get("application_id")), str(record.get("user"))) if isinstance(record, dict) else None
            if driver is None or key is None or key in self._drivers:
                if driver is not None:
                    await driver.stop()
                shutil.rmtree(folder, ignore_errors=True)
                continue
            self._drivers[key] = driver
            driver.exited.add_done_callback(lambda _, d=driver: self._forget(d))  # type: ignore[misc]
            log.info("adopted shared driver %s of %s (pid %s)", driver.id, driver.user, driver.pid)
        # Each one answers again, or it is stopped: a driver that went wrong while no service watched is no use.
        adopted = list(self._drivers.values())
        results = await asyncio.gather(*(d.wait_ready(30.0) for d in adopted), return_exceptions=True)
        for driver, result in zip(adopted, results):
            if isinstance(result, BaseException):
                log.warning("adopted shared driver %s did not answer (%s); stopping it", driver.id, result)
                await self._stop(driver)
