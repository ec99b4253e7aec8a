"""Shared-driver sessions (``STUDIO_DRIVER_MODE=shared``) through the real service: lean sessions
on one Spark Connect driver per user.

One service for the module, its default application in shared mode with one warm lean session per
user's driver; users alice and bob (personal tokens) and the studio's token (admin). Shown: two
sessions of one user share a driver and cannot see each other's temp views, SQL conf or UDFs;
cancelling one leaves the other running; ``sc`` says what the mode lacks; a package a session
installs is seen by its UDFs and not by the other session's; each user has a driver of their own;
the Spark Connect endpoint takes the studio's credentials and reaches only the caller's driver;
settings that need a driver of their own are refused; the ``livy`` client and sparkmagic's kernel
work unchanged; a driver without sessions stops after its idle time and comes back with the next
session; a session that does not fit the memory budget is refused in Livy's shape.
"""

from __future__ import annotations

import time

import httpx
import pytest
from livy import LivySession, SessionKind

from conftest import start_service
from helpers import TEST_TOKEN, auth_headers, build_wheel
from sparkmagic_notebook import sparkmagic_texts
from studio.auth.users import Directory


@pytest.fixture(scope="module")
def service(test_root):
    state = test_root / "shared"
    tokens = {}
    with Directory(state) as directory:
        for name in ("alice", "bob"):
            tokens[name] = directory.add_user(name)[1]
    svc = start_service(
        test_root,
        "shared",
        env={
            "STUDIO_DRIVER_MODE": "shared",
            "STUDIO_POOL_SIZE": "0",
            "STUDIO_SHARED_POOL_SIZE": "1",
            "STUDIO_CONNECT_PORT": "0",
            "STUDIO_CULL_INTERVAL": "1",
            "STUDIO_SHARED_DRIVER_IDLE_MINUTES": "0.1",
            "STUDIO_WORKER_START_TIMEOUT": "600",
        },
    )
    svc.tokens = {**tokens, "admin": TEST_TOKEN}  # type: ignore[attr-defined]
    yield svc
    assert svc.stop() == 0
    assert not svc.leftovers()


@pytest.fixture(scope="module")
def users(service):
    clients = {
        name: httpx.Client(base_url=service.url, timeout=120, headers=auth_headers(token), trust_env=False)
        for name, token in service.tokens.items()
    }
    yield clients
    for client in clients.values():
        client.close()


def create(http: httpx.Client, **body) -> int:
    response = http.post("/sessions", json={"kind": "pyspark", **body})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def wait_idle(http: httpx.Client, session_id: int, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        session = http.get(f"/sessions/{session_id}").json()
        if session["state"] == "idle":
            return session
        assert session["state"] in ("starting", "busy") and time.monotonic() < deadline, session
        time.sleep(0.2)


def submit(http: httpx.Client, session_id: int, code: str, kind: str | None = None) -> int:
    body = {"code": code, **({"kind": kind} if kind else {})}
    response = http.post(f"/sessions/{session_id}/statements", json=body)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def result(http: httpx.Client, session_id: int, statement_id: int, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        statement = http.get(f"/sessions/{session_id}/statements/{statement_id}", params={"wait": 10}).json()
        if statement["state"] in ("available", "cancelled"):
            return statement
        assert time.monotonic() < deadline, statement


def run(http: httpx.Client, session_id: int, code: str, kind: str | None = None) -> dict:
    return result(http, session_id, submit(http, session_id, code, kind))["output"]


def text(http: httpx.Client, session_id: int, code: str, kind: str | None = None) -> str:
    output = run(http, session_id, code, kind)
    assert output["status"] == "ok", output
    return output["data"]["text/plain"].strip()


def drivers(http: httpx.Client) -> list[dict]:
    return http.get("/studio/status").json()["sharedDrivers"]


@pytest.fixture(scope="module")
def alice_sessions(users):
    """Two sessions of alice's, idle on her driver (the first starts it; the second may take the warm one)."""
    alice = users["alice"]
    first = create(alice)
    wait_idle(alice, first)
    second = create(alice)
    wait_idle(alice, second)
    yield first, second
    for session_id in (first, second):
        alice.delete(f"/sessions/{session_id}")


def test_two_sessions_of_a_user_share_her_driver_and_see_nothing_of_each_other(users, alice_sessions):
    alice = users["alice"]
    first, second = alice_sessions
    described = alice.get(f"/studio/sessions/{first}").json()
    assert described["driverMode"] == "shared" and described["sharedDriverUser"] == "alice"
    livy_first, livy_second = alice.get(f"/sessions/{first}").json(), alice.get(f"/sessions/{second}").json()
    assert livy_first["appId"] and livy_first["appId"] == livy_second["appId"]  # one driver
    assert [d["user"] for d in drivers(alice)] == ["alice"]  # she sees only her own

    text(alice, first, "spark.range(3).createOrReplaceTempView('mine')\nspark.conf.set('spark.sql.shuffle.partitions', '7')\n"
         "spark.udf.register('plus_one', lambda x: x + 1, 'int')\nprint(spark.sql('SELECT plus_one(1)').first()[0])")  # fmt: skip
    assert text(alice, first, "print(spark.table('mine').count(), spark.conf.get('spark.sql.shuffle.partitions'))") == "3 7"
    assert text(alice, second, "print(spark.catalog.tableExists('mine'), spark.conf.get('spark.sql.shuffle.partitions'))") == "False 200"
    missing_udf = run(alice, second, "spark.sql('SELECT plus_one(1)').collect()")
    assert missing_udf["status"] == "error" and "plus_one" in missing_udf["evalue"]
    # SQL statements (Livy's sql kind) run on the session's own Connect session too.
    output = run(alice, first, "SELECT count(*) AS n FROM mine", kind="sql")
    assert output["status"] == "ok" and output["data"]["application/json"]["data"] == [[3]], output


def test_sc_says_what_the_mode_lacks(users, alice_sessions):
    alice = users["alice"]
    output = run(alice, alice_sessions[0], "sc.parallelize([1, 2]).count()")
    assert output["status"] == "error"
    message = output["evalue"]
    assert "shared" in message.lower() and "DEDICATED" in message, message
    # The session lives on: a failing statement never kills it.
    assert text(alice, alice_sessions[0], "print(spark.range(2).count())") == "2"


def test_cancel_in_one_session_leaves_the_other_running(users, alice_sessions):
    alice = users["alice"]
    first, second = alice_sessions
    long_one = submit(alice, first, "spark.range(10**13).selectExpr('max(id)').collect()")  # max: sum overflows (ANSI) within seconds
    other = submit(alice, second, "import time\ntime.sleep(4)\nprint(spark.range(5).count())")
    deadline = time.monotonic() + 60
    while alice.get(f"/sessions/{first}/statements/{long_one}").json()["state"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(1.0)
    assert alice.post(f"/sessions/{first}/statements/{long_one}/cancel").status_code == 200
    cancelled = result(alice, first, long_one, timeout=120)
    assert cancelled["state"] == "cancelled", cancelled
    finished = result(alice, second, other)
    assert finished["state"] == "available" and finished["output"]["data"]["text/plain"].strip() == "5", finished
    assert text(alice, first, "print(spark.range(3).count())") == "3"  # the cancelled session works on


def test_a_package_one_session_installs_is_in_its_udfs_only(users, alice_sessions, tmp_path):
    alice = users["alice"]
    first, second = alice_sessions
    wheel = build_wheel(tmp_path, name="shared_hello")
    install = run(alice, first, f"sc.install_pypi_package({str(wheel)!r})")
    assert install["status"] == "ok", install
    udf_code = (
        "from pyspark.sql.functions import udf\n"
        "@udf('string')\n"
        "def greet(x):\n"
        "    import shared_hello\n"
        "    return shared_hello.greet(str(x))\n"
        "print(spark.range(1).select(greet('id')).first()[0])"
    )
    assert text(alice, first, udf_code) == "hello 0 from shared_hello 0.1.0"
    other = run(alice, second, udf_code)
    assert other["status"] == "error" and "shared_hello" in (other["evalue"] + "".join(other["traceback"])), other


def test_each_user_has_a_driver_of_their_own_and_the_connect_endpoint_reaches_only_it(service, users, alice_sessions):
    from pyspark.sql import SparkSession

    bob = users["bob"]
    bob_session = create(bob)
    bob_app = wait_idle(bob, bob_session)["appId"]
    alice_app = users["alice"].get(f"/sessions/{alice_sessions[0]}").json()["appId"]
    assert bob_app != alice_app
    status = users["admin"].get("/studio/status").json()
    by_user = {d["user"]: d for d in status["sharedDrivers"]}
    assert by_user["alice"]["pid"] != by_user["bob"]["pid"]
    connect = status["sparkConnect"]
    assert connect.startswith("sc://localhost:") and "<your studio token>" in connect
    assert service.tokens["alice"] not in str(status)
    endpoint = connect.split(";token=")[0]

    def app_id(token: str | None) -> str:
        url = endpoint + (f";token={token}" if token else "")
        spark = SparkSession.builder.remote(url).create()
        try:
            return spark.conf.get("spark.app.id")
        finally:
            spark.stop()

    assert app_id(service.tokens["alice"]) == alice_app
    assert app_id(service.tokens["bob"]) == bob_app
    for bad in (None, "not-a-token", service.tokens["alice"] + "x"):
        with pytest.raises(Exception) as refused:
            app_id(bad)
        assert "UNAUTHENTICATED" in str(refused.value) or "authenticat" in str(refused.value).lower(), refused.value
    bob.delete(f"/sessions/{bob_session}")


def test_settings_that_need_a_driver_of_their_own_are_refused(users):
    response = users["alice"].post("/sessions", json={"kind": "pyspark", "driverMemory": "2g"})
    assert response.status_code == 400
    message = response.json()["msg"]
    assert "spark.driver.memory" in message and "DEDICATED" in message


def test_livy_client_and_sparkmagic_work_unchanged(service, users, tmp_path):
    with LivySession.create(service.url, auth=("bob", service.tokens["bob"]), kind=SessionKind.PYSPARK) as session:
        assert session.run("print(spark.range(5).count())").text.strip() == "5"
        session.run("df = spark.range(4)")
        assert list(session.download("df")["id"]) == [0, 1, 2, 3]  # the client's toJSON() path
    texts = sparkmagic_texts(
        service.url,
        service.tokens["bob"],
        [
            "spark.range(4).createOrReplaceTempView('t')\nprint('rows', spark.table('t').count())",
            "%%sql -q -o rows\nSELECT id FROM t",
            "%%local\nprint('local', len(rows))",
        ],
        tmp_path,
        user="bob",
    )
    assert "rows 4" in texts[0] and "local 4" in texts[2], texts
    bob = users["bob"]
    for session in bob.get("/sessions").json()["sessions"]:  # sparkmagic's kernel leaves its session
        bob.delete(f"/sessions/{session['id']}")


def test_a_driver_without_sessions_stops_after_its_idle_time_and_comes_back(users):
    bob = users["bob"]
    for session in bob.get("/sessions").json()["sessions"]:
        bob.delete(f"/sessions/{session['id']}")
    deadline = time.monotonic() + 180
    while any(d["user"] == "bob" for d in drivers(bob)):
        assert time.monotonic() < deadline, drivers(bob)
        time.sleep(1)
    session_id = create(bob)
    wait_idle(bob, session_id)
    assert text(bob, session_id, "print(spark.range(6).count())") == "6"
    assert [d["user"] for d in drivers(bob)] == ["bob"]
    bob.delete(f"/sessions/{session_id}")


def test_a_session_beyond_the_memory_budget_is_refused(test_root):
    small = start_service(test_root, "shared-small", env={"STUDIO_DRIVER_MODE": "shared", "STUDIO_POOL_SIZE": "0", "STUDIO_MEMORY_BUDGET_MB": "256", "STUDIO_CONNECT_PORT": "-1"})
    try:
        with small.http() as http:
            response = http.post("/sessions", json={"kind": "pyspark"})
            assert response.status_code == 400, response.text
            message = response.json()["msg"]
            assert "memory" in message and "256 MB" in message and "STUDIO_MEMORY_BUDGET_MB" in message
            assert http.get("/sessions").json()["total"] == 0
    finally:
        assert small.stop() == 0


def test_a_restart_keeps_shared_sessions_and_their_driver(service, users):
    """The service lets go of its users' drivers and lean sessions when it stops keeping sessions, and the
    next start carries on with them: the session's temp view is still there (the same Connect session)."""
    service.env["STUDIO_STOP_SESSIONS_ON_EXIT"] = "false"
    service.restart()  # the running service stops everything on exit; the next one keeps its sessions
    alice = httpx.Client(base_url=service.url, timeout=120, headers=auth_headers(service.tokens["alice"]), trust_env=False)
    try:
        session_id = create(alice)
        wait_idle(alice, session_id)
        text(alice, session_id, "spark.range(4).createOrReplaceTempView('kept')\nprint('made')")
        before = {d["user"]: d["pid"] for d in drivers(alice)}
        service.restart()
        assert wait_idle(alice, session_id)["state"] == "idle"
        assert {d["user"]: d["pid"] for d in drivers(alice)} == before  # the same driver, taken back
        assert text(alice, session_id, "print(spark.table('kept').count())") == "4"
        alice.delete(f"/sessions/{session_id}")
    finally:
        alice.close()
        service.env["STUDIO_STOP_SESSIONS_ON_EXIT"] = "true"
        service.restart()  # and the module's end stops everything again
