"""The session service's HTTP shapes through Starlette's TestClient against the real
``create_app(settings)`` with no pool: status codes and Livy's ``{"msg"}`` errors, paging of the
lists, the check endpoint. Nothing here creates a session, so no worker or JVM starts."""

from __future__ import annotations

import json

import pytest
from starlette.testclient import TestClient

from studio.livy.app import create_app
from studio.livy.routes import LIVY_VERSION

from .conftest import AUTH, LIVY_BASE, make_settings


def test_version(livy):
    body = livy.get("/version").json()
    assert body["version"] == LIVY_VERSION == "0.9.0-incubating"
    assert set(body) == {"version", "user", "revision", "branch", "date", "url"}


def test_empty_lists_have_livys_shape(livy):
    assert livy.get("/sessions").json() == {"from": 0, "total": 0, "sessions": []}
    assert livy.get("/batches").json() == {"from": 0, "total": 0, "sessions": []}
    # Livy echoes from as given, also a negative one
    assert livy.get("/sessions", params={"from": -3, "size": 2}).json() == {"from": -3, "total": 0, "sessions": []}


def test_paging_parameters_must_be_integers(livy):
    response = livy.get("/sessions", params={"from": "first"})
    assert response.status_code == 400
    assert response.json() == {"msg": "'from' must be an integer, got 'first'."}
    assert livy.get("/batches", params={"size": "1.5"}).json() == {"msg": "'size' must be an integer, got '1.5'."}


@pytest.mark.parametrize(
    "method, path, message",
    [
        ("GET", "/sessions/5", "Session '5' not found."),
        ("GET", "/sessions/etl", "Session 'etl' not found."),
        ("GET", "/sessions/5/state", "Session '5' not found."),
        ("GET", "/sessions/5/log", "Session '5' not found."),
        ("GET", "/sessions/5/statements", "Session '5' not found."),
        ("GET", "/sessions/5/statements/0", "Session '5' not found."),
        ("POST", "/sessions/5/statements", "Session '5' not found."),
        ("POST", "/sessions/5/statements/0/cancel", "Session '5' not found."),
        ("POST", "/sessions/5/completion", "Session '5' not found."),
        ("DELETE", "/sessions/5", "Session '5' not found."),
        ("GET", "/batches/3", "Batch '3' not found."),
        ("GET", "/batches/3/log", "Batch '3' not found."),
        ("DELETE", "/batches/3", "Batch '3' not found."),
        ("GET", "/nothing/here", "No such resource: GET /nothing/here"),
    ],
)
def test_unknown_things_are_404_with_a_msg(livy, method, path, message):
    response = livy.request(method, path, json={} if method == "POST" else None)
    assert response.status_code == 404
    assert response.json() == {"msg": message}
    assert response.headers["content-type"] == "application/json"


def test_a_wrong_method_is_405_with_a_msg(livy):
    response = livy.put("/sessions", json={})
    assert response.status_code == 405
    assert response.json() == {"msg": "Method PUT is not allowed on /sessions"}


def test_driver_logs_of_unknown_sessions_are_404(livy):
    assert livy.get("/ui/session/5/log").json() == {"msg": "Session '5' not found."}
    assert livy.get("/ui/batch/5/log").json() == {"msg": "Batch '5' not found."}


@pytest.mark.parametrize(
    "body, message",
    [
        ({"kind": "spark"}, "Kind 'spark' is not supported: this server runs pyspark and sql code (session kinds pyspark, sql and shared)."),
        ({"kind": "cobol"}, "Invalid kind 'cobol': expected one of pyspark, sql, shared."),
        ({"name": "42"}, "Rejected, Reason: session name '42' must not be a number or empty."),
        ({"name": "  "}, "Rejected, Reason: session name '  ' must not be a number or empty."),
        ({"heartbeatTimeoutInSecond": -1}, "Rejected, Reason: heartbeatTimeoutInSecond must not be negative."),
        ({"ttl": "soon"}, "Rejected, Reason: invalid ttl 'soon': use a number with a unit, e.g. 30s, 10m, 2h."),
        ({"idleTimeout": "1.5h"}, "Rejected, Reason: invalid idleTimeout '1.5h': use a number with a unit, e.g. 30s, 10m, 2h."),
        ({"driverMemory": "2x"}, "Rejected, Reason: invalid driverMemory '2x': use a whole number with a unit, e.g. 512m, 2g."),
        ({"conf": {"spark.master": "yarn"}}, "Rejected, Reason: Blacklisted configuration values in session config: spark.master"),
        ({"kindd": "pyspark"}, 'Unrecognized field "kindd" (known fields: archives, conf, driverCores, driverMemory, '
         'executorCores, executorMemory, files, heartbeatTimeoutInSecond, idleTimeout, jars, kind, name, numExecutors, '
         'proxyUser, pyFiles, queue, ttl).'),
    ],
)  # fmt: skip
def test_the_check_endpoint_answers_what_create_would(livy, body, message):
    checked = livy.post("/studio/sessions/check", json=body)
    created = livy.post("/sessions", json=body)
    assert (checked.status_code, checked.json()) == (400, {"msg": message})
    assert (created.status_code, created.json()) == (400, {"msg": message})
    assert livy.get("/sessions").json()["total"] == 0  # nothing was created


def test_the_check_endpoint_says_ok_without_starting_anything(livy):
    body = {"kind": "pyspark", "driverMemory": "1g", "conf": {"spark.sql.shuffle.partitions": 4}, "name": "etl"}
    assert livy.post("/studio/sessions/check", json=body).json() == {"msg": "ok"}
    status = livy.get("/studio/status").json()
    assert (status["liveSessions"], status["pool"]["size"], status["pool"]["ready"]) == (0, 0, 0)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "Rejected, Reason: the request body is empty; send a JSON object."),
        (b"[]", "The request body must be a JSON object, got list."),
        (b'{"kind": "pyspark"', "Malformed JSON in the request body: "),
        (b'{"name": "\\udcff"}', 'Field "name" holds text that is not valid Unicode'),
    ],
)
def test_bodies_that_are_not_json_objects(livy, content, message):
    response = livy.post("/sessions", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["msg"].startswith(message)


def test_batch_bodies_are_checked_before_anything_runs(livy):
    response = livy.post("/batches", json={"className": "Main"})
    assert (response.status_code, response.json()) == (400, {"msg": 'Field "file" is required.'})
    response = livy.post("/batches", json={"file": "job.py", "args": [[1]]})
    assert response.status_code == 400 and "args must be a list of strings" in response.json()["msg"]


def test_an_unknown_api_version_is_406(livy):
    response = livy.get("/sessions", headers={"Accept": "application/vnd.livy.v0.2+json"})
    assert response.status_code == 406
    assert response.json() == {"msg": "Unsupported API version in Accept header: application/vnd.livy.v0.2+json; use v0.1."}
    assert livy.get("/sessions", headers={"Accept": "application/vnd.livy.v0.1+json"}).status_code == 200


def test_whoami_and_status(livy):
    assert livy.get("/studio/whoami").json() == {"user": "admin", "role": "admin"}
    status = livy.get("/studio/status").json()
    assert status["livyVersion"] == LIVY_VERSION and status["master"] == "local[*]"
    assert status["classDataArchive"] is None and status["liveBatches"] == 0


def test_a_body_over_the_limit_is_413(tmp_path):
    settings = make_settings(tmp_path, max_request_bytes=1024)
    with TestClient(create_app(settings), base_url=LIVY_BASE, headers=AUTH) as client:
        response = client.post("/sessions", content=json.dumps({"name": "x" * 2000}), headers={"Content-Type": "application/json"})
        assert response.status_code == 413
        assert response.json() == {"msg": "Request body of 2,012 bytes is over the 1,024-byte limit."}


def test_ids_keep_counting_in_the_store_across_restarts(tmp_path):
    settings = make_settings(tmp_path)
    for _ in range(2):
        with TestClient(create_app(settings), base_url=LIVY_BASE, headers=AUTH) as client:
            assert client.get("/sessions").status_code == 200
    # the database was migrated once and reopened; its schema version is the code's
    import sqlite3

    from studio.store import SCHEMA_VERSION

    db = sqlite3.connect(settings.database_path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        db.close()


def test_a_full_disk_is_507_with_a_msg():
    """The store's StorageFullError, and a file that could not be written for want of room (a log, a
    result, a worker's settings), are Livy-shaped 507s, never a 500 with a traceback."""
    import errno
    import logging

    from starlette.applications import Starlette
    from starlette.routing import Route

    from studio.errors import StorageFullError
    from studio.web import error_handlers

    async def store_full(request):
        raise StorageFullError("The state disk is full (database or disk is full): this request could not be recorded.")

    async def file_full(request):
        raise OSError(errno.ENOSPC, "No space left on device")

    async def other(request):
        raise OSError(errno.EIO, "Input/output error")

    routes = [Route("/store", store_full, methods=["POST"]), Route("/file", file_full, methods=["POST"]), Route("/other", other, methods=["POST"])]
    app = Starlette(routes=routes, exception_handlers=error_handlers(logging.getLogger("test")))
    with TestClient(app) as client:  # raises what reached the server as unhandled: none of these
        for path in ("/store", "/file"):
            response = client.post(path)
            assert response.status_code == 507
            assert set(response.json()) == {"msg"} and "disk is full" in response.json()["msg"]
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post("/other")  # any other OSError stays what it was: a 500, logged with its traceback
        assert response.status_code == 500 and response.json() == {"msg": "Unhandled error: OSError: [Errno 5] Input/output error"}
