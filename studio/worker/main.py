"""The session worker: one Python interpreter with one SparkSession, driven by the service.

Started as ``python -m studio.worker --listen-fd N`` with a listening Unix socket inherited from
the service (see ``protocol.py``): the worker outlives the service that started it and accepts
the next one, which finds it again after a restart. Statements run on the main thread, so a
SIGINT aimed at that thread interrupts driver-side Python (``time.sleep``, a pandas loop); a
reader thread receives ``cancel`` and ``complete`` while a statement runs. stdout/stderr of the
process are the session's log: the service sends them to a file.
"""

from __future__ import annotations

import argparse
import builtins
import os
import queue
import shlex
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import types
import warnings
from pathlib import Path
from collections import OrderedDict
from typing import Any, Callable, TextIO

from studio.worker import identity, lean, protocol, shared
from studio.worker.helpers import StudioHelpers, completions, inspection
from studio.worker.packages import SessionPackages, bind_to_context
from studio.worker.progress import ProgressReporter, job_group
from studio.worker.properties import write_properties
from studio.worker.protocol import RESULTS_DIR
from studio.worker.repl import PythonRepl, error, run_sql
from studio.worker.streaming import OutputStream


def log(message: str) -> None:
    """A log line in Spark's own format, so the session log reads as one. A line that cannot be
    written (the state disk is full) is lost, never the thread that wrote it: the connection's
    reader logs too, and without it the worker would no longer hear its service."""
    stamp = time.strftime("%y/%m/%d %H:%M:%S")
    stream = own_stderr()
    try:
        stream.write(f"{stamp} INFO StudioWorker: {message}\n")
        stream.flush()
    except (OSError, ValueError):
        pass


def own_stderr() -> TextIO:
    """The worker's own stderr, its log file (``sys.stderr`` is a cell's capture while one runs)."""
    assert sys.__stderr__ is not None  # the service always gives a worker its log as stderr
    return sys.__stderr__


class Link:
    """The worker's end of its connection to a service, which may go and come back.

    One thread accepts services on the inherited listening socket (a new one replaces the old);
    one reads each connection and hands its messages to ``on_message`` in order. ``send`` says
    False when no service is there: what must not be lost is kept by the worker and said again on
    ``attach``; the rest (progress) may go. A worker left alone for ``orphan_timeout`` seconds
    (its service never came back) calls ``on_orphaned``.
    """

    def __init__(
        self,
        listener: socket.socket,
        on_message: Callable[[dict[str, Any]], None],
        orphan_timeout: float,
        on_orphaned: Callable[[], None],
    ) -> None:
        self._listener = listener
        self._on_message = on_message
        self._orphan_timeout = orphan_timeout
        self._on_orphaned = on_orphaned
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._alone_since = time.monotonic()

    def start(self) -> None:
        threading.Thread(target=self._accept, name="studio-accept", daemon=True).start()
        threading.Thread(target=self._watch, name="studio-orphan-watch", daemon=True).start()

    def send(self, message: dict[str, Any]) -> bool:
        data = protocol.encode(message)
        with self._lock:
            sock = self._sock
            if sock is None:
                return False
            try:
                sock.sendall(data)
                return True
            except OSError:
                self._drop(sock)
                return False

    def _drop(self, sock: socket.socket) -> None:
        """Forget a connection that ended (call with the lock held)."""
        if self._sock is sock:
            self._sock = None
            self._alone_since = time.monotonic()
            log("the service disconnected; running on, waiting for it to come back")
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _accept(self) -> None:
        creds = struct.Struct("3i")  # struct ucred: pid, uid, gid
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError as exc:
                log(f"accepting a service failed: {exc}")
                time.sleep(0.5)
                continue
            try:
                _, uid, _ = creds.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, creds.size))
            except OSError:
                uid = -1
            if uid != os.getuid():  # the socket is 0600 in a 0700 folder; this is belt and braces
                sock.close()
                continue
            with self._lock:
                old, self._sock = self._sock, sock
            if old is not None:
                log("another service connected; it replaces the previous one")
                with self._lock:
                    self._drop(old)
            threading.Thread(target=self._read, args=(sock,), name="studio-reader", daemon=True).start()

    def _read(self, sock: socket.socket) -> None:
        reader = sock.makefile("rb")
        while True:
            try:
                line = reader.readline(protocol.MAX_LINE_BYTES)
            except (OSError, ValueError):
                line = b""
            if not line:
                break
            try:
                message = protocol.decode(line)
            except ValueError as exc:
                log(f"bad message from the service: {exc}")
                continue
            self._on_message(message)
        with self._lock:
            self._drop(sock)
        sock.close()

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, max(0.05, self._orphan_timeout / 4)))
            with self._lock:
                alone = self._sock is None and time.monotonic() - self._alone_since > self._orphan_timeout
            if alone:
                log(f"no service for {self._orphan_timeout:g}s (STUDIO_WORKER_ORPHAN_TIMEOUT); stopping")
                self._on_orphaned()
                return


class Worker:
    """Creates the SparkSession from the ``start`` message, then serves statements.

    What a service must not miss is kept under ``lock`` until it is acknowledged: the ready (or
    failed) message, the statements received and not yet forgotten, each finished one's result
    and printed text; ``attach`` says it all again to a service that reconnects."""

    def __init__(self, listener: socket.socket, orphan_timeout: float) -> None:
        self.config: dict[str, Any] = {}
        self.started = threading.Event()  # the start message arrived
        self.hurry = threading.Event()  # a session waits for this pool worker: no (more) warm-up
        self.queue: queue.Queue[dict[str, Any]] = queue.Queue()
        self.main_thread: int = threading.main_thread().ident or 0  # started, so never None
        self.current: int | None = None  # statement running on the main thread
        self.cancel_target: int | None = None
        self.in_user_code = False
        self.lock = threading.RLock()
        self.ready_message: dict[str, Any] | None = None
        self.failed_message: str | None = None
        self.session: int | None = None  # the session it was handed to, if any
        self.user: str | None = None  # its session's Spark user (named in every statement's job description)
        self.last_id = -1  # the highest statement id the service ever sent
        self.statements: dict[int, str] = {}  # id -> queued | running | done, until acknowledged
        self.unacked: OrderedDict[int, dict[str, Any]] = OrderedDict()  # id -> result, stream, unstreamed
        self.cancelled_early: set[int] = set()  # cancelled before they started
        self.started_ms: dict[int, int] = {}  # when each statement it has not forgotten started (epoch ms)
        self.output: OutputStream | None = None
        # Set by start_spark: a classic session or a Connect one, and what goes with it.
        self.spark: Any
        self.sc: Any  # the SparkContext, or shared.SharedContext
        self.progress: ProgressReporter | shared.ConnectProgress
        self.shared = False  # a Spark Connect session on the user's shared driver (mode "shared"), no JVM of its own
        self.link = Link(listener, self._on_message, orphan_timeout, self._orphaned)

    def send(self, message: dict[str, Any]) -> None:
        self.link.send(message)  # False: no service; what matters is said again on attach

    def wait_start(self) -> dict[str, Any]:
        self.started.wait()
        return self.config

    # -- start ------------------------------------------------------------------------------

    def start_spark(self) -> None:
        started = time.monotonic()
        if self.config.get("mode") == "shared":
            self._start_shared(started)
            return
        lean.patch_numpy_converters()
        from pyspark.sql import SparkSession, SQLContext

        config = self.config
        # The conf reaches spark-submit in a private file, never as --conf on a command line that `ps`
        # shows every user (a session's conf may hold passwords); SparkSubmit makes it the JVM's conf,
        # which the Python side then reads back.
        properties = write_properties(Path.cwd() / "spark.properties", dict(config["conf"]))
        os.environ["PYSPARK_SUBMIT_ARGS"] = f"--properties-file {shlex.quote(str(properties))} --load-spark-defaults pyspark-shell"
        builder = SparkSession.builder.master(config["master"]).appName(config["app_name"])
        self.spark = builder.getOrCreate()
        self.sc = self.spark.sparkContext
        self.sc.setLogLevel(config.get("log_level", "WARN"))
        if config.get("user"):  # a cold worker: its environment and conf named the user before the JVM started
            self.user = str(config["user"])
        if config.get("session") is not None:
            self.session = int(config["session"])
        signal.signal(signal.SIGINT, self._on_sigint)  # replaces PySpark's cancel-all handler

        # Livy's clients print a DataFrame.toJSON() result line by line and parse each line
        # (sparkmagic %%sql, pylivy download); Spark 4's warning about toJSON would break them.
        warnings.filterwarnings("ignore", message=r"The return type of DataFrame\.toJSON", category=UserWarning)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            sql_context = SQLContext(self.sc, self.spark)
        main = types.ModuleType("__main__")
        main.__dict__.update({"__builtins__": builtins, "spark": self.spark, "sc": self.sc, "sqlContext": sql_context})
        sys.modules["__main__"] = main
        self.namespace = main.__dict__
        self.repl = PythonRepl(self.namespace, int(config.get("max_output_bytes", 10 * 1024 * 1024)))
        packages = SessionPackages(self.sc, Path.cwd())
        bind_to_context(self.sc, packages)
        self.namespace["__studio__"] = StudioHelpers(
            self.spark, Path.cwd() / RESULTS_DIR, lambda: self.current, self.repl.publish, packages
        )
        if config.get("warmup"):
            self._warm_up(float(config.get("warmup_seconds", 10.0)))
        self.progress = ProgressReporter(self.sc, self.send)
        self.output = OutputStream(self.send, self.repl.max_output_bytes, lock=self.lock)
        jvm = getattr(self.sc._gateway, "proc", None)
        self.jvm = jvm
        seconds = time.monotonic() - started
        log(f"SparkSession ready in {seconds:.1f}s: app {self.sc.applicationId}, UI {self.sc.uiWebUrl}")
        ready = {
            "op": "ready",
            "app_id": self.sc.applicationId,
            "spark_ui_url": self.sc.uiWebUrl,
            "spark_version": self.spark.version,
            "jvm_pid": jvm.pid if jvm is not None else None,
            "python_pid": os.getpid(),
            "startup_seconds": seconds,
        }
        with self.lock:
            self.ready_message = ready
            self.send(ready)

    def _start_shared(self, started: float) -> None:
        """A Spark Connect session on the user's shared driver: no JVM here, ``sc`` only for packages."""
        config = self.config
        self.shared = True
        self.jvm = None
        self.spark = shared.connect(config)
        shared.install_readable_errors()
        if config.get("user"):
            self.user = str(config["user"])
        if config.get("session") is not None:
            self.session = int(config["session"])
        shared.apply_conf(self.spark, dict(config.get("conf") or {}), log)
        signal.signal(signal.SIGINT, self._on_sigint)
        packages = SessionPackages(None, Path.cwd(), connect_session=self.spark)
        self.sc = shared.SharedContext(packages)
        main = types.ModuleType("__main__")
        # sqlContext is the session itself: its sql/table/read are what old notebooks call on it.
        main.__dict__.update({"__builtins__": builtins, "spark": self.spark, "sc": self.sc, "sqlContext": self.spark})
        sys.modules["__main__"] = main
        self.namespace = main.__dict__
        self.repl = PythonRepl(self.namespace, int(config.get("max_output_bytes", 10 * 1024 * 1024)))
        self.namespace["__studio__"] = StudioHelpers(
            self.spark, Path.cwd() / RESULTS_DIR, lambda: self.current, self.repl.publish, packages
        )
        if config.get("warmup"):
            shared.warm_up(self.spark, self.hurry, float(config.get("warmup_seconds", 10.0)))
        self.progress = shared.ConnectProgress(self.spark, self.send)
        self.output = OutputStream(self.send, self.repl.max_output_bytes, lock=self.lock)
        seconds = time.monotonic() - started
        log(f"Spark Connect session {self.spark.session_id} on the shared driver of app {config.get('app_id')} ready in {seconds:.1f}s")
        ready = {
            "op": "ready",
            "mode": "shared",
            "app_id": config.get("app_id"),
            "spark_ui_url": config.get("spark_ui_url"),
            "spark_version": self.spark.version,
            "jvm_pid": None,
            "python_pid": os.getpid(),
            "startup_seconds": seconds,
        }
        with self.lock:
            self.ready_message = ready
            self.send(ready)

    def _warm_up(self, budget: float) -> None:
        """Run small jobs until the JIT has compiled the job path (or the budget is spent).

        The first job of a driver takes seconds and the next few still run at several times
        their steady speed; a pooled worker pays that before anyone waits for it.
        """
        deadline = time.monotonic() + budget
        self.sc.setJobGroup("warm-up", "warm-up of a pooled session", True)
        for i in range(120):
            if self.hurry.is_set():  # a session waits: its first statement pays the first job, as a cold one's does
                break
            self.spark.range(1).count()
            if i % 3 == 0:
                self.spark.sql("SELECT 1").collect()
            if time.monotonic() > deadline:
                break
        for key in ("spark.jobGroup.id", "spark.job.description"):
            # None removes the property, as Spark documents; pyspark's annotation says str only.
            self.sc.setLocalProperty(key, None)
        # The warm-up's garbage would otherwise stay in the heap while the worker waits idle.
        assert self.sc._jvm is not None  # set once the context is up
        if not self.hurry.is_set():
            self.sc._jvm.System.gc()

    # -- threads ----------------------------------------------------------------------------

    def serve(self) -> None:
        if self.jvm is not None:
            threading.Thread(target=self._watch_jvm, args=(self.jvm,), name="studio-jvm-watch", daemon=True).start()
        while True:
            message = self.queue.get()
            op = message["op"]
            if op == "execute":
                self._execute(message)
            elif op == "activate":
                self._activate(message)
            elif op == "shutdown":
                self._shutdown()

    def _on_message(self, message: dict[str, Any]) -> None:
        """A message from the service, on the connection's reader thread (in order)."""
        try:
            self._handle(message)
        except Exception as exc:  # noqa: BLE001 - the reader must live on: it is the worker's only ear
            log(f"handling {message.get('op')!r} failed: {type(exc).__name__}: {exc}")

    def _handle(self, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == "start":
            if not self.started.is_set():
                self.config = message
                self.started.set()
        elif op == "hurry":
            self.hurry.set()
        elif op == "attach":
            self._attach()
        elif op == "ack":
            with self.lock:
                sid = int(message["id"])
                self.unacked.pop(sid, None)
                if self.statements.get(sid) == "done":
                    del self.statements[sid]
                    self.started_ms.pop(sid, None)
        elif op == "cancel":
            self._cancel(int(message["id"]))
        elif op in ("complete", "inspect") and not hasattr(self, "namespace"):
            reply = {"op": "completion", "candidates": []} if op == "complete" else {"op": "inspection", "found": False, "data": {}}
            self.send({**reply, "req": message["req"]})
        elif op == "complete":
            candidates = completions(self.namespace, message.get("code", ""), int(message.get("cursor", 0)))
            self.send({"op": "completion", "req": message["req"], "candidates": candidates})
        elif op == "inspect":
            found = inspection(
                self.namespace, message.get("code", ""), int(message.get("cursor", 0)), int(message.get("detail_level", 0))
            )
            self.send({"op": "inspection", "req": message["req"], **found})
        else:
            if op == "execute":
                with self.lock:
                    sid = int(message["id"])
                    self.last_id = max(self.last_id, sid)
                    self.statements[sid] = "queued"
            if op == "shutdown" and self.current is not None:
                # The main thread runs a statement: cancel it, or the shutdown waits behind it.
                self._cancel(self.current)
            self.queue.put(message)

    def _attach(self) -> None:
        """A service found this worker again: its state, then what it may have missed, in order.
        Nothing else is sent meanwhile (the lock), so no chunk or result lands in between."""
        with self.lock:
            self.send(
                {
                    "op": "attached",
                    "pid": os.getpid(),
                    "started": self.started.is_set(),
                    "ready": self.ready_message,
                    "failed": self.failed_message,
                    "session": self.session,
                    "last_id": self.last_id,
                    "statements": {str(k): v for k, v in self.statements.items()},
                    "started_ms": {str(k): v for k, v in self.started_ms.items()},
                }
            )
            for sid, kept in self.unacked.items():
                if kept["stream"] or kept["unstreamed"] is not None:
                    self.send(
                        {"op": "output", "id": sid, "text": kept["stream"], "unstreamed": kept["unstreamed"], "replay": True}
                    )
                self.send(kept["result"])
            if self.output is not None:
                running, text = self.output.sent()
                if running is not None:
                    self.send({"op": "output", "id": running, "text": text, "replay": True})
        log("a service attached")

    def _orphaned(self) -> None:
        """No service came back in time: stop as a shutdown would, whatever the user's code does."""
        if self.current is not None:
            self._cancel(self.current)
        self.queue.put({"op": "shutdown"})
        # Code that never returns must not keep the worker alive without its service.
        time.sleep(float(self.config.get("stop_timeout", 5.0)))
        os._exit(0)

    def _watch_jvm(self, jvm: subprocess.Popen[bytes]) -> None:
        while True:
            code = jvm.poll()
            if code is not None:
                log(f"the Spark driver JVM (pid {jvm.pid}) exited with code {code}; the session cannot continue")
                os._exit(3)
            time.sleep(1.0)

    # -- operations -------------------------------------------------------------------------

    def _execute(self, message: dict[str, Any]) -> None:
        assert self.output is not None
        statement_id = int(message["id"])
        code = message["code"]
        with self.lock:
            self.statements[statement_id] = "running"
            self.started_ms[statement_id] = int(time.time() * 1000)
            self.current = statement_id
            cancelled = statement_id in self.cancelled_early
        output: dict[str, Any]
        try:
            if cancelled:
                raise KeyboardInterrupt
            first_line = code.strip().splitlines()[0][:120] if code.strip() else ""
            if self.shared:
                self.spark.addTag(shared.statement_tag(statement_id))
            else:
                self.sc.setJobGroup(job_group(statement_id), self._job_description(statement_id, first_line, message.get("user")), True)
            self.progress.begin(statement_id)
            self.output.begin(statement_id)
            self.in_user_code = True
            if message.get("kind") == "sql":
                output = run_sql(self.spark, code, int(message.get("max_rows", 1000)), self.repl.max_output_bytes)
            else:
                output = self.repl.execute(statement_id, code, forward=self.output.write)
        except KeyboardInterrupt:
            # The interrupt landed outside the user's code (between our own lines).
            output = error("KeyboardInterrupt", "statement cancelled", [])
        except Exception as exc:  # noqa: BLE001 - e.g. the JVM went away during setJobGroup
            output = error(type(exc).__name__, str(exc), [])
        finally:
            self.in_user_code = False
            self.cancel_target = None
            self.progress.end()
            if self.shared:
                self._end_shared_statement(statement_id)
        if self.shared:
            output = shared.explain_failure(output, str(self.config.get("connect_url", "")))
        result = {"op": "result", "id": statement_id, "output": output}
        with self.lock:
            self.current = None
            # What it printed, before its result: the service has the whole stream once the result is in.
            stream, unstreamed = self.output.end(self.repl.unstreamed if message.get("kind") != "sql" else "")
            self.statements[statement_id] = "done"
            self.unacked[statement_id] = {"result": result, "stream": stream, "unstreamed": unstreamed}
            self.send(result)

    def _end_shared_statement(self, statement_id: int) -> None:
        """The statement's tag off the session's operations (a statement may have added tags of its own)."""
        tag = shared.statement_tag(statement_id)
        try:
            if tag in self.spark.getTags():  # absent when the statement was cancelled before it started
                self.spark.removeTag(tag)
        except Exception as exc:  # noqa: BLE001 - a client-side set; never fails the statement
            log(f"removing the statement's tag failed: {type(exc).__name__}: {exc}")

    def _job_description(self, statement_id: int, first_line: str, sender: Any = None) -> str:
        """What the Spark UI shows for a statement's jobs: who sent it (else the session's Spark user),
        which statement of which session."""
        user = str(sender) if sender and identity.USER_NAME.fullmatch(str(sender)) else self.user
        who = f"{user}: " if user else ""
        where = f" of session {self.session}" if self.session is not None else ""
        return f"{who}statement {statement_id}{where}: {first_line}"

    def _activate(self, message: dict[str, Any]) -> None:
        conf: dict[str, str] = message.get("conf", {})
        try:
            static = [key for key in conf if not self.spark.conf.isModifiable(key)]
            if not static:
                for key, value in conf.items():
                    self.spark.conf.set(key, value)
        except Exception as exc:  # noqa: BLE001 - an invalid value is the caller's error
            self.send({"op": "activated", "ok": False, "static": [], "error": str(exc)})
            return
        user = message.get("user")
        if user and not static and self.shared:
            self.user = str(user)  # the shared driver already runs as its user: nothing to become
        elif user and not static:
            try:
                identity.become(self.spark, str(user), log)
            except Exception as exc:  # noqa: BLE001 - the service starts a cold worker instead
                log(f"could not make {user!r} the Spark user: {type(exc).__name__}: {exc}")
                self.send({"op": "activated", "ok": False, "static": [], "error": None, "identity_error": f"{type(exc).__name__}: {exc}"})
                return
            self.user = str(user)
            log(f"runs as {user} (SPARK_USER, Hadoop's login user, SparkContext.sparkUser, the Spark UI)")
        if message.get("session") is not None and not static:
            self.session = int(message["session"])
            log(f"handed to session {message['session']}")
        self.send({"op": "activated", "ok": not static, "static": static, "error": None})

    def _shutdown(self) -> None:
        log("stopping Spark")
        try:
            self.spark.stop()
        except Exception as exc:  # noqa: BLE001
            log(f"spark.stop() failed: {exc}")
        if self.jvm is not None:
            # The JVM exits when its stdin closes; wait, so no process outlives the worker.
            try:
                self.jvm.stdin.close()
                self.jvm.wait(timeout=float(self.config.get("stop_timeout", 5.0)))
            except Exception:  # noqa: BLE001, S110 - the worker exits next; the service's stop escalates
                pass
        for stream in (sys.__stdout__, sys.__stderr__):
            if stream is not None:
                stream.flush()
        os._exit(0)

    # -- cancel -----------------------------------------------------------------------------

    def _cancel(self, statement_id: int) -> None:
        with self.lock:
            if self.current != statement_id:
                # Received and not started yet (the main thread has not taken it from the queue): it
                # must not start at all; else finished already, or never sent here.
                if self.statements.get(statement_id) == "queued":
                    self.cancelled_early.add(statement_id)
                return
        self.cancel_target = statement_id
        threading.Thread(target=self._cancel_loop, args=(statement_id,), name="studio-cancel", daemon=True).start()

    def _cancel_loop(self, statement_id: int) -> None:
        """Cancel the group's jobs every 100 ms; interrupt Python code that keeps running."""
        started = time.monotonic()
        deadline = started + float(self.config.get("cancel_timeout", 30.0))
        last_interrupt = 0.0
        while self.current == statement_id and time.monotonic() < deadline:
            try:
                if self.shared:
                    self.spark.interruptTag(shared.statement_tag(statement_id))  # this session's operations only
                else:
                    self.sc.cancelJobGroup(job_group(statement_id))
            except Exception:  # noqa: BLE001, S110 - tried again in 100 ms, then the interrupt follows
                pass
            now = time.monotonic()
            # A cancelled Spark job returns within a few hundred ms on its own; code that is
            # still running after that is driver-side Python, which only a signal stops.
            if now - started >= 0.4 and now - last_interrupt >= 1.0 and self.current == statement_id:
                signal.pthread_kill(self.main_thread, signal.SIGINT)
                last_interrupt = now
            time.sleep(0.1)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.in_user_code and self.cancel_target is not None and self.cancel_target == self.current:
            raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studio.worker")
    parser.add_argument("--listen-fd", type=int, required=True, help="inherited listening socket for the service")
    parser.add_argument(
        "--orphan-timeout", type=float, default=600.0, help="seconds without a service before the worker stops itself"
    )
    args = parser.parse_args(argv)
    # The process's own streams are the session log: text a cell writes there directly (sys.__stdout__,
    # a logging handler made before the cell) must not fail on what UTF-8 cannot hold.
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    listener = socket.socket(fileno=args.listen_fd)
    worker = Worker(listener, args.orphan_timeout)
    worker.link.start()
    worker.wait_start()
    try:
        worker.start_spark()
    except BaseException as exc:  # noqa: BLE001 - report any start failure, then exit
        import traceback

        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        try:
            own_stderr().write(text)
        except (OSError, ValueError):
            pass  # its log cannot be written (a full disk): the service hears why below
        log(f"the SparkSession could not be created: {type(exc).__name__}: {exc}")
        with worker.lock:
            worker.failed_message = f"{type(exc).__name__}: {exc}"
            worker.send({"op": "failed", "message": worker.failed_message})
        os._exit(2)
    worker.serve()
    return 0
