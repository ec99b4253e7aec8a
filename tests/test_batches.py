"""Batches through HTTP: spark-submit runs that succeed, fail and are killed, with their logs."""

from __future__ import annotations

import time

import pytest

from conftest import start_service
from helpers import REPO, processes_under

FILES = REPO / "tests" / "files"


@pytest.fixture(scope="module")
def service(test_root):
    svc = start_service(test_root, "batches", env={"STUDIO_POOL_SIZE": "0", "STUDIO_CULL_INTERVAL": "1"})
    yield svc
    assert svc.stop() == 0
    assert not svc.leftovers()


@pytest.fixture(scope="module")
def livy(service):
    client = service.client()
    yield client
    client.close()


def submit(livy, **body):
    response = livy.http.post("/batches", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def wait_batch(livy, batch_id, states, timeout=240):
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        batch = livy.http.get(f"/batches/{batch_id}").json()
        if not seen or seen[-1] != batch["state"]:
            seen.append(batch["state"])
        if batch["state"] in states:
            return batch, seen
        assert time.monotonic() < deadline, (batch, seen)
        time.sleep(0.2)


def batch_log(livy, batch_id):
    return livy.http.get(f"/batches/{batch_id}/log", params={"size": -1}).json()


def test_batches_succeed_fail_and_are_killed(livy, service):
    ok = submit(
        livy,
        file=str(FILES / "batch_count.py"),
        args=["1000", "extra"],
        pyFiles=[str(FILES / "batch_helper.py")],
        name="counting",
        conf={"spark.sql.shuffle.partitions": "4"},
    )
    failing = submit(livy, file=str(FILES / "batch_fail.py"))
    long = submit(livy, file=str(FILES / "batch_long.py"), driverMemory="600m")
    assert ok["state"] == "starting" and set(ok) == {"id", "name", "owner", "proxyUser", "state", "appId", "appInfo", "log"}
    assert isinstance(ok["id"], int) and ok["name"] == "counting"
    # Two live batches never share a name; a name finds its batch, as in Livy.
    taken = livy.http.post("/batches", json={"file": str(FILES / "batch_count.py"), "name": "counting"})
    assert taken.status_code == 400 and "already exists" in taken.json()["msg"]
    assert livy.http.get("/batches/counting").json()["id"] == ok["id"]

    running, seen = wait_batch(livy, long["id"], ("running",))
    assert running["appId"].startswith("local-")
    deadline = time.monotonic() + 120
    while not any("LONG BATCH STARTED" in line for line in batch_log(livy, long["id"])["log"]):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert livy.http.delete(f"/batches/{long['id']}").json() == {"msg": "deleted"}
    # As in Livy, a DELETEd batch is gone at once; its log stays at its driverLogUrl for a while.
    assert livy.http.get(f"/batches/{long['id']}").status_code == 404
    assert long["id"] not in [b["id"] for b in livy.http.get("/batches").json()["sessions"]]
    assert f"batch {long['id']} is killed" in service.get(running["appInfo"]["driverLogUrl"]).text
    assert not [p for p in service.leftovers() if f"batch-{long['id']}" in p[1] or "batch_long" in p[1]]

    done, seen = wait_batch(livy, ok["id"], ("success", "dead"))
    assert done["state"] == "success", batch_log(livy, ok["id"])
    assert "running" in seen
    assert done["appId"].startswith("local-")
    log = batch_log(livy, ok["id"])
    assert log["total"] == len(log["log"])
    assert any("BATCH RESULT 1000 args=['1000', 'extra'] helper=helper-module" in line for line in log["log"])

    dead, _ = wait_batch(livy, failing["id"], ("success", "dead"))
    assert dead["state"] == "dead"
    assert any("this batch fails on purpose" in line for line in batch_log(livy, failing["id"])["log"])

    listing = livy.http.get("/batches", params={"from": 0, "size": 10}).json()
    assert listing["total"] >= 2 and {b["id"] for b in listing["sessions"]} >= {ok["id"], failing["id"]}
    assert livy.http.get(f"/batches/{ok['id']}/state").json() == {"id": ok["id"], "state": "success"}
    text = livy.http.get(f"/ui/batch/{ok['id']}/log").text
    assert "BATCH RESULT" in text
    # A batch that ended on its own stays listed until it is DELETEd.
    assert livy.http.delete(f"/batches/{failing['id']}").status_code == 200
    assert livy.http.get(f"/batches/{failing['id']}").status_code == 404
    assert livy.http.delete(f"/batches/{failing['id']}").status_code == 404
    assert "this batch fails on purpose" in service.get(f"/ui/batch/{failing['id']}/log").text
    # Its name is free again once it is no longer live.
    again = submit(livy, file=str(FILES / "batch_count.py"), args=["3"], pyFiles=[str(FILES / "batch_helper.py")], name="counting")
    assert livy.http.get("/batches/counting").json()["id"] == again["id"]
    wait_batch(livy, again["id"], ("success", "dead"))


@pytest.mark.parametrize(
    "body, text",
    [
        ({"file": "/no/such/app.py"}, "does not exist"),
        ({"file": "relative/app.py"}, "absolute path"),
        ({"args": ["1"]}, 'Field "file" is required'),
        ({"file": str(FILES / "batch_count.py"), "pyFiles": ["/no/such/lib.py"]}, "does not exist"),
        ({"file": str(FILES / "batch_count.py"), "conf": {"spark.submit.deployMode": "cluster"}}, "Blacklisted"),
        ({"file": str(FILES / "batch_count.py"), "numExecutors": "two"}, "numExecutors"),
        ({"file": str(FILES / "batch_count.py"), "args": ["1", {"n": 2}]}, "args must be a list of strings"),
        ({"file": str(FILES / "batch_count.py"), "driverMemory": "lots"}, "invalid driverMemory"),
        ({"file": str(FILES / "batch_count.py"), "name": "42"}, "must not be a number"),
    ],
)
def test_bad_batches_are_refused(livy, body, text):
    response = livy.http.post("/batches", json=body)
    assert response.status_code == 400
    assert text in response.json()["msg"]


def test_batch_processes_are_gone_after_success(livy, service):
    batch = submit(livy, file=str(FILES / "batch_count.py"), args=["5"], pyFiles=[str(FILES / "batch_helper.py")])
    wait_batch(livy, batch["id"], ("success", "dead"))
    workdir = service.state_dir / "work" / f"batch-{batch['id']}"
    assert workdir.is_dir()
    assert not processes_under(workdir)
