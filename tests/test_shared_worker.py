"""The session worker's shared mode: Connect sessions of two workers on one real Spark Connect server.

One SparkSharedDriver JVM for the module (the per-user shared driver), two lean workers driven
through ``WorkerProcess`` as the service drives them. What the shared mode must keep: sessions that
cannot see each other's temp views, SQL conf, UDFs and packages; a cancel that stops only its own
session's statement; Livy's outputs; and a clear error where a dedicated driver's API is missing.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from helpers import build_wheel
from studio.config import Settings
from studio.livy.connect_drivers import ConnectDriver
from studio.livy.workers import WorkerProcess, WorkerSpec

T = TypeVar("T")


class Loop:
    """An event loop on a thread of its own: WorkerProcess is asyncio, these tests are not."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 300.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class SharedDriver:
    """The user's shared driver as the service starts one (studio.livy.connect_drivers)."""

    def __init__(self, loop: Loop, settings: Settings) -> None:
        self.loop = loop
        self.driver = loop.run(self._start(settings), timeout=600)
        self.token = self.driver.token()
        self.client_url = self.driver.client_url()
        self.info: dict[str, Any] = dict(self.driver.info)

    @staticmethod
    async def _start(settings: Settings) -> ConnectDriver:
        driver = ConnectDriver(settings, "default", "alice")
        await driver.start({"spark.ui.enabled": "false", "spark.pyspark.python": sys.executable}, "shared-driver-test")
        await driver.wait_ready(480)
        return driver

    def stop(self) -> None:
        self.loop.run(self.driver.stop())


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    state = tmp_path_factory.mktemp("shared-worker-state")
    return Settings(state_dir=state, cache_dir=state / "cache", pool_size=0, cancel_timeout=30.0, stop_timeout=10.0)


@pytest.fixture(scope="module")
def server(loop: Loop, settings: Settings) -> Iterator[SharedDriver]:
    started = SharedDriver(loop, settings)
    yield started
    started.stop()


@pytest.fixture(scope="module")
def loop() -> Iterator[Loop]:
    running = Loop()
    yield running
    running.close()


class Session:
    """One worker in shared mode, with what it reported."""

    def __init__(self, loop: Loop, worker: WorkerProcess) -> None:
        self.loop = loop
        self.worker = worker
        self.progress: list[dict[str, Any]] = []
        worker.on_progress = self.progress.append
        self.next_id = 0

    def submit(self, code: str, kind: str = "pyspark") -> tuple[int, Any]:
        self.next_id += 1
        statement_id = self.next_id
        future = asyncio.run_coroutine_threadsafe(self.worker.execute(statement_id, code, kind, 1000, "alice"), self.loop.loop)
        return statement_id, future

    def run(self, code: str, kind: str = "pyspark", timeout: float = 180.0) -> dict[str, Any]:
        statement_id, future = self.submit(code, kind)
        output: dict[str, Any] = future.result(timeout)
        self.worker.ack(statement_id)
        return output

    def text(self, code: str) -> str:
        output = self.run(code)
        assert output["status"] == "ok", output
        return str(output["data"]["text/plain"])


@pytest.fixture(scope="module")
def sessions(server: SharedDriver, loop: "Loop", settings: Settings) -> Iterator[tuple[Session, Session]]:
    shared = {
        "mode": "shared",
        "connect_url": server.client_url,
        "connect_token": server.token,
        "spark_ui_url": server.info["spark_ui_url"],
        "app_id": server.info["app_id"],
    }

    async def start(warm: bool) -> WorkerProcess:
        spec = WorkerSpec(conf={}, app_name="shared", warmup=warm, user="alice", application_id="default", shared=shared)
        worker = WorkerProcess(settings, spec)
        await worker.start()
        await worker.wait_ready(240)
        return worker

    first = loop.run(start(True))
    second = loop.run(start(False))
    yield Session(loop, first), Session(loop, second)
    for worker in (first, second):
        loop.run(worker.stop())
        assert worker.exited.done()
        assert server.token not in worker.log.path.read_text(), "the token is in the session log"


def test_ready_message_names_the_shared_driver(sessions: tuple[Session, Session], server: SharedDriver) -> None:
    for session in sessions:
        ready = session.worker.info
        assert ready["mode"] == "shared"
        assert ready["jvm_pid"] is None
        assert ready["app_id"] == server.info["app_id"] and ready["app_id"]
        assert ready["spark_ui_url"] == server.info["spark_ui_url"]
        assert ready["spark_version"].startswith("4.")
    a, _ = sessions
    assert "SPARK_CONNECT_AUTHENTICATE_TOKEN" not in a.text("import os; print(sorted(os.environ))")
    assert a.text("print(type(spark).__module__)") == "pyspark.sql.connect.session"


def test_activate_sets_runtime_conf_and_refuses_static_keys(sessions: tuple[Session, Session]) -> None:
    a, b = sessions
    refused = b.loop.run(b.worker.activate({"spark.executor.memory": "2g", "spark.sql.ansi.enabled": "false"}, 41, "alice"))
    assert refused["ok"] is False and refused["static"] == ["spark.executor.memory"], refused
    assert b.text("print(spark.conf.get('spark.sql.ansi.enabled'))") == "true"  # nothing of a refused activate is set
    activated = b.loop.run(b.worker.activate({"spark.sql.ansi.enabled": "false"}, 42, "alice"))
    assert activated["ok"] is True and not activated.get("identity_error"), activated
    assert b.text("print(spark.conf.get('spark.sql.ansi.enabled'))") == "false"
    assert a.text("print(spark.conf.get('spark.sql.ansi.enabled'))") == "true"


def test_sessions_do_not_see_each_others_state(sessions: tuple[Session, Session]) -> None:
    a, b = sessions
    a.text(
        "spark.range(3).createOrReplaceTempView('only_in_a')\n"
        "spark.conf.set('spark.sql.shuffle.partitions', '7')\n"
        "spark.udf.register('plus_one', lambda x: x + 1, 'int')"
    )
    assert a.text("print(spark.sql('select count(*) from only_in_a').first()[0], spark.sql('select plus_one(1)').first()[0])") == "3 2"
    assert a.text("print(spark.conf.get('spark.sql.shuffle.partitions'))") == "7"

    missing = b.run("spark.sql('select * from only_in_a').collect()")
    assert missing["status"] == "error" and "only_in_a" in missing["evalue"], missing
    assert b.text("print(spark.conf.get('spark.sql.shuffle.partitions'))") != "7"
    no_udf = b.run("spark.sql('select plus_one(1)').collect()")
    assert no_udf["status"] == "error" and "plus_one" in no_udf["evalue"], no_udf


def test_sc_and_rdds_say_what_to_do_instead(sessions: tuple[Session, Session]) -> None:
    a, _ = sessions
    for code, ename in (
        ("sc.parallelize([1, 2])", "SharedDriverError"),
        ("spark.sparkContext", "SharedDriverAttributeError"),
        ("spark.range(2).rdd", "SharedDriverError"),
    ):
        output = a.run(code)
        assert output["status"] == "error", output
        assert output["ename"] == ename, output
        assert "driverMode SHARED" in output["evalue"] and "DEDICATED" in output["evalue"], output
    assert a.text("print(hasattr(spark, 'sparkContext'), callable(sc.install_pypi_package))") == "False True"


def test_livy_outputs_work_on_a_connect_session(sessions: tuple[Session, Session]) -> None:
    a, _ = sessions
    sql = a.run("select 1 as one, 'x' as letter", kind="sql")
    assert sql["status"] == "ok", sql
    assert sql["data"]["application/json"]["data"] == [[1, "x"]]
    # sparkmagic's %%sql and pylivy read toJSON() lines as strings, as from a dedicated driver's RDD
    lines = a.text(
        "import sys\nfor row in spark.sql('select 1 as one').toJSON(use_unicode=(sys.version_info.major > 2)).take(5): print(row)"
    )
    assert lines == '{"one":1}'
    assert a.text("for row in spark.range(2).toJSON().sample(False, 1.0).collect(): print(row)") == '{"id":0}\n{"id":1}'
    table = a.run("rows = spark.range(2).collect()\n%table rows")
    assert table["status"] == "ok" and table["data"]["application/vnd.livy.table.v1+json"]["data"] == [[0], [1]], table
    exported = a.run("__studio__.export(spark.range(5), max_rows=3)")
    assert exported["status"] == "ok", exported
    assert exported["data"]["application/vnd.studio.arrow+json"]["rows"] == 3
    assert a.text("print(spark.range(4).toPandas()['id'].sum())") == "6"
    sent = (  # %%send_to_spark -t df: Arrow from the kernel becomes a DataFrame of the session
        "import base64, pyarrow as pa\n"
        "table = pa.table({'a': [1, 2]})\n"
        "sink = pa.BufferOutputStream()\n"
        "with pa.ipc.new_stream(sink, table.schema) as writer: writer.write_table(table)\n"
        "print(__studio__.import_arrow(base64.b64encode(sink.getvalue().to_pybytes()).decode()).count())"
    )
    assert a.text(sent) == "2"


def test_cancel_stops_only_its_own_sessions_statement(sessions: tuple[Session, Session]) -> None:
    a, b = sessions
    sleep = "spark.range(1).selectExpr(\"reflect('java.lang.Thread', 'sleep', bigint({ms}))\").collect()"
    long_id, long_run = a.submit(sleep.format(ms=120_000))
    time.sleep(3)  # both running on the driver's two task slots
    other_id, other_run = b.submit(sleep.format(ms=8_000) + "\nprint('finished')")
    time.sleep(2)
    cancelled_at = time.monotonic()
    a.worker.cancel(long_id)
    cancelled = long_run.result(60)
    a.worker.ack(long_id)
    assert cancelled["status"] == "error", cancelled
    assert time.monotonic() - cancelled_at < 20
    finished = other_run.result(120)
    b.worker.ack(other_id)
    assert finished["status"] == "ok" and finished["data"]["text/plain"] == "finished", finished
    assert any(message["id"] == other_id for message in b.progress), "no progress from the Connect server"
    assert a.text("print(spark.range(3).count())") == "3"  # the cancelled session goes on


def test_session_packages_reach_only_that_sessions_udfs(sessions: tuple[Session, Session], tmp_path: Path) -> None:
    a, b = sessions
    wheel = build_wheel(tmp_path, name="hello_shared")
    installed = a.text(f"sc.install_pypi_package({str(wheel)!r})")
    assert "artifact" in installed
    udf = (
        "from pyspark.sql.functions import udf\n"
        "@udf('string')\n"
        "def greet(value):\n"
        "    import hello_shared\n"
        "    return hello_shared.greet(str(value))\n"
        "print(spark.range(1).select(greet('id')).first()[0])"
    )
    assert a.text("import hello_shared; print(hello_shared.greet('driver'))") == "hello driver from hello_shared 0.1.0"
    assert a.text(udf) == "hello 0 from hello_shared 0.1.0"
    in_b = b.run(udf)
    assert in_b["status"] == "error" and "hello_shared" in in_b["evalue"], in_b
    assert b.run("import hello_shared")["ename"] == "ModuleNotFoundError"
    # a second install goes under a new artifact name (Connect keeps the first)
    second = build_wheel(tmp_path, name="hello_second")
    assert "artifact" in a.text(f"__studio__.pip('install', {str(second)!r})")
    assert a.text(udf.replace("hello_shared", "hello_second")) == "hello 0 from hello_second 0.1.0"
    # an upgrade cannot take the earlier artifact away: the output says so
    upgrade = build_wheel(tmp_path, name="hello_shared", version="0.2.0")
    assert "earlier version" in a.text(f"__studio__.pip('install', {str(upgrade)!r})")


def test_a_driver_that_went_away_fails_statements_clearly(sessions: tuple[Session, Session], server: SharedDriver) -> None:
    """Last in the module: it stops the shared driver."""
    a, _ = sessions
    server.stop()
    gone = a.run("spark.range(3).count()", timeout=120)
    assert gone["status"] == "error", gone
    assert "cannot be reached" in gone["evalue"], gone
    assert a.text("print(1 + 1)") == "2"  # the worker itself lives on
    assert a.worker.poll() is None
