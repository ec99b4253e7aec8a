"""Access control of the session service (Livy's ``livy.server.access-control`` semantics,
``studio.livy.access``) through the real gate, with real users and their personal tokens, and the
user's identity carried to Spark, in real workers and a real batch.

Users (made with the users' directory before the service starts, which shares it): alice and bob
(role user; alice's own quota is one live session or batch), victor (STUDIO_VIEW_USERS), mona
(STUDIO_MODIFY_USERS), and the studio's token holder, admin. One service with a warm pool of one
serves the module; its drivers: alice's session (warm, from the pool), bob's (cold: its conf
needs a JVM of its own), admin's session run as bob (the pool's refill), and bob's batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import httpx
import nbformat
import pytest

from conftest import start_service
from helpers import REPO, TEST_TOKEN
from studio.auth.users import Directory

FILES = REPO / "tests" / "files"
SPARK_USER_CODE = (
    "import os\n"
    "ugi = sc._jvm.org.apache.hadoop.security.UserGroupInformation.getCurrentUser().getShortUserName()\n"
    "print(sc.sparkUser(), os.environ['SPARK_USER'], os.environ['HADOOP_USER_NAME'], ugi, spark.conf.get('spark.studio.user'))"
)


@pytest.fixture(scope="module")
def service(test_root):
    state = test_root / "access"
    tokens = {}
    with Directory(state) as directory:  # the service's identity directory is its state directory
        for name in ("alice", "bob", "victor", "mona"):
            tokens[name] = directory.add_user(name)[1]
        directory.set_quotas("alice", {"sessions": 1})
    svc = start_service(
        test_root,
        "access",
        env={
            "STUDIO_POOL_SIZE": "1",
            "STUDIO_POOL_WARMUP_SECONDS": "1",
            "STUDIO_VIEW_USERS": "victor",
            "STUDIO_MODIFY_USERS": "mona",
            "STUDIO_CULL_INTERVAL": "1",
        },
    )
    svc.tokens = {**tokens, "admin": TEST_TOKEN}  # type: ignore[attr-defined]
    svc.wait_pool(1)
    yield svc
    assert svc.stop() == 0
    assert not svc.leftovers()


@pytest.fixture(scope="module")
def users(service):
    """An httpx client per user, each with its own personal token as a Bearer token."""
    clients = {
        name: httpx.Client(base_url=service.url, timeout=120, headers={"Authorization": f"Bearer {token}"}, trust_env=False)
        for name, token in service.tokens.items()
    }
    yield clients
    for client in clients.values():
        client.close()


def wait_idle(http: httpx.Client, session_id: int, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        session = http.get(f"/sessions/{session_id}").json()
        if session["state"] == "idle":
            return session
        assert session["state"] == "starting" and time.monotonic() < deadline, session
        time.sleep(0.3)


def run(http: httpx.Client, session_id: int, code: str) -> dict:
    response = http.post(f"/sessions/{session_id}/statements", json={"code": code})
    assert response.status_code == 201, response.text
    statement_id = response.json()["id"]
    deadline = time.monotonic() + 300
    while True:
        statement = http.get(f"/sessions/{session_id}/statements/{statement_id}", params={"wait": 10}).json()
        if statement["state"] in ("available", "cancelled"):
            return statement
        assert time.monotonic() < deadline, statement


def text(http: httpx.Client, session_id: int, code: str) -> str:
    output = run(http, session_id, code)["output"]
    assert output["status"] == "ok", output
    return output["data"]["text/plain"]


@pytest.fixture(scope="module")
def alice_session(users):
    """alice's session, from the warm pool."""
    response = users["alice"].post("/sessions", json={"kind": "pyspark", "name": "alice-notes"})
    assert response.status_code == 201, response.text
    return wait_idle(users["alice"], response.json()["id"])


@pytest.fixture(scope="module")
def bob_session(users, alice_session):
    """bob's session, cold: a conf that is not runtime SQL conf needs a driver of its own."""
    body = {"kind": "pyspark", "name": "bob-notes", "conf": {"spark.ui.showConsoleProgress": "false"}}
    response = users["bob"].post("/sessions", json=body)
    assert response.status_code == 201, response.text
    return wait_idle(users["bob"], response.json()["id"])


@pytest.fixture(scope="module")
def bob_batch(users, bob_session):
    response = users["bob"].post("/batches", json={"file": str(FILES / "batch_user.py"), "name": "bob-batch"})
    assert response.status_code == 201, response.text
    batch_id = response.json()["id"]
    deadline = time.monotonic() + 300
    while (batch := users["bob"].get(f"/batches/{batch_id}").json())["state"] not in ("success", "dead"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.5)
    assert batch["state"] == "success", users["bob"].get(f"/batches/{batch_id}/log", params={"size": -1}).text
    return batch


def listed(http: httpx.Client, kind: str) -> dict:
    response = http.get(f"/{kind}", params={"size": 1000})
    assert response.status_code == 200, response.text
    return response.json()


def forbidden(response: httpx.Response) -> str:
    assert response.status_code == 403, (response.request.method, response.request.url, response.status_code, response.text)
    return response.json()["msg"]


# -- who owns what, and who sees it ------------------------------------------------------------


def test_a_session_and_a_batch_are_their_owners_and_run_as_them(alice_session, bob_session, bob_batch):
    assert alice_session["owner"] == "alice" and alice_session["proxyUser"] == "alice"
    assert bob_session["owner"] == "bob" and bob_session["proxyUser"] == "bob"
    assert bob_batch["owner"] == "bob" and bob_batch["proxyUser"] == "bob"


def test_each_user_lists_only_what_it_may_view(users, alice_session, bob_session, bob_batch):
    mine = {alice_session["id"], bob_session["id"]}
    alice, bob = listed(users["alice"], "sessions"), listed(users["bob"], "sessions")
    assert [s["id"] for s in alice["sessions"]] == [alice_session["id"]] and alice["total"] == 1
    assert [s["id"] for s in bob["sessions"]] == [bob_session["id"]] and bob["total"] == 1
    # from/size/total count the caller's list, not the service's
    page = users["bob"].get("/sessions", params={"from": 1, "size": 10}).json()
    assert page == {"from": 1, "total": 1, "sessions": []}
    for name in ("victor", "mona", "admin"):
        assert mine <= {s["id"] for s in listed(users[name], "sessions")["sessions"]}, name
    assert listed(users["alice"], "batches") == {"from": 0, "total": 0, "sessions": []}
    assert [b["id"] for b in listed(users["bob"], "batches")["sessions"]] == [bob_batch["id"]]
    for name in ("victor", "mona", "admin"):
        assert bob_batch["id"] in {b["id"] for b in listed(users[name], "batches")["sessions"]}, name


def test_every_request_of_another_user_is_403_and_says_nothing_of_the_session(users, alice_session):
    sid = alice_session["id"]
    assert text(users["alice"], sid, "secret = 'alice private value'\nsecret") == "'alice private value'"
    bob = users["bob"]
    statement = {"code": "secret"}
    for key in (sid, "alice-notes"):  # by id and by name, as every Livy route takes either
        requests = [
            bob.get(f"/sessions/{key}"),
            bob.get(f"/sessions/{key}/state"),
            bob.get(f"/sessions/{key}/log"),
            bob.get(f"/sessions/{key}/statements"),
            bob.get(f"/sessions/{key}/statements/0"),
            bob.get(f"/sessions/{key}/statements/0/arrow"),
            bob.post(f"/sessions/{key}/statements", json=statement),
            bob.post(f"/sessions/{key}/statements/0/cancel", json={}),
            bob.post(f"/sessions/{key}/completion", json={"code": "sec", "kind": "pyspark", "cursor": 3}),
            bob.post(f"/sessions/{key}/inspect", json={"code": "secret", "cursor": 3}),
            bob.delete(f"/sessions/{key}"),
            bob.get(f"/studio/sessions/{key}"),
            bob.get(f"/ui/session/{key}/log"),
        ]
        for response in requests:
            message = forbidden(response)
            assert message == f"User 'bob' may {'not see' if response.request.method == 'GET' else 'not change'} session '{key}'."
            assert "alice private" not in response.text and "alice-notes" not in response.text.replace(f"'{key}'", "")
    # Nothing of it happened: no statement was added, nothing cancelled, the session lives.
    statements = users["alice"].get(f"/sessions/{sid}/statements").json()["statements"]
    assert [s["code"] for s in statements] == ["secret = 'alice private value'\nsecret"]
    assert users["alice"].get(f"/sessions/{sid}").json()["state"] == "idle"
    # A name one may not view is not a way in either: bob cannot take it while alice's session lives.
    taken = bob.post("/sessions", json={"kind": "pyspark", "name": "alice-notes"})
    assert taken.status_code == 400 and "already exists" in taken.json()["msg"]


def test_a_batch_is_as_private_as_a_session(users, bob_batch):
    alice = users["alice"]
    bid = bob_batch["id"]
    for key in (bid, "bob-batch"):
        for response in (
            alice.get(f"/batches/{key}"),
            alice.get(f"/batches/{key}/state"),
            alice.get(f"/batches/{key}/log"),
            alice.get(f"/ui/batch/{key}/log"),
            alice.delete(f"/batches/{key}"),
        ):
            forbidden(response)
            assert "BATCH USER" not in response.text
    assert users["bob"].get(f"/batches/{bid}").json()["state"] == "success"


def test_view_users_read_and_modify_users_also_change(users, alice_session):
    sid = alice_session["id"]
    victor, mona = users["victor"], users["mona"]
    for response in (
        victor.get(f"/sessions/{sid}"),
        victor.get(f"/sessions/{sid}/statements"),
        victor.get(f"/sessions/{sid}/log"),
        victor.get(f"/studio/sessions/{sid}"),
        victor.get(f"/ui/session/{sid}/log"),
    ):
        assert response.status_code == 200, response.text
    for response in (
        victor.post(f"/sessions/{sid}/statements", json={"code": "1 + 1"}),
        victor.post(f"/sessions/{sid}/statements/0/cancel", json={}),
        victor.post(f"/sessions/{sid}/completion", json={"code": "sp", "kind": "pyspark", "cursor": 2}),
        victor.delete(f"/sessions/{sid}"),
    ):
        assert forbidden(response) == f"User 'victor' may not change session '{sid}'."
    # mona (a modify user) runs code in alice's session; its jobs name mona, the driver stays alice's
    assert text(mona, sid, "sc.sparkUser()") == "'alice'"


def test_the_admin_sees_and_changes_everything(users, alice_session, bob_session):
    admin = users["admin"]
    assert admin.get(f"/sessions/{alice_session['id']}/statements").status_code == 200
    assert text(admin, bob_session["id"], "'admin was here'") == "'admin was here'"


# -- proxyUser ----------------------------------------------------------------------------------


def test_a_user_may_name_only_itself_as_proxy_user(users):
    alice = users["alice"]
    for response in (
        alice.post("/sessions", json={"kind": "pyspark", "proxyUser": "bob"}),
        alice.post("/sessions", params={"doAs": "bob"}, json={"kind": "pyspark"}),
        alice.post("/studio/sessions/check", json={"kind": "pyspark", "proxyUser": "bob"}),
        alice.post("/batches", json={"file": str(FILES / "batch_user.py"), "proxyUser": "bob"}),
    ):
        assert forbidden(response) == "User 'alice' not allowed to impersonate 'bob'."
    assert alice.post("/studio/sessions/check", json={"kind": "pyspark", "proxyUser": "alice"}).json() == {"msg": "ok"}
    bad = users["admin"].post("/sessions", json={"kind": "pyspark", "proxyUser": "bob; rm -rf /"})
    assert bad.status_code == 400 and "cannot be a Spark user" in bad.json()["msg"]


def test_an_admin_may_run_a_session_as_anyone(service, users, bob_session):
    service.wait_pool(1)  # the pool's refill: a warm worker takes on bob's identity
    response = users["admin"].post("/sessions", json={"kind": "pyspark", "proxyUser": "bob", "name": "for-bob"})
    assert response.status_code == 201, response.text
    session = wait_idle(users["admin"], response.json()["id"])
    assert session["owner"] == "admin" and session["proxyUser"] == "bob"
    assert text(users["admin"], session["id"], SPARK_USER_CODE) == "bob bob bob bob bob"
    # As in Livy, the user a session runs as may see and use it; other users still may not.
    assert session["id"] in {s["id"] for s in listed(users["bob"], "sessions")["sessions"]}
    assert text(users["bob"], session["id"], "'bob in his proxy session'") == "'bob in his proxy session'"
    forbidden(users["alice"].get(f"/sessions/{session['id']}"))
    # Deleted, its log stays readable at its driverLogUrl for those who could read it, and no one else.
    assert users["admin"].delete(f"/sessions/{session['id']}").status_code == 200
    for name in ("admin", "bob"):
        assert "runs as bob" in users[name].get(f"/ui/session/{session['id']}/log").text
        assert users[name].get(f"/studio/sessions/{session['id']}").json()["state"] == "killed"
    forbidden(users["alice"].get(f"/ui/session/{session['id']}/log"))
    forbidden(users["alice"].get(f"/studio/sessions/{session['id']}"))


# -- quotas -------------------------------------------------------------------------------------


def test_a_create_over_the_quota_is_429_and_starts_nothing(users, alice_session):
    before = listed(users["admin"], "sessions")["total"], listed(users["admin"], "batches")["total"]
    message = "Quota reached: alice has 1 live Spark sessions and batches and may have 1."
    session = users["alice"].post("/sessions", json={"kind": "pyspark"})
    assert session.status_code == 429 and session.json()["msg"].startswith(message), session.text
    batch = users["alice"].post("/batches", json={"file": str(FILES / "batch_user.py")})
    assert batch.status_code == 429 and batch.json()["msg"].startswith(message), batch.text
    assert (listed(users["admin"], "sessions")["total"], listed(users["admin"], "batches")["total"]) == before


# -- the user's identity in Spark ------------------------------------------------------------


def test_a_warm_session_runs_as_its_user(users, alice_session):
    alice = users["alice"]
    sid = alice_session["id"]
    log = alice.get(f"/ui/session/{sid}/log").text
    assert "handed out of the warm pool" in log and "runs as alice" in log
    assert text(alice, sid, SPARK_USER_CODE) == "alice alice alice alice alice"
    ui = alice_session["appInfo"]["sparkUiUrl"]
    application = httpx.get(f"{ui}/api/v1/applications", timeout=30).json()[0]
    assert application["attempts"][0]["sparkUser"] == "alice"  # the Spark UI's "User"
    environment = httpx.get(f"{ui}/api/v1/applications/{application['id']}/environment", timeout=30).json()
    assert ["spark.studio.user", "alice"] in environment["sparkProperties"]


def test_a_cold_session_runs_as_its_user(users, bob_session):
    bob = users["bob"]
    sid = bob_session["id"]
    assert "handed out of the warm pool" not in bob.get(f"/ui/session/{sid}/log").text
    assert text(bob, sid, SPARK_USER_CODE) == "bob bob bob bob bob"
    ui = bob_session["appInfo"]["sparkUiUrl"]
    assert httpx.get(f"{ui}/api/v1/applications", timeout=30).json()[0]["attempts"][0]["sparkUser"] == "bob"


def test_a_batch_runs_as_its_user(users, bob_batch):
    log = users["bob"].get(f"/batches/{bob_batch['id']}/log", params={"size": -1}).json()["log"]
    assert "BATCH USER spark=bob env=bob hadoop=bob conf=bob" in log


def test_each_statement_s_jobs_name_who_sent_it_and_cancel_still_works(users, alice_session):
    alice, mona = users["alice"], users["mona"]
    sid = alice_session["id"]
    mine = run(alice, sid, "spark.range(1000).count()")
    theirs = run(mona, sid, "spark.range(10).count()")
    ui = alice_session["appInfo"]["sparkUiUrl"]
    jobs = httpx.get(f"{ui}/api/v1/applications/{alice_session['appId']}/jobs", timeout=30).json()
    described = {job["jobGroup"]: job["description"] for job in jobs}
    assert described[f"statement-{mine['id']}"] == f"alice: statement {mine['id']} of session {sid}: spark.range(1000).count()"
    assert described[f"statement-{theirs['id']}"] == f"mona: statement {theirs['id']} of session {sid}: spark.range(10).count()"
    # Cancel finds the statement's jobs by their group, as before: they end, and the session is idle.
    response = alice.post(f"/sessions/{sid}/statements", json={"code": "spark.range(0, 10**12, 1, 2).selectExpr('sum(id % 7)').collect()"})
    long_id = response.json()["id"]
    time.sleep(3)
    assert alice.get(f"/sessions/{sid}/statements/{long_id}").json()["state"] == "running"
    assert alice.post(f"/sessions/{sid}/statements/{long_id}/cancel", json={}).json() == {"msg": "canceled"}
    final = alice.get(f"/sessions/{sid}/statements/{long_id}", params={"wait": 30}).json()
    assert final["state"] == "cancelled", final
    assert wait_idle(alice, sid, timeout=30)["state"] == "idle"
    jobs = httpx.get(f"{ui}/api/v1/applications/{alice_session['appId']}/jobs", timeout=30).json()
    cancelled = [job for job in jobs if job["jobGroup"] == f"statement-{long_id}"]
    assert cancelled and all(job["status"] == "FAILED" for job in cancelled), cancelled
    assert all(job["description"].startswith(f"alice: statement {long_id} of session {sid}") for job in cancelled)


# -- sparkmagic ---------------------------------------------------------------------------------


def test_sparkmagic_cleanup_removes_only_the_caller_s_sessions(service, users, alice_session, bob_session, tmp_path):
    """sparkmagic's ``%%cleanup -f`` deletes every session GET /sessions lists: alice's own only."""
    python = Path(os.environ.get("STUDIO_SPARKMAGIC_PYTHON", REPO / ".venv-sparkmagic" / "bin" / "python"))
    if not python.exists():
        pytest.fail(f"sparkmagic's virtualenv is missing ({python}); run scripts/test.sh, which creates it")
    config_dir = tmp_path / "sparkmagic"
    config_dir.mkdir()
    credentials = {"username": "alice", "password": service.tokens["alice"], "url": service.url, "auth": "Basic_Access"}
    (config_dir / "config.json").write_text(json.dumps({"kernel_python_credentials": credentials}))
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell("%%cleanup -f")]
    source, executed = tmp_path / "cleanup.ipynb", tmp_path / "cleanup-out.ipynb"
    nbformat.write(notebook, source)
    env = {**os.environ, "SPARKMAGIC_CONF_DIR": str(config_dir), "JUPYTER_PLATFORM_DIRS": "1"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [str(python), str(REPO / "tests" / "sparkmagic_runner.py"), str(source), str(executed)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-5000:]
    assert listed(users["alice"], "sessions")["total"] == 0
    assert users["admin"].get(f"/studio/sessions/{alice_session['id']}").json()["state"] == "killed"
    assert users["bob"].get(f"/sessions/{bob_session['id']}").json()["state"] == "idle"
