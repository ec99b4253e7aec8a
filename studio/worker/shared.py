"""The worker's shared mode: a Spark Connect session on its user's shared driver.

In an application with ``driverMode`` SHARED, one Spark Connect server JVM per (application, user)
runs the Spark work, and each Livy session is a lean worker holding a Connect session on it. The
start message names the server (``connect_url``, localhost, without the token) and brings its
token (``connect_token``) over the worker's 0600 socket only: the token is never logged, never in
``os.environ`` (which the user's code and its children inherit), and never in an error it reports.

What differs from a dedicated driver, and how the worker keeps Livy's behaviour:

* ``sc`` is a ``SharedContext``: EMR's package functions work, anything else of the SparkContext
  raises ``SharedDriverError`` naming the mode and the dedicated alternative;
* a statement's operations carry the tag ``studio-statement-N``, and cancel interrupts that tag,
  which reaches only this session's operations (the server scopes interrupts to a session);
* progress comes from the server's execution progress (``registerProgressHandler``);
* ``df.toJSON()`` gives strings again, as Livy's clients (sparkmagic, pylivy) read them.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Callable
from urllib.parse import urlparse

SHARED_MODE_HELP = (
    "Use the DataFrame API through `spark`, or start the session in an application with driverMode "
    "DEDICATED for sc and RDDs."
)


class SharedDriverError(NotImplementedError):
    """What a shared-driver session cannot do: it has no SparkContext and no RDDs."""


class SharedDriverAttributeError(AttributeError):
    """``spark.sparkContext``: an AttributeError still (``hasattr`` answers False), in our words."""


def no_context_message(what: str = "sc (the SparkContext)") -> str:
    return (
        f"{what} and the RDD API do not exist in a shared-driver session (Spark Connect; application "
        f"driverMode SHARED). {SHARED_MODE_HELP}"
    )


class SharedContext:
    """``sc`` of a shared-driver session: EMR's notebook-scoped package API, nothing else."""

    def __init__(self, packages: Any) -> None:
        self._packages = packages

    def install_pypi_package(self, package: Any, repo_url: Any = None) -> None:
        self._packages.install_pypi_package(package, repo_url)

    def uninstall_package(self, package: Any) -> None:
        self._packages.uninstall_package(package)

    def list_packages(self) -> None:
        self._packages.list_packages()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # protocols and introspection (repr, completion) look such names up
            raise AttributeError(name)
        raise SharedDriverError(f"sc.{name}: {no_context_message()}")

    def __repr__(self) -> str:
        return "<SharedContext: no SparkContext in a shared-driver session; sc.install_pypi_package works>"


def remote_url(connect_url: str, token: str | None) -> str:
    """The Connect URL with the token among its parameters (``sc://localhost:P/;user_id=U;token=T``).
    A token without TLS is sent by pyspark only to ``localhost`` (local channel credentials)."""
    parsed = urlparse(connect_url)
    if parsed.scheme != "sc" or parsed.hostname != "localhost":
        raise ValueError("connect_url must be sc://localhost:PORT/... (a token is only sent to localhost without TLS)")
    if not token:
        return connect_url
    base = connect_url if "/" in connect_url[len("sc://") :] else connect_url + "/"
    return f"{base};token={token}"


def connect(config: dict[str, Any]) -> Any:
    """The Connect session of the start message's server; errors never carry the token."""
    from pyspark.sql import SparkSession
    from pyspark.sql.connect.client.retries import DefaultPolicy

    token = str(config.get("connect_token") or "")
    try:
        spark = SparkSession.builder.remote(remote_url(str(config["connect_url"]), token)).getOrCreate()
    except Exception as exc:
        text = f"{type(exc).__name__}: {exc}"
        raise RuntimeError(
            f"could not open a Spark Connect session on the shared driver: {text.replace(token, '***') if token else text}"
        ) from None
    # The default retries wait up to 10 minutes for a server that went away; a statement should
    # fail within seconds instead, with the explanation from ``explain_failure``.
    spark.client.set_retry_policies([DefaultPolicy(max_retries=4, max_backoff=2000)])
    return spark


def apply_conf(spark: Any, conf: dict[str, str], log: Callable[[str], None]) -> None:
    """A cold session's own runtime conf; keys the driver fixed at its start are named, not set."""
    static = []
    for key, value in conf.items():
        if spark.conf.isModifiable(key):
            spark.conf.set(key, value)
        else:
            static.append(key)
    if static:
        log(f"ignored in a shared-driver session (fixed when its driver started): {', '.join(sorted(static))}")


def warm_up(spark: Any, hurry: threading.Event, budget: float) -> None:
    """A few small queries, so the session's first statement finds the RPC path warm."""
    deadline = time.monotonic() + min(budget, 5.0)
    for _ in range(3):
        if hurry.is_set() or time.monotonic() > deadline:
            break
        spark.range(1).count()
        spark.sql("select 1").collect()


def statement_tag(statement_id: int) -> str:
    return f"studio-statement-{statement_id}"


def install_readable_errors() -> None:
    """``spark.sparkContext``, ``df.rdd`` and ``df.toJSON()`` in this process's Connect classes."""
    from pyspark.sql.connect.dataframe import DataFrame
    from pyspark.sql.connect.session import SparkSession

    original_getattr = SparkSession.__getattr__

    def no_context(self: Any, name: str) -> Any:
        # Connect's session answers sparkContext from __getattr__ (a property raising AttributeError
        # would end up there too), so that is where our message goes.
        if name == "sparkContext":
            raise SharedDriverAttributeError(f"spark.sparkContext: {no_context_message()}")
        return original_getattr(self, name)

    def no_rdd(self: Any) -> Any:
        raise SharedDriverError(f"df.rdd: {no_context_message('RDDs (df.rdd)')}")

    def to_json(self: Any, use_unicode: bool = True) -> JsonLines:
        from pyspark.sql import functions as F

        return JsonLines(self.select(F.to_json(F.struct(F.col("*"))).alias("value")))

    # Classes of this process's pyspark only (the worker holds one Connect session); setattr, as
    # mypy refuses assignments to methods.
    setattr(SparkSession, "__getattr__", no_context)
    setattr(DataFrame, "rdd", property(no_rdd))
    setattr(DataFrame, "toJSON", to_json)


class JsonLines:
    """``df.toJSON()`` as Livy's clients use it: ``.take(n)``, ``.collect()``, ``.sample(False, f)``
    give JSON strings, as the RDD of a dedicated driver does (sparkmagic's %%sql, pylivy's download).
    Anything else is the DataFrame of one ``value`` column that Spark Connect's toJSON returns."""

    def __init__(self, frame: Any) -> None:
        self.frame = frame

    def take(self, num: int) -> list[str]:
        return [row[0] for row in self.frame.take(num)]

    def collect(self) -> list[str]:
        return [row[0] for row in self.frame.collect()]

    def first(self) -> str | None:
        rows = self.take(1)
        return rows[0] if rows else None

    def sample(self, withReplacement: bool, fraction: float, seed: int | None = None) -> JsonLines:  # RDD.sample's parameter names
        return JsonLines(self.frame.sample(withReplacement, fraction, seed))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.frame, name)

    def __repr__(self) -> str:
        return repr(self.frame)


class ConnectProgress:
    """A statement's progress from the Connect server's execution progress, as ``progress`` messages.

    The handler runs on the thread that waits for the query's results (the main thread); each
    operation of the statement is reported as one "job" with its stages' tasks."""

    def __init__(self, spark: Any, send: Callable[[dict[str, Any]], None], interval: float = 0.25) -> None:
        self.send = send
        self.interval = interval
        self._current: int | None = None
        self._operations: dict[str, dict[str, Any]] = {}
        self._last_sent = 0.0
        spark.registerProgressHandler(self._on_progress)

    def begin(self, statement_id: int) -> None:
        self._operations = {}
        self._last_sent = 0.0
        self._current = statement_id

    def end(self) -> None:
        self._current = None

    def _on_progress(self, stages: Any, inflight_tasks: int, operation_id: str | None, done: bool) -> None:
        statement_id = self._current
        if statement_id is None:
            return
        stages = list(stages or [])
        total = sum(stage.num_tasks for stage in stages)
        completed = sum(stage.num_completed_tasks for stage in stages)
        key = operation_id or "?"
        job = self._operations.setdefault(key, {"jobId": len(self._operations), "stage": ""})
        running = [stage for stage in stages if not stage.done]
        job.update(
            {
                "status": "SUCCEEDED" if done else "RUNNING",
                "stage": f"stage {running[0].stage_id}" if running else job["stage"],
                "numTasks": total,
                "numCompletedTasks": completed,
                "numActiveTasks": 0 if done else inflight_tasks,
                "numFailedTasks": 0,
            }
        )
        now = time.monotonic()
        if not done and now - self._last_sent < self.interval:
            return
        self._last_sent = now
        jobs = list(self._operations.values())
        all_tasks = sum(j["numTasks"] for j in jobs)
        progress = sum(j["numCompletedTasks"] for j in jobs) / all_tasks if all_tasks else 0.0
        self.send({"op": "progress", "id": statement_id, "progress": progress, "jobs": [dict(j) for j in jobs]})


_UNREACHABLE = ("UNAVAILABLE", "RetriesExceeded", "failed to connect", "Connection refused", "Socket closed")


def explain_failure(output: dict[str, Any], connect_url: str) -> dict[str, Any]:
    """A statement that failed because the shared driver is gone says so, in one clear line."""
    if output.get("status") != "error":
        return output
    text = f"{output.get('ename')} {output.get('evalue')}"
    if not any(marker in text for marker in _UNREACHABLE):
        return output
    port = urlparse(connect_url).port
    try:
        with socket.create_connection(("127.0.0.1", port or 0), timeout=1.0):
            return output  # it answers: the failure was something else
    except OSError:
        pass
    note = (
        f"The session's shared Spark driver (Spark Connect server on localhost:{port}) cannot be reached: it "
        "stopped or was restarted, and this session's state (temp views, conf, cached data) went with it. "
        "Start a new session."
    )
    return {**output, "evalue": f"{note}\n{output.get('evalue')}", "traceback": [*output.get("traceback", []), note + "\n"]}
