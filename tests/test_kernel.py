"""The PySpark kernel through jupyter_client against a real service and real PySpark: cells,
every magic, errors, interrupt, packages in a UDF, completion and inspection.
(The getting-started notebook runs headless in test_run.py, through `studio run`.)"""

from __future__ import annotations

import base64
import json
import os
import socket
import time

import httpx
import pytest

from conftest import start_service
from helpers import build_wheel
from kernelhelpers import Kernel


@pytest.fixture(scope="module")
def service(test_root):
    svc = start_service(test_root, "kernel", env={"STUDIO_POOL_SIZE": "2", "STUDIO_POOL_WARMUP_SECONDS": "3"})
    svc.wait_pool(2)
    yield svc
    assert svc.stop() == 0
    assert not svc.leftovers()


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


def test_sql_magic_brings_typed_rows_through_arrow(kernel):
    kernel.ok(
        "spark.range(5000).selectExpr('id', 'CAST(id AS DOUBLE) / 2 AS half', \"concat('r', id) AS name\", "
        "'timestamp_seconds(id) AS ts').createOrReplaceTempView('numbers')"
    )
    result = kernel.ok("%%sql -o small -n 10\nSELECT * FROM numbers ORDER BY id")
    html = result.data("text/html")[-1]
    assert "10 rows x 4 columns" in html and "row limit of 10" in html
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


def test_sql_errors_are_clear(kernel):
    result = kernel.run("%%sql\nSELECT * FROM no_such_table_anywhere")
    assert result.status == "error" and "no_such_table_anywhere" in result.reply["evalue"]
    bad_flag = kernel.run("%%sql --nope\nSELECT 1")
    assert bad_flag.status == "error" and bad_flag.reply["ename"] == "UsageError" and "--nope" in bad_flag.reply["evalue"]
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


def test_spark_o_and_send_to_spark(kernel):
    kernel.ok("%%spark -o letters\nletters = spark.createDataFrame([('a', 1), ('b', 2)], ['letter', 'n'])")
    assert kernel.ok("%%local\nprint(list(letters['letter']))").stdout.strip() == "['a', 'b']"
    kernel.ok("%%local\nimport pandas as pd\nlocal_frame = pd.DataFrame({'x': [1, 2, 3], 'y': ['p', 'q', 'r']})\nmessage = 'hi there'")
    sent = kernel.ok("%%send_to_spark -i local_frame -t df -n remote_frame")
    assert "Successfully passed 'local_frame' as 'remote_frame'" in sent.stdout
    assert kernel.ok("remote_frame.selectExpr('sum(x)').first()[0]").stdout.strip() == "6"
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
    assert "%%display" in kernel.ok("%%help").data("text/html")[0]
    assert kernel.run("%%info\nunexpected body").reply["ename"] == "UsageError"


def test_local_and_ipython_magics_run_locally(kernel):
    assert kernel.ok("%%local\nimport os\nprint(os.getpid() == %d)" % os.getpid()).stdout.strip() == "False"
    assert "Wall time" in kernel.ok("%%time\nsum(range(10))").stdout
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
    assert "hello_spark" in kernel.ok("%pip list").stdout.replace("-", "_")
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
