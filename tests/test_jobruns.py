"""Job runs through HTTP, as EMR Serverless's API: lifecycle, failure, cancel, timeout, the queue of an
application with room for one, list filters, the same run seen as a Livy batch, refusals."""

from __future__ import annotations

import time

import httpx
import pytest

from conftest import start_service
from helpers import REPO

FILES = REPO / "tests" / "files"
APP = "default"


@pytest.fixture(scope="module")
def service(test_root):
    # Room for one driver (STUDIO_MAX_SESSIONS=1 is the default application's maximumCapacity): the
    # queue test needs it, and every other test here runs one job at a time.
    svc = start_service(
        test_root, "jobruns", env={"STUDIO_POOL_SIZE": "0", "STUDIO_CULL_INTERVAL": "1", "STUDIO_MAX_SESSIONS": "1"}
    )
    yield svc
    assert svc.stop() == 0
    assert not svc.leftovers()


@pytest.fixture(scope="module")
def http(service):
    with service.http(timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def app_id(http):
    """The default application's EMR-style id (job runs name their application by it)."""
    response = http.get(f"/applications/{APP}")
    return response.json()["application"]["applicationId"] if response.status_code == 200 else APP


def start(http, **body):
    response = http.post(f"/applications/{APP}/jobruns", json=body)
    assert response.status_code == 200, response.text
    started = response.json()
    assert set(started) == {"applicationId", "jobRunId", "arn"}
    return started["jobRunId"]


def job(http, run_id):
    response = http.get(f"/applications/{APP}/jobruns/{run_id}")
    assert response.status_code == 200, response.text
    return response.json()["jobRun"]


def wait_run(http, run_id, states, timeout=240):
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        run = job(http, run_id)
        if not seen or seen[-1] != run["state"]:
            seen.append(run["state"])
        if run["state"] in states:
            return run, seen
        assert time.monotonic() < deadline, (run, seen)
        time.sleep(0.2)


def driver(entry, *args, params=None):
    submit = {"entryPoint": str(FILES / entry), "entryPointArguments": list(args)}
    if params:
        submit["sparkSubmitParameters"] = params
    return {"sparkSubmit": submit}


def test_a_job_run_goes_from_submitted_to_success(http, service, app_id):
    body = {
        "name": "counting",
        "clientToken": "token-1",
        "executionRoleArn": "arn:aws:iam::1:role/ignored",
        "jobDriver": driver(
            "batch_count.py",
            "1000",
            "extra",
            params=f"--py-files {FILES / 'batch_helper.py'} --conf spark.sql.shuffle.partitions=4 --driver-memory 600m --name counter",
        ),
        "configurationOverrides": {
            "applicationConfiguration": [{"classification": "spark-defaults", "properties": {"spark.ui.enabled": "false"}}]
        },
        "tags": {"team": "x"},
    }
    run_id = start(http, **body)
    # The same clientToken is the same run: a retried StartJobRun starts nothing new.
    assert start(http, **body) == run_id
    first = job(http, run_id)
    assert first["state"] in ("SUBMITTED", "PENDING", "SCHEDULED", "RUNNING")
    run, seen = wait_run(http, run_id, ("SUCCESS", "FAILED"))
    log = http.get(f"/applications/{APP}/jobruns/{run_id}/log").text
    assert run["state"] == "SUCCESS", (run, log)
    assert "RUNNING" in seen and seen[-1] == "SUCCESS"
    assert run["applicationId"] == app_id and run["jobRunId"] == run_id and run["name"] == "counting"
    assert run["arn"].endswith(f"/jobruns/{run_id}") and run["createdBy"] == "admin"
    assert run["executionRole"] == body["executionRoleArn"] and run["tags"] == {"team": "x"}
    assert run["jobDriver"] == body["jobDriver"] and run["configurationOverrides"] == body["configurationOverrides"]
    assert run["releaseLabel"].startswith("spark-") and run["stateDetails"]
    assert run["createdAt"].endswith("Z") and run["startedAt"] and run["endedAt"] >= run["startedAt"]
    assert run["totalExecutionDurationSeconds"] >= 1
    assert "BATCH RESULT 1000 args=['1000', 'extra'] helper=helper-module" in log
    assert "--driver-memory 600m" in log and "--name counter" in log and "spark.sql.shuffle.partitions=4" in log
    assert "spark.ui.enabled=false" in log
    assert http.get(f"/applications/{APP}/jobruns/{run_id}/dashboard").json()["url"].endswith(f"/ui/batch/{run_id}/log")
    # The same run through Livy's shapes.
    batch = http.get(f"/batches/{run_id}").json()
    assert batch["id"] == int(run_id) and batch["state"] == "success" and batch["appId"] == run["sparkApplicationId"]
    routed = http.get(f"/applications/{APP}/batches/{run_id}")
    assert routed.status_code == 200 and routed.json()["state"] == "success", routed.text
    # A finished run has nothing to cancel.
    assert http.delete(f"/applications/{APP}/jobruns/{run_id}").status_code == 409


def test_a_failing_job_run_says_why(http):
    run_id = start(http, jobDriver=driver("batch_fail.py"))
    run, _ = wait_run(http, run_id, ("SUCCESS", "FAILED"))
    assert run["state"] == "FAILED"
    assert "this batch fails on purpose" in run["stateDetails"]
    assert http.get(f"/batches/{run_id}/state").json()["state"] == "dead"


def test_a_running_job_run_is_cancelled(http, service, app_id):
    run_id = start(http, jobDriver=driver("batch_long.py"))
    wait_run(http, run_id, ("RUNNING",))
    assert http.get(f"/batches/{run_id}").json()["state"] == "running"
    answer = http.delete(f"/applications/{APP}/jobruns/{run_id}")
    assert answer.status_code == 200 and answer.json() == {"applicationId": app_id, "jobRunId": run_id}
    run, seen = wait_run(http, run_id, ("CANCELLED", "FAILED", "SUCCESS"), timeout=60)
    assert run["state"] == "CANCELLED" and seen[0] in ("CANCELLING", "CANCELLED")
    assert http.get(f"/batches/{run_id}").json()["state"] == "killed"
    assert not [p for p in service.leftovers() if f"batch-{run_id}" in p[1] or "batch_long" in p[1]]


def test_a_job_run_past_its_timeout_fails(http):
    run_id = start(http, jobDriver=driver("batch_long.py"), executionTimeoutMinutes=0.05)
    run, seen = wait_run(http, run_id, ("SUCCESS", "FAILED", "CANCELLED"), timeout=180)
    assert run["state"] == "FAILED", seen
    assert run["stateDetails"] == "Job run timed out after 0.05 minutes."
    assert run["executionTimeoutMinutes"] == 0.05


def test_runs_beyond_capacity_queue_and_start_in_order(http):
    since = time.time() - 1
    ids = [start(http, name=f"queued-{n}", jobDriver=driver("batch_count.py", "3", params=f"--py-files {FILES / 'batch_helper.py'}")) for n in range(3)]
    states = [job(http, run_id)["state"] for run_id in ids]
    assert states[0] in ("SCHEDULED", "RUNNING") and states[1:] == ["QUEUED", "QUEUED"], states
    queued = job(http, ids[1])
    assert ("no room" in queued["stateDetails"] or "1 of 1" in queued["stateDetails"]) and queued["queuedDurationMilliseconds"] >= 0
    assert http.get(f"/batches/{ids[2]}").json()["state"] == "not_started"
    listed = http.get(f"/applications/{APP}/jobruns", params={"states": "QUEUED"}).json()
    assert [r["id"] for r in listed["jobRuns"]] == [ids[2], ids[1]]  # newest first
    runs = [wait_run(http, run_id, ("SUCCESS", "FAILED"))[0] for run_id in ids]
    assert [r["state"] for r in runs] == ["SUCCESS"] * 3
    starts = [r["startedAt"] for r in runs]
    assert starts == sorted(starts), starts
    assert runs[2]["queuedDurationMilliseconds"] > runs[1]["queuedDurationMilliseconds"] > 0
    # List filters: by state (repeatable) and by creation time (ISO 8601 or epoch seconds), paged.
    after = http.get(f"/applications/{APP}/jobruns", params={"createdAtAfter": str(since), "states": ["SUCCESS", "FAILED"]}).json()
    assert [r["id"] for r in after["jobRuns"]] == ids[::-1] and after["nextToken"] is None
    iso = runs[1]["createdAt"]
    assert [r["id"] for r in http.get(f"/applications/{APP}/jobruns", params={"createdAtAfter": iso}).json()["jobRuns"]] == [ids[2], ids[1]]
    page = http.get(f"/applications/{APP}/jobruns", params={"maxResults": 2}).json()
    assert len(page["jobRuns"]) == 2 and page["nextToken"]
    rest = http.get(f"/applications/{APP}/jobruns", params={"maxResults": 50, "nextToken": page["nextToken"]}).json()
    assert not {r["id"] for r in page["jobRuns"]} & {r["id"] for r in rest["jobRuns"]}


def test_a_queued_run_is_cancelled_at_once(http):
    first = start(http, jobDriver=driver("batch_long.py"))
    second = start(http, jobDriver=driver("batch_count.py", "3"))
    assert job(http, second)["state"] == "QUEUED"
    assert http.delete(f"/applications/{APP}/jobruns/{second}").status_code == 200
    assert job(http, second)["state"] == "CANCELLED"
    http.delete(f"/applications/{APP}/jobruns/{first}")
    wait_run(http, first, ("CANCELLED",), timeout=60)


def test_job_runs_need_a_token(service):
    response = httpx.get(f"{service.url}/applications/{APP}/jobruns", trust_env=False)
    assert response.status_code == 401
    response = httpx.post(f"{service.url}/applications/{APP}/jobruns", json={"jobDriver": driver("batch_count.py")}, trust_env=False)
    assert response.status_code == 401


@pytest.mark.parametrize(
    "body, text",
    [
        ({"jobDriver": driver("batch_count.py", params="--master local[2]")}, "'--master' is not an option"),
        ({"jobDriver": driver("batch_count.py", params="--deploy-mode cluster")}, "is not an option"),
        ({"jobDriver": driver("batch_count.py", params="--conf spark.master=yarn")}, "may not set spark.master"),
        ({"jobDriver": driver("batch_count.py", params="--conf=spark.submit.deployMode=cluster")}, "may not set spark.submit.deployMode"),
        ({"jobDriver": driver("batch_count.py", params="--num-executors two")}, "--num-executors wants a whole number"),
        ({"jobDriver": driver("batch_count.py", params="--driver-memory lots")}, "invalid driverMemory"),
        ({"jobDriver": driver("batch_count.py", params="--conf x; rm -rf /")}, "--conf wants key=value"),
        ({"jobDriver": driver("batch_count.py", params="--jars 'a.jar")}, "cannot be split"),
        ({"jobDriver": driver("batch_count.py", params="--conf")}, "--conf needs a value"),
        ({"jobDriver": {"sparkSubmit": {"entryPoint": "relative/app.py"}}}, "absolute path"),
        ({"jobDriver": {"sparkSubmit": {"entryPoint": "/no/such/app.py"}}}, "does not exist"),
        ({"jobDriver": driver("batch_count.py"), "executionTimeoutMinutes": 0}, "executionTimeoutMinutes"),
        (
            {
                "jobDriver": driver("batch_count.py"),
                "configurationOverrides": {"applicationConfiguration": [{"classification": "spark-defaults", "properties": {"spark.master": "yarn"}}]},
            },
            "may not set spark.master",
        ),
        (
            {
                "jobDriver": driver("batch_count.py"),
                "configurationOverrides": {"applicationConfiguration": [{"classification": "hive-site", "properties": {}}]},
            },
            "only spark-defaults",
        ),
        ({"jobDriver": driver("batch_count.py"), "mode": "BATCH"}, "mode"),
    ],
)
def test_bad_job_runs_are_refused(http, body, text):
    response = http.post(f"/applications/{APP}/jobruns", json=body)
    assert response.status_code == 400, response.text
    assert text in response.json()["msg"]


def test_unknown_applications_runs_and_filters_are_answered_clearly(http):
    assert http.get("/applications/nosuchapp/jobruns").status_code == 404
    assert http.get(f"/applications/{APP}/jobruns/987654").json()["msg"].startswith("Job run '987654' not found")
    assert "'states' must be job run states" in http.get(f"/applications/{APP}/jobruns", params={"states": "DONE"}).json()["msg"]
    assert "createdAtAfter" in http.get(f"/applications/{APP}/jobruns", params={"createdAtAfter": "yesterday"}).json()["msg"]
    assert "maxResults" in http.get(f"/applications/{APP}/jobruns", params={"maxResults": "0"}).json()["msg"]


def test_runs_of_an_application_get_its_conf_auto_start_it_and_queue_within_its_maximum(http):
    created = http.post(
        "/applications",
        json={
            "name": "etl",
            "runtimeConfiguration": [{"classification": "spark-defaults", "properties": {"spark.sql.shuffle.partitions": "6"}}],
            "maximumCapacity": {"drivers": 1},
        },
    )
    assert created.status_code == 200, created.text
    app_id = created.json()["applicationId"]
    assert http.get("/applications/etl").json()["application"]["state"] == "CREATED"
    first = http.post("/applications/etl/jobruns", json={"name": "one", "jobDriver": driver("batch_count.py", "5", params=f"--py-files {FILES / 'batch_helper.py'}")})
    second = http.post(f"/applications/{app_id}/jobruns", json={"name": "two", "jobDriver": driver("batch_count.py", "6", params=f"--py-files {FILES / 'batch_helper.py'}")})
    assert first.status_code == 200 and second.status_code == 200, (first.text, second.text)
    assert http.get("/applications/etl").json()["application"]["state"] in ("STARTING", "STARTED")  # auto-started
    ids = [first.json()["jobRunId"], second.json()["jobRunId"]]
    assert http.get(f"/applications/etl/jobruns/{ids[1]}").json()["jobRun"]["state"] == "QUEUED"
    for run_id in ids:
        run = wait_run_in(http, "etl", run_id)
        assert run["state"] == "SUCCESS" and run["applicationId"] == app_id, run
    log = http.get(f"/applications/etl/jobruns/{ids[0]}/log").text
    assert "spark.sql.shuffle.partitions=6" in log, log[-3000:]
    # Runs of etl are not the default application's, and the reverse.
    assert http.get(f"/applications/{APP}/jobruns/{ids[0]}").status_code == 404
    assert [b["id"] for b in http.get("/applications/etl/batches").json()["sessions"]] == [int(i) for i in ids]


def wait_run_in(http, app, run_id, timeout=240):
    deadline = time.monotonic() + timeout
    while True:
        run = http.get(f"/applications/{app}/jobruns/{run_id}").json()["jobRun"]
        if run["state"] in ("SUCCESS", "FAILED", "CANCELLED"):
            return run
        assert time.monotonic() < deadline, run
        time.sleep(0.3)
