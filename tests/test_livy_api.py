"""The Livy contract through HTTP against a real service, real workers and real PySpark.

One service with a warm pool serves the whole module (Spark takes 10-20 s to start here).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import threading
import time

import httpx
import pytest

from conftest import start_service

SESSION_KEYS = {
    "id", "name", "appId", "owner", "proxyUser", "state", "kind", "appInfo", "log", "ttl", "idleTimeout",
    "driverMemory", "driverCores", "executorMemory", "executorCores", "conf", "archives", "files",
    "heartbeatTimeoutInSecond", "jars", "numExecutors", "pyFiles", "queue",
}  # fmt: skip


@pytest.fixture(scope="module")
def service(test_root):
    svc = start_service(
        test_root,
        "api",
        env={
            "STUDIO_POOL_SIZE": "2",
            "STUDIO_POOL_WARMUP_SECONDS": "3",
            "STUDIO_CULL_INTERVAL": "0.5",
            "STUDIO_SESSION_STATE_RETAIN": "20",
            "STUDIO_MAX_CODE_BYTES": "200000",
            "STUDIO_MAX_OUTPUT_BYTES": "100000",
            "STUDIO_MAX_SESSION_OUTPUT_BYTES": "350000",
            "STUDIO_MAX_LOG_PAGE_LINES": "3000",
            "STUDIO_POOL_REFILL_MAX_DELAY": "5",
        },
    )
    svc.wait_pool(2)
    yield svc
    assert svc.stop() == 0
    assert not svc.leftovers()


@pytest.fixture(scope="module")
def livy(service):
    client = service.client()
    yield client
    client.close()


@pytest.fixture(scope="module")
def sid(livy):
    """The module's main pyspark session (from the warm pool)."""
    session = livy.create_session(kind="pyspark")
    return session["id"]


def new_session(livy, **body):
    session = livy.create_session(**body)
    return livy.wait_session(session["id"])["id"]


# -- sessions ----------------------------------------------------------------------------


def test_version(livy):
    body = livy.http.get("/version").json()
    assert re.match(r"^\d+\.\d+\.\d+\S*$", body["version"])


def test_warm_session_is_idle_at_once_with_every_livy_key(livy, sid):
    session = livy.session(sid)
    assert set(session) == SESSION_KEYS
    assert isinstance(session["id"], int)
    assert session["state"] == "idle"
    assert session["kind"] == "pyspark"
    # The owner is who authenticated: the holder of the studio's token is "admin"; the driver runs as
    # that user, which proxyUser shows (as Livy with impersonation on).
    assert session["proxyUser"] == "admin" and session["owner"] == "admin"
    assert session["appId"].startswith("local-")
    assert isinstance(session["log"], list)
    ui = httpx.get(session["appInfo"]["sparkUiUrl"] + "/api/v1/applications", timeout=60)  # its first answer starts Jersey: 5-13 s on a busy 2-core machine
    assert ui.status_code == 200 and ui.json()[0]["id"] == session["appId"]
    driver_log = livy.http.get(session["appInfo"]["driverLogUrl"])
    assert "SparkSession ready" in driver_log.text


def test_default_kind_is_shared_and_state_route(livy, sid):
    assert livy.http.get(f"/sessions/{sid}/state").json() == {"id": sid, "state": "idle"}
    listing = livy.http.get("/sessions", params={"from": 0, "size": 1}).json()
    assert listing["from"] == 0 and listing["total"] >= 1 and len(listing["sessions"]) == 1


def test_repl_text_follows_livy(livy, sid):
    assert livy.text(sid, "1 + 1") == "2"
    assert livy.text(sid, "print('hello')\nx = 21\nx * 2") == "hello\n42"
    assert livy.text(sid, "import sys\nprint('out')\nprint('err', file=sys.stderr)\n'value'") == "out\n'value'\nerr"
    assert livy.text(sid, "y = 5") == ""
    assert livy.text(sid, "for i in range(2):\n    i") == "0\n1"


def test_statement_ids_and_execution_count(livy, sid):
    statement = livy.run(sid, "'counted'")
    assert statement["output"]["execution_count"] == statement["id"]
    assert statement["progress"] == 1.0
    assert statement["started"] > 0 and statement["completed"] >= statement["started"]
    listing = livy.http.get(f"/sessions/{sid}/statements").json()
    assert listing["total_statements"] == len(listing["statements"])
    assert [s["id"] for s in listing["statements"]] == sorted(s["id"] for s in listing["statements"])
    newest = livy.http.get(f"/sessions/{sid}/statements", params={"order": "desc", "size": 1}).json()
    assert newest["statements"][0]["id"] == statement["id"]


def test_failing_statement_keeps_the_session(livy, sid):
    livy.text(sid, "kept = 'still here'")
    statement = livy.run(sid, "def f():\n    return 1 / 0\nf()")
    assert statement["state"] == "available"
    output = statement["output"]
    assert output["status"] == "error"
    assert output["ename"] == "ZeroDivisionError"
    assert output["evalue"] == "division by zero"
    assert isinstance(output["traceback"], list) and output["traceback"][-1].startswith("ZeroDivisionError")
    assert any("return 1 / 0" in line for line in output["traceback"])
    assert output["execution_count"] == statement["id"]
    assert livy.session(sid)["state"] == "idle"
    syntax = livy.run(sid, "def broken(:\n  pass")["output"]
    assert syntax["ename"] == "SyntaxError" and syntax["traceback"][-1].startswith("SyntaxError")
    assert livy.text(sid, "kept") == "'still here'"


def test_namespace_has_spark_sc_sqlcontext(livy, sid):
    assert livy.text(sid, "spark.range(5).count()") == "5"
    assert livy.text(sid, "sc.master") == "'local[*]'"
    assert livy.text(sid, "sqlContext.sql('SELECT 3 AS x').collect()[0].x") == "3"


def test_the_studios_secrets_are_not_in_a_sessions_environment(livy, sid):
    """The service was started with STUDIO_TOKEN in its environment; the user's code never sees it."""
    seen = livy.text(sid, "import os\nsorted(k for k in os.environ if 'TOKEN' in k)")
    assert "STUDIO_TOKEN" not in seen and "JUPYTER_TOKEN" not in seen, seen


def test_magics_json_table_matplot(livy, sid):
    out = livy.run(sid, "d = {'a': [1, 2], 'b': 'x'}\n%json d")["output"]
    assert out["data"]["application/json"] == {"a": [1, 2], "b": "x"}
    out = livy.run(sid, "rows = [(1, 'a', 1.5), (2, 'b', None)]\n%table rows")["output"]
    table = out["data"]["application/vnd.livy.table.v1+json"]
    assert table["headers"] == [
        {"name": "0", "type": "INT_TYPE"},
        {"name": "1", "type": "STRING_TYPE"},
        {"name": "2", "type": "DOUBLE_TYPE"},
    ]
    assert table["data"] == [[1, "a", 1.5], [2, "b", None]]
    out = livy.run(sid, "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\n%matplot plt")["output"]
    assert base64.b64decode(out["data"]["image/png"]).startswith(b"\x89PNG")
    unknown = livy.run(sid, "x = 1\n%nosuchmagic x")["output"]
    assert unknown["status"] == "error" and unknown["ename"] == "UnknownMagic"
    missing = livy.run(sid, "x = 1\n%json not_defined_anywhere")["output"]
    assert missing["status"] == "error" and missing["ename"] == "NameError"
    unserializable = livy.run(sid, "o = object()\n%json o")["output"]
    assert unserializable["status"] == "error" and unserializable["ename"] == "TypeError"
    assert livy.text(sid, "'alive'") == "'alive'"


def test_sql_statement_kind(livy, sid):
    livy.text(sid, "spark.range(3).selectExpr('id', 'id * 1.5 AS half', \"'n' AS s\").createOrReplaceTempView('nums')")
    out = livy.run(sid, "SELECT id, half, s FROM nums ORDER BY id", kind="sql")["output"]
    result = out["data"]["application/json"]
    assert [f["name"] for f in result["schema"]["fields"]] == ["id", "half", "s"]
    assert result["data"] == [[0, 0.0, "n"], [1, 1.5, "n"], [2, 3.0, "n"]]
    bad = livy.run(sid, "SELECT * FROM no_such_table", kind="sql")["output"]
    assert bad["status"] == "error" and "no_such_table" in bad["evalue"]


def test_sql_session_kind(livy):
    session = livy.create_session(kind="sql")
    assert session["kind"] == "sql"
    sql_id = livy.wait_session(session["id"])["id"]
    out = livy.run(sql_id, "SELECT 1 AS one")["output"]
    assert out["data"]["application/json"]["data"] == [[1]]
    assert livy.text(sql_id, "1 + 2", kind="pyspark") == "3"
    livy.http.delete(f"/sessions/{sql_id}")


def test_progress_is_live(livy, sid):
    code = "import time\nspark.sparkContext.parallelize(range(24), 24).foreach(lambda x: time.sleep(0.5))"
    statement = livy.submit(sid, code)
    seen = []
    while True:
        current = livy.http.get(f"/sessions/{sid}/statements/{statement['id']}").json()
        seen.append(current["progress"])
        if current["state"] == "available":
            break
        time.sleep(0.2)
    assert current["output"]["status"] == "ok"
    assert any(0 < p < 1 for p in seen), seen
    assert seen == sorted(seen) and seen[-1] == 1.0


def _cancel_and_time(livy, sid, code, settle=1.5):
    statement = livy.submit(sid, code)
    time.sleep(settle)
    assert livy.http.get(f"/sessions/{sid}/statements/{statement['id']}").json()["state"] == "running"
    started = time.monotonic()
    response = livy.http.post(f"/sessions/{sid}/statements/{statement['id']}/cancel", json={})
    assert response.status_code == 200 and response.json() == {"msg": "canceled"}
    final = livy.wait_statement(sid, statement["id"], timeout=30)
    elapsed = time.monotonic() - started
    return final, elapsed


def test_cancel_interrupts_driver_side_python(livy, sid):
    livy.text(sid, "survivor = 'intact'")
    final, elapsed = _cancel_and_time(livy, sid, "import time\ntime.sleep(600)")
    assert final["state"] == "cancelled"
    assert elapsed < 2.0, elapsed
    assert livy.wait_session(sid, timeout=5)["state"] == "idle"
    assert livy.text(sid, "survivor") == "'intact'"


def test_cancel_interrupts_a_pandas_loop(livy, sid):
    code = "import pandas as pd\nframe = pd.DataFrame({'a': range(1000)})\nwhile True:\n    frame = frame.assign(b=frame.a * 2)"
    final, elapsed = _cancel_and_time(livy, sid, code)
    assert final["state"] == "cancelled" and elapsed < 2.0, elapsed
    assert livy.text(sid, "'after pandas'") == "'after pandas'"


def test_cancel_stops_a_long_spark_job(livy, sid):
    code = "spark.range(0, 10**12, 1, 4).selectExpr('sum(id % 7)').collect()"
    final, elapsed = _cancel_and_time(livy, sid, code, settle=3)
    assert final["state"] == "cancelled" and elapsed < 2.0, elapsed
    status = livy.text(sid, "[sc.statusTracker().getJobInfo(j).status for j in sc.statusTracker().getJobIdsForGroup('statement-%d' % " + str(final["id"]) + ")]")
    assert "RUNNING" not in status
    assert livy.text(sid, "spark.range(10).count()") == "10"


def test_queued_statements_keep_the_session_busy_and_can_be_cancelled(livy, sid):
    first = livy.submit(sid, "import time\ntime.sleep(3)\n'first'")
    second = livy.submit(sid, "'second'")
    third = livy.submit(sid, "'third'")
    assert livy.session(sid)["state"] == "busy"
    assert livy.http.get(f"/sessions/{sid}/statements/{second['id']}").json()["state"] == "waiting"
    livy.http.post(f"/sessions/{sid}/statements/{second['id']}/cancel")
    cancelled = livy.http.get(f"/sessions/{sid}/statements/{second['id']}").json()
    assert cancelled["state"] == "cancelled" and cancelled["output"] is None
    assert livy.wait_statement(sid, third["id"])["output"]["data"]["text/plain"] == "'third'"
    assert livy.wait_statement(sid, first["id"])["output"]["data"]["text/plain"] == "'first'"
    assert livy.wait_session(sid, timeout=5)["state"] == "idle"
    # Cancelling something finished or unknown is fine, as in Livy.
    assert livy.http.post(f"/sessions/{sid}/statements/{first['id']}/cancel").status_code == 200
    assert livy.http.post(f"/sessions/{sid}/statements/99999/cancel").status_code == 200


def test_wait_parameter_returns_as_soon_as_final(livy, sid):
    statement = livy.submit(sid, "import time\ntime.sleep(0.5)\n'waited'")
    started = time.monotonic()
    final = livy.http.get(f"/sessions/{sid}/statements/{statement['id']}", params={"wait": 30}).json()
    assert final["state"] == "available" and time.monotonic() - started < 10
    created = livy.http.post(f"/sessions/{sid}/statements", params={"wait": 10}, json={"code": "40 + 2"}).json()
    assert created["state"] == "available" and created["output"]["data"]["text/plain"] == "42"


def test_stream_extension_shows_output_while_it_runs_and_livy_shapes_stay(livy, sid):
    """``?stream=N`` (ours) returns what a running statement printed, as soon as it printed it;
    without it, every answer is Livy's, and the final text/plain follows Livy's rules."""
    code = "import sys, time\nfor i in range(4):\n    print('out', i, flush=True)\n    time.sleep(0.4)\nsys.stderr.write('err\\n')\n'last'"
    statement = livy.submit(sid, code)
    started = time.monotonic()
    seen, offset, first_at = "", 0, None
    while True:
        polled = livy.http.get(f"/sessions/{sid}/statements/{statement['id']}", params={"stream": offset, "wait": 5}).json()
        stream = polled["stream"]
        assert stream["from"] == offset and stream["total"] == offset + len(stream["text"])
        if stream["text"] and first_at is None:
            first_at = time.monotonic() - started
        seen += stream["text"]
        offset = stream["total"]
        if polled["state"] == "available":
            break
    assert first_at is not None and first_at < 1.0, first_at  # the first line, long before the end (~1.6 s)
    assert seen == "out 0\nout 1\nout 2\nout 3\nerr\n'last'\n", seen
    assert stream["unstreamed"] == ""  # nothing of text/plain came from elsewhere
    plain = livy.http.get(f"/sessions/{sid}/statements/{statement['id']}").json()
    assert "stream" not in plain and set(plain) == {"id", "code", "state", "output", "progress", "started", "completed"}
    assert plain["output"]["data"]["text/plain"] == "out 0\nout 1\nout 2\nout 3\n'last'\nerr"  # stdout, then stderr
    listed = livy.http.get(f"/sessions/{sid}/statements").json()["statements"]
    assert all("stream" not in s for s in listed)
    assert livy.http.get(f"/sessions/{sid}/statements/{statement['id']}", params={"stream": -1}).status_code == 400
    # a cancelled statement keeps what it printed
    loop = livy.submit(sid, "import time\nfor i in range(100):\n    print('tick', i, flush=True)\n    time.sleep(0.2)")
    time.sleep(1.5)
    assert livy.http.post(f"/sessions/{sid}/statements/{loop['id']}/cancel", json={}).status_code == 200
    done = livy.wait_statement(sid, loop["id"])
    assert done["state"] == "cancelled"
    kept = livy.http.get(f"/sessions/{sid}/statements/{loop['id']}", params={"stream": 0}).json()["stream"]["text"]
    assert kept.startswith("tick 0\ntick 1\n"), kept


def test_completion_uses_the_session_namespace(livy, sid):
    livy.text(sid, "my_special_variable = 1")
    candidates = livy.http.post(f"/sessions/{sid}/completion", json={"code": "my_spec", "kind": "pyspark", "cursor": 7}).json()
    assert candidates == {"candidates": ["my_special_variable"]}
    candidates = livy.http.post(f"/sessions/{sid}/completion", json={"code": "spark.ra", "cursor": 8}).json()
    assert "spark.range" in candidates["candidates"]


def test_log_has_spark_lines_and_pages(livy, sid):
    log = livy.log(sid, size=-1)
    assert log["id"] == sid and log["total"] == len(log["log"])
    assert any("StudioWorker" in line for line in log["log"])
    assert any(re.search(r" (WARN|INFO) ", line) for line in log["log"])
    page = livy.log(sid, **{"from": 1, "size": 2})
    assert page["from"] == 1 and page["log"] == log["log"][1:3]
    tail = livy.log(sid, size=3)
    assert tail["log"] == log["log"][-3:] and tail["from"] == log["total"] - 3


def test_log_and_list_paging_follow_livys_arithmetic(livy, sid):
    spammed = new_session(livy, kind="pyspark")
    try:
        livy.text(spammed, "import sys\nfor i in range(4000):\n    print('spam', i, file=sys.__stderr__)\nsys.__stderr__.flush()")
        total = livy.log(spammed, size=1)["total"]
        assert total > 4000
        # size < 0 is "all", capped at STUDIO_MAX_LOG_PAGE_LINES (3000 here): the newest 3000 lines.
        everything = livy.log(spammed, size=-1)
        assert (everything["from"], everything["total"], len(everything["log"])) == (total - 3000, total, 3000)
        assert any(line.endswith("spam 3999") for line in everything["log"][-50:])
        # A negative from is the tail, as in Livy's serializeLogs.
        tail = livy.log(spammed, **{"from": -1, "size": 2})
        assert tail["from"] == total - 2 and tail["log"] == everything["log"][-2:]
        assert livy.log(spammed, **{"from": 10, "size": 3000})["from"] == 10
        over = livy.http.get(f"/sessions/{spammed}/log", params={"size": 3001})
        assert over.status_code == 400 and "STUDIO_MAX_LOG_PAGE_LINES" in over.json()["msg"]
    finally:
        livy.http.delete(f"/sessions/{spammed}")
    # Lists are Scala's view(from, from + size): a negative from still ends at from + size.
    listing = livy.http.get("/sessions", params={"from": -1, "size": 2}).json()
    assert listing["from"] == -1 and len(listing["sessions"]) == 1
    assert livy.http.get("/sessions", params={"size": -1}).json()["sessions"] == []
    statements = livy.http.get(f"/sessions/{sid}/statements").json()
    assert len(statements["statements"]) == statements["total_statements"] > 2
    assert livy.http.get(f"/sessions/{sid}/statements", params={"size": -1}).json()["statements"] == []
    page = livy.http.get(f"/sessions/{sid}/statements", params={"from": -1, "size": 2}).json()["statements"]
    assert [s["id"] for s in page] == [statements["statements"][0]["id"]]


def test_session_output_budget_forgets_the_oldest_statements(livy):
    session = new_session(livy, kind="pyspark")
    try:
        ids = [livy.run(session, f"print('{n}' * 90000)")["id"] for n in range(5)]  # ~90 kB each, 350 kB kept
        assert livy.http.get(f"/sessions/{session}/statements/{ids[0]}").status_code == 404
        assert livy.http.get(f"/sessions/{session}/statements/{ids[-1]}").json()["output"]["status"] == "ok"
        kept = [s["id"] for s in livy.http.get(f"/sessions/{session}/statements").json()["statements"]]
        assert kept == ids[-len(kept):] and 3 <= len(kept) <= 4
    finally:
        livy.http.delete(f"/sessions/{session}")


def strict_json(response):
    """The body parsed as strict JSON: NaN or Infinity tokens, which most clients reject, fail."""
    assert response.status_code == 200, response.text

    def refuse(token):
        raise AssertionError(f"{token} is not JSON: {response.text[:300]}")

    return json.loads(response.text, parse_constant=refuse)


def test_nan_and_infinity_are_valid_json_in_every_response(livy, sid):
    out = livy.run(sid, "SELECT sqrt(-1) AS s, double('Infinity') AS i, -double('Infinity') AS n, 1.5 AS f", kind="sql")
    statement = strict_json(livy.http.get(f"/sessions/{sid}/statements/{out['id']}"))
    assert statement["output"]["data"]["application/json"]["data"] == [["NaN", "Infinity", "-Infinity", 1.5]]
    magic = livy.run(sid, "d = {'x': float('nan'), 'y': [float('inf')]}\n%json d")
    statement = strict_json(livy.http.get(f"/sessions/{sid}/statements/{magic['id']}"))
    assert statement["output"]["data"]["application/json"] == {"x": "NaN", "y": ["Infinity"]}
    listing = strict_json(livy.http.get(f"/sessions/{sid}/statements"))
    assert {out["id"], magic["id"]} <= {s["id"] for s in listing["statements"]}
    strict_json(livy.http.get("/sessions"))


def test_text_that_utf8_cannot_hold_never_kills_the_session(livy, sid):
    livy.text(sid, "kept_through_surrogates = 1")
    assert livy.text(sid, "print('\\udcff')") == "\\udcff"
    code = (
        "import os, tempfile\n"
        "folder = tempfile.mkdtemp()\n"
        "open(os.path.join(os.fsencode(folder), b'caf\\xe9.txt'), 'w').close()\n"
        "name = os.listdir(folder)[0]\n"
        "print(name)\n"
        "print(name, file=sys.__stdout__, flush=True)\n"
        "sys.stdout.buffer.write(b'raw \\xff bytes\\n')\n"
        "print(sys.stdout.encoding, sys.stderr.encoding)"
    )
    assert livy.text(sid, "import sys\n" + code) == "caf\\udce9.txt\nraw \\xff bytes\nutf-8 utf-8"
    out = livy.run(sid, "odd = {'name': '\\udcff'}\n%json odd")["output"]
    assert out["data"]["application/json"] == {"name": "\\udcff"}
    assert livy.text(sid, "kept_through_surrogates") == "1"
    assert livy.session(sid)["state"] == "idle"


def test_matplot_without_a_figure_says_so(livy, sid):
    out = livy.run(sid, "import matplotlib.pyplot as plt\nplt.close('all')\n%matplot plt")["output"]
    assert out["status"] == "ok" and "image/png" not in out["data"]
    assert "no figure to show" in out["data"]["text/plain"]


def test_sessions_are_isolated(livy, sid):
    livy.text(sid, "shared_name = 'mine'")
    livy.text(sid, "spark.range(2).createOrReplaceTempView('private_view')")
    livy.text(sid, "spark.conf.set('spark.sql.shuffle.partitions', '3')")
    other = new_session(livy, kind="pyspark")
    try:
        assert livy.run(other, "shared_name")["output"]["ename"] == "NameError"
        assert livy.run(other, "spark.table('private_view').count()")["output"]["status"] == "error"
        assert livy.text(other, "spark.conf.get('spark.sql.shuffle.partitions')") == "'200'"
        assert livy.text(sid, "spark.conf.get('spark.sql.shuffle.partitions')") == "'3'"
    finally:
        livy.http.delete(f"/sessions/{other}")


def test_runtime_conf_is_applied_to_a_warm_worker(service, livy):
    service.wait_pool(1)
    session = livy.create_session(kind="pyspark", conf={"spark.sql.shuffle.partitions": 11, "livy.rsc.sql.num-rows": "2"})
    try:
        assert session["state"] == "idle"  # no new JVM was needed
        assert session["conf"] == {"spark.sql.shuffle.partitions": "11", "livy.rsc.sql.num-rows": "2"}
        assert livy.text(session["id"], "spark.conf.get('spark.sql.shuffle.partitions')") == "'11'"
        rows = livy.run(session["id"], "SELECT id FROM range(5)", kind="sql")["output"]["data"]["application/json"]["data"]
        assert rows == [[0], [1]]
    finally:
        livy.http.delete(f"/sessions/{session['id']}")


# -- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, status, text",
    [
        (b"{not json", 400, "Malformed JSON"),
        (b"", 400, "empty"),
        (b"[1, 2]", 400, "JSON object"),
        (b'{"kind": "pyspark", "surprise": 1}', 400, 'Unrecognized field "surprise"'),
        (b'{"driverCores": "many"}', 400, "driverCores"),
        (b'{"kind": "spark"}', 400, "not supported"),
        (b'{"kind": "cobol"}', 400, "Invalid kind"),
        (b'{"conf": {"spark.master": "yarn"}}', 400, "Blacklisted"),
        (b'{"ttl": "soon"}', 400, "ttl"),
        (b'{"idleTimeout": "1 fortnight"}', 400, "idleTimeout"),
        (b'{"name": "123"}', 400, "must not be a number"),
        (b'{"heartbeatTimeoutInSecond": -1}', 400, "heartbeatTimeoutInSecond"),
        (b'{"driverMemory": "lots"}', 400, "invalid driverMemory 'lots'"),
        (b'{"executorMemory": "1.5g"}', 400, "invalid executorMemory"),
        (b'{"conf": {"spark.driver.memory": "2 g"}}', 400, "invalid spark.driver.memory"),
        (b'{"numExecutors": -2}', 400, "numExecutors must not be negative"),
        (b'{"conf": {"livy.rsc.sql.num-rows": "many"}}', 400, "livy.rsc.sql.num-rows"),
        (b'{"conf": {"spark.sql.x": {"nested": 1}}}', 400, "conf"),
        (b'{"name": "half a \\udcff character"}', 400, 'Field "name" holds text that is not valid Unicode'),
    ],
)
def test_bad_session_requests_get_livy_shaped_errors(livy, body, status, text):
    before = livy.http.get("/sessions").json()["total"]
    response = livy.http.post("/sessions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status
    assert text in response.json()["msg"]
    assert livy.http.get("/sessions").json()["total"] == before
    # The kernel asks before %%configure -f deletes a working session: the same answer, word for word.
    checked = livy.http.post("/studio/sessions/check", content=body, headers={"Content-Type": "application/json"})
    assert (checked.status_code, checked.json()) == (status, response.json())


def test_check_accepts_what_create_accepts_and_starts_nothing(service, livy, sid):
    livy.http.post("/sessions", json={"kind": "pyspark", "name": "checked-name"})
    before = livy.http.get("/sessions").json()["total"]
    bodies = [
        {},
        {"kind": "pyspark", "conf": {"spark.sql.shuffle.partitions": 3}},
        {"kind": "sql", "driverMemory": "2g", "executorMemory": "512M", "numExecutors": "2", "ttl": "20m"},
        {"idleTimeout": "90s", "heartbeatTimeoutInSecond": 60, "conf": {"livy.rsc.sql.num-rows": "5"}},
        {"name": "checked-name"},  # taken now, but it may be free by the time the real create comes
    ]
    for body in bodies:
        response = livy.http.post("/studio/sessions/check", json=body)
        assert (response.status_code, response.json()) == (200, {"msg": "ok"}), body
    assert livy.http.get("/sessions").json()["total"] == before
    livy.http.delete("/sessions/checked-name")


def test_unknown_ids_and_routes(livy, sid):
    missing = livy.http.get("/sessions/424242")
    assert missing.status_code == 404 and missing.json() == {"msg": "Session '424242' not found."}
    assert livy.http.get(f"/sessions/{sid}/statements/9999").status_code == 404
    assert livy.http.get("/sessions/424242/log").status_code == 404
    assert livy.http.delete("/sessions/424242").status_code == 404
    assert livy.http.get("/batches/424242").status_code == 404
    assert livy.http.get("/sessions", params={"from": "abc"}).status_code == 400
    assert livy.http.get("/no/such/route").json()["msg"].startswith("No such resource")
    assert livy.http.put("/sessions").status_code == 405
    assert livy.http.get("/version", headers={"Accept": "application/vnd.livy.v9.9+json"}).status_code == 406
    assert livy.http.get("/version", headers={"Accept": "application/vnd.livy.v0.1+json"}).status_code == 200


def test_an_idle_kept_alive_connection_outlives_a_polling_interval(service):
    # The `livy` client sleeps 5 s between batch polls on one kept-alive connection; a server that
    # closes idle connections at 5 s resets some of those polls.
    host, port = service.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("GET", "/version")
        assert connection.getresponse().read()
        time.sleep(6)
        connection.request("GET", "/version")  # the same socket: http.client does not reconnect
        response = connection.getresponse()
        assert response.status == 200 and b"version" in response.read()
    finally:
        connection.close()


def test_bad_statements(livy, sid):
    response = livy.http.post(f"/sessions/{sid}/statements", json={"code": 42})
    assert response.status_code == 400 and "code" in response.json()["msg"]
    response = livy.http.post(f"/sessions/{sid}/statements", json={"code": "1", "kind": "sparkr"})
    assert response.status_code == 400
    response = livy.http.post(f"/sessions/{sid}/statements", json={"code": "x = '" + "a" * 250_000 + "'"})
    assert response.status_code == 413 and "STUDIO_MAX_CODE_BYTES" in response.json()["msg"]
    text = livy.text(sid, "print('z' * 300000)")
    assert text.startswith("zzz") and "output truncated" in text and len(text) < 101_000
    assert livy.text(sid, "'fine'") == "'fine'"


def test_output_limits_count_utf8_bytes_and_cut_sql_results(livy, sid):
    text = livy.text(sid, "print('é' * 80000)")  # 80,000 characters, 160,000 bytes
    assert "output truncated" in text and "STUDIO_MAX_OUTPUT_BYTES" in text
    assert len(text.encode("utf-8")) < 101_000
    out = livy.run(sid, "SELECT id, repeat('x', 1000) AS s FROM range(500)", kind="sql")["output"]
    rows = out["data"]["application/json"]["data"]
    assert 50 < len(rows) < 100 and [r[0] for r in rows] == list(range(len(rows)))
    assert f"cut to {len(rows)} of 500 rows" in out["data"]["text/plain"]


def test_session_names_work_as_ids(livy):
    session = livy.create_session(kind="pyspark", name="named-one")
    try:
        assert livy.session("named-one")["id"] == session["id"]
        duplicate = livy.http.post("/sessions", json={"name": "named-one"})
        assert duplicate.status_code == 400 and "already exists" in duplicate.json()["msg"]
        livy.wait_session("named-one")
        assert livy.text("named-one", "'by name'") == "'by name'"
    finally:
        livy.http.delete(f"/sessions/{session['id']}")


# -- lifecycle ---------------------------------------------------------------------------


def test_a_dying_worker_kills_only_its_session(service, livy, sid):
    doomed = new_session(livy, kind="pyspark")
    statement = livy.run(doomed, "import os\nos._exit(3)")
    assert statement["state"] == "available"
    assert statement["output"]["status"] == "error" and statement["output"]["ename"] == "SessionWorkerDied"
    session = livy.wait_session(doomed, states=("dead",), timeout=20)
    log = livy.log(doomed, size=-1)["log"]
    assert any("exited with code 3" in line for line in log)
    response = livy.http.post(f"/sessions/{doomed}/statements", json={"code": "1"})
    assert response.status_code == 400 and "isn't active" in response.json()["msg"]
    assert livy.text(sid, "'others unaffected'") == "'others unaffected'"
    assert session["state"] == "dead"


def test_delete_stops_the_worker_removes_the_session_and_frees_its_name(service, livy):
    victim = new_session(livy, kind="pyspark", name="reused-name")
    livy.text(victim, "import sys\nprint('before delete', file=sys.__stderr__, flush=True)")
    pid = int(livy.text(victim, "import os\nos.getpid()"))
    jvm = int(livy.text(victim, "sc._gateway.proc.pid"))
    driver_log_url = livy.session(victim)["appInfo"]["driverLogUrl"]
    response = livy.http.delete(f"/sessions/{victim}")
    assert response.status_code == 200 and response.json() == {"msg": "deleted"}
    for gone in (pid, jvm):
        with pytest.raises(ProcessLookupError):
            os.kill(gone, 0)
    # As in Livy, a DELETEd session is gone from every Livy route at once...
    for path in (f"/sessions/{victim}", "/sessions/reused-name", f"/sessions/{victim}/state", f"/sessions/{victim}/log"):
        assert livy.http.get(path).status_code == 404, path
    assert victim not in [s["id"] for s in livy.http.get("/sessions").json()["sessions"]]
    assert livy.http.delete(f"/sessions/{victim}").status_code == 404
    # ...its log stays readable at its driverLogUrl, which no Livy client lists...
    text = service.get(driver_log_url).text
    assert "before delete" in text and "deleted by the client" in text
    # ...and its name is free at once.
    again = livy.create_session(kind="pyspark", name="reused-name")
    try:
        assert again["id"] != victim and livy.session("reused-name")["id"] == again["id"]
    finally:
        assert livy.http.delete("/sessions/reused-name").json() == {"msg": "deleted"}
    assert livy.http.get("/sessions/reused-name").status_code == 404


def test_a_name_means_its_live_session(livy):
    dead = new_session(livy, kind="pyspark", name="phoenix")
    assert livy.run(dead, "import os\nos._exit(3)")["output"]["ename"] == "SessionWorkerDied"
    livy.wait_session(dead, states=("dead",), timeout=20)
    # A session that ended on its own stays listed (as in Livy), but its name is free for a new one.
    duplicate = livy.http.post("/sessions", json={"kind": "pyspark", "name": "phoenix"})
    assert duplicate.status_code == 201, duplicate.text
    risen = duplicate.json()["id"]
    try:
        assert livy.session("phoenix")["id"] == risen
        assert livy.session(dead)["state"] == "dead"  # (listed for 20 s here: read it now)
        taken = livy.http.post("/sessions", json={"name": "phoenix"})
        assert taken.status_code == 400 and "already exists" in taken.json()["msg"]
        assert livy.wait_session("phoenix")["id"] == risen
        assert livy.text("phoenix", "'by name'") == "'by name'"
    finally:
        livy.http.delete(f"/sessions/{risen}")


def test_delete_of_a_busy_session_is_quick(service, livy):
    busy = new_session(livy, kind="pyspark")
    running = livy.submit(busy, "import time\ntime.sleep(600)")
    livy.submit(busy, "'never runs'")
    deadline = time.monotonic() + 10
    while livy.http.get(f"/sessions/{busy}/statements/{running['id']}").json()["state"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    started = time.monotonic()
    assert livy.http.delete(f"/sessions/{busy}").status_code == 200
    elapsed = time.monotonic() - started
    text = service.get(f"/ui/session/{busy}/log").text
    assert "stopped (shutdown message)" in text, text[-2000:]  # the worker stopped politely: no SIGTERM needed
    assert elapsed < 5, elapsed


def test_a_busy_session_that_is_stopped_ends_its_statements_cancelled(service, livy):
    # A lapsed heartbeat stops the session like a DELETE does, but the session stays listed, so
    # what became of its statements can be read.
    session = livy.create_session(kind="pyspark", heartbeatTimeoutInSecond=2)["id"]
    livy.wait_session(session)
    running = livy.submit(session, "import time\ntime.sleep(600)")
    queued = livy.submit(session, "'never runs'")
    started = time.monotonic()
    while listed_state(livy, session) != "dead":  # the listing does not refresh the heartbeat
        assert time.monotonic() - started < 30
        time.sleep(0.2)
    assert time.monotonic() - started < 10
    statements = livy.http.get(f"/sessions/{session}/statements").json()["statements"]
    states = {s["id"]: (s["state"], s["output"]) for s in statements}
    assert states[queued["id"]] == ("cancelled", None)
    assert states[running["id"]][0] == "cancelled" and states[running["id"]][1]["status"] == "error"
    assert "stopped (shutdown message)" in service.get(f"/ui/session/{session}/log").text


def listed_state(livy, session_id):
    """A session's state from GET /sessions, which (as in Livy) does not refresh its heartbeat."""
    for session in livy.http.get("/sessions").json()["sessions"]:
        if session["id"] == session_id:
            return session["state"]
    return None


def test_ttl_is_an_inactivity_timeout(service, livy):
    # Livy documents ttl as "the timeout for this inactive session": one in use stays alive.
    session = livy.create_session(kind="pyspark", ttl="3s")["id"]
    try:
        livy.wait_session(session)
        started = time.monotonic()
        while time.monotonic() - started < 9:
            assert livy.text(session, "1") == "1"
            time.sleep(1)
        assert listed_state(livy, session) == "idle"
    finally:
        livy.http.delete(f"/sessions/{session}")


def test_idle_ttl_and_heartbeat_timeouts(service, livy):
    service.wait_pool(2)  # the idle and heartbeat sessions start warm; the ttl one may start cold
    stop_beating = threading.Event()
    beat = livy.create_session(kind="pyspark", heartbeatTimeoutInSecond=2)["id"]

    def keep_beating():
        while not stop_beating.is_set():
            livy.http.get(f"/sessions/{beat}")
            time.sleep(0.5)

    beater = threading.Thread(target=keep_beating)
    beater.start()
    try:
        idle = livy.create_session(kind="pyspark", idleTimeout="2s")["id"]
        ttl = livy.create_session(kind="pyspark", ttl="3s")["id"]
        livy.wait_session(idle)
        # A busy session is never culled for idleness; busy -> idle counts as activity.
        long_statement = livy.submit(idle, "import time\ntime.sleep(4)\n'done'")
        time.sleep(3.5)
        states = {"idle": listed_state(livy, idle), "beat": listed_state(livy, beat)}
        assert states["idle"] == "busy", states
        assert states["beat"] in ("starting", "idle"), states
    finally:
        stop_beating.set()
        beater.join()
    expected = {ttl: "ttl", beat: "heartbeat", idle: "idle"}
    deadline = time.monotonic() + 90
    while expected:
        assert time.monotonic() < deadline, f"sessions did not end: {expected}"
        for session_id, reason in list(expected.items()):
            if listed_state(livy, session_id) == "dead":
                assert any(reason in line for line in livy.log(session_id, size=-1)["log"]), reason
                del expected[session_id]
                if session_id == idle:  # read now: a dead session stays listed for 20 s only
                    output = livy.wait_statement(idle, long_statement["id"])["output"]
                    assert output["data"]["text/plain"] == "'done'"
        time.sleep(0.2)
    # Finished sessions stay visible for STUDIO_SESSION_STATE_RETAIN (20 s here), then go.
    deadline = time.monotonic() + 60
    while livy.http.get(f"/sessions/{ttl}").status_code == 200:
        assert time.monotonic() < deadline
        time.sleep(0.5)
