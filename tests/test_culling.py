"""Told before it happens (issue 11): a notebook learns that its idle session is near being
stopped, %%info says how long it has left, and once it is stopped the next cell says why and that
the next one starts a new session; the service keeps saying why, also after no Livy route shows
the session any more. No Spark is needed for this: the sessions are the small `echo` stand-in
worker of tests/workers/misbehaving.py, through the real service and the real kernel."""

from __future__ import annotations

import json
import re
import sys
import time
from typing import Any

from conftest import start_service
from helpers import REPO
from kernelhelpers import Kernel

ECHO = {
    "STUDIO_WORKER_COMMAND": json.dumps([sys.executable, str(REPO / "tests" / "workers" / "misbehaving.py")]),
    "STUDIO_TEST_WORKER": "echo",
    "STUDIO_POOL_SIZE": "0",
    "STUDIO_CULL_INTERVAL": "0.5",
    "STUDIO_STOP_TIMEOUT": "2",
}


def _stderr(result: Any) -> str:
    return "".join(o["content"]["text"] for o in result.outputs if o["msg_type"] == "stream" and o["content"]["name"] == "stderr")


def test_a_notebook_is_told_before_its_idle_session_is_stopped_and_then_why(test_root, tmp_path):
    service = start_service(test_root, "culling", env=ECHO)
    kernel = Kernel(tmp_path, {"STUDIO_LIVY_URL": service.url})
    try:
        kernel.ok('%%configure\n{"idleTimeout": "8s"}')
        first = kernel.ok("'first'")
        assert "had been idle" not in _stderr(first)
        session_id = int(re.search(r"Session (\d+) has been idle", kernel.ok("%%info").text()).group(1))

        time.sleep(4.5)  # over half of its idle time: the next cell says so
        second = kernel.ok("'second'")
        told = _stderr(second)
        assert f"Spark session {session_id} had been idle for 5 s; the service stops a session after 8 s without a statement" in told, told
        info = kernel.ok("%%info").text()
        assert re.search(rf"Session {session_id} has been idle for \d s; it is stopped after 8 s without a statement, so \d s are left \(until \d\d:\d\d\) unless a cell runs", info), info
        with service.http() as http:
            described = http.get(f"/studio/sessions/{session_id}").json()
        assert described["state"] == "idle" and described["idleTimeout"] == 8 and described["idleTimeoutSource"] == "its idleTimeout"
        assert 0 < described["stopsInSeconds"] <= 8 and described["reason"] is None

        time.sleep(10)  # culled meanwhile
        with service.http() as http:
            assert http.get(f"/sessions/{session_id}").json()["state"] == "dead"  # never shown alive
        gone = kernel.run("'third'")
        assert gone.status == "error" and gone.reply["ename"] == "SessionLost", gone.reply
        evalue = gone.reply["evalue"]
        assert evalue.startswith(f"Spark session {session_id} has ended: it was inactive for "), evalue
        assert "(its idleTimeout is 8s); the next cell starts a new session, and the variables of this one are lost" in evalue, evalue
        info = kernel.ok("%%info").text()
        assert f"This notebook's last session, {session_id}, is dead: it was inactive for" in info, info
        assert kernel.ok("'fourth'").stdout.strip().endswith("'fourth'")  # a new session
        new_id = int(re.search(r"Session (\d+) has been idle", kernel.ok("%%info").text()).group(1))
        assert new_id != session_id

        # The service keeps saying why, also once no Livy route shows the session (deleted, or retained no more).
        with service.http() as http:
            assert http.delete(f"/sessions/{new_id}").status_code == 200
            assert http.get(f"/sessions/{new_id}").status_code == 404
            deleted = http.get(f"/studio/sessions/{new_id}").json()
            assert deleted == {
                "id": new_id, "name": None, "owner": "admin", "proxyUser": "admin", "state": "killed", "reason": "deleted by the client",
                "endedAt": deleted["endedAt"], "listed": False,
            }  # fmt: skip
            culled = http.get(f"/studio/sessions/{session_id}").json()
            assert culled["state"] == "dead" and culled["reason"].startswith("it was inactive for")
            assert http.get("/studio/sessions/9999").status_code == 404
        gone = kernel.run("'fifth'")
        assert gone.reply["evalue"].startswith(f"Spark session {new_id} has ended: deleted by the client; the next"), gone.reply
    finally:
        kernel.shutdown()
        assert service.stop() == 0
    assert not service.leftovers()
