"""``studio bench --density``: shared-driver sessions (Spark Connect) against dedicated drivers, in one run.

Two services of its own (loopback, free ports, private state directories):

* ``shared`` (``STUDIO_DRIVER_MODE=shared``, a warm pool of 2 lean sessions per user's driver) with a
  declared application ``dedicated`` (``driverMode: DEDICATED``, no warm drivers) beside the default one;
* ``empty-pool`` (``STUDIO_DRIVER_MODE=shared``, ``STUDIO_SHARED_POOL_SIZE=0``): every session a lean
  worker started for it, on a driver already running.

It measures:

1. memory: ``--sessions`` (50) idle shared sessions of one user, each having run
   ``spark.range(1000).count()``: every process of the service's tree (the service, the lean workers,
   warm ones included, the user's Connect driver JVM and its children), PSS where the kernel has it
   (else RSS), over the sessions; beside it ``--dedicated-sessions`` (3) dedicated sessions' own
   processes (worker + JVM) plus the service's share at the same count of sessions;
2. POST /sessions to the first result of ``spark.range(1).count()`` from the warm pool (refilled
   between samples) and with an empty pool on a running driver (and, once each, the first session of a
   user, which starts the driver);
3. all the shared sessions run a small aggregation at once: every answer checked, wall time, p50/p95;
4. statement latency on a shared vs a dedicated session, alternated round by round (medians, ratios):
   ``select 1`` (kind sql), ``spark.range(1).count()``, 100,000 rows of a kind-sql result (Livy's
   JSON rows, ``STUDIO_SQL_NUM_ROWS`` raised) and the same rows through the studio's Arrow path
   (``__studio__.export``, what the kernel's ``%%sql -o`` runs, then ``GET .../arrow`` into pandas).

Comparisons are ratios within the run (the machines are noisy).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import psutil

from studio.bench import FIRST_RESULT, BenchService, summary
from studio.livy_client import FINAL_SESSION_STATES, FINAL_STATEMENT_STATES, LivyClient

SMALL_QUERY = "spark.range(1000).count()"
AGGREGATION = (
    'sorted((r["k"], r["count"]) for r in spark.range(100000).selectExpr("id % 10 as k").groupBy("k").count().collect())'
)
AGGREGATION_EXPECTED = str(sorted((k, 10000) for k in range(10)))
TRANSFER_ROWS = 100_000
TRANSFER_SQL = "SELECT id, id * 2 AS twice, concat('row_', CAST(id AS STRING)) AS s FROM range(100000)"
TRANSFER_ARROW = f'__studio__.export(spark.sql("{TRANSFER_SQL}"), max_rows=-1)'
DEDICATED_APP = "dedicated"
SHARED_POOL = 2


def declarations() -> dict[str, Any]:
    return {
        "applications": [
            {"name": DEDICATED_APP, "driverMode": "DEDICATED", "maximumCapacity": {"drivers": 16}},
        ]
    }


def service_env(pool: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    return {
        "STUDIO_DRIVER_MODE": "shared",
        "STUDIO_SHARED_POOL_SIZE": str(pool),
        "STUDIO_CONNECT_PORT": "0",  # a free port: never the 15002 another service may have
        "STUDIO_SQL_NUM_ROWS": str(TRANSFER_ROWS),
        "STUDIO_MAX_OUTPUT_BYTES": str(1 << 28),
        "STUDIO_WORKER_START_TIMEOUT": "900",  # fifty lean workers start side by side on few cores
        "STUDIO_POOL_REFILL_MAX_DELAY": "5",
        "STUDIO_RETAINED_STATEMENTS": "500",
        **(extra or {}),
    }


# -- memory of a process tree ---------------------------------------------------------------------


def _memory_mb(process: psutil.Process) -> tuple[float, str]:
    """(MB, "pss" | "rss" | "gone"): PSS where the kernel gives it, else RSS."""
    try:
        info = process.memory_full_info()
        pss = getattr(info, "pss", None)
        if pss:
            return pss / 2**20, "pss"
        return info.rss / 2**20, "rss"
    except psutil.AccessDenied:
        try:
            return process.memory_info().rss / 2**20, "rss"
        except psutil.Error:
            return 0.0, "gone"
    except psutil.Error:
        return 0.0, "gone"


def _cmdline(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


class TreeMemory:
    """Every process of a service's tree (and of its drivers', wherever they hang), each counted once and
    put with the nearest of: a session worker (``studio.worker``), a shared driver, the service."""

    def __init__(self, service_pid: int, driver_pids: list[int]) -> None:
        self.processes: dict[int, psutil.Process] = {}
        roots = [service_pid, *driver_pids]
        for pid in roots:
            try:
                root = psutil.Process(pid)
                self.processes[pid] = root
                for child in root.children(recursive=True):
                    self.processes[child.pid] = child
            except psutil.Error:
                continue
        self.service_pid = service_pid
        self.driver_pids = set(driver_pids)
        self.owner: dict[int, tuple[str, int]] = {}
        for pid, process in self.processes.items():
            self.owner[pid] = self._owner_of(process)

    def _owner_of(self, process: psutil.Process) -> tuple[str, int]:
        try:
            chain = [process, *process.parents()]
        except psutil.Error:
            chain = [process]
        for ancestor in chain:
            if ancestor.pid == self.service_pid:
                break
            if ancestor.pid in self.driver_pids:
                return "driver", ancestor.pid
            if "studio.worker" in _cmdline(ancestor):
                return "worker", ancestor.pid
        if process.pid == self.service_pid:
            return "service", process.pid
        # Between the service and a driver (a launcher script left waiting), or anything else it runs.
        for driver in self.driver_pids:
            try:
                if any(p.pid == process.pid for p in psutil.Process(driver).parents()):
                    return "driver", driver
            except psutil.Error:
                continue
        return "other", process.pid

    def measure(self) -> dict[str, Any]:
        mb: dict[int, float] = {}
        by_rss: list[str] = []  # what the kernel would not give a PSS of (said, not hidden)
        for pid, process in self.processes.items():
            mb[pid], kind = _memory_mb(process)
            if kind == "rss":
                by_rss.append(f"{pid} {_cmdline(process)[:60]}")
        workers: dict[int, float] = {}
        java_under: dict[int, bool] = {}
        by_kind = {"service": 0.0, "driver": 0.0, "other": 0.0}
        for pid, (kind, owner) in self.owner.items():
            if kind == "worker":
                workers[owner] = workers.get(owner, 0.0) + mb[pid]
                if pid != owner and "java" in _cmdline(self.processes[pid]).split(" ", 1)[0]:
                    java_under[owner] = True
            else:
                by_kind[kind] += mb[pid]
        lean = {pid: v for pid, v in workers.items() if not java_under.get(pid)}
        dedicated = {pid: v for pid, v in workers.items() if java_under.get(pid)}
        return {
            "measure": f"pss ({len(by_rss)} by rss)" if by_rss else "pss",
            "by_rss": by_rss,
            "processes": sum(1 for value in mb.values() if value > 0),
            "total_mb": sum(mb.values()),
            "service_mb": by_kind["service"],
            "driver_mb": by_kind["driver"],
            "other_mb": by_kind["other"],
            "lean_workers": lean,
            "dedicated_workers": dedicated,
        }

    def pids(self) -> dict[int, float]:
        """pid -> create time, to tell a leftover from a process that took its number later."""
        found = {}
        for pid, process in self.processes.items():
            try:
                found[pid] = process.create_time()
            except psutil.Error:
                continue
        return found


# -- a Livy endpoint, timed ------------------------------------------------------------------------


class Endpoint:
    """One application's Livy endpoint of a bench service (the root is the default application)."""

    def __init__(self, service: BenchService, application: str | None = None, log: Callable[[str], None] = lambda _: None) -> None:
        self.service = service
        self.log = log
        url = service.url if application is None else f"{service.url}/applications/{application}"
        self.livy = LivyClient(url, timeout=600, authorization=f"Bearer {service.token}")
        self.http = httpx.Client(base_url=url, timeout=600, headers={"Authorization": f"Bearer {service.token}"}, trust_env=False)

    def close(self) -> None:
        self.livy.close()
        self.http.close()

    def create(self, **body: Any) -> int:
        return int(self.livy.create_session({"kind": "pyspark", **body})["id"])

    def wait_idle(self, session_ids: list[int], timeout: float = 900.0, poll: float = 0.02) -> None:
        started = time.monotonic()
        deadline, next_word = started + timeout, started + 60
        waiting = set(session_ids)
        while waiting:
            if time.monotonic() > next_word:  # a slow start says where it is, not only when it gives up
                next_word += 60
                self.log(f"density: still waiting after {time.monotonic() - started:.0f}s for {len(waiting)} session(s) to be idle")
            if len(waiting) == 1:
                (only,) = waiting
                states = {only: self.livy.get_session(only)["state"]}
            else:
                states = {int(s["id"]): s["state"] for s in self.livy.list_sessions() if int(s["id"]) in waiting}
            for session_id in list(waiting):
                state = states.get(session_id, "missing")
                if state == "idle":
                    waiting.discard(session_id)
                elif state in FINAL_SESSION_STATES or state == "missing":
                    raise RuntimeError(f"session {session_id} is {state}: {self.livy.log(session_id, 40) if state != 'missing' else ''}")
            if waiting and time.monotonic() > deadline:
                raise RuntimeError(f"sessions {sorted(waiting)} did not become idle in {timeout:.0f}s")
            if waiting:
                time.sleep(poll if len(waiting) == 1 else 0.5)

    def run(self, session_id: int, code: str, kind: str | None = None) -> tuple[float, dict[str, Any]]:
        """(seconds from POST to the final statement, the statement); one request with ?wait when quick."""
        body: dict[str, Any] = {"code": code, **({"kind": kind} if kind else {})}
        started = time.perf_counter()
        response = self.http.post(f"/sessions/{session_id}/statements", json=body, params={"wait": 60})
        response.raise_for_status()
        statement = response.json()
        while statement["state"] not in FINAL_STATEMENT_STATES:
            response = self.http.get(f"/sessions/{session_id}/statements/{statement['id']}", params={"wait": 60})
            response.raise_for_status()
            statement = response.json()
        elapsed = time.perf_counter() - started
        output = statement.get("output") or {}
        if output.get("status") != "ok":
            raise RuntimeError(f"session {session_id}: {code[:60]!r} failed: {output.get('evalue') or output}")
        return elapsed, statement

    def first_result(self, idle: list[float] | None = None) -> float:
        """POST /sessions to the result of ``spark.range(1).count()``; the session is deleted after.
        ``idle`` gets the part until the session was idle (the rest is its first statement)."""
        started = time.perf_counter()
        session_id = self.create()
        self.wait_idle([session_id])
        if idle is not None:
            idle.append(time.perf_counter() - started)
        self.run(session_id, FIRST_RESULT)
        elapsed = time.perf_counter() - started
        self.livy.delete_session(session_id)
        return elapsed

    def driver_mode(self, session_id: int) -> str | None:
        described = self.service.client.request("GET", f"/studio/sessions/{session_id}")
        return described.get("driverMode")


def _text(statement: dict[str, Any]) -> str:
    return str(((statement.get("output") or {}).get("data") or {}).get("text/plain", ""))


def shared_drivers(service: BenchService) -> list[dict[str, Any]]:
    return list(service.status().get("sharedDrivers") or [])


def wait_warm(service: BenchService, count: int, settle: float, timeout: float = 300.0) -> None:
    """Until the user's driver has ``count`` warm lean sessions, then ``settle`` seconds more."""
    deadline = time.monotonic() + timeout
    while True:
        drivers = shared_drivers(service)
        if drivers and drivers[0].get("warmSessions", 0) >= count:
            time.sleep(settle)
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the shared driver's warm pool did not refill to {count}: {drivers}")
        time.sleep(0.1)


def _parallel(items: list[Any], call: Callable[[Any], Any], threads: int) -> list[Any]:
    with concurrent.futures.ThreadPoolExecutor(max(1, min(threads, len(items)))) as pool:
        return list(pool.map(call, items))


# -- the parts ------------------------------------------------------------------------------------


def _create_many(endpoint: Endpoint, count: int, wave: int, log: Any) -> list[int]:
    """``count`` sessions, ``wave`` at a time (each wave idle before the next is asked for)."""
    ids: list[int] = []
    while len(ids) < count:
        batch = [endpoint.create() for _ in range(min(wave, count - len(ids)))]
        endpoint.wait_idle(batch)
        ids += batch
        log(f"density: {len(ids)} of {count} sessions idle")
    return ids


def _aggregation_at_once(endpoint: Endpoint, ids: list[int]) -> dict[str, Any]:
    barrier = threading.Barrier(len(ids))

    def one(session_id: int) -> tuple[float, bool, str]:
        barrier.wait()
        try:
            seconds, statement = endpoint.run(session_id, AGGREGATION)
        except Exception as exc:  # noqa: BLE001 - a failure is a figure here
            return float("nan"), False, f"session {session_id}: {exc}"
        text = _text(statement)
        return seconds, text == AGGREGATION_EXPECTED, "" if text == AGGREGATION_EXPECTED else f"session {session_id}: {text[:200]}"

    started = time.perf_counter()
    answers = _parallel(ids, one, len(ids))
    wall = time.perf_counter() - started
    seconds = [s for s, ok, _ in answers if ok]
    return {
        "sessions": len(ids),
        "correct": sum(1 for _, ok, _ in answers if ok),
        "wall_s": wall,
        "statement_s": summary(seconds),
        "problems": [problem for _, ok, problem in answers if not ok][:10],
    }


def _paired_latency(shared: Endpoint, shared_id: int, dedicated: Endpoint, dedicated_id: int, rounds: int, log: Any) -> dict[str, Any]:
    def transfer_json(endpoint: Endpoint, session_id: int) -> float:
        seconds, statement = endpoint.run(session_id, TRANSFER_SQL, kind="sql")
        rows = statement["output"]["data"]["application/json"]["data"]
        if len(rows) != TRANSFER_ROWS or rows[-1][0] != TRANSFER_ROWS - 1:
            raise RuntimeError(f"the sql result had {len(rows)} rows, not {TRANSFER_ROWS}")
        return seconds

    def transfer_arrow(endpoint: Endpoint, session_id: int) -> float:
        import pyarrow as pa

        started = time.perf_counter()
        _, statement = endpoint.run(session_id, TRANSFER_ARROW)
        data = endpoint.livy.arrow(session_id, int(statement["id"]))
        frame = pa.ipc.open_stream(pa.py_buffer(data)).read_all().to_pandas()
        elapsed = time.perf_counter() - started
        if len(frame) != TRANSFER_ROWS:
            raise RuntimeError(f"the Arrow result had {len(frame)} rows, not {TRANSFER_ROWS}")
        return elapsed

    def sql_one(endpoint: Endpoint, session_id: int) -> float:
        seconds, statement = endpoint.run(session_id, "select 1", kind="sql")
        if statement["output"]["data"]["application/json"]["data"] != [[1]]:
            raise RuntimeError(f"select 1 answered {statement['output']['data']}")
        return seconds

    def count_one(endpoint: Endpoint, session_id: int) -> float:
        seconds, statement = endpoint.run(session_id, FIRST_RESULT)
        if _text(statement) != "1":
            raise RuntimeError(f"spark.range(1).count() answered {_text(statement)!r}")
        return seconds

    measures: dict[str, Callable[[Endpoint, int], float]] = {
        "select 1 (sql)": sql_one,
        "spark.range(1).count() (pyspark)": count_one,
        f"{TRANSFER_ROWS:,} rows, kind sql (JSON rows)": transfer_json,
        f"{TRANSFER_ROWS:,} rows, Arrow (__studio__.export + GET arrow, as %%sql -o)": transfer_arrow,
    }
    sides = {"shared": (shared, shared_id), "dedicated": (dedicated, dedicated_id)}
    times: dict[str, dict[str, list[float]]] = {name: {"shared": [], "dedicated": []} for name in measures}
    for measure in measures.values():  # each path's first run (imports, JIT, plans) is not what is compared
        for endpoint, session_id in sides.values():
            measure(endpoint, session_id)
    for round_number in range(rounds):
        order = ("shared", "dedicated") if round_number % 2 == 0 else ("dedicated", "shared")
        for name, measure in measures.items():
            for side in order:
                endpoint, session_id = sides[side]
                times[name][side].append(measure(endpoint, session_id))
        log(f"latency round {round_number + 1} of {rounds}: " + ", ".join(
            f"{name.split(' (')[0]} {times[name]['shared'][-1] * 1000:.0f}/{times[name]['dedicated'][-1] * 1000:.0f} ms" for name in measures
        ))  # fmt: skip
    figures = {}
    for name in measures:
        shared_s, dedicated_s = times[name]["shared"], times[name]["dedicated"]
        figures[name] = {
            "shared_s": summary(shared_s),
            "dedicated_s": summary(dedicated_s),
            "ratio_of_medians": statistics.median(shared_s) / statistics.median(dedicated_s),
            "median_paired_ratio": statistics.median(s / d for s, d in zip(shared_s, dedicated_s)),
        }
    return {"rounds": rounds, "measures": figures}


def _service_pid(service: BenchService) -> int:
    pid = service.process.pid
    if pid is None:
        raise RuntimeError("the bench service has no process")
    return int(pid)


def _record(seen: dict[int, float], tree: TreeMemory) -> None:
    seen.update(tree.pids())


def _stop_leftovers(seen: dict[int, float], log: Any) -> list[int]:
    """After the services stopped: any process the bench's services started that is still there (same
    pid and start time) is stopped, by its pid."""
    deadline = time.monotonic() + 30
    left: list[psutil.Process] = []
    while True:
        left = []
        for pid, created in seen.items():
            try:
                process = psutil.Process(pid)
                if abs(process.create_time() - created) < 0.01 and process.status() != psutil.STATUS_ZOMBIE:
                    left.append(process)
            except psutil.Error:
                continue
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for process in left:
        log(f"density: stopping leftover process {process.pid} ({_cmdline(process)[:80]})")
        try:
            process.terminate()
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(left, timeout=10)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            continue
    return [p.pid for p in left]


def density_figures(args: argparse.Namespace, state_root: Path, log: Any) -> dict[str, Any]:
    folder = state_root / "density"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "applications.json").write_text(json.dumps(declarations()))
    count, dedicated_count = args.sessions, args.dedicated_sessions
    results: dict[str, Any] = {"sessions": count, "dedicated_sessions": dedicated_count, "shared_pool": SHARED_POOL}
    seen: dict[int, float] = {}
    bench_started = time.monotonic()
    try:
        with BenchService(
            folder / "shared", pool=0, env=service_env(SHARED_POOL), args=["--applications", str(folder / "applications.json")]
        ) as service:
            shared, dedicated = Endpoint(service, log=log), Endpoint(service, DEDICATED_APP, log=log)
            ids: list[int] = []
            dedicated_ids: list[int] = []
            try:
                service.client.request("POST", f"/applications/{DEDICATED_APP}/start", json={})
                status = service.status()
                results["service"] = {
                    "driverMode": status.get("driverMode"),
                    "sparkConnect": status.get("sparkConnect"),
                    "memoryBudgetMB": status.get("memoryBudgetMB"),
                }
                # 2a. The user's first session starts their driver; then new sessions from the warm pool.
                cold_driver = shared.first_result()
                log(f"density: the user's first session (starts the Connect driver): {cold_driver:.2f}s")
                warm: list[float] = []
                warm_idle: list[float] = []
                for run in range(args.warm_runs):
                    wait_warm(service, SHARED_POOL, settle=2.0)
                    warm.append(shared.first_result(warm_idle))
                    log(f"density: warm-pool session {run + 1}: first result {warm[-1]:.3f}s (idle after {warm_idle[-1]:.3f}s)")
                results["first_result"] = {"driver_start_s": cold_driver, "warm_pool_s": summary(warm), "warm_pool_to_idle_s": summary(warm_idle)}
                results["load_average"] = {"first_results": os.getloadavg()[0]}

                # 1. N idle shared sessions, each after a small query: the whole tree's memory.
                wait_warm(service, SHARED_POOL, settle=0.5)
                started = time.perf_counter()
                ids = _create_many(shared, count, args.wave, log)
                created_s = time.perf_counter() - started
                answers = _parallel(ids, lambda sid: _text(shared.run(sid, SMALL_QUERY)[1]), 8)
                modes = _parallel(ids, shared.driver_mode, 8)
                small_ok = sum(1 for a in answers if a == "1000")
                wait_warm(service, SHARED_POOL, settle=args.settle_seconds)
                drivers = shared_drivers(service)
                tree = TreeMemory(_service_pid(service), [int(d["pid"]) for d in drivers if d.get("pid")])
                _record(seen, tree)
                memory = tree.measure()
                lean = memory["lean_workers"]
                per_session = memory["total_mb"] / count
                results["memory"] = {
                    "measure": memory["measure"],
                    "by_rss": memory["by_rss"],
                    "processes": memory["processes"],
                    "shared_total_mb": round(memory["total_mb"], 1),
                    "service_mb": round(memory["service_mb"], 1),
                    "driver_mb": round(memory["driver_mb"], 1),
                    "lean_workers": len(lean),
                    "lean_workers_mb": round(sum(lean.values()), 1),
                    "lean_worker_mb": summary(list(lean.values())),
                    "other_mb": round(memory["other_mb"], 1),
                    "shared_per_session_mb": round(per_session, 1),
                    "drivers": [{k: d.get(k) for k in ("pid", "user", "sessions", "warmSessions")} for d in drivers],
                    "sessions_created_s": round(created_s, 1),
                    "small_query_correct": small_ok,
                    "driver_mode_shared": modes.count("shared"),
                }
                log(f"density: {count} shared sessions: {memory['total_mb']:.0f} MB in {memory['processes']} processes "
                    f"({per_session:.0f} MB per session; driver {memory['driver_mb']:.0f} MB, {len(lean)} lean workers "
                    f"{sum(lean.values()):.0f} MB, service {memory['service_mb']:.0f} MB)")  # fmt: skip

                # 3. All of them run a small aggregation at once (one session alone first, for scale).
                shared.run(ids[0], AGGREGATION)
                alone = [shared.run(ids[0], AGGREGATION)[0] for _ in range(3)]
                results["load_average"]["memory"] = os.getloadavg()[0]
                results["aggregation_at_once"] = _aggregation_at_once(shared, ids)
                results["aggregation_at_once"]["one_alone_s"] = statistics.median(alone)
                results["load_average"]["aggregation"] = os.getloadavg()[0]
                log(f"density: aggregation at once: {results['aggregation_at_once']}")

                # Keep one shared session for the latency pairs; the others go.
                keep, rest = ids[0], ids[1:]
                _parallel(rest, shared.livy.delete_session, 8)
                ids = [keep]

                # 1b. Dedicated sessions: their own processes (worker + JVM) after the same small query.
                dedicated_started = time.perf_counter()
                dedicated_ids = [dedicated.create() for _ in range(dedicated_count)]
                dedicated.wait_idle(dedicated_ids)
                dedicated_start_s = time.perf_counter() - dedicated_started
                answers = _parallel(dedicated_ids, lambda sid: _text(dedicated.run(sid, SMALL_QUERY)[1]), 8)
                modes = _parallel(dedicated_ids, dedicated.driver_mode, 8)
                time.sleep(args.settle_seconds)
                tree = TreeMemory(_service_pid(service), [int(d["pid"]) for d in shared_drivers(service) if d.get("pid")])
                _record(seen, tree)
                measured = tree.measure()
                own = measured["dedicated_workers"]
                if len(own) != dedicated_count:
                    raise RuntimeError(f"found {len(own)} dedicated workers (a JVM under a worker), not {dedicated_count}")
                per_dedicated = statistics.mean(own.values())
                service_share = memory["service_mb"] / count
                dedicated_per_session = per_dedicated + service_share
                results["memory"].update(
                    {
                        "dedicated_session_mb": summary(list(own.values())),
                        "dedicated_per_session_mb": round(dedicated_per_session, 1),
                        "dedicated_start_s": round(dedicated_start_s, 1),
                        "dedicated_small_query_correct": sum(1 for a in answers if a == "1000"),
                        "driver_mode_dedicated": modes.count("dedicated"),
                        "dedicated_over_shared": dedicated_per_session / per_session,
                        "shared_for_n_gib": memory["total_mb"] / 1024,
                        "dedicated_for_n_gib": dedicated_per_session * count / 1024,
                    }
                )
                log(f"density: dedicated sessions: {per_dedicated:.0f} MB each (+ {service_share:.1f} MB of the service)")

                # 4. Statement latency, shared vs dedicated, alternated.
                results["latency"] = _paired_latency(shared, keep, dedicated, dedicated_ids[0], args.latency_rounds, log)
                results["load_average"]["latency"] = os.getloadavg()[0]
            finally:
                for session_id in ids:
                    _quietly(shared.livy.delete_session, session_id)
                for session_id in dedicated_ids:
                    _quietly(dedicated.livy.delete_session, session_id)
                shared.close()
                dedicated.close()

        # 2b. An empty pool on a running driver: each session a lean worker started for it.
        with BenchService(folder / "empty-pool", pool=0, env=service_env(0)) as service:
            endpoint = Endpoint(service, log=log)
            try:
                cold_driver = endpoint.first_result()
                log(f"density: empty pool: the user's first session (starts the driver): {cold_driver:.2f}s")
                drivers = shared_drivers(service)
                if drivers:
                    _record(seen, TreeMemory(_service_pid(service), [int(d["pid"]) for d in drivers if d.get("pid")]))
                empty: list[float] = []
                empty_idle: list[float] = []
                for run in range(args.warm_runs):
                    time.sleep(1.0)
                    empty.append(endpoint.first_result(empty_idle))
                    log(f"density: empty-pool session {run + 1}: first result {empty[-1]:.3f}s (idle after {empty_idle[-1]:.3f}s)")
                results["first_result"].update(
                    {"empty_pool_s": summary(empty), "empty_pool_to_idle_s": summary(empty_idle), "empty_pool_driver_start_s": cold_driver}
                )
                results["load_average"]["empty_pool"] = os.getloadavg()[0]
            finally:
                endpoint.close()
    finally:
        results["leftover_processes_stopped"] = _stop_leftovers(seen, log)
    results["bench_seconds"] = round(time.monotonic() - bench_started, 1)
    return results


def _quietly(call: Callable[[int], Any], session_id: int) -> None:
    try:
        call(session_id)
    except Exception as exc:  # noqa: BLE001 - cleaning up: the service stops them anyway
        print(f"density: deleting session {session_id}: {exc}", file=sys.stderr)


def density_ok(r: dict[str, Any]) -> bool:
    """What must hold whatever the machine: every answer right, every session in the mode asked for."""
    memory, agg = r["memory"], r["aggregation_at_once"]
    return (
        memory["small_query_correct"] == r["sessions"]
        and memory["driver_mode_shared"] == r["sessions"]
        and memory["dedicated_small_query_correct"] == r["dedicated_sessions"]
        and memory["driver_mode_dedicated"] == r["dedicated_sessions"]
        and agg["correct"] == agg["sessions"]
    )


def print_density_table(r: dict[str, Any]) -> None:
    m, f, a, lat = r["memory"], r["first_result"], r["aggregation_at_once"], r["latency"]
    n = r["sessions"]
    unit = m["measure"].upper().replace("BY RSS", "by RSS")
    ms = lambda s: f"{s * 1000:.0f} ms" if s < 10 else f"{s:.1f} s"  # noqa: E731
    rows = [
        (f"{n} idle shared sessions, whole service tree ({unit})", f"{m['shared_total_mb'] / 1024:.2f} GiB", "<= 10 GiB"),
        ("  per shared session (driver and service shared out)", f"{m['shared_per_session_mb']:.0f} MB", "<= 200 MB"),
        ("  Connect driver (JVM and children)", f"{m['driver_mb']:.0f} MB", ""),
        (f"  lean workers ({m['lean_workers']}, {r['shared_pool']} of them warm), p50 each", f"{m['lean_worker_mb']['p50']:.0f} MB", ""),
        ("  the service process", f"{m['service_mb']:.0f} MB", ""),
        (f"per dedicated session (worker + JVM, mean of {r['dedicated_sessions']}, + service/{n})", f"{m['dedicated_per_session_mb']:.0f} MB", ""),
        ("dedicated / shared per session", f"{m['dedicated_over_shared']:.1f}x", ""),
        (f"  {n} sessions: shared vs dedicated", f"{m['shared_for_n_gib']:.1f} / {m['dedicated_for_n_gib']:.1f} GiB", ""),
        ("first result, new session from the warm pool (p50 / p95)", f"{ms(f['warm_pool_s']['p50'])} / {ms(f['warm_pool_s']['p95'])}", "<= 0.5 s"),
        ("  of which POST until idle (p50)", ms(f["warm_pool_to_idle_s"]["p50"]), ""),
        ("first result, empty pool on a running driver (p50 / p95)", f"{ms(f['empty_pool_s']['p50'])} / {ms(f['empty_pool_s']['p95'])}", "<= 1.5 s"),
        ("  of which POST until idle (p50)", ms(f["empty_pool_to_idle_s"]["p50"]), ""),
        ("first result, a user's first session (starts the driver)", ms(f["driver_start_s"]), ""),
        (f"{a['sessions']} sessions aggregate at once: correct", f"{a['correct']} of {a['sessions']}", "all"),
        ("  wall time / statement p50 / p95", f"{ms(a['wall_s'])} / {ms(a['statement_s']['p50'])} / {ms(a['statement_s']['p95'])}", ""),
        ("  the same aggregation, one session alone (p50 of 3)", ms(a["one_alone_s"]), ""),
    ]
    for name, figures in lat["measures"].items():
        rows.append(
            (
                f"{name}: shared / dedicated (p50)",
                f"{ms(figures['shared_s']['p50'])} / {ms(figures['dedicated_s']['p50'])} = {figures['ratio_of_medians']:.2f}x "
                f"(paired {figures['median_paired_ratio']:.2f}x)",
                "<= 1.3x",
            )
        )
    loads = ", ".join(f"{phase} {value:.1f}" for phase, value in r.get("load_average", {}).items())
    print(f"Shared-driver density (studio bench --density; {lat['rounds']} paired latency rounds; {r['bench_seconds']} s; "
          f"1-min load average after: {loads})")  # fmt: skip
    width = max(len(row[0]) for row in rows)
    print(f"{'measure'.ljust(width)}  {'value':>40}  target")
    for name, value, target in rows:
        print(f"{name.ljust(width)}  {value:>40}  {target}")
    for problem in a["problems"]:
        print(f"  problem: {problem}")
