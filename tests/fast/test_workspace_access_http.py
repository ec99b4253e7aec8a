"""Per-user access in the workspace server, in-process: the real ``create_app`` (TestClient, real
lifespan, real users.db) with two users of the directory and the admin; workspaces are records and
folders here (nothing starts). The end-to-end version, with JupyterLabs and runs, is
tests/test_workspace_access.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from studio.auth.users import Directory

from .conftest import AUTH, STUDIO_BASE, make_settings


@pytest.fixture
def clients(tmp_path: Path) -> Iterator[dict[str, TestClient]]:
    """The workspace server (its compute `local` at a Livy URL where nothing listens) and a client for
    the admin, ana and bo, each with their own token."""
    from studio.workspaces.app import create_app

    settings = make_settings(tmp_path, livy_url="http://127.0.0.1:9", compute_timeout=2)
    with Directory.for_settings(settings) as directory:
        tokens = {name: directory.add_user(name)[1] for name in ("ana", "bo")}
        directory.set_quotas("bo", {"executions": 0})
    app = create_app(settings, STUDIO_BASE)
    with TestClient(app, base_url=STUDIO_BASE, headers=AUTH) as admin:
        people = {"admin": admin}
        for name, token in tokens.items():
            people[name] = TestClient(app, base_url=STUDIO_BASE, headers={"Authorization": f"Bearer {token}"})
        yield people


def names(client: TestClient) -> list[str]:
    return [w["name"] for w in client.get("/api/workspaces").json()["workspaces"]]


def msg(response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"msg"}
    return str(body["msg"])


def test_workspaces_are_their_owners_until_shared(clients):
    admin, ana, bo = clients["admin"], clients["ana"], clients["bo"]
    mine = ana.post("/api/workspaces", json={"name": "mine"}).json()
    assert (mine["owner"], mine["collaborators"], mine["running_for"]) == ("ana", [], None)
    assert bo.post("/api/workspaces", json={"name": "his"}).status_code == 201
    assert (names(ana), names(bo), names(admin)) == (["mine"], ["his"], ["mine", "his"])
    wid = mine["id"]
    for method, path, body in [
        ("GET", f"/api/workspaces/{wid}", None),
        ("PATCH", f"/api/workspaces/{wid}", {"description": "x"}),
        ("DELETE", f"/api/workspaces/{wid}", None),
        ("POST", f"/api/workspaces/{wid}/start", {}),
        ("POST", f"/api/workspaces/{wid}/stop", {}),
        ("POST", f"/api/workspaces/{wid}/detach", {}),
        ("GET", f"/api/workspaces/{wid}/open", None),
        ("GET", f"/api/workspaces/{wid}/log", None),
        ("PUT", f"/api/workspaces/{wid}/collaborators", {"collaborators": ["bo"]}),
    ]:
        message = msg(bo.request(method, path, json=body), 403)
        assert message == f"bo may not use workspace {wid}: only its owner, its collaborators and admins may.", path
    assert msg(bo.get(f"/api/workspaces/{wid}/connection"), 403).startswith(f"Only the kernels of workspace {wid} ")

    assert msg(ana.put(f"/api/workspaces/{wid}/collaborators", json={"collaborators": ["zed"]}), 400) == (
        "'collaborators' names no user 'zed'; add the users first."
    )
    assert msg(ana.put(f"/api/workspaces/{wid}/collaborators", json={"collaborators": "bo"}), 400)
    shared = ana.put(f"/api/workspaces/{wid}/collaborators", json={"collaborators": ["Bo", "ana"]})
    assert shared.status_code == 200 and shared.json()["collaborators"] == ["bo"]
    assert names(bo) == ["mine", "his"] and bo.get(f"/api/workspaces/{wid}").status_code == 200
    assert msg(bo.delete(f"/api/workspaces/{wid}"), 403) == (
        "bo may not delete workspace 'mine': only its owner (ana) and admins may."
    )
    assert msg(bo.put(f"/api/workspaces/{wid}/collaborators", json={"collaborators": []}), 403).startswith("bo may not share")
    assert msg(bo.get(f"/api/workspaces/{wid}/open"), 409).startswith("Workspace 'mine' is Idle")
    # the admin may do anything, but a workspace's people are who its owner says
    assert admin.put(f"/api/workspaces/{wid}/collaborators", json={"collaborators": []}).json()["collaborators"] == []
    assert names(bo) == ["his"]
    assert ana.delete(f"/api/workspaces/{wid}").json()["msg"] == "deleted"


def test_computes_are_for_admins_to_manage_and_allowed_users_to_use(clients):
    admin, ana, bo = clients["admin"], clients["ana"], clients["bo"]
    assert msg(bo.post("/api/computes", json={"name": "x", "url": "http://127.0.0.1:9"}), 403) == (
        "Only admins may register computes; bo is a user."
    )
    assert msg(bo.delete("/api/computes/local"), 403).startswith("Only admins may remove computes")
    assert msg(bo.patch("/api/computes/local", json={"allowed_users": []}), 403).startswith("Only admins may change")
    assert msg(admin.patch("/api/computes/local", json={"allowed_users": ["nobody"]}), 400).endswith("add the users first.")
    assert admin.patch("/api/computes/local", json={"allowed_users": ["ana"]}).json()["allowed_users"] == ["ana"]
    assert [c["name"] for c in ana.get("/api/computes?check=false").json()["computes"]] == ["local"]
    assert bo.get("/api/computes?check=false").json() == {"total": 0, "computes": []}
    assert msg(bo.get("/api/computes/local"), 403) == "bo may not use compute 'local'; an admin can allow it."
    assert msg(bo.post("/api/workspaces", json={"name": "w", "compute": "local"}), 403).endswith("an admin can allow it.")
    assert bo.post("/api/workspaces", json={"name": "w"}).status_code == 201
    assert msg(bo.post("/api/workspaces/0/attach", json={"compute": "local"}), 403).endswith("an admin can allow it.")
    assert "compute-form" not in bo.get("/").text and "compute-form" in admin.get("/").text


def test_executions_of_others_are_403_and_quotas_429(clients):
    admin, ana, bo = clients["admin"], clients["ana"], clients["bo"]
    assert ana.post("/api/workspaces", json={"name": "jobs"}).status_code == 201
    body = {"workspace": "jobs", "notebook": "getting-started.ipynb"}
    assert msg(bo.post("/api/executions", json=body), 403).startswith("bo may not use workspace 'jobs': only its owner,")
    assert ana.put("/api/workspaces/0/collaborators", json={"collaborators": ["bo"]}).status_code == 200
    # bo's own quota (0 executions) from the directory wins over the role's default
    assert msg(bo.post("/api/executions", json=body), 429) == (
        "Quota reached: bo has 0 queued or running notebook executions and may have 0. "
        "Stop one first, or ask an administrator for a larger quota."
    )
    # ana passes the checks of access and quota; the compute that does not answer is what stops her here
    assert msg(ana.post("/api/executions", json=body), 502).startswith("Compute 'local'")
    assert admin.get("/api/executions").json() == {"total": 0, "executions": []}


def test_whoami_and_the_page_say_who_is_signed_in(clients):
    bo = clients["bo"]
    assert bo.get("/api/whoami").json() == {"user": "bo", "role": "user"}
    page = bo.get("/", headers={"Accept": "text/html"}).text
    assert '<span class="who" title="Signed in as" data-role="user">bo</span>' in page
    assert '<span class="role" title="Role">user</span>' in page and 'action="/logout"' in page
