"""Shared-driver mode: lean sessions on one Spark Connect driver per application and user.

An application with ``driverMode: SHARED`` (the default one with ``STUDIO_DRIVER_MODE=shared``)
runs no driver JVM per session. Each user gets one Spark Connect server of the application's
shape (``studio.livy.connect_drivers``), never shared with another user's code, started by their
first session and stopped when it has had no session for the application's idle timeout. A
session is a lean worker (``python -P -m studio.worker`` in shared mode: our REPL and a Spark
Connect session as ``spark``, about a third of a dedicated session's memory). Each user's driver
has a warm pool of such workers with their Connect session made and a first query run, so a new
session is idle at once.

Capacity counts memory, not sessions (``MemoryAdmission``): what the live sessions, warm workers
and drivers measure (PSS where the kernel has it), plus an estimate for each create under way,
must stay within ``STUDIO_MEMORY_BUDGET_MB``; a session that would not fit is refused with a
message that says how much is used of what.
"""

from __future__ import annotations

import getpass
import logging
import statistics
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable

import psutil

from studio.config import Settings
from studio.errors import TooManySessionsError
from studio.livy.pool import WorkerPool
from studio.livy.workers import WorkerProcess, WorkerSpec
from studio.process import memory_mb

if TYPE_CHECKING:
    from studio.livy.applications import Application, Applications
    from studio.livy.connect_drivers import ConnectDriver, ConnectDrivers

log = logging.getLogger("studio.livy.shared")

LEAN_APP_NAME = "spark-studio-shared-session"

# Footprints until one is measured (MB, PSS on this kind of machine: `studio bench --density`), by kind:
# a lean (shared-mode) session, a dedicated session (worker and JVM), a shared driver.
DEFAULT_FOOTPRINT_MB = {"lean": 160.0, "dedicated": 450.0, "driver": 700.0}


def process_tree_mb(pid: int | None) -> float | None:
    """PSS (else RSS) of a process and everything below it, in MB; None when it is gone."""
    if pid is None:
        return None
    try:
        root = psutil.Process(pid)
        return memory_mb([root, *root.children(recursive=True)])
    except psutil.Error:
        return None


def default_budget_mb() -> int:
    return int(psutil.virtual_memory().total * 0.8 / (1024 * 1024))


class MemoryAdmission:
    """Admits a new session when the measured footprints of what runs, plus the new session's
    estimate, fit in the budget. Measurements are kept per process for ``ttl`` seconds (a create
    must not read fifty ``smaps`` files) and the estimates follow what was measured."""

    def __init__(self, settings: Settings, ttl: float = 5.0) -> None:
        self.budget_mb = settings.memory_budget_mb or default_budget_mb()
        self.ttl = ttl
        self._measured: dict[int, tuple[float, float]] = {}  # pid -> (when, MB)
        self._samples: dict[str, list[float]] = {kind: [] for kind in DEFAULT_FOOTPRINT_MB}  # the last 50 of each kind

    def measure(self, pid: int | None) -> float | None:
        if pid is None:
            return None
        now = time.monotonic()
        kept = self._measured.get(pid)
        if kept is not None and now - kept[0] < self.ttl:
            return kept[1]
        mb = process_tree_mb(pid)
        if mb is None:
            self._measured.pop(pid, None)
            return None
        self._measured[pid] = (now, mb)
        return mb

    def learn(self, kind: str, mb: float | None) -> None:
        """A footprint measured of a settled (idle, ready) process of ``kind``: lean, dedicated, driver."""
        if mb is None:
            return
        samples = self._samples[kind]
        samples.append(mb)
        del samples[:-50]

    def estimate(self, kind: str) -> float:
        samples = self._samples[kind]
        return statistics.median(samples) if samples else DEFAULT_FOOTPRINT_MB[kind]

    def used_mb(self, pids: Iterable[tuple[int | None, str]]) -> float:
        """What the given processes (pid, kind) take now; one not measurable counts its kind's estimate."""
        total = 0.0
        for pid, kind in pids:
            mb = self.measure(pid)
            total += mb if mb is not None else self.estimate(kind)
        return total

    def admit(self, used_mb: float, needed_mb: float, what: str) -> None:
        if used_mb + needed_mb > self.budget_mb:
            raise TooManySessionsError(
                f"Rejected, not enough memory for {what}: sessions and drivers take {used_mb:.0f} MB of the "
                f"{self.budget_mb} MB budget (STUDIO_MEMORY_BUDGET_MB) and it needs about {needed_mb:.0f} MB; "
                "delete a session first."
            )


class SharedSessions:
    """The shared-driver side of the session service: users' drivers, their warm pools of lean workers."""

    def __init__(
        self,
        settings: Settings,
        applications: "Applications",
        drivers: "ConnectDrivers",
        new_worker: Callable[[WorkerSpec], WorkerProcess],
        admission: MemoryAdmission,
    ) -> None:
        self.settings = settings
        self.applications = applications
        self.drivers = drivers
        self._new_worker = new_worker
        self.admission = admission
        self._pools: dict[tuple[str, str], WorkerPool] = {}
        self._pool_driver: dict[tuple[str, str], "ConnectDriver"] = {}
        self._holds: dict[tuple[str, str], int] = {}  # live sessions (and creates) per driver
        self.is_busy: Callable[[], bool] = lambda: False
        for app in applications.list():
            self.equip(app)

    # -- who and where --------------------------------------------------------------------

    @staticmethod
    def user_of(spark_user: str | None) -> str:
        """The user whose driver a session uses: its Spark user (checked by studio.livy.access), else the
        user the service runs as (authentication off)."""
        return spark_user or getpass.getuser()

    def equip(self, app: "Application") -> None:
        app.shared_drivers = lambda: sum(1 for d in self._running_drivers() if d.application_id == app.id)
        app.shared_memory_mb = lambda: int(self.admission.used_mb(self._processes(app.id)))

    def _running_drivers(self) -> list["ConnectDriver"]:
        return [d for d in self.drivers.all() if not d.exited.done()]

    def _processes(self, app_id: str | None = None) -> list[tuple[int | None, str]]:
        """(pid, kind) of the running drivers and warm lean workers of ``app_id`` (None: of every application)."""
        pids: list[tuple[int | None, str]] = [(_pid(d), "driver") for d in self._running_drivers() if app_id in (None, d.application_id)]
        for (pool_app, _), pool in self._pools.items():
            if app_id in (None, pool_app):
                pids += [(pid, "lean") for pid in pool.pids()]
        return pids

    def idle_minutes(self, app_id: str) -> float | None:
        app = self.applications.find(app_id)
        if app is None:
            return 0.0
        if app.is_default:
            return self.settings.shared_driver_idle_minutes
        return app.definition.autoStopConfiguration.idleTimeoutMinutes

    # -- drivers and pools --------------------------------------------------------------------

    def pool(self, app: "Application", user: str) -> WorkerPool | None:
        """The warm pool of ``user``'s driver in ``app``, when that driver runs."""
        pool = self._pools.get((app.id, user))
        driver = self.drivers.get(app.id, user)
        if pool is None or driver is None or driver.exited.done():
            return None
        return pool

    def hold(self, app: "Application", user: str) -> None:
        key = (app.id, user)
        self._holds[key] = self._holds.get(key, 0) + 1
        driver = self.drivers.get(app.id, user)
        if driver is not None:
            driver.sessions = self._holds[key]

    def let_go(self, app_id: str, user: str) -> None:
        key = (app_id, user)
        self._holds[key] = max(0, self._holds.get(key, 0) - 1)
        driver = self.drivers.get(app_id, user)
        if driver is not None:
            driver.sessions = self._holds[key]
            if not self._holds[key]:
                driver.idle_since = time.monotonic()

    async def driver(self, app: "Application", user: str) -> "ConnectDriver":
        """``user``'s running driver in ``app``, started (and its pool with it) when there is none."""
        driver = await self.drivers.ensure(app, user)
        driver.sessions = self._holds.get((app.id, user), 0)
        key = (app.id, user)
        pool = self._pools.get(key)
        if pool is None or self._pool_driver.get(key) is not driver:  # none yet, or one of a driver that stopped
            if pool is not None:
                await pool.release()
            pool = WorkerPool(
                self.settings,
                lambda: self._new_worker(self.spec(app, user, driver, warm=True)),
                size=self.settings.shared_pool_size,
                name=f"{app.name}/{user}",
            )
            self._pool_driver[key] = driver
            pool.is_busy = self.is_busy
            pool.has_room = lambda: self._room_for_warm()
            self._pools[key] = pool
            pool.start()
            mb = self.admission.measure(_pid(driver))
            self.admission.learn("driver", mb)
        return driver

    def _room_for_warm(self) -> bool:
        try:
            self.admission.admit(self.used_mb(), self.admission.estimate("lean"), "a warm session")
        except TooManySessionsError:
            return False
        return True

    def spec(self, app: "Application", user: str, driver: "ConnectDriver", *, warm: bool, session_name: str | None = None) -> WorkerSpec:
        return WorkerSpec(
            conf={},
            app_name=session_name or LEAN_APP_NAME,
            warmup=warm,
            user=user,
            application_id=app.id,
            shape=f"shared:{user}",  # a restarted service never puts it in a dedicated pool
            shared={
                "mode": "shared",
                "connect_url": driver.client_url(),
                "connect_token": driver.token(),
                "spark_ui_url": driver.info.get("spark_ui_url"),
                "app_id": driver.info.get("app_id"),
            },
        )

    def used_mb(self, extra: Iterable[tuple[int | None, str]] = ()) -> float:
        """Drivers and warm lean workers of every application, plus ``extra`` (the live sessions' workers)."""
        return self.admission.used_mb([*self._processes(), *extra])

    def needs_driver(self, app: "Application", user: str) -> bool:
        driver = self.drivers.get(app.id, user)
        return driver is None or driver.exited.done()

    # -- stopping ----------------------------------------------------------------------------

    async def stop_idle(self) -> None:
        """Drivers with no session for their application's idle minutes go, their pools first."""
        for (app_id, user), pool in list(self._pools.items()):
            driver = self.drivers.get(app_id, user)
            minutes = self.idle_minutes(app_id)
            if driver is None or driver.exited.done():
                await pool.release()
                self._pools.pop((app_id, user), None)
                continue
            if self._holds.get((app_id, user), 0) == 0 and minutes is not None and driver.idle_seconds() >= minutes * 60:
                log.info("stopping the shared driver of %s in application %s: no session for %g minute(s)", user, app_id, minutes)
                await pool.release()
                self._pools.pop((app_id, user), None)
        await self.drivers.stop_idle(self.idle_minutes)

    async def stop_application(self, app_id: str) -> None:
        for (pool_app, user), pool in list(self._pools.items()):
            if pool_app == app_id:
                await pool.release()
                self._pools.pop((pool_app, user), None)
        await self.drivers.stop_application(app_id)

    async def shutdown(self, keep: bool) -> None:
        for pool in self._pools.values():
            await (pool.detach() if keep else pool.shutdown())
        self._pools.clear()
        await self.drivers.shutdown(keep)

    def status(self) -> list[dict[str, Any]]:
        rows = []
        for driver in self.drivers.all():
            pool = self._pools.get((driver.application_id, driver.user))
            rows.append(
                {
                    "application": driver.application_id,
                    "user": driver.user,
                    "pid": _pid(driver),
                    "sessions": self._holds.get((driver.application_id, driver.user), 0),
                    "ready": driver.is_ready(),
                    "sparkUiUrl": driver.info.get("spark_ui_url"),
                    "warmSessions": pool.ready_count() if pool else 0,
                }
            )
        return rows


def _pid(driver: "ConnectDriver") -> int | None:
    """The driver's JVM (the spark-submit it was started as execs into it)."""
    return driver.info.get("jvm_pid") or driver.pid
