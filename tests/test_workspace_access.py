"""Per-user access in the workspace server, end to end: a real `studio serve` with its embedded
session service (no warm pool, so no Spark starts), real JupyterLabs and real `studio run`s, two
users made in the users' directory (ana and bo) and the built-in admin, each with a personal token.

Each user sees only their own workspaces and the ones shared with them; every cross-user read or
write is 403; a collaborator opens and runs a shared workspace but only its owner or an admin
deletes or shares it; a running workspace acts for whoever started it (its JupyterLab is theirs
alone: 409 for anyone else; its kernels' token is theirs and dies with it); executions act for
their owner and are seen by the workspace's people; computes are admin business and never show a
credential; quotas answer 429.

One server for the module, two JupyterLab starts in all; the tests build on each other in order.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from helpers import auth_headers
from studio.auth.users import Directory
from workspace_helpers import StudioProcess, wait_gone

USERS = ("ana", "bo")


class Person:
    """A user of the studio with an HTTP client that sends their personal token."""

    def __init__(self, name: str, token: str, url: str) -> None:
        self.name = name
        self.token = token
        self.http = httpx.Client(base_url=url, timeout=60, trust_env=False, headers=auth_headers(token))

    def workspace_names(self) -> list[str]:
        response = self.http.get("/api/workspaces")
        assert response.status_code == 200, response.text
        return sorted(w["name"] for w in response.json()["workspaces"])

    def workspace(self, workspace_id: int) -> dict[str, Any]:
        response = self.http.get(f"/api/workspaces/{workspace_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def create(self, **body: Any) -> dict[str, Any]:
        response = self.http.post("/api/workspaces", json=body)
        assert response.status_code == 201, response.text
        return response.json()

    def wait_state(self, workspace_id: int, states: tuple[str, ...], timeout: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            workspace = self.workspace(workspace_id)
            if workspace["state"] in states:
                return workspace
            assert time.monotonic() < deadline, f"workspace {workspace_id} is {workspace['state']} ({workspace['reason']})"
            time.sleep(0.2)

    def started(self, workspace_id: int) -> dict[str, Any]:
        response = self.http.post(f"/api/workspaces/{workspace_id}/start", json={})
        assert response.status_code == 202, response.text
        workspace = self.wait_state(workspace_id, ("Ready", "Attached", "Failed"))
        assert workspace["state"] != "Failed", workspace["reason"]
        return workspace

    def stopped(self, workspace_id: int) -> dict[str, Any]:
        response = self.http.post(f"/api/workspaces/{workspace_id}/stop", json={})
        assert response.status_code == 202, response.text
        return self.wait_state(workspace_id, ("Idle",))

    def execution(self, execution_id: int, statuses: tuple[str, ...] = ("FINISHED", "FAILED", "STOPPED")) -> dict[str, Any]:
        deadline = time.monotonic() + 180
        while True:
            response = self.http.get(f"/api/executions/{execution_id}")
            assert response.status_code == 200, response.text
            execution = response.json()
            if execution["status"] in statuses:
                return execution
            assert time.monotonic() < deadline, execution
            time.sleep(0.3)


@pytest.fixture(scope="module")
def studio(test_root):
    server = StudioProcess(
        test_root / "workspace-access",
        env={
            "STUDIO_USER_MAX_RUNNING_WORKSPACES": "1",
            "STUDIO_JUPYTERLAB_STOP_TIMEOUT": "5",
        },
        pool=0,
    ).start()
    yield server
    assert server.stop() == 0, server.log_tail()
    assert not server.leftovers(), f"processes left behind: {server.leftovers()}"


@pytest.fixture(scope="module")
def directory(studio):
    """The users' directory `studio serve` and its session service share (its state directory)."""
    with Directory(studio.state_dir) as found:
        yield found


@pytest.fixture(scope="module")
def people(studio, directory) -> dict[str, Person]:
    found = {"admin": Person("admin", studio.token, studio.url)}
    for name in USERS:
        _, token = directory.add_user(name)
        found[name] = Person(name, token, studio.url)
    yield found
    for person in found.values():
        person.http.close()


@pytest.fixture(scope="module")
def spaces(people) -> dict[str, dict[str, Any]]:
    """One workspace of each: ana's, bo's and the admin's."""
    return {
        name: people[name].create(name=f"{name}-space", description=f"{name}'s <b>notebooks</b>", compute="local") for name in people
    }


def error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"msg"} and body["msg"], body
    return body["msg"]


def lab_environ(workspace: dict[str, Any]) -> dict[str, str]:
    raw = Path(f"/proc/{workspace['jupyterlab']['pid']}/environ").read_bytes().decode()
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def whoami_on_livy(studio, token: str) -> httpx.Response:
    """Who the embedded session service takes this token for."""
    local = httpx.get(f"{studio.url}/api/computes/local", headers=auth_headers(studio.token), timeout=30, trust_env=False)
    return httpx.get(f"{local.json()['url']}/studio/whoami", headers=auth_headers(token), timeout=30, trust_env=False)


# -- workspaces --------------------------------------------------------------------------------------


def test_each_user_sees_only_their_own_workspaces_and_admin_sees_all(people, spaces):
    assert people["ana"].workspace_names() == ["ana-space"]
    assert people["bo"].workspace_names() == ["bo-space"]
    assert people["admin"].workspace_names() == ["admin-space", "ana-space", "bo-space"]
    ana = people["ana"].workspace(spaces["ana"]["id"])
    assert (ana["owner"], ana["collaborators"], ana["running_for"]) == ("ana", [], None)
    assert people["ana"].http.get("/api/whoami").json() == {"user": "ana", "role": "user"}
    assert people["admin"].http.get("/api/status").json()["workspaces"]["Idle"] == 3
    assert people["bo"].http.get("/api/status").json()["workspaces"]["Idle"] == 1


def test_every_request_on_another_users_workspace_is_403_and_changes_nothing(studio, people, spaces):
    bo, wid = people["bo"], spaces["ana"]["id"]
    for method, path, body in [
        ("GET", f"/api/workspaces/{wid}", None),
        ("PATCH", f"/api/workspaces/{wid}", {"description": "mine now"}),
        ("DELETE", f"/api/workspaces/{wid}", None),
        ("POST", f"/api/workspaces/{wid}/start", {}),
        ("POST", f"/api/workspaces/{wid}/stop", {}),
        ("POST", f"/api/workspaces/{wid}/attach", {"compute": "local"}),
        ("POST", f"/api/workspaces/{wid}/detach", {}),
        ("PUT", f"/api/workspaces/{wid}/collaborators", {"collaborators": ["bo"]}),
        ("GET", f"/api/workspaces/{wid}/open", None),
        ("GET", f"/api/workspaces/{wid}/log", None),
        ("GET", f"/api/workspaces/{wid}/connection", None),
        ("GET", f"/api/executions?workspace={wid}", None),
        ("POST", "/api/executions", {"workspace": wid, "notebook": "getting-started.ipynb"}),
    ]:
        response = bo.http.request(method, path, json=body, follow_redirects=False)
        if path.startswith("/api/executions?"):  # a listing: filtered, not refused
            assert response.json() == {"total": 0, "executions": []}
            continue
        message = error(response, 403)
        assert "bo" in message or "kernels" in message, (method, path, message)
        assert "ana" not in message, message  # nothing about the workspace: not its name, not its owner
    ana = people["ana"].workspace(wid)
    assert (ana["state"], ana["description"], ana["collaborators"]) == ("Idle", "ana's <b>notebooks</b>", [])
    assert (studio.root / "ana-space").is_dir()


def test_only_the_owner_or_an_admin_shares_and_a_collaborator_may_use_but_not_delete(people, spaces):
    ana, bo, admin = people["ana"], people["bo"], people["admin"]
    wid = spaces["ana"]["id"]
    assert "no user 'carol'" in error(ana.http.put(f"/api/workspaces/{wid}/collaborators", json={"collaborators": ["carol"]}), 400)
    assert "not a user name" in error(ana.http.put(f"/api/workspaces/{wid}/collaborators", json={"collaborators": ["a b"]}), 400)
    shared = ana.http.put(f"/api/workspaces/{wid}/collaborators", json={"collaborators": ["BO", "ana", "bo"]})
    assert shared.status_code == 200 and shared.json()["collaborators"] == ["bo"]  # names as the directory keeps them
    assert bo.workspace_names() == ["ana-space", "bo-space"]
    assert bo.workspace(wid)["collaborators"] == ["bo"]
    # A collaborator uses it, but does not delete, rename or share it.
    assert "only its owner (ana)" in error(bo.http.delete(f"/api/workspaces/{wid}"), 403)
    assert "only its owner (ana)" in error(bo.http.patch(f"/api/workspaces/{wid}", json={"name": "taken"}), 403)
    assert "only its owner (ana)" in error(bo.http.put(f"/api/workspaces/{wid}/collaborators", json={"collaborators": []}), 403)
    assert bo.http.get(f"/api/workspaces/{wid}/log").status_code == 200
    # An admin shares anything: bo's workspace with ana, and back.
    assert admin.http.put(f"/api/workspaces/{spaces['bo']['id']}/collaborators", json={"collaborators": ["ana"]}).status_code == 200
    assert ana.workspace_names() == ["ana-space", "bo-space"]
    assert admin.http.put(f"/api/workspaces/{spaces['bo']['id']}/collaborators", json={"collaborators": []}).status_code == 200
    assert ana.workspace_names() == ["ana-space"]
    # Only the owner or an admin deletes: the admin deletes bo's throwaway workspace.
    throwaway = bo.create(name="bo-throwaway")
    assert "ana may not use workspace" in error(ana.http.delete(f"/api/workspaces/{throwaway['id']}"), 403)
    assert admin.http.delete(f"/api/workspaces/{throwaway['id']}").json()["msg"] == "deleted"


def test_a_running_workspace_acts_for_whoever_started_it(studio, directory, people, spaces):
    ana, bo, admin = people["ana"], people["bo"], people["admin"]
    wid = spaces["ana"]["id"]  # shared with bo by now
    running = ana.started(wid)
    assert running["running_for"] == "ana" and bo.workspace(wid)["running_for"] == "ana"
    opened = ana.http.get(f"/api/workspaces/{wid}/open", follow_redirects=False)
    assert opened.status_code == 303 and "/lab?token=" in opened.headers["location"]
    # Nobody else gets the JupyterLab (its token would act as ana): not the collaborator, not an admin.
    for other in (bo, admin):
        message = error(other.http.get(f"/api/workspaces/{wid}/open", follow_redirects=False), 409)
        assert "running for ana" in message and "only ana can open it" in message
    for other in people.values():
        assert "token=" not in other.http.get("/api/workspaces").text and "token=" not in other.http.get("/").text

    # Its kernels hold a kernel token of ana's, which is what they send the studio's own compute.
    environ = lab_environ(running)
    secret = environ["STUDIO_KERNEL_TOKEN"]
    assert secret != studio.token and "STUDIO_TOKEN" not in environ
    principal = directory.principal_for_token(secret)
    assert principal is not None and (principal.name, principal.kind, principal.role) == ("ana", "kernel", "user")
    assert principal.scope == f"workspace:{wid}"
    connection = httpx.get(
        f"{studio.url}/api/workspaces/{wid}/connection", headers=auth_headers(secret), timeout=30, trust_env=False
    )
    assert connection.status_code == 200, connection.text
    assert connection.json()["token"] == secret and connection.json()["user"] is None
    assert whoami_on_livy(studio, secret).json()["user"] == "ana"
    # On the workspace server it is good for that question only: notebook code cannot act on ana's workspaces with it.
    for method, path in (("GET", "/api/workspaces"), ("GET", f"/api/workspaces/{wid}/open"), ("DELETE", f"/api/workspaces/{wid}")):
        refused = httpx.request(method, studio.url + path, headers=auth_headers(secret), timeout=30, trust_env=False)
        assert "may only ask for its workspace's connection" in error(refused, 403)
    # A user's own token is no kernel's: the connection is for the workspace's kernels only.
    assert "kernels" in error(ana.http.get(f"/api/workspaces/{wid}/connection"), 403)
    assert "kernels" in error(admin.http.get(f"/api/workspaces/{wid}/connection"), 403)

    # Quota: ana may run one workspace at a time (STUDIO_USER_MAX_RUNNING_WORKSPACES=1); the admin has none.
    second = ana.create(name="ana-second")
    message = error(ana.http.post(f"/api/workspaces/{second['id']}/start", json={}), 429)
    assert "ana has 1 running workspaces and may have 1" in message
    assert error(ana.http.post("/api/workspaces", json={"name": "ana-third", "start": True}), 429)
    assert "ana-third" not in ana.workspace_names() and ana.workspace(second["id"])["state"] == "Idle"
    assert ana.http.delete(f"/api/workspaces/{second['id']}").status_code == 200

    # A collaborator may stop it; then its kernels' token is refused by both servers at once.
    lab_pid = running["jupyterlab"]["pid"]
    idle = bo.stopped(wid)
    assert idle["reason"] == "Stopped on request by bo." and idle["running_for"] is None
    assert wait_gone(lab_pid)
    assert directory.principal_for_token(secret) is None
    assert not directory.list_tokens(kind="kernel")
    assert whoami_on_livy(studio, secret).status_code == 401
    gone = httpx.get(f"{studio.url}/api/workspaces/{wid}/connection", headers=auth_headers(secret), timeout=30, trust_env=False)
    assert gone.status_code in (401, 403), gone.text


def test_a_collaborator_starts_and_opens_a_shared_workspace_and_then_it_is_theirs_alone(people, spaces, directory):
    ana, bo = people["ana"], people["bo"]
    wid = spaces["ana"]["id"]
    running = bo.started(wid)
    assert running["running_for"] == "bo"
    assert bo.http.get(f"/api/workspaces/{wid}/open", follow_redirects=False).status_code == 303
    assert "running for bo" in error(ana.http.get(f"/api/workspaces/{wid}/open", follow_redirects=False), 409)
    principal = directory.principal_for_token(lab_environ(running)["STUDIO_KERNEL_TOKEN"])
    assert principal is not None and principal.name == "bo"
    # The page says whom it runs for, and offers ana no way in.
    page = ana.http.get("/ui/workspaces").text
    assert "running for <strong>bo</strong>" in page and f'href="/api/workspaces/{wid}/open"' not in page
    assert f'href="/api/workspaces/{wid}/open"' in bo.http.get("/ui/workspaces").text
    # The owner may stop it even though it runs for bo.
    assert ana.stopped(wid)["reason"] == "Stopped on request by ana."
    assert not directory.list_tokens(kind="kernel")


def test_a_workspace_that_runs_for_someone_unshared_stops(people, spaces, directory):
    """bo's browser holds the JupyterLab's token and bo's kernels a token of bo: removing bo from
    the collaborators ends both."""
    ana, bo = people["ana"], people["bo"]
    wid = spaces["ana"]["id"]
    shared = ana.workspace(wid)["collaborators"]
    assert "bo" in shared
    bo.started(wid)
    try:
        response = ana.http.put(f"/api/workspaces/{wid}/collaborators", json={"collaborators": [n for n in shared if n != "bo"]})
        assert response.status_code == 200, response.text
        idle = ana.wait_state(wid, ("Idle",))
        assert idle["reason"] == "Stopped: it ran for bo, who is no longer one of its collaborators."
        assert not directory.list_tokens(kind="kernel")
        assert bo.http.get(f"/api/workspaces/{wid}").status_code == 403
    finally:
        assert ana.http.put(f"/api/workspaces/{wid}/collaborators", json={"collaborators": shared}).status_code == 200


# -- executions ------------------------------------------------------------------------------------


def whoami_notebook(folder: Path, name: str) -> str:
    """A notebook for the plain Python kernel (no Spark) that asks the session service who its run is."""
    notebook = new_notebook()
    notebook.cells = [
        new_markdown_cell("Who does this run act for?"),
        new_code_cell(
            "import json, os, urllib.request\n"
            "opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))\n"
            "request = urllib.request.Request(os.environ['STUDIO_LIVY_URL'] + '/studio/whoami',\n"
            "                                 headers={'Authorization': 'Bearer ' + os.environ['STUDIO_LIVY_TOKEN']})\n"
            "print('run as', json.load(opener.open(request))['user'])"
        ),
    ]
    nbformat.write(notebook, str(folder / name))
    return name


def run(person: Person, workspace: str) -> dict[str, Any]:
    body = {"workspace": workspace, "notebook": "whoami.ipynb", "kernel": "python3"}
    response = person.http.post("/api/executions", json=body)
    assert response.status_code == 201, response.text
    return person.execution(response.json()["id"])


def test_executions_act_for_their_owner_and_are_seen_by_the_workspace_people(studio, directory, people, spaces):
    ana, bo, admin = people["ana"], people["bo"], people["admin"]
    whoami_notebook(studio.root / "ana-space", "whoami.ipynb")
    whoami_notebook(studio.root / "bo-space", "whoami.ipynb")

    # bo runs a notebook of his own workspace (not shared) and one of ana's (shared with him).
    private = run(bo, "bo-space")
    assert private["status"] == "FINISHED", private["last_state_change_reason"]
    assert private["owner"] == "bo"
    output = bo.http.get(f"/api/executions/{private['id']}/output.ipynb")
    assert output.status_code == 200 and "run as bo" in output.text
    assert not directory.list_tokens(kind="execution")  # revoked when the run ended
    shared = run(bo, "ana-space")
    assert shared["status"] == "FINISHED", shared["last_state_change_reason"]

    # ana sees the run on her workspace, not the one on bo's; the admin sees both.
    assert [e["id"] for e in ana.http.get("/api/executions").json()["executions"]] == [shared["id"]]
    assert ana.http.get(f"/api/executions/{shared['id']}/output.html").status_code == 200
    ids = {e["id"] for e in admin.http.get("/api/executions").json()["executions"]}
    assert {private["id"], shared["id"]} <= ids
    for path in ("", "/output.ipynb", "/output.html", "/log", "/driver.log"):
        message = error(ana.http.get(f"/api/executions/{private['id']}{path}"), 403)
        assert "ana may not see execution" in message
    assert "ana may not see execution" in error(ana.http.post(f"/api/executions/{private['id']}/stop", json={}), 403)
    assert admin.http.get(f"/api/executions/{private['id']}/output.ipynb").status_code == 200
    assert "execution-" + str(private["id"]) not in ana.http.get("/ui/executions").text

    # Quota: a user's own limit from the directory overrides the role's default.
    directory.set_quotas("ana", {"executions": 0})
    try:
        message = error(ana.http.post("/api/executions", json={"workspace": "ana-space", "notebook": "whoami.ipynb"}), 429)
        assert "ana has 0 queued or running notebook executions and may have 0" in message
    finally:
        directory.set_quotas("ana", {})


# -- computes ----------------------------------------------------------------------------------------


def test_computes_are_admin_business_and_never_show_a_credential(studio, people, spaces):
    ana, bo, admin = people["ana"], people["bo"], people["admin"]
    local_url = admin.http.get("/api/computes/local").json()["url"]
    # Only an admin registers, changes and removes computes.
    body = {"name": "team", "url": local_url, "token": studio.token}
    assert "Only admins may register computes" in error(bo.http.post("/api/computes", json=body), 403)
    assert "Only admins" in error(bo.http.patch("/api/computes/local", json={"allowed_users": ["bo"]}), 403)
    assert "Only admins" in error(bo.http.delete("/api/computes/local"), 403)
    team = admin.http.post("/api/computes", json={**body, "allowed_users": ["ana"]})
    assert team.status_code == 201, team.text
    assert team.json()["auth"] == "bearer" and team.json()["allowed_users"] == ["ana"]
    # Nobody sees a credential; bo does not even see the compute he may not use.
    for person in people.values():
        text = person.http.get("/api/computes").text
        assert studio.token not in text and person.token not in text
    assert [c["name"] for c in ana.http.get("/api/computes").json()["computes"]] == ["local", "team"]
    assert [c["name"] for c in bo.http.get("/api/computes").json()["computes"]] == ["local"]
    assert "bo may not use compute 'team'" in error(bo.http.get("/api/computes/team"), 403)
    bo_space = spaces["bo"]["id"]
    assert "may not use compute 'team'" in error(bo.http.post(f"/api/workspaces/{bo_space}/attach", json={"compute": "team"}), 403)
    assert "may not use compute 'team'" in error(bo.http.post("/api/workspaces", json={"name": "x", "compute": "team"}), 403)
    message = error(bo.http.post("/api/executions", json={"workspace": "bo-space", "notebook": "whoami.ipynb", "compute": "team"}), 403)
    assert "may not use compute 'team'" in message
    # Closing `local` to ana: bo's listing loses it.
    closed = admin.http.patch("/api/computes/local", json={"allowed_users": ["ana"]})
    assert closed.status_code == 200 and closed.json()["allowed_users"] == ["ana"]
    assert bo.http.get("/api/computes").json()["computes"] == []
    assert admin.http.patch("/api/computes/local", json={"allowed_users": []}).json()["allowed_users"] == []
    assert admin.http.delete("/api/computes/team").status_code == 200


# -- the page ----------------------------------------------------------------------------------------


def test_the_page_shows_who_is_signed_in_and_only_what_they_may_see(people, spaces):
    ana, bo, admin = people["ana"], people["bo"], people["admin"]
    page = bo.http.get("/", headers={"Accept": "text/html"}).text
    assert '<span class="who" title="Signed in as" data-role="user">bo</span>' in page
    assert '<span class="role" title="Role">user</span>' in page
    assert 'action="/logout"' in page and "Sign out" in page
    assert "bo-space" in page and "ana-space" in page and "admin-space" not in page  # his own and the shared one
    assert 'id="new-compute"' not in page  # users do not register computes
    assert "bo&#39;s &lt;b&gt;notebooks&lt;/b&gt;" in page and "<b>notebooks</b>" not in page  # escaped
    rows = ana.http.get("/ui/workspaces").text
    assert 'data-action="share"' in rows and 'data-collaborators="bo"' in rows
    admin_page = admin.http.get("/", headers={"Accept": "text/html"}).text
    assert 'id="new-compute"' in admin_page and '<span class="role" title="Role">admin</span>' in admin_page
    # bo sees ana's workspace (shared) with its people, but no Share or Delete on it.
    shared_row = bo.http.get("/ui/workspaces").text.split(f'id="workspace-{spaces["ana"]["id"]}"')[1].split("</tr>")[0]
    assert "ana" in shared_row and 'data-action="share"' not in shared_row and 'data-action="delete"' not in shared_row


def test_the_owner_deletes_a_shared_workspace(people, spaces):
    ana, bo = people["ana"], people["bo"]
    wid = spaces["ana"]["id"]
    assert ana.http.delete(f"/api/workspaces/{wid}").json()["msg"] == "deleted"
    assert bo.workspace_names() == ["bo-space"]
    assert error(bo.http.get(f"/api/workspaces/{wid}"), 404)
    assert json.loads(ana.http.get("/api/workspaces").text)["total"] == 0
