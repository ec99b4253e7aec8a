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

import httpx
import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from conftest import start_service
from helpers import REPO, processes_under


@pytest.fixture(scope="module")
def service(test_root):
    svc = start_service(test_root, "run", env={"STUDIO_POOL_SIZE": "1", "STUDIO_POOL_WARMUP_SECONDS": "2"})
    svc.wait_pool(1)
    yield svc
    assert svc.stop() == 0
    assert not svc.leftovers()


def write(path: Path, *cells, parameters: str | None = None) -> Path:
    notebook = new_notebook()
    if parameters is not None:
        notebook.cells.append(new_code_cell(parameters, metadata={"tags": ["parameters"]}))
    notebook.cells += [new_code_cell(c) if not c.startswith("#md ") else new_markdown_cell(c[4:]) for c in cells]
    notebook.metadata["kernelspec"] = {"name": "pyspark", "display_name": "PySpark", "language": "python"}
    nbformat.write(notebook, path)
    return path


def studio_run(*args, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TMPDIR": str(cwd)}  # the embedded service's processes live under cwd
    return subprocess.run([sys.executable, "-m", "studio", "run", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def live_sessions(service) -> list[dict]:
    return httpx.get(service.url + "/sessions", timeout=10).json()["sessions"]


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
        "print('report for', day, 'rows', spark.range(limit).count(), 'ratio', ratio, 'flag', verbose)",
        parameters="day = '2026-01-01'\nlimit = 5\nratio = 0.5\nverbose = False",
    )
    (tmp_path / "params.yaml").write_text("ratio: 2\nlimit: 3\n")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "x", "--allow-empty"], cwd=tmp_path, check=True)
    result = studio_run(
        notebook, "-f", tmp_path / "params.yaml", "-p", "day", "2026-11-01", "-p", "verbose", "yes",
        "-o", tmp_path / "out.ipynb", "--html", tmp_path / "out.html", "--record", tmp_path / "record",
        "--livy-url", service.url, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "[3/3] cell 2 completed" in result.stderr  # a progress line per cell
    assert "report for 2026-11-01 rows 7 ratio 2.0 flag True" not in outputs(tmp_path / "out.ipynb")
    assert "report for 2026-11-01 rows 3 ratio 2.0 flag True" in outputs(tmp_path / "out.ipynb")
    executed = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    assert executed.cells[1].metadata["tags"] == ["injected-parameters"]
    assert executed.cells[1].source.splitlines()[1:] == ["ratio = 2.0", "limit = 3", "day = '2026-11-01'", "verbose = True"]
    assert all(c.metadata["papermill"]["status"] == "completed" for c in executed.cells)
    assert executed.metadata["papermill"]["parameters"]["day"] == "2026-11-01"
    assert "report for 2026-11-01" in (tmp_path / "out.html").read_text()
    record = json.loads((tmp_path / "record" / "record.json").read_text())
    assert record["status"] == "succeeded" and record["parameters"]["limit"] == 3
    assert len(record["notebook_sha256"]) == 64 and record["git"]["commit"]
    assert record["spark_app_id"].startswith("local-") and record["session"]["kind"] == "pyspark"
    assert [c["status"] for c in record["cells"]] == ["completed"] * 3 and all(c["duration"] is not None for c in record["cells"])
    assert not [s for s in live_sessions(service) if s["name"] == record["session_name"]]


def test_a_failing_cell_fails_the_run_and_cleans_up(service, tmp_path):
    notebook = write(tmp_path / "fails.ipynb", "x = 1", "raise ValueError('broken input')", "print('never runs')")
    result = studio_run(notebook, "--livy-url", service.url, "--record", tmp_path / "rec", cwd=tmp_path)
    assert result.returncode == 1
    assert "cell 1 failed: ValueError: broken input" in result.stderr
    executed = nbformat.read(tmp_path / "fails.output.ipynb", as_version=4)
    assert [c.metadata["papermill"]["status"] for c in executed.cells] == ["completed", "failed", "pending"]
    record = json.loads((tmp_path / "rec" / "record.json").read_text())
    assert record["failure"] == {"cell": 1, "ename": "ValueError", "evalue": "broken input"}
    assert not [s for s in live_sessions(service) if s["name"] == record["session_name"]]


def test_a_cell_timeout_fails_the_run(service, tmp_path):
    notebook = write(tmp_path / "slow.ipynb", "import time\ntime.sleep(120)")
    started = time.monotonic()
    result = studio_run(notebook, "--livy-url", service.url, "--cell-timeout", "3", cwd=tmp_path)
    assert result.returncode == 1 and "CellTimeoutError" in result.stderr
    assert time.monotonic() - started < 90
    executed = nbformat.read(tmp_path / "slow.output.ipynb", as_version=4)
    assert executed.cells[0].metadata["papermill"]["status"] == "failed"
    assert not [s for s in live_sessions(service) if s["state"] in ("busy",)]


def test_ctrl_c_stops_the_run_and_leaves_nothing_behind(tmp_path):
    """The default path: an embedded service for the run, stopped with everything it started."""
    notebook = write(tmp_path / "long.ipynb", "x = 1", "import time\ntime.sleep(600)", "print('after')")
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    process = subprocess.Popen(
        [sys.executable, "-m", "studio", "run", str(notebook), "--record", str(tmp_path / "rec")],
        stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    lines = []
    assert process.stderr is not None
    for line in process.stderr:
        lines.append(line)
        if "cell 0 completed" in line:
            break
    time.sleep(2)
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=90)
    assert process.returncode == 130, "".join(lines) + rest
    record = json.loads((tmp_path / "rec" / "record.json").read_text())
    assert record["status"] == "interrupted"
    executed = nbformat.read(tmp_path / "long.output.ipynb", as_version=4)
    assert executed.cells[1].metadata["papermill"]["status"] == "failed"
    assert not processes_under(tmp_path)


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.ipynb"], "no notebook at"),
        (["params.ipynb", "-p", "nope", "1"], "unknown parameter nope"),
        (["params.ipynb", "-p", "limit", "many"], "parameter 'limit' expects int"),
        (["params.ipynb", "-f", "bad.yaml"], "expects int"),
        (["notanotebook.ipynb"], "is not a notebook"),
    ],
)
def test_bad_input_is_refused_before_running(tmp_path, args, message):
    write(tmp_path / "params.ipynb", "print(limit)", parameters="limit = 5")
    (tmp_path / "bad.yaml").write_text("limit: [1, 2]\n")
    (tmp_path / "notanotebook.ipynb").write_text("{not json")
    result = studio_run(*args, "--livy-url", "http://127.0.0.1:9", cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr


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
