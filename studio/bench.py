"""``studio bench``: the figures behind the session service's targets, measured in one run.

It starts real services (``studio livy`` processes on loopback ports) and plain PySpark
processes, and prints a table and JSON:

* time from POST /sessions to the first result of ``spark.range(1).count()``: warm pool vs a
  cold session (``--pool 0``), and a pool miss (a session that needs its own JVM) vs plain
  PySpark started the usual way, interleaved so the machine's noise hits both alike;
* the service's own share of a warm first result: that time minus the in-process time of the
  same statement on the same (warm) SparkSession, paired per run;
* the round trip of a trivial statement ``1+1`` over REST vs the same code in-process;
* RSS of the service and of one idle warm worker (Python and JVM together).

Machines here are noisy, so comparisons are ratios within the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from studio.config import Settings
from studio.launcher import ServiceLauncher
from studio.livy_client import FINAL_SESSION_STATES, FINAL_STATEMENT_STATES, LivyClient
from studio.process import ChildProcess, group_members

FIRST_RESULT = "spark.range(1).count()"
IN_PROCESS_PROBE = (
    "import time as _t\n_times = []\nfor _ in range(5):\n"
    "    _s = _t.perf_counter(); spark.range(1).count(); _times.append(_t.perf_counter() - _s)\n"
    "sorted(_times)[2]"
)
PLAIN_PYSPARK = (
    "import time; t0 = float(__import__('sys').argv[1])\n"
    "from pyspark.sql import SparkSession\n"
    "spark = SparkSession.builder.master({master!r}).getOrCreate()\n"
    "spark.range(1).count()\n"
    "print('FIRST_RESULT', time.time() - t0, flush=True)\n"
    "spark.stop()\n"
)


TRANSFER_SETUP = (
    "bench_rows = spark.range({rows}).selectExpr('id AS i1', 'CAST(id * 7 % 1000 AS INT) AS i2', "
    "'CAST(id AS DOUBLE) / 2 AS d1', 'rand(42) AS d2', \"concat('row_', CAST(id AS STRING)) AS s1\").cache()\n"
    "bench_rows.count()\n"
    "bench_rows.createOrReplaceTempView('bench_rows')\n"
    "spark.conf.set('spark.sql.execution.arrow.pyspark.enabled', 'true')\n"
    "_ = bench_rows.limit(10).toPandas()  # imports pandas and pyarrow before anything is timed"
)
IN_PROCESS_TO_PANDAS = (
    "import time as _t\n_s = _t.perf_counter()\n_p = bench_rows.toPandas()\n_e = _t.perf_counter() - _s\ndel _p\n_e"
)
# What sparkmagic's %%sql sends (its generated code, verbatim in shape): one JSON line per row.
SPARKMAGIC_SQL = (
    "import sys\nfor _row in spark.sql(u\"\"\"SELECT * FROM bench_rows \"\"\").toJSON("
    "use_unicode=(sys.version_info.major > 2)).take({rows}): print(_row)"
)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "min": min(values) if values else float("nan"),
        "max": max(values) if values else float("nan"),
        "n": len(values),
    }


def pss_mb(pid: int) -> float:
    """Proportional set size in MB (shared pages divided among their users); 0 when the process is gone."""
    try:
        return float(getattr(psutil.Process(pid).memory_full_info(), "pss", 0)) / (1024 * 1024)
    except psutil.Error:
        return 0.0


def rss_mb(pid: int) -> float:
    try:
        return float(psutil.Process(pid).memory_info().rss) / (1024 * 1024)
    except psutil.Error:
        return 0.0


def group_pids(pgid: int) -> list[int]:
    return [process.pid for process in group_members(pgid)]


class BenchService:
    """A `studio livy` child process for the bench."""

    def __init__(self, state_dir: Path, pool: int, env: dict[str, str] | None = None, args: list[str] | None = None) -> None:
        self.state_dir = state_dir
        self.pool = pool
        self.args = args or []
        self.token = secrets.token_urlsafe(32)  # each bench service has its own; passed in its environment
        self.env = {**os.environ, **(env or {}), "STUDIO_TOKEN": self.token}
        self.launcher: ServiceLauncher
        self.url = ""

    def __enter__(self) -> "BenchService":
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.launcher = ServiceLauncher(
            "livy",
            ["--port", "0", "--pool", str(self.pool), "--state-dir", str(self.state_dir), "--stop-sessions-on-exit", *self.args],
            ready_file=self.state_dir / "ready.json",
            log_path=self.state_dir / "service.log",
            env=self.env,
        )
        self.url = self.launcher.start_sync(timeout=300)
        self.client = LivyClient(self.url, timeout=600, authorization=f"Bearer {self.token}")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.client.close()
        self.launcher.stop_sync(timeout=120)

    @property
    def process(self) -> ChildProcess:
        return self.launcher.process

    def status(self) -> dict[str, Any]:
        return self.client.request("GET", "/studio/status")

    def wait_pool(self, settle: float = 3.0, timeout: float = 600.0) -> dict[str, Any]:
        """Wait for a full pool, then a little more so the newest worker's JIT has settled."""
        deadline = time.monotonic() + timeout
        while True:
            pool = self.status()["pool"]
            if pool["ready"] >= self.pool:
                time.sleep(settle)
                return pool
            if time.monotonic() > deadline or pool["failuresInARow"] >= 3:
                raise RuntimeError(f"the warm pool did not fill: {pool}")
            time.sleep(0.2)

    def create_session(self, **body: Any) -> dict[str, Any]:
        return self.client.create_session(body)

    def wait_idle(self, session_id: int, timeout: float = 600.0) -> None:
        # Polled every 20 ms (not the client's backoff): the time to idle is what is measured.
        deadline = time.monotonic() + timeout
        while True:
            state = self.client.get_session(session_id)["state"]
            if state == "idle":
                return
            if state in FINAL_SESSION_STATES or time.monotonic() > deadline:
                raise RuntimeError(f"session {session_id} is {state}")
            time.sleep(0.02)

    def run(self, session_id: int, code: str) -> dict[str, Any]:
        """Submit and wait with the ?wait extension: returns as soon as the statement is final."""
        statement = self.client.submit(session_id, code)
        while statement["state"] not in FINAL_STATEMENT_STATES:
            statement = self.client.statement(session_id, statement["id"], wait=60, detail=False)
        if statement["output"]["status"] != "ok":
            raise RuntimeError(f"statement failed: {statement['output']}")
        return statement

    def delete(self, session_id: int) -> None:
        self.client.delete_session(session_id)


def time_to_first_result(service: BenchService, **body: Any) -> float:
    started = time.perf_counter()
    session = service.create_session(kind="pyspark", **body)
    service.wait_idle(session["id"])
    service.run(session["id"], FIRST_RESULT)
    elapsed = time.perf_counter() - started
    service.delete(session["id"])
    return elapsed


def plain_pyspark_first_result(master: str, env: dict[str, str]) -> float:
    """Spawn-to-first-result of plain PySpark, started the usual way (no studio, no CDS)."""
    code = PLAIN_PYSPARK.format(master=master)
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "output.log"
        child = ChildProcess([sys.executable, "-P", "-c", code, repr(time.time())], name="plain PySpark", cwd=folder, env=env, output=output)
        child.start()
        if child.wait_sync(600) is None:
            child.stop_sync(now=True)
        text = output.read_text(errors="replace")
    for line in text.splitlines():
        if line.startswith("FIRST_RESULT"):
            return float(line.split()[1])
    raise RuntimeError(f"plain PySpark failed: {text[-2000:]}")


def in_process_round_trip(runs: int) -> dict[str, dict[str, float]]:
    from studio.worker.repl import PythonRepl

    repl = PythonRepl({}, 1 << 20)
    through_repl, bare = [], []
    compiled = compile("1+1", "<bench>", "eval")
    for i in range(runs):
        started = time.perf_counter()
        repl.execute(i, "1+1")
        through_repl.append(time.perf_counter() - started)
        started = time.perf_counter()
        eval(compiled)  # noqa: S307 - the constant 1+1 compiled above: the baseline of the REPL's cost
        bare.append(time.perf_counter() - started)
    return {"livy_repl_in_process": summary(through_repl), "bare_eval": summary(bare)}


def rest_round_trips(service: BenchService, session_id: int, runs: int) -> dict[str, dict[str, float]]:
    one_request, two_requests = [], []
    for _ in range(10):
        service.run(session_id, "1+1")
    for _ in range(runs):
        started = time.perf_counter()
        statement = service.client.submit(session_id, "1+1", wait=10)
        assert statement["state"] == "available"
        one_request.append(time.perf_counter() - started)
        started = time.perf_counter()
        service.run(session_id, "1+1")
        two_requests.append(time.perf_counter() - started)
    return {"post_with_wait": summary(one_request), "post_then_get_wait": summary(two_requests)}


class BenchKernel:
    """A PySpark kernel driven through jupyter_client, as JupyterLab drives it."""

    def __init__(self, jupyter_path: Path, livy_url: str, livy_token: str) -> None:
        from jupyter_client.kernelspec import KernelSpecManager
        from jupyter_client.manager import KernelManager

        # Looked up in this process: the kernelspec written for this run, never an installed one.
        specs = KernelSpecManager(kernel_dirs=[str(jupyter_path / "kernels")])
        self.manager = KernelManager(kernel_name="pyspark", kernel_spec_manager=specs)
        env = {**os.environ, "JUPYTER_PATH": str(jupyter_path), "STUDIO_LIVY_URL": livy_url, "STUDIO_LIVY_TOKEN": livy_token}
        self.manager.start_kernel(env=env)
        self.client = self.manager.client()
        self.client.start_channels()

    def run(self, code: str, timeout: float = 900) -> dict[str, Any]:
        msg_id = self.client.execute(code)
        while True:
            reply = self.client.get_shell_msg(timeout=timeout)
            if reply["parent_header"].get("msg_id") == msg_id:
                if reply["content"]["status"] != "ok":
                    raise RuntimeError(f"cell failed: {reply['content'].get('evalue')}")
                return reply["content"]

    def close(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel()


def kernel_figures(service: BenchService, args: argparse.Namespace, jupyter_path: Path, log: Any) -> dict[str, Any]:
    from studio.kernel.install import write_kernelspec

    write_kernelspec(jupyter_path)
    # The floor: a plain IPython kernel (ipykernel's own "python3") from start to ready.
    plain = []
    for _ in range(args.warm_runs):
        from jupyter_client.manager import KernelManager

        started = time.perf_counter()
        manager = KernelManager(kernel_name="python3")
        manager.start_kernel()
        client = manager.client()
        client.start_channels()
        client.wait_for_ready(timeout=60)
        plain.append(time.perf_counter() - started)
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    starts = []
    for run in range(args.warm_runs):
        service.wait_pool()
        started = time.perf_counter()
        kernel = BenchKernel(jupyter_path, service.url, service.token)
        try:
            kernel.client.wait_for_ready(timeout=60)
            kernel.run(FIRST_RESULT)
            starts.append(time.perf_counter() - started)
        finally:
            kernel.close()
        log(f"kernel run {run + 1}: kernel start to first result {starts[-1]:.2f} s")

    rows = args.transfer_rows
    service.wait_pool()
    kernel = BenchKernel(jupyter_path, service.url, service.token)
    ours, in_process, json_lines = [], [], []
    try:
        kernel.client.wait_for_ready(timeout=60)
        kernel.run(TRANSFER_SETUP.format(rows=rows))
        session_id = next(s["id"] for s in service.client.list_sessions() if s["state"] == "idle")
        for run in range(args.transfer_runs):
            statement = service.run(session_id, IN_PROCESS_TO_PANDAS)
            in_process.append(float(statement["output"]["data"]["text/plain"]))
            started = time.perf_counter()
            kernel.run("%%sql -o bench_frame -n -1 -q\nSELECT * FROM bench_rows")
            ours.append(time.perf_counter() - started)
            kernel.run("%%local\ndel bench_frame")
            started = time.perf_counter()
            statement = service.run(session_id, SPARKMAGIC_SQL.format(rows=rows))
            records = [json.loads(line) for line in statement["output"]["data"]["text/plain"].split("\n") if line]
            import pandas as pd

            frame = pd.DataFrame.from_records(records)
            json_lines.append(time.perf_counter() - started)
            if len(frame) != rows:
                raise RuntimeError(f"the JSON-lines path brought {len(frame)} rows, not {rows}")
            del frame, records, statement
            log(
                f"transfer run {run + 1}: %%sql (Arrow) {ours[-1]:.2f} s, in-process toPandas {in_process[-1]:.2f} s, "
                f"sparkmagic JSON lines {json_lines[-1]:.2f} s"
            )
    finally:
        kernel.close()
    return {
        "kernel_start_to_first_result_seconds": summary(starts),
        "plain_ipykernel_start_to_ready_seconds": summary(plain),
        "transfer_rows": rows,
        "sql_magic_arrow_seconds": summary(ours),
        "in_process_to_pandas_arrow_seconds": summary(in_process),
        "sparkmagic_json_lines_seconds": summary(json_lines),
        "sql_magic_over_in_process": summary([o / i for o, i in zip(ours, in_process)]),
        "json_lines_over_sql_magic": summary([j / o for j, o in zip(json_lines, ours)]),
    }


def ensure_cds(settings: Settings) -> dict[str, Any]:
    from studio.livy.cds import CdsArchive

    archive = CdsArchive(settings)
    if not archive.enabled:
        return {"enabled": False}
    started = time.monotonic()
    existed = archive.exists()
    if not existed:
        print("building the driver class-data archive (once per installation)...", file=sys.stderr, flush=True)
        asyncio.run(archive.build(nice=0))
    return {"enabled": True, "path": str(archive.path), "built_now": not existed, "build_seconds": round(time.monotonic() - started, 1) if not existed else 0}


def main(args: argparse.Namespace) -> int:
    settings = Settings()
    env = {**os.environ, "SPARK_LOCAL_IP": settings.spark_local_ip, "PYSPARK_PYTHON": sys.executable}
    state_root = Path(args.state_dir or tempfile.mkdtemp(prefix="studio-bench-"))
    results: dict[str, Any] = {"master": settings.master, "machine": {"cpus": os.cpu_count()}}
    results["cds"] = ensure_cds(settings)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    if args.applications:
        from studio.bench_applications import applications_figures, print_applications_table

        results["applications"] = applications_figures(args, state_root, log, env)
        print_applications_table(results["applications"])
        _report(results, args)
        return 0 if results["applications"]["maximum_capacity"]["held"] else 1
    if args.density:
        from studio.bench_density import density_figures, density_ok, print_density_table

        results["density"] = density_figures(args, state_root, log)
        print_density_table(results["density"])
        _report(results, args)
        return 0 if density_ok(results["density"]) else 1
    if args.load:
        results["load"] = load_figures(args, state_root, log)
        print_load_table(results["load"])
        _report(results, args)
        return 1 if results["load"]["problems"] or results["load"]["sessions_not_idle_after"] else 0

    # -- warm pool: first results, the service's share, round trips, memory --------------------
    # The output limit is raised only so sparkmagic's JSON-lines path (~100 MB of text for 1M rows)
    # can be measured at all; Livy would refuse it too (50 MB RPC limit).
    warm_env = {"STUDIO_POOL_REFILL_MAX_DELAY": "60", "STUDIO_MAX_OUTPUT_BYTES": str(1 << 30)}
    with BenchService(state_root / "warm", pool=1, env=warm_env) as warm:
        pool = warm.wait_pool()
        worker = pool["readyWorkers"][0]
        members = group_pids(worker["pid"])
        just_ready = sum(rss_mb(pid) for pid in members)
        # An idle worker settles: Spark's cached thread pools let their threads go after 60 s
        # and G1 returns heap it no longer needs. Measure it as it waits in the pool.
        settle = max(0.0, args.idle_seconds - worker["idleSeconds"])
        log(f"memory: {just_ready:.0f} MB right after warm-up; measuring again after {args.idle_seconds:.0f} s idle")
        time.sleep(settle)
        results["memory_mb"] = {
            "service": round(rss_mb(warm.process.pid), 1),  # type: ignore[arg-type]
            "idle_warm_worker_python": round(rss_mb(worker["pid"]), 1),
            "idle_warm_worker_jvm": round(rss_mb(worker["jvmPid"]), 1) if worker.get("jvmPid") else None,
            "idle_warm_worker_total": round(sum(rss_mb(pid) for pid in members), 1),
            "idle_warm_worker_total_pss": round(sum(pss_mb(pid) for pid in members), 1),
            "warm_worker_right_after_warm_up": round(just_ready, 1),
            "idle_seconds": args.idle_seconds,
        }
        log(f"memory: {results['memory_mb']}")
        firsts, in_process, shares = [], [], []
        for run in range(args.warm_runs):
            warm.wait_pool()
            started = time.perf_counter()
            session = warm.create_session(kind="pyspark")
            if session["state"] != "idle":
                raise RuntimeError("the warm session was not idle at once")
            warm.run(session["id"], FIRST_RESULT)
            first = time.perf_counter() - started
            probe = float(warm.run(session["id"], IN_PROCESS_PROBE)["output"]["data"]["text/plain"])
            firsts.append(first)
            in_process.append(probe)
            shares.append(first - probe)
            log(f"warm run {run + 1}: first result {first * 1000:.0f} ms, in-process {probe * 1000:.0f} ms")
            if run == args.warm_runs - 1:
                results["round_trip_1_plus_1_seconds"] = {
                    "rest": rest_round_trips(warm, session["id"], args.runs),
                    "in_process": in_process_round_trip(args.runs),
                }
            warm.delete(session["id"])
        results["warm_first_result_seconds"] = summary(firsts)
        results["warm_in_process_statement_seconds"] = summary(in_process)
        results["warm_service_share_seconds"] = summary(shares)

        # -- pool miss (own JVM) vs plain PySpark, interleaved ------------------------------------
        misses, plains = [], []
        for run in range(args.cold_runs):
            warm.wait_pool(settle=1)
            plains.append(plain_pyspark_first_result(settings.master, env))
            misses.append(time_to_first_result(warm, driverMemory="1g"))
            log(f"cold run {run + 1}: plain PySpark {plains[-1]:.1f} s, pool miss {misses[-1]:.1f} s")
        results["pool_miss_first_result_seconds"] = summary(misses)
        results["plain_pyspark_first_result_seconds"] = summary(plains)
        results["pool_miss_over_plain_pyspark"] = summary([m / p for m, p in zip(misses, plains)])

        # -- the PySpark kernel: start to first result, and %%sql of many rows --------------------
        results["kernel"] = kernel_figures(warm, args, state_root / "jupyter", log)

    # -- --pool 0: every session cold ---------------------------------------------------------------
    with BenchService(state_root / "cold", pool=0) as cold:
        colds = []
        for run in range(args.cold_runs):
            colds.append(time_to_first_result(cold))
            log(f"--pool 0 run {run + 1}: first result {colds[-1]:.1f} s")
        results["cold_first_result_seconds"] = summary(colds)
    results["cold_over_warm_first_result"] = (
        results["cold_first_result_seconds"]["p50"] / results["warm_first_result_seconds"]["p50"]
    )
    print_table(results)
    _report(results, args)
    return 0


def _report(results: dict[str, Any], args: argparse.Namespace) -> None:
    """Every figure as JSON, on stdout and into ``--json`` when given."""
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


def print_table(r: dict[str, Any]) -> None:
    ms = lambda s: f"{s * 1000:.1f} ms"  # noqa: E731
    rt = r["round_trip_1_plus_1_seconds"]
    k = r["kernel"]
    rows = [
        ("warm: POST /sessions -> first result (p50 / p95)", f"{ms(r['warm_first_result_seconds']['p50'])} / {ms(r['warm_first_result_seconds']['p95'])}", "<= 500 ms"),
        ("  same statement in-process on that session (p50)", ms(r["warm_in_process_statement_seconds"]["p50"]), ""),
        ("  service's share (p50)", ms(r["warm_service_share_seconds"]["p50"]), "<= 100 ms"),
        ("cold (--pool 0): first result (p50)", f"{r['cold_first_result_seconds']['p50']:.2f} s", ""),
        ("cold / warm first result", f"{r['cold_over_warm_first_result']:.0f}x", ">= 40x"),
        ("pool miss (own JVM): first result (p50)", f"{r['pool_miss_first_result_seconds']['p50']:.2f} s", ""),
        ("plain PySpark: first result (p50)", f"{r['plain_pyspark_first_result_seconds']['p50']:.2f} s", ""),
        ("pool miss / plain PySpark (paired p50)", f"{r['pool_miss_over_plain_pyspark']['p50']:.2f}", "<= 0.5"),
        ("1+1 over REST, one request with ?wait (p50 / p95)", f"{ms(rt['rest']['post_with_wait']['p50'])} / {ms(rt['rest']['post_with_wait']['p95'])}", "<= 5 ms"),
        ("1+1 over REST, POST then GET ?wait (p50 / p95)", f"{ms(rt['rest']['post_then_get_wait']['p50'])} / {ms(rt['rest']['post_then_get_wait']['p95'])}", ""),
        ("1+1 in-process through the Livy REPL (p50)", ms(rt["in_process"]["livy_repl_in_process"]["p50"]), ""),
        ("1+1 in-process, bare eval (p50)", f"{rt['in_process']['bare_eval']['p50'] * 1e6:.2f} us", ""),
        ("kernel start -> first result of spark.range(1).count() (p50)", f"{k['kernel_start_to_first_result_seconds']['p50']:.2f} s", "<= 1 s"),
        ("  plain IPython kernel, start to ready (p50)", f"{k['plain_ipykernel_start_to_ready_seconds']['p50']:.2f} s", ""),
        (f"%%sql of {k['transfer_rows']:,} rows x 5 columns into pandas, Arrow (p50)", f"{k['sql_magic_arrow_seconds']['p50']:.2f} s", ""),
        ("  in-process toPandas() with Arrow, same data (p50)", f"{k['in_process_to_pandas_arrow_seconds']['p50']:.2f} s", ""),
        ("  %%sql / in-process (paired p50)", f"{k['sql_magic_over_in_process']['p50']:.2f}", "<= 2"),
        ("  sparkmagic's JSON-lines path, same data (p50)", f"{k['sparkmagic_json_lines_seconds']['p50']:.2f} s", ""),
        ("RSS of the service", f"{r['memory_mb']['service']:.0f} MB", ""),
        ("RSS of one idle warm worker (Python + JVM)", f"{r['memory_mb']['idle_warm_worker_total']:.0f} MB", "<= 450 MB"),
        ("  its PSS / its RSS right after warm-up", f"{r['memory_mb']['idle_warm_worker_total_pss']:.0f} / {r['memory_mb']['warm_worker_right_after_warm_up']:.0f} MB", ""),
    ]
    width = max(len(row[0]) for row in rows)
    print(f"{'measure'.ljust(width)}  {'value':>20}  target")
    for name, value, target in rows:
        print(f"{name.ljust(width)}  {value:>20}  {target}")


# -- --load: many notebooks at once ---------------------------------------------------------------


def percentiles(values: list[float]) -> dict[str, float]:
    return {"p50": percentile(values, 50), "p95": percentile(values, 95), "p99": percentile(values, 99), "n": len(values)}


def _wait_all_idle(client: LivyClient, session_ids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    waiting = set(session_ids)
    while waiting:
        for session_id in sorted(waiting):
            state = client.get_session(session_id)["state"]
            if state == "idle":
                waiting.discard(session_id)
            elif state in FINAL_SESSION_STATES:
                raise RuntimeError(f"session {session_id} is {state}: {client.log(session_id, 50)}")
        if waiting and time.monotonic() > deadline:
            raise RuntimeError(f"sessions {sorted(waiting)} did not become idle in {timeout:.0f}s")
        time.sleep(0.5)


def _http(service: BenchService, timeout: float = 300.0) -> Any:
    import httpx

    return httpx.Client(base_url=service.url, timeout=timeout, headers={"Authorization": f"Bearer {service.token}"}, trust_env=False)


def _round_trips(statements: list[Any]) -> dict[str, Any]:
    """Round-trip percentiles of the statements that came back, over all and per kind (seconds)."""
    done = [s for s in statements if s.seconds is not None]
    figures: dict[str, Any] = {"all": percentiles([s.seconds for s in done])}
    for kind in ("trivial", "spark", "failing"):
        figures[kind] = percentiles([s.seconds for s in done if s.kind == kind])
    return figures


def load_figures(args: argparse.Namespace, state_root: Path, log: Any) -> dict[str, Any]:
    """``args.load_sessions`` sessions each sent ``args.load_statements`` statements by a client of
    its own, and ``args.load_kernels`` PySpark kernels running a notebook again and again, all at
    once; beside it, in the same run, one client alone on one of those sessions with the same mix.
    Cold sessions (``--pool 0``, started side by side): a pool of 10 would take minutes of JVM starts
    on its own and measure the same statements."""
    import threading

    from studio.kernel.install import write_kernelspec
    from studio.load import KernelNotebook, SessionLoad, in_thread, ledger, statements_for, tally

    sessions, count, kernels = args.load_sessions, args.load_statements, args.load_kernels
    env = {
        "STUDIO_RETAINED_STATEMENTS": str(10 * count + 100),  # the books read every statement back
        "STUDIO_WORKER_START_TIMEOUT": "900",  # sessions + kernels' JVMs start side by side on few cores
        "STUDIO_MAX_SESSIONS": str(sessions + kernels + 2),
    }
    jupyter_path = state_root / "jupyter"
    write_kernelspec(jupyter_path)
    results: dict[str, Any] = {"sessions": sessions, "statements_per_session": count, "kernels": kernels, "pool": 0}
    with BenchService(state_root / "load", pool=0, env=env) as service:
        started = time.monotonic()
        ids = [int(service.create_session(kind="pyspark")["id"]) for _ in range(sessions)]
        notebooks: list[KernelNotebook] = []
        bench_kernels: list[BenchKernel] = []
        try:
            for number in range(kernels):
                kernel = BenchKernel(jupyter_path, service.url, service.token)
                kernel.client.wait_for_ready(timeout=300)
                bench_kernels.append(kernel)
            # The kernels' first notebook run starts their sessions, beside the REST ones.
            first_runs = [KernelNotebook(k.client, n) for n, k in enumerate(bench_kernels)]
            threads = [threading.Thread(target=in_thread(nb.run)) for nb in first_runs]
            for thread in threads:
                thread.start()
            _wait_all_idle(service.client, ids, timeout=1200)
            for thread in threads:
                thread.join()
            results["start_seconds"] = round(time.monotonic() - started, 1)
            log(f"load: {sessions} sessions and {kernels} kernels up in {results['start_seconds']} s")
            with _http(service) as http:
                # Warm-up (not timed): every session's first jobs, side by side.
                warm = [SessionLoad(http, sid, statements_for(sid, 10)) for sid in ids]
                threads = [threading.Thread(target=w.run) for w in warm]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                time.sleep(3)
                # One client alone, the same mix, on the first session.
                single = SessionLoad(http, ids[0], statements_for(ids[0], count, first=300))
                single.run()
                log(f"load: single client {tally(single.statements)}")
                # Everything at once.
                loads = [SessionLoad(http, sid, statements_for(sid, count, first=600)) for sid in ids]
                running = threading.Event()
                running.set()
                notebooks = [KernelNotebook(k.client, n, runs=1, until=lambda: not running.is_set()) for n, k in enumerate(bench_kernels)]
                load_threads = [threading.Thread(target=w.run) for w in loads]
                kernel_threads = [threading.Thread(target=in_thread(nb.run)) for nb in notebooks]
                load_started = time.monotonic()
                for thread in load_threads + kernel_threads:
                    thread.start()
                for thread in load_threads:
                    thread.join()
                load_seconds = time.monotonic() - load_started
                running.clear()
                for thread in kernel_threads:
                    thread.join()
                everything = [s for w in loads for s in w.statements]
                problems = [s.describe() for s in everything + single.statements + [s for w in warm for s in w.statements] if s.outcome != "ok"]
                for w in [single, *loads, *warm]:
                    if w.error is not None:
                        problems.append(f"session {w.session_id}'s client stopped: {w.error!r}")
                for sid, w, first in zip(ids, loads, warm):
                    mine = [*first.statements, *w.statements, *(single.statements if sid == ids[0] else [])]
                    problems += ledger(http, sid, mine)
                states = {s["id"]: s["state"] for s in service.client.list_sessions()}
                dead = sorted(sid for sid, state in states.items() if state != "idle")
                problems += [nb_problem for nb in first_runs + notebooks for nb_problem in nb.problems()]
        finally:
            for kernel in bench_kernels:
                kernel.close()
    cells = [r for nb in notebooks for r in nb.results]
    alone, loaded = _round_trips(single.statements), _round_trips(everything)
    results.update(
        {
            "single_client_round_trip_seconds": alone,
            "load_round_trip_seconds": loaded,
            "load_seconds": round(load_seconds, 1),
            "load_statements_per_second": round(len(everything) / load_seconds, 1),
            "load_over_single": {q: loaded["all"][q] / alone["all"][q] for q in ("p50", "p95", "p99")},
            "statements": {"sent": len(everything), **tally(everything)},
            "kernel_cells": {"run": len(cells), "correct": sum(1 for r in cells if r.correct)},
            "kernel_cell_seconds": percentiles([r.seconds for r in cells]),
            "sessions_not_idle_after": dead,
            "problems": problems[:50],
        }
    )
    return results


def print_load_table(r: dict[str, Any]) -> None:
    ms = lambda s: f"{s * 1000:.0f} ms" if s < 10 else f"{s:.1f} s"  # noqa: E731
    single, load = r["single_client_round_trip_seconds"], r["load_round_trip_seconds"]
    print(
        f"load: {r['sessions']} sessions x {r['statements_per_session']} statements over REST + {r['kernels']} kernels "
        f"running a notebook, at once (cold sessions, --pool 0; {r['load_seconds']} s, {r['load_statements_per_second']} statements/s)"
    )
    print(f"{'statement round trip (POST ?wait= .. final)':<46} {'p50':>9} {'p95':>9} {'p99':>9} {'n':>6}")
    rows = [("one client alone, same mix", single["all"]), ("under the load", load["all"])]
    for kind in ("trivial", "spark", "failing"):
        rows += [(f"  {kind}: alone", single[kind]), (f"  {kind}: under the load", load[kind])]
    rows.append(("kernel cell under the load", r["kernel_cell_seconds"]))
    for name, figures in rows:
        print(f"{name:<46} {ms(figures['p50']):>9} {ms(figures['p95']):>9} {ms(figures['p99']):>9} {figures['n']:>6}")
    ratio = r["load_over_single"]
    print(f"{'under the load / alone':<46} {ratio['p50']:>8.1f}x {ratio['p95']:>8.1f}x {ratio['p99']:>8.1f}x")
    s = r["statements"]
    print(
        f"statements: {s['sent']} sent, {s['ok']} correct, {s['failed']} failed by the service, {s['refused']} refused, "
        f"{s['wrong']} wrong, {s['missing']} lost; kernel cells: {r['kernel_cells']['correct']} of {r['kernel_cells']['run']} correct; "
        f"sessions not idle after: {r['sessions_not_idle_after'] or 'none'}"
    )
    for problem in r["problems"]:
        print(f"  problem: {problem}")
