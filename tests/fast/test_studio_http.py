"""The workspace server's JSON API through TestClient against its real ``create_app``: workspace
records and folders, execution requests checked before anything is recorded, computes, and the
gate. No JupyterLab, session service or `studio run` starts here."""

from __future__ import annotations

import json

import pytest


def test_a_workspace_is_a_record_and_a_seeded_folder(studio, tmp_path):
    created = studio.post("/api/workspaces", json={"name": "sales", "description": "daily"})
    assert created.status_code == 201
    workspace = created.json()
    assert (workspace["id"], workspace["name"], workspace["state"], workspace["owner"]) == (0, "sales", "Idle", "admin")
    assert workspace["url"] is None and workspace["jupyterlab"] is None
    assert (tmp_path / "notebooks" / "sales" / "getting-started.ipynb").is_file()
    assert studio.get("/api/workspaces").json()["total"] == 1
    assert studio.get("/api/workspaces/0").json()["description"] == "daily"
    assert studio.get("/api/workspaces/sales").status_code == 404  # ids are integers

    renamed = studio.patch("/api/workspaces/0", json={"description": "hourly", "idle_timeout": 60})
    assert renamed.status_code == 200 and renamed.json()["idle_timeout"] == 60

    deleted = studio.delete("/api/workspaces/0")
    assert deleted.json() == {"msg": "deleted", "id": 0, "name": "sales", "folder": str(tmp_path / "notebooks" / "sales"), "files": "kept"}
    assert (tmp_path / "notebooks" / "sales").is_dir()
    assert studio.get("/api/workspaces").json() == {"total": 0, "workspaces": []}


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"name": "../etc"}, 400, "Workspace name '../etc' contains a slash; a name is one folder, not a path."),
        ({"name": ".git"}, 400, "Workspace name '.git' starts with '.'; names may not be hidden or relative paths."),
        ({"name": "ok", "idle_timeout": -1}, 400, 'Field "idle_timeout": Input should be greater than or equal to 0 (got -1).'),
        ({"name": "ok", "shell": "rm"}, 400, 'Unrecognized field "shell"'),
        ({"name": "ok", "repository_url": "http://git.example/r.git"}, 400, "uses http://"),
        ({"name": "ok", "repository_url": "ext::sh -c id"}, 400, "names a git transport helper"),
        ({"name": "ok", "compute": "nowhere"}, 404, "nowhere"),
    ],
)
def test_bad_workspace_requests_are_refused_before_anything_is_made(studio, tmp_path, body, status, message):
    response = studio.post("/api/workspaces", json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["msg"]
    assert studio.get("/api/workspaces").json()["total"] == 0
    assert not (tmp_path / "notebooks" / "ok").exists()


def test_names_are_unique(studio):
    assert studio.post("/api/workspaces", json={"name": "sales"}).status_code == 201
    response = studio.post("/api/workspaces", json={"name": "sales"})
    assert response.status_code == 409 and "sales" in response.json()["msg"]


def test_executions_are_checked_before_anything_is_recorded(studio):
    assert studio.post("/api/workspaces", json={"name": "jobs"}).status_code == 201
    base = {"workspace": "jobs", "notebook": "getting-started.ipynb"}
    nan = studio.post("/api/executions", content=json.dumps({**base, "parameters": {"x": float("nan")}}),
                      headers={"Content-Type": "application/json"})  # fmt: skip
    assert nan.status_code == 400
    assert nan.json()["msg"].startswith("parameter 'x' holds NaN or Infinity, which JSON cannot carry")
    bad_name = studio.post("/api/executions", json={**base, "parameters": {"1x": 1}})
    assert bad_name.json() == {"msg": "parameter name '1x' is not a Python name (letters, digits and _, not a keyword)"}
    missing = studio.post("/api/executions", json={**base, "notebook": "nope.ipynb"})
    assert missing.status_code == 404
    outside = studio.post("/api/executions", json={**base, "notebook": "../../state/token"})
    assert outside.status_code == 400
    no_workspace = studio.post("/api/executions", json={**base, "workspace": "elsewhere"})
    assert no_workspace.status_code == 404
    assert studio.get("/api/executions").json() == {"total": 0, "executions": []}
    assert studio.get("/api/executions/0").status_code == 404


def test_computes(studio):
    listed = studio.get("/api/computes").json()
    assert [c["name"] for c in listed["computes"]] == ["local"]
    local = listed["computes"][0]
    assert (local["managed"], local["healthy"], local["auth"]) == (True, False, None)
    assert "did not answer" in local["error"]
    assert studio.post("/api/computes", json={"name": "local", "url": "http://127.0.0.1:9"}).status_code == 409
    bad = studio.post("/api/computes", json={"name": "other", "url": "javascript:alert(1)"})
    assert bad.status_code == 400 and "is not an http:// or https:// URL" in bad.json()["msg"]
    down = studio.post("/api/computes", json={"name": "other", "url": "http://127.0.0.1:9", "token": "t"})
    assert down.status_code == 502 and "did not answer" in down.json()["msg"]
    assert studio.get("/api/computes/other").status_code == 404


def test_the_studio_gate(studio):
    studio.headers.pop("Authorization")
    response = studio.get("/api/workspaces")
    assert response.status_code == 401
    assert response.headers.get_list("www-authenticate") == ['Bearer realm="Spark Studio"']
    page = studio.get("/", headers={"Sec-Fetch-Mode": "navigate"}, follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"] == "/login?next=%2F"
    assert studio.get("/health").status_code == 200
    # a kernel secret that belongs to no running workspace is no credential
    assert studio.get("/api/workspaces/0/connection", headers={"Authorization": "Bearer kernel-secret"}).status_code == 401
    # another port of 127.0.0.1 is another origin, refused before authentication
    cross = studio.post("/api/workspaces", json={"name": "x"}, headers={"Origin": "http://127.0.0.1:8998"})
    assert cross.status_code == 403 and cross.json() == {"msg": "Cross-origin request from http://127.0.0.1:8998 refused."}


def test_the_page_and_whoami(studio):
    assert studio.get("/api/whoami").json() == {"user": "admin", "role": "admin"}
    page = studio.get("/", headers={"Accept": "text/html"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<!doctype html>" in page.text.lower()
