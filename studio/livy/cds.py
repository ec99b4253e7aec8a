"""An AppCDS class-data archive for driver JVMs, built once per installation.

A Spark driver spends most of its start loading and verifying ~13,000 classes. A dynamic
AppCDS archive (``-XX:ArchiveClassesAtExit``, JDK 13+) written by one training run lets every
later driver map them ready-made, which cut a cold driver's start roughly in half here. The
archive is only valid for the same JVM build and the same Spark jars, so its file name carries
a fingerprint of both; a stale one is simply not used.

The service builds it in the background (at low priority) the first time it starts; until
then workers start without it. ``studio bench`` builds it up front.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import os
import shutil
import time
from pathlib import Path

from studio.config import Settings
from studio.livy import sparkconf
from studio.process import ChildProcess, python_command

log = logging.getLogger("studio.livy.cds")


def _java_binary() -> str | None:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and os.path.exists(os.path.join(java_home, "bin", "java")):
        return os.path.join(java_home, "bin", "java")
    return shutil.which("java")


def fingerprint() -> str:
    """Identifies the JVM build and the Spark distribution the archive belongs to."""
    import pyspark

    parts = [pyspark.__version__, os.path.dirname(os.path.abspath(pyspark.__file__))]
    java = _java_binary()
    if java:
        real = os.path.realpath(java)
        stat = os.stat(real)
        parts += [real, str(stat.st_size), str(int(stat.st_mtime))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _quote(path: Path) -> str:
    text = str(path)
    return f'"{text}"' if " " in text else text


class CdsArchive:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.enabled = settings.cds and _java_binary() is not None
        self.path = settings.cache_dir / "cds" / f"spark-driver-{fingerprint()}.jsa" if self.enabled else None

    def exists(self) -> bool:
        return self.path is not None and self.path.exists() and self.path.stat().st_size > 0

    def java_options(self) -> str:
        """JVM options that use the archive, or "" while there is none."""
        if not self.exists():
            return ""
        return f"-XX:SharedArchiveFile={_quote(self.path)} -Xshare:auto"  # type: ignore[arg-type]

    async def build(self, nice: int = 19, timeout: float = 600.0) -> bool:
        """Run a training driver that writes the archive at exit. True when an archive exists after."""
        if not self.enabled or self.exists():
            return self.exists()
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(self.path.with_suffix(".lock"), "w")
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                log.info("another process is building the class-data archive; not building it twice")
                return False
            if self.exists():
                return True
            tmp = self.path.with_suffix(f".tmp-{os.getpid()}")
            training_log = self.path.with_suffix(".log")
            started = time.monotonic()
            conf = sparkconf.base_conf(self.settings, f"-XX:ArchiveClassesAtExit={_quote(tmp)}")
            env = {**os.environ, **sparkconf.worker_env(self.settings)}
            training_log.unlink(missing_ok=True)  # one training run's log, not all of them
            process = ChildProcess(
                python_command(
                    "studio.worker.cds_train",
                    self.settings.master if self.settings.master.startswith("local") else "local[*]",
                    repr(conf),
                ),
                name="class-data training run",
                env=env,
                output=training_log,
                nice=nice,
            )
            process.start()
            try:
                code = await asyncio.wait_for(process.wait(), timeout)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                await process.kill()
                tmp.unlink(missing_ok=True)
                raise
            if code == 0 and tmp.exists() and tmp.stat().st_size > 0:
                os.replace(tmp, self.path)
                log.info("class-data archive built in %.0fs: %s", time.monotonic() - started, self.path)
                return True
            tmp.unlink(missing_ok=True)
            log.warning("building the class-data archive failed (exit %s); see %s", code, training_log)
            return False
        finally:
            lock.close()
