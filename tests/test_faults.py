"""Faults, with small misbehaving worker programs selected by STUDIO_WORKER_COMMAND: a worker
that never gets ready, one that crashes on start, one that ignores polite and SIGTERM stops."""

from __future__ import annotations

import json
import sys
import time

import pytest

from conftest import start_service
from helpers import REPO

MISBEHAVING = json.dumps([sys.executable, str(REPO / "tests" / "workers" / "misbehaving.py")])


def faulty_service(test_root, name: str, mode: str, **env: str):
    return start_service(
        test_root,
        name,
        env={
            "STUDIO_WORKER_COMMAND": MISBEHAVING,
            "STUDIO_TEST_WORKER": mode,
            "STUDIO_STOP_TIMEOUT": "1",
            **env,
        },
    )


def test_a_worker_that_never_starts_times_out(test_root):
    service = faulty_service(test_root, "never-ready", "never-ready", STUDIO_POOL_SIZE="0", STUDIO_WORKER_START_TIMEOUT="2")
    livy = service.client()
    try:
        session = livy.create_session(kind="pyspark")
        assert session["state"] == "starting"
        response = livy.http.post(f"/sessions/{session['id']}/statements", json={"code": "1"})
        assert response.status_code == 409 and "starting" in response.json()["msg"]
        dead = livy.wait_session(session["id"], states=("dead",), timeout=30)
        log = livy.log(session["id"], size=-1)["log"]
        assert any("did not start in 2s" in line and "STUDIO_WORKER_START_TIMEOUT" in line for line in log), log
        assert dead["state"] == "dead"
        assert livy.http.get("/version").status_code == 200
    finally:
        livy.close()
        assert service.stop() == 0
    assert not service.leftovers()


def test_a_crashing_pool_stops_refilling_and_says_why(test_root):
    service = faulty_service(
        test_root, "crash", "crash-on-start", STUDIO_POOL_SIZE="1", STUDIO_WORKER_RESTART_LIMIT="2"
    )
    livy = service.client()
    try:
        deadline = time.monotonic() + 30
        while True:
            pool = livy.http.get("/studio/status").json()["pool"]
            if pool["failuresInARow"] >= 2:
                break
            assert time.monotonic() < deadline, pool
            time.sleep(0.2)
        assert "exited with code 7" in pool["lastError"]
        # Sessions fall back to a cold worker, which fails the same way: a dead session whose log
        # says why, and a service that keeps serving.
        session = livy.create_session(kind="pyspark")
        livy.wait_session(session["id"], states=("dead",), timeout=30)
        log = livy.log(session["id"], size=-1)["log"]
        assert any("crashing on purpose" in line for line in log), log
        assert any("exited with code 7" in line for line in log), log
        time.sleep(1)
        assert livy.http.get("/studio/status").json()["pool"]["failuresInARow"] == 2  # no more attempts
    finally:
        livy.close()
        assert service.stop() == 0
    assert not service.leftovers()


def test_a_worker_that_ignores_sigterm_is_killed_with_its_process_group(test_root):
    service = faulty_service(test_root, "stubborn", "ignore-sigterm", STUDIO_POOL_SIZE="0")
    livy = service.client()
    try:
        session = livy.create_session(kind="pyspark")
        livy.wait_session(session["id"], timeout=30)
        assert livy.text(session["id"], "echo me") == "echo me"
        workdirs = service.leftovers()
        assert len(workdirs) >= 2  # the worker and its stubborn grandchild
        started = time.monotonic()
        assert livy.http.delete(f"/sessions/{session['id']}").status_code == 200
        assert time.monotonic() - started < 10
        log = service.get(f"/ui/session/{session['id']}/log").text  # a DELETEd session's log stays here
        assert "stopped (SIGKILL)" in log, log
        assert not service.leftovers()
    finally:
        livy.close()
        assert service.stop() == 0
    assert not service.leftovers()


def test_service_shutdown_stops_every_worker(test_root):
    service = faulty_service(test_root, "shutdown", "ignore-sigterm", STUDIO_POOL_SIZE="2")
    livy = service.client()
    try:
        service.wait_pool(2, timeout=30)
        livy.wait_session(livy.create_session(kind="pyspark")["id"], timeout=30)
        assert service.leftovers()
    finally:
        livy.close()
        assert service.stop() == 0
    assert not service.leftovers()


@pytest.mark.parametrize("size", [2_000_000])
def test_oversized_request_bodies_are_refused(test_root, size):
    service = start_service(test_root, "limits", env={"STUDIO_POOL_SIZE": "0", "STUDIO_MAX_REQUEST_BYTES": "1048576"})
    try:
        with service.http() as http:
            response = http.post("/sessions", content=b"{" + b" " * size + b"}", headers={"Content-Type": "application/json"})
        assert response.status_code == 413 and "limit" in response.json()["msg"]
    finally:
        assert service.stop() == 0


def test_too_many_sessions_get_a_clear_refusal_and_ids_survive_a_restart(test_root):
    service = faulty_service(test_root, "cap", "ignore-sigterm", STUDIO_POOL_SIZE="0", STUDIO_MAX_SESSIONS="1")
    livy = service.client()
    try:
        first = livy.create_session(kind="pyspark")
        refused = livy.http.post("/sessions", json={"kind": "pyspark"})
        assert refused.status_code == 400
        assert "too many sessions" in refused.json()["msg"] and "STUDIO_MAX_SESSIONS" in refused.json()["msg"]
        livy.http.delete(f"/sessions/{first['id']}")
        second = livy.create_session(kind="pyspark")
        assert second["id"] == first["id"] + 1
    finally:
        livy.close()
        assert service.stop() == 0
    restarted = faulty_service(test_root, "cap", "ignore-sigterm", STUDIO_POOL_SIZE="0")
    livy = restarted.client()
    try:
        # Ids keep counting across restarts, so a client never confuses an old session with a new one.
        assert livy.http.get(f"/sessions/{second['id']}").status_code == 404
        assert livy.create_session(kind="pyspark")["id"] == second["id"] + 1
    finally:
        livy.close()
        assert restarted.stop() == 0
    assert not restarted.leftovers()
