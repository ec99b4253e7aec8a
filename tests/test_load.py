"""Load and faults (issue 11): ten sessions with a client each and two PySpark kernels running a
notebook, all at once, with every statement's answer checked and the service's books read back
(0 lost, 0 repeated); then, under that load, a worker killed, the service killed and started
again, clients that hang up mid-long-poll, and a state disk that fills up and empties again.

Real service, real workers, real Spark, real kernels. The work and what counts as correct are
``studio.load``'s, shared with ``studio bench --load`` (which is the full 10 x 100 + 4 kernels and
reports the timings; this module asserts correctness only, never a time).

The service's state directory is a small tmpfs of its own (mounted here; that needs root), so the
disk-full test can fill it; without root the folder is a plain one and that test is skipped.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from helpers import ServiceProcess
from kernelhelpers import Kernel
from studio.load import KernelNotebook, LoadStatement, SessionLoad, in_thread, ledger, statements_for, tally

SESSIONS = 10
STATEMENTS = 30
KERNELS = 2
DISK_MB = 64

ENV = {
    "STUDIO_POOL_SIZE": "0",  # cold sessions, started side by side (a pool of 10 would start one at a time)
    "STUDIO_STOP_SESSIONS_ON_EXIT": "false",  # the service is killed and started again on its sessions
    "STUDIO_WORKER_START_TIMEOUT": "900",  # 12 JVMs start at once on 2 cores
    "STUDIO_WORKER_ORPHAN_TIMEOUT": "300",
    "STUDIO_MAX_SESSIONS": "20",
    "STUDIO_CULL_INTERVAL": "1",  # also how soon records a full disk held back are written once it has room
    "STUDIO_RETAINED_STATEMENTS": "1000",  # the books read every statement back
}


@pytest.fixture(scope="module")
def state_dir(test_root) -> Iterator[tuple[Path, bool]]:
    """The service's state folder, on a tmpfs of DISK_MB of its own when this process may mount one."""
    folder = test_root / "load"
    folder.mkdir()
    mounted = False
    if os.geteuid() == 0:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m,mode=0700", "tmpfs", str(folder)], capture_output=True, text=True
        )
        mounted = done.returncode == 0
    yield folder, mounted
    if mounted:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], check=True)


class Books:
    """The module's load: the sessions, the kernels, and every statement sent to each session."""

    def __init__(self, service: ServiceProcess, session_ids: list[int], kernels: list[Kernel]) -> None:
        self.service = service
        self.session_ids = session_ids
        self.kernels = kernels
        self.sent: dict[int, list[LoadStatement]] = {sid: [] for sid in session_ids}
        self.dead: set[int] = set()

    @property
    def live(self) -> list[int]:
        return [sid for sid in self.session_ids if sid not in self.dead]

    def batch(self, sid: int, count: int) -> list[LoadStatement]:
        statements = statements_for(sid, count, first=len(self.sent[sid]))
        self.sent[sid] += statements
        return statements

    def run(
        self,
        count: int,
        *,
        sessions: list[int] | None = None,
        notebooks: int = 0,
        during: Callable[[dict[int, SessionLoad]], None] | None = None,
        **options: Any,
    ) -> tuple[dict[int, SessionLoad], list[KernelNotebook]]:
        """``count`` statements on each session (each its own client and thread), ``notebooks`` runs of
        the notebook on each kernel, all at once; ``during(loads)`` runs on this thread meanwhile."""
        loads = {}
        clients = []
        for sid in sessions if sessions is not None else self.live:
            http = self.service.http(timeout=120)
            clients.append(http)
            loads[sid] = SessionLoad(http, sid, self.batch(sid, count), **options)
        books = [KernelNotebook(k.client, n, runs=notebooks) for n, k in enumerate(self.kernels)] if notebooks else []
        threads = [threading.Thread(target=load.run) for load in loads.values()]
        threads += [threading.Thread(target=in_thread(book.run)) for book in books]
        for thread in threads:
            thread.start()
        try:
            if during is not None:
                during(loads)
        finally:
            for thread in threads:
                thread.join(900)
            for http in clients:
                http.close()
        assert not any(thread.is_alive() for thread in threads), "a client is still running after 900 s"
        for load in loads.values():
            assert load.error is None, f"session {load.session_id}'s client stopped: {load.error!r}"
        return loads, books

    def check(self, sessions: list[int] | None = None) -> None:
        """Every session's books against the service's: each accepted statement listed once, final."""
        with self.service.http() as http:
            problems = [p for sid in sessions or self.session_ids for p in ledger(http, sid, self.sent[sid])]
        assert not problems, "\n".join(problems[:20])

    def states(self) -> dict[int, str]:
        with self.service.http() as http:
            return {s["id"]: s["state"] for s in http.get("/sessions", params={"size": 1000}).json()["sessions"]}


def wrong(statements: list[LoadStatement], allowed: tuple[str, ...] = ("ok",)) -> list[str]:
    return [s.describe() for s in statements if s.outcome not in allowed]


def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def answered(loads: dict[int, SessionLoad]) -> int:
    return sum(1 for load in loads.values() for s in load.statements if s.final is not None)


@pytest.fixture(scope="module")
def books(state_dir, tmp_path_factory) -> Iterator[Books]:
    """The service on the small disk, SESSIONS sessions and KERNELS kernels whose sessions started
    side by side (the kernels' with their first notebook run)."""
    folder, _ = state_dir
    service = ServiceProcess(folder, env=ENV).start()
    kernels: list[Kernel] = []
    ids: list[int] = []
    try:
        with service.http() as http:
            for _ in range(SESSIONS):
                response = http.post("/sessions", json={"kind": "pyspark"})
                assert response.status_code == 201, response.text
                ids.append(response.json()["id"])
        for n in range(KERNELS):
            kernels.append(Kernel(tmp_path_factory.mktemp(f"kernel{n}"), {"STUDIO_LIVY_URL": service.url}))
        first = [KernelNotebook(k.client, n) for n, k in enumerate(kernels)]
        threads = [threading.Thread(target=in_thread(book.run)) for book in first]
        for thread in threads:
            thread.start()
        livy = service.client()
        try:
            for sid in ids:
                livy.wait_session(sid, timeout=900)
        finally:
            livy.close()
        for thread in threads:
            thread.join(900)
        assert not [p for book in first for p in book.problems()]
        yield Books(service, ids, kernels)
    finally:
        for kernel in kernels:
            kernel.shutdown()  # deletes its session
        with service.http(timeout=120) as http:
            for sid in ids:
                http.delete(f"/sessions/{sid}")
        assert service.stop() == 0
        shutil.copy(service.log_path, folder.parent / "load-service.log")  # the small disk goes with the module
    assert not service.leftovers()


def test_ten_sessions_and_two_kernels_at_once_lose_nothing(books):
    loads, notebooks = books.run(STATEMENTS, notebooks=2)
    statements = [s for load in loads.values() for s in load.statements]
    assert len(statements) == SESSIONS * STATEMENTS
    assert not wrong(statements), "\n".join(wrong(statements)[:20])
    assert not [p for book in notebooks for p in book.problems()]
    assert len([r for book in notebooks for r in book.results]) == KERNELS * 2 * 5
    books.check()
    assert set(books.states().values()) == {"idle"}  # none died; the kernels' too
    print(f"\nload: {tally(statements)}, kernel cells: {sum(len(b.results) for b in notebooks)}")


def _worker_pid(service: ServiceProcess, sid: int) -> tuple[int, int]:
    """The pid and process group of a session's worker, from the service's own records."""
    with contextlib.closing(sqlite3.connect(f"file:{service.state_dir / 'studio.db'}?mode=ro", uri=True)) as db:
        (record,) = db.execute("SELECT process FROM workers WHERE session_id = ? AND ended_at IS NULL", (sid,)).fetchone()
    process = json.loads(record)["process"]
    return int(process["pid"]), int(process["pgid"])


def test_sigkill_of_one_worker_ends_only_its_session(books):
    victim = books.live[-1]
    pid, pgid = _worker_pid(books.service, victim)

    def kill_when_busy(loads: dict[int, SessionLoad]) -> None:
        until(lambda: sum(s.final is not None for s in loads[victim].statements) >= 5, 300, "the victim's first answers")
        os.kill(pid, signal.SIGKILL)

    loads, notebooks = books.run(20, notebooks=1, during=kill_when_busy)
    books.dead.add(victim)
    hit = loads.pop(victim).statements
    # The victim: answers up to the kill, then clearly failed or refused, never a wrong or lost one.
    assert not wrong(hit, allowed=("ok", "failed", "refused")), "\n".join(wrong(hit))
    refused = [s for s in hit if s.refused is not None and not s.refused.startswith("not sent")]
    assert len(refused) <= 1 and all(s.refused.startswith("400 ") and "dead" in s.refused for s in refused), refused
    assert any(s.outcome != "ok" for s in hit)
    described = books.service.get(f"/studio/sessions/{victim}").json()
    assert described["state"] == "dead"
    assert "killed by SIGKILL" in described["reason"], described
    # Everyone else: every answer right, as if nothing happened.
    others = [s for load in loads.values() for s in load.statements]
    assert not wrong(others), "\n".join(wrong(others)[:20])
    assert not [p for book in notebooks for p in book.problems()]
    books.check()
    states = books.states()
    assert states.pop(victim) == "dead" and set(states.values()) == {"idle"}
    # Nothing of the dead worker is left (its JVM went with it).
    until(lambda: not [p for p in psutil.process_iter() if _pgid(p) == pgid], 30, "the dead worker's process group to go")


def _pgid(process: psutil.Process) -> int | None:
    try:
        return os.getpgid(process.pid)
    except OSError:
        return None


def test_sigkill_of_the_service_loses_no_accepted_statement(books):
    """Clients send every call again while the service is down (the same submit, the same
    Idempotency-Key); the kernels reconnect by themselves. After the restart every statement is
    answered, exactly once."""

    def kill_midway(loads: dict[int, SessionLoad]) -> None:
        until(lambda: answered(loads) >= len(loads) * 5, 300, "the load to be under way")
        books.service.restart(signal.SIGKILL)

    loads, notebooks = books.run(20, notebooks=1, reconnect_for=300, during=kill_midway)
    statements = [s for load in loads.values() for s in load.statements]
    assert not wrong(statements), "\n".join(wrong(statements)[:20])
    assert sum(s.retries for s in statements) > 0  # the kill really hit the load
    assert not [p for book in notebooks for p in book.problems()]
    # A session that was dead before the restart is no longer listed after it (its record says why).
    books.check(books.live)
    assert set(books.states().values()) == {"idle"}


def _hang_up_raw(url: str, token: str, path: str) -> None:
    """A long-poll whose client goes away without a goodbye (a reset, as a killed client's kernel sends)."""
    address = httpx.URL(url)
    sock = socket.create_connection((address.host, address.port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
    time.sleep(0.3)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST on close
    sock.close()


def test_clients_that_hang_up_mid_long_poll_change_nothing(books):
    """Under the load, on two sessions: long-polls whose clients time out or vanish; the statements
    finish, a later GET has their output, and a submit sent again with its key is the same one."""
    slow, other = books.live[0], books.live[1]
    code = "import time\ntime.sleep(3)\n'slept {n}'"
    hung: list[tuple[int, int, str]] = []

    def hang_up(loads: dict[int, SessionLoad]) -> None:
        with books.service.http(timeout=0.5) as impatient:
            for n, sid in enumerate((slow, other)):
                key = f"hang-up-{sid}-{n}"
                body = {"code": code.format(n=n)}
                with pytest.raises(httpx.ReadTimeout):  # the POST itself waits, and its client leaves
                    impatient.post(f"/sessions/{sid}/statements", params={"wait": 30}, json=body, headers={"Idempotency-Key": key})
                with books.service.http() as http:
                    again = http.post(f"/sessions/{sid}/statements", json=body, headers={"Idempotency-Key": key})
                assert again.status_code == 201
                statement_id = again.json()["id"]
                hung.append((sid, statement_id, f"'slept {n}'"))
                with pytest.raises(httpx.ReadTimeout):  # and a GET that waits, whose client leaves too
                    impatient.get(f"/sessions/{sid}/statements/{statement_id}", params={"wait": 30})
                _hang_up_raw(books.service.url, books.service.token, f"/sessions/{sid}/statements/{statement_id}?wait=30")
                assert books.service.get("/version").status_code == 200

    loads, _ = books.run(10, sessions=[s for s in books.live if s not in (slow, other)], during=hang_up)
    statements = [s for load in loads.values() for s in load.statements]
    assert not wrong(statements), "\n".join(wrong(statements)[:20])
    with books.service.http() as http:
        for sid, statement_id, text in hung:
            done = http.get(f"/sessions/{sid}/statements/{statement_id}", params={"wait": 60}).json()
            assert done["state"] == "available" and done["output"]["data"]["text/plain"] == text, done
            codes = [s["code"] for s in http.get(f"/sessions/{sid}/statements").json()["statements"]]
            assert codes.count(done["code"]) == 1  # sent twice with one key: run once
    books.check(books.live)
    assert "Traceback" not in books.service.log_path.read_text()


def _fill(folder: Path) -> Path:
    """Fill the filesystem of ``folder`` to the last byte."""
    filler = folder / "filler"
    chunk = b"\0" * (1 << 20)
    with open(filler, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(chunk)
        except OSError:
            pass
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


def test_a_full_state_disk_refuses_clearly_and_recovers(books, state_dir):
    folder, mounted = state_dir
    if not mounted:
        pytest.skip("needs a small filesystem of its own for the state folder (a tmpfs, mounted as root)")
    service = books.service
    filler = _fill(folder)
    try:
        # While the disk is full: statements are refused with a clear 507 (nothing accepted that
        # is not on record), or accepted and answered; reads go on.
        loads, _ = books.run(15, go_on_when_refused=True)
        statements = [s for load in loads.values() for s in load.statements]
        assert not wrong(statements, allowed=("ok", "refused")), "\n".join(wrong(statements, allowed=("ok", "refused"))[:20])
        refused = [s.refused for s in statements if s.refused is not None]
        assert refused, "nothing was refused on a full disk"
        assert all(r.startswith("507 ") and "disk is full" in r for r in refused), refused[:5]
        with service.http() as http:
            created = http.post("/sessions", json={"kind": "pyspark"})
            assert created.status_code == 507 and "disk is full" in created.json()["msg"], created.text
            assert http.get("/sessions").status_code == 200
            assert http.get(f"/sessions/{books.live[0]}/statements").status_code == 200
    finally:
        filler.unlink()
    # Room again: everything is accepted and answered, and what the full disk held back is on record.
    loads, _ = books.run(10)
    statements = [s for load in loads.values() for s in load.statements]
    assert not wrong(statements), "\n".join(wrong(statements)[:20])
    with contextlib.closing(sqlite3.connect(f"file:{folder / 'studio.db'}?mode=ro", uri=True)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    books.check(books.live)
    # And a restart reads every statement back from the store, answers and all.
    service.restart(signal.SIGKILL)
    books.check(books.live)
    assert set(books.states().values()) == {"idle"}
    assert "Traceback" not in service.log_path.read_text()
