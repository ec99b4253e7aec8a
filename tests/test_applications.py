"""Applications as in EMR Serverless, through the real service: two declared applications with
different driver shapes side by side (each session sees its own ``spark.driver.memory``, jars and
conf, warm), initial capacity refilled after a hand-out, maximum capacity, a policy that refuses
sessions of another shape, auto-stop then auto-start on the next request, the Livy endpoint of an
application driven by the ``livy`` client and sparkmagic's kernel with only a base URL, the
definition API's refusals, and a restart that keeps applications and their warm drivers.

One service for the module (default application without a warm pool, to spare the cores); its
applications file declares ``small`` and ``bigmem``.
"""

from __future__ import annotations

import json
import signal
import time
import zipfile

import httpx
import pytest
from livy import LivySession, SessionKind

from conftest import start_service
from helpers import auth_headers
from sparkmagic_notebook import sparkmagic_texts


def _jar(folder):
    """A real jar (a zip with a manifest and one resource) that the bigmem drivers load."""
    path = folder / "shape-marker.jar"
    with zipfile.ZipFile(path, "w") as jar:
        jar.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\n")
        jar.writestr("studio/shape-marker.txt", "bigmem jar")
    return path


@pytest.fixture(scope="module")
def service(test_root):
    folder = test_root / "applications"
    folder.mkdir()
    jar = _jar(folder)
    declarations = {
        "applications": [
            {
                "name": "small",
                "runtimeConfiguration": [{"classification": "spark-defaults", "properties": {"spark.sql.shuffle.partitions": "3"}}],
                "initialCapacity": {"DRIVER": {"workerCount": 1}},
                "maximumCapacity": {"drivers": 3},
                "interactiveConfiguration": {"offShapeSessions": "REFUSE"},
            },
            {
                "name": "bigmem",
                "driverConfiguration": {"driverMemory": "1500m", "jars": [str(jar)], "conf": {"spark.driver.maxResultSize": "3g"}},
                "initialCapacity": {"DRIVER": {"workerCount": 1}},
                "maximumCapacity": {"drivers": 2, "memory": "4GB"},
            },
        ]
    }
    (folder / "applications.json").write_text(json.dumps(declarations))
    svc = start_service(
        test_root,
        "applications-service",
        # A second of JIT warm-up per pooled driver (10 by default): the tests time nothing, and each saved
        # second is a core's on a 2-core machine.
        env={"STUDIO_POOL_SIZE": "0", "STUDIO_CULL_INTERVAL": "1", "STUDIO_STOP_SESSIONS_ON_EXIT": "false", "STUDIO_POOL_WARMUP_SECONDS": "1", "STUDIO_WORKER_START_TIMEOUT": "600"},
        args=["--applications", str(folder / "applications.json")],
    )
    yield svc
    with svc.http() as http:  # what the module left: sessions deleted, then everything stops with the service
        for app in http.get("/applications").json()["applications"]:
            for session in http.get(f"/applications/{app['id']}/sessions").json()["sessions"]:
                http.delete(f"/applications/{app['id']}/sessions/{session['id']}")
    svc.env["STUDIO_STOP_SESSIONS_ON_EXIT"] = "true"
    svc.restart()  # with stop-on-exit now: the stop below takes the warm drivers with it
    assert svc.stop() == 0
    assert not svc.leftovers()


@pytest.fixture(scope="module")
def http(service):
    with service.http(timeout=60) as client:
        yield client


def application(http, name):
    response = http.get(f"/applications/{name}")
    assert response.status_code == 200, response.text
    return response.json()["application"]


def wait_application(http, name, states, timeout=600, warm=None):
    deadline = time.monotonic() + timeout
    while True:
        app = application(http, name)
        if app["state"] in states and (warm is None or app["capacity"]["used"]["warm"] >= warm):
            return app
        assert time.monotonic() < deadline, f"{name}: {app['state']} {app['stateDetails']} {app['capacity']}"
        time.sleep(0.3)


def wait_session(http, base, session_id, states=("idle",), timeout=600):
    deadline = time.monotonic() + timeout
    while True:
        session = http.get(f"{base}/sessions/{session_id}").json()
        if session["state"] in states:
            return session
        assert session["state"] not in ("dead", "error", "killed"), session
        assert time.monotonic() < deadline, session
        time.sleep(0.3)


def run(http, base, session_id, code):
    statement = http.post(f"{base}/sessions/{session_id}/statements", json={"code": code}).json()
    deadline = time.monotonic() + 300
    while statement["state"] not in ("available", "error", "cancelled"):
        assert time.monotonic() < deadline
        statement = http.get(f"{base}/sessions/{session_id}/statements/{statement['id']}", params={"wait": 5}).json()
    output = statement["output"]
    assert output["status"] == "ok", output
    return output["data"]["text/plain"]


SHAPE = (
    "print(sc.getConf().get('spark.driver.memory', '1g'), spark.conf.get('spark.sql.shuffle.partitions'), "
    "'shape-marker.jar' in sc.getConf().get('spark.jars', ''), sc.getConf().get('spark.driver.maxResultSize', '1g'), "
    "spark.range(1).count())"
)


def test_declared_applications_are_listed_with_their_shapes(http):
    names = [a["name"] for a in http.get("/applications").json()["applications"]]
    assert names[:1] == ["default"] and {"small", "bigmem"} <= set(names)
    bigmem = application(http, "bigmem")
    assert bigmem["state"] == "CREATED" and bigmem["declared"] is True
    assert bigmem["driverConfiguration"]["driverMemory"] == "1500m"
    assert bigmem["livyEndpoint"].endswith("/applications/bigmem")
    assert bigmem["capacity"]["maximum"] == {"drivers": 2, "cpu": None, "memoryMB": 4096}
    stopped = http.get("/applications", params={"states": "CREATED"}).json()["applications"]
    assert {"small", "bigmem"} <= {a["name"] for a in stopped} and "default" not in {a["name"] for a in stopped}


def test_two_shapes_side_by_side_warm_and_refilled(http):
    for name in ("small", "bigmem"):
        assert http.post(f"/applications/{name}/start").status_code == 200
    wait_application(http, "small", ("STARTED",), warm=1)
    wait_application(http, "bigmem", ("STARTED",), warm=1)

    # Each asks for its application's shape (or nothing): a warm driver, idle at once.
    small = http.post("/applications/small/sessions", json={"kind": "pyspark"}).json()
    big = http.post("/applications/bigmem/sessions", json={"kind": "pyspark", "driverMemory": "1500m", "conf": {"spark.driver.maxResultSize": "3g"}}).json()
    assert small["state"] == "idle" and big["state"] == "idle", (small, big)
    # Livy's session object has exactly Livy's keys; which application a session runs in is ours to say.
    assert http.get(f"/studio/sessions/{small['id']}").json()["application"] == "small"
    assert http.get(f"/studio/sessions/{big['id']}").json()["application"] == "bigmem"
    assert run(http, "/applications/small", small["id"], SHAPE) == "1g 3 False 1g 1"
    assert run(http, "/applications/bigmem", big["id"], SHAPE) == "1500m 200 True 3g 1"
    marker = run(http, "/applications/bigmem", big["id"], "print(sc._jvm.java.lang.Thread.currentThread().getContextClassLoader().getResource('studio/shape-marker.txt') is not None)")
    assert marker == "True"
    assert http.get(f"/studio/sessions/{big['id']}").json()["warm"] is True

    # Each application's Livy endpoint shows its own sessions only; the root is the default application.
    assert [s["id"] for s in http.get("/applications/small/sessions").json()["sessions"]] == [small["id"]]
    assert http.get(f"/applications/small/sessions/{big['id']}").status_code == 404
    assert http.get(f"/sessions/{big['id']}").status_code == 404
    assert http.get("/applications/nosuch/sessions").status_code == 404

    # The pool refills behind the hand-out (bigmem has room: 1 session + 1 warm = its 2 drivers).
    wait_application(http, "small", ("STARTED",), warm=1)
    bigmem = wait_application(http, "bigmem", ("STARTED",), warm=1)
    assert bigmem["poolHits"] >= 1 and bigmem["capacity"]["used"]["drivers"] == 2

    # Full (a session and a warm driver are its 2 drivers): a session of another shape makes the warm
    # driver go and gets a cold one of its own; then there is no room for anything more, said in words.
    other = http.post("/applications/bigmem/sessions", json={"kind": "pyspark", "driverMemory": "1g"})
    assert other.status_code == 201 and other.json()["state"] == "starting", other.text
    used = application(http, "bigmem")["capacity"]["used"]
    assert used["drivers"] == 2 and used["warm"] == 0, used
    again = http.post("/applications/bigmem/sessions", json={"kind": "pyspark"})
    assert again.status_code == 400 and "2 of its maximum 2 drivers" in again.json()["msg"], again.text
    second = wait_session(http, "/applications/bigmem", other.json()["id"])
    assert run(http, "/applications/bigmem", second["id"], "print(sc.getConf().get('spark.driver.memory'))") == "1g"
    assert application(http, "bigmem")["poolMisses"] == 1

    # small refuses sessions of another shape (its policy), naming what they asked for.
    off = http.post("/applications/small/sessions", json={"kind": "pyspark", "driverMemory": "2g"})
    assert off.status_code == 400 and "spark.driver.memory" in off.json()["msg"]
    # A runtime SQL conf is no other shape: a warm driver takes it.
    sql = http.post("/applications/small/sessions", json={"kind": "pyspark", "conf": {"spark.sql.shuffle.partitions": "9"}}).json()
    assert sql["state"] == "idle"
    assert run(http, "/applications/small", sql["id"], "print(spark.conf.get('spark.sql.shuffle.partitions'))") == "9"

    for base, sid in (("small", small["id"]), ("small", sql["id"]), ("bigmem", big["id"]), ("bigmem", second["id"])):
        assert http.delete(f"/applications/{base}/sessions/{sid}").status_code == 200
    assert http.post("/applications/small/stop").status_code == 200
    assert application(http, "small")["state"] == "STOPPED"  # bigmem stays up: the clients' test uses its warm driver


def test_the_definition_api_refuses_clearly(service, http):
    cases = [
        ({"name": "bad name!"}, "application name"),
        ({"name": "x1", "initialCapacity": {"EXECUTOR": {"workerCount": 1}}}, "only DRIVER"),
        ({"name": "x2", "runtimeConfiguration": [{"classification": "spark-defaults", "properties": {"spark.master": "yarn"}}]}, "spark.master"),
        ({"name": "x3", "driverConfiguration": {"driverMemory": "lots"}}, "driverMemory"),
        ({"name": "x4", "initialCapacity": {"DRIVER": {"workerCount": 3}}, "maximumCapacity": {"drivers": 2}}, "more than maximumCapacity"),
        ({"name": "x5", "bogus": 1}, "bogus"),
        ({"name": "small"}, "already exists"),
    ]
    for body, words in cases:
        response = http.post("/applications", json=body)
        assert response.status_code in (400, 409) and words in response.json()["msg"], (body, response.text)
    assert http.delete("/applications/default").status_code == 403
    assert http.post("/applications/default/stop").status_code == 403
    assert http.get("/applications/nosuch").status_code == 404
    created = http.post("/applications", json={"name": "scratch", "tags": {"team": "a"}}).json()
    assert created["applicationId"].startswith("00") and len(created["applicationId"]) == 16
    updated = http.patch(f"/applications/{created['applicationId']}", json={"autoStopConfiguration": {"idleTimeoutMinutes": 5}})
    assert updated.json()["application"]["autoStopConfiguration"]["idleTimeoutMinutes"] == 5
    assert http.patch("/applications/scratch", json={"name": "renamed"}).status_code == 400
    assert http.delete("/applications/scratch").status_code == 200
    assert http.get("/applications/scratch").status_code == 404
    assert httpx.get(service.url + "/applications", trust_env=False).status_code == 401


def test_auto_stop_releases_the_warm_driver_and_the_next_request_auto_starts(http):
    created = http.post(
        "/applications",
        json={"name": "napper", "initialCapacity": {"DRIVER": {"workerCount": 1}}, "autoStopConfiguration": {"idleTimeoutMinutes": 0.25}},  # 15 s: long enough to see it STARTED on a busy machine
    )
    assert created.status_code == 200, created.text
    http.post("/applications/napper/start")
    started = wait_application(http, "napper", ("STARTED",), warm=1)
    assert started["capacity"]["used"]["warm"] == 1
    stopped = wait_application(http, "napper", ("STOPPED",), timeout=120)
    assert "idle" in stopped["stateDetails"] and stopped["capacity"]["used"]["drivers"] == 0

    # The next session starts the application again and gets the driver its pool starts (one JVM, not two).
    session = http.post("/applications/napper/sessions", json={"kind": "pyspark"}).json()
    assert session["state"] == "starting", session
    assert application(http, "napper")["state"] in ("STARTING", "STARTED")
    wait_session(http, "/applications/napper", session["id"])
    assert run(http, "/applications/napper", session["id"], "print(spark.range(1).count())") == "1"
    app = application(http, "napper")
    assert app["poolHits"] == 1 and app["poolMisses"] == 0, app
    assert http.post("/applications/napper/stop").status_code == 409  # a live session: a stop would lose it
    http.delete(f"/applications/napper/sessions/{session['id']}")
    wait_application(http, "napper", ("STOPPED",), timeout=120)


def test_the_livy_endpoint_of_an_application_serves_unchanged_clients(service, http, tmp_path):
    base = f"{service.url}/applications/bigmem"
    with LivySession.create(base, auth=("analyst", service.token), kind=SessionKind.PYSPARK, driver_memory="1500m") as session:
        assert session.run("print(sc.getConf().get('spark.driver.memory'))").text == "1500m"
        assert session.run("spark.range(5).count()").text == "5"

    cells = [
        "print('memory', sc.getConf().get('spark.driver.memory'))",
        "spark.range(4).createOrReplaceTempView('t')",
        "%%sql -q -o rows\nSELECT id FROM t",
        "%%local\nprint('rows', len(rows))",
        "%%info",
    ]
    texts = sparkmagic_texts(base, service.token, cells, tmp_path)
    assert "memory 1500m" in texts[0]
    assert "rows 4" in texts[3]
    assert "bigmem" in texts[4] or "Current session configs" in texts[4]
    with httpx.Client(base_url=base, headers=auth_headers(service.token), trust_env=False) as client:
        for session in client.get("/sessions").json()["sessions"]:  # sparkmagic's kernel left its session
            client.delete(f"/sessions/{session['id']}")


def test_a_restart_keeps_applications_and_their_warm_drivers(service, http):
    before = wait_application(http, "bigmem", ("STARTED",), warm=1)  # started in the test before, its driver warm
    ids = {a["name"]: (a["id"], a["state"]) for a in http.get("/applications").json()["applications"]}
    http.post("/applications", json={"name": "kept", "tags": {"why": "restart"}})
    service.restart(signal.SIGTERM)
    with service.http(timeout=60) as after_http:
        after = {a["name"]: (a["id"], a["state"]) for a in after_http.get("/applications").json()["applications"]}
        for name, (app_id, _) in ids.items():
            assert after[name][0] == app_id
        assert after["kept"][1] == "CREATED" and after["small"][1] == "STOPPED"
        bigmem = application(after_http, "bigmem")
        pids = [w["pid"] for w in bigmem["pool"]["readyWorkers"]]
        assert bigmem["state"] == "STARTED" and pids == [w["pid"] for w in before["pool"]["readyWorkers"]]  # adopted, not started again
        session = after_http.post("/applications/bigmem/sessions", json={"kind": "pyspark"}).json()
        assert session["state"] == "idle"
        after_http.delete(f"/applications/bigmem/sessions/{session['id']}")
