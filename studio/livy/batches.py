"""Batches: ``spark-submit`` runs with Livy's states ``starting`` → ``running`` → ``success`` /
``dead`` / ``killed``.

A batch is ``running`` once its SparkContext is up. Every batch writes a Spark event log into a
folder of its own, and the event log file appears exactly when the SparkContext starts and is
named after the application id, so that folder tells both facts without parsing log text.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

from studio import files, redact
from studio.config import Settings
from studio.errors import CapacityError, InvalidRequestError, NotFoundError, TooManySessionsError
from studio.livy import sparkconf
from studio.livy.access import Parties
from studio.livy.logs import LogFile, RetainedLogs
from studio.livy.models import BATCH_TRANSITIONS, CreateBatch, SessionState, check_transition, view
from studio.livy.pool import available_memory_mb
from studio.process import ChildProcess, describe_exit
from studio.store import Store

log = logging.getLogger("studio.livy.batches")

_UI_LINE = re.compile(r"Bound SparkUI to \S+, and started at (https?://\S+)")

# Livy field -> spark-submit flag (lists are joined with commas).
_FLAGS = {
    "className": "--class",
    "driverMemory": "--driver-memory",
    "driverCores": "--driver-cores",
    "executorMemory": "--executor-memory",
    "executorCores": "--executor-cores",
    "numExecutors": "--num-executors",
    "queue": "--queue",
    "jars": "--jars",
    "pyFiles": "--py-files",
    "files": "--files",
    "archives": "--archives",
}


def spark_submit() -> str:
    from pyspark.find_spark_home import _find_spark_home

    return os.path.join(_find_spark_home(), "bin", "spark-submit")


def _check_local_file(path: str, field: str) -> None:
    parsed = urlparse(path)
    if parsed.scheme not in ("", "file", "local"):
        return  # hdfs://, s3a://, http://: spark-submit fetches it
    local = parsed.path if parsed.scheme else path
    if not os.path.isabs(local):
        raise InvalidRequestError(f"Rejected, Reason: {field} '{path}' must be an absolute path or a URL.")
    if parsed.scheme != "local" and not os.path.exists(local):
        raise InvalidRequestError(f"Rejected, Reason: {field} '{path}' does not exist.")


class Batch:
    def __init__(self, batch_id: int, body: CreateBatch, log_file: LogFile, event_dir: Path) -> None:
        self.id = batch_id
        self.body = body
        self.name = body.name
        self.owner: str | None = None
        self.state = SessionState.STARTING
        self.log = log_file
        self.event_dir = event_dir
        self.app_id: str | None = None
        self.spark_ui_url: str | None = None
        self.process: ChildProcess | None = None
        self.killed = False
        self.ended: float | None = None
        self.monitor: asyncio.Task[None] | None = None

    def set_state(self, new: SessionState) -> None:
        check_transition(BATCH_TRANSITIONS, self.state, new, f"batch {self.id}")
        self.state = new
        if new.is_final:
            self.ended = time.monotonic()

    @property
    def live(self) -> bool:
        return not self.state.is_final

    @property
    def spark_user(self) -> str | None:
        """The user its driver runs as: its proxyUser, else its owner (``studio.livy.access``)."""
        return self.body.proxyUser or self.owner

    def to_json(self, base_url: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "owner": self.owner,
            "proxyUser": self.spark_user,  # as Livy with impersonation on: whom the driver runs as
            "state": self.state.value,
            "appId": self.app_id,
            "appInfo": {
                "driverLogUrl": f"{base_url}ui/batch/{self.id}/log",
                "sparkUiUrl": self.spark_ui_url if self.state is SessionState.RUNNING else None,
                "executorLogUrls": None,
            },
            "log": self.log.tail(10),
        }


class BatchManager:
    def __init__(self, settings: Settings, store: Store, base_conf: Callable[[], dict[str, str]], live_sessions: Callable[[], int]) -> None:
        self.settings = settings
        self.store = store
        self._base_conf = base_conf
        self._live_sessions = live_sessions
        self.batches: dict[int, Batch] = {}
        self.retained_logs = RetainedLogs()

    def list(self, start: int, size: int, visible: Callable[[Batch], bool] | None = None) -> tuple[int, builtins.list[Batch]]:
        """A page of the batches ``visible`` keeps (all without it), in id order, and how many it keeps."""
        ordered = [self.batches[k] for k in sorted(self.batches) if visible is None or visible(self.batches[k])]
        return len(ordered), view(ordered, start, size)

    def get(self, key: str | int, visible: Callable[[Batch], bool] | None = None) -> Batch:
        """A batch by id, or by name as in Livy: the live batch of that name, else the newest; among
        those ``visible`` keeps first (the caller checks its access to what this returns)."""
        text = str(key)
        if text.lstrip("-").isdigit():
            batch = self.batches.get(int(text))
        else:
            named = sorted((b for b in self.batches.values() if b.name == text), key=lambda b: (b.live, b.id))
            if visible is not None and any(visible(b) for b in named):
                named = [b for b in named if visible(b)]
            batch = named[-1] if named else None
        if batch is None:
            raise NotFoundError(f"Batch '{text}' not found.")
        return batch

    def driver_log(self, key: str, visible: Callable[[Batch], bool] | None = None) -> tuple[LogFile, Parties]:
        """The log behind ``appInfo.driverLogUrl``: of a listed batch, or of one DELETEd within the
        retention time; with whose it is (the caller checks its access)."""
        try:
            batch = self.get(key, visible)
            return batch.log, Parties(batch.owner, batch.spark_user)
        except NotFoundError:
            kept = self.retained_logs.get(int(key)) if key.isdigit() else None
            if kept is None:
                raise
            row = self.store.get("batches", int(key)) or {}
            return kept, Parties(row.get("owner"), (row.get("request") or {}).get("proxyUser") or row.get("owner"))

    def live_count(self) -> int:
        return sum(1 for b in self.batches.values() if b.live)

    def held_by(self, owner: str) -> int:
        """Live batches of ``owner`` (its quota counts them with its sessions)."""
        return sum(1 for b in self.batches.values() if b.live and b.owner == owner)

    def command(
        self, body: CreateBatch, batch_id: int, event_dir: Path, properties: Path
    ) -> tuple[builtins.list[str], dict[str, str]]:
        """spark-submit's command line and the conf it reads from ``properties`` (never from the command
        line, where `ps` would show every value to every user of the machine)."""
        conf = dict(self._base_conf())
        conf["spark.eventLog.enabled"] = "true"
        conf["spark.eventLog.dir"] = event_dir.as_uri()
        spark_conf, _ = sparkconf.split_service_conf(body.conf)
        for key in spark_conf:
            if key in sparkconf.BLACKLIST:
                raise InvalidRequestError(f"Rejected, Reason: Blacklisted configuration values in batch config: {key}")
        conf = sparkconf.overlay(conf, {**spark_conf, **sparkconf.user_conf(body.proxyUser)})
        command = [spark_submit(), "--master", self.settings.master, "--deploy-mode", "client"]
        command += ["--name", body.name or f"livy-batch-{batch_id}"]
        command += ["--properties-file", str(properties), "--load-spark-defaults"]
        for field, flag in _FLAGS.items():
            value = getattr(body, field)
            if value is None or value == []:
                continue
            command += [flag, ",".join(value) if isinstance(value, list) else str(value)]
        command.append(body.file)
        command += body.args
        return command, conf

    async def create(self, body: CreateBatch, owner: str | None = None, quota: Callable[[], None] | None = None) -> Batch:
        """Run a batch for ``owner``; ``body.proxyUser`` is its Spark user, checked by the caller
        (``studio.livy.access``). ``quota`` raises QuotaExceededError when the owner has no room left."""
        if not body.file.strip():
            raise InvalidRequestError("Rejected, Reason: File is required.")
        if body.name is not None:
            if body.name.strip().lstrip("-").isdigit() or not body.name.strip():
                raise InvalidRequestError(f"Rejected, Reason: batch name '{body.name}' must not be a number or empty.")
            if any(b.live and b.name == body.name for b in self.batches.values()):
                raise InvalidRequestError(f"Rejected, Reason: a batch named '{body.name}' already exists.")
        sparkconf.check_settings(body)
        _check_local_file(body.file, "file")
        for field in ("jars", "pyFiles", "files", "archives"):
            for path in getattr(body, field):
                _check_local_file(path.split("#", 1)[0], field)
        if quota is not None:
            quota()
        live = self._live_sessions() + self.live_count()
        if live >= self.settings.max_sessions:
            raise TooManySessionsError(
                f"Rejected, too many sessions and batches: {live} of {self.settings.max_sessions} are live "
                "(STUDIO_MAX_SESSIONS)."
            )
        free = available_memory_mb()
        if free is not None and free < self.settings.min_available_memory_mb:
            raise CapacityError(
                f"Not enough memory to start a batch: {free} MB available, "
                f"{self.settings.min_available_memory_mb} MB needed (STUDIO_MIN_AVAILABLE_MEMORY_MB)."
            )
        batch_id = self.store.next_id("batch")
        event_dir = self.settings.state_dir / "events" / f"batch-{batch_id}"
        workdir = self.settings.state_dir / "work" / f"batch-{batch_id}"
        command, conf = self.command(body, batch_id, event_dir, workdir / "spark.properties")
        event_dir.mkdir(parents=True, exist_ok=True)
        workdir.mkdir(parents=True, exist_ok=True)
        sparkconf.write_properties(workdir / "spark.properties", conf)
        self.settings.log_dir.mkdir(parents=True, exist_ok=True)
        batch = Batch(batch_id, body, LogFile(self.settings.log_dir / f"batch-{batch_id}.log"), event_dir)
        batch.owner = owner
        self.store.insert(
            "batches",
            {
                "id": batch_id,
                "name": body.name,
                "owner": owner,
                "state": batch.state.value,
                "log_path": str(batch.log.path),
                "request": body.model_dump(),
            },
        )
        self.batches[batch_id] = batch  # once on record (a full disk refuses it before: 507)
        batch.log.append("spark-submit " + " ".join(redact.command(command[1:])), source="StudioBatch")
        shown = redact.conf(conf) or {}
        batch.log.append("with conf " + " ".join(f"{key}={value}" for key, value in shown.items()), source="StudioBatch")
        batch.process = ChildProcess(
            command,
            name=f"batch {batch_id}",
            cwd=workdir,
            env={**sparkconf.child_env(self.settings), **sparkconf.user_env(body.proxyUser or owner)},
            output=batch.log.path,
            stop_timeout=self.settings.stop_timeout,
        )
        batch.process.start()
        batch.monitor = asyncio.create_task(self._monitor(batch), name=f"batch-{batch_id}")
        return batch

    async def _monitor(self, batch: Batch) -> None:
        assert batch.process is not None
        wait = asyncio.create_task(batch.process.wait())
        while not wait.done():
            self._observe(batch)
            files.tighten(batch.event_dir)  # Spark sets its event logs to 0660 whatever the umask
            await asyncio.wait({wait}, timeout=0.5)
        self._observe(batch)
        files.tighten(batch.event_dir)
        code = wait.result()
        await batch.process.kill()  # whatever the application left running in its group
        if batch.killed:
            final = SessionState.KILLED
        else:
            final = SessionState.SUCCESS if code == 0 else SessionState.DEAD
        batch.log.append(f"spark-submit {describe_exit(code)}; batch {batch.id} is {final.value}", source="StudioBatch")
        batch.set_state(final)
        self.store.update("batches", batch.id, defer=True, state=final.value, ended_at=time.time(), app_id=batch.app_id)

    def _observe(self, batch: Batch) -> None:
        if batch.app_id is None:
            try:
                names = os.listdir(batch.event_dir)
            except OSError:
                names = []
            if names:
                name = sorted(names)[0]
                batch.app_id = re.sub(r"^eventlog_v2_|(\.inprogress|\.lz4|\.snappy|\.zstd)+$", "", name)
                if batch.state is SessionState.STARTING:
                    batch.set_state(SessionState.RUNNING)
                self.store.update("batches", batch.id, defer=True, state=batch.state.value, app_id=batch.app_id)
        if batch.app_id is not None and batch.spark_ui_url is None:
            for line in batch.log.tail(400):
                match = _UI_LINE.search(line)
                if match:
                    batch.spark_ui_url = match.group(1)
                    break

    async def delete(self, batch: Batch) -> None:
        """DELETE, as in Livy: kill a running batch, then remove it from every Livy route at once
        (its name is free); its log stays readable at its driverLogUrl for the retention time."""
        if not batch.state.is_final:
            await self._kill(batch)
        if self.batches.get(batch.id) is batch:
            del self.batches[batch.id]
            self.retained_logs.keep(batch.id, batch.log)

    async def _kill(self, batch: Batch) -> None:
        """SIGTERM to spark-submit's group (the driver ends its application), SIGKILL if it hangs."""
        batch.killed = True
        if batch.process is not None:
            await batch.process.stop()
        if batch.monitor is not None:
            await batch.monitor

    async def cull(self) -> None:
        now = time.monotonic()
        for batch in list(self.batches.values()):
            if batch.ended is not None and now - batch.ended > self.settings.session_state_retain:
                self.batches.pop(batch.id, None)
        self.retained_logs.cull(self.settings.session_state_retain)

    async def shutdown(self) -> None:
        await asyncio.gather(*(self._kill(b) for b in self.batches.values() if b.live), return_exceptions=True)
