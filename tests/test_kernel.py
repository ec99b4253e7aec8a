"""The PySpark kernel through jupyter_client against a real service and real PySpark: cells,
every magic, errors, interrupt, packages in a UDF, completion and inspection.
(The getting-started notebook runs headless in test_run.py, through `studio run`.)"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import shared_service, start_service
from helpers import build_wheel
from kernelhelpers import Kernel


@pytest.fixture(scope="module")
def service(warm_service):
    yield from shared_service(warm_service, ready=2)


@pytest.fixture(scope="module")
def kernel(service, tmp_path_factory):
    k = Kernel(tmp_path_factory.mktemp("kernel"), {"STUDIO_LIVY_URL": service.url})
    yield k
    k.shutdown()


def new_kernel(service, tmp_path, **env):
    return Kernel(tmp_path, {"STUDIO_LIVY_URL": service.url, **env})


def sessions(service):
    return service.get("/sessions").json()["sessions"]


# -- cells ---------------------------------------------------------------------------------


def test_first_cell_starts_a_warm_session_and_answers(kernel):
    result = kernel.ok("spark.range(5).count()")
    assert result.stdout.strip().endswith("5")
    assert "Starting Spark application" in result.stdout and "SparkSession available as 'spark'." in result.stdout
    table = result.data("text/html")[0]
    assert "Spark UI" in table and "Driver log" in table and "<a href=" in table
    assert result.seconds < 10
    assert result.reply["execution_count"] >= 1


def test_remote_error_fails_the_cell_and_the_session_survives(kernel):
    kernel.ok("survivor = 'here'")
    result = kernel.run("def boom():\n    raise ValueError('bad value')\nboom()")
    assert result.status == "error"
    assert result.reply["ename"] == "ValueError" and result.reply["evalue"] == "bad value"
    assert any("raise ValueError" in line for line in result.reply["traceback"])
    assert result.error["ename"] == "ValueError"
    assert kernel.ok("survivor").stdout.strip() == "'here'"


def test_outputs_render_by_mime_type(kernel):
    image = kernel.ok("import matplotlib.pyplot as plt\nplt.clf()\n_ = plt.plot([1, 2, 3])\n%matplot plt")
    assert base64.b64decode(image.data("image/png")[0]).startswith(b"\x89PNG")
    data = kernel.ok("d = {'k': [1, 2]}\n%json d")
    assert data.data("application/json")[0] == {"k": [1, 2]}
    table = kernel.ok("rows = [(1, 'a'), (2, 'b')]\n%table rows")
    assert "<table>" in table.data("text/html")[0] and "<td>b</td>" in table.data("text/html")[0]


def test_progress_bar_updates_in_place_and_ends_with_the_time(kernel):
    result = kernel.ok("import time\nsc.parallelize(range(8), 8).foreach(lambda x: time.sleep(0.4))\n'done'")
    shown = [o for o in result.outputs if o["msg_type"] == "display_data" and "display_id" in o["content"].get("transient", {})]
    updates = [o for o in result.outputs if o["msg_type"] == "update_display_data"]
    assert shown and updates
    display_id = shown[-1]["content"]["transient"]["display_id"]
    assert all(u["content"]["transient"]["display_id"] == display_id for u in updates)
    texts = [u["content"]["data"]["text/plain"] for u in updates]
    assert any("tasks" in t and "%" in t for t in texts), texts
    assert texts[-1].startswith("Done in") and "8 tasks" in texts[-1]
    # stages are named after the cell's line, not the worker's files
    assert any("stage 'foreach (line 2)'" in t for t in texts), texts
    assert not any("<statement-" in t or "/studio/" in t for t in texts), texts
    one = kernel.ok("%%sql -o one_task\nSELECT reflect('java.lang.Thread', 'sleep', bigint(1500)) AS slept")
    final = [o["content"]["data"]["text/plain"] for o in one.outputs if o["msg_type"] == "update_display_data"][-1]
    assert "1 task" in final and "1 tasks" not in final and "helpers.py" not in json.dumps(one.outputs), final
    quiet = kernel.ok("%%sql -q -o quiet_rows\nSELECT reflect('java.lang.Thread', 'sleep', bigint(1500)) AS slept")
    shown = [o for o in quiet.outputs if o["msg_type"] != "execute_input"]
    assert shown == [], shown  # -q: no table, and no progress bar either


def test_sql_magic_brings_typed_rows_through_arrow(kernel):
    kernel.ok(
        "spark.range(5000).selectExpr('id', 'CAST(id AS DOUBLE) / 2 AS half', \"concat('r', id) AS name\", "
        "'timestamp_seconds(id) AS ts').createOrReplaceTempView('numbers')"
    )
    result = kernel.ok("%%sql -o small -n 10\nSELECT * FROM numbers ORDER BY id")
    html = result.data("text/html")[-1]
    assert "10 rows x 4 columns" in html and "cut at 10 of 5,000 rows" in html  # a cut result says its total
    default = kernel.ok("%%sql\nSELECT id FROM numbers").data("text/html")[-1]
    assert "2,500 rows x 1 column" in default and "cut at 2,500 of 5,000 rows" in default
    dtypes = kernel.ok("%%local\nprint(len(small), dict(small.dtypes.astype(str)))").stdout
    assert dtypes.startswith("10 {'id': 'int64', 'half': 'float64', 'name': 'object', 'ts': 'datetime64")
    # Timestamps arrive as toPandas() gives them: naive wall-clock time in the session time zone.
    same = kernel.ok("str(spark.sql('SELECT ts FROM numbers WHERE id = 7').toPandas()['ts'][0])").stdout.strip()
    assert kernel.ok("%%local\nprint(repr(str(small['ts'][7])))").stdout.strip() == same
    everything = kernel.ok("%%sql -o every -n -1 -q\nSELECT id FROM numbers")
    assert not everything.data("text/html")
    assert kernel.ok("%%local\nprint(len(every), int(every['id'].sum()))").stdout.strip() == "5000 12497500"
    sampled = kernel.ok("%%sql -o some -m sample -r 0.1 -n -1 -q\nSELECT id FROM numbers")
    count = int(kernel.ok("%%local\nprint(len(some))").stdout)
    assert 300 < count < 700 and sampled.status == "ok"
    # sparkmagic pastes the query into u"""...""", so a query holding \"\"\" breaks there; not here.
    kernel.ok("%%sql -o q\nSELECT 'a \"\"\" b' AS t")
    assert 'a """ b' in kernel.ok("%%local\nprint(q['t'][0])").stdout
    # nulls stay nulls: a nullable BIGINT is not float64, an array with a null is not [1.0, nan]
    kernel.ok("%%sql -o nulls -q\nSELECT * FROM VALUES (1L, array(1L, NULL), true), (NULL, array(2L), NULL) AS t(n, a, b)")
    typed = kernel.ok("%%local\nprint(dict(nulls.dtypes.astype(str)), list(nulls['a'][0]), nulls['n'].tolist())").stdout
    assert "'n': 'Int64'" in typed and "'b': 'boolean'" in typed and "[1, None]" in typed and "[1, <NA>]" in typed, typed


def test_sql_errors_are_clear(kernel):
    result = kernel.run("%%sql\nSELECT * FROM no_such_table_anywhere")
    assert result.status == "error" and "no_such_table_anywhere" in result.reply["evalue"]
    assert not [line for line in result.reply["traceback"] if "__studio__" in line or "/studio/worker/" in line], result.reply
    bad_flag = kernel.run("%%sql --nope\nSELECT 1")
    assert bad_flag.status == "error" and bad_flag.reply["ename"] == "UsageError" and "--nope" in bad_flag.reply["evalue"]
    for name in ("1bad", "class"):
        bad_name = kernel.run(f"%%sql -o {name}\nSELECT 1")
        assert bad_name.reply["ename"] == "UsageError" and "not a valid Python variable name" in bad_name.reply["evalue"]
    assert kernel.ok("1 + 1").stdout.strip() == "2"


def test_display_magic_tables_and_charts(kernel):
    kernel.ok("by_k = spark.range(60).selectExpr('id % 4 AS k', 'id').groupBy('k').count().orderBy('k')")
    table = kernel.ok("%%display\nby_k")
    html = table.data("text/html")[-1]
    assert "4 rows x 2 columns" in html and "4 in the DataFrame" in html and "<small>bigint</small>" in html
    for chart in ("bar", "line", "scatter", "pie", "area"):
        result = kernel.ok(f"%%display --chart {chart} --x k --y count\nby_k")
        assert base64.b64decode(result.data("image/png")[-1]).startswith(b"\x89PNG"), chart
    inline = kernel.ok("%%display by_k")
    assert "4 rows x 2 columns" in inline.data("text/html")[-1]
    not_a_frame = kernel.run("%%display\n42")
    assert not_a_frame.status == "error" and "DataFrame" in not_a_frame.reply["evalue"]
    bad_column = kernel.run("%%display --chart bar --x nope\nby_k")
    assert bad_column.status == "error" and "no column 'nope'" in bad_column.reply["evalue"]
    # code before the expression on the same line runs first; quotes in it survive
    kernel.ok("from pyspark.sql import functions as F")
    same_line = kernel.ok("%%display --title Small x = 2; spark.range(10).filter(F.col('id') < x)")
    assert "2 rows x 1 column" in same_line.data("text/html")[-1] and "Small" in same_line.data("text/html")[-1]


def test_display_charts_say_what_is_wrong_with_the_data(kernel):
    kernel.ok(
        "from pyspark.sql import functions as F\n"
        "awkward = spark.createDataFrame([('a', 1, 'x'), (None, 2, 'y'), ('c', None, 'z'), ('d', -1, 'w')], 'k string, v int, s string')"
    )
    skipped = kernel.ok("%%display --chart bar --x k --y v\nawkward")
    notes = " ".join(skipped.data("text/plain"))
    assert skipped.data("image/png") and "Skipped 1 row whose 'k' is null" in notes and "null in 'v'" in notes, notes
    pie = kernel.ok("%%display --chart pie --x k --y v\nawkward")
    assert pie.data("image/png") and "negative value" in " ".join(pie.data("text/plain"))
    text_y = kernel.run("%%display --chart line --x k --y s\nawkward")
    assert text_y.reply["ename"] == "UsageError" and "--y column 's' holds" in text_y.reply["evalue"] and "not numbers" in text_y.reply["evalue"]
    empty = kernel.run("%%display --chart bar\nawkward.limit(0)")
    assert empty.reply["ename"] == "UsageError" and "no rows to chart" in empty.reply["evalue"]
    cjk = kernel.ok("%%display --chart bar\nspark.createDataFrame([('東京', 3), ('大阪', 2)], '`都市` string, `人口` int')")
    assert cjk.data("image/png") and "Glyph" not in cjk.text(), cjk.text()  # no font warnings in the cell
    kernel.ok("%%local\nimport pandas as pd\nlocal_only_frame = pd.DataFrame({'a': [1]})")
    local = kernel.run("%%display local_only_frame")
    assert local.reply["ename"] == "NameError" and "%%send_to_spark -i local_only_frame -t df" in local.reply["evalue"]


def test_spark_o_and_send_to_spark(kernel):
    kernel.ok("%%spark -o letters\nletters = spark.createDataFrame([('a', 1), ('b', 2)], ['letter', 'n'])")
    assert kernel.ok("%%local\nprint(list(letters['letter']))").stdout.strip() == "['a', 'b']"
    kernel.ok("%%local\nimport pandas as pd\nlocal_frame = pd.DataFrame({'x': [1, 2, 3], 'y': ['p', 'q', 'r']})\nmessage = 'hi there'")
    sent = kernel.ok("%%send_to_spark -i local_frame -t df -n remote_frame")
    assert "Successfully passed 'local_frame' as 'remote_frame'" in sent.stdout
    assert kernel.ok("remote_frame.selectExpr('sum(x)').first()[0]").stdout.strip() == "6"
    # every row by default, and a named index (groupby) arrives as a column
    kernel.ok("%%local\nbig = pd.DataFrame({'k': [i % 7 for i in range(5000)], 'v': range(5000)})\nsums = big.groupby('k').sum()")
    assert "all 5,000 rows" in kernel.ok("%%send_to_spark -i big -t df").stdout
    assert kernel.ok("big.count()").stdout.strip() == "5000"
    grouped = kernel.ok("%%send_to_spark -i sums -t df")
    assert "The index (k) became column" in grouped.stdout
    assert kernel.ok("sorted(sums.columns), sums.count()").stdout.strip() == "(['k', 'v'], 7)"
    cut = kernel.ok("%%send_to_spark -i big -t df -n some -m 100")
    assert "100 of 5,000 rows" in cut.stdout and "Only the first 100" in cut.stdout
    kernel.ok("%%send_to_spark -i message")
    assert kernel.ok("message").stdout.strip() == "'hi there'"
    missing = kernel.run("%%send_to_spark -i nothing_here")
    assert missing.status == "error" and "not defined" in missing.reply["evalue"]


def test_info_logs_help(kernel):
    info = kernel.ok("%%info")
    assert "Current session configs" in info.text() and "Spark session service" in info.text()
    assert "\u2714" in info.data("text/html")[-1]
    logs = kernel.ok("%%logs")
    assert "StudioWorker" in logs.stdout
    help_html = kernel.ok("%%help").data("text/html")[0]
    assert "%%display" in help_html and "table|bar" in help_html and "--title" in help_html
    assert kernel.run("%%info\nunexpected body").reply["ename"] == "UsageError"


def test_local_and_ipython_magics_run_locally(kernel):
    assert kernel.ok("%%local\nimport os\nprint(os.getpid() == %d)" % os.getpid()).stdout.strip() == "False"
    timed = kernel.ok("%%time\nspark.range(10).count()")  # %%time times the remote cell, where spark is
    assert "10" in timed.stdout and "Wall time" in timed.stdout
    kernel.ok("%%local\nopen('local-marker-file', 'w').close()")
    assert "local-marker-file" in kernel.ok("!ls").stdout  # a shell command runs here, not as Spark code
    assert kernel.ok("%%local\nlocal_only = 5").status == "ok"
    assert kernel.run("local_only").reply["ename"] == "NameError"  # plain cells are remote


def test_the_kernel_starts_without_a_debugger_that_cannot_follow_remote_cells(kernel):
    info = kernel.request("kernel_info")
    assert info["implementation"] == "spark-studio-pyspark"
    assert "debugger" not in info.get("supported_features", [])
    # debugpy is refused only while the kernel starts: local code can still import it.
    assert kernel.ok("%%local\nimport importlib.util\nprint(importlib.util.find_spec('debugpy') is not None)").stdout.strip() == "True"


def test_completion_and_inspection(kernel):
    kernel.ok("completion_target_value = 1")
    reply = kernel.request("complete", "completion_tar", 14)
    assert reply["matches"] == ["completion_target_value"] and reply["cursor_start"] == 0
    reply = kernel.request("complete", "x = spark.ra", 12)
    assert "spark.range" in reply["matches"] and reply["cursor_start"] == 4
    reply = kernel.request("inspect", "spark.range(", 12, 0)
    assert reply["found"] and "Signature" in reply["data"]["text/plain"]
    # every request gets a reply: Shift-Tab on a half-typed magic shows the magic's help
    half = kernel.request("inspect", "%%sql -o", 8, 0)
    assert half["status"] == "ok" and "%%sql" in half["data"]["text/plain"]
    assert kernel.request("inspect", "%%sql -o\nSELECT", 15, 0)["status"] == "ok"
    assert "%%local" in kernel.request("complete", "%%lo", 4)["matches"]
    kernel.ok("grouped_source = spark.range(3)")
    chained = kernel.request("complete", "grouped_source.groupBy('id').co", 31)
    assert "count" in chained["matches"] and chained["cursor_start"] == 29, chained
    sql = kernel.request("complete", "%%sql\nSEL", 9)
    assert sql["matches"] == ["SELECT"] and sql["cursor_start"] == 6, sql


def test_interrupt_cancels_the_remote_statement_and_keeps_the_session(kernel):
    kernel.ok("kept_through_interrupt = 'yes'")
    sleeping = kernel.run("import time\ntime.sleep(600)", interrupt_after=2, timeout=60)
    assert sleeping.status == "error" and sleeping.reply["ename"] == "KeyboardInterrupt"
    assert sleeping.seconds < 8
    job = kernel.run("spark.range(0, 10**12, 1, 4).selectExpr('sum(id % 7)').collect()", interrupt_after=4, timeout=60)
    assert job.status == "error" and job.reply["ename"] == "KeyboardInterrupt" and job.seconds < 10
    assert kernel.ok("kept_through_interrupt").stdout.strip() == "'yes'"


def test_packages_are_notebook_scoped_and_reach_udfs(kernel, service, tmp_path):
    wheel = build_wheel(tmp_path)
    result = kernel.ok(f"sc.install_pypi_package({str(wheel)!r})")
    assert "Successfully installed hello-spark-0.1.0" in result.stdout
    assert kernel.ok("import hello_spark\nhello_spark.greet('driver')").stdout.strip() == "'hello driver from hello_spark 0.1.0'"
    udf = kernel.ok(
        "from pyspark.sql.functions import udf\n"
        "@udf('string')\ndef greet(x):\n    import hello_spark\n    return hello_spark.greet(str(x))\n"
        "[r[0] for r in spark.range(2).select(greet('id')).collect()]"
    )
    assert "hello 1 from hello_spark 0.1.0" in udf.stdout
    listed = kernel.ok("%pip list").stdout.replace("-", "_")
    assert "hello_spark" in listed and "pyspark" in listed and "pandas" in listed  # what the session imports
    assert "Location:" in kernel.ok("%pip show pyspark").stdout
    needs_pandas = build_wheel(tmp_path, "needs_pandas", requires=("pandas",))
    offline = kernel.ok(f"%pip install --no-index {needs_pandas}")  # pandas is there: nothing to download
    assert "Successfully installed" in offline.stdout and "needs" in offline.stdout, offline.stdout
    bad = kernel.run("sc.install_pypi_package('invalid$%#')")
    assert bad.reply["ename"] == "ValueError"
    assert kernel.run("sc.install_pypi_package('arrow', 'not-a-url')").reply["ename"] == "ValueError"
    failed = kernel.run("sc.install_pypi_package('no_such_package_studio_test==0.0.1', 'file:///nonexistent/index')")
    assert failed.reply["ename"] == "RuntimeError" and "pip install failed" in failed.reply["evalue"]
    other = new_kernel(service, tmp_path / "other")
    try:
        assert other.run("import hello_spark").reply["ename"] == "ModuleNotFoundError"
    finally:
        other.shutdown()
    kernel.ok("sc.uninstall_package('hello-spark')")


def test_output_streams_while_the_statement_runs_and_survives_an_interrupt(kernel):
    printing = "import time\nfor i in range(6):\n    print('line', i, flush=True)\n    time.sleep(0.5)\n'done'"
    result = kernel.ok(printing)
    streams = [o for o in result.outputs if o["msg_type"] == "stream"]
    text = "".join(o["content"]["text"] for o in streams)
    assert text == "".join(f"line {i}\n" for i in range(6)) + "'done'\n", text  # once each, in order
    assert streams[0]["at"] < result.seconds - 1.5, [(o["at"], o["content"]["text"]) for o in streams]
    interrupted = kernel.run("import time\nfor i in range(100):\n    print('tick', i, flush=True)\n    time.sleep(0.3)", interrupt_after=2.5, timeout=60)
    assert interrupted.reply["ename"] == "KeyboardInterrupt"
    assert "tick 0\ntick 1\n" in interrupted.stdout and interrupted.stdout.count("tick 0\n") == 1, interrupted.stdout


def test_a_session_that_died_is_named_and_replaced(service, tmp_path):
    kernel = new_kernel(service, tmp_path)
    try:
        first = session_id_of(kernel.ok("1"))
        died = kernel.run("import os\nos._exit(3)")
        assert died.status == "error" and "the next cell starts a new session" in died.reply["evalue"], died.reply
        info = kernel.ok("%%info").text()
        assert f"last session, {first}, is dead" in info, info
        logs = kernel.ok("%%logs").stdout
        assert f"last session, {first}, is dead" in logs and "StudioWorker" in logs, logs
        assert kernel.ok("2").stdout.strip().endswith("2")
        second = session_id_of(kernel.ok("%%info"))
        client = service.client()
        try:
            client.http.delete(f"/sessions/{second}")  # as a restarted service would have lost it
        finally:
            client.close()
        gone = kernel.run("3")
        assert gone.reply["ename"] == "SessionLost" and "variables of this one are lost" in gone.reply["evalue"], gone.reply
        cleaned = kernel.ok("%%cleanup -f").stdout
        assert str(first) not in cleaned and str(second) not in cleaned, cleaned  # ended sessions are not "deleted"
    finally:
        kernel.shutdown()


def test_configure_f_checks_first_and_falls_back(service, tmp_path):
    kernel = new_kernel(service, tmp_path)
    try:
        kernel.ok("kept = 41")
        before = session_id_of(kernel.ok("%%info"))
        refused = kernel.run('%%configure -f\n{"fooBar": 1}')
        assert refused.reply["ename"] == "InvalidSessionSettings" and "fooBar" in refused.reply["evalue"], refused.reply
        assert "keeps running" in refused.reply["evalue"]
        assert kernel.ok("kept + 1").stdout.strip() == "42"  # nothing was deleted
        assert session_id_of(kernel.ok("%%info")) == before
        # accepted by the check, but its JVM cannot start: the previous settings come back, with a session
        failing = kernel.run('%%configure -f\n{"driverMemory": "100m"}', timeout=300)  # too little for Spark
        assert failing.reply.get("ename") == "SessionStartError", failing.reply
        assert "Insufficient driver memory" in failing.reply["evalue"] and "previous settings are back" in failing.reply["evalue"]
        assert "\tat " not in failing.reply["evalue"]  # the reason, not the JVM's stack
        assert kernel.ok("1 + 1").stdout.strip() == "2"  # later cells work
        assert "100m" not in kernel.ok("%%info").text()
    finally:
        kernel.shutdown()


def test_session_packages_sit_on_the_interpreter_the_session_runs(test_root, tmp_path):
    """Sessions that run in a virtualenv (the service's): pip sees what they import, and a package
    that needs one of them installs offline. (Layered on the base interpreter, pip saw neither.)"""
    venv = tmp_path / "service-venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    only_here = build_wheel(tmp_path, "only_in_the_service_venv")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-index", "--no-deps", str(only_here)],
        check=True,
    )
    svc = start_service(test_root, "kernel-venv", env={"STUDIO_POOL_SIZE": "0", "STUDIO_WORKER_COMMAND": json.dumps([str(python), "-P", "-m", "studio.worker"])})
    kernel = Kernel(tmp_path / "k", {"STUDIO_LIVY_URL": svc.url})
    try:
        assert "0.1.0" in kernel.ok("import only_in_the_service_venv\nonly_in_the_service_venv.greet('x')", timeout=300).stdout
        listed = kernel.ok("%pip list").stdout.replace("-", "_")
        assert "only_in_the_service_venv" in listed and "pyspark" in listed, listed
        needs = build_wheel(tmp_path, "needs_the_venv_package", requires=("only-in-the-service-venv",))
        kernel.ok(f"sc.install_pypi_package({str(needs)!r}, 'file:///nonexistent/index')")  # offline: nothing to fetch
        assert kernel.ok("import needs_the_venv_package\n'ok'").stdout.strip() == "'ok'"
    finally:
        kernel.shutdown()
        assert svc.stop() == 0
    assert not svc.leftovers()


def test_configure_sets_and_restarts_the_session(service, tmp_path):
    kernel = new_kernel(service, tmp_path)
    try:
        bad = kernel.run("%%configure\n{not json")
        assert bad.status == "error" and "Could not parse JSON" in bad.reply["evalue"]
        kernel.ok('%%configure\n{"conf": {"spark.sql.shuffle.partitions": "7"}}')
        assert kernel.ok("spark.conf.get('spark.sql.shuffle.partitions')").stdout.strip().endswith("'7'")
        first_id = [s["id"] for s in sessions(service) if s["state"] == "idle"]
        kernel.ok("lost_on_restart = 1")
        refused = kernel.run('%%configure\n{"conf": {"spark.sql.shuffle.partitions": "9"}}')
        assert refused.status == "error" and "%%configure -f" in refused.reply["evalue"]
        kernel.ok('%%configure -f\n{"conf": {"spark.sql.shuffle.partitions": "9"}}')
        assert kernel.ok("spark.conf.get('spark.sql.shuffle.partitions')").stdout.strip() == "'9'"
        assert kernel.run("lost_on_restart").reply["ename"] == "NameError"
        assert first_id
    finally:
        kernel.shutdown()


def session_id_of(result) -> int:
    """The session marked current in the table the first remote cell shows."""
    import re

    table = next(html for html in result.data("text/html") if "<table>" in html)
    return int(re.search(r"<tr><td>(\d+)</td>(?:(?!</tr>).)*\u2714", table).group(1))


def test_delete_cleanup_and_shutdown(service, tmp_path):
    first = new_kernel(service, tmp_path / "a")
    second = new_kernel(service, tmp_path / "b")
    try:
        first_id = session_id_of(first.ok("1"))
        second_id = session_id_of(second.ok("2"))
        assert first_id != second_id
        refused = first.run(f"%%delete -s {second_id}")
        assert refused.status == "error" and "-f" in refused.reply["evalue"]
        own = first.run(f"%%delete -f -s {first_id}")
        assert own.status == "error" and "own session" in own.reply["evalue"]
        unknown = first.run("%%delete -f -s 987654")
        assert unknown.status == "error" and "not found" in unknown.reply["evalue"]
        assert f"Deleted session {second_id}." in first.ok(f"%%delete -f -s {second_id}").stdout
        gone = second.run("3")
        assert gone.status == "error"  # its session was deleted under it...
        assert second.ok("4").stdout.strip().endswith("4")  # ...and the next cell starts a new one
        assert "Add -f" in first.ok("%%cleanup").stdout
        cleaned = first.ok("%%cleanup -f")
        assert "Deleted sessions:" in cleaned.stdout and str(first_id) in cleaned.stdout
        assert not [s for s in sessions(service) if s["state"] in ("idle", "busy")]
        assert first.ok("5").stdout.strip().endswith("5")
    finally:
        first.shutdown()
        second.shutdown()
    # Kernel shutdown deletes the kernel's session.
    deadline = time.monotonic() + 30
    while [s for s in sessions(service) if s["state"] in ("idle", "busy", "starting")]:
        assert time.monotonic() < deadline
        time.sleep(0.5)


def test_an_unreachable_service_is_a_clear_error_and_the_kernel_lives(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    kernel = Kernel(tmp_path, {"STUDIO_LIVY_URL": f"http://127.0.0.1:{port}"})
    try:
        result = kernel.run("spark.range(1).count()")
        assert result.status == "error" and "Cannot reach the Spark session service" in result.reply["evalue"]
        assert kernel.ok("%%local\nprint('alive')").stdout.strip() == "alive"
    finally:
        kernel.shutdown()


def test_a_compute_file_in_the_notebook_folder_is_ignored(service, tmp_path):
    """A cloned repository's `.studio/compute.json` must not send cells elsewhere (or learn credentials)."""
    workspace = tmp_path / "workspace"
    (workspace / ".studio").mkdir(parents=True)
    (workspace / ".studio" / "compute.json").write_text(json.dumps({"name": "evil", "livy_url": "http://127.0.0.1:9"}))
    kernel = Kernel(tmp_path, {"STUDIO_LIVY_URL": service.url}, cwd=workspace)
    try:
        info = kernel.ok("%%info").text()
        assert "STUDIO_LIVY_URL" in info and "evil" not in info and "127.0.0.1:9 " not in info
        assert kernel.ok("spark.range(2).count()").stdout.strip().endswith("2")
    finally:
        kernel.shutdown()


def test_the_kernel_authenticates_or_says_why_not(service, tmp_path):
    """Credentials come from STUDIO_LIVY_TOKEN; a wrong one fails the cell with the service's reason."""
    kernel = Kernel(tmp_path, {"STUDIO_LIVY_URL": service.url, "STUDIO_LIVY_TOKEN": "wrong"})
    try:
        result = kernel.run("spark.range(1).count()")
        assert result.status == "error" and "Authentication failed" in result.reply["evalue"], result.text()
    finally:
        kernel.shutdown()
