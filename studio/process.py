"""Child processes: one model for starting, watching, adopting and stopping them.

Every process the studio starts (session workers, JupyterLabs, spark-submit batches, the
class-data training run, the embedded session service, ``studio run`` children, git clones,
the bench's services) is a ``ChildProcess``. The contract is jupyter_client's provisioner and
jupyterhub's Spawner:

* ``ChildProcess(command, ...)`` then ``start()``: the child runs in a process group and session
  of its own (``start_new_session``), so a signal to the group reaches everything it started
  that stayed in it (a worker's JVM, spark-submit's driver), and a Ctrl-C at the parent's
  terminal reaches only the parent, which then stops its children in order. stdin is
  ``/dev/null``; stdout goes to ``output`` (a file appended to, a descriptor, or ``/dev/null``),
  and stderr with it unless ``stderr`` says otherwise. ``start`` is synchronous (a fork and exec) and may be called with or
  without a running event loop; call it from a thread that lives as long as the process does
  when ``die_with_parent`` is set (Linux ties the parent-death signal to the forking thread).
* ``poll() -> int | None``: None while it runs; once it is gone, its exit code (negative: the
  signal that killed it), or 0 when the code cannot be known (an adopted process is not our
  child, so only its real parent, long gone, could have learnt it: jupyterhub's rule). A zombie
  counts as gone.
* ``await wait() -> int`` (and ``wait_sync(timeout) -> int | None``): waits for the exit without
  polling on Linux (a pidfd in the event loop), for children and adopted processes alike.
* ``await stop(now=False, polite=None, timeout=None) -> ShutdownStep``: the recorded escalation.
  ``polite`` (a coroutine function given by the caller: "send the worker its shutdown message",
  "POST JupyterLab's /api/shutdown") runs first, then SIGTERM to the group, then SIGKILL to the
  group, each given ``timeout`` seconds (default ``stop_timeout``) to end the child;
  ``now=True`` goes straight to SIGKILL. The step at which the child was gone is returned and
  kept in ``shutdown_step`` (for tests and logs, as jupyter_client's ``_ShutdownStatus``). After
  the child is gone, what is left of its group (and, with ``descendants=True``, every process
  that descended from it, also in sessions of their own, as Jupyter starts its kernels) gets
  ``timeout`` seconds more to exit (none with ``now``), then SIGKILL: when ``stop`` returns,
  nothing the child started is left. ESRCH counts as gone everywhere. ``kill()`` is
  ``stop(now=True)``; ``stop_sync`` is the same for code without an event loop.
* ``record`` (a ``ProcessRecord``: pid, psutil's create time, process group; JSON with
  ``to_json``) is what a store keeps; ``ChildProcess.adopt(record)`` finds that process again in
  a later run of the parent, by pid **and** create time, so a pid that the kernel gave to another
  process since is never adopted (None). An adopted process supports all of the above.

``run_to_end`` runs a short command (git) to its end within a timeout. ``describe_exit`` words
an exit code for people; ``python_command`` is how every Python child
starts (``python -P``: nothing from the working folder shadows a module); ``group_members``,
``descendants_of`` and ``renice_group`` are psutil helpers for the same process groups.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import inspect
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Awaitable, Callable, Iterable, Mapping, Sequence

import psutil

log = logging.getLogger("studio.process")

# Two readings of one process's create time can differ a little: psutil adds the boot time,
# which Linux derives from the wall clock and which an NTP step moves. A pid the kernel hands
# out again within a second of the first start would need the whole pid space to cycle in that
# second, so one second tells "the same process" from "a reused pid" safely.
CREATE_TIME_TOLERANCE = 1.0

_POLL_SECONDS = 0.05  # where waiting cannot use a pidfd, and while a group empties


class ShutdownStep(enum.Enum):
    """How far ``stop`` had to go; kept for tests and logs (jupyter_client's _ShutdownStatus)."""

    ALREADY_GONE = "already gone"
    POLITE = "shutdown message"
    SIGTERM = "SIGTERM"
    SIGKILL = "SIGKILL"


def describe_exit(code: int | None) -> str:
    """An exit code for people: "exited with code 1", "was killed by SIGKILL (possibly ...)"."""
    if code is None:
        return "is still running"
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        hint = " (possibly the kernel's out-of-memory killer)" if -code == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {code}"


def python_command(module: str, *args: str) -> list[str]:
    """``python -P -m module args``: every Python child starts so, so that a ``studio/``,
    ``jupyterlab/`` or ``traitlets.py`` in its working folder is never imported in its place."""
    return [sys.executable, "-P", "-m", module, *args]


@dataclass(frozen=True)
class ProcessRecord:
    """What identifies a running process across restarts of its parent: the pid alone does not
    (the kernel reuses pids), the pid with its create time does."""

    pid: int
    create_time: float
    pgid: int

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "create_time": self.create_time, "pgid": self.pgid}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> "ProcessRecord | None":
        """The record in ``data`` (as ``to_json`` wrote it), or None when it holds none."""
        if not data:
            return None
        try:
            pid = int(data["pid"])
            create_time = float(data["create_time"])
            pgid = int(data.get("pgid") or pid)
        except (KeyError, TypeError, ValueError):
            return None
        return cls(pid, create_time, pgid) if pid > 0 else None

    @classmethod
    def of(cls, pid: int) -> "ProcessRecord | None":
        """The record of the running process ``pid``, or None when there is none."""
        try:
            process = psutil.Process(pid)
            return cls(pid, process.create_time(), os.getpgid(pid))
        except (psutil.Error, OSError):
            return None


def _running(process: psutil.Process) -> bool:
    """It runs (a zombie does not) and is still the process we knew (psutil checks the pid's
    create time against reuse)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def group_members(pgid: int) -> list[psutil.Process]:
    """The live (non-zombie) processes of process group ``pgid``."""
    try:
        os.killpg(pgid, 0)  # the cheap answer first: no process at all in the group
    except ProcessLookupError:
        return []
    except PermissionError:
        pass
    members = []
    for process in psutil.process_iter(["status"]):
        try:
            if process.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(process.pid) == pgid:
                members.append(process)
        except (OSError, psutil.Error):
            continue
    return members


def memory_mb(processes: Iterable[psutil.Process]) -> float:
    """What the processes take together, in MB: PSS (pages shared between them counted once), else RSS
    (a kernel without smaps, or a process whose smaps we may not read); a process gone meanwhile counts nothing."""
    total = 0
    for process in processes:
        try:
            try:
                total += getattr(process.memory_full_info(), "pss", 0) or process.memory_info().rss
            except psutil.AccessDenied:
                total += process.memory_info().rss
        except psutil.Error:
            continue
    return total / (1024 * 1024)


def descendants_of(pid: int) -> list[psutil.Process]:
    """Every live process below ``pid`` (children, their children, ...), whatever their group."""
    try:
        return [p for p in psutil.Process(pid).children(recursive=True) if _running(p)]
    except psutil.Error:
        return []


def renice_group(pgid: int, value: int) -> bool:
    """Set every thread of every process in the group to niceness ``value`` (lowering it needs
    privilege); False when nothing could be changed."""
    changed = False
    for process in group_members(pgid):
        try:
            threads = [thread.id for thread in process.threads()]
        except psutil.Error:
            continue
        for tid in threads:
            try:
                os.setpriority(os.PRIO_PROCESS, tid, value)
                changed = True
            except OSError:
                return changed
    return changed


@dataclass(frozen=True)
class Completed:
    """How a command run by ``run_to_end`` ended."""

    code: int | None  # None: it ran over its time and was killed with its group
    output: str  # what it wrote on stdout


def run_to_end(
    command: Sequence[str], *, timeout: float, cwd: Path | str | None = None, env: Mapping[str, str] | None = None
) -> Completed:
    """Run a short command to its end without an event loop (stderr is dropped): a ChildProcess
    like any other, so at ``timeout`` its whole group is killed, whatever it started."""
    with tempfile.TemporaryFile() as output:
        child = ChildProcess(command, cwd=cwd, env=env, output=output, stderr=None)
        child.start()
        code = child.wait_sync(timeout)
        if code is None:
            child.stop_sync(now=True)
        output.seek(0)
        return Completed(code, output.read().decode(errors="replace"))


@contextlib.contextmanager
def _output_handle(output: Path | int | IO[Any] | None) -> Any:
    if output is None:
        yield subprocess.DEVNULL
    elif isinstance(output, Path):
        output.parent.mkdir(parents=True, exist_ok=True)
        with open(output, "ab") as handle:
            yield handle
    else:
        yield output


class ChildProcess:
    """One child process group: started here, or adopted from a previous run (see the module)."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        name: str = "",
        cwd: Path | str | None = None,
        env: Mapping[str, str] | None = None,
        output: Path | int | IO[Any] | None = None,
        stderr: Path | int | IO[Any] | None = subprocess.STDOUT,
        pass_fds: Iterable[int] = (),
        stop_timeout: float = 10.0,
        descendants: bool = False,
        die_with_parent: bool = False,
        nice: int = 0,
    ) -> None:
        self.command = list(command)
        self.name = name or (os.path.basename(self.command[0]) if self.command else "process")
        self.cwd = cwd
        self.env = dict(env) if env is not None else None
        self.output = output
        self.stderr = stderr  # STDOUT: with the output (the default); None: /dev/null
        self.pass_fds = tuple(pass_fds)
        self.stop_timeout = stop_timeout
        self.descendants = descendants  # also stop what left the group (Jupyter's kernels)
        self.die_with_parent = die_with_parent
        self.nice = nice
        self.pid: int | None = None
        self.pgid: int | None = None
        self.create_time: float | None = None
        self.adopted = False
        self.shutdown_step: ShutdownStep | None = None
        self._popen: subprocess.Popen[bytes] | None = None
        self._process: psutil.Process | None = None
        self._returncode: int | None = None
        self._pidfd: int | None = None
        self._exit: tuple[asyncio.AbstractEventLoop, asyncio.Future[int]] | None = None

    def __repr__(self) -> str:
        return f"<ChildProcess {self.name} pid={self.pid}>"

    # -- start and adopt -------------------------------------------------------------------

    def start(self) -> None:
        """Spawn the child in a process group of its own; OSError when it cannot be executed."""
        if self.pid is not None:
            raise RuntimeError(f"{self!r} was started already")
        command = self.command
        if self.die_with_parent:
            # A small exec wrapper, not a preexec_fn: Python code between fork and exec is unsafe
            # in a process that runs threads. It becomes the command (same pid).
            command = [*python_command("studio.die_with_parent", str(os.getpid()), "--"), *command]
        with contextlib.ExitStack() as stack:
            handle = stack.enter_context(_output_handle(self.output))
            errors = subprocess.STDOUT if self.stderr == subprocess.STDOUT else stack.enter_context(_output_handle(self.stderr))
            self._popen = subprocess.Popen(  # noqa: S603 - the one place children start: an argument list, no shell
                command,
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=errors,
                cwd=self.cwd,
                env=self.env,
                pass_fds=self.pass_fds,
                start_new_session=True,
            )
        self.pid = self.pgid = self._popen.pid
        try:
            self._process = psutil.Process(self.pid)
            self.create_time = self._process.create_time()
        except psutil.Error:  # gone already (a zombie still has its create time, so hardly ever)
            self.create_time = time.time()
        if self.nice:
            # Right after exec, before the child starts its own threads (a JVM): they inherit it.
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, self.pid, self.nice)

    @property
    def record(self) -> ProcessRecord | None:
        """What to store so that a later run of the parent can ``adopt`` this process."""
        if self.pid is None or self.create_time is None:
            return None
        return ProcessRecord(self.pid, self.create_time, self.pgid or self.pid)

    @classmethod
    def adopt(
        cls,
        record: ProcessRecord | Mapping[str, Any] | None,
        *,
        name: str = "",
        stop_timeout: float = 10.0,
        descendants: bool = False,
    ) -> "ChildProcess | None":
        """The process a previous run started, if it still runs and is the same process: its pid
        and create time both match (a pid that was reused since is refused). None otherwise."""
        found = record if isinstance(record, ProcessRecord) else ProcessRecord.from_json(record)
        if found is None:
            return None
        try:
            process = psutil.Process(found.pid)
            create_time = process.create_time()
        except psutil.Error:
            return None
        if abs(create_time - found.create_time) > CREATE_TIME_TOLERANCE or not _running(process):
            return None
        child = cls((), name=name or f"pid {found.pid}", stop_timeout=stop_timeout, descendants=descendants)
        child.pid, child.pgid, child.create_time = found.pid, found.pgid, create_time
        child._process = process
        child.adopted = True
        return child

    # -- watching ---------------------------------------------------------------------------

    def poll(self) -> int | None:
        """None while it runs; its exit code once gone (0 when unknown, or when never started)."""
        if self._returncode is not None:
            return self._returncode
        if self._popen is not None:
            code = self._popen.poll()
        elif self._process is not None:
            code = None if _running(self._process) else 0
        else:
            code = 0
        if code is not None:
            self._returncode = code
            self._close_pidfd()
        return code

    async def wait(self) -> int:
        """Wait for the exit; its code as ``poll`` gives it. Any number of waiters may wait."""
        code = self.poll()
        if code is not None:
            return code
        return await asyncio.shield(self._exit_future())

    def wait_sync(self, timeout: float | None = None) -> int | None:
        """Block until the exit or ``timeout``; the exit code, or None on timeout."""
        if self._popen is not None and self._returncode is None:
            try:
                self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                return None
            return self.poll()
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(_POLL_SECONDS)
        return code

    def _exit_future(self) -> asyncio.Future[int]:
        loop = asyncio.get_running_loop()
        if self._exit is not None and self._exit[0] is loop:
            return self._exit[1]
        future: asyncio.Future[int] = loop.create_future()
        self._exit = (loop, future)
        fd = self._open_pidfd()
        if fd is not None:
            # Readable once the process has exited: no polling, whatever the number of children.
            loop.add_reader(fd, self._on_pidfd, loop, future, fd)
        else:
            loop.create_task(self._poll_until_exit(future), name=f"wait-{self.name}")
        return future

    def _open_pidfd(self) -> int | None:
        if self._pidfd is None and self.pid is not None and hasattr(os, "pidfd_open"):
            try:
                self._pidfd = os.pidfd_open(self.pid)
            except OSError:
                return None
            if self._process is not None and not self._process.is_running():  # the pid was reused meanwhile
                self._close_pidfd()
        return self._pidfd

    def _on_pidfd(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[int], fd: int) -> None:
        # poll() reaps the exit, closes the pidfd (which removes this reader) and resolves the future.
        if self.poll() is None and self._pidfd is None:  # the pidfd went without an exit: fall back to polling
            loop.remove_reader(fd)
            loop.create_task(self._poll_until_exit(future), name=f"wait-{self.name}")

    async def _poll_until_exit(self, future: asyncio.Future[int]) -> None:
        while (code := self.poll()) is None:
            await asyncio.sleep(_POLL_SECONDS)
        if not future.done():
            future.set_result(code)

    def _close_pidfd(self) -> None:
        loop_open = self._exit is not None and not self._exit[0].is_closed()
        if self._pidfd is not None:
            fd, self._pidfd = self._pidfd, None
            if loop_open:
                with contextlib.suppress(Exception):
                    self._exit[0].remove_reader(fd)  # type: ignore[index]
            os.close(fd)
        if loop_open and self._returncode is not None and not self._exit[1].done():  # type: ignore[index]
            self._exit[1].set_result(self._returncode)  # type: ignore[index]

    # -- signals ----------------------------------------------------------------------------

    def send_signal(self, sig: int) -> bool:
        """Signal the child itself (not its group); False when it is gone."""
        if self.pid is None or self.poll() is not None:
            return False
        try:
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, sig)  # cannot reach a reused pid
            else:
                os.kill(self.pid, sig)
            return True
        except ProcessLookupError:
            return False

    def signal_group(self, sig: int) -> bool:
        """Signal the child's whole process group; False when nobody is left in it."""
        pgid = self.pgid
        if pgid is None:
            return False
        if pgid == os.getpgrp():  # never our own group (an adopted record gone wrong)
            return self.send_signal(sig)
        try:
            os.killpg(pgid, sig)
            return True
        except OSError as exc:
            if exc.errno in (errno.ESRCH, errno.EPERM):
                return False
            raise

    # -- stopping ---------------------------------------------------------------------------

    async def stop(
        self,
        now: bool = False,
        polite: Callable[[], Awaitable[Any] | Any] | None = None,
        timeout: float | None = None,
    ) -> ShutdownStep:
        """polite → SIGTERM → SIGKILL (see the module), then nothing of the child is left."""
        timeout = self.stop_timeout if timeout is None else timeout
        family = self._descendants() if self.descendants else []
        step: ShutdownStep | None = None
        if self.pid is None or self.poll() is not None:
            step = ShutdownStep.ALREADY_GONE
        elif not now and polite is not None:
            if await self._polite(polite, timeout):
                step = ShutdownStep.POLITE
        for sig, sig_step in ((signal.SIGTERM, ShutdownStep.SIGTERM), (signal.SIGKILL, ShutdownStep.SIGKILL)):
            if step is not None:
                break
            if now and sig == signal.SIGTERM:
                continue
            family = self._merge(family, self._descendants() if self.descendants else [])
            self._signal_family(sig, family)
            if await self._wait_exit(timeout):
                step = sig_step
        if step is None:
            log.error("%s (pid %s) never died", self.name, self.pid)
            step = ShutdownStep.SIGKILL
        await self._reap(family, 0.0 if now else timeout)
        self.shutdown_step = step
        return step

    async def _polite(self, polite: Callable[[], Any], timeout: float) -> bool:
        """Run the caller's polite step and wait for the exit; True when the child went within ``timeout``.

        The step runs beside the wait, not before it: its answer may never come (a server that
        shuts down stops answering). A step that fails (the worker's socket is closed) ends the
        wait at once, so SIGTERM follows without waiting for nothing."""
        deadline = time.monotonic() + timeout
        try:
            result = polite()
        except Exception as exc:  # noqa: BLE001 - whatever it is, the next step is SIGTERM
            log.info("%s: the polite stop failed (%s); sending SIGTERM", self.name, exc)
            return False
        request = asyncio.ensure_future(result) if inspect.isawaitable(result) else None
        exited = asyncio.ensure_future(self.wait())
        try:
            pending = {exited} | ({request} if request is not None else set())
            while not exited.done():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                await asyncio.wait(pending, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                if request is not None and request.done():
                    pending.discard(request)
                    if not request.cancelled() and request.exception() is not None:
                        log.info("%s: the polite stop failed (%s); sending SIGTERM", self.name, request.exception())
                        break
            return exited.done()
        finally:
            for task in (request, exited):
                if task is not None and not task.done():
                    task.cancel()
            await asyncio.gather(*(t for t in (request, exited) if t is not None), return_exceptions=True)

    async def kill(self) -> ShutdownStep:
        """SIGKILL to the group (and the descendants), now."""
        return await self.stop(now=True)

    def stop_sync(self, now: bool = False, timeout: float | None = None) -> ShutdownStep:
        """``stop`` for code without a running event loop (the CLI's main thread, tests)."""
        return asyncio.run(self.stop(now, timeout=timeout))

    async def _wait_exit(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def _descendants(self) -> list[psutil.Process]:
        return descendants_of(self.pid) if self.pid is not None and self.poll() is None else []

    @staticmethod
    def _merge(known: list[psutil.Process], found: list[psutil.Process]) -> list[psutil.Process]:
        return list({p: None for p in (*known, *found)})  # psutil.Process hashes by pid and create time

    def _signal_family(self, sig: int, family: list[psutil.Process]) -> None:
        self.signal_group(sig)
        own = os.getpgrp()
        for process in family:
            if not _running(process):
                continue
            try:
                pgid = os.getpgid(process.pid)
                # A descendant that leads a group of its own (a Jupyter kernel) gets it signalled whole.
                if pgid == process.pid and pgid not in (self.pgid, own):
                    os.killpg(pgid, sig)
                process.send_signal(sig)  # psutil refuses a pid that was reused
            except (OSError, psutil.Error):
                continue

    def _leftovers(self, family: list[psutil.Process]) -> list[psutil.Process]:
        left = group_members(self.pgid) if self.pgid is not None and self.pgid != os.getpgrp() else []
        return self._merge(left, [p for p in family if _running(p)])

    async def _reap(self, family: list[psutil.Process], grace: float) -> None:
        """After the child is gone: what is left of its group and family gets ``grace`` seconds, then SIGKILL."""
        if self.pgid is None:
            return
        deadline = time.monotonic() + grace
        while (left := self._leftovers(family)) and time.monotonic() < deadline:
            await asyncio.sleep(_POLL_SECONDS)
        if not left:
            return
        if grace:
            log.warning("%s: killing %d process(es) it left behind: %s", self.name, len(left), [p.pid for p in left])
        self._signal_family(signal.SIGKILL, left)
        deadline = time.monotonic() + 5.0  # SIGKILL cannot be refused; this is only the kernel's time to act
        while self._leftovers(left) and time.monotonic() < deadline:
            await asyncio.sleep(_POLL_SECONDS)
