"""Sessions that need a JVM of their own: settings a warm worker cannot honour start a cold
worker with exactly those settings, and the warm worker goes back to the pool."""

from __future__ import annotations

import pytest

from conftest import WARM_POOL, shared_service
from helpers import REPO

FILES = REPO / "tests" / "files"


@pytest.fixture(scope="module")
def service(warm_service):
    yield from shared_service(warm_service)  # the whole warm pool: tests check that it stays full


@pytest.fixture(scope="module")
def livy(service):
    client = service.client()
    yield client
    client.close()


def test_static_settings_get_a_cold_worker_with_exactly_those_settings(service, livy):
    session = livy.create_session(
        kind="pyspark",
        driverMemory="700m",
        pyFiles=[str(FILES / "session_helper.py")],
        files=[str(FILES / "data.txt")],
        conf={"spark.executor.memory": "600m", "spark.sql.shuffle.partitions": "5", "spark.myapp.flag": "on"},
        name="cold-one",
    )
    assert session["state"] == "starting"
    assert session["driverMemory"] == "700m"
    sid = livy.wait_session(session["id"])["id"]
    assert livy.http.get("/studio/status").json()["pool"]["ready"] == WARM_POOL  # the warm worker went back
    max_heap_mb = int(livy.text(sid, "sc._jvm.java.lang.Runtime.getRuntime().maxMemory() // 2**20"))
    assert 550 <= max_heap_mb <= 700
    assert livy.text(sid, "from session_helper import greet\ngreet('cold')") == "'hello cold from pyFiles'"
    assert livy.text(sid, "from pyspark import SparkFiles\nopen(SparkFiles.get('data.txt')).read().strip()") == "'line one of a data file'"
    assert livy.text(sid, "sc.getConf().get('spark.executor.memory')") == "'600m'"
    assert livy.text(sid, "spark.conf.get('spark.sql.shuffle.partitions')") == "'5'"
    assert livy.text(sid, "sc.getConf().get('spark.myapp.flag')") == "'on'"
    assert livy.text(sid, "sc.appName") == "'cold-one'"
    # The conf came in a private properties file: no value is on the driver JVM's command line (`ps`).
    cmdline = livy.text(sid, "open(f'/proc/{sc._gateway.proc.pid}/cmdline', 'rb').read().decode()")
    assert "--properties-file" in cmdline and "spark.myapp.flag" not in cmdline and "600m" not in cmdline, cmdline
    assert livy.http.delete(f"/sessions/{sid}").status_code == 200


def test_a_cold_start_that_fails_ends_dead_with_the_reason(livy):
    # A malformed memory size is refused up front; what only Spark's launcher judges is not.
    refused = livy.http.post("/sessions", json={"kind": "pyspark", "driverMemory": "lots"})
    assert refused.status_code == 400 and "driverMemory 'lots'" in refused.json()["msg"]
    session = livy.create_session(kind="pyspark", conf={"spark.driver.extraJavaOptions": "-Xmx8k"})
    livy.wait_session(session["id"], states=("dead",), timeout=120)
    log = "\n".join(livy.log(session["id"], size=-1)["log"])
    assert "failed to start" in log
    assert "Xmx" in log  # the launcher's own complaint


def test_an_invalid_runtime_conf_value_is_a_clear_400(service, livy):
    service.wait_pool(WARM_POOL)
    response = livy.http.post("/sessions", json={"conf": {"spark.sql.shuffle.partitions": "several"}})
    assert response.status_code == 400
    assert "spark.sql.shuffle.partitions" in response.json()["msg"]
    assert livy.http.get("/studio/status").json()["pool"]["ready"] == WARM_POOL
