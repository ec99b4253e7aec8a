"""A load of notebooks on the session service, and the books that prove nothing was lost.

``studio bench --load`` times it; ``tests/test_load.py`` runs a smaller one under faults (a worker
killed, the service killed and started again, clients that hang up mid-long-poll, a full state
disk) and checks it. One definition of the work and of "correct" for both.

* ``statements_for(session, count)``: the REST load of one session, a mix as notebooks send it:
  trivial expressions, small Spark jobs (every third), and a failing statement (``n / 0``) every
  tenth. Every statement's code is unique within its session and its expected output known, so a
  lost, repeated or crossed answer shows.
* ``SessionLoad``: one client driving one session as a notebook does: a statement, its answer,
  the next (``POST ?wait=`` then ``GET ?wait=`` until final). Every submit carries an
  ``Idempotency-Key``; with ``reconnect_for`` a call the service does not answer (killed,
  restarting) is sent again, so an accepted statement is never submitted twice.
* ``LoadStatement.outcome``: ``ok`` (accepted, final, the right output), ``failed`` (accepted and
  ended by the service with a reason: its worker died, its session stopped), ``refused`` (not
  accepted, with the service's status and message), and the two that are always bugs:
  ``wrong`` (a final answer that is not this statement's) and ``missing`` (accepted, never final).
* ``ledger``: the service's own list of a session's statements against what its client was told:
  each accepted statement exactly once, no refused one, nothing else.
* ``KernelNotebook``: a PySpark kernel (through jupyter_client) running a small notebook cell by
  cell, each cell's output checked.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import httpx

from studio.livy_client import FINAL_STATEMENT_STATES

# What the service says when it ended a statement itself (its worker or session is gone, or a
# restart lost it): a clear failure, never a wrong answer.
SERVICE_FAILURES = ("SessionWorkerDied", "SessionStopped", "StatementLost", "CancelTimeout")


@dataclass
class LoadStatement:
    """One statement of the load: what is sent, what must come back, and what did."""

    session: int
    index: int
    code: str
    expect: str | None  # text/plain of the right answer; None: it must fail with ZeroDivisionError
    kind: str  # trivial | spark | failing
    key: str = field(default_factory=lambda: uuid.uuid4().hex)  # its Idempotency-Key
    statement_id: int | None = None
    final: dict[str, Any] | None = None
    refused: str | None = None  # "STATUS msg" when the service did not accept it
    seconds: float | None = None  # round trip: from the POST to the final answer
    retries: int = 0  # calls sent again because the service did not answer

    @property
    def outcome(self) -> str:
        if self.refused is not None:
            return "refused"
        if self.final is None:
            return "missing"
        output = self.final.get("output") or {}
        if self.final["state"] == "cancelled" or output.get("ename") in SERVICE_FAILURES:
            return "failed"
        if self.expect is None:
            return "ok" if output.get("status") == "error" and output.get("ename") == "ZeroDivisionError" else "wrong"
        if output.get("status") == "ok" and (output.get("data") or {}).get("text/plain") == self.expect:
            return "ok"
        return "wrong"

    def describe(self) -> str:
        output = (self.final or {}).get("output")
        return (
            f"session {self.session} statement #{self.index} (id {self.statement_id}) {self.code!r}: {self.outcome}"
            f"{' (' + self.refused + ')' if self.refused else ''}; expected {self.expect!r}, got {output!r}"
        )


def statements_for(session_id: int, count: int, first: int = 0) -> list[LoadStatement]:
    """``count`` statements for one session, numbered from ``first`` (a later batch for the same
    session starts where the last ended, so codes stay unique)."""
    statements = []
    for index in range(first, first + count):
        if index % 10 == 9:
            code, expect, kind = f"{index} / 0", None, "failing"
        elif index % 3 == 1:
            n = 1000 + index
            code, expect, kind = f"spark.range({n}).selectExpr('sum(id)').collect()[0][0]", str(n * (n - 1) // 2), "spark"
        else:
            value = session_id * 1_000_000 + index
            code, expect, kind = f"{session_id} * 1000000 + {index}", str(value), "trivial"
        statements.append(LoadStatement(session_id, index, code, expect, kind))
    return statements


class SessionLoad:
    """One client driving one session: each statement submitted, then waited for, then the next.

    ``reconnect_for``: seconds to go on sending a call that got no answer (the service is down or
    restarting), the same submit with the same Idempotency-Key. A refusal (any status but 201)
    ends the run unless ``go_on_when_refused`` (a full disk refuses some and then recovers);
    statements not sent are refused with "not sent"."""

    def __init__(
        self,
        http: httpx.Client,
        session_id: int,
        statements: list[LoadStatement],
        *,
        wait: float = 60.0,
        reconnect_for: float = 0.0,
        go_on_when_refused: bool = False,
        pause: Callable[[LoadStatement], None] | None = None,
    ) -> None:
        self.http = http
        self.session_id = session_id
        self.statements = statements
        self.wait = wait
        self.reconnect_for = reconnect_for
        self.go_on_when_refused = go_on_when_refused
        self.pause = pause  # called before each statement (a test holds the load at a point)
        self.error: BaseException | None = None  # what ended the run early, if anything did

    def run(self) -> None:
        stopped = None
        try:
            for statement in self.statements:
                if stopped is not None:
                    statement.refused = f"not sent: {stopped}"
                    continue
                if self.pause is not None:
                    self.pause(statement)
                self.one(statement)
                if statement.refused is not None and not self.go_on_when_refused:
                    stopped = f"an earlier statement was refused ({statement.refused})"
        except BaseException as exc:  # noqa: BLE001 - kept for the caller; the books show the rest
            self.error = exc

    def one(self, statement: LoadStatement) -> None:
        started = time.perf_counter()
        path = f"/sessions/{self.session_id}/statements"
        response = self._call(
            statement,
            "POST",
            path,
            params={"wait": self.wait},
            json={"code": statement.code},
            headers={"Idempotency-Key": statement.key},
        )
        if response.status_code != 201:
            statement.refused = f"{response.status_code} {_message(response)}"
            return
        answer = response.json()
        statement.statement_id = int(answer["id"])
        while answer["state"] not in FINAL_STATEMENT_STATES:
            response = self._call(statement, "GET", f"{path}/{statement.statement_id}", params={"wait": self.wait})
            if response.status_code != 200:
                raise RuntimeError(f"GET of an accepted statement: {response.status_code} {_message(response)}")
            answer = response.json()
        statement.final = answer
        statement.seconds = time.perf_counter() - started

    def _call(self, statement: LoadStatement, method: str, path: str, **kwargs: Any) -> httpx.Response:
        deadline = None
        while True:
            try:
                return self.http.request(method, path, **kwargs)
            except httpx.TransportError:
                now = time.monotonic()
                deadline = deadline or now + self.reconnect_for
                if now >= deadline:
                    raise
                statement.retries += 1
                time.sleep(0.2)


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json().get("msg"))
    except ValueError:
        return response.text[:200]


def ledger(http: httpx.Client, session_id: int, statements: list[LoadStatement]) -> list[str]:
    """What the service lists for the session against what its client was told: every accepted
    statement there exactly once with the id the client got, final, and none that was refused."""
    response = http.get(f"/sessions/{session_id}/statements", params={"size": 100_000})
    if response.status_code != 200:
        return [f"session {session_id}: its statements cannot be listed: {response.status_code} {_message(response)}"]
    listed: dict[str, list[dict[str, Any]]] = {}
    for item in response.json()["statements"]:
        listed.setdefault(item["code"], []).append(item)
    problems = []
    for statement in statements:
        found = listed.get(statement.code, [])
        if statement.refused is not None:
            if found:
                problems.append(f"refused but listed {len(found)} time(s): {statement.describe()}")
            continue
        if len(found) != 1:
            problems.append(f"listed {len(found)} time(s), not once: {statement.describe()}")
        elif found[0]["id"] != statement.statement_id:
            problems.append(f"listed with id {found[0]['id']}: {statement.describe()}")
        elif found[0]["state"] not in FINAL_STATEMENT_STATES:
            problems.append(f"listed as {found[0]['state']}: {statement.describe()}")
    return problems


def tally(statements: list[LoadStatement]) -> dict[str, int]:
    counts = {"ok": 0, "failed": 0, "refused": 0, "wrong": 0, "missing": 0}
    for statement in statements:
        counts[statement.outcome] += 1
    return counts


# -- kernels -------------------------------------------------------------------------------------


@dataclass
class Cell:
    code: str
    expect: str | None  # text the cell's output must contain; None: it must fail with ZeroDivisionError


def notebook_cells(kernel: int, run: int) -> list[Cell]:
    """A small notebook: a variable, a Spark job, %%sql into pandas, printed lines, a failing cell."""
    n = 2000 + run
    return [
        Cell(f"value = {kernel} * 1000 + {run}\nvalue", str(kernel * 1000 + run)),
        Cell(f"spark.range({n}).selectExpr('sum(id)').collect()[0][0]", str(n * (n - 1) // 2)),
        Cell(f"%%sql\nSELECT {kernel} AS kernel, count(*) AS rows_{run} FROM range({100 + run})", f"rows_{run}"),
        Cell("for i in range(3):\n    print('line', i, value)", f"line 2 {kernel * 1000 + run}"),
        Cell(f"{run} / 0", None),
    ]


@dataclass
class CellResult:
    cell: Cell
    status: str = ""
    text: str = ""
    ename: str | None = None
    seconds: float = 0.0

    @property
    def correct(self) -> bool:
        if self.cell.expect is None:
            return self.status == "error" and self.ename == "ZeroDivisionError"
        return self.status == "ok" and self.cell.expect in self.text

    def describe(self) -> str:
        return f"cell {self.cell.code!r}: {self.status} {self.ename or ''}; expected {self.cell.expect!r} in {self.text[-300:]!r}"


def run_cell(client: Any, code: str, timeout: float) -> tuple[str, str, str | None, float]:
    """Run one cell on a jupyter_client blocking client: (status, text it showed, ename, seconds)."""
    started = time.monotonic()
    msg_id = client.execute(code)
    parts: list[str] = []
    ename = None
    while True:
        remaining = timeout - (time.monotonic() - started)
        if remaining <= 0:
            raise TimeoutError(f"cell did not finish in {timeout:.0f}s: {code[:80]!r}")
        try:
            message = client.get_iopub_msg(timeout=remaining)
        except Exception:  # noqa: BLE001, S112 - queue.Empty: the deadline above decides
            continue
        if message["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = message["msg_type"], message["content"]
        if kind == "status" and content["execution_state"] == "idle":
            break
        if kind == "stream":
            parts.append(content["text"])
        elif kind in ("execute_result", "display_data", "update_display_data"):
            parts.append(str(content["data"].get("text/plain", "")))
        elif kind == "error":
            ename = content["ename"]
    reply = client.get_shell_msg(timeout=60)
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = client.get_shell_msg(timeout=60)
    return reply["content"]["status"], "".join(parts), ename, time.monotonic() - started


class KernelNotebook:
    """A kernel running ``notebook_cells`` again and again: ``runs`` times, or until ``until()`` is true."""

    def __init__(self, client: Any, kernel: int, *, runs: int = 1, until: Callable[[], bool] | None = None, timeout: float = 900.0) -> None:
        self.client = client
        self.kernel = kernel
        self.runs = runs
        self.until = until
        self.timeout = timeout
        self.results: list[CellResult] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            run = 0
            while run < self.runs or (self.until is not None and not self.until()):
                for cell in notebook_cells(self.kernel, run):
                    status, text, ename, seconds = run_cell(self.client, cell.code, self.timeout)
                    self.results.append(CellResult(cell, status, text, ename, seconds))
                run += 1
        except BaseException as exc:  # noqa: BLE001 - kept for the caller
            self.error = exc

    def problems(self) -> list[str]:
        found = [f"kernel {self.kernel}: {r.describe()}" for r in self.results if not r.correct]
        if self.error is not None:
            found.append(f"kernel {self.kernel} stopped: {type(self.error).__name__}: {self.error}")
        return found


def in_thread(work: Callable[[], None]) -> Callable[[], None]:
    """A thread's target that runs ``work`` and then closes the event loop jupyter_client's blocking
    client gives the thread it runs in (else the loop and its sockets are left unclosed)."""

    def target() -> None:
        try:
            work()
        finally:
            from jupyter_core.utils import ensure_event_loop

            ensure_event_loop().close()

    return target
