"""From Livy's session and batch settings to Spark configuration, and the conf every worker gets.

Which settings a warm worker can honour is decided by Spark itself: on hand-out the worker asks
``spark.conf.isModifiable(key)`` for every key, and any key that is not a runtime SQL conf sends
the session to a cold worker of its own (see ``SessionManager.create``).
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

from studio.auth.credentials import without_secrets
from studio.worker.properties import write_properties

__all__ = ["write_properties"]  # batches write their conf with it, as workers do
from studio.config import Settings
from studio.errors import InvalidRequestError
from studio.livy.models import check_memory

# Livy field -> Spark conf key (Livy's own mapping).
_FIELDS = {
    "driverMemory": "spark.driver.memory",
    "driverCores": "spark.driver.cores",
    "executorMemory": "spark.executor.memory",
    "executorCores": "spark.executor.cores",
    "numExecutors": "spark.executor.instances",
    "queue": "spark.yarn.queue",
}
_LIST_FIELDS = {
    "jars": "spark.jars",
    "pyFiles": "spark.submit.pyFiles",
    "files": "spark.files",
    "archives": "spark.archives",
}

# Livy's spark-blacklist.conf: the server decides these.
BLACKLIST = frozenset(
    {
        "spark.master",
        "spark.submit.deployMode",
        "spark.yarn.jar",
        "spark.yarn.jars",
        "spark.yarn.archive",
        "livy.rsc.server.idle-timeout",
    }
)

# Conf the service itself interprets instead of Spark; never a reason for a cold worker.
#  - livy.rsc.*: Livy's driver settings (livy.rsc.sql.num-rows: rows of a sql statement).
#  - spark.pyspark.virtualenv.*: what EMR notebooks set before sc.install_pypi_package;
#    notebook-scoped packages work without it here.
SERVICE_PREFIXES = ("livy.rsc.", "spark.pyspark.virtualenv.")


# Conf keys that hold JVM memory sizes: a malformed one only shows when the driver fails to start.
MEMORY_KEYS = frozenset(
    {
        "spark.driver.memory",
        "spark.executor.memory",
        "spark.driver.memoryOverhead",
        "spark.executor.memoryOverhead",
        "spark.executor.pyspark.memory",
        "spark.driver.maxResultSize",
    }
)


def check_settings(body: Any) -> None:
    """What can be checked in a session's or batch's settings without starting a driver: memory
    sizes (fields and conf) and counts that must not be negative. Raises InvalidRequestError."""
    for field in ("driverMemory", "executorMemory"):
        check_memory(getattr(body, field), field)
    for key, value in body.conf.items():
        if key in MEMORY_KEYS:
            check_memory(value, key)
    for field in ("driverCores", "executorCores", "numExecutors"):
        value = getattr(body, field)
        if value is not None and value < 0:
            raise InvalidRequestError(f"Rejected, Reason: {field} must not be negative, got {value}.")


def requested_conf(body: Any) -> dict[str, str]:
    """The Spark conf a session or batch body asks for (fields mapped, then ``conf``)."""
    conf: dict[str, str] = {}
    for field, key in _FIELDS.items():
        value = getattr(body, field)
        if value is not None:
            conf[key] = str(value)
    for field, key in _LIST_FIELDS.items():
        values = getattr(body, field)
        if values:
            conf[key] = ",".join(values)
    for key, value in body.conf.items():
        if key in BLACKLIST:
            raise InvalidRequestError(f"Rejected, Reason: Blacklisted configuration values in session config: {key}")
        conf[key] = value
    return conf


def needs_own_jvm(spark_conf: dict[str, str]) -> bool:
    """True when the conf surely needs a driver of its own. Only SQL conf (``spark.sql.*``) can be
    runtime conf; whether a given SQL key is, the warm worker asks Spark on hand-out."""
    return any(not key.startswith("spark.sql.") for key in spark_conf)


def split_service_conf(conf: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(Spark conf, conf the service interprets itself)."""
    spark = {k: v for k, v in conf.items() if not k.startswith(SERVICE_PREFIXES)}
    service = {k: v for k, v in conf.items() if k.startswith(SERVICE_PREFIXES)}
    return spark, service


def child_env(settings: Settings) -> dict[str, str]:
    """The whole environment of a worker or batch: the service's own, minus the studio's secrets
    (they run the user's code), plus ``worker_env``."""
    return {**without_secrets(dict(os.environ)), **worker_env(settings)}


def worker_env(settings: Settings) -> dict[str, str]:
    """Environment of every worker and batch: loopback binding, this Python for executors."""
    return {
        "SPARK_LOCAL_IP": settings.spark_local_ip,
        "PYSPARK_PYTHON": os.environ.get("PYSPARK_PYTHON", sys.executable),
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        "MPLBACKEND": "Agg",
        "PYTHONUNBUFFERED": "1",
        # The JVM's many threads would otherwise each get a glibc malloc arena (~20 MB idle RSS).
        "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "2"),
    }


USER_CONF = "spark.studio.user"  # the Spark user of a session or batch, in its conf (the UI's Environment tab)


def user_env(user: str | None) -> dict[str, str]:
    """Environment that makes a driver run as ``user`` (a name ``studio.livy.access`` checked):
    Spark's ``sparkUser`` (``SPARK_USER``) and Hadoop's simple-auth login (``HADOOP_USER_NAME``)."""
    return {"SPARK_USER": user, "HADOOP_USER_NAME": user} if user else {}


def user_conf(user: str | None) -> dict[str, str]:
    return {USER_CONF: user} if user else {}


def merge_java_options(*parts: str) -> str:
    return " ".join(part.strip() for part in parts if part and part.strip())


# Driver JVM options for a small idle footprint (measured by `studio bench`): start with a small
# heap and let G1 give memory back after collections and when idle, instead of keeping the
# heap it once needed (the JVM default starts at 1/64 of RAM and rarely shrinks).
LEAN_JVM_OPTIONS = "-Xms64m -XX:MinHeapFreeRatio=10 -XX:MaxHeapFreeRatio=30 -XX:G1PeriodicGCInterval=60000"


def base_conf(settings: Settings, java_options: str) -> dict[str, str]:
    """Conf every driver starts with; the session's own conf is laid over it."""
    conf = {
        "spark.ui.port": "0",  # any free port: many drivers share this machine
        "spark.ui.showConsoleProgress": "false",  # progress bars would fill the log
        **settings.spark_conf,
    }
    options = merge_java_options(
        LEAN_JVM_OPTIONS, conf.get("spark.driver.extraJavaOptions", ""), java_options, settings.java_options
    )
    if options:
        conf["spark.driver.extraJavaOptions"] = options
    return conf


def overlay(base: dict[str, str], *layers: dict[str, str]) -> dict[str, str]:
    """Each layer's conf over the ones before (the session's over its application's over the base);
    JVM options are appended, not replaced."""
    merged = dict(base)
    key = "spark.driver.extraJavaOptions"
    for own in layers:
        options = merge_java_options(merged[key], own[key]) if key in merged and key in own else None
        merged.update(own)
        if options is not None:
            merged[key] = options
    return merged


_LIST_KEYS = frozenset({*_LIST_FIELDS.values(), "spark.jars.packages", "spark.jars.excludes", "spark.jars.repositories"})
_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)b?\s*$", re.IGNORECASE)


def _same(key: str, wanted: str, has: str | None) -> bool:
    """Whether a driver with ``has`` for ``key`` already is what ``wanted`` asks (2g is 2048m; a list
    of jars in another order is the same list)."""
    if has is None:
        return False
    if key in MEMORY_KEYS:
        a, b = _SIZE.match(wanted), _SIZE.match(has)
        if a and b:
            scale = {"k": 1, "": 1024, "m": 1024, "g": 1024**2, "t": 1024**3}  # KB; a bare number is MB as Spark reads it
            return int(a.group(1)) * scale[a.group(2).lower()] == int(b.group(1)) * scale[b.group(2).lower()]
    if key in _LIST_KEYS:
        return sorted(x.strip() for x in wanted.split(",") if x.strip()) == sorted(x.strip() for x in has.split(",") if x.strip())
    return wanted.strip() == has.strip()


def beyond_shape(requested: dict[str, str], shape: dict[str, str]) -> dict[str, str]:
    """The part of a session's conf that its application's drivers do not have already: a session that
    asks for its application's shape (``driverMemory: 2g`` in an application of 2g drivers) asks for
    nothing a warm driver lacks."""
    return {k: v for k, v in requested.items() if not _same(k, v, shape.get(k))}
