"""Test helpers: a real `studio livy` process on a loopback port, and a small Livy client on httpx."""

from __future__ import annotations

import os
import secrets
import signal
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import psutil

from studio.errors import ServiceStartError
from studio.launcher import ServiceLauncher
from studio.process import ChildProcess

REPO = Path(__file__).resolve().parents[1]

# Where every test service finds the class-data archive (AppCDS) of its drivers: one for the whole
# suite, kept between runs in the repository's .cache (git ignores it). It halves a cold driver's
# start, in CPU as in wall time, and the suite starts well over a hundred drivers on 2 cores;
# conftest's class_data_archive builds it at the start of a run that has none yet.
CACHE_DIR = REPO / ".cache" / "tests"

# JVM options of every test service's drivers (STUDIO_JAVA_OPTIONS): the C1 compiler only. A test's
# driver lives seconds to minutes and runs tiny jobs; C2's compiler threads cost a cold driver about
# half its start's CPU (12 s instead of 24 s here, with the archive), which on 2 cores the other
# tests wait for. Nothing here times a driver's peak speed; the service's own default is the JVM's.
DRIVER_JAVA_OPTIONS = "-XX:TieredStopAtLevel=1"

# The secret every test session service is started with (STUDIO_TOKEN); clients send it as a
# Bearer token. Tests of the other ways in (Basic, cookies, a generated token) use it explicitly.
TEST_TOKEN = secrets.token_urlsafe(24)


def auth_headers(token: str = TEST_TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def processes_under(folder: Path) -> list[tuple[int, str]]:
    """(pid, command) of every live process whose working directory is inside ``folder``."""
    found = []
    folder_text = str(folder.resolve())
    for process in psutil.process_iter(["cwd", "cmdline", "status"]):
        if process.pid == os.getpid() or process.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        cwd = process.info["cwd"]
        if cwd and (cwd == folder_text or cwd.startswith(folder_text + os.sep)):
            found.append((process.pid, " ".join(process.info["cmdline"] or [])[:200]))
    return found


class ServiceProcess:
    """`python -m studio livy --port 0` with settings from STUDIO_* variables, started by the
    studio's own launcher (readiness from its ready file); it dies with the test process."""

    def __init__(
        self, state_dir: Path, env: dict[str, str] | None = None, args: list[str] | None = None, cwd: Path | None = None
    ) -> None:
        self.state_dir = state_dir
        self.cwd = cwd or REPO
        self.env = {
            **os.environ,
            "STUDIO_CDS": "true",
            "STUDIO_CACHE_DIR": str(CACHE_DIR),
            "STUDIO_JAVA_OPTIONS": DRIVER_JAVA_OPTIONS,
            "STUDIO_TOKEN": TEST_TOKEN,
            # A test's service stops what it started; tests of restarts keep sessions with "false".
            "STUDIO_STOP_SESSIONS_ON_EXIT": "true",
            **(env or {}),
        }
        self.args = args or []
        self.launcher: ServiceLauncher | None = None
        self.url = ""

    @property
    def log_path(self) -> Path:
        return self.state_dir / "service.log"

    @property
    def process(self) -> ChildProcess | None:
        return self.launcher.process if self.launcher is not None else None

    def start(self, timeout: float = 60.0) -> "ServiceProcess":
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.launcher = ServiceLauncher(
            "livy",
            ["--port", "0", "--state-dir", str(self.state_dir), *self.args],
            ready_file=self.state_dir / "ready.json",
            log_path=self.log_path,
            env=self.env,
            cwd=self.cwd,
        )
        try:
            self.url = self.launcher.start_sync(timeout)
        except ServiceStartError as exc:
            raise RuntimeError(f"{exc.msg}\nlog:\n{self.log_path.read_text()[-5000:]}") from None
        return self

    def stop(self, timeout: float = 90.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; the exit code."""
        assert self.launcher is not None
        self.launcher.stop_sync(timeout=timeout)
        return self.launcher.process.poll()  # type: ignore[return-value]

    def restart(self, sig: int = signal.SIGTERM, timeout: float = 60.0, between: Callable[[], None] | None = None) -> float:
        """Stop the service with ``sig`` (SIGTERM: it lets go of its sessions; SIGKILL: it just dies)
        and start it again on the same port and state folder (after ``between``, if given). Returns
        the seconds from the new process's start until it listened."""
        assert self.launcher is not None
        port = httpx.URL(self.url).port
        if sig == signal.SIGTERM:
            self.launcher.stop_sync(timeout=90)
        else:
            self.launcher.process.send_signal(sig)
            assert self.launcher.process.wait_sync(30) is not None, "the service did not die"
        if between is not None:
            between()
        self.args = [*self.args, "--port", str(port)]  # after --port 0, so it wins
        started = time.monotonic()
        self.start(timeout)
        return time.monotonic() - started

    def leftovers(self) -> list[tuple[int, str]]:
        return processes_under(self.state_dir)

    @property
    def token(self) -> str:
        return self.env["STUDIO_TOKEN"]

    def client(self) -> "LivyClient":
        return LivyClient(self.url, self.token)

    def http(self, timeout: float = 30) -> httpx.Client:
        """An httpx client that authenticates to this service."""
        return httpx.Client(base_url=self.url, timeout=timeout, headers=auth_headers(self.token), trust_env=False)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        """One authenticated GET (``path`` relative to the service, or a full URL on it)."""
        url = path if path.startswith("http") else self.url + path
        return httpx.get(url, headers=auth_headers(self.token), timeout=kwargs.pop("timeout", 30), trust_env=False, **kwargs)

    def wait_pool(self, ready: int, timeout: float = 240.0) -> None:
        with self.http(timeout=10) as http:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                pool = http.get("/studio/status").json()["pool"]
                if pool["ready"] >= ready:
                    return
                if pool["failuresInARow"] >= 3:  # the service gives up soon; say why now, not at the timeout
                    break
                time.sleep(0.5)
        raise AssertionError(
            f"warm pool did not reach {ready} ready workers; log:\n{self.log_path.read_text()[-3000:]}\n"
            f"last worker log:\n{self.last_worker_log()}"
        )

    def last_worker_log(self) -> str:
        logs = sorted((self.state_dir / "logs").glob("worker-*.log"), key=lambda p: p.stat().st_mtime)
        return logs[-1].read_text(errors="replace")[-3000:] if logs else "(none)"


class LivyClient:
    """Just enough of a Livy client for tests, speaking plain HTTP like any client would."""

    def __init__(self, url: str, token: str = TEST_TOKEN) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=120, headers=auth_headers(token), trust_env=False)

    def close(self) -> None:
        self.http.close()

    def create_session(self, expect: int = 201, **body: Any) -> dict[str, Any]:
        response = self.http.post("/sessions", json=body)
        assert response.status_code == expect, response.text
        return response.json()

    def session(self, session_id: int | str) -> dict[str, Any]:
        response = self.http.get(f"/sessions/{session_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def wait_session(self, session_id: int | str, states: tuple[str, ...] = ("idle",), timeout: float = 240.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            session = self.session(session_id)
            if session["state"] in states:
                return session
            if time.monotonic() > deadline:
                raise AssertionError(f"session {session_id} is {session['state']}, not {states}: {session['log']}")
            time.sleep(0.2)

    def submit(self, session_id: int | str, code: str, kind: str | None = None, expect: int = 201) -> dict[str, Any]:
        body: dict[str, Any] = {"code": code}
        if kind is not None:
            body["kind"] = kind
        response = self.http.post(f"/sessions/{session_id}/statements", json=body)
        assert response.status_code == expect, response.text
        return response.json()

    def wait_statement(self, session_id: int | str, statement_id: int, timeout: float = 300.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            response = self.http.get(f"/sessions/{session_id}/statements/{statement_id}", params={"wait": 10})
            assert response.status_code == 200, response.text
            statement = response.json()
            if statement["state"] in ("available", "cancelled"):
                return statement
            if time.monotonic() > deadline:
                raise AssertionError(f"statement {statement_id} still {statement['state']}")

    def run(self, session_id: int | str, code: str, kind: str | None = None, timeout: float = 300.0) -> dict[str, Any]:
        statement = self.submit(session_id, code, kind)
        return self.wait_statement(session_id, statement["id"], timeout)

    def text(self, session_id: int | str, code: str, kind: str | None = None) -> str:
        """Run code that must succeed; its text/plain."""
        output = self.run(session_id, code, kind)["output"]
        assert output["status"] == "ok", output
        return output["data"]["text/plain"]

    def log(self, session_id: int | str, **params: Any) -> dict[str, Any]:
        response = self.http.get(f"/sessions/{session_id}/log", params=params)
        assert response.status_code == 200, response.text
        return response.json()


def build_wheel(folder: Path, name: str = "hello_spark", version: str = "0.1.0", requires: tuple[str, ...] = ()) -> Path:
    """A tiny pure-Python wheel, made without network or build tools (``requires``: its Requires-Dist)."""
    import base64
    import hashlib
    import zipfile

    files = {
        f"{name}/__init__.py": f'def greet(who):\n    return f"hello {{who}} from {name} {version}"\n',
        f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        + "".join(f"Requires-Dist: {r}\n" for r in requires),
        f"{name}-{version}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [
        f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},{len(text.encode())}"
        for path, text in files.items()
    ]
    files[f"{name}-{version}.dist-info/RECORD"] = "\n".join(record + [f"{name}-{version}.dist-info/RECORD,,"]) + "\n"
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel
