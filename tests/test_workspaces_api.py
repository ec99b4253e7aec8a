"""The workspace API against a real `studio serve`, real JupyterLab servers and real session
services (with no warm pool, so no Spark starts): the lifecycle with EMR Studio's states, bad
input, idle stops, computes with their sessions, attaching to a second compute, git clones, and
restarts of the server: clean ones that keep running workspaces (the default) or stop them
(--stop-sessions-on-exit), by SIGKILL, and a JupyterLab whose server never comes back stopping
itself.

One server serves the whole module; the restart tests come last because they restart it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import start_service
from helpers import REPO, processes_under
from workspace_helpers import LabKernel, StudioProcess, alive, lab_get, lab_post, wait_gone

# A session worker that never gets ready: the second compute can list a session without a JVM.
NEVER_READY = {
    "STUDIO_POOL_SIZE": "0",
    "STUDIO_WORKER_COMMAND": json.dumps([sys.executable, str(REPO / "tests" / "workers" / "misbehaving.py")]),
    "STUDIO_TEST_WORKER": "never-ready",
    "STUDIO_WORKER_START_TIMEOUT": "600",
    "STUDIO_STOP_TIMEOUT": "1",
}
# A studio serve that leaves its running workspaces running when it stops (the default outside the
# tests, whose helpers stop everything).
KEEP = {"STUDIO_STOP_SESSIONS_ON_EXIT": "false"}


@pytest.fixture(scope="module")
def folder(test_root):
    return test_root / "workspaces-api"


@pytest.fixture(scope="module")
def second_livy(folder):
    service = start_service(folder, "second-livy", env=NEVER_READY)
    yield service
    assert service.stop() == 0


class Server:
    """The module's `studio serve`; restart tests swap its process for a new one on the same folders."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.process = self._new()
        self.process.start()
        self.api = self.process.client()

    def _new(self, env: dict[str, str] | None = None, args: list[str] | None = None) -> StudioProcess:
        return StudioProcess(
            self.folder,
            # Local repositories are refused by default (test_hardening.py); the clone test here uses them.
            env={
                "STUDIO_WORKSPACE_CULL_INTERVAL": "0.5",
                "STUDIO_JUPYTERLAB_STOP_TIMEOUT": "5",
                "STUDIO_GIT_ALLOW_LOCAL": "true",
                **(env or {}),
            },
            pool=0,
            args=args,
        )

    def restart(self, env: dict[str, str] | None = None, args: list[str] | None = None) -> int:
        """SIGTERM, then a new server on the same folders (with these settings); the old one's exit code."""
        self.api.close()
        code = self.process.stop()
        self.start(env, args)
        return code

    def crash(self) -> None:
        """SIGKILL: the server stops nothing."""
        self.api.close()
        self.process.crash()

    def start(self, env: dict[str, str] | None = None, args: list[str] | None = None) -> None:
        self.process = self._new(env, args)
        self.process.start()
        self.api = self.process.client()

    @property
    def root(self) -> Path:
        return self.process.root


@pytest.fixture(scope="module")
def server(folder):
    server = Server(folder / "serve")
    yield server
    server.api.close()
    assert server.process.stop() == 0, server.process.log_tail()
    left = processes_under(folder / "serve")
    assert not left, f"processes left behind: {left}"


@pytest.fixture(scope="module")
def api(server):
    return server.api


def error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"msg"} and body["msg"], body
    return body["msg"]


def lab_pid(workspace: dict) -> int:
    return workspace["jupyterlab"]["pid"]


def lab_environ(workspace: dict) -> dict[str, str]:
    raw = Path(f"/proc/{lab_pid(workspace)}/environ").read_bytes().decode()
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def kernel_connection(server, workspace: dict) -> httpx.Response:
    """What the workspace's kernels get when they ask the Studio where their compute is."""
    environ = lab_environ(workspace)
    server_url = json.loads(Path(environ["STUDIO_SERVER_FILE"]).read_text())["url"]  # as the kernel finds it
    url = f"{server_url}/api/workspaces/{environ['STUDIO_WORKSPACE_ID']}/connection"
    return httpx.get(url, headers={"Authorization": f"Bearer {environ['STUDIO_KERNEL_TOKEN']}"}, timeout=30, trust_env=False)


# -- server and computes ---------------------------------------------------------------------


def test_status_and_the_local_compute(server):
    api = server.api
    status = api.http.get("/api/status").json()
    assert status["root"] == str(server.root)
    assert status["embeddedSessionService"].startswith("http://127.0.0.1:")
    local = api.compute("local")
    assert local["healthy"] and local["managed"] and local["owner"] == "admin"
    assert local["url"] == status["embeddedSessionService"]
    assert local["status"]["pool"]["size"] == 0
    assert local["sessions"] == []
    # The embedded session service runs from its own state folder, so it shows up among the leftovers if it survives.
    assert processes_under(server.process.state_dir / "livy")


def test_bad_names_are_refused_and_nothing_is_created(server):
    api = server.api
    for name, words in [
        ("../escape", "slash"),
        ("..", "starts with '.'"),
        ("a/b", "slash"),
        ("a\\b", "slash"),
        ("", "empty"),
        (".hidden", "starts with '.'"),
        ("x" * 65, "longer than 64"),
        ("with space", "only letters"),
        ("semi;colon", "only letters"),
    ]:
        message = error(api.http.post("/api/workspaces", json={"name": name}), 400)
        assert words in message, (name, message)
    assert "name" in error(api.http.post("/api/workspaces", json={"name": 5}), 400)
    assert "Unrecognized field" in error(api.http.post("/api/workspaces", json={"name": "ok", "colour": "red"}), 400)
    assert "Malformed JSON" in error(api.http.post("/api/workspaces", content=b"{nope", headers={"Content-Type": "application/json"}), 400)
    assert "required" in error(api.http.post("/api/workspaces", json={}), 400)
    assert "idle_timeout" in error(api.http.post("/api/workspaces", json={"name": "ok", "idle_timeout": -1}), 400)
    assert not list(server.root.iterdir())
    assert not (server.root.parent / "escape").exists()


def test_unknown_ids_and_names_are_404(api):
    for method, path in [
        ("GET", "/api/workspaces/9999"),
        ("GET", "/api/workspaces/abc"),
        ("DELETE", "/api/workspaces/9999"),
        ("POST", "/api/workspaces/9999/start"),
        ("POST", "/api/workspaces/9999/stop"),
        ("POST", "/api/workspaces/9999/detach"),
        ("PATCH", "/api/workspaces/9999"),
        ("GET", "/api/computes/nope"),
        ("DELETE", "/api/computes/nope"),
        ("GET", "/api/no-such-route"),
    ]:
        body = {"description": "x"} if method == "PATCH" else None
        message = error(api.http.request(method, path, json=body), 404)
        assert "not found" in message or "No such resource" in message, message
    assert "Compute 'nope' not found" in error(api.http.post("/api/workspaces", json={"name": "c", "compute": "nope"}), 404)


# -- the lifecycle ---------------------------------------------------------------------------


def test_full_lifecycle(server):
    api = server.api
    created = api.create(name="alpha", description="first one", compute="local")
    assert created["state"] == "Idle" and created["reason"] is None
    assert created["owner"] and created["compute"] == "local"
    folder = Path(created["folder"])
    assert folder == server.root / "alpha" and folder.is_dir()
    assert (folder / "getting-started.ipynb").read_bytes() == (REPO / "notebooks" / "getting-started.ipynb").read_bytes()
    # Which compute it uses is the server's to say: nothing is written into the workspace's folder.
    assert not (folder / ".studio").exists()
    assert "already exists" in error(api.http.post("/api/workspaces", json={"name": "alpha"}), 409)

    wid = created["id"]
    starting = api.action(wid, "start")
    assert starting["state"] == "Starting" and starting["url"] is None
    assert "Starting" in error(api.http.post(f"/api/workspaces/{wid}/start", json={}), 409)
    running = api.wait_state(wid, ("Attached", "Failed"))
    assert running["state"] == "Attached", running["reason"]
    # The listing never shows JupyterLab's token; its "url" redirects there (see lab_url).
    assert running["url"] == f"/api/workspaces/{wid}/open" and "token" not in api.http.get("/api/workspaces").text
    assert running["lab_url"].startswith("http://127.0.0.1:") and "/lab?token=" in running["lab_url"]

    # JupyterLab answers with its token only, offers the PySpark kernel, and knows its workspace.
    assert lab_get(running, "/api/status").status_code == 200
    assert lab_get(running, "/api/status", token=False).status_code == 403
    specs = lab_get(running, "/api/kernelspecs").json()["kernelspecs"]
    assert specs["pyspark"]["spec"]["display_name"] == "PySpark"
    pid = lab_pid(running)
    environ = lab_environ(running)
    assert environ["STUDIO_WORKSPACE_ID"] == str(wid) and environ["STUDIO_SERVER_URL"] == server.process.url
    assert json.loads(Path(environ["STUDIO_SERVER_FILE"]).read_text())["url"] == server.process.url
    assert environ["STUDIO_KERNEL_TOKEN"] and "STUDIO_TOKEN" not in environ
    # The kernels' secret answers exactly one question, for this workspace: where is my compute. For the
    # studio's own compute the answer is their own secret (a kernel token of whoever started the
    # workspace), never the studio's token.
    local = api.compute("local")
    assert environ["STUDIO_KERNEL_TOKEN"] != server.process.token
    assert kernel_connection(server, running).json() == {
        "compute": "local", "livy_url": local["url"], "user": None, "token": environ["STUDIO_KERNEL_TOKEN"]
    }
    kernel_headers = {"Authorization": f"Bearer {environ['STUDIO_KERNEL_TOKEN']}"}
    assert httpx.get(f"{server.process.url}/api/workspaces", headers=kernel_headers, trust_env=False).status_code == 403
    assert environ["JUPYTER_PATH"].split(os.pathsep)[0] == str(server.process.state_dir / "jupyter")
    assert str(running["lab_url"].split("token=")[1]) not in Path(f"/proc/{pid}/cmdline").read_bytes().decode()
    assert os.readlink(f"/proc/{pid}/cwd") == str(folder)

    # A kernel started in it (plain Python: cheap) must end with the workspace.
    kernel = lab_post(running, "/api/kernels", {"name": "python3"})
    assert kernel.status_code == 201, kernel.text
    kernel_pids = _wait_kernel_pids(pid)

    assert "running" in error(api.http.post(f"/api/workspaces/{wid}/start", json={}), 409)
    message = error(api.http.delete(f"/api/workspaces/{wid}"), 409)
    assert "stop it first" in message and "force=true" in message

    stopping = api.action(wid, "stop")
    assert stopping["state"] == "Stopping"
    idle = api.wait_state(wid, ("Idle",))
    assert idle["reason"] == "Stopped on request." and idle["url"] is None
    assert wait_gone(pid) and all(wait_gone(k) for k in kernel_pids)
    assert "already stopped" in error(api.http.post(f"/api/workspaces/{wid}/stop", json={}), 409)

    # Update: description, idle timeout, and a rename, which moves the folder.
    (folder / "mine.ipynb").write_text("{}")
    updated = api.http.patch(f"/api/workspaces/{wid}", json={"description": "renamed", "name": "alpha2", "idle_timeout": 120}).json()
    assert updated["description"] == "renamed" and updated["name"] == "alpha2" and updated["idle_timeout"] == 120
    folder = server.root / "alpha2"
    assert (folder / "mine.ipynb").exists() and not (server.root / "alpha").exists()
    assert "slash" in error(api.http.patch(f"/api/workspaces/{wid}", json={"name": "x/y"}), 400)

    # Delete keeps the files by default.
    result = api.delete(wid)
    assert result == {"msg": "deleted", "id": wid, "name": "alpha2", "folder": str(folder), "files": "kept"}
    assert (folder / "mine.ipynb").exists()
    assert api.http.get(f"/api/workspaces/{wid}").status_code == 404
    # A new workspace with the same name picks the files up again; remove_files=true deletes them.
    again = api.create(name="alpha2")
    assert again["id"] != wid and (folder / "mine.ipynb").exists()
    assert api.delete(again["id"], remove_files=True)["files"] == "removed"
    assert not folder.exists()
    assert "true or false" in error(api.http.delete("/api/workspaces/0", params={"force": "maybe"}), 400)


def _wait_kernel_pids(lab_pid_: int, timeout: float = 30.0) -> list[int]:
    """Pids of the kernels below a JupyterLab (they run in sessions of their own)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(lab_pid_)], capture_output=True, text=True).stdout
        pids = [int(p) for p in out.split()]
        if pids:
            return pids
        time.sleep(0.2)
    raise AssertionError("no kernel process appeared")


def test_a_stop_while_starting_leaves_no_process(server):
    api = server.api
    workspace = api.create(name="hasty")
    api.action(workspace["id"], "start")
    stopping = api.action(workspace["id"], "stop")
    assert stopping["state"] == "Stopping"
    idle = api.wait_state(workspace["id"], ("Idle",))
    assert idle["reason"] == "Stopped on request."
    time.sleep(1)
    assert not processes_under(server.root / "hasty")
    api.delete(workspace["id"], remove_files=True)


def test_delete_with_force_stops_a_running_workspace_first(server):
    api = server.api
    workspace = api.create(name="forced", start=True)
    assert workspace["state"] == "Starting"
    running = api.wait_state(workspace["id"], ("Ready",))
    assert running["compute"] is None and running["reason"] is None
    result = api.delete(workspace["id"], force=True)
    assert result["files"] == "kept" and (server.root / "forced").is_dir()
    assert wait_gone(lab_pid(running))
    assert not processes_under(server.root / "forced")


def test_idle_workspaces_stop_and_say_why(server):
    api = server.api
    workspace = api.create(name="sleepy", idle_timeout=3)
    running = api.started(workspace["id"])
    assert running["idle_timeout"] == 3
    idle = api.wait_state(workspace["id"], ("Idle",), timeout=30)
    assert idle["reason"] == "Stopped after 3 s without activity (idle timeout)."
    assert wait_gone(lab_pid(running))
    # The Studio page shows the reason.
    assert "Stopped after 3 s without activity (idle timeout)." in api.http.get("/").text


# -- computes --------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_computes_are_health_checked_and_list_their_sessions(server, second_livy):
    api = server.api
    nobody = f"http://127.0.0.1:{_free_port()}"
    message = error(api.http.post("/api/computes", json={"name": "ghost", "url": nobody}), 502)
    assert nobody in message and "did not answer" in message
    not_livy = error(api.http.post("/api/computes", json={"name": "web", "url": server.process.url}), 502)
    assert "HTTP 404 to GET /version" in not_livy
    assert "http:// or https://" in error(api.http.post("/api/computes", json={"name": "f", "url": "ftp://x"}), 400)
    assert "slash" in error(api.http.post("/api/computes", json={"name": "a/b", "url": second_livy.url}), 400)

    # A compute that wants credentials is checked with them now, not at the first cell.
    refused = error(api.http.post("/api/computes", json={"name": "second", "url": second_livy.url}), 502)
    assert "refused the credentials" in refused
    response = api.http.post("/api/computes", json={"name": "second", "url": second_livy.url + "/", "token": second_livy.token})
    assert response.status_code == 201, response.text
    second = response.json()
    assert second["url"] == second_livy.url and second["healthy"] and not second["managed"]
    assert second["auth"] == "bearer" and second_livy.token not in json.dumps(api.http.get("/api/computes").json())
    assert "already exists" in error(api.http.post("/api/computes", json={"name": "second", "url": second_livy.url}), 409)
    # Credentials in a URL are taken out of it: kept for the compute, never shown.
    host = second_livy.url.removeprefix("http://")
    basic = api.http.post("/api/computes", json={"name": "basic", "url": f"http://someone:{second_livy.token}@{host}"})
    assert basic.status_code == 201, basic.text
    assert basic.json()["url"] == second_livy.url and basic.json()["auth"] == "basic" and basic.json()["healthy"]
    assert second_livy.token not in basic.text
    assert api.http.delete("/api/computes/basic").status_code == 200
    assert "provided by studio serve" in error(api.http.delete("/api/computes/local"), 409)

    livy = second_livy.client()
    try:
        session = livy.create_session(kind="pyspark", name="listed")
        listed = api.compute("second")["sessions"]
        assert [(s["id"], s["name"], s["state"], s["kind"]) for s in listed] == [(session["id"], "listed", "starting", "pyspark")]
        assert listed[0]["driverLogUrl"].startswith(second_livy.url)
        page = api.http.get("/ui/computes").text
        assert "listed" in page and "starting" in page and listed[0]["driverLogUrl"] in page
        livy.http.delete(f"/sessions/{session['id']}")
    finally:
        livy.close()
    names = [c["name"] for c in api.http.get("/api/computes").json()["computes"]]
    assert names == ["local", "second"]


def test_attach_to_a_second_compute_and_back(server, second_livy, folder):
    api = server.api
    workspace = api.create(name="gamma", compute="local", start=True)
    wid = workspace["id"]
    attached = api.wait_state(wid, ("Attached",))
    assert kernel_connection(server, attached).json()["compute"] == "local"

    moved = api.action(wid, "attach", expect=200, compute="second")
    assert moved["state"] == "Attached" and moved["compute"] == "second"
    # The kernels get the second compute's own credentials, from the server.
    assert kernel_connection(server, moved).json() == {
        "compute": "second", "livy_url": second_livy.url, "user": None, "token": second_livy.token
    }
    assert lab_pid(moved) == lab_pid(attached)  # attaching does not restart JupyterLab
    assert api.compute("second")["workspaces"] == ["gamma"]
    assert "attached to workspace(s) gamma" in error(api.http.delete("/api/computes/second"), 409)
    assert "not found" in error(api.http.post(f"/api/workspaces/{wid}/attach", json={"compute": "nope"}), 404)

    # A compute that stops answering: attaching to it fails with 502 and the workspace stays where it was.
    doomed = start_service(folder, "doomed-livy", env={"STUDIO_POOL_SIZE": "0"})
    try:
        body = {"name": "doomed", "url": doomed.url, "token": doomed.token}
        assert api.http.post("/api/computes", json=body).status_code == 201
    finally:
        assert doomed.stop() == 0
    unhealthy = api.compute("doomed")
    assert not unhealthy["healthy"] and "did not answer" in unhealthy["error"]
    assert "did not answer" in error(api.http.post(f"/api/workspaces/{wid}/attach", json={"compute": "doomed"}), 502)
    still = api.workspace(wid)
    assert still["state"] == "Attached" and still["compute"] == "second"
    assert kernel_connection(server, still).json()["compute"] == "second"
    assert "Unreachable" in api.http.get("/ui/computes").text
    assert api.http.delete("/api/computes/doomed").json() == {"msg": "deleted", "name": "doomed"}

    detached = api.action(wid, "detach", expect=200)
    assert detached["state"] == "Ready" and detached["compute"] is None
    assert detached["reason"] == "Detached from compute 'second'."
    assert "not attached" in error(kernel_connection(server, detached), 409)
    assert "not attached" in error(api.http.post(f"/api/workspaces/{wid}/detach", json={}), 409)
    back = api.action(wid, "attach", expect=200, compute="local")
    assert back["state"] == "Attached" and kernel_connection(server, back).json()["compute"] == "local"
    api.stopped(wid)


# -- git -------------------------------------------------------------------------------------


def test_a_workspace_can_clone_a_repository(server, folder):
    api = server.api
    repo = folder / "repo"
    repo.mkdir()
    (repo / "analysis.ipynb").write_text('{"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}')
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "add", "."], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "notebook"], cwd=repo, check=True)

    cloned = api.create(name="cloned", repository_url=str(repo))
    assert cloned["state"] == "Idle" and cloned["repository_url"] == str(repo)
    assert (server.root / "cloned" / "analysis.ipynb").exists() and (server.root / "cloned" / ".git").is_dir()
    assert not (server.root / "cloned" / "getting-started.ipynb").exists()  # a clone is the repository, unseeded
    by_url = api.create(name="cloned-url", repository_url=f"file://{repo}")
    assert by_url["state"] == "Idle" and (server.root / "cloned-url" / "analysis.ipynb").exists()

    failed = api.create(name="no-repo", repository_url=str(folder / "missing"))
    assert failed["state"] == "Failed"
    assert failed["reason"].startswith(f"git clone of {folder / 'missing'} failed: fatal:")
    assert "clone failed" in error(api.http.post(f"/api/workspaces/{failed['id']}/start"), 409)
    # A "URL" that looks like an option is refused before git runs.
    marker = folder / "pwned"
    refused = api.http.post("/api/workspaces", json={"name": "sneaky", "repository_url": f"--upload-pack=touch {marker}"})
    assert refused.status_code == 400 and "not absolute" in refused.json()["msg"] and not marker.exists()
    dismissed = api.action(failed["id"], "stop", expect=202)
    assert dismissed["state"] == "Idle" and "git clone" in dismissed["reason"]
    for workspace in (cloned, by_url, failed):
        api.delete(workspace["id"], remove_files=True)


# -- a server that was given a compute, and a JupyterLab that cannot start -------------------


def test_livy_url_mode_starts_no_session_service_and_reports_a_failed_start(folder, second_livy):
    failing = [sys.executable, "-c", "import sys; print('jupyterlab: broken on purpose', file=sys.stderr); sys.exit(3)"]
    studio = StudioProcess(
        folder / "given-compute", livy_url=second_livy.url, env={"STUDIO_JUPYTERLAB_COMMAND": json.dumps(failing)}
    ).start()
    api = studio.client()
    try:
        status = api.http.get("/api/status").json()
        assert status["embeddedSessionService"] is None
        assert api.compute("local")["url"] == second_livy.url
        workspace = api.create(name="broken", start=True)
        failed = api.wait_state(workspace["id"], ("Failed",))
        assert "exited with code 3" in failed["reason"] and "broken on purpose" in failed["reason"]
        assert api.http.get(f"/api/workspaces/{workspace['id']}/log").text.count("broken on purpose") == 1
    finally:
        api.close()
        assert studio.stop() == 0
    assert not studio.leftovers()


# -- restarts (last: they restart the module's server) ----------------------------------------


def test_a_clean_restart_keeps_running_workspaces_and_their_kernels(server):
    """SIGTERM (an upgrade) leaves a running workspace running: the next server shows it as it was,
    with the reason, opens it, gives its kernels their compute and culls it when it idles."""
    assert server.restart(env=KEEP) == 0  # from here on, a stop leaves running workspaces running
    api = server.api
    workspace = api.create(name="delta", description="survives restarts", compute="local")
    running = api.started(workspace["id"])
    kernel = LabKernel(running, "python3")  # plain Python: cheap; test_restart.py has the PySpark kernel
    kernel.ok("kept = 6 * 7")
    kernel_pid = kernel.pid(lab_pid(running))

    stopped_at = time.time()
    assert server.restart(env=KEEP) == 0
    api = server.api
    time.sleep(1)  # the new server's culler reads JupyterLab's activity every 0.5 s
    found = api.workspace(workspace["id"])
    reason = f"Found running again (JupyterLab pid {lab_pid(running)}) after studio serve restarted."
    assert found["state"] == "Attached" and found["reason"] == reason, found
    assert found["jupyterlab"] == running["jupyterlab"] and found["lab_url"] == running["lab_url"]
    assert found["description"] == "survives restarts"
    assert found["last_activity"] < stopped_at  # JupyterLab's own: the restart did not reset its idle time
    assert alive(kernel_pid) and kernel.ok("print(kept)").stdout == "42\n"  # the same kernel, with its variables
    assert kernel_connection(server, found).json()["livy_url"] == api.compute("local")["url"]
    page = api.http.get("/").text
    assert reason in page and f"/api/workspaces/{found['id']}/open" in page  # the Studio shows it open, and why

    # The culler watches it like any other.
    idle_timeout = 3
    assert api.http.patch(f"/api/workspaces/{found['id']}", json={"idle_timeout": idle_timeout}).status_code == 200
    idle = api.wait_state(found["id"], ("Idle",), timeout=30)
    assert idle["reason"] == f"Stopped after {idle_timeout} s without activity (idle timeout)."
    assert wait_gone(lab_pid(running)) and wait_gone(kernel_pid)
    assert api.http.patch(f"/api/workspaces/{found['id']}", json={"idle_timeout": None}).json()["idle_timeout"] == 3600


def test_a_restart_with_stop_sessions_on_exit_stops_workspaces_and_keeps_every_record(server):
    assert server.restart(env=KEEP, args=["--stop-sessions-on-exit"]) == 0  # the flag wins over the variable
    api = server.api
    running = api.started(api.by_name("delta")["id"])
    before = {w["name"]: w for w in api.workspaces()}

    assert server.restart() == 0
    assert wait_gone(lab_pid(running))
    after = {w["name"]: w for w in server.api.workspaces()}
    assert set(after) == set(before)
    delta = after["delta"]
    assert delta["state"] == "Idle" and delta["reason"] == "Stopped because studio serve stopped."
    assert delta["description"] == "survives restarts" and delta["compute"] == "local"
    assert after["gamma"]["state"] == "Idle" and after["gamma"]["reason"] == "Stopped on request."


def test_after_a_crash_running_workspaces_are_found_again_or_marked_idle(server):
    api = server.api
    api.create(name="epsilon", compute="local")
    names = ("delta", "gamma", "epsilon")
    for name in names:
        api.action(api.by_name(name)["id"], "start")
    before = {name: api.wait_state(api.by_name(name)["id"], ("Attached",)) for name in names}
    old_local = api.compute("local")["url"]
    old_service = [pid for pid, _ in processes_under(server.process.state_dir / "livy")]
    assert old_service

    server.crash()
    # JupyterLab outlives the server on purpose; the embedded session service is stopped by the kernel (PDEATHSIG).
    assert all(alive(lab_pid(w)) for w in before.values())
    assert all(wait_gone(pid, 60) for pid in old_service)
    # epsilon's JupyterLab dies while no server watches it.
    os.killpg(lab_pid(before["epsilon"]), signal.SIGKILL)
    assert wait_gone(lab_pid(before["epsilon"]))
    server.start()
    api = server.api

    new_local = api.compute("local")["url"]
    assert new_local != old_local
    lost = api.by_name("epsilon")
    assert lost["state"] == "Idle" and lost["reason"] == "JupyterLab was no longer running when studio serve restarted."
    for name in ("delta", "gamma"):
        found = api.by_name(name)
        assert found["state"] == "Attached", found
        assert found["reason"] == f"Found running again (JupyterLab pid {lab_pid(before[name])}) after studio serve restarted."
        assert found["lab_url"] == before[name]["lab_url"] and lab_get(found, "/api/status").status_code == 200
        # The compute's URL changed with the new session service; the workspace's kernels follow it,
        # with the secret they were started with.
        assert kernel_connection(server, found).json()["livy_url"] == new_local

    # A found-again JupyterLab stops like any other...
    stopped = api.stopped(api.by_name("delta")["id"])
    assert stopped["reason"] == "Stopped on request." and wait_gone(lab_pid(before["delta"]))
    # ...and one that dies is noticed and reported.
    os.killpg(lab_pid(before["gamma"]), signal.SIGKILL)
    failed = api.wait_state(api.by_name("gamma")["id"], ("Failed",), timeout=30)
    assert "unexpectedly" in failed["reason"] and "Start it again" in failed["reason"]
    assert api.action(failed["id"], "stop")["state"] == "Idle"


def test_a_jupyterlab_whose_server_never_comes_back_stops_itself(folder):
    """A workspace left running by a server that does not come back applies its idle timeout itself,
    with JupyterLab's own settings: its idle kernels are culled, then it shuts itself down, and the
    next server says why. jupyter_server checks for that once a minute, so this takes a minute."""
    idle_timeout = 5
    env = {**KEEP, "STUDIO_WORKSPACE_CULL_INTERVAL": "0.5"}
    studio = StudioProcess(folder / "orphan", env=env, pool=0).start()
    try:
        with studio.client() as api:
            workspace = api.create(name="left", idle_timeout=idle_timeout)
            running = api.started(workspace["id"])
        kernel = LabKernel(running, "python3")
        # Busy, so the Studio's culler leaves it alone until the Studio is gone; then it idles with no client.
        kernel.run("import time\ntime.sleep(10)", until_busy=True)
        kernel_pid = kernel.pid(lab_pid(running))
        assert studio.stop() == 0, studio.log_tail()
        assert alive(lab_pid(running)) and alive(kernel_pid)

        assert wait_gone(lab_pid(running), timeout=150), "JupyterLab ran on without its server"
        assert wait_gone(kernel_pid)
        log = (studio.state_dir / "workspaces" / str(workspace["id"]) / "jupyterlab.log").read_text()
        assert "Culling 'idle' kernel 'python3'" in log and "; shutting down." in log, log[-3000:]

        studio = StudioProcess(folder / "orphan", env=env, pool=0).start()
        with studio.client() as api:
            left = api.workspace(workspace["id"])
            assert left["state"] == "Idle" and left["url"] is None
            assert re.fullmatch(
                r"JupyterLab stopped itself after \d+ s without activity while studio serve was not running "
                r"\(the workspace's idle timeout\)\.",
                left["reason"],
            ), left["reason"]
            assert left["reason"] in api.http.get("/").text.replace("&#39;", "'")
    finally:
        if studio.process is not None and studio.process.poll() is None:
            studio.stop()
        left_behind = studio.leftovers()
        for pid, _ in left_behind:
            os.kill(pid, signal.SIGKILL)
    assert not left_behind, f"processes left behind: {left_behind}"
