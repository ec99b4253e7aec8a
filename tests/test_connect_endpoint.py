"""Shared drivers and the Spark Connect endpoint, with real JVMs and a real pyspark Connect client.

``ConnectDrivers`` starts one SparkConnectServer per (application, user); ``ConnectEndpoint`` lets a
Connect client in with a personal token of the users' directory (a real ``Gate`` over a real
``Directory``) and forwards its calls to that user's own driver. What must hold: a query runs
through the endpoint; no token, a wrong one, or a dedicated application is refused with words that
say so; one user's calls reach only that user's JVM; an idle driver stops and ``ensure`` brings it
back. The module shares its drivers: each JVM start costs about ten seconds on two cores.
"""

from __future__ import annotations

import asyncio
import os
import stat
import sys
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

from studio.auth.gate import Gate, GateSettings
from studio.auth.users import Directory
from studio.config import Settings
from studio.errors import NotFoundError
from studio.livy import sparkconf
from studio.livy.applications import Application, ApplicationState, parse_definition
from studio.livy.connect_drivers import ConnectDrivers, sql_request
from studio.livy.connect_endpoint import ConnectEndpoint

T = TypeVar("T")
pytestmark = pytest.mark.timeout(900)


class Loop:
    """An event loop on a thread of its own: the drivers and the endpoint are asyncio, pyspark's client is not."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 400.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class World:
    def __init__(self, root: Path) -> None:
        self.loop = Loop()
        self.settings = Settings(
            # A JVM took up to 3 minutes to answer here while other suites ran beside this one on 2 cores.
            state_dir=root / "state", cache_dir=root / "cache", pool_size=0, stop_timeout=10.0, worker_start_timeout=600.0
        )
        self.directory = Directory(root / "identity")
        _, self.ana_token = self.directory.add_user("ana")
        _, self.bob_token = self.directory.add_user("bob")

        async def nothing(scope: Any, receive: Any, send: Any) -> None:
            return None

        self.studio_token = "studio-admin-token-for-this-test"
        self.gate = Gate(nothing, GateSettings(token=self.studio_token, realm="test", bound_host="127.0.0.1", identity_dir=root / "identity"))
        self.apps = {
            "shared": Application(
                "00sharedapp00001",
                parse_definition({"name": "shared", "driverMode": "SHARED", "runtimeConfiguration": [
                    {"classification": "spark-defaults", "properties": {"spark.sql.shuffle.partitions": "3"}}]}),
                state=ApplicationState.STARTED,
                is_default=True,
            ),
            "dedicated": Application("00dedicatedapp01", parse_definition({"name": "dedicated"}), state=ApplicationState.STARTED),
        }  # fmt: skip
        self.drivers: ConnectDrivers = self.loop.run(self._drivers())
        self.endpoint = ConnectEndpoint(self.settings, self.drivers, self.gate.principal_for, self.application_for)
        self.port = self.loop.run(self.endpoint.start(port=0))

    async def _drivers(self) -> ConnectDrivers:
        return ConnectDrivers(self.settings, lambda: sparkconf.base_conf(self.settings, ""))

    def application_for(self, name: str | None) -> Application:
        if name is None:
            return self.apps["shared"]
        if name not in self.apps:
            raise NotFoundError(f"Application '{name}' not found.")
        return self.apps[name]

    def url(self, token: str | None, **params: str) -> str:
        parts = ([f"token={token}"] if token is not None else []) + [f"{k}={v}" for k, v in params.items()]
        return f"sc://localhost:{self.port}/;" + ";".join(parts) if parts else f"sc://localhost:{self.port}/"

    def close(self) -> None:
        self.loop.run(self.endpoint.stop())
        self.loop.run(self.drivers.shutdown(keep=False), timeout=120)
        self.loop.close()
        self.directory.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    os.environ.pop("SPARK_CONNECT_AUTHENTICATE_TOKEN", None)  # the client must use only the URL's token
    made = World(tmp_path_factory.mktemp("connect"))
    yield made
    made.close()


def session(url: str) -> Any:
    from pyspark.sql.connect.session import SparkSession

    return SparkSession.builder.remote(url).create()


def gone(pid: int) -> bool:
    """No such process, or a zombie (an adopted driver's original parent is this test process)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def refusal(url: str) -> str:
    """The error a Connect client gets for its first query at ``url``."""
    spark = session(url)
    try:
        spark.sql("select 1").collect()
    except Exception as exc:  # noqa: BLE001 - pyspark's exception classes vary by error
        return str(exc)
    finally:
        spark.stop()
    raise AssertionError(f"{url} was let in")


def test_a_connect_client_runs_queries_through_the_endpoint_on_its_own_driver(world: World) -> None:
    spark = session(world.url(world.ana_token))
    try:
        assert spark.sql("select 1 as one").collect()[0].one == 1
        assert spark.range(10).groupBy().sum("id").collect()[0][0] == 45  # a job with a shuffle
        assert spark.conf.get(sparkconf.USER_CONF) == "ana"  # the user's conf reached the driver
        assert spark.conf.get("spark.sql.shuffle.partitions") == "3"  # and the application's
        driver = world.drivers.get("00sharedapp00001", "ana")
        assert driver is not None and driver.is_ready()
        assert spark.conf.get("spark.app.id") == driver.info["app_id"]
        assert driver.info["jvm_pid"] and psutil.Process(driver.info["jvm_pid"]).name() == "java"
        assert (driver.info["spark_ui_url"] or "").startswith("http://")
        assert driver.memory_mb() > 50
        # A Python UDF runs in a Python worker of the service's own interpreter, in the driver's group.
        from pyspark.sql.connect.functions import udf
        from pyspark.sql.types import StringType

        which_python = udf(lambda _: __import__("sys").executable, StringType())  # a type, not DDL: no local context
        assert spark.range(1).select(which_python("id")).collect()[0][0] == os.environ.get("PYSPARK_PYTHON", sys.executable)
    finally:
        spark.stop()
    # The token is nowhere but in the JVM's environment: not on its command line, not in its files.
    assert driver.process is not None and driver.process.pid is not None
    command = " ".join(psutil.Process(driver.process.pid).cmdline())
    assert driver.token() not in command
    for path in driver.folder.iterdir():
        assert driver.token() not in path.read_text(errors="replace")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(driver.folder.stat().st_mode) == 0o700
    assert driver.token() not in driver.log.path.read_text(errors="replace")
    assert driver.token() not in repr(driver)


def test_no_token_a_wrong_one_or_a_dedicated_application_is_refused(world: World) -> None:
    assert "needs a token" in refusal(world.url(None))
    assert "does not know this token" in refusal(world.url("sst_not-a-real-token"))
    refused = refusal(world.url(world.ana_token, **{"x-studio-application": "dedicated"}))
    assert "DEDICATED" in refused and "SHARED" in refused
    assert "not found" in refusal(world.url(world.ana_token, **{"x-studio-application": "nosuch"}))
    assert world.drivers.get("00dedicatedapp01", "ana") is None


def test_each_user_reaches_only_their_own_driver(world: World) -> None:
    ana = session(world.url(world.ana_token))
    bob = session(world.url(world.bob_token, **{"x-studio-application": "shared"}))
    try:
        bob.range(3).createOrReplaceGlobalTempView("bobs_numbers")  # visible to every session of bob's JVM
        assert bob.sql("select count(*) from global_temp.bobs_numbers").collect()[0][0] == 3
        assert bob.conf.get(sparkconf.USER_CONF) == "bob"
        assert not ana.sql("show tables in global_temp").collect()  # ana's JVM is another JVM
        ana_driver, bob_driver = world.drivers.get("00sharedapp00001", "ana"), world.drivers.get("00sharedapp00001", "bob")
        assert ana_driver is not None and bob_driver is not None and ana_driver is not bob_driver
        assert ana.conf.get("spark.app.id") == ana_driver.info["app_id"] != bob.conf.get("spark.app.id")
        assert ana_driver.token() != bob_driver.token() and ana_driver.port != bob_driver.port
        # An error inside the driver comes back as pyspark's own exception, through the proxy.
        from pyspark.errors import AnalysisException

        with pytest.raises(AnalysisException, match="TABLE_OR_VIEW_NOT_FOUND"):
            ana.sql("select * from global_temp.bobs_numbers").collect()
    finally:
        ana.stop()
        bob.stop()
    # bob's driver is not needed by the tests that follow
    bob_driver = world.drivers.get("00sharedapp00001", "bob")
    assert bob_driver is not None
    world.loop.run(bob_driver.stop())
    assert world.drivers.get("00sharedapp00001", "bob") is None


def test_a_large_result_streams_and_a_cancelled_call_cancels_the_forwarded_one(world: World) -> None:
    spark = session(world.url(world.ana_token))
    try:
        # Bigger than gRPC's default 4 MB message and many Arrow batches: it streams through.
        rows = spark.range(400_000).selectExpr("id", "repeat('x', 40) as pad").collect()
        assert len(rows) == 400_000
        driver = world.drivers.get("00sharedapp00001", "ana")
        assert driver is not None
        stopped = threading.Event()

        def interrupt_soon() -> None:
            time.sleep(3)
            spark.interruptAll()
            stopped.set()

        threading.Thread(target=interrupt_soon, daemon=True).start()
        started = time.monotonic()
        with pytest.raises(Exception):  # noqa: B017, PT011 - the interrupted query's error class is pyspark's
            spark.sql("select count(*) from range(0, 100000000000, 1, 2) a").collect()
        assert stopped.is_set() and time.monotonic() - started < 120
        assert driver.calls == 0  # the forwarded calls ended with the client's
    finally:
        spark.stop()
    # A client that goes away mid-call (here: a raw gRPC call, cancelled) takes the forwarded call with it.
    import grpc

    channel = grpc.secure_channel(
        f"localhost:{world.port}",
        grpc.composite_channel_credentials(grpc.local_channel_credentials(), grpc.access_token_call_credentials(world.ana_token)),
    )
    try:
        query = "select count(*) from range(0, 100000000000, 1, 2)"
        call = channel.unary_stream("/spark.connect.SparkConnectService/ExecutePlan")(sql_request(str(uuid.uuid4()), "ana", query))
        deadline = time.monotonic() + 60
        while driver.calls == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert driver.calls == 1
        call.cancel()
        deadline = time.monotonic() + 30
        while driver.calls and time.monotonic() < deadline:
            time.sleep(0.1)
        assert driver.calls == 0
    finally:
        channel.close()


def test_drivers_outlive_the_service_and_are_adopted_again(world: World) -> None:
    driver = world.drivers.get("00sharedapp00001", "ana")
    assert driver is not None
    pid, token, app_id = driver.pid, driver.token(), driver.info["app_id"]
    world.loop.run(world.drivers.shutdown(keep=True))
    assert psutil.pid_exists(pid or -1) and world.drivers.get("00sharedapp00001", "ana") is None
    record = (driver.folder / "driver.json").read_text()
    assert token not in record and stat.S_IMODE((driver.folder / "driver.json").stat().st_mode) == 0o600

    async def next_service() -> ConnectDrivers:
        drivers = ConnectDrivers(world.settings, lambda: sparkconf.base_conf(world.settings, ""))
        await drivers.restore()
        return drivers

    world.drivers = world.endpoint.drivers = world.loop.run(next_service())
    adopted = world.drivers.get("00sharedapp00001", "ana")
    assert adopted is not None and adopted.adopted and adopted.pid == pid and adopted.token() == token
    assert adopted.is_ready() and adopted.info["app_id"] == app_id
    spark = session(world.url(world.ana_token))
    try:
        assert spark.conf.get("spark.app.id") == app_id
    finally:
        spark.stop()


def test_an_idle_driver_stops_and_ensure_starts_it_again(world: World) -> None:
    driver = world.drivers.get("00sharedapp00001", "ana")
    assert driver is not None and driver.sessions == 0
    pid = driver.pid
    driver.hold()  # a session on it: never idle
    driver.idle_since -= 3600
    world.loop.run(world.drivers.stop_idle(lambda app_id: 0.05))
    assert world.drivers.get("00sharedapp00001", "ana") is driver
    driver.let_go()
    world.loop.run(world.drivers.stop_idle(lambda app_id: 0.05))  # idle only just now
    assert world.drivers.get("00sharedapp00001", "ana") is driver
    time.sleep(3.2)
    world.loop.run(world.drivers.stop_idle(lambda app_id: None))  # an application that never stops its drivers
    assert world.drivers.get("00sharedapp00001", "ana") is driver
    world.loop.run(world.drivers.stop_idle(lambda app_id: 0.05))
    assert world.drivers.get("00sharedapp00001", "ana") is None
    assert driver.exited.done() and pid is not None and gone(pid)
    assert not driver.folder.exists()
    again = world.loop.run(world.drivers.ensure(world.apps["shared"], "ana"))
    assert again is not driver and again.is_ready() and again.info["app_id"] != driver.info["app_id"]
    spark = session(world.url(world.ana_token))
    try:
        assert spark.sql("select 2").collect()[0][0] == 2
    finally:
        spark.stop()
