"""studio.launcher: one way to start a studio server as a child and learn that it listens, from
its ready file (JSON, 0600, atomic), never from its console; a timeout; dying with the parent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from helpers import REPO, TEST_TOKEN, auth_headers
from studio.errors import ServiceStartError
from studio.launcher import ServiceLauncher
from studio.process import ShutdownStep
from workspace_helpers import alive, wait_gone

ENV = {**os.environ, "STUDIO_TOKEN": TEST_TOKEN, "STUDIO_CDS": "false", "STUDIO_POOL_SIZE": "0"}


def test_ready_file_names_the_url_and_pid_and_goes_with_the_server(tmp_path):
    ready = tmp_path / "ready.json"
    ready.write_text(json.dumps({"url": "http://127.0.0.1:1", "pid": 1}))  # an earlier server's: not believed
    launcher = ServiceLauncher(
        "livy", ["--port", "0", "--state-dir", str(tmp_path / "state")], ready_file=ready, log_path=tmp_path / "log", env=ENV
    )
    url = launcher.start_sync(timeout=60)
    try:
        info = json.loads(ready.read_text())
        assert info["url"] == url and info["pid"] == launcher.pid and info["service"] == "livy"
        assert ready.stat().st_mode & 0o777 == 0o600 and TEST_TOKEN not in ready.read_text()
        assert httpx.get(f"{url}/sessions", headers=auth_headers(), trust_env=False).status_code == 200
        assert "-P" in launcher.process.command[1:3]
    finally:
        assert launcher.stop_sync(timeout=60) is ShutdownStep.SIGTERM
    assert launcher.poll() == 0 and not ready.exists()
    assert f"listening on {url}" in (tmp_path / "log").read_text()  # the line for people is still there


def test_a_server_that_exits_or_hangs_is_a_clear_error(tmp_path):
    refused = ServiceLauncher(
        "livy",
        ["--port", "0", "--host", "0.0.0.0", "--insecure-no-auth", "--state-dir", str(tmp_path / "a")],
        ready_file=tmp_path / "a.json",
        log_path=tmp_path / "a.log",
        env=ENV,
    )
    with pytest.raises(ServiceStartError, match=r"studio livy exited with code 1 before it listened; see .*a\.log"):
        refused.start_sync(timeout=60)
    slow = ServiceLauncher(
        "serve", ["--port", "0", "--state-dir", str(tmp_path / "b")], ready_file=tmp_path / "b.json", log_path=tmp_path / "b.log", env=ENV
    )
    started = time.monotonic()
    with pytest.raises(ServiceStartError, match="did not listen within 0s"):
        slow.start_sync(timeout=0.2)
    assert time.monotonic() - started < 10 and slow.poll() is not None  # killed at the timeout


def test_the_service_dies_with_the_process_that_started_it(tmp_path):
    """Also when that process is killed with SIGKILL and never gets to stop it (`studio serve`'s
    embedded service, the service of a `studio run`)."""
    parent = f"""
import sys, time
from pathlib import Path
from studio.launcher import ServiceLauncher
folder = Path({str(tmp_path)!r})
launcher = ServiceLauncher("livy", ["--port", "0", "--state-dir", str(folder / "state")],
                           ready_file=folder / "ready.json", log_path=folder / "log")
launcher.start_sync(60)
print(launcher.pid, flush=True)
time.sleep(600)
"""
    process = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True, env=ENV, cwd=REPO)
    try:
        assert process.stdout is not None
        pid = int(process.stdout.readline() or 0)
        assert pid and alive(pid), (tmp_path / "log").read_text()
    finally:
        process.kill()
        process.wait()
        process.stdout.close()  # type: ignore[union-attr]
    assert wait_gone(pid, 60), "the service outlived the process that started it"
    assert "Traceback" not in (tmp_path / "log").read_text()
