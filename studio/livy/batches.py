"""Batches, which are job runs: ``spark-submit`` runs seen through two shapes, Livy's batch and
EMR Serverless's job run (``studio.livy.jobruns``), one record behind both.

The stored truth is the run's EMR state (``JobRunState``): it is the finer of the two (Livy's
``not_started`` covers SUBMITTED, PENDING and QUEUED), so Livy's state is derived from it
(``LIVY_STATE``) and never stored apart, and the two views can never disagree.

    SUBMITTED ─▶ PENDING ─▶ SCHEDULED ─▶ RUNNING ─▶ SUCCESS | FAILED
        └─▶ QUEUED ─┘ (no room in its application: waits, started in submission order)
    CANCELLING ─▶ CANCELLED (a queued run is CANCELLED at once)

A run is RUNNING (Livy: ``running``) once its SparkContext is up. Every run writes a Spark event
log into a folder of its own, and the event log file appears exactly when the SparkContext starts
and is named after the application id, so that folder tells both facts without parsing log text.

A run belongs to an application (``studio.livy.applications``; the root ``/batches`` is the
``default`` one): its drivers get the application's driver conf under the run's own, and a run
starts only while the application has room (``maximumCapacity``,
``schedulerConfiguration.maxConcurrentRuns``); without the applications registry, room is
``STUDIO_MAX_SESSIONS`` live sessions and runs, as before.
"""

from __future__ import annotations

import asyncio
import builtins
import enum
import logging
import os
import re
import shlex
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

from studio import files, redact
from studio.config import Settings
from studio.errors import ConflictError, InvalidRequestError, NotFoundError
from studio.events import Event, EventBus
from studio.livy import sparkconf
from studio.livy.access import Parties
from studio.livy.logs import LogFile, RetainedLogs
from studio.livy.models import CreateBatch, SessionState, check_transition, view
from studio.livy.pool import available_memory_mb
from studio.process import ChildProcess, describe_exit
from studio.store import Store

log = logging.getLogger("studio.livy.batches")

_UI_LINE = re.compile(r"Bound SparkUI to \S+, and started at (https?://\S+)")
# A Python or JVM exception as a driver prints it last: "RuntimeError: why", "org.x.FooException: why".
_ERROR_LINE = re.compile(r"\b[\w.]*(Error|Exception): .+")

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


class JobRunState(str, enum.Enum):
    """EMR Serverless's job run states (the stored truth of a batch; see the module's docstring)."""

    SUBMITTED = "SUBMITTED"  # accepted and on record
    PENDING = "PENDING"  # has room: its files are being prepared
    QUEUED = "QUEUED"  # no room in its application yet: waits in submission order
    SCHEDULED = "SCHEDULED"  # spark-submit spawned
    RUNNING = "RUNNING"  # its Spark application started
    SUCCESS = "SUCCESS"
    FAILED = "FAILED"
    CANCELLING = "CANCELLING"
    CANCELLED = "CANCELLED"

    @property
    def is_final(self) -> bool:
        return self in (JobRunState.SUCCESS, JobRunState.FAILED, JobRunState.CANCELLED)


# Livy's view of each state (Livy's batch states where Livy has them: starting, running, success,
# dead, killed; a run that has not been spawned yet is ``not_started``, one being killed ``shutting_down``).
LIVY_STATE: dict[JobRunState, SessionState] = {
    JobRunState.SUBMITTED: SessionState.NOT_STARTED,
    JobRunState.PENDING: SessionState.NOT_STARTED,
    JobRunState.QUEUED: SessionState.NOT_STARTED,
    JobRunState.SCHEDULED: SessionState.STARTING,
    JobRunState.RUNNING: SessionState.RUNNING,
    JobRunState.SUCCESS: SessionState.SUCCESS,
    JobRunState.FAILED: SessionState.DEAD,
    JobRunState.CANCELLING: SessionState.SHUTTING_DOWN,
    JobRunState.CANCELLED: SessionState.KILLED,
}

_S = JobRunState
# state -> the states it may be entered from
RUN_TRANSITIONS: dict[JobRunState, frozenset[JobRunState]] = {
    _S.QUEUED: frozenset({_S.SUBMITTED}),
    _S.PENDING: frozenset({_S.SUBMITTED, _S.QUEUED}),
    _S.SCHEDULED: frozenset({_S.PENDING}),
    _S.RUNNING: frozenset({_S.SCHEDULED}),
    _S.SUCCESS: frozenset({_S.SCHEDULED, _S.RUNNING}),
    _S.FAILED: frozenset({_S.SUBMITTED, _S.QUEUED, _S.PENDING, _S.SCHEDULED, _S.RUNNING}),
    _S.CANCELLING: frozenset({_S.PENDING, _S.SCHEDULED, _S.RUNNING}),
    _S.CANCELLED: frozenset({_S.SUBMITTED, _S.QUEUED, _S.PENDING, _S.SCHEDULED, _S.RUNNING, _S.CANCELLING}),
}
# Runs that hold a driver (or are about to): what counts against an application's capacity.
ACTIVE = frozenset({_S.PENDING, _S.SCHEDULED, _S.RUNNING, _S.CANCELLING})

DEFAULT_APPLICATION = "default"


def iso(epoch: float | None) -> str | None:
    """EMR's times: ISO 8601 in UTC."""
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# sparkSubmitParameters: the spark-submit options a job run may give, as the CreateBatch field each
# becomes (None: ``--conf``). Anything else (``--master``, ``--deploy-mode``, ``--packages``,
# ``--proxy-user``, ...) is refused: the service decides where and as whom a run runs.
_SUBMIT_OPTIONS: dict[str, str | None] = {
    "--conf": None,
    "--driver-memory": "driverMemory",
    "--executor-memory": "executorMemory",
    "--driver-cores": "driverCores",
    "--executor-cores": "executorCores",
    "--num-executors": "numExecutors",
    "--jars": "jars",
    "--py-files": "pyFiles",
    "--files": "files",
    "--archives": "archives",
    "--class": "className",
    "--name": "sparkName",
}
_LIST_OPTIONS = {"jars", "pyFiles", "files", "archives"}
_COUNT_OPTIONS = {"driverCores", "executorCores", "numExecutors"}


def check_conf_key(key: str, where: str) -> None:
    if key in sparkconf.BLACKLIST:
        raise InvalidRequestError(f"Rejected, Reason: {where} may not set {key}: the service decides where a job run runs.")


def parse_submit_parameters(text: str | None) -> dict[str, Any]:
    """``sparkSubmitParameters`` as CreateBatch fields (``conf`` a dict; ``sparkName`` the Spark
    application name). Split like a POSIX shell would split it, never given to one."""
    fields: dict[str, Any] = {}
    if not text or not text.strip():
        return fields
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise InvalidRequestError(f"Rejected, Reason: sparkSubmitParameters cannot be split into words: {exc}.") from None
    known = ", ".join(_SUBMIT_OPTIONS)
    at = 0
    while at < len(words):
        word = words[at]
        option, eq, value = word.partition("=")
        if option not in _SUBMIT_OPTIONS:
            raise InvalidRequestError(
                f"Rejected, Reason: sparkSubmitParameters: '{word[:80]}' is not an option a job run may give (known: {known})."
            )
        if not eq:
            at += 1
            if at >= len(words) or words[at].startswith("--"):
                raise InvalidRequestError(f"Rejected, Reason: sparkSubmitParameters: {option} needs a value.")
            value = words[at]
        at += 1
        field = _SUBMIT_OPTIONS[option]
        if field is None:
            key, eq, conf_value = value.partition("=")
            if not eq or not key.strip():
                raise InvalidRequestError(f"Rejected, Reason: sparkSubmitParameters: --conf wants key=value, got '{value[:80]}'.")
            check_conf_key(key.strip(), "sparkSubmitParameters")
            fields.setdefault("conf", {})[key.strip()] = conf_value
        elif field in _LIST_OPTIONS:
            fields.setdefault(field, []).extend(part for part in value.split(",") if part)
        elif field in _COUNT_OPTIONS:
            if not value.isdigit():
                raise InvalidRequestError(f"Rejected, Reason: sparkSubmitParameters: {option} wants a whole number, got '{value[:40]}'.")
            fields[field] = int(value)
        else:
            fields[field] = value
    return fields


def memory_mb(value: str | None, default: int = 1024) -> int:
    """A JVM memory size (``2g``, ``512m``; bare: bytes) in MB."""
    if not value:
        return default
    match = re.fullmatch(r"\s*(\d+)\s*([kmgtp]?)b?\s*", value.lower())
    if not match:
        return default
    number, unit = int(match.group(1)), match.group(2)
    factor = {"": 1 / (1 << 20), "k": 1 / 1024, "m": 1, "g": 1024, "t": 1 << 20, "p": 1 << 30}[unit]
    return max(1, int(number * factor))


def _part(application: Any, name: str) -> dict[str, Any]:
    """A part of an application's definition as a dict (the definition is a pydantic model)."""
    definition = getattr(application, "definition", None)
    value = definition.get(name) if isinstance(definition, dict) else getattr(definition, name, None)
    if value is None:
        return {}
    if hasattr(value, "model_dump"):
        value = value.model_dump(exclude_none=True)
    return value if isinstance(value, dict) else {}


class Batch:
    def __init__(self, batch_id: int, body: CreateBatch, log_file: LogFile, event_dir: Path) -> None:
        self.id = batch_id
        self.body = body
        self.name = body.name
        self.owner: str | None = None
        self.run_state = JobRunState.SUBMITTED
        self.state_details = "Job run submitted."
        self.log = log_file
        self.event_dir = event_dir
        self.app_id: str | None = None
        self.spark_ui_url: str | None = None
        self.process: ChildProcess | None = None
        self.killed = False
        self.timed_out = False
        self.ended: float | None = None  # monotonic, for culling
        self.monitor: asyncio.Task[None] | None = None
        self.application: Any = None  # studio.livy.applications.Application, or None (no registry)
        self.job: dict[str, Any] | None = None  # the StartJobRun request (None: a Livy batch)
        self.client_token: str | None = None
        self.command: list[str] = []
        self.conf: dict[str, str] = {}
        self.driver_mb = 1024
        self.driver_cores = 1
        now = time.time()
        self.created_at = now
        self.updated_at = now
        self.queued_at: float | None = None
        self.queued_ms: int | None = None
        self.scheduled_at: float | None = None
        self.scheduled_mono: float | None = None
        self.started_at: float | None = None
        self.ended_at: float | None = None

    @property
    def state(self) -> SessionState:
        """Livy's state, derived from the run's EMR state (the one stored)."""
        return LIVY_STATE[self.run_state]

    def set_run_state(self, new: JobRunState, details: str) -> JobRunState:
        old = self.run_state
        check_transition(RUN_TRANSITIONS, old, new, f"job run {self.id}")
        self.run_state, self.state_details = new, details
        now = time.time()
        self.updated_at = now
        if old is JobRunState.QUEUED and self.queued_at is not None:
            self.queued_ms = int((now - self.queued_at) * 1000)
        if new is JobRunState.QUEUED:
            self.queued_at = now
        elif new is JobRunState.SCHEDULED:
            self.scheduled_at, self.scheduled_mono = now, time.monotonic()
        elif new is JobRunState.RUNNING:
            self.started_at = now
        if new.is_final:
            self.ended = time.monotonic()
            self.ended_at = now
        return old

    @property
    def live(self) -> bool:
        return not self.run_state.is_final

    @property
    def spark_user(self) -> str | None:
        """The user its driver runs as: its proxyUser, else its owner (``studio.livy.access``)."""
        return self.body.proxyUser or self.owner

    @property
    def application_id(self) -> str:
        return str(getattr(self.application, "id", None) or DEFAULT_APPLICATION)

    @property
    def application_name(self) -> str:
        return str(getattr(self.application, "name", None) or DEFAULT_APPLICATION)

    @property
    def run_name(self) -> str | None:
        return (self.job or {}).get("name") or self.name

    @property
    def timeout_minutes(self) -> float | None:
        value = (self.job or {}).get("executionTimeoutMinutes")
        return float(value) if value else None

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

    def arn(self) -> str:
        return f"arn:studio:applications/{self.application_id}/jobruns/{self.id}"

    def summary_json(self) -> dict[str, Any]:
        """EMR's JobRunSummary."""
        return {
            "applicationId": self.application_id,
            "id": str(self.id),
            "name": self.run_name,
            "arn": self.arn(),
            "createdBy": self.owner,
            "createdAt": iso(self.created_at),
            "updatedAt": iso(self.updated_at),
            "executionRole": (self.job or {}).get("executionRoleArn"),
            "state": self.run_state.value,
            "stateDetails": self.state_details,
            "releaseLabel": self.release_label(),
            "type": "SPARK",
        }

    def release_label(self) -> str:
        label = getattr(self.application, "release_label", None) or getattr(getattr(self.application, "definition", None), "releaseLabel", None)
        if label:
            return str(label)
        import pyspark

        return f"spark-{pyspark.__version__}"

    def duration_seconds(self) -> int:
        if self.scheduled_at is None:
            return 0
        return int((self.ended_at or time.time()) - self.scheduled_at)

    def job_json(self) -> dict[str, Any]:
        """EMR's JobRun object (``GET …/jobruns/{id}``); a Livy batch gets its request in EMR's words."""
        job = self.job or {}
        driver = job.get("jobDriver") or {
            "sparkSubmit": {"entryPoint": self.body.file, "entryPointArguments": list(self.body.args)}
        }
        shown: dict[str, Any] = {
            "applicationId": self.application_id,
            "jobRunId": str(self.id),
            "name": self.run_name,
            "arn": self.arn(),
            "createdBy": self.owner,
            "createdAt": iso(self.created_at),
            "updatedAt": iso(self.updated_at),
            "executionRole": job.get("executionRoleArn"),
            "state": self.run_state.value,
            "stateDetails": self.state_details,
            "releaseLabel": self.release_label(),
            "jobDriver": driver,
            "configurationOverrides": job.get("configurationOverrides") or {},
            "executionTimeoutMinutes": job.get("executionTimeoutMinutes"),
            "tags": job.get("tags") or {},
            "totalExecutionDurationSeconds": self.duration_seconds(),
            "sparkApplicationId": self.app_id,
        }
        if self.queued_ms is not None or self.run_state is JobRunState.QUEUED:
            queued = self.queued_ms if self.queued_ms is not None else int((time.time() - (self.queued_at or time.time())) * 1000)
            shown["queuedDurationMilliseconds"] = queued
        if self.started_at is not None:
            shown["startedAt"] = iso(self.started_at)
        if self.ended_at is not None:
            shown["endedAt"] = iso(self.ended_at)
        return shown


class BatchManager:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        base_conf: Callable[[], dict[str, str]],
        live_sessions: Callable[[], int],
        applications: Any = None,
        events: EventBus | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self._base_conf = base_conf
        self._live_sessions = live_sessions
        self.applications = applications  # studio.livy.applications.Applications, or None: one default application
        self.events = events
        self.batches: dict[int, Batch] = {}
        self.retained_logs = RetainedLogs()
        self._queue: builtins.list[Batch] = []  # QUEUED runs, in submission order
        self._freed = asyncio.Event()  # a run ended or was cancelled: the queue may move
        self._dispatcher: asyncio.Task[None] | None = None
        self._tokens: dict[tuple[str, str], int] = {}  # (application id, clientToken) -> run id

    def list(
        self, start: int, size: int, visible: Callable[[Batch], bool] | None = None, application: Any = None
    ) -> tuple[int, builtins.list[Batch]]:
        """A page of the batches ``visible`` keeps (all without it), in id order, and how many it keeps;
        with ``application``, only that application's."""
        ordered = [
            self.batches[k]
            for k in sorted(self.batches)
            if (visible is None or visible(self.batches[k])) and self._in(self.batches[k], application)
        ]
        return len(ordered), view(ordered, start, size)

    def _in(self, batch: Batch, application: Any) -> bool:
        if application is None:
            return True
        return batch.application_id == str(getattr(application, "id", None) or DEFAULT_APPLICATION)

    def get(self, key: str | int, visible: Callable[[Batch], bool] | None = None, application: Any = None) -> Batch:
        """A batch by id, or by name as in Livy: the live batch of that name, else the newest; among
        those ``visible`` keeps first (the caller checks its access to what this returns)."""
        text = str(key)
        if text.lstrip("-").isdigit():
            batch = self.batches.get(int(text))
            if batch is not None and not self._in(batch, application):
                batch = None
        else:
            named = sorted(
                (b for b in self.batches.values() if b.name == text and self._in(b, application)), key=lambda b: (b.live, b.id)
            )
            if visible is not None and any(visible(b) for b in named):
                named = [b for b in named if visible(b)]
            batch = named[-1] if named else None
        if batch is None:
            raise NotFoundError(f"Batch '{text}' not found.")
        return batch

    def get_run(self, application: Any, run_id: str) -> Batch:
        """A job run of ``application`` by its id (job run ids are batch ids as strings)."""
        batch = self.batches.get(int(run_id)) if run_id.isdigit() else None
        if batch is None or not self._in(batch, application):
            raise NotFoundError(f"Job run '{run_id[:40]}' not found in application '{getattr(application, 'name', None) or DEFAULT_APPLICATION}'.")
        return batch

    def by_token(self, application: Any, token: str) -> Batch | None:
        """The run an earlier StartJobRun with this ``clientToken`` started, if it is still listed."""
        run_id = self._tokens.get((str(getattr(application, "id", None) or DEFAULT_APPLICATION), token))
        return self.batches.get(run_id) if run_id is not None else None

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

    def running_in(self, application: Any) -> int:
        """Runs of ``application`` that hold a driver (or are about to): its ``running_jobs``."""
        return sum(1 for b in self.batches.values() if b.run_state in ACTIVE and self._in(b, application))

    def queued_in(self, application: Any) -> int:
        return sum(1 for b in self._queue if self._in(b, application))

    def command(
        self, body: CreateBatch, batch_id: int, event_dir: Path, properties: Path, application: Any = None, spark_name: str | None = None
    ) -> tuple[builtins.list[str], dict[str, str]]:
        """spark-submit's command line and the conf it reads from ``properties`` (never from the command
        line, where `ps` would show every value to every user of the machine): the service's base conf,
        the application's driver conf, then the run's own."""
        conf = dict(self._base_conf())
        if application is not None and hasattr(application, "driver_conf"):
            conf = sparkconf.overlay(conf, dict(application.driver_conf()))
        conf["spark.eventLog.enabled"] = "true"
        conf["spark.eventLog.dir"] = event_dir.as_uri()
        spark_conf, _ = sparkconf.split_service_conf(body.conf)
        for key in spark_conf:
            if key in sparkconf.BLACKLIST:
                raise InvalidRequestError(f"Rejected, Reason: Blacklisted configuration values in batch config: {key}")
        conf = sparkconf.overlay(conf, {**spark_conf, **sparkconf.user_conf(body.proxyUser)})
        command = [spark_submit(), "--master", self.settings.master, "--deploy-mode", "client"]
        command += ["--name", spark_name or body.name or f"livy-batch-{batch_id}"]
        command += ["--properties-file", str(properties), "--load-spark-defaults"]
        for field, flag in _FLAGS.items():
            value = getattr(body, field)
            if value is None or value == []:
                continue
            command += [flag, ",".join(value) if isinstance(value, list) else str(value)]
        command.append(body.file)
        command += body.args
        return command, conf

    async def create(
        self,
        body: CreateBatch,
        owner: str | None = None,
        quota: Callable[[], None] | None = None,
        application: Any = None,
        job: dict[str, Any] | None = None,
        client_token: str | None = None,
        spark_name: str | None = None,
    ) -> Batch:
        """Run a batch (a job run) for ``owner`` in ``application`` (None: the default one); ``body.proxyUser``
        is its Spark user, checked by the caller (``studio.livy.access``). ``quota`` raises
        QuotaExceededError when the owner has no room left. ``job`` is the StartJobRun request of a run
        started through ``studio.livy.jobruns``. The run starts now if its application has room, else it
        is QUEUED and starts in submission order when room frees."""
        if not body.file.strip():
            raise InvalidRequestError("Rejected, Reason: File is required.")
        if body.name is not None:
            if body.name.strip().lstrip("-").isdigit() or not body.name.strip():
                raise InvalidRequestError(f"Rejected, Reason: batch name '{body.name}' must not be a number or empty.")
            if any(b.live and b.name == body.name for b in self.batches.values()):
                raise InvalidRequestError(f"Rejected, Reason: a batch named '{body.name}' already exists.")
        sparkconf.check_settings(body)
        _check_local_file(body.file, "file" if job is None else "entryPoint")
        for field in ("jars", "pyFiles", "files", "archives"):
            for path in getattr(body, field):
                _check_local_file(path.split("#", 1)[0], field)
        if application is None and self.applications is not None:
            application = getattr(self.applications, "default", None)
        if quota is not None:
            quota()
        batch_id = self.store.next_id("batch")
        event_dir = self.settings.state_dir / "events" / f"batch-{batch_id}"
        workdir = self.settings.state_dir / "work" / f"batch-{batch_id}"
        command, conf = self.command(body, batch_id, event_dir, workdir / "spark.properties", application, spark_name)
        self.settings.log_dir.mkdir(parents=True, exist_ok=True)
        batch = Batch(batch_id, body, LogFile(self.settings.log_dir / f"batch-{batch_id}.log"), event_dir)
        batch.owner = owner
        batch.application = application
        batch.job = job
        batch.client_token = client_token
        batch.command, batch.conf = command, conf
        batch.driver_mb = memory_mb(body.driverMemory or conf.get("spark.driver.memory"))
        batch.driver_cores = body.driverCores or int(conf.get("spark.driver.cores", "1") or 1)
        self.store.insert(
            "batches",
            {
                "id": batch_id,
                "name": body.name,
                "owner": owner,
                "state": batch.state.value,
                "run_state": batch.run_state.value,
                "state_details": batch.state_details,
                "application_id": getattr(application, "id", None),
                "job_run": job,
                "client_token": client_token,
                "log_path": str(batch.log.path),
                "request": body.model_dump(),
                "created_at": batch.created_at,
                "updated_at": batch.updated_at,
            },
        )
        self.batches[batch_id] = batch  # once on record (a full disk refuses it before: 507)
        if client_token:
            self._tokens[(batch.application_id, client_token)] = batch_id
        self._publish(batch, None)
        waiting = any(self._in(b, application) for b in self._queue)  # none overtakes a queued run
        reason = "runs submitted before it are waiting" if waiting else self._no_room(batch)
        if reason is None:
            self._launch(batch)
        else:
            self._set(batch, JobRunState.QUEUED, f"Job run queued: {reason}.")
            self._queue.append(batch)
            self._ensure_dispatcher()
        return batch

    # -- room and the queue --------------------------------------------------------------------

    def _no_room(self, batch: Batch) -> str | None:
        """Why ``batch`` cannot start now (None: it can), in words."""
        application = batch.application
        scheduler = _part(application, "schedulerConfiguration")
        limit = scheduler.get("maxConcurrentRuns")
        running = self.running_in(application)
        if limit is not None and running >= int(limit):
            return f"application '{batch.application_name}' runs at most {limit} job runs at once (schedulerConfiguration.maxConcurrentRuns)"
        if application is not None and hasattr(application, "room_for"):
            application.running_jobs = running
            reason = application.room_for(batch.driver_mb, batch.driver_cores)
            if reason and application.room_for(batch.driver_mb, batch.driver_cores, counting_warm=False) is None:
                if application.pool.release_one():  # a warm driver makes way, as for a session of another shape
                    reason = None
            if reason:
                return f"application '{batch.application_name}' has no room for another driver: {reason}"
        else:
            live = self._live_sessions() + sum(1 for b in self.batches.values() if b.run_state in ACTIVE)
            if live >= self.settings.max_sessions:
                return f"{live} of {self.settings.max_sessions} sessions and job runs are live (STUDIO_MAX_SESSIONS)"
        free = available_memory_mb()
        if free is not None and free < self.settings.min_available_memory_mb:
            return f"{free} MB of memory available, {self.settings.min_available_memory_mb} MB needed (STUDIO_MIN_AVAILABLE_MEMORY_MB)"
        return None

    def _ensure_dispatcher(self) -> None:
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.create_task(self._dispatch_forever(), name="jobrun-queue")

    async def _dispatch_forever(self) -> None:
        """Start queued runs as room frees: woken when a run ends, and every second (a session that
        ends frees room too, and this manager is not told of it)."""
        while self._queue:
            self._freed.clear()
            try:
                await asyncio.wait_for(self._freed.wait(), timeout=1.0)
            except asyncio.TimeoutError:
                pass
            try:
                self.dispatch()
            except Exception:  # noqa: BLE001 - the queue must keep moving
                log.exception("starting queued job runs failed")

    def dispatch(self) -> None:
        """Start the queued runs that fit, in submission order: the first run of an application that
        does not fit holds back the ones behind it. A run past its queue timeout FAILs."""
        blocked: set[str] = set()
        for batch in list(self._queue):
            if batch.run_state is not JobRunState.QUEUED:
                self._queue.remove(batch)
                continue
            timeout = _part(batch.application, "schedulerConfiguration").get("queueTimeoutMinutes")
            if timeout and batch.queued_at is not None and time.time() - batch.queued_at > float(timeout) * 60:
                self._queue.remove(batch)
                self._set(batch, JobRunState.FAILED, f"Job run timed out in the queue after {timeout:g} minutes.")
                continue
            if batch.application_id in blocked:
                continue
            reason = self._no_room(batch)
            if reason is not None:
                blocked.add(batch.application_id)
                if batch.state_details != f"Job run queued: {reason}.":
                    batch.state_details = f"Job run queued: {reason}."
                continue
            self._queue.remove(batch)
            self._launch(batch)

    def _launch(self, batch: Batch) -> None:
        """PENDING, its folders and conf file, then spark-submit spawned (SCHEDULED)."""
        self._set(batch, JobRunState.PENDING, "Job run has room: preparing its driver.")
        workdir = self.settings.state_dir / "work" / f"batch-{batch.id}"
        try:
            batch.event_dir.mkdir(parents=True, exist_ok=True)
            workdir.mkdir(parents=True, exist_ok=True)
            sparkconf.write_properties(workdir / "spark.properties", batch.conf)
            batch.log.append("spark-submit " + " ".join(redact.command(batch.command[1:])), source="StudioBatch")
            shown = redact.conf(batch.conf) or {}
            batch.log.append("with conf " + " ".join(f"{key}={value}" for key, value in shown.items()), source="StudioBatch")
            batch.process = ChildProcess(
                batch.command,
                name=f"batch {batch.id}",
                cwd=workdir,
                env={**sparkconf.child_env(self.settings), **sparkconf.user_env(batch.body.proxyUser or batch.owner)},
                output=batch.log.path,
                stop_timeout=self.settings.stop_timeout,
            )
            batch.process.start()
        except Exception as exc:  # noqa: BLE001 - a run that cannot start fails with the reason
            log.exception("job run %s could not start", batch.id)
            self._set(batch, JobRunState.FAILED, f"Job run could not start: {exc}")
            self._freed.set()
            return
        self._set(batch, JobRunState.SCHEDULED, "spark-submit started; waiting for its Spark application.")
        batch.monitor = asyncio.create_task(self._monitor(batch), name=f"batch-{batch.id}")

    def _set(self, batch: Batch, new: JobRunState, details: str) -> None:
        """A state change: on the run, on record, on the bus."""
        old = batch.set_run_state(new, details)
        fields: dict[str, Any] = {
            "state": batch.state.value,
            "run_state": new.value,
            "state_details": details,
            "updated_at": batch.updated_at,
            "app_id": batch.app_id,
        }
        if new is JobRunState.RUNNING:
            fields["started_at"] = batch.started_at
        if new.is_final:
            fields["ended_at"] = batch.ended_at
            fields["reason"] = details
        self.store.update("batches", batch.id, defer=True, **fields)
        if batch.application is not None:
            batch.application.running_jobs = self.running_in(batch.application)
            batch.application.queued_jobs = sum(
                1 for b in self.batches.values() if b.run_state in (JobRunState.SUBMITTED, JobRunState.QUEUED) and b.application is batch.application
            )
            touch = getattr(self.applications, "touch", None)
            if touch is not None:
                touch(batch.application)
        self._publish(batch, old)

    def _publish(self, batch: Batch, old: JobRunState | None) -> None:
        if self.events is None:
            return
        self.events.publish(
            Event(
                kind="jobrun",
                id=str(batch.id),
                new=batch.run_state.value,
                old=old.value if old is not None else None,
                reason=batch.state_details,
                name=batch.run_name,
                owner=batch.owner,
                application=batch.application_name,
            )
        )

    # -- a run's life --------------------------------------------------------------------------

    async def _monitor(self, batch: Batch) -> None:
        assert batch.process is not None
        wait = asyncio.create_task(batch.process.wait())
        timeout = batch.timeout_minutes
        while not wait.done():
            self._observe(batch)
            files.tighten(batch.event_dir)  # Spark sets its event logs to 0660 whatever the umask
            if (
                timeout is not None
                and not batch.killed
                and not batch.timed_out
                and batch.scheduled_mono is not None
                and time.monotonic() - batch.scheduled_mono > timeout * 60
            ):
                batch.timed_out = True
                batch.log.append(f"job run {batch.id} ran past its executionTimeoutMinutes ({timeout:g}): stopping it", source="StudioBatch")
                await batch.process.stop()
            await asyncio.wait({wait}, timeout=0.5)
        self._observe(batch)
        files.tighten(batch.event_dir)
        code = wait.result()
        await batch.process.kill()  # whatever the application left running in its group
        if batch.killed:
            final, details = JobRunState.CANCELLED, "Job run cancelled."
        elif batch.timed_out:
            final, details = JobRunState.FAILED, f"Job run timed out after {timeout:g} minutes."
        elif code == 0:
            final, details = JobRunState.SUCCESS, "Job run succeeded."
        else:
            final, details = JobRunState.FAILED, self._failure(batch, code)
        batch.log.append(f"spark-submit {describe_exit(code)}; batch {batch.id} is {LIVY_STATE[final].value}", source="StudioBatch")
        self._set(batch, final, details)
        self._freed.set()
        notify = getattr(self.applications, "notify_room", None)
        if notify is not None:  # its driver's room is free: sessions and pools of the application look again
            await notify()

    def _failure(self, batch: Batch, code: int | None) -> str:
        """Why a run failed, in words: the last exception line its driver printed, else the exit."""
        for line in reversed(batch.log.tail(400)):
            match = _ERROR_LINE.search(line)
            if match:
                return f"Job run failed: {match.group(0)[:500]}"
        return f"Job run failed: spark-submit {describe_exit(code)}."

    def _observe(self, batch: Batch) -> None:
        if batch.app_id is None:
            try:
                names = os.listdir(batch.event_dir)
            except OSError:
                names = []
            if names:
                name = sorted(names)[0]
                batch.app_id = re.sub(r"^eventlog_v2_|(\.inprogress|\.lz4|\.snappy|\.zstd)+$", "", name)
                if batch.run_state is JobRunState.SCHEDULED:
                    self._set(batch, JobRunState.RUNNING, f"Spark application {batch.app_id} is running.")
                else:
                    self.store.update("batches", batch.id, defer=True, app_id=batch.app_id)
        if batch.app_id is not None and batch.spark_ui_url is None:
            for line in batch.log.tail(400):
                match = _UI_LINE.search(line)
                if match:
                    batch.spark_ui_url = match.group(1)
                    break

    async def cancel(self, batch: Batch) -> None:
        """EMR's CancelJobRun: a queued run is CANCELLED at once; a started one is CANCELLING until its
        spark-submit has stopped (in the background), then CANCELLED. It stays listed."""
        if batch.run_state.is_final or batch.run_state is JobRunState.CANCELLING:
            raise ConflictError(f"Job run {batch.id} is {batch.run_state.value}: there is nothing to cancel.")
        if batch.run_state in (JobRunState.SUBMITTED, JobRunState.QUEUED):
            if batch in self._queue:
                self._queue.remove(batch)
            self._set(batch, JobRunState.CANCELLED, "Job run cancelled while it waited.")
            self._freed.set()
            return
        self._begin_kill(batch)
        assert batch.process is not None
        asyncio.create_task(batch.process.stop(), name=f"cancel-batch-{batch.id}")

    def _begin_kill(self, batch: Batch) -> None:
        batch.killed = True
        if batch.run_state is not JobRunState.CANCELLING:
            self._set(batch, JobRunState.CANCELLING, "Job run is being cancelled.")

    async def delete(self, batch: Batch) -> None:
        """DELETE, as in Livy: kill a running batch, then remove it from every Livy route at once
        (its name is free); its log stays readable at its driverLogUrl for the retention time."""
        if batch.run_state in (JobRunState.SUBMITTED, JobRunState.QUEUED):
            await self.cancel(batch)
        elif not batch.run_state.is_final:
            await self._kill(batch)
        if self.batches.get(batch.id) is batch:
            del self.batches[batch.id]
            self.retained_logs.keep(batch.id, batch.log)

    async def _kill(self, batch: Batch) -> None:
        """SIGTERM to spark-submit's group (the driver ends its application), SIGKILL if it hangs."""
        self._begin_kill(batch)
        if batch.process is not None:
            await batch.process.stop()
        if batch.monitor is not None:
            await batch.monitor

    async def cull(self) -> None:
        now = time.monotonic()
        for batch in list(self.batches.values()):
            if batch.ended is not None and now - batch.ended > self.settings.session_state_retain:
                self.batches.pop(batch.id, None)
                if batch.client_token:
                    self._tokens.pop((batch.application_id, batch.client_token), None)
        self.retained_logs.cull(self.settings.session_state_retain)
        if self._queue:
            self.dispatch()

    async def shutdown(self) -> None:
        for batch in list(self._queue):
            self._queue.remove(batch)
            self._set(batch, JobRunState.CANCELLED, "The service stopped before the job run could start.")
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
        await asyncio.gather(*(self._kill(b) for b in self.batches.values() if b.live), return_exceptions=True)
