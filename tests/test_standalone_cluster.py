"""A session on a Spark standalone cluster: a master and a worker started from pyspark's own
distribution on 127.0.0.1, and `studio livy --master spark://...`; the statement's tasks run
in an executor of that worker, not in the driver."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import pytest
from pyspark.find_spark_home import _find_spark_home

from conftest import start_service


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_line(path, text, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise AssertionError(f"{text!r} not in {path}:\n{path.read_text(errors='replace')[-3000:]}")


@pytest.fixture(scope="module")
def cluster(test_root):
    folder = test_root / "standalone"
    folder.mkdir()
    spark_class = os.path.join(_find_spark_home(), "bin", "spark-class")
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "SPARK_NO_DAEMONIZE": "1"}
    port = free_port()
    master_url = f"spark://127.0.0.1:{port}"
    processes = []

    def start(name, *args):
        log = folder / f"{name}.log"
        with open(log, "wb") as output:  # the child keeps its own copy of the descriptor
            process = subprocess.Popen(
                [spark_class, *args], stdout=output, stderr=subprocess.STDOUT,
                cwd=folder, env=env, start_new_session=True,
            )
        processes.append(process)
        return log

    try:
        master_log = start("master", "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                           "--port", str(port), "--webui-port", str(free_port()))
        wait_for_line(master_log, "Starting Spark master")
        worker_log = start("worker", "org.apache.spark.deploy.worker.Worker", master_url, "--host", "127.0.0.1",
                           "--cores", "2", "--memory", "2g", "--webui-port", str(free_port()),
                           "--work-dir", str(folder / "work"))
        wait_for_line(worker_log, "Successfully registered with master")
        yield master_url
    finally:
        for process in reversed(processes):  # stop only what we started, by PID (and its group)
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def test_a_statement_runs_on_the_standalone_worker(test_root, cluster):
    service = start_service(
        test_root,
        "standalone-livy",
        env={
            "STUDIO_POOL_SIZE": "1",
            "STUDIO_POOL_WARMUP_SECONDS": "2",
            # Standalone apps take every free core unless capped; the warm worker must leave room.
            "STUDIO_SPARK_CONF": json.dumps({"spark.cores.max": "1", "spark.executor.memory": "512m"}),
        },
        args=["--master", cluster],
    )
    livy = service.client()
    try:
        service.wait_pool(1, timeout=300)
        session = livy.create_session(kind="pyspark")
        assert session["state"] == "idle"
        sid = session["id"]
        assert livy.text(sid, "sc.master") == repr(cluster)
        code = (
            "import os\n"
            "def ancestry(_):\n"
            "    pid, chain = os.getpid(), []\n"
            "    while pid > 1:\n"
            "        chain.append(open(f'/proc/{pid}/cmdline').read())\n"
            "        pid = int(open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[1])\n"
            "    return ' | '.join(chain)\n"
            "sc.parallelize(range(2), 2).map(ancestry).collect()"
        )
        chains = livy.text(sid, code)
        assert "CoarseGrainedExecutorBackend" in chains
        assert "SparkSubmit" not in chains  # not the driver's own JVM
        assert livy.text(sid, "spark.range(1000).selectExpr('sum(id)').first()[0]") == "499500"
    finally:
        livy.close()
        assert service.stop() == 0
    assert not service.leftovers()
