"""The hardening findings of issue 9, through real servers and real peers:

* nothing runs from a workspace, a notebook's folder or the current folder by accident
  (``python -P`` everywhere, the kernel's sys.path);
* state files are private (0600 in 0700 folders), and loose modes are fixed at start;
* only http(s) URLs become links, and every field a compute sends is escaped;
* git clones: https and ssh only by default, credentials never stored or shown, a size budget;
* secrets in Spark conf are redacted from logs and API responses;
* budgets: running workspaces, connections, slow request heads.

One session service and one `studio serve` serve the whole module; both are started from a
folder full of modules that would leave a marker and fail if anything imported them. Their peers
are real too: an HTTPS git server (git's "dumb" protocol over Python's http.server, with Basic
auth) and a Livy endpoint that answers with hostile session fields.
"""

from __future__ import annotations

import base64
import html
import http.server
import json
import os
import re
import socket
import ssl
import stat
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import nbformat
import psutil
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from helpers import REPO, ServiceProcess
from kernelhelpers import Kernel
from studio.process import descendants_of
from workspace_helpers import StudioProcess, lab_get, lab_post

FILES = REPO / "tests" / "files"
GIT_USER, GIT_PASSWORD = "alice", "s3cr3t-PW"
CLONE_MAX_BYTES = 2_000_000
HEADER_TIMEOUT = 3

# Modules a cloned repository or a notebook folder could hold to take over whatever imports them.
HOSTILE_MODULES = ("studio", "jupyterlab", "traitlets", "pandas", "httpx", "nbclient", "ipykernel")
HOSTILE_CODE = (
    "import pathlib\n"
    "pathlib.Path({marker!r}).write_text('imported')\n"
    "raise ImportError('{name} from the working folder was imported')\n"
)


def plant(folder: Path, markers: Path) -> Path:
    """Hostile copies of HOSTILE_MODULES in ``folder``: packages for the ones run with -m, modules for the others."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in HOSTILE_MODULES:
        code = HOSTILE_CODE.format(marker=str(markers / name), name=name)
        if name in ("studio", "jupyterlab", "ipykernel"):
            (folder / name).mkdir(exist_ok=True)
            (folder / name / "__init__.py").write_text(code)
            (folder / name / "__main__.py").write_text(code)
        else:
            (folder / f"{name}.py").write_text(code)
    (folder / "mymodule.py").write_text("VALUE = 42\n")
    return folder


@pytest.fixture(scope="module")
def folder(test_root):
    return test_root / "hardening"


@pytest.fixture(scope="module")
def markers(folder):
    path = folder / "markers"
    path.mkdir(parents=True, exist_ok=True)
    yield path
    assert not list(path.iterdir()), "a module from a working folder was imported"


@pytest.fixture(scope="module")
def hostile(folder, markers):
    return plant(folder / "hostile", markers)


@pytest.fixture(scope="module")
def service(folder, hostile):
    env = {"STUDIO_POOL_SIZE": "0", "STUDIO_HEADER_TIMEOUT": str(HEADER_TIMEOUT)}
    svc = ServiceProcess(folder / "livy", env=env, cwd=hostile).start()
    yield svc
    assert svc.stop() == 0
    assert not svc.leftovers()


@pytest.fixture(scope="module")
def git_server(folder):
    server = GitServer(folder / "git").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def studio(folder, hostile, git_server):
    env = {
        "GIT_SSL_CAINFO": str(git_server.cert),  # git trusts the test server's certificate, nothing else changes
        "STUDIO_GIT_CLONE_MAX_BYTES": str(CLONE_MAX_BYTES),
        "STUDIO_MAX_RUNNING_WORKSPACES": "1",
        "STUDIO_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
    }
    process = StudioProcess(folder / "serve", pool=0, cwd=hostile, env=env).start()
    yield process
    assert process.stop() == 0
    assert not process.leftovers()


@pytest.fixture(scope="module")
def api(studio):
    client = studio.client()
    yield client
    client.close()


def children(pid: int) -> list[int]:
    """Every descendant of ``pid``."""
    return [process.pid for process in descendants_of(pid)]


def argv(pid: int) -> list[str]:
    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return []


def kernel_info(workspace: dict, kernel_id: str, timeout: float = 60) -> dict:
    """A kernel_info_request through the workspace's JupyterLab, as the browser sends it; the reply's content."""
    from websockets.sync.client import connect

    base, _, secret = workspace["lab_url"].partition("/lab?token=")
    url = base.replace("http://", "ws://", 1) + f"/api/kernels/{kernel_id}/channels"
    msg_id = uuid.uuid4().hex
    header = {"msg_id": msg_id, "msg_type": "kernel_info_request", "session": uuid.uuid4().hex, "username": "test", "version": "5.3"}
    request = {"header": header, "parent_header": {}, "metadata": {}, "content": {}, "channel": "shell", "buffers": []}
    deadline = time.monotonic() + timeout
    with connect(url, additional_headers={"Authorization": f"token {secret}"}, open_timeout=30) as socket_:
        socket_.send(json.dumps(request))
        while True:
            message = json.loads(socket_.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message["parent_header"].get("msg_id") == msg_id and message["msg_type"] == "kernel_info_reply":
                return message["content"]


# -- item 4: nothing runs from a working folder -------------------------------------------------


def test_a_service_started_in_a_folder_holding_studio_uses_the_installed_package(service):
    with service.http() as http:
        assert http.get("/studio/status").status_code == 200


def test_the_bench_starts_its_services_from_a_folder_holding_studio(folder, hostile, monkeypatch):
    from studio.bench import BenchService

    monkeypatch.chdir(hostile)  # `studio bench` run from a checkout of something else
    env = {"STUDIO_CDS": "false", "STUDIO_CACHE_DIR": str(folder / "cache")}
    with BenchService(folder / "bench", pool=0, env=env) as bench:
        assert bench.status()["pool"]["size"] == 0
        assert "-P" in argv(bench.process.pid)[1:3]


def test_a_kernel_in_a_folder_of_hostile_modules_imports_the_installed_ones(service, hostile, markers, tmp_path):
    kernel = Kernel(tmp_path, {"STUDIO_LIVY_URL": service.url}, cwd=hostile)
    try:
        code = "%%local\nimport sys, pandas, traitlets\nprint(pandas.__file__)\nprint(traitlets.__file__)\nprint(sys.path[-1] == '')"
        pandas_file, traitlets_file, last = kernel.ok(code).stdout.split()
        assert not pandas_file.startswith(str(hostile)) and not traitlets_file.startswith(str(hostile))
        assert last == "True"
        # The notebook's folder is still on sys.path, after everything installed.
        assert kernel.ok("%%local\nimport mymodule\nprint(mymodule.VALUE)").stdout.strip() == "42"
    finally:
        kernel.shutdown()
    assert not list(markers.iterdir())


def test_a_workspace_holding_a_jupyterlab_package_starts_the_real_jupyterlab(studio, api, markers):
    workspace = api.create(name="shadowed")
    plant(studio.root / "shadowed", markers)
    started = api.started(workspace["id"])
    assert lab_get(started, "/api/status").status_code == 200
    kernel = lab_post(started, "/api/kernels", {"name": "pyspark"})
    assert kernel.status_code == 201, kernel.text
    assert kernel_info(started, kernel.json()["id"])["implementation"] == "spark-studio-pyspark"
    # Every Python the studio started runs with -P (Spark's own Python workers are the JVM's, not ours).
    pythons = [a for a in map(argv, children(studio.process.pid)) if a and os.path.basename(a[0]).startswith("python")]
    assert len(pythons) >= 3, pythons  # the session service, JupyterLab, the kernel
    assert all("-P" in a[1:3] for a in pythons if "pyspark.daemon" not in a), pythons
    api.stopped(workspace["id"])
    assert not list(markers.iterdir())


# -- peers: an HTTPS git server and a hostile Livy endpoint ---------------------------------------


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


class _GitHandler(_Quiet):
    """git's dumb HTTP protocol is plain files; /private/ needs Basic auth, big.git's pack trickles."""

    def do_GET(self) -> None:  # noqa: N802
        if self.path.startswith("/private/"):
            expected = "Basic " + base64.b64encode(f"{GIT_USER}:{GIT_PASSWORD}".encode()).decode()
            if self.headers.get("Authorization") != expected:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="git"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.server.authenticated.append(self.path)  # type: ignore[attr-defined]
        path = self.translate_path(self.path)
        if "/big.git/" in self.path and path.endswith(".pack") and os.path.isfile(path):
            data = Path(path).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                for start in range(0, len(data), 64 * 1024):  # ~3 MB/s: the clone grows while it is watched
                    self.wfile.write(data[start : start + 64 * 1024])
                    time.sleep(0.02)
            except OSError:
                pass  # the clone was stopped
            return
        super().do_GET()


class Served:
    """A ThreadingHTTPServer on a free loopback port, in a thread."""

    def __init__(self, handler: Any, tls: tuple[Path, Path] | None = None) -> None:
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        scheme = "http"
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(tls[0]), str(tls[1]))
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> "Served":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def git(*args: str, cwd: Path) -> None:
    config = ["-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "init.defaultBranch=main"]
    subprocess.run(["git", *config, *args], cwd=cwd, check=True, capture_output=True)


def bare_repository(root: Path, name: str, files: dict[str, bytes]) -> None:
    """``root/name`` as a bare repository served over git's dumb HTTP protocol."""
    work = root / f"{name}.work"
    work.mkdir(parents=True)
    for relative, content in files.items():
        (work / relative).write_bytes(content)
    git("init", "-q", cwd=work)
    git("add", ".", cwd=work)
    git("commit", "-qm", "files", cwd=work)
    git("clone", "-q", "--bare", str(work), str(root / name), cwd=root)
    git("repack", "-q", "-a", "-d", cwd=root / name)
    git("update-server-info", cwd=root / name)


class GitServer:
    """HTTPS with a certificate made for 127.0.0.1; studio serve trusts it through GIT_SSL_CAINFO."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.root = folder / "www"
        (self.root / "private").mkdir(parents=True)
        self.cert, key = folder / "cert.pem", folder / "key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
             "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(self.cert)],
            check=True, capture_output=True,
        )  # fmt: skip
        notebook = json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}).encode()
        bare_repository(self.root / "private", "notes.git", {"notes.ipynb": notebook})
        bare_repository(self.root, "big.git", {"data.bin": os.urandom(3 * CLONE_MAX_BYTES)})  # random: packs do not shrink it
        handler = lambda *a, **k: _GitHandler(*a, directory=str(self.root), **k)  # noqa: E731
        self.served = Served(handler, tls=(self.cert, key))
        self.served.httpd.authenticated = []  # type: ignore[attr-defined]
        self.url = self.served.url

    @property
    def authenticated(self) -> list[str]:
        return self.served.httpd.authenticated  # type: ignore[attr-defined]

    def start(self) -> "GitServer":
        self.served.start()
        return self

    def stop(self) -> None:
        self.served.stop()


HOSTILE_SESSION = {
    "id": "<img src=x onerror=alert(1)>",
    "name": "<script>alert(2)</script>",
    "appId": "<b>app</b>",
    "kind": "pyspark",
    "state": "idle",
    "owner": "mallory",
    "proxyUser": None,
    "appInfo": {"sparkUiUrl": "javascript:alert(document.cookie)", "driverLogUrl": " java\tscript:alert(3)"},
    "log": [],
}


class _LivyHandler(_Quiet):
    """A Livy endpoint (any URL can be registered as a compute) whose session fields are hostile."""

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("?")[0]
        answers = {
            "/version": {"version": "0.9.0", "revision": "spark-studio"},
            "/sessions": {"from": 0, "total": 1, "sessions": [HOSTILE_SESSION]},
            "/studio/whoami": {"user": "mallory"},
        }
        body = json.dumps(answers.get(path, {"msg": "not found"})).encode()
        self.send_response(200 if path in answers else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def hostile_livy():
    served = Served(_LivyHandler).start()
    yield served
    served.stop()


def links(page: str) -> list[str]:
    return [html.unescape(href) for href in re.findall(r"""href\s*=\s*["']([^"']*)["']""", page, flags=re.I)]


def assert_no_script_links(page: str) -> None:
    for href in links(page):
        assert href.startswith(("/", "http://", "https://", "#")), f"unsafe link {href!r}"
    assert "<script>alert" not in page and "<img src=x" not in page and "<b>app</b>" not in page


# -- item 7: links and escaping -------------------------------------------------------------------


def test_the_studio_links_only_http_urls_and_escapes_what_a_compute_sends(studio, api, hostile_livy):
    created = api.http.post("/api/computes", json={"name": "hostile", "url": hostile_livy.url})
    assert created.status_code == 201, created.text
    try:
        fragment = studio.get("/ui/computes").text
        assert "hostile" in fragment and "&lt;script&gt;alert(2)&lt;/script&gt;" in fragment
        assert_no_script_links(fragment)
        assert_no_script_links(studio.get("/").text)
    finally:
        assert api.http.delete("/api/computes/hostile").status_code == 200


def test_the_kernel_info_table_links_only_http_urls_and_escapes_every_field(hostile_livy, tmp_path):
    kernel = Kernel(tmp_path, {"STUDIO_LIVY_URL": hostile_livy.url})
    try:
        kernel.ok('%%configure -f\n{"conf": {"spark.myapp.password": "KERNEL-SECRET-4", "spark.sql.shuffle.partitions": "4"}}')
        info = kernel.ok("%%info")
        tables = "".join(info.data("text/html"))
        assert "&lt;img src=x onerror=alert(1)&gt;" in tables and "Spark UI" in tables
        assert_no_script_links(tables)
        shown = tables + info.text()
        assert "KERNEL-SECRET-4" not in shown and "redacted" in shown and '"spark.sql.shuffle.partitions": "4"' in shown
    finally:
        kernel.shutdown()


# -- item 7: git ----------------------------------------------------------------------------------


def test_local_and_unsafe_repositories_are_refused_by_default(studio, api, folder):
    local = folder / "git" / "www" / "big.git"  # a real repository on this machine
    refusals = {
        str(local): "STUDIO_GIT_ALLOW_LOCAL",
        f"file://{local}": "STUDIO_GIT_ALLOW_LOCAL",
        "http://127.0.0.1:9/repo.git": "https://",
        "git://127.0.0.1/repo.git": "https://",
        f"ext::sh -c touch% {folder}/pwned": "transport helper",
        "ftp://127.0.0.1/repo.git": "https:// and ssh",
    }
    for url, hint in refusals.items():
        response = api.http.post("/api/workspaces", json={"name": "refused", "repository_url": url})
        assert response.status_code == 400, (url, response.text)
        assert hint in response.json()["msg"], (url, response.json())
    assert "refused" not in [w["name"] for w in api.workspaces()]
    assert not (studio.root / "refused").exists() and not (folder / "pwned").exists()


def test_credentials_in_a_clone_url_reach_the_server_and_nowhere_else(studio, api, git_server):
    clean = f"{git_server.url}/private/notes.git"
    with_secret = clean.replace("https://", f"https://{GIT_USER}:{GIT_PASSWORD}@")
    cloned = api.create(name="private", repository_url=with_secret)
    assert cloned["state"] == "Idle", cloned["reason"]
    assert git_server.authenticated, "the git server never saw the credentials"
    assert cloned["repository_url"] == clean
    assert (studio.root / "private" / "notes.ipynb").exists()
    config = (studio.root / "private" / ".git" / "config").read_text()
    assert clean in config and GIT_PASSWORD not in config and GIT_USER not in config

    wrong = api.create(name="wrong", repository_url=clean.replace("https://", f"https://{GIT_USER}:WRONG-pw-123@"))
    assert wrong["state"] == "Failed" and "failed" in wrong["reason"], wrong
    shown = json.dumps(api.workspaces()) + studio.get("/").text + studio.get("/ui/workspaces").text + studio.log_tail(10**7)
    assert GIT_PASSWORD not in shown and "WRONG-pw-123" not in shown
    assert wrong["repository_url"] == clean and not (studio.root / "wrong").exists()
    for workspace in (cloned, wrong):
        api.delete(workspace["id"], remove_files=True)


def test_a_clone_over_the_size_budget_is_stopped_and_leaves_nothing(studio, api, git_server):
    big = api.create(name="big", repository_url=f"{git_server.url}/big.git")
    assert big["state"] == "Failed" and "STUDIO_GIT_CLONE_MAX_BYTES" in big["reason"], big
    assert not (studio.root / "big").exists()
    api.delete(big["id"])


# -- item 7: budgets ----------------------------------------------------------------------------------


def test_running_workspaces_have_a_budget(studio, api):
    first = api.create(name="first")
    second = api.create(name="second")
    api.started(first["id"])
    refused = api.http.post(f"/api/workspaces/{second['id']}/start")
    assert refused.status_code == 429 and "STUDIO_MAX_RUNNING_WORKSPACES=1" in refused.json()["msg"]
    also = api.http.post("/api/workspaces", json={"name": "third", "start": True})
    assert also.status_code == 429 and "first" in also.json()["msg"]
    assert api.workspace(second["id"])["state"] == "Idle"
    api.stopped(first["id"])
    api.started(second["id"])
    api.stopped(second["id"])


def half_request_head(url: str) -> float:
    """Seconds until the server closes a connection that sent half a request head and then waits."""
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as raw:
        raw.sendall(b"GET /version HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        started = time.monotonic()
        assert raw.recv(1024) == b"", "the server answered an incomplete request"
        return time.monotonic() - started


def test_a_request_head_that_never_completes_is_cut_off(service, studio):
    for server, path in ((service, "/sessions"), (studio, "/api/workspaces")):
        results: list[float] = []
        waiting = [threading.Thread(target=lambda: results.append(half_request_head(server.url))) for _ in range(3)]
        for thread in waiting:
            thread.start()
        time.sleep(0.5)
        assert server.get(path).status_code == 200  # normal requests meanwhile
        for thread in waiting:
            thread.join(30)
        assert len(results) == 3 and all(HEADER_TIMEOUT - 0.5 < r < HEADER_TIMEOUT + 5 for r in results), results


def test_connections_beyond_the_budget_get_a_clear_503(folder):
    service = ServiceProcess(folder / "few-connections", env={"STUDIO_POOL_SIZE": "0", "STUDIO_MAX_CONNECTIONS": "3"}).start()
    host, port = service.url.split("://", 1)[1].rsplit(":", 1)
    try:
        idle = [socket.create_connection((host, int(port)), timeout=10) for _ in range(3)]
        time.sleep(0.3)
        refused = service.get("/sessions")
        assert refused.status_code == 503 and "STUDIO_MAX_CONNECTIONS=3" in refused.json()["msg"]
        assert refused.headers["retry-after"]
        for connection in idle:
            connection.close()
        time.sleep(0.3)
        assert service.get("/sessions").status_code == 200
    finally:
        assert service.stop() == 0


# -- items 6 and 7: secrets, then file modes over everything the module's servers wrote ----------------


def loose(root: Path) -> list[str]:
    """Entries under ``root`` (and itself) that group or others may read, write or enter; links are not followed."""
    found = []
    for top, dirs, names in os.walk(root):
        for entry in [Path(top), *(Path(top) / name for name in dirs + names)]:
            try:
                mode = entry.lstat().st_mode
            except FileNotFoundError:  # a temporary file, gone meanwhile
                continue
            if not stat.S_ISLNK(mode) and mode & 0o077:
                found.append(f"{entry} {stat.S_IMODE(mode):04o}")
    return sorted(set(found))


def test_secrets_in_spark_conf_are_redacted_from_logs_and_responses(service):
    livy = service.client()
    try:
        session = livy.create_session(kind="pyspark", conf={"spark.myapp.password": "SESSION-SECRET-1"})
        assert session["conf"]["spark.myapp.password"] != "SESSION-SECRET-1"
        livy.wait_session(session["id"])
        # the worker ran with -P, far from any working folder
        assert livy.text(session["id"], "import sys, os\n(sys.flags.safe_path, '' in sys.path or os.getcwd() in sys.path)") == "(True, False)"
        # the session has the real value; only what is shown is redacted
        assert livy.text(session["id"], "spark.conf.get('spark.myapp.password')") == "'SESSION-SECRET-1'"
        arrow = livy.run(session["id"], "__studio__.export(spark.range(5))")
        assert service.get(f"/sessions/{session['id']}/statements/{arrow['id']}/arrow").status_code == 200

        batch = livy.http.post(
            "/batches",
            json={
                "file": str(FILES / "batch_count.py"),
                "args": ["10"],
                "pyFiles": [str(FILES / "batch_helper.py")],
                "conf": {"spark.hadoop.fs.s3a.secret.key": "BATCH-SECRET-2", "spark.myapp.apiToken": "BATCH-SECRET-3"},
            },
        ).json()
        deadline = time.monotonic() + 240
        while livy.http.get(f"/batches/{batch['id']}").json()["state"] not in ("success", "dead"):
            assert time.monotonic() < deadline
            time.sleep(0.5)
        batch_log = livy.http.get(f"/batches/{batch['id']}/log", params={"size": -1}).json()["log"]
        assert any("BATCH RESULT 10" in line for line in batch_log), batch_log
        # The conf reaches spark-submit in a private properties file, not on its command line (`ps` shows
        # command lines to every user); the log shows it redacted.
        submit = next(line for line in batch_log if "spark-submit --master" in line)
        assert "--properties-file" in submit and "--conf" not in submit
        conf_line = next(line for line in batch_log if "with conf " in line)
        assert "spark.hadoop.fs.s3a.secret.key=*********(redacted)" in conf_line and "spark.myapp.apiToken=*********(redacted)" in conf_line
        assert "spark.eventLog.dir=" in conf_line  # the rest as it is

        shown = json.dumps([livy.session(session["id"]), livy.http.get("/sessions").json(), livy.http.get("/batches").json()])
        shown += json.dumps(livy.log(session["id"], size=-1)) + json.dumps(batch_log)
        on_disk = "".join(p.read_text(errors="replace") for p in (service.state_dir / "logs").glob("*.log"))
        on_disk += service.log_path.read_text(errors="replace")
        for secret in ("SESSION-SECRET-1", "BATCH-SECRET-2", "BATCH-SECRET-3"):
            assert secret not in shown and secret not in on_disk, secret
        # While the session lives: its Arrow result, the batch's event log and everything else is private.
        assert list((service.state_dir / "work").rglob("*.arrow")) and list((service.state_dir / "events").rglob("*"))
        assert loose(service.state_dir) == []
        livy.http.delete(f"/sessions/{session['id']}")
    finally:
        livy.close()


def test_an_execution_runs_and_every_state_file_is_private(studio, api, service):
    notebook = new_notebook(cells=[new_code_cell("%%local\nprint('ran locally')")])
    notebook.metadata["kernelspec"] = {"name": "pyspark", "display_name": "PySpark", "language": "python"}
    nbformat.write(notebook, studio.root / "shadowed" / "local.ipynb")  # beside the hostile modules
    response = api.http.post("/api/executions", json={"workspace": "shadowed", "notebook": "local.ipynb", "compute": "local"})
    assert response.status_code == 201, response.text
    deadline = time.monotonic() + 240
    while (execution := api.http.get(f"/api/executions/{response.json()['id']}").json())["status"] not in ("FINISHED", "FAILED"):
        assert time.monotonic() < deadline, execution
        time.sleep(0.5)
    assert execution["status"] == "FINISHED", execution["last_state_change_reason"]

    # Everything the servers, their workers, the batch's JVM, JupyterLab and the run wrote is private.
    assert (studio.state_dir / "studio.db").exists() and list((studio.state_dir / "executions").rglob("*.ipynb"))
    assert loose(studio.state_dir) == []
    assert loose(service.state_dir) == []


def seed_loose_state(state: Path, outside: Path) -> None:
    """A state directory as an older version (or a careless copy) left it, with a link to a file elsewhere."""
    (state / "logs").mkdir(parents=True)
    os.chmod(state, 0o755)
    os.chmod(state / "logs", 0o777)
    (state / "logs" / "old.log").write_text("from an older version\n")
    os.chmod(state / "logs" / "old.log", 0o644)
    (state / "link").symlink_to(outside)  # a link is not followed: its target keeps its mode


def test_loose_modes_found_at_start_are_fixed_and_logged(folder):
    folder.mkdir(parents=True, exist_ok=True)
    outside = folder / "not-ours.txt"
    outside.write_text("a file elsewhere")
    os.chmod(outside, 0o644)
    seed_loose_state(folder / "loose-livy", outside)
    seed_loose_state(folder / "loose-serve" / "state", outside)
    service = ServiceProcess(folder / "loose-livy", env={"STUDIO_POOL_SIZE": "0"}).start()
    studio = StudioProcess(folder / "loose-serve", pool=0).start()
    try:
        for state, log in ((service.state_dir, service.log_path), (studio.state_dir, studio.log_path)):
            assert loose(state) == [], state
            assert stat.S_IMODE((state / "logs" / "old.log").stat().st_mode) == 0o600
            text = log.read_text()
            assert "took group and other permissions away" in text and "old.log (0644 -> 0600)" in text, text[-2000:]
        assert stat.S_IMODE(outside.stat().st_mode) == 0o644
    finally:
        assert studio.stop() == 0
        assert service.stop() == 0
