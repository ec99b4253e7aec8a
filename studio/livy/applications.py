"""Applications, as in EMR Serverless: named compute with its own driver shape and capacity.

An application is a driver shape (``driverConfiguration``: Livy's session fields, and
``runtimeConfiguration``'s ``spark-defaults``), a warm pool of drivers of that shape
(``initialCapacity.DRIVER.workerCount``), a ceiling (``maximumCapacity``: drivers, cores, memory,
counting live sessions, running job runs and warm drivers alike, as EMR counts pre-initialized
capacity), and an idle policy (``autoStartConfiguration``, ``autoStopConfiguration``). Its states
and transitions are EMR's. Each application serves the whole Livy API under
``/applications/{name-or-id}/``; the service's root is the application ``default``, which the
``studio livy`` settings of before define (``pool_size``, ``max_sessions``) and which never stops
by itself.

Definitions live in the store and survive restarts. An operator may also declare applications in
a file (``STUDIO_APPLICATIONS_FILE``, JSON or TOML: a list of definitions under ``applications``);
at start each declared one is created, or updated to match the file when it has changed and is not
running anything.
"""

from __future__ import annotations

import asyncio
import builtins
import enum
import json
import logging
import re
import secrets
import string
import time
import tomllib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Awaitable, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

import hashlib

from studio import redact
from studio.config import Settings
from studio.errors import ConflictError, ForbiddenError, InvalidRequestError, NotFoundError, StudioError, TooManySessionsError
from studio.events import Event, EventBus
from studio.livy import sparkconf
from studio.livy.models import _SparkSettings, check_transition
from studio.livy.pool import WorkerPool
from studio.store import Store

log = logging.getLogger("studio.livy.applications")

DEFAULT = "default"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ID_ALPHABET = string.ascii_lowercase + string.digits
_ID = re.compile(r"^00[a-z0-9]{14}$")
_CPU = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:vCPU)?\s*$", re.IGNORECASE)
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)b?\s*$", re.IGNORECASE)
_MEMORY_UNITS = {"k": 1 / 1024, "m": 1, "": 1, "g": 1024, "t": 1024 * 1024}  # to MB (a bare number is MB, as Spark reads it)


class ApplicationState(str, enum.Enum):
    CREATING = "CREATING"
    CREATED = "CREATED"
    STARTING = "STARTING"
    STARTED = "STARTED"
    STOPPING = "STOPPING"
    STOPPED = "STOPPED"
    TERMINATED = "TERMINATED"


S = ApplicationState
_NEXT: dict[ApplicationState, frozenset[ApplicationState]] = {
    S.CREATING: frozenset({S.CREATED, S.TERMINATED}),
    S.CREATED: frozenset({S.STARTING, S.TERMINATED}),
    S.STARTING: frozenset({S.STARTED, S.STOPPING}),
    S.STARTED: frozenset({S.STOPPING}),
    S.STOPPING: frozenset({S.STOPPED}),
    S.STOPPED: frozenset({S.STARTING, S.TERMINATED}),
    S.TERMINATED: frozenset(),
}
# As ``check_transition`` reads them: each state and the states it may be reached from.
TRANSITIONS = {new: frozenset(old for old, nexts in _NEXT.items() if new in nexts) for new in ApplicationState}


def memory_mb(value: str | int | float | None, what: str) -> int | None:
    """``2g``, ``2048m``, ``4GB`` (EMR) or a bare number of MB, in MB."""
    if value is None:
        return None
    match = _MEMORY.match(str(value))
    if not match:
        raise InvalidRequestError(f"Rejected, Reason: invalid {what} '{value}': use a size such as 2g, 2048m or 4GB.")
    return int(float(match.group(1)) * _MEMORY_UNITS[match.group(2).lower()])


def cpu_count(value: str | int | float | None, what: str) -> float | None:
    """``2vCPU`` (EMR) or a number of cores."""
    if value is None:
        return None
    match = _CPU.match(str(value))
    if not match:
        raise InvalidRequestError(f"Rejected, Reason: invalid {what} '{value}': use a number of cores such as 2 or 2vCPU.")
    return float(match.group(1))


# -- the definition (EMR Serverless's field names where they fit) ---------------------------


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WorkerConfiguration(_Part):
    cpu: str | None = None
    memory: str | None = None
    disk: str | None = None  # accepted for EMR's sake; local disk is not divided up here


class WorkerTypeCapacity(_Part):
    workerCount: int = Field(0, ge=0, le=1000)
    workerConfiguration: WorkerConfiguration | None = None


class MaximumCapacity(_Part):
    cpu: str | None = None
    memory: str | None = None
    disk: str | None = None
    drivers: int | None = Field(None, ge=0, le=10000, description="live drivers: sessions, running job runs and warm ones")


class AutoStartConfiguration(_Part):
    enabled: bool = True


class AutoStopConfiguration(_Part):
    enabled: bool = True
    # EMR takes whole minutes from 1; fractions are accepted so that a test need not wait minutes.
    idleTimeoutMinutes: float = Field(15, gt=0, le=10080)


class InteractiveConfiguration(_Part):
    livyEndpointEnabled: bool = True
    studioEnabled: bool = True
    # A session that asks for settings its application's drivers do not have: a cold driver of its own
    # (within maximumCapacity), or a refusal that names the settings.
    offShapeSessions: Literal["COLD_START", "REFUSE"] = "COLD_START"


class SchedulerConfiguration(_Part):
    maxConcurrentRuns: int | None = Field(None, ge=1, le=1000)
    queueTimeoutMinutes: float | None = Field(None, gt=0, le=10080)


class Configuration(_Part):
    classification: str
    properties: dict[str, str] = Field(default_factory=dict)

    @field_validator("classification")
    @classmethod
    def _spark_defaults(cls, value: str) -> str:
        if value != "spark-defaults":
            raise ValueError(f"only the classification 'spark-defaults' is supported here, got '{value}'")
        return value

    @field_validator("properties", mode="before")
    @classmethod
    def _strings(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): str(v).lower() if isinstance(v, bool) else str(v) for k, v in value.items()}
        return value


class DriverConfiguration(_SparkSettings):
    """The driver shape: Livy's session fields (``proxyUser``, ``queue`` and ``name`` are not a shape)."""

    @field_validator("proxyUser", "queue", "name")
    @classmethod
    def _not_shape(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError("proxyUser, queue and name belong to a session, not to a driver shape")
        return value


class ApplicationDefinition(_Part):
    name: str
    type: str = "SPARK"
    releaseLabel: str | None = None  # accepted and ignored: the release is this installation's Spark
    runtimeConfiguration: list[Configuration] = Field(default_factory=list)
    driverConfiguration: DriverConfiguration = Field(default_factory=DriverConfiguration)
    initialCapacity: dict[str, WorkerTypeCapacity] = Field(default_factory=dict)
    maximumCapacity: MaximumCapacity = Field(default_factory=MaximumCapacity)
    autoStartConfiguration: AutoStartConfiguration = Field(default_factory=AutoStartConfiguration)
    autoStopConfiguration: AutoStopConfiguration = Field(default_factory=AutoStopConfiguration)
    interactiveConfiguration: InteractiveConfiguration = Field(default_factory=InteractiveConfiguration)
    schedulerConfiguration: SchedulerConfiguration = Field(default_factory=SchedulerConfiguration)
    tags: dict[str, str] = Field(default_factory=dict)
    # Not EMR's: how its interactive sessions run. DEDICATED, a driver JVM per session (the pool holds warm
    # ones); SHARED, lean Spark Connect sessions on one driver per user (studio.livy.shared). Job runs
    # always get a driver of their own.
    driverMode: Literal["DEDICATED", "SHARED"] = "DEDICATED"

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("an application name is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
        if _ID.match(value):  # routes take a name or an id: a name must never read as an id
            raise ValueError("an application name must not look like an application id (00 and 14 letters or digits)")
        return value

    @field_validator("type")
    @classmethod
    def _spark(cls, value: str) -> str:
        if value.upper() != "SPARK":
            raise ValueError(f"only SPARK applications are supported, got '{value}'")
        return "SPARK"

    @field_validator("initialCapacity")
    @classmethod
    def _drivers_only(cls, value: dict[str, WorkerTypeCapacity]) -> dict[str, WorkerTypeCapacity]:
        value = {k.upper(): v for k, v in value.items()}
        if set(value) - {"DRIVER"}:
            raise ValueError(
                "only DRIVER capacity can be pre-initialized: executors run inside each driver (local[*]) or on the "
                "Spark cluster, and are sized with driverConfiguration's executor settings"
            )
        return value


def parse_definition(data: Any, *, name: str | None = None) -> ApplicationDefinition:
    """A definition from JSON (create, update, the declarations file); problems are a 400 in words."""
    if not isinstance(data, dict):
        raise InvalidRequestError("An application definition must be a JSON object.")
    data = {k: v for k, v in data.items() if k not in ("clientToken", "applicationId", "arn", "state", "stateDetails")}
    if name is not None:
        data.setdefault("name", name)
    try:
        definition = ApplicationDefinition.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())
        raise InvalidRequestError(f"Rejected, Reason: invalid application definition: {problems}") from None
    _check_conf(definition)
    return definition


def _check_conf(definition: ApplicationDefinition) -> None:
    """Spark conf an application may not set (Livy's blacklist) and sizes that do not parse: refused now,
    not when its first driver fails to start."""
    sparkconf.check_settings(definition.driverConfiguration)
    driver_conf(definition)
    limits = definition.maximumCapacity
    memory_mb(limits.memory, "maximumCapacity.memory")
    cpu_count(limits.cpu, "maximumCapacity.cpu")
    worker = _driver_worker(definition)
    if worker is not None:
        memory_mb(worker.memory, "initialCapacity.DRIVER.workerConfiguration.memory")
        cpu_count(worker.cpu, "initialCapacity.DRIVER.workerConfiguration.cpu")


def _driver_worker(definition: ApplicationDefinition) -> WorkerConfiguration | None:
    capacity = definition.initialCapacity.get("DRIVER")
    return capacity.workerConfiguration if capacity else None


def driver_conf(definition: ApplicationDefinition) -> dict[str, str]:
    """The Spark conf of the application's drivers (over the service's base conf): its spark-defaults,
    then its driver shape; EMR's DRIVER workerConfiguration sizes the driver when the shape does not."""
    conf: dict[str, str] = {}
    for part in definition.runtimeConfiguration:
        for key in part.properties:
            if key in sparkconf.BLACKLIST:
                raise InvalidRequestError(f"Rejected, Reason: Blacklisted configuration values in runtimeConfiguration: {key}")
        conf.update(part.properties)
    worker = _driver_worker(definition)
    if worker is not None:
        if worker.memory is not None:
            conf["spark.driver.memory"] = f"{memory_mb(worker.memory, 'workerConfiguration.memory')}m"
        if worker.cpu is not None:
            conf["spark.driver.cores"] = str(max(1, int(cpu_count(worker.cpu, "workerConfiguration.cpu") or 1)))
    conf.update(sparkconf.requested_conf(definition.driverConfiguration))
    return conf


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def new_id() -> str:
    """An EMR-style application id: 16 lowercase letters and digits, starting with ``00``."""
    return "00" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(14))


# -- a live application ---------------------------------------------------------------------


class Application:
    def __init__(
        self,
        app_id: str,
        definition: ApplicationDefinition,
        *,
        state: ApplicationState = ApplicationState.CREATED,
        state_details: str = "",
        created_at: float | None = None,
        updated_at: float | None = None,
        is_default: bool = False,
        declared: bool = False,
    ) -> None:
        self.id = app_id
        self.definition = definition
        self.pool: WorkerPool  # set by the registry right after (the pool's workers take this shape)
        self.state = state
        self.state_details = state_details
        self.created_at = created_at or time.time()
        self.updated_at = updated_at or self.created_at
        self.is_default = is_default
        self.declared = declared
        self.pool_hits = 0
        self.pool_misses = 0
        self.running_jobs = 0  # job runs holding a driver now (the batch manager keeps it)
        self.queued_jobs = 0
        self.live_sessions: Callable[[], list[tuple[int, float]]] = lambda: []  # (memory MB, cores) per live session
        # Shared-driver mode (set by studio.livy.shared): its users' drivers running, and the MB measured of
        # those drivers and its lean sessions together.
        self.shared_drivers: Callable[[], int] = lambda: 0
        self.shared_memory_mb: Callable[[], int] = lambda: 0
        self.idle_since: float | None = time.monotonic()
        self.transition_lock = asyncio.Lock()

    @property
    def name(self) -> str:
        return self.definition.name

    def driver_conf(self) -> dict[str, str]:
        return driver_conf(self.definition)

    def shape(self) -> str:
        """A digest of its drivers' conf: a warm driver left by an earlier run is taken back only if it matches."""
        return hashlib.sha256(json.dumps(self.driver_conf(), sort_keys=True).encode()).hexdigest()[:16]

    def driver_memory_mb(self) -> int:
        return memory_mb(self.driver_conf().get("spark.driver.memory", "1g"), "spark.driver.memory") or 1024

    def driver_cores(self) -> float:
        return float(self.driver_conf().get("spark.driver.cores", "1"))

    @property
    def initial_capacity(self) -> int:
        """Warm dedicated drivers its pool keeps (none in shared mode: sessions there share a user's driver)."""
        capacity = self.definition.initialCapacity.get("DRIVER")
        return capacity.workerCount if capacity and not self.shared else 0

    @property
    def shared(self) -> bool:
        return self.definition.driverMode == "SHARED"

    @property
    def accepts_work(self) -> bool:
        return self.state in (ApplicationState.STARTING, ApplicationState.STARTED)

    def is_idle(self) -> bool:
        """EMR's ``IsIdle``: no live session and no job run running or waiting."""
        return not self.live_sessions() and self.running_jobs == 0 and self.queued_jobs == 0

    def usage(self) -> dict[str, Any]:
        sessions = self.live_sessions()
        warm = self.pool.warm_count()
        if self.shared:  # sessions share their users' drivers: those are the drivers, their footprint is measured
            drivers = self.shared_drivers() + self.running_jobs + warm
            memory = self.shared_memory_mb() + (self.running_jobs + warm) * self.driver_memory_mb()
            cores = (self.shared_drivers() + self.running_jobs + warm) * self.driver_cores()
        else:
            drivers = len(sessions) + self.running_jobs + warm
            memory = sum(m for m, _ in sessions) + (self.running_jobs + warm) * self.driver_memory_mb()
            cores = sum(c for _, c in sessions) + (self.running_jobs + warm) * self.driver_cores()
        return {
            "drivers": drivers,
            "sessions": len(sessions),
            "jobRuns": self.running_jobs,
            "queuedJobRuns": self.queued_jobs,
            "warm": self.pool.ready_count(),
            "warmStarting": warm - self.pool.ready_count(),
            "cpu": cores,
            "memoryMB": memory,
        }

    def limits(self) -> dict[str, Any]:
        limits = self.definition.maximumCapacity
        return {
            "drivers": limits.drivers,
            "cpu": cpu_count(limits.cpu, "maximumCapacity.cpu"),
            "memoryMB": memory_mb(limits.memory, "maximumCapacity.memory"),
        }

    def room_for(self, memory: int, cores: float, *, counting_warm: bool = True) -> str | None:
        """None when one more driver of ``memory`` MB and ``cores`` fits in ``maximumCapacity``, else
        why not. ``counting_warm=False`` asks whether it would fit once the warm drivers were released."""
        used, limits = self.usage(), self.limits()
        warm = used["warm"] + used["warmStarting"]
        drivers = used["drivers"] - (0 if counting_warm else warm)
        used_memory = used["memoryMB"] - (0 if counting_warm else warm * self.driver_memory_mb())
        used_cpu = used["cpu"] - (0 if counting_warm else warm * self.driver_cores())
        if limits["drivers"] is not None and drivers + 1 > limits["drivers"]:
            return f"{drivers} of its maximum {limits['drivers']} drivers are in use"
        if limits["memoryMB"] is not None and used_memory + memory > limits["memoryMB"]:
            return f"{used_memory} MB of its maximum {limits['memoryMB']} MB of driver memory are in use and this driver needs {memory} MB"
        if limits["cpu"] is not None and used_cpu + cores > limits["cpu"] + 1e-9:
            return f"{used_cpu:g} of its maximum {limits['cpu']:g} driver cores are in use and this driver needs {cores:g}"
        return None

    def livy_endpoint(self, base_url: str) -> str:
        return base_url.rstrip("/") if self.is_default else f"{base_url.rstrip('/')}/applications/{self.name}"

    def summary_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "applicationId": self.id,
            "name": self.name,
            "arn": f"arn:studio:applications/{self.id}",
            "releaseLabel": release_label(),
            "type": "SPARK",
            "state": self.state.value,
            "stateDetails": self.state_details,
            "createdAt": _iso(self.created_at),
            "updatedAt": _iso(self.updated_at),
            "architecture": "X86_64",
        }

    def to_json(self, base_url: str) -> dict[str, Any]:
        definition = self.definition.model_dump(exclude_none=True)
        definition["driverConfiguration"] = {
            k: v for k, v in self.definition.driverConfiguration.model_dump(exclude_none=True).items() if v not in ([], {})
        }
        definition["driverConfiguration"]["conf"] = redact.conf(self.definition.driverConfiguration.conf)
        for part in definition.get("runtimeConfiguration", []):
            part["properties"] = redact.conf(part["properties"])
        return {
            **definition,
            **self.summary_json(),
            "default": self.is_default,
            "declared": self.declared,
            "livyEndpoint": self.livy_endpoint(base_url),
            "capacity": {"used": self.usage(), "maximum": self.limits(), "initialDrivers": self.initial_capacity},
            "poolHits": self.pool_hits,
            "poolMisses": self.pool_misses,
            "pool": self.pool.status(),  # its warm drivers (pids, ages), as /studio/status shows the default one's
        }


def release_label() -> str:
    try:
        import pyspark

        return f"spark-{pyspark.__version__}"
    except ImportError:  # pragma: no cover - the service needs pyspark anyway
        return "spark"


# -- the registry -----------------------------------------------------------------------------


class Applications:
    """Every application of the service, with the work of creating, starting and stopping them."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        new_pool: Callable[[Application], WorkerPool],
        events: EventBus | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self._new_pool = new_pool
        self.events = events
        self._apps: dict[str, Application] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Set by the session manager: the (driver MB, cores) of an application's live sessions, and
        # whether any session is running a statement (a refill waits for quiet).
        self.session_usage: Callable[[Application], builtins.list[tuple[int, float]]] = lambda app: []
        self.pools_busy: Callable[[], bool] = lambda: False
        # Set by the shared-driver side (studio.livy.shared): its view of an application, and what an
        # application's stop lets go of besides its pool (its users' drivers).
        self.equip_shared: Callable[[Application], None] = lambda app: None
        self.release_shared: Callable[[Application], Awaitable[None]] | None = None
        self.default = self._load()

    # -- lookup -----------------------------------------------------------------------------

    def get(self, key: str) -> Application:
        """By id, else by name; a terminated one is gone (as EMR shows it only for a while)."""
        app = self._apps.get(key) or next((a for a in self._apps.values() if a.name == key), None)
        if app is None or app.state is ApplicationState.TERMINATED:
            raise NotFoundError(f"Application '{key}' not found.")
        return app

    def find(self, app_id: str | None) -> Application | None:
        """By id, also a terminated one (the records of its sessions and runs still name it)."""
        return self._apps.get(app_id) if app_id else None

    def list(self, states: set[str] | None = None) -> builtins.list[Application]:
        apps = [a for a in self._apps.values() if a.state is not ApplicationState.TERMINATED]
        apps.sort(key=lambda a: (not a.is_default, a.created_at, a.name))
        return [a for a in apps if not states or a.state.value in states]

    # -- loading ------------------------------------------------------------------------------

    def _default_definition(self) -> ApplicationDefinition:
        """Today's ``studio livy`` settings as the application ``default``: it never stops by itself."""
        return ApplicationDefinition(
            name=DEFAULT,
            initialCapacity={"DRIVER": WorkerTypeCapacity(workerCount=self.settings.pool_size)},
            maximumCapacity=MaximumCapacity(drivers=self.settings.max_sessions + self.settings.pool_size),
            autoStopConfiguration=AutoStopConfiguration(enabled=False),
            driverMode="SHARED" if self.settings.driver_mode == "shared" else "DEDICATED",
        )

    def _load(self) -> Application:
        rows = {row["name"]: row for row in self.store.all("applications") if row["state"] != ApplicationState.TERMINATED.value}
        default_row = rows.pop(DEFAULT, None)
        definition = self._default_definition()
        default = Application(
            default_row["id"] if default_row else new_id(),
            definition,
            state=ApplicationState.STARTED,
            created_at=default_row["created_at"] if default_row else None,
            is_default=True,
        )
        self._equip(default)
        self._save(default, new=default_row is None)
        self._apps[default.id] = default
        for row in rows.values():
            try:
                definition = parse_definition(row["definition"])
            except StudioError as exc:
                log.error("application %s (%s) has a definition this version cannot read, left stopped: %s", row["name"], row["id"], exc)
                continue
            state = ApplicationState(row["state"])
            # Started ones start again (their warm drivers come back from the pool's records or are
            # refilled); one caught half way goes on to where it was heading.
            resume = {S.STARTING: S.STARTED, S.STOPPING: S.STOPPED, S.CREATING: S.CREATED}.get(state, state)
            app = Application(
                row["id"],
                definition,
                state=resume,
                state_details=row["state_details"],
                created_at=row["created_at"],
                updated_at=row["updated_at"],
                declared=bool(row["declared"]),
            )
            self._equip(app)
            self._apps[app.id] = app
            if resume is not state:
                self.store.update("applications", app.id, state=resume.value)
        return default

    def _equip(self, app: Application) -> None:
        """Give ``app`` its pool and its view of the sessions in it."""
        app.pool = self._new_pool(app)
        app.pool.is_busy = lambda: self.pools_busy()
        app.live_sessions = lambda: self.session_usage(app)
        self.equip_shared(app)

    def _save(self, app: Application, new: bool = False) -> None:
        row = {
            "id": app.id,
            "name": app.name,
            "state": app.state.value,
            "state_details": app.state_details,
            "definition": app.definition.model_dump(exclude_none=True),
            "declared": int(app.declared),
            "updated_at": app.updated_at,
        }
        if new:
            self.store.insert("applications", {**row, "created_at": app.created_at})
        else:
            self.store.update(
                "applications",
                app.id,
                name=app.name,
                state=app.state.value,
                state_details=app.state_details,
                definition=row["definition"],
                declared=int(app.declared),
                updated_at=app.updated_at,
            )

    def declare(self, path: Path) -> None:
        """Create or bring up to date the applications declared in ``path`` (at start)."""
        for definition in read_declarations(path):
            if definition.name == DEFAULT:
                raise StudioError(f"{path}: the application 'default' is defined by the studio livy settings, not the file")
            existing = next((a for a in self._apps.values() if a.name == definition.name and a.state is not S.TERMINATED), None)
            if existing is None:
                app = self._add(definition, declared=True)
                log.info("application %s (%s) declared in %s", app.name, app.id, path)
            elif existing.definition != definition:
                if existing.live_sessions() or existing.running_jobs:
                    log.warning("application %s changed in %s but is running work; it keeps its definition until restarted idle", definition.name, path)
                    continue
                self._replace_definition(existing, definition)
                existing.declared = True
                self._save(existing)
                log.info("application %s updated from %s", existing.name, path)

    # -- lifecycle ----------------------------------------------------------------------------

    def _set_state(self, app: Application, new: ApplicationState, details: str = "") -> None:
        check_transition(TRANSITIONS, app.state, new, f"application {app.name}")
        old, app.state, app.state_details = app.state, new, details
        app.updated_at = time.time()
        self._save(app)
        log.info("application %s: %s -> %s%s", app.name, old.value, new.value, f" ({details})" if details else "")
        if self.events is not None:
            self.events.publish(Event("application", app.id, new.value, old.value, details, name=app.name, application=app.name))

    def _add(self, definition: ApplicationDefinition, declared: bool = False) -> Application:
        if any(a.name == definition.name for a in self.list()):
            raise ConflictError(f"An application named '{definition.name}' already exists.")
        app = Application(new_id(), definition, state=S.CREATING, declared=declared)
        self._equip(app)
        self._check_fits(app)
        self._apps[app.id] = app
        self._save(app, new=True)
        self._set_state(app, S.CREATED)
        return app

    def _check_fits(self, app: Application) -> None:
        limits = app.limits()
        if limits["drivers"] is not None and app.initial_capacity > limits["drivers"]:
            raise InvalidRequestError(
                f"Rejected, Reason: initialCapacity ({app.initial_capacity} drivers) is more than maximumCapacity.drivers ({limits['drivers']})."
            )
        if limits["memoryMB"] is not None and app.initial_capacity * app.driver_memory_mb() > limits["memoryMB"]:
            raise InvalidRequestError("Rejected, Reason: initialCapacity's drivers need more memory than maximumCapacity.memory.")

    async def create(self, data: Any) -> Application:
        # As in EMR, a new application is CREATED and holds nothing: it starts on request, or with the
        # first session or job run when auto-start is on.
        return self._add(parse_definition(data))

    def _replace_definition(self, app: Application, definition: ApplicationDefinition) -> None:
        app.definition = definition
        app.pool.resize(app.initial_capacity)  # its next drivers take the new shape (it has none now: stopped)
        app.updated_at = time.time()

    async def update(self, key: str, data: Any) -> Application:
        app = self.get(key)
        if app.is_default:
            raise ForbiddenError("The application 'default' is defined by the studio livy settings; change them and restart.")
        if app.state not in (S.CREATED, S.STOPPED):
            raise ConflictError(f"Application '{app.name}' is {app.state.value}; stop it before updating it (as EMR Serverless).")
        if not isinstance(data, dict):
            raise InvalidRequestError("An application update must be a JSON object.")
        merged = {**app.definition.model_dump(exclude_none=True), **{k: v for k, v in data.items() if k != "applicationId"}}
        if merged.get("name") != app.name:
            raise InvalidRequestError("Rejected, Reason: an application's name cannot be changed.")
        definition = parse_definition(merged)
        previous = app.definition
        self._replace_definition(app, definition)
        try:
            self._check_fits(app)
        except StudioError:
            self._replace_definition(app, previous)
            raise
        self._save(app)
        return app

    async def start(self, key: str | Application, reason: str = "started on request") -> Application:
        app = key if isinstance(key, Application) else self.get(key)
        async with app.transition_lock:
            if app.state in (S.STARTING, S.STARTED):
                return app
            if app.state not in (S.CREATED, S.STOPPED):
                raise ConflictError(f"Application '{app.name}' is {app.state.value}; it can be started once it is STOPPED.")
            self._set_state(app, S.STARTING, reason)
            app.idle_since = time.monotonic()
            app.pool.start()
        task = asyncio.create_task(self._finish_start(app, reason), name=f"start-{app.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return app

    async def _finish_start(self, app: Application, reason: str) -> None:
        """STARTED once its pre-initialized capacity is up, as EMR (work is accepted meanwhile)."""
        timeout = self.settings.worker_start_timeout * max(1, app.initial_capacity)
        # Up once its warm drivers are, or once sessions and runs took the room they would have had.
        full = await app.pool.wait_until_settled(timeout) if app.initial_capacity else True
        async with app.transition_lock:
            if app.state is S.STARTING:
                app.idle_since = time.monotonic()  # a full idle period from when its capacity is up
                if not full:
                    reason += f"; not all its warm drivers are up ({app.pool.last_error or 'no room or still starting'})"
                self._set_state(app, S.STARTED, reason)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def stop(self, key: str | Application, reason: str = "stopped on request") -> Application:
        app = key if isinstance(key, Application) else self.get(key)
        if app.is_default:
            raise ForbiddenError("The application 'default' does not stop; it stops with the service.")
        async with app.transition_lock:
            if app.state in (S.STOPPED, S.CREATED):
                return app
            if app.state not in (S.STARTED, S.STARTING):
                raise ConflictError(f"Application '{app.name}' is {app.state.value}.")
            busy = app.usage()
            if busy["sessions"] or busy["jobRuns"] or busy["queuedJobRuns"]:
                # Nothing is lost by a stop: the sessions and runs are the users' work.
                raise ConflictError(
                    f"Application '{app.name}' has {busy['sessions']} live session(s) and "
                    f"{busy['jobRuns'] + busy['queuedJobRuns']} job run(s); delete or cancel them first."
                )
            self._set_state(app, S.STOPPING, reason)
            await app.pool.release()
            if self.release_shared is not None:
                await self.release_shared(app)
            self._set_state(app, S.STOPPED, reason)
        await self.notify_room()
        return app

    async def delete(self, key: str) -> Application:
        app = self.get(key)
        if app.is_default:
            raise ForbiddenError("The application 'default' cannot be deleted.")
        if app.state not in (S.CREATED, S.STOPPED):
            raise ConflictError(f"Application '{app.name}' is {app.state.value}; stop it before deleting it (as EMR Serverless).")
        self._set_state(app, S.TERMINATED, "deleted on request")
        return app

    async def ensure_started(self, app: Application) -> None:
        """Work arrived for ``app``: start it when it is stopped and auto-start is on, else 409."""
        if app.accepts_work:
            return
        if app.state in (S.CREATED, S.STOPPED) and app.definition.autoStartConfiguration.enabled:
            await self.start(app, "auto-started by a request")
            return
        raise ConflictError(
            f"Application '{app.name}' is {app.state.value}"
            + (" and auto-start is off; start it first." if app.state in (S.CREATED, S.STOPPED) else "; try again shortly.")
        )

    # -- capacity -----------------------------------------------------------------------------

    def admit_session(self, app: Application, memory: int, cores: float, warm: bool) -> None:
        """A new session's driver fits in ``maximumCapacity`` (a warm one is counted already), or 429."""
        if warm:
            return
        why = app.room_for(memory, cores)
        if why is None:
            return
        if app.room_for(memory, cores, counting_warm=False) is None and app.pool.release_one():
            return  # a warm driver made way for a driver of the session's own shape (EMR scales the same way)
        raise TooManySessionsError(f"Rejected, Reason: application '{app.name}' has no room for another driver: {why}.")

    async def notify_room(self) -> None:
        """Something let go of capacity: the pools look again whether a refill fits (queued job runs
        look again on their own, every second and when a run ends)."""
        for app in self._apps.values():
            app.pool.wake()

    def touch(self, app: Application) -> None:
        """Work in ``app`` ended or began: its idle time starts again from now."""
        app.idle_since = time.monotonic()

    async def stop_idle(self) -> None:
        """Auto-stop: an application idle (EMR's IsIdle) for its ``idleTimeoutMinutes`` lets its warm
        drivers go and keeps only its record."""
        now = time.monotonic()
        for app in list(self._apps.values()):
            auto_stop = app.definition.autoStopConfiguration
            if app.is_default or app.state is not S.STARTED or not auto_stop.enabled:
                continue
            if not app.is_idle():
                app.idle_since = None
                continue
            if app.idle_since is None:
                app.idle_since = now
            elif now - app.idle_since >= auto_stop.idleTimeoutMinutes * 60:
                minutes = f"{auto_stop.idleTimeoutMinutes:g}"
                try:
                    await self.stop(app, f"auto-stopped after {minutes} minute(s) idle")
                except StudioError as exc:  # work arrived meanwhile
                    log.info("application %s not auto-stopped: %s", app.name, exc)

    # -- the service's start and stop ----------------------------------------------------------

    def start_pools(self) -> None:
        for app in self._apps.values():
            if app.state is S.STARTED:
                app.pool.start()

    def pools(self) -> builtins.list[WorkerPool]:
        return [a.pool for a in self._apps.values()]



def read_declarations(path: Path) -> builtins.list[ApplicationDefinition]:
    """The application definitions in a JSON or TOML file: ``{"applications": [ ... ]}`` (TOML:
    ``[[applications]]`` tables), or in JSON a bare list."""
    try:
        text = path.read_text()
        data: Any = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (OSError, ValueError) as exc:
        raise StudioError(f"Cannot read the applications file {path}: {exc}") from None
    items = data.get("applications", []) if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise StudioError(f"{path}: 'applications' must be a list of application definitions")
    definitions = []
    for number, item in enumerate(items, 1):
        try:
            definitions.append(parse_definition(item))
        except StudioError as exc:
            raise StudioError(f"{path}: application {number}: {exc.msg}") from None
    names = [d.name for d in definitions]
    if len(names) != len(set(names)):
        raise StudioError(f"{path}: two applications share a name")
    return definitions
