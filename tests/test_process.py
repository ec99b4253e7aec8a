"""studio.process: the one model of child processes, with small real child programs (no mocks):
the stop escalation step by step, process groups and descendants in sessions of their own,
adoption by a later parent, refusal of a reused pid, and dying with the parent."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

from studio.process import (
    ChildProcess,
    ProcessRecord,
    ShutdownStep,
    describe_exit,
    group_members,
    python_command,
    run_to_end,
)

# Children that say when they are ready (a line in a file) so that no test races their start.
IGNORES_SIGTERM = """
import signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(sys.argv[1], "w").write("ready")
while True:
    time.sleep(1)
"""
STOPS_ON_SIGUSR1 = """
import signal, sys, time
signal.signal(signal.SIGUSR1, lambda *_: sys.exit(0))
signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(sys.argv[1], "w").write("ready")
while True:
    time.sleep(1)
"""
SLEEPS = """
import sys, time
open(sys.argv[1], "w").write("ready")
time.sleep(600)
"""
# Leaves a grandchild that ignores SIGTERM: in the child's own group, or (with "session") in a
# session of its own, as Jupyter starts its kernels. The grandchild's pid goes into the file.
LEAVES_GRANDCHILD = """
import subprocess, sys, time
code = "import signal, time\\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\\ntime.sleep(600)"
grandchild = subprocess.Popen([sys.executable, "-c", code], start_new_session=sys.argv[2] == "session")
open(sys.argv[1], "w").write(str(grandchild.pid))
time.sleep(600)
"""


def script(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code), *args]


def wait_for(path: Path, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return path.read_text()
        time.sleep(0.02)
    raise AssertionError(f"{path} was never written")


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_child_that_exits_at_once(tmp_path):
    child = ChildProcess(script("import sys; print('hello'); sys.exit(3)"), output=tmp_path / "out.log")
    child.start()
    assert child.pgid == child.pid and os.getpgid(child.pid) == child.pid or child.poll() is not None
    assert asyncio.run(child.wait()) == 3
    assert child.poll() == 3 and describe_exit(3) == "exited with code 3"
    assert (tmp_path / "out.log").read_text() == "hello\n"
    assert asyncio.run(child.stop()) is ShutdownStep.ALREADY_GONE
    assert describe_exit(-9).startswith("was killed by SIGKILL")


def test_python_children_start_with_dash_p():
    assert python_command("studio", "livy") == [sys.executable, "-P", "-m", "studio", "livy"]


def test_polite_then_sigterm_then_sigkill(tmp_path):
    async def scenario() -> None:
        # A polite step that works: the child ends on SIGUSR1, which the caller's step sends.
        polite = ChildProcess(script(STOPS_ON_SIGUSR1, str(tmp_path / "a")), stop_timeout=5)
        polite.start()
        wait_for(tmp_path / "a")

        async def ask() -> None:
            polite.send_signal(signal.SIGUSR1)

        assert await polite.stop(polite=ask) is ShutdownStep.POLITE
        assert polite.shutdown_step is ShutdownStep.POLITE and polite.poll() == 0

        # No polite step: SIGTERM does it.
        sleeper = ChildProcess(script(SLEEPS, str(tmp_path / "b")), stop_timeout=5)
        sleeper.start()
        wait_for(tmp_path / "b")
        assert await sleeper.stop() is ShutdownStep.SIGTERM
        assert sleeper.poll() == -signal.SIGTERM

        # A child that ignores SIGTERM, and a polite step that fails at once: SIGKILL after one
        # timeout (the failed step costs no wait of its own).
        stubborn = ChildProcess(script(IGNORES_SIGTERM, str(tmp_path / "c")), stop_timeout=0.5)
        stubborn.start()
        wait_for(tmp_path / "c")

        async def broken() -> None:
            raise ConnectionError("the worker's socket is closed")

        started = time.monotonic()
        assert await stubborn.stop(polite=broken) is ShutdownStep.SIGKILL
        assert time.monotonic() - started < 3
        assert stubborn.poll() == -signal.SIGKILL

        # now=True skips the polite step and SIGTERM.
        quick = ChildProcess(script(SLEEPS, str(tmp_path / "d")), stop_timeout=5)
        quick.start()
        wait_for(tmp_path / "d")
        assert await quick.kill() is ShutdownStep.SIGKILL

    asyncio.run(scenario())


def test_the_group_and_descendants_in_other_sessions_are_stopped(tmp_path):
    async def scenario() -> None:
        # A grandchild in the child's group that ignores SIGTERM: gone when stop returns.
        same = ChildProcess(script(LEAVES_GRANDCHILD, str(tmp_path / "a"), "group"), stop_timeout=0.5)
        same.start()
        grandchild = int(wait_for(tmp_path / "a"))
        assert {p.pid for p in group_members(same.pgid)} >= {same.pid, grandchild}
        assert await same.stop() is ShutdownStep.SIGTERM
        assert gone(grandchild) and not group_members(same.pgid)

        # One in a session of its own: reached only by following descendants.
        kernel_like = ChildProcess(script(LEAVES_GRANDCHILD, str(tmp_path / "b"), "session"), stop_timeout=0.5, descendants=True)
        kernel_like.start()
        grandchild = int(wait_for(tmp_path / "b"))
        assert os.getpgid(grandchild) == grandchild != kernel_like.pgid
        assert await kernel_like.stop() is ShutdownStep.SIGTERM
        assert gone(grandchild)

        # Without descendants=True it is out of reach (which is why JupyterLab's handle asks for them).
        plain = ChildProcess(script(LEAVES_GRANDCHILD, str(tmp_path / "c"), "session"), stop_timeout=0.5)
        plain.start()
        grandchild = int(wait_for(tmp_path / "c"))
        await plain.stop()
        assert not gone(grandchild)
        os.kill(grandchild, signal.SIGKILL)

    asyncio.run(scenario())


def _start_in_another_parent(tmp_path: Path, child_code: str) -> dict:
    """A parent process that starts a child with ChildProcess, prints its record and exits at once."""
    ready = tmp_path / "ready"
    parent = f"""
import json, sys
from studio.process import ChildProcess
child = ChildProcess({[sys.executable, "-c", textwrap.dedent(child_code), str(ready)]!r}, name="orphan")
child.start()
print(json.dumps(child.record.to_json()))
"""
    result = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    wait_for(ready)
    return json.loads(result.stdout)


def test_adoption_after_the_parent_is_gone(tmp_path):
    record = _start_in_another_parent(tmp_path, IGNORES_SIGTERM)
    assert set(record) == {"pid", "create_time", "pgid"}
    assert ProcessRecord.from_json(record) == ProcessRecord(record["pid"], record["create_time"], record["pid"])

    async def scenario() -> None:
        adopted = ChildProcess.adopt(record, name="orphan", stop_timeout=0.5)
        assert adopted is not None and adopted.adopted and adopted.poll() is None
        assert adopted.record is not None and adopted.record.pid == record["pid"]
        # Two waiters at once (a watcher and a stop), neither polling: both learn of the exit.
        watcher = asyncio.ensure_future(adopted.wait())
        await asyncio.sleep(0.2)
        assert not watcher.done()
        assert await adopted.stop() is ShutdownStep.SIGKILL  # it ignores SIGTERM
        assert await asyncio.wait_for(watcher, 5) == 0  # not our child: its exit code is unknown
        assert adopted.poll() == 0 and gone(record["pid"])
        assert ChildProcess.adopt(record) is None  # gone now

    asyncio.run(scenario())


def test_a_reused_pid_is_never_adopted(tmp_path):
    record = _start_in_another_parent(tmp_path, SLEEPS)
    try:
        # The right pid with another create time is another process that got the same pid.
        assert ChildProcess.adopt({**record, "create_time": record["create_time"] - 3600}) is None
        assert ChildProcess.adopt({**record, "create_time": record["create_time"] + 5}) is None
        assert ChildProcess.adopt({"pid": record["pid"]}) is None  # no create time, no adoption
        assert ChildProcess.adopt(None) is None and ChildProcess.adopt({"pid": "x", "create_time": 1}) is None
        same = ChildProcess.adopt(record)
        assert same is not None
        assert same.stop_sync(timeout=5) is ShutdownStep.SIGTERM  # and without an event loop
    finally:
        if not gone(record["pid"]):
            os.kill(record["pid"], signal.SIGKILL)
    assert gone(record["pid"])


def test_a_child_dies_with_its_parent_when_asked(tmp_path):
    """die_with_parent: the child gets SIGTERM when its parent is killed with SIGKILL."""
    ready = tmp_path / "ready"
    parent = f"""
import sys, time
from studio.process import ChildProcess
child = ChildProcess({script(SLEEPS, str(ready))!r}, die_with_parent=True)
child.start()
print(child.pid, flush=True)
time.sleep(600)
"""
    process = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        pid = int(process.stdout.readline())
        wait_for(ready)
        assert psutil.Process(pid).cmdline()[-1] == str(ready), "the wrapper became the command (same pid)"
    finally:
        process.kill()
        process.wait()
        process.stdout.close()  # type: ignore[union-attr]
    deadline = time.monotonic() + 10
    while not gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(pid)


def test_sync_use_without_an_event_loop(tmp_path):
    child = ChildProcess(script(SLEEPS, str(tmp_path / "a")), stop_timeout=5)
    child.start()
    wait_for(tmp_path / "a")
    assert child.wait_sync(0.1) is None
    assert child.send_signal(signal.SIGTERM)
    assert child.wait_sync(10) == -signal.SIGTERM
    assert not child.send_signal(signal.SIGTERM) and not child.signal_group(signal.SIGTERM)
    assert child.stop_sync() is ShutdownStep.ALREADY_GONE


def test_a_short_command_runs_to_its_end_or_is_killed_at_its_timeout(tmp_path):
    done = run_to_end(["sh", "-c", "echo out; echo err >&2"], timeout=10)
    assert done.code == 0 and done.output == "out\n"  # stderr is dropped
    started = time.monotonic()
    hung = run_to_end(script(LEAVES_GRANDCHILD, str(tmp_path / "a"), "group"), timeout=1)
    assert hung.code is None and time.monotonic() - started < 10
    assert gone(int(wait_for(tmp_path / "a")))  # killed with its group


def test_a_jupyterlab_record_of_an_older_version_is_still_adopted(tmp_path):
    """Older versions kept /proc's start ticks (field 22 of /proc/PID/stat) instead of psutil's
    create time; an upgrade must still find the JupyterLabs they started."""
    from studio.workspaces.jupyter import _with_create_time

    child = ChildProcess(script(SLEEPS, str(tmp_path / "a")), stop_timeout=5)
    child.start()
    try:
        wait_for(tmp_path / "a")
        with open(f"/proc/{child.pid}/stat") as handle:  # what the older version stored
            ticks = int(handle.read().rsplit(")", 1)[1].split()[19])
        old = {"pid": child.pid, "start_ticks": ticks, "port": 1, "token": "t"}
        assert ChildProcess.adopt(old) is None  # no create time: not adoptable as it is
        adopted = ChildProcess.adopt(_with_create_time(old))
        assert adopted is not None and adopted.pid == child.pid
        assert ChildProcess.adopt(_with_create_time({**old, "start_ticks": ticks - 1000})) is None
    finally:
        child.stop_sync()
