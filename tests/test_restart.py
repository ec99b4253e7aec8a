"""Sessions survive a restart of the session service (issue 11): workers outlive `studio livy`,
and the next start finds every live one again, with its variables, cached data, statements and
Spark application; a worker whose service never comes back stops itself; a service told to stop
everything does. A workspace's PySpark kernel, in its JupyterLab, keeps its session across a clean
restart and a crash of `studio serve`.

Real services, real workers, real Spark. The services here keep their sessions when they stop
(STUDIO_STOP_SESSIONS_ON_EXIT=false; the test helpers' default is to stop everything).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import psutil
import pytest
from jupyter_core.utils import ensure_event_loop

from conftest import start_service
from helpers import LivyClient, ServiceProcess
from kernelhelpers import Kernel
from workspace_helpers import LabKernel, StudioProcess, alive, wait_gone

KEEP = {
    "STUDIO_STOP_SESSIONS_ON_EXIT": "false",
    "STUDIO_POOL_SIZE": "0",  # cold sessions only: no refill competes with the measurement
    "STUDIO_WORKER_ORPHAN_TIMEOUT": "300",
}

SESSIONS = 5
SETUP = """
df = spark.range(200000).selectExpr("id", "id % 7 AS k").cache()
rows = df.count()
secret = {n} * 1000 + 7
spark.range({n} + 1).createOrReplaceTempView("view_{n}")
"""
# The variables, the cached DataFrame (still in Spark's cache: a persistent RDD), the temp view
# and the Spark application, all as they were.
CHECK = "(secret, rows, df.count(), spark.table('view_{n}').count(), sc._jsc.getPersistentRDDs().size() > 0, sc.applicationId)"
TARGET_SECONDS = 5.0


@pytest.fixture(scope="module")
def service(test_root):
    service = start_service(test_root, "restart", env=KEEP)
    yield service
    if service.process is not None and service.process.poll() is None:
        service.args.append("--stop-sessions-on-exit")
        service.restart(signal.SIGTERM)
        service.stop()
    assert not service.leftovers()


@pytest.fixture(scope="module")
def sessions(service) -> list[dict[str, Any]]:
    """Five idle sessions with cached data, variables and a temp view, and what each answers."""
    livy = service.client()
    created = [livy.create_session(kind="pyspark", name=f"notebook-{n}") for n in range(SESSIONS)]
    ready = []
    for n, session in enumerate(created):
        ready.append(livy.wait_session(session["id"], timeout=300))
        livy.text(session["id"], SETUP.format(n=n))
    for n, session in enumerate(ready):
        session["answer"] = livy.text(session["id"], CHECK.format(n=n))
        session["statements"] = livy.http.get(f"/sessions/{session['id']}/statements").json()
        assert f"{n * 1000 + 7}, 200000, 200000, {n + 1}, True, '{session['appId']}'" in session["answer"]
    livy.close()
    return ready


def _answer_all(service: ServiceProcess, sessions: list[dict[str, Any]]) -> tuple[list[str], float]:
    """Every session's next statement, side by side, as notebooks would send them; the time until
    the last answered."""
    started = time.monotonic()

    def ask(n: int) -> str:
        livy = LivyClient(service.url, service.token)
        try:
            return livy.text(sessions[n]["id"], CHECK.format(n=n))
        finally:
            livy.close()

    with ThreadPoolExecutor(SESSIONS) as pool:
        answers = list(pool.map(ask, range(SESSIONS)))
    return answers, time.monotonic() - started


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_five_sessions_with_cached_data_survive_a_restart(service, sessions, sig):
    with service.http() as http:
        before = {s["id"]: http.get(f"/sessions/{s['id']}").json() for s in sessions}
    _, unrestarted = _answer_all(service, sessions)  # the same statements without a restart, for scale
    with service.http() as http:
        for session in sessions:
            session["statements"] = http.get(f"/sessions/{session['id']}/statements").json()
    listening = service.restart(sig)
    answers, answering = _answer_all(service, sessions)
    total = listening + answering
    print(
        f"\nrestart after {sig.name}: listening {listening:.2f}s after the new process started, all {SESSIONS} "
        f"sessions answered {total:.2f}s after it (the same statements took {unrestarted:.2f}s without a restart)"
    )
    for session, answer in zip(sessions, answers):
        assert answer == session["answer"]
    with service.http() as http:
        for session in sessions:
            after = http.get(f"/sessions/{session['id']}").json()
            for key in ("id", "name", "owner", "kind", "appId", "conf", "driverMemory", "heartbeatTimeoutInSecond"):
                assert after[key] == before[session["id"]][key], key
            assert after["state"] == "idle"
            statements = http.get(f"/sessions/{session['id']}/statements").json()["statements"]
            # The history as it was (code, state, output, timings), plus the statement just answered.
            assert statements[: len(session["statements"]["statements"])] == session["statements"]["statements"]
            session["statements"] = {"statements": statements}
    # What the restart costs over the same statements without one (the machine's load varies a lot).
    assert total - unrestarted <= TARGET_SECONDS, f"{total:.2f}s from the new process's start to all answering"


def _long_poll(service: ServiceProcess, sid: int, statement_id: int, found: dict[str, Any]) -> None:
    """A client long-polling one statement that reconnects when the service goes away meanwhile."""
    found["broken"] = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with service.http(timeout=60) as http:
                answer = http.get(f"/sessions/{sid}/statements/{statement_id}", params={"wait": 30})
            if answer.status_code == 200 and answer.json()["state"] == "available":
                found["statement"] = answer.json()
                return
        except httpx.TransportError:
            found["broken"] += 1
        time.sleep(0.2)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_running_statement_and_a_long_poll_cross_a_restart(service, sessions, sig):
    sid = sessions[0]["id"]
    livy = service.client()
    # Long enough to outlast the old service's graceful stop (uvicorn's 5 s) after SIGTERM.
    code = "import time\nfor i in range(10):\n    print('tick', i, flush=True)\n    time.sleep(1)\nsecret + 1"
    running = livy.submit(sid, code)
    waiting = livy.submit(sid, "secret + 2")  # accepted, not started before the restart
    deadline = time.monotonic() + 30
    while True:  # it runs and has printed: the restart happens in the middle of it
        seen = livy.http.get(f"/sessions/{sid}/statements/{running['id']}", params={"wait": 5, "stream": 0}).json()
        if seen["state"] == "running" and "tick 0" in seen["stream"]["text"]:
            break
        assert time.monotonic() < deadline, seen
    livy.close()
    found: dict[str, Any] = {}
    poller = threading.Thread(target=_long_poll, args=(service, sid, running["id"], found))
    poller.start()
    time.sleep(0.3)
    service.restart(sig)
    poller.join(150)
    statement = found.get("statement")
    assert statement is not None, found
    assert found["broken"] >= 1  # the long-poll really crossed the restart
    assert statement["output"]["status"] == "ok"
    ticks = "".join(f"tick {i}\n" for i in range(10))
    assert statement["output"]["data"]["text/plain"] == ticks + "8"
    livy = service.client()
    try:
        # What it printed is all there from the first character, also the part printed before the restart.
        streamed = livy.http.get(f"/sessions/{sid}/statements/{running['id']}", params={"stream": 0}).json()["stream"]
        assert streamed["text"] == ticks + "8\n" and streamed["total"] == len(ticks) + 2
        later = livy.wait_statement(sid, waiting["id"], timeout=60)
        assert later["output"]["data"]["text/plain"] == "9"
        assert later["started"] >= statement["completed"]  # it ran after the other one, once
        ids = [s["id"] for s in livy.http.get(f"/sessions/{sid}/statements").json()["statements"]]
        assert ids.count(running["id"]) == 1 and ids.count(waiting["id"]) == 1
        assert livy.session(sid)["state"] == "idle"
    finally:
        livy.close()


def test_a_retried_submit_runs_once(service, sessions):
    """A client whose POST's answer was lost sends it again with the same Idempotency-Key."""
    sid = sessions[1]["id"]
    with service.http() as http:
        first = http.post(f"/sessions/{sid}/statements", json={"code": "counter = globals().get('counter', 0) + 1; counter"}, headers={"Idempotency-Key": "k-1"})
        again = http.post(f"/sessions/{sid}/statements", json={"code": "counter = globals().get('counter', 0) + 1; counter"}, headers={"Idempotency-Key": "k-1"})
        assert first.status_code == again.status_code == 201
        assert first.json()["id"] == again.json()["id"]
    service.restart(signal.SIGTERM)  # the key is on record, too
    with service.http() as http:
        third = http.post(f"/sessions/{sid}/statements", json={"code": "counter = globals().get('counter', 0) + 1; counter"}, headers={"Idempotency-Key": "k-1"})
        assert third.json()["id"] == first.json()["id"]
        done = http.get(f"/sessions/{sid}/statements/{first.json()['id']}", params={"wait": 30}).json()
        assert done["output"]["data"]["text/plain"] == "1"


def test_a_session_whose_worker_died_meanwhile_is_dead_with_the_reason(service, sessions):
    victim = sessions.pop()
    assert service.get(f"/studio/sessions/{victim['id']}").json()["state"] == "idle"

    def kill_its_worker() -> None:
        with sqlite3.connect(service.state_dir / "studio.db") as db:
            (record,) = db.execute(
                "SELECT process FROM workers WHERE session_id = ? AND ended_at IS NULL", (victim["id"],)
            ).fetchone()
        os.killpg(json.loads(record)["process"]["pgid"], signal.SIGKILL)

    service.restart(signal.SIGTERM, between=kill_its_worker)
    session = service.get(f"/sessions/{victim['id']}").json()
    assert session["state"] == "dead"  # never shown alive
    described = service.get(f"/studio/sessions/{victim['id']}").json()
    assert described["reason"] == "its worker ended while the service was not running"
    with service.http() as http:
        assert http.post(f"/sessions/{victim['id']}/statements", json={"code": "1"}).status_code == 400


def _session_id(kernel: Kernel | LabKernel) -> int:
    text = kernel.ok("%%info").text()
    match = re.search(r"Session (\d+) (has been idle|is busy|is never)", text)
    assert match, text
    return int(match.group(1))


def _stderr(result: Any) -> str:
    return "".join(o["content"]["text"] for o in result.outputs if o["msg_type"] == "stream" and o["content"]["name"] == "stderr")


def test_the_kernel_keeps_its_session_across_restarts(service, sessions, tmp_path):
    kernel = Kernel(tmp_path, {"STUDIO_LIVY_URL": service.url})
    try:
        kernel.ok("kept = 41\nspark.range(10).count()")
        session_id = _session_id(kernel)
        service.restart(signal.SIGTERM)
        assert kernel.ok("kept + 1").stdout.strip().endswith("42")
        # A cell that runs while the service is killed and started again: it waits, then gets its answer.
        found: dict[str, Any] = {}

        def run_cell() -> None:
            try:
                found["result"] = kernel.run("import time\ntime.sleep(6)\nkept + 2", timeout=240)
            finally:
                ensure_event_loop().close()  # jupyter_client gave this thread an event loop; it ends with it

        cell = threading.Thread(target=run_cell)  # the restart stays on this thread: it starts the service
        cell.start()
        time.sleep(2)
        service.restart(signal.SIGKILL)
        cell.join(260)
        result = found["result"]
        assert result.status == "ok", result.text()
        assert result.stdout.strip().endswith("43")
        told = _stderr(result)
        assert "does not answer; it may be restarting" in told and "answers again" in told, told
        assert _session_id(kernel) == session_id
    finally:
        kernel.shutdown()


def test_stop_sessions_on_exit_stops_every_worker(service, sessions):
    assert service.leftovers()  # the workers of the sessions
    service.args.append("--stop-sessions-on-exit")
    service.restart(signal.SIGTERM)  # adopts them
    assert service.stop() == 0
    assert not service.leftovers()


def test_a_worker_whose_service_never_returns_stops_itself(test_root):
    service = start_service(test_root, "orphan", env={**KEEP, "STUDIO_WORKER_ORPHAN_TIMEOUT": "3"})
    livy = service.client()
    try:
        session = livy.wait_session(livy.create_session(kind="pyspark")["id"], timeout=300)
        assert livy.text(session["id"], "1 + 1") == "2"
    finally:
        livy.close()
    assert service.process is not None
    service.process.send_signal(signal.SIGKILL)
    service.process.wait_sync(30)
    assert service.leftovers()  # the worker and its JVM run on without their service, for a while
    deadline = time.monotonic() + 60
    while service.leftovers() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not service.leftovers()
    log = (service.state_dir / "logs").glob("worker-*.log")
    assert any("no service for 3s (STUDIO_WORKER_ORPHAN_TIMEOUT); stopping" in path.read_text() for path in log)



def _leave_nothing(studio: StudioProcess) -> list[tuple[int, str]]:
    """What a failed test left running under the studio's folder, killed (not for the next tests to
    trip on); returned, so that the test can fail on it."""
    left = studio.leftovers()
    for pid, _ in left:
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).kill()
    return left


def test_restarts_of_studio_serve_keep_a_workspace_kernels_session(test_root):
    """A PySpark kernel in a workspace's real JupyterLab, driven through JupyterLab's API as the
    browser drives it, keeps its Spark session and variables when `studio serve` stops cleanly
    (SIGTERM, as an upgrade stops it) and starts again, and when it crashes (SIGKILL): JupyterLab
    and the kernel run on, the embedded session service lets go of the session's worker and the
    next one (here on another port) adopts it, the next `studio serve` finds the workspace again,
    and the kernel finds its compute through the Studio. A `studio serve --stop-sessions-on-exit`
    stops all of it when it stops."""
    folder = test_root / "serve-restart"
    env = {"STUDIO_STOP_SESSIONS_ON_EXIT": "false", "STUDIO_JUPYTERLAB_STOP_TIMEOUT": "5"}
    studio = StudioProcess(folder, env=env, pool=0).start()
    try:
        with studio.client() as api:
            workspace = api.create(name="keeps", compute="local", start=True)
            attached = api.wait_state(workspace["id"], ("Attached",), timeout=180)
        lab_pid = attached["jupyterlab"]["pid"]
        kernel = LabKernel(attached)
        kernel.ok("kept = 7")
        kernel_pid = kernel.pid(lab_pid)
        session_id = _session_id(kernel)
        for how in ("SIGTERM", "SIGKILL"):
            livy_before = studio.get("/api/status").json()["embeddedSessionService"]
            if how == "SIGTERM":
                assert studio.stop() == 0, studio.log_tail()
            else:
                studio.crash()
            assert alive(lab_pid) and alive(kernel_pid), how
            studio = StudioProcess(folder, env=env, pool=0).start()
            with studio.client() as api:
                found = api.workspace(workspace["id"])
            assert found["state"] == "Attached", (how, found)
            assert found["reason"] == f"Found running again (JupyterLab pid {lab_pid}) after studio serve restarted.", how
            assert found["lab_url"] == attached["lab_url"], how
            assert studio.get("/api/status").json()["embeddedSessionService"] != livy_before  # it moved (--livy-port 0)
            result = kernel.ok("kept * 6")
            assert result.stdout.strip().endswith("42"), (how, result.text())
            assert "moved to" in _stderr(result), (how, _stderr(result))
            assert _session_id(kernel) == session_id, how

        # A server that stops everything when it stops: it adopts all of it, then ends it.
        assert studio.stop() == 0, studio.log_tail()
        studio = StudioProcess(folder, env=env, pool=0, args=["--stop-sessions-on-exit"]).start()
        with studio.client() as api:
            assert api.workspace(workspace["id"])["state"] == "Attached"
        assert studio.stop() == 0, studio.log_tail()
        assert wait_gone(lab_pid) and wait_gone(kernel_pid)
        assert not studio.leftovers()  # JupyterLab, the kernel, the session service and the session's worker
        with contextlib.closing(sqlite3.connect(studio.state_dir / "studio.db")) as db:
            state, reason = db.execute("SELECT state, reason FROM workspaces WHERE id = ?", (workspace["id"],)).fetchone()
        assert (state, reason) == ("Idle", "Stopped because studio serve stopped.")
    finally:
        if studio.process is not None and studio.process.poll() is None:
            studio.stop()
        left = _leave_nothing(studio)
    assert not left, f"processes left behind: {left}"
