"""Applications from the command line and in the Studio, through a real `studio serve` and the
session service it starts (one of each for the module; applications with ``initialCapacity`` 0,
so that nothing runs until a session or a job run asks).

* ``studio applications create|list|get|update|start|stop|delete`` against the service: the
  service's JSON on standard output, its ``msg`` on standard error with exit 1 when it refuses.
* ``studio jobs run --wait`` reaches SUCCESS; ``list``, ``get`` and ``logs`` show it.
* The Studio offers the application as a compute (``<local URL>/applications/<name>``, managed),
  a workspace attaches to it, and an execution naming it runs its session in that application
  (the service lists the session under the application, and the driver has the application's conf).
* The Applications page in chromium shows it, and an admin's Stop button stops it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from typing import Any

import httpx
import nbformat
import pytest

from browser_helpers import artifacts, needs_chromium, shots_on_failure
from helpers import REPO, auth_headers
from workspace_helpers import serving

APP = "small"
MARKER = "spark.studio.test.application"


@pytest.fixture(scope="module")
def studio(test_root):
    with serving(test_root / "applications-studio", pool=0) as server:
        yield server


@pytest.fixture(scope="module")
def livy_url(studio) -> str:
    return studio.get("/api/computes/local").json()["url"]


def cli(studio, livy_url: str, *args: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`python -m studio ...` as a person would type it: the service's URL, the studio's state directory
    (its token is read from there; no token in the environment)."""
    env = {k: v for k, v in os.environ.items() if k not in ("STUDIO_TOKEN", "STUDIO_LIVY_TOKEN", "STUDIO_LIVY_USER")}
    command = [sys.executable, "-P", "-m", "studio", *args, "--url", livy_url, "--state-dir", str(studio.state_dir)]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def ok(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return json.loads(result.stdout) if result.stdout.strip() else None


def service_msg(studio, livy_url: str, method: str, path: str) -> tuple[int, str]:
    response = httpx.request(method, livy_url + path, headers=auth_headers(studio.token), timeout=30, trust_env=False, json={} if method == "POST" else None)
    return response.status_code, response.json()["msg"]


def wait_state(studio, livy_url: str, name: str, states: tuple[str, ...], timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        app = ok(cli(studio, livy_url, "applications", "get", name))["application"]
        if app["state"] in states:
            return app
        assert time.monotonic() < deadline, f"application {name} is {app['state']} ({app.get('stateDetails')}), not {states}"
        time.sleep(1)


@pytest.fixture(scope="module")
def small(studio, livy_url) -> dict[str, Any]:
    """The application `small`, created through the CLI: JSON on standard input plus flags on top."""
    definition = {
        "name": "ignored-the-flag-wins",
        "type": "SPARK",
        "driverConfiguration": {"conf": {MARKER: APP}},
        "autoStartConfiguration": {"enabled": True},
    }
    created = ok(
        cli(
            studio, livy_url, "applications", "create", "--json", "-", "--name", APP,
            "--initial-drivers", "0", "--max-drivers", "2", "--driver-memory", "1g", "--idle-timeout-minutes", "30",
            stdin=json.dumps(definition),
        )
    )
    assert created["name"] == APP and re.fullmatch(r"[a-z0-9]{16}", created["applicationId"]), created
    return created


def test_applications_from_the_command_line(studio, livy_url, small, tmp_path):
    app = ok(cli(studio, livy_url, "applications", "get", APP))["application"]
    assert app["applicationId"] == small["applicationId"]
    assert app["initialCapacity"]["DRIVER"]["workerCount"] == 0
    assert app["maximumCapacity"]["drivers"] == 2
    assert app["driverConfiguration"]["driverMemory"] == "1g"
    assert app["autoStopConfiguration"] == {"enabled": True, "idleTimeoutMinutes": 30}
    assert app["livyEndpoint"] == f"{livy_url}/applications/{APP}"
    # By id too, and listed (with a state filter, repeatable or comma-separated).
    assert ok(cli(studio, livy_url, "applications", "get", small["applicationId"]))["application"]["name"] == APP
    listed = ok(cli(studio, livy_url, "applications", "list"))
    assert {a["name"] for a in listed["applications"]} >= {"default", APP}
    by_state = ok(cli(studio, livy_url, "applications", "list", "--states", app["state"]))
    assert APP in {a["name"] for a in by_state["applications"]}
    assert all(a["state"] == app["state"] for a in by_state["applications"])

    # A scratch application for the whole lifecycle: update (a file as --cli-input-json), start, stop, delete.
    scratch = ok(cli(studio, livy_url, "applications", "create", "--name", "scratch", "--initial-drivers", "0"))
    patch = tmp_path / "update.json"
    patch.write_text(json.dumps({"tags": {"team": "data"}, "maximumCapacity": {"drivers": 3}}))
    ok(cli(studio, livy_url, "applications", "update", "scratch", "--cli-input-json", f"file://{patch}", "--max-drivers", "4"))
    updated = ok(cli(studio, livy_url, "applications", "get", "scratch"))["application"]
    assert updated["tags"] == {"team": "data"} and updated["maximumCapacity"]["drivers"] == 4
    ok(cli(studio, livy_url, "applications", "start", "scratch"))
    wait_state(studio, livy_url, "scratch", ("STARTED",))
    # Deleting a started application is refused by the service: its msg, exit 1.
    status, msg = service_msg(studio, livy_url, "DELETE", "/applications/scratch")
    assert status == 409
    refused = cli(studio, livy_url, "applications", "delete", "scratch")
    assert refused.returncode == 1 and refused.stdout == ""
    assert msg in refused.stderr and "HTTP 409" in refused.stderr
    ok(cli(studio, livy_url, "applications", "stop", "scratch"))
    wait_state(studio, livy_url, "scratch", ("STOPPED",))
    ok(cli(studio, livy_url, "applications", "start", "scratch"))
    wait_state(studio, livy_url, "scratch", ("STARTED",))
    ok(cli(studio, livy_url, "applications", "stop", "scratch"))
    wait_state(studio, livy_url, "scratch", ("STOPPED",))
    ok(cli(studio, livy_url, "applications", "delete", scratch["applicationId"]))
    gone = cli(studio, livy_url, "applications", "get", "scratch")
    status, msg = service_msg(studio, livy_url, "GET", "/applications/scratch")
    assert status == 404 and gone.returncode == 1 and msg in gone.stderr

    # Mistakes on our side are said before anything is sent (exit 2); no service at all is exit 1.
    nameless = cli(studio, livy_url, "applications", "create")
    assert nameless.returncode == 2 and "needs a name" in nameless.stderr
    bad_json = cli(studio, livy_url, "applications", "create", "--json", "-", stdin="[1, 2]")
    assert bad_json.returncode == 2 and "must be an object" in bad_json.stderr
    nobody = subprocess.run(
        [sys.executable, "-P", "-m", "studio", "applications", "list", "--url", "http://127.0.0.1:9"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert nobody.returncode == 1 and "Cannot reach" in nobody.stderr


def test_a_job_run_from_the_command_line(studio, livy_url, small, tmp_path):
    script = tmp_path / "count.py"
    script.write_text(
        "import sys\nfrom pyspark.sql import SparkSession\n"
        "spark = SparkSession.builder.getOrCreate()\n"
        "print('counted', spark.range(int(sys.argv[1])).count(), spark.conf.get(sys.argv[2]))\n"
        "spark.stop()\n"
    )
    result = cli(
        studio, livy_url, "jobs", "run", "--application", APP, "--entry-point", str(script), "--args", "7", MARKER,
        "--name", "count-seven", "--timeout-minutes", "10", "--wait", "--poll-seconds", "0.5",
    )
    run = ok(result)["jobRun"]
    assert run["state"] == "SUCCESS" and run["name"] == "count-seven", run
    assert run["applicationId"] == small["applicationId"]
    assert "SUCCESS" in result.stderr  # the states it went through, on standard error
    run_id = run["jobRunId"]

    got = ok(cli(studio, livy_url, "jobs", "get", "--application", APP, run_id))["jobRun"]
    assert got["state"] == "SUCCESS"
    listed = ok(cli(studio, livy_url, "jobs", "list", "--application", APP, "--states", "SUCCESS,FAILED"))
    assert run_id in {r["id"] for r in listed["jobRuns"]}
    log = cli(studio, livy_url, "jobs", "logs", "--application", APP, run_id)
    assert log.returncode == 0 and f"counted 7 {APP}" in log.stdout, log.stdout[-2000:]
    # Cancelling a run that ended: the service's answer, whatever it is, passed on as it is.
    status = httpx.delete(
        f"{livy_url}/applications/{APP}/jobruns/{run_id}", headers=auth_headers(studio.token), timeout=30, trust_env=False
    ).status_code
    cancel = cli(studio, livy_url, "jobs", "cancel", "--application", APP, run_id)
    assert cancel.returncode == (0 if status < 300 else 1), cancel.stderr
    missing = cli(studio, livy_url, "jobs", "get", "--application", APP, "999999")
    assert missing.returncode == 1 and "HTTP 404" in missing.stderr


def test_the_application_is_a_compute_and_an_execution_runs_in_it(studio, livy_url, small):
    with studio.http() as api:
        computes = {c["name"]: c for c in api.get("/api/computes").json()["computes"]}
        assert APP in computes, computes.keys()
        compute = computes[APP]
        assert compute["url"] == f"{livy_url}/applications/{APP}"
        assert compute["managed"] and compute["application"] == APP
        assert compute["healthy"], compute["error"]
        assert "default" not in computes  # that is `local`
        # Managed: not removable; its users follow `local`'s.
        refused = api.delete(f"/api/computes/{APP}")
        assert refused.status_code == 409, refused.text
        assert api.patch(f"/api/computes/{APP}", json={"allowed_users": ["admin"]}).status_code == 409

        # A workspace attaches to it like to any compute.
        workspace = api.post("/api/workspaces", json={"name": "on-small", "compute": "local", "start": False})
        assert workspace.status_code == 201, workspace.text
        attached = api.post(f"/api/workspaces/{workspace.json()['id']}/attach", json={"compute": APP})
        assert attached.status_code == 200 and attached.json()["compute"] == APP, attached.text

        notebook = nbformat.v4.new_notebook()
        notebook.cells = [
            nbformat.v4.new_code_cell(f"print('conf', spark.conf.get('{MARKER}'))"),
            nbformat.v4.new_code_cell("import time\ntime.sleep(8)\nspark.range(3).count()"),
        ]
        nbformat.write(notebook, studio.root / "on-small" / "app.ipynb")
        started = api.post("/api/executions", json={"workspace": "on-small", "notebook": "app.ipynb", "compute": APP})
        assert started.status_code == 201, started.text
        execution = started.json()
        assert execution["compute"] == APP

        # While it runs, the session service lists its session under the application, not under the root (default).
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            execution = api.get(f"/api/executions/{execution['id']}").json()
            if not seen:
                in_app = studio.get(f"{livy_url}/applications/{APP}/sessions").json()["sessions"]
                seen = [s for s in in_app if s["state"] in ("starting", "idle", "busy")]
                if seen:
                    root = studio.get(f"{livy_url}/sessions").json()["sessions"]
                    assert seen[0]["id"] not in {s["id"] for s in root if s["state"] in ("starting", "idle", "busy")}
            if execution["status"] in ("FINISHED", "FAILED", "STOPPED"):
                break
            time.sleep(0.5)
        assert execution["status"] == "FINISHED", (execution["last_state_change_reason"], api.get(f"/api/executions/{execution['id']}/log").text[-3000:])
        assert seen, "the execution's session was never listed under the application"
        assert execution["livy_url"] == f"{livy_url}/applications/{APP}"
        output = nbformat.reads(api.get(execution["output"]["notebook"]).text, as_version=4)
        text = "".join(o.get("text", "") for o in output.cells[0].outputs if o.output_type == "stream")
        assert f"conf {APP}" in text, output.cells[0].outputs

        # The Studio's own listing of applications: the compute it is, and admins' start/stop go through.
        listing = api.get("/api/applications").json()
        mine = {a["name"]: a for a in listing["applications"]}
        assert mine[APP]["compute"] == APP and mine["default"]["compute"] == "local"
        assert mine[APP]["livyEndpoint"] == f"{livy_url}/applications/{APP}"
        assert set(mine[APP]["capacitySummary"]) >= {"warm", "drivers", "maxDrivers"}
        assert mine[APP]["capacitySummary"]["maxDrivers"] == 2
        unknown = api.post("/api/applications/no-such-app/start")
        assert unknown.status_code == 404 and "msg" in unknown.json()


@needs_chromium
def test_the_applications_page_and_an_admins_stop(studio, livy_url, small, context):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the test extra installs playwright")
    expect = sync_api.expect
    expect.set_options(timeout=30_000)
    shots = artifacts("applications-browser")
    # Started (a session may have started it already: auto-start), so that Stop is offered.
    httpx.post(f"{livy_url}/applications/{APP}/start", headers=auth_headers(studio.token), json={}, timeout=30, trust_env=False)
    wait_state(studio, livy_url, APP, ("STARTED",))
    with shots_on_failure(context, shots):
        page = context.new_page()
        page.goto(f"{studio.url}/?token={studio.token}")
        page.get_by_role("link", name="Applications").click()
        expect(page).to_have_url(re.compile(r"/ui/applications$"))
        row = page.locator("tr.app-row", has=page.locator("strong", has_text=re.compile(f"^{APP}$")))
        expect(row.locator("[data-role=state]")).to_have_text("STARTED")
        expect(row).to_contain_text(f"{livy_url}/applications/{APP}")
        expect(row.locator("[data-role=capacity]")).to_contain_text("of 2")
        expect(row).to_contain_text("count-seven")  # its job run from the test before
        expect(page.locator("tr.app-row", has_text="default")).to_be_visible()
        page.screenshot(path=shots / "01-applications.png", full_page=True)
        row.get_by_role("button", name="Stop").click()
        expect(page.locator("#flash")).to_contain_text(f"Application {APP}: stopping")
        expect(row.locator("[data-role=state]")).to_have_text("STOPPED", timeout=120_000)
        expect(row.get_by_role("button", name="Start")).to_be_visible()
        page.screenshot(path=shots / "02-stopped.png", full_page=True)
    assert ok(cli(studio, livy_url, "applications", "get", APP))["application"]["state"] == "STOPPED"
