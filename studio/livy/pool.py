"""The warm pool: workers whose SparkSession is up and has run its first job, ready to be handed
to a session in a few milliseconds.

The pool's interface is about handing out a session-ready worker (``take``), not about forking
JVMs, so a later pool may hand out sessions of a shared driver instead. It refills one worker
at a time in the background after each hand-out, at low priority, and stops refilling after
``worker_restart_limit`` failed starts in a row (jupyter_client's restarter does the same), so
a broken installation does not spin.

Ready workers outlive the service like session workers do: ``detach`` leaves them running when
the service stops keeping its sessions, and the next start takes them back (``adopt``), so a restart
costs no refill (a JVM start that would compete with the sessions for the cores).

There is one pool per application (``studio.livy.applications``): its workers have the
application's driver shape, it never starts one that would not fit in the application's
``maximumCapacity`` (``has_room``), and stopping the application ``release``s them. A session that
finds no ready worker while one is on its way ``claim``s that one instead of starting a second JVM
beside it (two JVM starts on two cores take as long as each alone would, twice over).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

import psutil

from studio.config import Settings
from studio.errors import WorkerError
from studio.livy.workers import WorkerProcess

log = logging.getLogger("studio.livy.pool")


def available_memory_mb() -> int | None:
    """Memory the kernel could hand out without swapping (Linux's MemAvailable), in MB."""
    try:
        return int(psutil.virtual_memory().available) // (1024 * 1024)
    except (OSError, RuntimeError):
        return None


class WorkerPool:
    def __init__(self, settings: Settings, new_worker: Callable[[], WorkerProcess], size: int | None = None, name: str = "default") -> None:
        self.settings = settings
        self.size = settings.pool_size if size is None else size
        self.name = name
        self._new_worker = new_worker
        self.is_busy: Callable[[], bool] = lambda: False  # set by the session manager
        self.has_room: Callable[[], bool] = lambda: True  # set by the application: one more warm driver fits
        self._ready: list[WorkerProcess] = []
        self._claims: list[asyncio.Future[WorkerProcess]] = []
        self._starting: WorkerProcess | None = None
        self._wanted = asyncio.Event()
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self.failures = 0  # failed starts in a row
        self.last_error = ""
        self.handed_out = 0

    # -- public ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start filling (again, after ``release``)."""
        self._closed = False
        self.failures = 0
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._fill(), name=f"pool-fill-{self.name}")
        self._wanted.set()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done() and not self._closed

    def wake(self) -> None:
        """Capacity may have come free: look again whether a refill fits."""
        self._wanted.set()

    def resize(self, size: int) -> None:
        self.size = size
        self._wanted.set()

    def ready_count(self) -> int:
        return len(self._ready)

    def warm_count(self) -> int:
        """Drivers the pool holds: ready ones and the one starting, unless a session claimed it."""
        return len(self._ready) + (1 if self._starting is not None and not self._claims else 0)

    def pids(self) -> list[int]:
        """The worker processes it holds (ready and starting), for the memory they take."""
        workers = self._ready + ([self._starting] if self._starting is not None else [])
        return [w.pid for w in workers if w.pid is not None]

    def unclaimed_starting(self) -> bool:
        return self._starting is not None and not self._claims

    def claim(self) -> "asyncio.Future[WorkerProcess] | None":
        """The next worker this pool starts, promised to a session that waits for it; None when the
        pool cannot start one (no places, stopped, or failing). Cancel the future to give it up."""
        if self.size <= 0 or not self.running or self.failures >= self.settings.worker_restart_limit:
            return None
        if len(self._claims) >= self.size:
            return None
        claim: asyncio.Future[WorkerProcess] = asyncio.get_running_loop().create_future()
        self._claims.append(claim)
        if self._starting is not None:
            self._starting.renice(0)  # a session waits for it now: full priority, no more warm-up
            self._starting.hurry()
        self._wanted.set()
        return claim

    def release_one(self) -> bool:
        """Stop one ready worker now to make room for a driver of another shape; False when none is ready."""
        if not self._ready:
            return False
        worker = self._ready.pop()
        worker.log.append("released from the warm pool to make room")
        asyncio.create_task(worker.stop())
        return True

    async def release(self) -> None:
        """The application stops: its warm workers go, and nothing refills until ``start``."""
        await self._close()
        for claim in self._claims:
            if not claim.done():
                claim.cancel()
        self._claims = []
        workers = self._ready + ([self._starting] if self._starting else [])
        self._ready = []
        await asyncio.gather(*(worker.stop() for worker in workers), return_exceptions=True)

    def take(self) -> WorkerProcess | None:
        """A ready worker on loan, or None. Follow with ``commit`` or ``give_back``."""
        while self._ready:
            worker = self._ready.pop(0)
            if worker.poll() is None:
                return worker
        self._wanted.set()
        return None

    def commit(self, worker: WorkerProcess) -> None:
        """The loaned worker now belongs to a session: refill behind it."""
        self.handed_out += 1
        self._wanted.set()

    def discard(self, worker: WorkerProcess) -> None:
        """A loaned worker turned out broken: stop it and refill."""
        self._wanted.set()
        asyncio.create_task(worker.stop(now=True))

    def give_back(self, worker: WorkerProcess) -> None:
        """Return a loaned worker that was not used (its session needs a JVM of its own)."""
        if self._closed or worker.poll() is not None:
            self._wanted.set()
            asyncio.create_task(worker.stop())
            return
        self._ready.insert(0, worker)

    def status(self) -> dict[str, object]:
        return {
            "size": self.size,
            "ready": len(self._ready),
            "claimed": len(self._claims),
            "starting": 1 if self._starting else 0,
            "handedOut": self.handed_out,
            "failuresInARow": self.failures,
            "lastError": self.last_error or None,
            "readyWorkers": [
                {
                    "id": w.id,
                    "pid": w.pid,
                    "jvmPid": w.info.get("jvm_pid"),
                    "startSeconds": round(w.ready_at - w.started_at, 1),
                    "idleSeconds": round(time.monotonic() - w.ready_at, 1),
                }
                for w in self._ready
            ],
        }

    async def wait_until_settled(self, timeout: float) -> bool:
        """Wait until the pool is full, or holds all that its application's capacity leaves room for."""
        deadline = time.monotonic() + timeout
        while len(self._ready) < self.size and (self.has_room() or self._starting is not None or self._claims):
            if time.monotonic() > deadline or self.failures >= self.settings.worker_restart_limit:
                return False
            await asyncio.sleep(0.2)
        return True

    async def wait_until_full(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while len(self._ready) < self.size:
            if time.monotonic() > deadline or self.failures >= self.settings.worker_restart_limit:
                return False
            await asyncio.sleep(0.1)
        return True

    async def shutdown(self) -> None:
        await self._close()
        workers = self._ready + ([self._starting] if self._starting else [])
        self._ready = []
        await asyncio.gather(*(worker.stop() for worker in workers), return_exceptions=True)

    async def detach(self) -> None:
        """The service stops and keeps its workers: the ready ones run on for the next start to
        ``adopt``; one still starting is stopped (it is only a refill)."""
        await self._close()
        starting, self._starting = self._starting, None
        ready, self._ready = self._ready, []
        await asyncio.gather(
            *(worker.detach() for worker in ready), *([starting.stop(now=True)] if starting else []), return_exceptions=True
        )

    async def adopt(self, workers: list[WorkerProcess]) -> list[WorkerProcess]:
        """Take back the warm workers an earlier run of the service left ready (adopted and attached
        by the caller) up to the pool's size; returns those it does not want (to be stopped)."""
        unwanted = []
        for worker in workers:
            if len(self._ready) < self.size and worker.ready.done() and not worker.ready.exception() and worker.poll() is None:
                self._ready.append(worker)
                self._forget_when_gone(worker)
                log.info("warm pool: worker %s (pid %s) adopted", worker.id, worker.pid)
            else:
                unwanted.append(worker)
        return unwanted

    async def _close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    # -- filling --------------------------------------------------------------------------

    async def _fill(self) -> None:
        while not self._closed:
            await self._wanted.wait()
            self._wanted.clear()
            while not self._closed and (len(self._ready) < self.size or self._claims):
                if self.failures >= self.settings.worker_restart_limit:
                    log.error(
                        "warm pool: %d workers failed to start in a row; not refilling (last error: %s)",
                        self.failures,
                        self.last_error,
                    )
                    self._fail_claims(WorkerError(f"warm drivers fail to start: {self.last_error}"))
                    break
                free = available_memory_mb()
                if free is not None and free < self.settings.min_available_memory_mb:
                    log.warning("warm pool: only %d MB of memory available; waiting before refilling", free)
                    await asyncio.sleep(10)
                    continue
                if not self._claims:
                    if not self.has_room():
                        break  # the application's maximumCapacity is used up; ``wake`` looks again
                    await self._wait_for_quiet()
                if self._claims or (len(self._ready) < self.size and self.has_room()):  # a loaned worker may have come back
                    await self._start_one()

    async def _wait_for_quiet(self) -> None:
        """Defer a refill while statements run: a starting JVM takes both cores here for ~20 s,
        which doubles the time of the statements it overlaps. After ``pool_refill_max_delay``
        seconds the refill starts anyway."""
        deadline = time.monotonic() + self.settings.pool_refill_max_delay
        quiet_since = time.monotonic() if not self.is_busy() else None
        while time.monotonic() < deadline and not self._claims:
            if self.is_busy():
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= 1.0:
                return
            await asyncio.sleep(0.2)

    async def _start_one(self) -> None:
        worker = self._new_worker()
        self._starting = worker
        if self._claims:
            worker.hurry()  # sent with its start message
        try:
            await worker.start(nice=0 if self._claims else self.settings.pool_nice)
            await worker.wait_ready()
        except (WorkerError, OSError) as exc:
            self.failures += 1
            self.last_error = getattr(exc, "msg", str(exc))
            log.warning("warm pool %s: worker %s failed to start: %s", self.name, worker.id, self.last_error)
            await worker.stop(now=True)
            self._fail_claims(WorkerError(self.last_error))
            await asyncio.sleep(min(30.0, 2.0**self.failures))
            return
        except asyncio.CancelledError:
            await worker.stop(now=True)
            raise
        finally:
            self._starting = None
        self.failures = 0
        log.info("warm pool %s: worker %s ready in %.1fs", self.name, worker.id, worker.ready_at - worker.started_at)
        while self._claims:
            claim = self._claims.pop(0)
            if not claim.done():
                self.handed_out += 1
                claim.set_result(worker)
                return
        self._ready.append(worker)
        worker.exited.add_done_callback(lambda _: self._forget(worker))

    def _fail_claims(self, error: Exception) -> None:
        claims, self._claims = self._claims, []
        for claim in claims:
            if not claim.done():
                claim.set_exception(error)

    def _forget_when_gone(self, worker: WorkerProcess) -> None:
        worker.exited.add_done_callback(lambda _: self._forget(worker))

    def _forget(self, worker: WorkerProcess) -> None:
        if worker in self._ready:
            self._ready.remove(worker)
            log.warning("warm pool: idle worker %s exited; replacing it", worker.id)
            self._wanted.set()
