"""`studio run`: headless runs with parameters, records, failures, timeouts and Ctrl-C, with
real processes; and every notebook in notebooks/ must run without a cell error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from conftest import shared_service
from helpers import CACHE_DIR, DRIVER_JAVA_OPTIONS, REPO, TEST_TOKEN, processes_under

# A run's embedded service (no --livy-url) starts its driver as the tests' services do (helpers).
DRIVERS = {"STUDIO_CACHE_DIR": str(CACHE_DIR), "STUDIO_JAVA_OPTIONS": DRIVER_JAVA_OPTIONS}


@pytest.fixture(scope="module")
def service(warm_service):
    yield from shared_service(warm_service, ready=1)


def write(path: Path, *cells, parameters: str | None = None) -> Path:
    notebook = new_notebook()
    if parameters is not None:
        notebook.cells.append(new_code_cell(parameters, metadata={"tags": ["parameters"]}))
    notebook.cells += [new_code_cell(c) if not c.startswith("#md ") else new_markdown_cell(c[4:]) for c in cells]
    notebook.metadata["kernelspec"] = {"name": "pyspark", "display_name": "PySpark", "language": "python"}
    nbformat.write(notebook, path)
    return path


def studio_run(*args, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    # The embedded service's processes live under cwd; a --livy-url service is the tests' (its token).
    env = {**os.environ, "TMPDIR": str(cwd), "STUDIO_LIVY_TOKEN": TEST_TOKEN}
    return subprocess.run([sys.executable, "-m", "studio", "run", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def live_sessions(service) -> list[dict]:
    return service.get("/sessions").json()["sessions"]


def outputs(path: Path) -> str:
    notebook = nbformat.read(path, as_version=4)
    return "\n".join(
        (o.get("text") or "") + str(o.get("data", {}).get("text/plain", "")) + (o.get("evalue") or "")
        for c in notebook.cells
        if c.cell_type == "code"
        for o in c.outputs
    )


def test_a_parameterised_run_succeeds_with_a_record(service, tmp_path):
    notebook = write(
        tmp_path / "report.ipynb",
        "print('report for', day, 'rows', spark.range(limit).count(), 'ratio', ratio, 'flag', verbose, 'since', since)",
        parameters="day = '2026-01-01'\nlimit = 5\nratio = 0.5\nverbose = False\nsince = '2026-01-01'",
    )
    (tmp_path / "params.yaml").write_text("ratio: 2\nlimit: 3\nsince: 2026-10-01\n")  # YAML reads a date
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "x", "--allow-empty"], cwd=tmp_path, check=True)
    result = studio_run(
        notebook, "-f", tmp_path / "params.yaml", "-p", "day", "2026-11-01", "-p", "verbose", "yes",
        "-o", tmp_path / "out.ipynb", "--html", tmp_path / "out.html", "--record", tmp_path / "record",
        "--livy-url", service.url, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "[3/3] completed" in result.stderr  # a progress line per cell
    assert "report for 2026-11-01 rows 3 ratio 2.0 flag True since 2026-10-01" in outputs(tmp_path / "out.ipynb")
    executed = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    assert executed.cells[1].metadata["tags"] == ["injected-parameters"]
    assert executed.cells[1].source.splitlines()[1:] == [
        "ratio = 2.0", "limit = 3", "since = '2026-10-01'", "day = '2026-11-01'", "verbose = True"
    ]  # fmt: skip
    assert all(c.metadata["papermill"]["status"] == "completed" for c in executed.cells)
    assert executed.metadata["papermill"]["parameters"]["day"] == "2026-11-01"
    assert "report for 2026-11-01" in (tmp_path / "out.html").read_text()
    record = json.loads((tmp_path / "record" / "record.json").read_text())
    assert record["status"] == "succeeded" and record["parameters"]["limit"] == 3
    assert len(record["notebook_sha256"]) == 64 and record["git"]["commit"]
    assert record["spark_app_id"].startswith("local-") and record["session"]["kind"] == "pyspark"
    assert [c["status"] for c in record["cells"]] == ["completed"] * 3 and all(c["duration"] is not None for c in record["cells"])
    assert not [s for s in live_sessions(service) if s["name"] == record["session_name"]]
    # The service's driver log link ends with the session; the record keeps the log itself.
    assert record["session"]["driver_log"] == "driver.log"
    assert "StudioWorker" in (tmp_path / "record" / "driver.log").read_text()


def test_a_failing_cell_fails_the_run_and_cleans_up(service, tmp_path):
    notebook = write(tmp_path / "fails.ipynb", "x = 1", "raise ValueError('broken input')", "print('never runs')")
    result = studio_run(notebook, "--livy-url", service.url, "--record", tmp_path / "rec", cwd=tmp_path)
    assert result.returncode == 1
    assert "[2/3] failed" in result.stderr and "cell 2 of 3 failed: ValueError: broken input" in result.stderr
    executed = nbformat.read(tmp_path / "fails.output.ipynb", as_version=4)
    assert [c.metadata["papermill"]["status"] for c in executed.cells] == ["completed", "failed", "pending"]
    record = json.loads((tmp_path / "rec" / "record.json").read_text())
    assert record["failure"] == {"cell": 2, "index": 1, "ename": "ValueError", "evalue": "broken input"}
    assert not [s for s in live_sessions(service) if s["name"] == record["session_name"]]


def test_a_cell_timeout_fails_the_run(service, tmp_path):
    notebook = write(tmp_path / "slow.ipynb", "import time\ntime.sleep(120)")
    started = time.monotonic()
    result = studio_run(notebook, "--livy-url", service.url, "--cell-timeout", "3", cwd=tmp_path)
    assert result.returncode == 1 and "CellTimeoutError" in result.stderr
    assert time.monotonic() - started < 90
    executed = nbformat.read(tmp_path / "slow.output.ipynb", as_version=4)
    assert executed.cells[0].metadata["papermill"]["status"] == "failed"
    # The notebook says what stderr says, not the KeyboardInterrupt nbclient's interrupt caused.
    errors = [o for o in executed.cells[0].outputs if o.output_type == "error"]
    assert [e.ename for e in errors] == ["CellTimeoutError"] and "3s" in errors[0].evalue
    assert not [s for s in live_sessions(service) if s["state"] in ("busy",)]


def test_ctrl_c_stops_the_run_and_leaves_nothing_behind(tmp_path):
    """The default path: an embedded service for the run, stopped with everything it started."""
    notebook = write(tmp_path / "long.ipynb", "x = 1", "import time\ntime.sleep(600)", "print('after')")
    env = {**os.environ, **DRIVERS, "TMPDIR": str(tmp_path)}
    process = subprocess.Popen(
        [sys.executable, "-m", "studio", "run", str(notebook), "--record", str(tmp_path / "rec")],
        stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    lines = []
    assert process.stderr is not None
    for line in process.stderr:
        lines.append(line)
        if "[1/3] completed" in line:
            break
    time.sleep(2)
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=90)
    assert process.returncode == 130, "".join(lines) + rest
    record = json.loads((tmp_path / "rec" / "record.json").read_text())
    assert record["status"] == "interrupted"
    executed = nbformat.read(tmp_path / "long.output.ipynb", as_version=4)
    assert [c.metadata["papermill"]["status"] for c in executed.cells] == ["completed", "interrupted", "pending"]
    assert not processes_under(tmp_path)


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.ipynb"], "no notebook at"),
        (["params.ipynb", "-p", "nope", "1"], "unknown parameter nope"),
        (["params.ipynb", "-p", "limit", "many"], "parameter 'limit' expects int"),
        (["params.ipynb", "-f", "bad.yaml"], "expects int"),
        (["notanotebook.ipynb"], "is not a notebook"),
        (["otherjson.ipynb"], "is not a notebook: its JSON has no list of 'cells'"),
        (["params.ipynb", "-p", "class", "1"], "parameter name 'class' is not a Python name"),
        (["plain.ipynb", "-p", "__import__('os').system('touch pwned'); x", "1"], "is not a Python name"),
        (["params.ipynb", "-f", "names.yaml"], "parameter name 'not a name' is not a Python name"),
        (["params.ipynb", "-f", "binary.yaml"], "use text, numbers, booleans, lists or mappings"),
        (["params.ipynb", "-o", "params.ipynb/out.ipynb"], "cannot write the output notebook"),
        (["params.ipynb", "--record", "params.ipynb/rec"], "cannot write the record folder"),
        (["params.ipynb", "--kernel", "nosuch"], "no kernel named 'nosuch'"),
    ],
)
def test_bad_input_is_refused_before_running(tmp_path, args, message):
    write(tmp_path / "params.ipynb", "print(limit)", parameters="limit = 5")
    write(tmp_path / "plain.ipynb", "print(1)")
    (tmp_path / "bad.yaml").write_text("limit: [1, 2]\n")
    (tmp_path / "names.yaml").write_text("'not a name': 1\n")
    (tmp_path / "binary.yaml").write_text("limit: !!binary aGVsbG8=\n")
    (tmp_path / "notanotebook.ipynb").write_text("{not json")
    (tmp_path / "otherjson.ipynb").write_text('{"name": "a JSON file, not a notebook"}')
    result = studio_run(*args, "--livy-url", "http://127.0.0.1:9", cwd=tmp_path, timeout=60)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "pwned").exists()


def test_a_bad_kernel_is_refused_before_a_service_starts(tmp_path):
    notebook = write(tmp_path / "nb.ipynb", "print(1)")
    started = time.monotonic()
    result = studio_run(notebook, "--kernel", "nosuch", cwd=tmp_path, timeout=60)  # no --livy-url: it would start one
    assert result.returncode == 2 and "no kernel named 'nosuch'" in result.stderr, result.stderr
    assert "embedded" not in result.stderr and time.monotonic() - started < 20
    assert not processes_under(tmp_path)


def test_awkward_but_valid_input_runs(service, tmp_path):
    """A cell without metadata, NaN from the command line, tuple parameters, a date in YAML."""
    cells = [
        {"cell_type": "code", "source": "ratio = 1.0\nlow, high = 1, 2\nsize = (1, 2)\nsince = 'x'",
         "metadata": {"tags": ["parameters"]}, "outputs": [], "execution_count": None},
        {"cell_type": "code", "source": "print('values', ratio, ratio != ratio, low, high, size, since)"},  # no metadata
    ]  # fmt: skip
    path = tmp_path / "awkward.ipynb"
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    (tmp_path / "p.yaml").write_text("since: 2026-11-01\n")
    result = studio_run(
        path, "-p", "ratio", "nan", "-p", "high", "5", "-p", "size", "[3, 4]", "-f", tmp_path / "p.yaml",
        "--livy-url", service.url, "--record", tmp_path / "rec", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "values nan True 1 5 (3, 4) 2026-11-01" in outputs(tmp_path / "awkward.output.ipynb")
    injected = nbformat.read(tmp_path / "awkward.output.ipynb", as_version=4).cells[1].source
    assert "ratio = float('nan')" in injected and "size = (3, 4)" in injected
    record = json.loads((tmp_path / "rec" / "record.json").read_text())  # strict JSON: no bare NaN
    assert record["parameters"]["ratio"] == "NaN"


def test_a_stop_in_the_first_moments_ends_cleanly(tmp_path):
    """SIGINT as soon as the run starts (before its service and kernel): exit 130, the output
    notebook written with every cell pending, no traceback, nothing left running."""
    notebook = write(tmp_path / "early.ipynb", "x = 1", "print('never')")
    env = {**os.environ, **DRIVERS, "TMPDIR": str(tmp_path)}
    process = subprocess.Popen(
        [sys.executable, "-m", "studio", "run", str(notebook), "--record", str(tmp_path / "rec")],
        stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert process.stderr is not None
    first = process.stderr.readline()
    assert first.startswith("studio run: started"), first
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=90)
    assert process.returncode == 130, first + rest
    assert "Traceback" not in rest and "interrupted after 0 of 2 cells" in rest
    executed = nbformat.read(tmp_path / "early.output.ipynb", as_version=4)
    assert [c.metadata["papermill"]["status"] for c in executed.cells] == ["pending", "pending"]
    assert json.loads((tmp_path / "rec" / "record.json").read_text())["status"] == "interrupted"
    assert not processes_under(tmp_path)


def test_configure_f_after_a_remote_parameters_cell(service, tmp_path):
    """An EMR Studio-style notebook: parameters run remotely, then %%configure -f restarts the
    session (same name) with a runtime conf; the run deletes the session that exists at the end."""
    notebook = write(
        tmp_path / "emr.ipynb",
        '%%configure -f\n{"conf": {"spark.sql.shuffle.partitions": "7"}}',
        "print('partitions', spark.conf.get('spark.sql.shuffle.partitions'))",
        "%%info",
        parameters="label = 'default'",
    )
    result = studio_run(notebook, "-p", "label", "nightly", "--livy-url", service.url, "--record", tmp_path / "rec", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "%%configure -f in cell 3 of 5 starts a new session: the parameters" in result.stderr  # a warning
    text = outputs(tmp_path / "emr.output.ipynb")
    assert "partitions 7" in text and "Current session configs" in text
    record = json.loads((tmp_path / "rec" / "record.json").read_text())
    assert record["session"]["conf"] == {"spark.sql.shuffle.partitions": "7"}  # the session that exists at the end
    assert not [s for s in live_sessions(service) if s["name"] == record["session_name"] and s["state"] in ("idle", "busy", "starting")]


def test_parameters_without_a_parameters_cell_go_on_top_with_a_warning(service, tmp_path):
    notebook = write(tmp_path / "plain.ipynb", "print('value', value)")
    result = studio_run(notebook, "-p", "value", "42", "--livy-url", service.url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "no cell tagged 'parameters'" in result.stderr
    executed = nbformat.read(tmp_path / "plain.output.ipynb", as_version=4)
    assert executed.cells[0].metadata["tags"] == ["injected-parameters"]
    assert "value 42" in outputs(tmp_path / "plain.output.ipynb")


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "notebooks").glob("*.ipynb")))
def test_every_project_notebook_runs_without_a_cell_error(service, tmp_path, name):
    result = studio_run(REPO / "notebooks" / name, "-o", tmp_path / name, "--livy-url", service.url, cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    text = outputs(tmp_path / name)
    if name == "getting-started.ipynb":
        assert "wrote 100000 trips" in text and "Airport" in text and "Queens" in text
        executed = nbformat.read(tmp_path / name, as_version=4)
        images = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
        assert len(images) == 2  # the %%display bar chart and the %matplot figure
        assert "6 rows x 4 columns" in text and "DataFrame 6 zones" in text
        assert "hello Airport from hello_spark 0.1.0" in text
        assert "Current session configs" in text
