"""sparkmagic's own PySpark kernel, unchanged, in a separate virtualenv, running a notebook
through nbclient against the service: plain code, %%sql -o (quiet, see CELLS), %%configure -f, %%info,
%matplot plt, %%send_to_spark, and an error cell followed by a working cell.

The virtualenv is made by the test command (see scripts/test.sh); its Python is found through
STUDIO_SPARKMAGIC_PYTHON or at .venv-sparkmagic/bin/python.
"""

from __future__ import annotations

import json
import os
import subprocess

import nbformat
import pytest

from conftest import shared_service, start_service
from helpers import REPO
from sparkmagic_notebook import cell_text, run_sparkmagic_notebook, sparkmagic_python


CELLS = [
    "%%configure -f\n{\"conf\": {\"spark.sql.shuffle.partitions\": \"4\"}}",
    "df = spark.range(10).selectExpr('id', 'id * 2 AS twice')\ndf.createOrReplaceTempView('t')\ndf.count()",
    # -q: sparkmagic's autoviz widget hangs any headless nbclient/papermill run (sparkmagic #833,
    # papermill #717); -o still brings the rows back through sparkmagic's toJSON path.
    "%%sql -q -o local_df\nSELECT id, twice FROM t ORDER BY id",
    "%%local\nprint('local rows', len(local_df), int(local_df['twice'].sum()))",
    "%%info",
    "import matplotlib.pyplot as plt\nplt.plot([1, 4, 9])\n%matplot plt",
    "%%local\nlocal_value = 'sent from the notebook'",
    "%%send_to_spark -i local_value -t str -n received",
    "print('spark has', received)",
    "1 / 0",
    "print('after the error', spark.range(3).count())",
    "%%configure -f\n{\"conf\": {\"spark.sql.shuffle.partitions\": \"7\"}}",
    "print('partitions', spark.conf.get('spark.sql.shuffle.partitions'))",
]


@pytest.fixture(scope="module")
def service(warm_service):
    yield from shared_service(warm_service, ready=2)


def test_sparkmagic_kernel_runs_a_notebook_against_the_service(service, tmp_path):
    # sparkmagic's Basic_Access: any user name, the studio's token as the password.
    cells = run_sparkmagic_notebook(service.url, service.token, CELLS, tmp_path, startup_timeout=180)
    texts = [cell_text(cell) for cell in cells]
    assert "10" in texts[1]
    assert "local rows 10 90" in texts[3]
    assert "Current session configs" in texts[4] and "pyspark" in texts[4]
    assert any("image/png" in out.get("data", {}) for out in cells[5].outputs)
    assert "spark has sent from the notebook" in texts[8]
    assert "ZeroDivisionError" in texts[9] or "division by zero" in texts[9]
    assert "after the error 3" in texts[10]
    assert "partitions 7" in texts[12]


SPARKMAGIC_HTTP = """
import sys
from sparkmagic.auth.basic import Basic
from sparkmagic.livyclientlib.endpoint import Endpoint
from sparkmagic.livyclientlib.exceptions import HttpClientException
from sparkmagic.livyclientlib.livyreliablehttpclient import LivyReliableHttpClient

url, token = sys.argv[1], sys.argv[2]
basic = Basic()  # what sparkmagic builds for "auth": "Basic_Access" (requests' HTTPBasicAuth underneath)
basic.username, basic.password = "analyst", token
for name, auth in (("none", None), ("basic", basic)):  # "auth": "None" is no authenticator at all
    client = LivyReliableHttpClient.from_endpoint(Endpoint(url, auth))
    try:
        print(name, "ok", len(client.get_sessions()["sessions"]))
    except HttpClientException as exc:
        print(name, "refused", str(exc).split(":")[0][:80].replace(chr(10), " "))
"""


def test_sparkmagic_http_layer_needs_the_token(test_root, tmp_path):
    """sparkmagic's own HTTP client: without credentials refused (401), with Basic_Access allowed."""
    python = sparkmagic_python()
    service = start_service(test_root, "sparkmagic-auth", env={"STUDIO_POOL_SIZE": "0"})
    try:
        env = {**os.environ, "SPARKMAGIC_CONF_DIR": str(tmp_path)}
        env.pop("PYTHONPATH", None)
        result = subprocess.run(
            [str(python), "-c", SPARKMAGIC_HTTP, service.url, service.token],
            capture_output=True, text=True, timeout=120, env=env,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        lines = dict(line.split(" ", 1) for line in result.stdout.strip().splitlines())
        assert lines["none"].startswith("refused") and "401" in lines["none"], result.stdout
        assert lines["basic"] == "ok 0", result.stdout
    finally:
        assert service.stop() == 0


def test_sparkmagic_cleanup_is_quick_on_a_service_where_many_sessions_were_just_deleted(test_root, tmp_path):
    """%%cleanup -f visits every listed session and waits on each; DELETEd sessions leave the list
    at once, as in Livy, so 20 just-deleted sessions cost it nothing (issue 10)."""
    import sys
    import time

    python = sparkmagic_python()
    echo_worker = json.dumps([sys.executable, str(REPO / "tests" / "workers" / "misbehaving.py")])
    service = start_service(
        test_root,
        "sparkmagic-cleanup",
        env={
            "STUDIO_POOL_SIZE": "0",
            "STUDIO_WORKER_COMMAND": echo_worker,
            "STUDIO_TEST_WORKER": "echo",
            "STUDIO_MAX_SESSIONS": "25",
            "STUDIO_MIN_AVAILABLE_MEMORY_MB": "0",
        },
    )
    livy = service.client()
    try:
        created = [livy.create_session(kind="pyspark")["id"] for _ in range(20)]
        for session_id in created:
            livy.wait_session(session_id, timeout=60)
            assert livy.http.delete(f"/sessions/{session_id}").status_code == 200
        config_dir = tmp_path / "sparkmagic"
        config_dir.mkdir()
        credentials = {"username": "analyst", "password": service.token, "url": service.url, "auth": "Basic_Access"}
        (config_dir / "config.json").write_text(json.dumps({"kernel_python_credentials": credentials}))
        notebook = nbformat.v4.new_notebook()
        notebook.cells = [nbformat.v4.new_code_cell("%%cleanup -f")]
        source, executed = tmp_path / "cleanup.ipynb", tmp_path / "cleanup-out.ipynb"
        nbformat.write(notebook, source)
        env = {**os.environ, "SPARKMAGIC_CONF_DIR": str(config_dir), "JUPYTER_PLATFORM_DIRS": "1"}
        env.pop("PYTHONPATH", None)
        started = time.monotonic()
        result = subprocess.run(
            [str(python), str(REPO / "tests" / "sparkmagic_runner.py"), str(source), str(executed)],
            capture_output=True, text=True, timeout=600, env=env,
        )
        assert result.returncode == 0, result.stderr[-5000:]
        assert time.monotonic() - started < 60  # kernel start included; it took minutes when they stayed listed
    finally:
        livy.close()
        assert service.stop() == 0
    assert not service.leftovers()
