"""Test helpers for the workspace server: a real `studio serve` process on a loopback port and a
small client for its API, speaking plain HTTP like the Studio's own page does."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil

from helpers import CACHE_DIR, DRIVER_JAVA_OPTIONS, REPO, auth_headers, processes_under
from kernelhelpers import Result
from studio.errors import ServiceStartError
from studio.launcher import ServiceLauncher
from studio.process import ChildProcess


class StudioProcess:
    """`python -m studio serve --port 0` with its own root and state folder.

    Without ``livy_url`` it starts its embedded session service (``--livy-port 0``); ``pool``
    sets that service's warm pool (0: no JVM until a session is created).
    """

    def __init__(
        self,
        folder: Path,
        env: dict[str, str] | None = None,
        livy_url: str | None = None,
        pool: int = 0,
        args: list[str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.folder = folder
        self.cwd = cwd or REPO
        self.root = folder / "root"
        self.state_dir = folder / "state"
        self.env = {
            **os.environ,
            "STUDIO_CDS": "true",
            "STUDIO_CACHE_DIR": str(CACHE_DIR),  # the suite's one class-data archive (helpers.CACHE_DIR)
            "STUDIO_JAVA_OPTIONS": DRIVER_JAVA_OPTIONS,  # C1 only (helpers.DRIVER_JAVA_OPTIONS)
            # Its session service stops what it started; a test of restarts keeps sessions with "false".
            "STUDIO_STOP_SESSIONS_ON_EXIT": "true",
            **(env or {}),
        }
        self.args = list(args or [])
        if livy_url:
            self.args += ["--livy-url", livy_url]
        else:
            self.args += ["--livy-port", "0", "--pool", str(pool)]
        self.launcher: ServiceLauncher | None = None
        self.url = ""

    @property
    def log_path(self) -> Path:
        return self.folder / "serve.log"

    @property
    def process(self) -> ChildProcess | None:
        return self.launcher.process if self.launcher is not None else None

    def start(self, timeout: float = 120.0) -> "StudioProcess":
        """Start it with the studio's own launcher (readiness from its ready file); it dies with the tests."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.launcher = ServiceLauncher(
            "serve",
            ["--port", "0", "--root", str(self.root), "--state-dir", str(self.state_dir), *self.args],
            ready_file=self.folder / "serve.ready.json",
            log_path=self.log_path,
            env=self.env,
            cwd=self.cwd,
        )
        try:
            self.url = self.launcher.start_sync(timeout)
        except ServiceStartError as exc:
            raise RuntimeError(f"{exc.msg}\nlog:\n{self.log_tail()}") from None
        return self

    def stop(self, timeout: float = 120.0) -> int:
        """SIGTERM, as a user's Ctrl-C or a service manager would; its exit code."""
        assert self.launcher is not None
        self.launcher.stop_sync(timeout=timeout)
        return self.launcher.process.poll()  # type: ignore[return-value]

    def crash(self) -> None:
        """SIGKILL to the server alone: it gets no chance to stop anything, and what it started in
        process groups of their own (JupyterLabs, `studio run`s, the session service) stays."""
        assert self.launcher is not None
        self.launcher.process.send_signal(signal.SIGKILL)
        self.launcher.process.wait_sync(30)

    def log_tail(self, size: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-size:]
        except OSError:
            return ""

    def leftovers(self) -> list[tuple[int, str]]:
        return processes_under(self.folder)

    @property
    def token(self) -> str:
        """The token `studio serve` generated at its first start (the one its start-up URL carries)."""
        path = self.state_dir / "token"
        return path.read_text().strip() if path.exists() else ""

    def client(self) -> "StudioClient":
        return StudioClient(self.url, self.token)

    def http(self, timeout: float = 60) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout, headers=auth_headers(self.token), trust_env=False)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        url = path if path.startswith("http") else self.url + path
        return httpx.get(url, headers=auth_headers(self.token), timeout=kwargs.pop("timeout", 30), trust_env=False, **kwargs)

    def wait_warm_pool(self, timeout: float = 300.0) -> None:
        """Until the embedded session service has a warm worker ready."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            local = self.get("/api/computes/local").json()
            if (local.get("status") or {}).get("pool", {}).get("ready", 0) >= 1:
                return
            time.sleep(1)
        raise AssertionError("the embedded session service's warm pool never filled")


@contextmanager
def serving(folder: Path, **kwargs: Any) -> Iterator[StudioProcess]:
    """A started `studio serve` (``kwargs`` as for StudioProcess) for a module's fixture: when the
    module is done it must stop with exit code 0 and leave no process behind in ``folder``."""
    server = StudioProcess(folder, **kwargs).start()
    yield server
    assert server.stop() == 0, server.log_tail()
    left = server.leftovers()
    assert not left, f"processes left behind: {left}"


class StudioClient:
    """Just enough of the workspace API for tests."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=60, trust_env=False, headers=auth_headers(token))

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "StudioClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def create(self, expect: int = 201, **body: Any) -> dict[str, Any]:
        response = self.http.post("/api/workspaces", json=body)
        assert response.status_code == expect, response.text
        return response.json()

    def workspace(self, workspace_id: int | str) -> dict[str, Any]:
        response = self.http.get(f"/api/workspaces/{workspace_id}")
        assert response.status_code == 200, response.text
        return self.with_lab(response.json())

    def workspaces(self) -> list[dict[str, Any]]:
        return [self.with_lab(w) for w in self.http.get("/api/workspaces").json()["workspaces"]]

    def with_lab(self, workspace: dict[str, Any]) -> dict[str, Any]:
        """The workspace with ``lab_url``: where its ``url`` (the Studio's "Open JupyterLab") redirects,
        JupyterLab's address with its token, which no listing shows."""
        workspace["lab_url"] = None
        if workspace.get("url"):
            response = self.http.get(workspace["url"], follow_redirects=False)
            if response.status_code == 303:
                workspace["lab_url"] = response.headers["location"]
        return workspace

    def by_name(self, name: str) -> dict[str, Any]:
        found = [w for w in self.workspaces() if w["name"] == name]
        assert found, f"no workspace named {name}"
        return found[0]

    def action(self, workspace_id: int | str, verb: str, expect: int = 202, **body: Any) -> dict[str, Any]:
        response = self.http.post(f"/api/workspaces/{workspace_id}/{verb}", json=body)
        assert response.status_code == expect, response.text
        return response.json()

    def delete(self, workspace_id: int | str, expect: int = 200, **params: Any) -> dict[str, Any]:
        response = self.http.delete(f"/api/workspaces/{workspace_id}", params={k: str(v).lower() for k, v in params.items()})
        assert response.status_code == expect, response.text
        return response.json()

    def wait_state(
        self, workspace_id: int | str, states: tuple[str, ...], timeout: float = 90.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            workspace = self.workspace(workspace_id)
            if workspace["state"] in states:
                return workspace
            if time.monotonic() > deadline:
                raise AssertionError(f"workspace {workspace_id} is {workspace['state']} ({workspace['reason']}), not {states}")
            time.sleep(0.2)

    def started(self, workspace_id: int | str, timeout: float = 90.0) -> dict[str, Any]:
        """Start and wait until JupyterLab answers (Ready or Attached); fails on Failed."""
        self.action(workspace_id, "start")
        workspace = self.wait_state(workspace_id, ("Ready", "Attached", "Failed"), timeout)
        assert workspace["state"] != "Failed", workspace["reason"]
        return workspace

    def stopped(self, workspace_id: int | str, timeout: float = 90.0) -> dict[str, Any]:
        self.action(workspace_id, "stop")
        return self.wait_state(workspace_id, ("Idle",), timeout)

    def compute(self, name: str) -> dict[str, Any]:
        response = self.http.get(f"/api/computes/{name}")
        assert response.status_code == 200, response.text
        return response.json()


def lab_get(workspace: dict[str, Any], path: str, token: bool = True) -> httpx.Response:
    """GET on a workspace's JupyterLab, with its token (from the workspace's url) or without."""
    base, _, secret = workspace["lab_url"].partition("/lab?token=")
    headers = {"Authorization": f"token {secret}"} if token else {}
    return httpx.get(base + path, headers=headers, timeout=30, trust_env=False)


def lab_post(workspace: dict[str, Any], path: str, body: dict[str, Any]) -> httpx.Response:
    base, _, secret = workspace["lab_url"].partition("/lab?token=")
    return httpx.post(base + path, json=body, headers={"Authorization": f"token {secret}"}, timeout=30, trust_env=False)


class LabKernel:
    """A kernel started in a workspace's JupyterLab and driven through JupyterLab's own API, as the
    browser drives it: REST to start and delete it, its websocket (a new connection for each cell) for
    the messages. It is JupyterLab's kernel: it lives as long as JupyterLab keeps it."""

    def __init__(self, workspace: dict[str, Any], name: str = "pyspark") -> None:
        self.base, _, self.secret = workspace["lab_url"].partition("/lab?token=")
        response = httpx.post(
            f"{self.base}/api/kernels", json={"name": name}, headers=self._auth(), timeout=60, trust_env=False
        )
        assert response.status_code == 201, response.text
        self.id: str = response.json()["id"]

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"token {self.secret}"}

    def run(self, code: str, timeout: float = 300.0, until_busy: bool = False) -> Result:
        """Send ``code`` and collect its iopub messages until the kernel is idle again and its reply has
        come (with ``until_busy``, only until it starts running: the cell goes on without a client)."""
        from websockets.sync.client import connect

        url = self.base.replace("http://", "ws://", 1) + f"/api/kernels/{self.id}/channels"
        msg_id = uuid.uuid4().hex
        header = {"msg_id": msg_id, "msg_type": "execute_request", "session": uuid.uuid4().hex, "username": "test", "version": "5.3"}
        content = {"code": code, "silent": False, "store_history": True, "user_expressions": {}, "allow_stdin": False}
        request = {"header": header, "parent_header": {}, "metadata": {}, "content": content, "channel": "shell", "buffers": []}
        started = time.monotonic()
        outputs: list[dict[str, Any]] = []
        reply: dict[str, Any] | None = None
        idle = False
        with connect(url, additional_headers=self._auth(), open_timeout=30) as socket_:
            socket_.send(json.dumps(request))
            while reply is None or not idle:
                left = timeout - (time.monotonic() - started)
                if left <= 0:
                    raise TimeoutError(f"cell did not finish in {timeout}s: {code[:80]!r}")
                message = json.loads(socket_.recv(timeout=left))
                if message["parent_header"].get("msg_id") != msg_id:
                    continue
                kind = message["msg_type"]
                if kind == "execute_reply":
                    reply = message["content"]
                elif kind == "status":
                    state = message["content"]["execution_state"]
                    if until_busy and state == "busy":
                        return Result({"status": "busy"}, outputs, time.monotonic() - started)
                    idle = state == "idle"
                elif message["channel"] == "iopub":
                    outputs.append({"msg_type": kind, "content": message["content"], "at": time.monotonic() - started})
        return Result(reply, outputs, time.monotonic() - started)

    def ok(self, code: str, **kwargs: Any) -> Result:
        result = self.run(code, **kwargs)
        assert result.status == "ok", result.text()
        return result

    def pid(self, lab_pid: int, timeout: float = 30.0) -> int:
        """The kernel's process: JupyterLab's child (in a session of its own)."""
        deadline = time.monotonic() + timeout
        while True:
            children = psutil.Process(lab_pid).children()
            if children:
                return children[0].pid
            assert time.monotonic() < deadline, f"no kernel process under JupyterLab {lab_pid}"
            time.sleep(0.2)

    def shutdown(self) -> None:
        """DELETE it through JupyterLab (a PySpark kernel deletes its Spark session as it ends)."""
        httpx.delete(f"{self.base}/api/kernels/{self.id}", headers=self._auth(), timeout=60, trust_env=False)


def alive(pid: int) -> bool:
    """The process runs (a zombie counts as gone)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.1)
    return False
