"""The executions API of the workspace server (`POST /api/executions` ...), end to end: a real
`studio serve` with its embedded session service, real `studio run` processes, real PySpark.

One server for the module (at most one execution at a time, so queueing shows); the last test
of it stops and restarts it (stopping everything). A second server keeps its runs across restarts
(as a restart of the Studio does): a run survives a restart, one that ends meanwhile is finished
from its events, and one lost in a crash is queued again or failed with the reason.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from workspace_helpers import StudioProcess, alive, wait_gone

FINAL = ("FINISHED", "FAILED", "STOPPED")


@pytest.fixture(scope="module")
def studio(test_root):
    server = StudioProcess(
        test_root / "executions",
        env={"STUDIO_POOL_WARMUP_SECONDS": "2", "STUDIO_MAX_CONCURRENT_EXECUTIONS": "1"},
        pool=1,
    ).start()
    yield server
    if server.process is not None and server.process.poll() is None:
        assert server.stop() == 0, server.log_tail()
    assert not server.leftovers(), f"processes left behind: {server.leftovers()}"


@pytest.fixture(scope="module")
def workspace(studio) -> dict[str, Any]:
    client = studio.client()
    created = client.create(name="jobs", description="scheduled notebooks")
    client.close()
    return created


def api(studio) -> httpx.Client:
    return studio.http(timeout=60)


def write(folder: Path, name: str, *cells: str, parameters: str | None = None) -> str:
    notebook = new_notebook()
    if parameters is not None:
        notebook.cells.append(new_code_cell(parameters, metadata={"tags": ["parameters"]}))
    notebook.cells += [new_markdown_cell(c[4:]) if c.startswith("#md ") else new_code_cell(c) for c in cells]
    notebook.metadata["kernelspec"] = {"name": "pyspark", "display_name": "PySpark", "language": "python"}
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, folder / name)
    return name


def start(client: httpx.Client, expect: int = 201, **body: Any) -> dict[str, Any]:
    response = client.post("/api/executions", json=body)
    assert response.status_code == expect, response.text
    return response.json()


def wait_status(client: httpx.Client, execution_id: int, statuses: tuple[str, ...], timeout: float = 240) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        execution = client.get(f"/api/executions/{execution_id}").json()
        if not seen or seen[-1] != execution["status"]:
            seen.append(execution["status"])
        if execution["status"] in statuses:
            execution["seen"] = seen
            return execution
        if time.monotonic() > deadline:
            raise AssertionError(f"execution {execution_id} went {seen}, not to {statuses}: {execution['last_state_change_reason']}")
        time.sleep(0.2)


def live_run_sessions(studio) -> list[dict[str, Any]]:
    """Sessions of `studio run`s on the embedded compute that are not over."""
    local = studio.get("/api/computes/local").json()
    return [
        s for s in local["sessions"]
        if (s.get("name") or "").startswith("studio-run-") and s["state"] not in ("dead", "killed", "success", "error")
    ]  # fmt: skip


def test_parameterised_notebook_runs_to_finished_with_outputs_and_record(studio, workspace):
    folder = Path(workspace["folder"])
    name = write(
        folder / "reports",
        "daily.ipynb",
        "#md # Daily",
        "rows = spark.range(n).count()\nprint(f'{label}: {rows} rows')",
        "rows * 2",
        parameters="n = 3\nlabel = 'default'",
    )
    with api(studio) as client:
        created = start(client, workspace="jobs", notebook=f"reports/{name}", parameters={"n": 7, "label": "nightly"}, name="daily")
        assert created["status"] in ("START_PENDING", "STARTING")
        assert created["workspace"] == {"id": workspace["id"], "name": "jobs"}
        assert created["compute"] == "local" and created["notebook"] == "reports/daily.ipynb"
        done = wait_status(client, created["id"], FINAL)
        assert done["status"] == "FINISHED", done["last_state_change_reason"]
        assert "cells succeeded" in done["last_state_change_reason"]
        assert done["exit_code"] == 0 and done["end_time"] >= done["start_time"]

        notebook = client.get(done["output"]["notebook"])
        assert notebook.status_code == 200 and "attachment" in notebook.headers["content-disposition"]
        output = nbformat.reads(notebook.text, as_version=4)
        text = json.dumps([c.get("outputs") for c in output.cells])
        assert "nightly: 7 rows" in text and "14" in text
        injected = [c for c in output.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert injected and "n = 7" in injected[0].source

        html = client.get(done["output"]["html"])
        assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
        assert "nightly: 7 rows" in html.text and html.headers["content-security-policy"] == "sandbox"

        record = done["record"]
        assert record["parameters"] == {"n": 7, "label": "nightly"}
        assert len(record["notebook_sha256"]) == 64
        assert done["spark_app_id"] and record["spark_app_id"] == done["spark_app_id"]
        assert [c["status"] for c in record["cells"]] == ["completed"] * 4  # parameters, injected, two cells
        assert all(c["duration"] is not None for c in record["cells"])
        assert "kernel ready" in client.get(done["output"]["log"]).text
        # The driver log outlives the session, with the record.
        driver_log = client.get(f"/api/executions/{done['id']}/driver.log")
        assert driver_log.status_code == 200 and "StudioService" in driver_log.text, driver_log.text[-500:]

        listed = client.get("/api/executions", params={"status": "FINISHED", "workspace": "jobs"}).json()
        assert created["id"] in [e["id"] for e in listed["executions"]]
    assert not live_run_sessions(studio)


def test_failing_notebook_is_failed_with_the_error_and_its_output(studio, workspace):
    name = write(Path(workspace["folder"]), "broken.ipynb", "x = 1", "x / 0", "print('never')")
    with api(studio) as client:
        created = start(client, workspace=workspace["id"], notebook=name)
        done = wait_status(client, created["id"], FINAL)
        assert done["status"] == "FAILED"
        assert "ZeroDivisionError" in done["last_state_change_reason"], done["last_state_change_reason"]
        assert done["exit_code"] == 1
        assert [c["status"] for c in done["record"]["cells"]] == ["completed", "failed", "pending"]
        output = nbformat.reads(client.get(done["output"]["notebook"]).text, as_version=4)
        assert any(o.get("ename") == "ZeroDivisionError" for c in output.cells for o in c.get("outputs", []))
        # a finished execution cannot be stopped
        stop = client.post(f"/api/executions/{created['id']}/stop")
        assert stop.status_code == 409 and "already FAILED" in stop.json()["msg"]
    assert not live_run_sessions(studio)


class _VersionOnly(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        body = json.dumps({"version": "0.8.0"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_bad_input_gets_clear_errors(studio, workspace):
    folder = Path(workspace["folder"])
    write(folder, "params.ipynb", "print(n, ratio)", parameters="n = 1\nratio = 0.5")
    write(folder, "plain.ipynb", "print(n)")
    with api(studio) as client:
        cases = [
            ({"workspace": "jobs", "notebook": "nope.ipynb"}, 404, "not found"),
            ({"workspace": "nobody", "notebook": "params.ipynb"}, 404, "Workspace 'nobody' not found"),
            ({"workspace": "jobs", "notebook": "../../etc/passwd.ipynb"}, 400, "outside the workspace"),
            ({"workspace": "jobs", "notebook": "/etc/hosts"}, 400, "absolute"),
            ({"workspace": "jobs", "notebook": "params.ipynb", "parameters": {"m": 2}}, 400, "unknown parameter m"),
            ({"workspace": "jobs", "notebook": "params.ipynb", "parameters": {"n": "two"}}, 400, "expects int"),
            ({"workspace": "jobs", "notebook": "params.ipynb", "compute": "elsewhere"}, 404, "Compute 'elsewhere' not found"),
            ({"workspace": "jobs"}, 400, "notebook"),
            ({"workspace": "jobs", "notebook": "params.ipynb", "parameters": [1]}, 400, "parameters"),
        ]
        for body, status, words in cases:
            response = client.post("/api/executions", json=body)
            assert response.status_code == status, (body, response.text)
            assert words in response.json()["msg"], (body, response.json())
        assert client.post("/api/executions", content=b"{not json").status_code == 400
        assert client.get("/api/executions/999").status_code == 404
        assert client.get("/api/executions/abc").status_code == 404
        assert client.post("/api/executions/999/stop").status_code == 404
        assert client.get("/api/executions", params={"status": "DONE"}).status_code == 400

        # a compute that stops answering: 502 and nothing queued
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _VersionOnly)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert client.post("/api/computes", json={"name": "flaky", "url": url}).status_code == 201
        server.shutdown()
        server.server_close()
        before = client.get("/api/executions").json()["total"]
        response = client.post("/api/executions", json={"workspace": "jobs", "notebook": "params.ipynb", "compute": "flaky"})
        assert response.status_code == 502 and "flaky" in response.json()["msg"]
        assert client.get("/api/executions").json()["total"] == before
        assert client.delete("/api/computes/flaky").status_code == 200

        # parameters for a notebook without a parameters cell: injected at the top, with a warning
        created = start(client, workspace="jobs", notebook="plain.ipynb", parameters={"n": 5})
        assert any("no cell tagged 'parameters'" in w for w in created["warnings"])
        done = wait_status(client, created["id"], FINAL)
        assert done["status"] == "FINISHED", done["last_state_change_reason"]
        assert '"5' in json.dumps(nbformat.reads(client.get(done["output"]["notebook"]).text, as_version=4).cells[1].outputs)


def test_stop_a_running_execution_and_the_queue_moves_on(studio, workspace):
    folder = Path(workspace["folder"])
    write(folder, "slow.ipynb", "import time\nspark.range(1).count()", "time.sleep(600)", "print('not reached')")
    write(folder, "quick.ipynb", "spark.range(4).count()")
    with api(studio) as client:
        slow = start(client, workspace="jobs", notebook="slow.ipynb")
        wait_status(client, slow["id"], ("RUNNING",))
        # the limit is one at a time: the next ones wait
        quick = start(client, workspace="jobs", notebook="quick.ipynb")
        dropped = start(client, workspace="jobs", notebook="quick.ipynb", name="dropped")
        write(folder, "gone.ipynb", "1 + 1")
        gone = start(client, workspace="jobs", notebook="gone.ipynb")
        (folder / "gone.ipynb").unlink()  # removed while it waits: the run fails and says why
        assert client.get(f"/api/executions/{quick['id']}").json()["status"] == "START_PENDING"
        pending = client.get("/api/executions", params={"status": "START_PENDING"}).json()["executions"]
        assert {quick["id"], dropped["id"]} <= {e["id"] for e in pending}
        # a queued execution stops at once
        stopped = client.post(f"/api/executions/{dropped['id']}/stop")
        assert stopped.status_code == 202 and stopped.json()["status"] == "STOPPED"
        assert "before it started" in stopped.json()["last_state_change_reason"]

        deadline = time.monotonic() + 120  # stop while the second cell (the sleep) runs
        while (client.get(f"/api/executions/{slow['id']}").json()["progress"] or {}).get("cells_done", 0) < 1:
            assert time.monotonic() < deadline, "the first cell never finished"
            time.sleep(0.2)
        time.sleep(2)  # the sleep has started (a stop between two cells starts no further cell)
        t0 = time.monotonic()
        response = client.post(f"/api/executions/{slow['id']}/stop")
        assert response.status_code == 202 and response.json()["status"] in ("STOP_PENDING", "STOPPING")
        done = wait_status(client, slow["id"], FINAL, timeout=90)
        assert done["status"] == "STOPPED", done["last_state_change_reason"]
        assert "Stopped on request" in done["last_state_change_reason"]
        assert time.monotonic() - t0 < 60
        assert done["output"]["notebook"], "the output notebook is written on stop too"
        statuses = [c["status"] for c in done["record"]["cells"]]
        assert statuses == ["completed", "interrupted", "pending"], statuses
        assert "during cell 2 of 3, which was cancelled" in done["last_state_change_reason"], done["last_state_change_reason"]

        finished = wait_status(client, quick["id"], FINAL)
        assert finished["status"] == "FINISHED", finished["last_state_change_reason"]
        assert client.get(f"/api/executions/{dropped['id']}").json()["status"] == "STOPPED"
        failed = wait_status(client, gone["id"], FINAL)
        assert failed["status"] == "FAILED" and "no notebook at" in failed["last_state_change_reason"], failed
        assert failed["exit_code"] == 2
    assert not live_run_sessions(studio)


def test_parameters_are_checked_before_anything_is_created(studio, workspace):
    """NaN and Infinity (which Python's JSON parser accepts) and names that are not Python names
    are refused with 400, and no execution is recorded."""
    folder = Path(workspace["folder"])
    write(folder, "ratio.ipynb", "print(ratio)", parameters="ratio = 0.5")
    write(folder, "noparams.ipynb", "print(1)")
    with api(studio) as client:
        before = client.get("/api/executions").json()["total"]
        cases = [
            (b'{"workspace": "jobs", "notebook": "ratio.ipynb", "parameters": {"ratio": NaN}}', "NaN or Infinity"),
            (b'{"workspace": "jobs", "notebook": "ratio.ipynb", "parameters": {"ratio": 1e400}}', "NaN or Infinity"),
            (b'{"workspace": "jobs", "notebook": "ratio.ipynb", "parameters": {"ratio": [1, -Infinity]}}', "NaN or Infinity"),
            (b'{"workspace": "jobs", "notebook": "noparams.ipynb", "parameters": {"class": 1}}', "not a Python name"),
            (b'{"workspace": "jobs", "notebook": "noparams.ipynb", "parameters": {"__import__(\'os\').system(\'id\'); x": 1}}',
             "not a Python name"),
        ]  # fmt: skip
        for body, words in cases:
            response = client.post("/api/executions", content=body, headers={"Content-Type": "application/json"})
            assert response.status_code == 400, (body, response.text)
            assert words in response.json()["msg"], (body, response.json())
        listed = client.get("/api/executions")
        assert listed.status_code == 200 and listed.json()["total"] == before


def test_a_stop_in_the_first_moments_ends_cleanly(studio, workspace):
    """A stop while `studio run` is still starting (its process, service client and kernel):
    STOPPED with exit code 130, a reason that counts right, the output notebook, no traceback."""
    write(Path(workspace["folder"]), "early.ipynb", "x = 1", "print('never')")
    with api(studio) as client:
        created = start(client, workspace="jobs", notebook="early.ipynb")
        wait_status(client, created["id"], ("STARTING",))
        assert client.post(f"/api/executions/{created['id']}/stop").status_code == 202
        done = wait_status(client, created["id"], FINAL, timeout=120)
        reason = done["last_state_change_reason"]
        assert done["status"] == "STOPPED" and done["exit_code"] == 130, (done["exit_code"], reason)
        assert reason.startswith("Stopped on request ") and "?" not in reason and "after 0" not in reason, reason
        assert done["output"]["notebook"], "the output notebook is written on an early stop too"
        run_log = client.get(done["output"]["log"]).text
        assert "Traceback" not in run_log, run_log[-4000:]  # the whole tail: which process, which exception
    assert not live_run_sessions(studio)


def test_configure_f_after_a_remote_parameters_cell(studio, workspace):
    """Issue 10: an EMR Studio-style notebook runs through the API as it does through studio run."""
    name = write(
        Path(workspace["folder"]),
        "emr.ipynb",
        '%%configure -f\n{"conf": {"spark.sql.shuffle.partitions": "7"}}',
        "print('partitions', spark.conf.get('spark.sql.shuffle.partitions'))",
        "%%info",
        parameters="label = 'default'",
    )
    with api(studio) as client:
        created = start(client, workspace="jobs", notebook=name, parameters={"label": "nightly"})
        done = wait_status(client, created["id"], FINAL, timeout=300)
        assert done["status"] == "FINISHED", done["last_state_change_reason"]
        assert done["exit_code"] == 0
        output = nbformat.reads(client.get(done["output"]["notebook"]).text, as_version=4)
        text = json.dumps([c.get("outputs") for c in output.cells])
        assert "partitions 7" in text and "Current session configs" in text
        assert done["record"]["session"]["conf"] == {"spark.sql.shuffle.partitions": "7"}
    assert not live_run_sessions(studio)


def test_records_survive_a_restart_and_a_stopping_server_stops_its_runs(studio, workspace):
    folder = Path(workspace["folder"])
    write(folder, "long.ipynb", "import time\ntime.sleep(600)")
    write(folder, "after.ipynb", "spark.range(2).count()")
    with api(studio) as client:
        before = {e["id"]: e["status"] for e in client.get("/api/executions").json()["executions"]}
        long = start(client, workspace="jobs", notebook="long.ipynb")
        wait_status(client, long["id"], ("RUNNING",))
        queued = start(client, workspace="jobs", notebook="after.ipynb")
        assert client.get(f"/api/executions/{queued['id']}").json()["status"] == "START_PENDING"

    assert studio.stop() == 0, studio.log_tail()
    assert not studio.leftovers(), f"processes left behind: {studio.leftovers()}"
    old_id = _store_a_record_of_an_older_version(studio)
    studio.start()
    with api(studio) as client:
        again = client.get(f"/api/executions/{long['id']}").json()
        assert again["status"] == "STOPPED"
        assert "studio serve stopped" in again["last_state_change_reason"]
        assert client.get(again["output"]["notebook"]).status_code == 200
        listed = {e["id"]: e["status"] for e in client.get("/api/executions").json()["executions"]}
        assert {k: listed[k] for k in before} == before, "finished records are unchanged"
        # a record an older version stored with NaN in it is listed, and every route answers JSON
        listed = client.get("/api/executions")
        assert listed.status_code == 200 and old_id in [e["id"] for e in listed.json()["executions"]]
        assert client.get("/api/executions", params={"status": "FINISHED"}).status_code == 200
        old = client.get(f"/api/executions/{old_id}")
        assert old.status_code == 200 and old.json()["parameters"] == {"f": "NaN", "g": ["Infinity"]}
        assert old.json()["record"]["parameters"] == {"f": "NaN"}
        assert client.post(f"/api/executions/{old_id}/stop").status_code == 409
        # the queued one was kept and runs now
        done = wait_status(client, queued["id"], FINAL)
        assert done["status"] == "FINISHED", done["last_state_change_reason"]
    assert not live_run_sessions(studio)


def _store_a_record_of_an_older_version(studio) -> int:
    """What an older version stored for `{"f": NaN}`: a bare NaN in the row and in record.json."""
    import sqlite3

    with sqlite3.connect(studio.state_dir / "studio.db") as db:
        (last,) = db.execute("SELECT max(id) FROM executions").fetchone()
        old_id = last + 1000
        now = time.time()
        db.execute(
            "INSERT INTO executions (id, name, notebook, parameters, state, reason, created_at, ended_at, exit_code, warnings) "
            "VALUES (?, 'old', 'old.ipynb', ?, 'FINISHED', 'All 1 cells succeeded', ?, ?, 0, '[]')",
            (old_id, '{"f": NaN, "g": [Infinity]}', now, now),
        )
    folder = studio.state_dir / "executions" / str(old_id)
    folder.mkdir(parents=True)
    (folder / "record.json").write_text('{"parameters": {"f": NaN}, "cells": [], "spark_app_id": null}')
    return old_id


# -- runs outlive the server ------------------------------------------------------------------------
# A server of its own that keeps its runs when it stops (STUDIO_STOP_SESSIONS_ON_EXIT=false, as a
# restart of the Studio does), with notebooks of %%local cells: they need no Spark, so the
# embedded session service moving to another port across the restart does not matter to them.


@pytest.fixture(scope="module")
def restartable(test_root):
    server = StudioProcess(
        test_root / "executions-restart",
        env={"STUDIO_STOP_SESSIONS_ON_EXIT": "false", "STUDIO_MAX_CONCURRENT_EXECUTIONS": "2"},
        pool=0,
    ).start()
    client = server.client()
    client.create(name="survivors")
    client.close()
    yield server
    if server.process is not None and server.process.poll() is None:
        assert server.stop() == 0, server.log_tail()
    left = server.leftovers()
    for pid, _ in left:  # runs a failed test left running: not for the next tests to trip on
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left behind: {left}"


def local_cell(text: str, sleep: float = 0, until: Path | None = None) -> str:
    """A %%local cell that sleeps, or waits until the file ``until`` exists, then prints ``text``."""
    wait = f"while not os.path.exists({str(until)!r}):\n    time.sleep(0.1)\n" if until else f"time.sleep({sleep})\n"
    return f"%%local\nimport os, time\n{wait}print({text!r})"


def events(server, execution_id: int) -> list[dict[str, Any]]:
    """What `studio run --events` wrote for an execution (the channel the server follows)."""
    path = server.state_dir / "executions" / str(execution_id) / "events.jsonl"
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def wait_event(server, execution_id: int, predicate, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in events(server, execution_id) if predicate(e)]
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"execution {execution_id}: no such event in {events(server, execution_id)}")


def kill_run(pid: int) -> None:
    """SIGKILL a `studio run` and its kernel (in a session of its own), as an OOM killer might."""
    import psutil

    process = psutil.Process(pid)
    family = [process, *process.children(recursive=True)]
    for member in family:
        member.kill()
    psutil.wait_procs(family, timeout=30)


def test_a_running_execution_survives_a_restart_of_studio_serve(restartable):
    folder = restartable.root / "survivors"
    go = folder / "go"  # the second cell of `steady` runs until the test says so, after the restart
    write(folder, "steady.ipynb", local_cell("one", 1), local_cell("two", until=go), local_cell("three"))
    write(folder, "brief.ipynb", local_cell("brief", 3))
    with api(restartable) as client:
        steady = start(client, workspace="survivors", notebook="steady.ipynb")
        brief = start(client, workspace="survivors", notebook="brief.ipynb")
        wait_status(client, brief["id"], ("RUNNING",))
        wait_event(restartable, steady["id"], lambda e: e["event"] == "cell_finished" and e["number"] == 1)
        deadline = time.monotonic() + 10  # the server reads the events file a few times a second
        while client.get(f"/api/executions/{steady['id']}").json()["progress"]["cells_done"] < 1:
            assert time.monotonic() < deadline, "the server did not follow the run's events"
            time.sleep(0.1)

    assert restartable.stop() == 0, restartable.log_tail()  # SIGTERM: the runs are left running
    pid = wait_event(restartable, steady["id"], lambda e: e["event"] == "started")["pid"]
    assert alive(pid), "the run died with its server"
    # One run ends while no server is watching; the other is still running when the next one starts.
    wait_event(restartable, brief["id"], lambda e: e["event"] == "finished")
    assert not any(e["event"] == "finished" for e in events(restartable, steady["id"]))
    restartable.start()
    with api(restartable) as client:
        assert client.get(f"/api/executions/{steady['id']}").json()["status"] == "RUNNING"
        go.touch()
        done = wait_status(client, steady["id"], FINAL)
        assert done["status"] == "FINISHED" and done["exit_code"] == 0, done["last_state_change_reason"]
        assert "All 3 cells succeeded" in done["last_state_change_reason"]
        assert [c["status"] for c in done["record"]["cells"]] == ["completed"] * 3
        text = json.dumps([c.get("outputs") for c in nbformat.reads(client.get(done["output"]["notebook"]).text, as_version=4).cells])
        assert all(word in text for word in ("one", "two", "three"))
        ended = client.get(f"/api/executions/{brief['id']}").json()
        assert ended["status"] == "FINISHED" and ended["exit_code"] == 0, ended["last_state_change_reason"]
    assert f"found its studio run (pid {pid}) again" in restartable.log_tail(20000)
    assert wait_gone(pid)


def test_a_run_lost_in_a_restart_is_queued_again_or_failed_with_the_reason(restartable):
    folder = restartable.root / "survivors"
    write(folder, "late.ipynb", local_cell("first"), local_cell("never ends", 600), local_cell("never"))
    write(folder, "early.ipynb", local_cell("ran once"))
    with api(restartable) as client:
        late = start(client, workspace="survivors", notebook="late.ipynb")
        wait_event(restartable, late["id"], lambda e: e["event"] == "cell_started" and e["number"] == 2)
        early = start(client, workspace="survivors", notebook="early.ipynb")
        # Lost before its kernel ran a cell: its server is killed, and so is the run, before either learns more.
        early_pid = wait_event(restartable, early["id"], lambda e: e["event"] == "started")["pid"]
        restartable.crash()
        kill_run(early_pid)
    kill_run(wait_event(restartable, late["id"], lambda e: e["event"] == "started")["pid"])
    assert not any(e["event"] == "cell_started" for e in events(restartable, early["id"])), "the early run got too far"

    restartable.start()
    with api(restartable) as client:
        lost = client.get(f"/api/executions/{late['id']}").json()
        assert lost["status"] == "FAILED", lost
        reason = lost["last_state_change_reason"]
        assert reason.startswith("Lost: its studio run ended during cell 2 of 3 while studio serve was restarting"), reason
        again = wait_status(client, early["id"], FINAL)
        assert again["status"] == "FINISHED", again["last_state_change_reason"]
        assert nbformat.reads(client.get(again["output"]["notebook"]).text, as_version=4).cells[0].outputs[0]["text"] == "ran once\n"
    # It was queued again (it had run no cell) and ran from the start in a new `studio run`, with events of its own.
    assert f"execution {early['id']}: STARTING -> START_PENDING (Queued again: its studio run ended" in restartable.log_tail(50000)
    started = [e for e in events(restartable, early["id"]) if e["event"] == "started"]
    assert len(started) == 1 and started[0]["pid"] != early_pid
