"""``studio bench --applications``: the figures behind the applications' targets, in one run.

One session service with three declared applications (and a default one without a warm pool):
* ``shaped`` (2g drivers with two static confs, one warm): a session that asks for exactly that
  shape, timed from POST to the first ``spark.range(1).count()``, against the same request in the
  default application (a cold driver, as before applications);
* ``napper`` (one warm driver, auto-stop after a few seconds idle): the memory its warm driver held
  and how much the machine got back when it auto-stopped, then the first result of a request that
  auto-starts it, against plain PySpark started the usual way;
* ``tiny`` (at most 2 drivers): 20 concurrent session requests while the service's worker processes
  are counted every 50 ms; every answer must be a session or a refusal in Livy's shape.
Comparisons are ratios within the run (the machines are noisy).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import psutil

from studio.bench import FIRST_RESULT, BenchService, plain_pyspark_first_result, rss_mb, summary
from studio.livy_client import FINAL_SESSION_STATES, FINAL_STATEMENT_STATES, LivyClient
from studio.process import descendants_of, group_members

SHAPE = {"driverMemory": "2g", "conf": {"spark.driver.maxResultSize": "2g", "spark.ui.retainedJobs": "500"}}
IDLE_MINUTES = 0.1


def declarations() -> dict[str, Any]:
    return {
        "applications": [
            {"name": "shaped", "driverConfiguration": SHAPE, "initialCapacity": {"DRIVER": {"workerCount": 1}}, "maximumCapacity": {"drivers": 3}},
            {
                "name": "napper",
                "initialCapacity": {"DRIVER": {"workerCount": 1}},
                "autoStopConfiguration": {"enabled": True, "idleTimeoutMinutes": IDLE_MINUTES},
            },
            {"name": "tiny", "initialCapacity": {"DRIVER": {"workerCount": 1}}, "maximumCapacity": {"drivers": 2}},
        ]
    }


class AppClient:
    """One application's Livy endpoint, and the service's application API beside it."""

    def __init__(self, service: BenchService, name: str) -> None:
        self.service, self.name = service, name
        self.livy = LivyClient(f"{service.url}/applications/{name}", timeout=600, authorization=f"Bearer {service.token}")

    def application(self) -> dict[str, Any]:
        return self.service.client.request("GET", f"/applications/{self.name}")["application"]

    def start(self) -> None:
        self.service.client.request("POST", f"/applications/{self.name}/start", json={})

    def stop(self) -> None:
        self.service.client.request("POST", f"/applications/{self.name}/stop", json={})

    def wait(self, ok: Callable[[dict[str, Any]], bool], timeout: float = 600.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            app = self.application()
            if ok(app):
                return app
            if time.monotonic() > deadline:
                raise RuntimeError(f"application {self.name}: {app['state']} {app['stateDetails']} {app['capacity']}")
            time.sleep(0.1)

    def wait_warm(self, settle: float = 3.0) -> dict[str, Any]:
        app = self.wait(lambda a: a["state"] == "STARTED" and a["capacity"]["used"]["warm"] >= 1)
        time.sleep(settle)  # the newest driver's JIT settles, as the main bench waits
        return app

    def first_result(self, **body: Any) -> float:
        """POST to the first result of ``spark.range(1).count()``; the session is deleted after."""
        started = time.perf_counter()
        session = self.livy.create_session({"kind": "pyspark", **body})
        while session["state"] != "idle":
            if session["state"] in FINAL_SESSION_STATES:
                raise RuntimeError(f"session {session['id']} is {session['state']}")
            time.sleep(0.02)
            session = self.livy.get_session(session["id"])
        statement = self.livy.submit(session["id"], FIRST_RESULT)
        while statement["state"] not in FINAL_STATEMENT_STATES:
            statement = self.livy.statement(session["id"], statement["id"], wait=60, detail=False)
        elapsed = time.perf_counter() - started
        if statement["output"]["status"] != "ok":
            raise RuntimeError(f"statement failed: {statement['output']}")
        self.livy.delete_session(session["id"])
        return elapsed

    def close(self) -> None:
        self.livy.close()


def _workers(service: BenchService) -> list[psutil.Process]:
    found = []
    for child in descendants_of(service.process.pid) if service.process.pid else []:
        try:
            if "studio.worker" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


def applications_figures(args: argparse.Namespace, state_root: Path, log: Any, env: dict[str, str]) -> dict[str, Any]:
    folder = state_root / "applications"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "applications.json").write_text(json.dumps(declarations()))
    service_env = {"STUDIO_CULL_INTERVAL": "1", "STUDIO_POOL_REFILL_MAX_DELAY": "5"}
    results: dict[str, Any] = {}
    with BenchService(folder / "service", pool=0, env=service_env, args=["--applications", str(folder / "applications.json")]) as service:
        shaped, napper, tiny = (AppClient(service, name) for name in ("shaped", "napper", "tiny"))
        try:
            # 1. A session of its application's shape: warm, against the same request as a cold driver.
            shaped.start()
            warm, cold, plain = [], [], []
            for run in range(args.warm_runs):
                shaped.wait_warm()
                warm.append(shaped.first_result(**SHAPE))
                log(f"shaped application, warm session {run + 1}: {warm[-1]:.3f}s")
            default = AppClient(service, "default")
            for run in range(args.cold_runs):  # interleaved with plain PySpark: the noise hits both alike
                cold.append(default.first_result(**SHAPE))
                plain.append(plain_pyspark_first_result(service.env.get("STUDIO_MASTER", "local[*]"), env))
                log(f"same shape as a cold driver {run + 1}: {cold[-1]:.2f}s; plain PySpark: {plain[-1]:.2f}s")
            shaped.stop()
            results["shaped"] = {
                "warm_first_result_s": summary(warm),
                "cold_first_result_s": summary(cold),
                "plain_pyspark_first_result_s": summary(plain),
                "warm_over_cold_p50": statistics.median(warm) / statistics.median(cold),
            }

            # 2. Auto-stop gives the memory back; the next request auto-starts the application.
            napper.start()
            app = napper.wait_warm(settle=1.0)
            pids = [w["pid"] for w in app["pool"]["readyWorkers"]]
            held = sum(rss_mb(p.pid) for pid in pids for p in group_members(pid))
            available_before = psutil.virtual_memory().available / 2**20
            idle_from = time.monotonic()
            napper.wait(lambda a: a["state"] == "STOPPED", timeout=600)
            stopped_after = time.monotonic() - idle_from
            time.sleep(2)
            available_after = psutil.virtual_memory().available / 2**20
            left = [pid for pid in pids if psutil.pid_exists(pid)]
            auto_start = [napper.first_result()]
            log(f"napper: auto-stopped {stopped_after:.1f}s after warm (idle timeout {IDLE_MINUTES * 60:.0f}s), "
                f"{held:.0f} MB released; auto-started first result {auto_start[0]:.2f}s")  # fmt: skip
            results["auto_stop_start"] = {
                "idle_timeout_s": IDLE_MINUTES * 60,
                "stopped_after_s": round(stopped_after, 1),
                "warm_driver_rss_mb": round(held, 1),
                "memory_available_gain_mb": round(available_after - available_before, 1),
                "driver_processes_left": len(left),
                "auto_start_first_result_s": auto_start[0],
                "auto_start_over_plain_pyspark": auto_start[0] / statistics.median(plain),
            }
            napper.wait(lambda a: a["capacity"]["used"]["sessions"] == 0, timeout=60)
            napper.stop()  # its refill would be counted among tiny's driver processes below
            deadline = time.monotonic() + 120
            while _workers(service) and time.monotonic() < deadline:
                time.sleep(0.2)

            # 3. Maximum capacity under 20 concurrent requests.
            tiny.start()
            tiny.wait_warm(settle=0.5)
            results["maximum_capacity"] = _concurrent_requests(service, tiny, requests=20, maximum=2)
            log(f"tiny: {results['maximum_capacity']}")
        finally:
            for client in (shaped, napper, tiny):
                client.close()
    return results


def _concurrent_requests(service: BenchService, tiny: AppClient, requests: int, maximum: int) -> dict[str, Any]:
    counts: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            counts.append(len(_workers(service)))
            time.sleep(0.05)

    def ask(_: int) -> tuple[int, dict[str, Any]]:
        with httpx.Client(base_url=tiny.livy.url, headers={"Authorization": f"Bearer {service.token}"}, timeout=600, trust_env=False) as http:
            response = http.post("/sessions", json={"kind": "pyspark"})
            return response.status_code, response.json()

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with concurrent.futures.ThreadPoolExecutor(requests) as pool:
        answers = list(pool.map(ask, range(requests)))
    created = [body["id"] for status, body in answers if status == 201]
    for session_id in created:  # each reaches idle (or is refused above): none is left half started
        while tiny.livy.get_session(session_id)["state"] == "starting":
            time.sleep(0.1)
    done.set()
    sampler.join()
    states = [tiny.livy.get_session(session_id)["state"] for session_id in created]
    refused = [body for status, body in answers if status != 201]
    for session_id in created:
        tiny.livy.delete_session(session_id)
    return {
        "requests": requests,
        "maximum_drivers": maximum,
        "sessions_created": len(created),
        "sessions_idle": states.count("idle"),
        "refused_in_livy_shape": sum(1 for body in refused if set(body) == {"msg"}),
        "refusal_example": refused[0]["msg"] if refused else None,
        "most_driver_processes_seen": max(counts) if counts else 0,
        "held": max(counts or [0]) <= maximum,
    }


def print_applications_table(r: dict[str, Any]) -> None:
    shaped, auto, cap = r["shaped"], r["auto_stop_start"], r["maximum_capacity"]
    print("Applications (studio bench --applications)")
    print(f"  session of its application's shape, warm: p50 {shaped['warm_first_result_s']['p50']:.3f}s "
          f"(same request as a cold driver: p50 {shaped['cold_first_result_s']['p50']:.2f}s; "
          f"warm/cold {shaped['warm_over_cold_p50']:.3f})")  # fmt: skip
    print(f"  plain PySpark first result: p50 {shaped['plain_pyspark_first_result_s']['p50']:.2f}s")
    print(f"  auto-stop after {auto['idle_timeout_s']:.0f}s idle: stopped after {auto['stopped_after_s']}s, warm driver "
          f"{auto['warm_driver_rss_mb']} MB RSS released (MemAvailable +{auto['memory_available_gain_mb']} MB, "
          f"{auto['driver_processes_left']} driver processes left)")  # fmt: skip
    print(f"  auto-start first result: {auto['auto_start_first_result_s']:.2f}s "
          f"= {auto['auto_start_over_plain_pyspark']:.2f}x plain PySpark")  # fmt: skip
    print(f"  {cap['requests']} concurrent requests, maximum {cap['maximum_drivers']} drivers: {cap['sessions_created']} sessions, "
          f"{cap['refused_in_livy_shape']} refused in Livy's shape, at most {cap['most_driver_processes_seen']} driver "
          f"processes seen ({'held' if cap['held'] else 'EXCEEDED'})")  # fmt: skip
