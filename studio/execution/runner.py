"""Running one notebook headless: ``studio run NOTEBOOK ...`` (see ``studio.cli``).

The notebook runs with nbclient (the PySpark kernel by default) in a worker thread, while the main
thread watches for SIGINT/SIGTERM: on either, the running statement is interrupted, the kernel shut
down and the Spark session deleted. Whatever happens, the output notebook is written (after every
cell, with papermill-style per-cell status and timings) and the session is deleted by the name
the run gave it. Progress goes to stderr for people and, with ``--events``, as JSON lines for
programs (``studio.execution.events``).
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import nbformat

from studio.execution import events as ev
from studio.execution.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, RunError, RunStopped
from studio.execution.html import write_html
from studio.execution.notebook import read_notebook
from studio.execution.parameters import inject_parameters
from studio.execution.record import driver_log, json_safe, utc_now, write_record
from studio.execution.service import EmbeddedService


@dataclass
class RunOptions:
    notebook: Path
    output: Path
    html: Path | None = None
    parameters: dict[str, tuple[Any, bool]] = field(default_factory=dict)
    livy_url: str | None = None
    cell_timeout: float | None = None
    kernel: str = "pyspark"
    record: Path | None = None
    events: Path | None = None  # JSON lines of progress for programs (studio.execution.events)


@dataclass
class CellReport:
    index: int
    status: str = "pending"
    start: str | None = None
    end: str | None = None
    duration: float | None = None
    ename: str | None = None
    evalue: str | None = None


class NotebookRun:
    def __init__(
        self,
        options: RunOptions,
        log: Callable[[str], None],
        stop_requested: threading.Event | None = None,
        events: ev.EventWriter | None = None,
    ) -> None:
        self.options = options
        self.log = log
        self.events = events or ev.EventWriter(None)
        self.stop_requested = stop_requested or threading.Event()
        self.session_name = f"studio-run-{uuid.uuid4().hex[:12]}"
        self.reports: list[CellReport] = []
        self.failure: tuple[int, str, str] | None = None  # (notebook cell index, ename, evalue)
        self.interrupted = False
        self.started = utc_now()
        self.client: Any = None
        self.livy_url = ""
        self.session: dict[str, Any] | None = None  # the run's session as last seen (after each cell)
        self.source_bytes = b""
        self.values: dict[str, Any] = {}
        self.notebook: Any = None

    def prepare(self) -> Any:
        path = self.options.notebook
        self.source_bytes, notebook = read_notebook(path)
        self.values = inject_parameters(notebook, self.options.parameters, lambda m: self.log(f"warning: {m}"))
        metadata = notebook.metadata.setdefault("papermill", {})
        metadata.update({"parameters": json_safe(self.values), "input_path": str(path), "output_path": str(self.options.output)})
        for index, cell in enumerate(notebook.cells):
            if cell.cell_type == "code" and cell.source.strip():
                cell.outputs = []
                cell.execution_count = None
                cell.metadata["papermill"] = {"status": "pending"}
                self.reports.append(CellReport(index))
        self.notebook = notebook
        self._warn_restarts()
        return notebook

    def _warn_restarts(self) -> None:
        """A %%configure -f after remote parameter cells starts a new session, without their variables."""
        remote = [
            i for i, c in enumerate(self.notebook.cells)
            if {"parameters", "injected-parameters"} & set(c.metadata.get("tags", [])) and not c.source.lstrip().startswith("%%local")
        ]  # fmt: skip
        for index, cell in enumerate(self.notebook.cells):
            first = cell.source.lstrip().split("\n", 1)[0].split()
            if cell.cell_type == "code" and first[:1] == ["%%configure"] and "-f" in first and any(i < index for i in remote):
                self.log(
                    f"warning: %%configure -f in {self.cell_label(index)} starts a new session: the parameters set "
                    "before it are gone after it (put the %%configure cell first)"
                )

    def save(self) -> None:
        """Write the output notebook (atomically); RunError when it cannot be written."""
        output = self.options.output
        tmp = output.with_name(output.name + ".tmp")
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(self.notebook, str(tmp))
            os.replace(tmp, output)
        except OSError as exc:
            raise RunError(f"cannot write the output notebook {output}: {exc.strerror or exc}") from None

    def check_writable(self) -> None:
        """The output notebook, the HTML and the record folder can be written: checked before anything runs."""
        self.save()
        if self.options.html is not None:
            _check_writable_file(self.options.html, "the HTML output")
        if self.options.record is not None:
            try:
                self.options.record.mkdir(parents=True, exist_ok=True)
                probe = self.options.record / f".studio-run-{os.getpid()}"
                probe.write_text("")
                probe.unlink()
            except OSError as exc:
                raise RunError(f"cannot write the record folder {self.options.record}: {exc.strerror or exc}") from None

    def cell_label(self, index: int) -> str:
        """How messages name a cell: its place among the code cells that run, "cell 2 of 3"."""
        numbers = [r.index for r in self.reports]
        return f"cell {numbers.index(index) + 1} of {len(numbers)}" if index in numbers else "the run"

    # -- nbclient hooks ----------------------------------------------------------------------

    def _report(self, index: int) -> CellReport | None:
        return next((r for r in self.reports if r.index == index), None)

    def _number(self, index: int) -> int:
        return [r.index for r in self.reports].index(index) + 1

    def on_notebook_start(self, notebook: Any) -> None:
        self.log(f"studio run: kernel ready; running {len(self.reports)} code cells")
        self.events.emit(ev.KERNEL_READY, cells=len(self.reports))

    def on_cell_start(self, cell: Any, cell_index: int) -> None:
        report = self._report(cell_index)
        if report is None:  # markdown and empty cells are not run
            return
        if self.stop_requested.is_set():
            raise RunStopped(f"stopped before {self.cell_label(cell_index)}")
        report.status, report.start = "running", utc_now()
        cell.metadata["papermill"] = {"status": "running", "start_time": report.start}
        self._t0 = time.monotonic()
        self.events.emit(ev.CELL_STARTED, index=cell_index, number=self._number(cell_index), total=len(self.reports))

    def on_cell_executed(self, cell: Any, cell_index: int, execute_reply: dict[str, Any]) -> None:
        report = self._report(cell_index)
        if report is None:
            return
        report.end = utc_now()
        report.duration = round(time.monotonic() - self._t0, 3)
        content = execute_reply.get("content", {})
        failed = content.get("status") == "error"
        report.status = "failed" if failed else "completed"
        if failed:
            report.ename, report.evalue = content.get("ename"), content.get("evalue")
            if report.ename == "KeyboardInterrupt" and self.stop_requested.is_set():
                report.status = "interrupted"
        cell.metadata["papermill"] = {
            "status": report.status,
            "start_time": report.start,
            "end_time": report.end,
            "duration": report.duration,
            "exception": failed,
        }
        number = self._number(cell_index)
        first_line = (cell.source.strip().splitlines() or [""])[0][:60]
        self.log(f"[{number}/{len(self.reports)}] {report.status} in {report.duration:.1f}s  {first_line}")
        self.events.emit(
            ev.CELL_FINISHED,
            index=cell_index,
            number=number,
            total=len(self.reports),
            status=report.status,
            duration=report.duration,
            ename=report.ename,
            evalue=report.evalue,
        )
        self.save()
        # Seen now, while it exists: the kernel deletes it when the notebook ends, and %%configure -f
        # may have replaced it by another of the same name.
        if self.livy_url:
            self.session = _session(self.livy_url, self.session_name) or self.session

    # -- the run -------------------------------------------------------------------------------

    def execute(self, env: dict[str, str]) -> None:
        from nbclient import NotebookClient
        from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

        self.client = NotebookClient(
            self.notebook,
            kernel_name=self.options.kernel,
            timeout=self.options.cell_timeout,
            interrupt_on_timeout=True,
            startup_timeout=120,
            resources={"metadata": {"path": str(self.options.notebook.parent.resolve())}},
            on_notebook_start=self.on_notebook_start,
            on_cell_start=self.on_cell_start,
            on_cell_executed=self.on_cell_executed,
        )
        try:
            self.client.execute(env=env)
        except RunStopped:
            pass
        except CellExecutionError as exc:
            failed = next((r for r in self.reports if r.status in ("failed", "interrupted")), None)
            number = failed.index if failed else -1
            self.failure = (number, exc.ename, exc.evalue)
            limit = self.options.cell_timeout
            if failed and limit and exc.ename == "KeyboardInterrupt" and not self.stop_requested.is_set() and (failed.duration or 0) >= limit:
                # nbclient interrupted the kernel at the timeout; the kernel cancelled the statement.
                self._timed_out(failed, f"the cell ran longer than {limit:g}s and was cancelled")
        except CellTimeoutError as exc:
            running = next((r for r in self.reports if r.status == "running"), None)
            if running is not None:
                running.status = "failed"
                self.notebook.cells[running.index].metadata["papermill"]["status"] = "failed"
                self._timed_out(running, f"the cell ran longer than {self.options.cell_timeout:g}s ({exc})")
            else:
                self.failure = (-1, "CellTimeoutError", f"the cell ran longer than {self.options.cell_timeout}s")
        except (DeadKernelError, RuntimeError, Exception) as exc:  # noqa: BLE001 - also after an interrupt
            if not self.failure:
                self.failure = (-1, type(exc).__name__, str(exc))

    def _timed_out(self, report: CellReport, evalue: str) -> None:
        """Say CellTimeoutError everywhere: on stderr, in the record and in the cell's own error output
        (where the kernel, interrupted by nbclient, wrote KeyboardInterrupt)."""
        report.ename, report.evalue = "CellTimeoutError", evalue
        self.failure = (report.index, report.ename, evalue)
        cell = self.notebook.cells[report.index]
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        if errors:
            for output in errors:
                output["ename"], output["evalue"] = report.ename, evalue
                output["traceback"] = [f"{report.ename}: {evalue}"]
        else:
            cell.setdefault("outputs", []).append(
                nbformat.v4.new_output("error", ename=report.ename, evalue=evalue, traceback=[f"{report.ename}: {evalue}"])
            )
        self.save()

    def kernel_pid(self) -> int | None:
        provisioner = getattr(getattr(self.client, "km", None), "provisioner", None)
        return getattr(provisioner, "pid", None)

    def _signal_kernel(self, sig: int) -> None:
        pid = self.kernel_pid()
        if pid is not None:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def interrupt(self) -> None:
        """On SIGINT/SIGTERM: interrupt the kernel, which cancels the running statement in the
        session; nbclient then sees the cell fail and shuts the kernel down (deleting the session).
        A kernel that is still starting gets no signal: no further cell starts (``on_cell_start``)."""
        self.interrupted = True
        self.stop_requested.set()
        self._signal_kernel(signal.SIGINT)

    def kill_kernel(self) -> None:
        self._signal_kernel(signal.SIGTERM)


def _check_writable_file(path: Path, what: str) -> None:
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a"):
            pass
        if not existed:
            path.unlink()
    except OSError as exc:
        raise RunError(f"cannot write {what} {path}: {exc.strerror or exc}") from None


def check_kernel(name: str) -> None:
    """RunError unless Jupyter knows the kernel (checked before any service or kernel starts)."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    manager = KernelSpecManager()
    try:
        manager.get_kernel_spec(name)
    except NoSuchKernel:
        known = ", ".join(sorted(manager.find_kernel_specs())) or "none"
        raise RunError(f"no kernel named '{name}' (installed kernels: {known})") from None


def _session(url: str, name: str) -> dict[str, Any] | None:
    from studio.livy_client import LivyClient, LivyError

    client = LivyClient(url, timeout=10)
    try:
        return client.get_session(name)
    except LivyError:
        return None
    finally:
        client.close()


def _delete_session(url: str, name: str) -> None:
    from studio.livy_client import LivyClient, LivyError

    client = LivyClient(url, timeout=120)
    try:
        client.delete_session(name)
    except LivyError:
        pass  # the service is gone, and its sessions with it
    finally:
        client.close()


def run(options: RunOptions, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> int:
    """Run a notebook to its output file; returns the process exit code.

    SIGINT and SIGTERM are handled from the first line on (the ``started`` event says so to the
    executions API), so a stop at any moment ends the run cleanly with its output notebook. The
    ``finished`` event, the last one, carries the exit code and why."""
    stop_requested = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop_requested.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    events = ev.EventWriter(options.events)
    try:
        events.emit(ev.STARTED, pid=os.getpid())
        log(f"studio run: started (pid {os.getpid()})")
        with tempfile.TemporaryDirectory(prefix="studio-kernelspec-") as folder:
            code, status, message = _run(options, log, stop_requested, Path(folder), events)
        events.emit(ev.FINISHED, exit_code=code, status=status, message=message)
        return code
    finally:
        events.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(
    options: RunOptions, log: Callable[[str], None], stop_requested: threading.Event, kernelspecs: Path, events: ev.EventWriter
) -> tuple[int, str, str]:
    """The run; (exit code, status, message) for the ``finished`` event."""
    from studio.kernel.install import write_kernelspec

    run = NotebookRun(options, log, stop_requested, events)
    write_kernelspec(kernelspecs)
    jupyter_path = os.pathsep.join(p for p in (str(kernelspecs), os.environ.get("JUPYTER_PATH", "")) if p)
    os.environ["JUPYTER_PATH"] = jupyter_path  # nbclient finds the kernelspec in this process
    try:  # everything that can be checked is checked before a service or a kernel starts
        run.prepare()
        run.check_writable()
        check_kernel(options.kernel)
    except RunError as exc:
        log(f"studio run: {exc}")
        return EXIT_USAGE, "usage", str(exc)
    service = None if options.livy_url else EmbeddedService()
    url = options.livy_url or ""
    session: dict[str, Any] | None = None
    end_of_log: list[str] | None = None
    try:
        if service is not None and not stop_requested.is_set():
            log("starting an embedded Spark session service for this run")
            url = service.start()
            # The kernel, and this process's own calls (record, cleanup), authenticate with it from here on.
            os.environ["STUDIO_LIVY_TOKEN"] = service.token
            os.environ.pop("STUDIO_LIVY_USER", None)
        env = {k: v for k, v in os.environ.items() if k != "STUDIO_WORKSPACE_DIR"}
        env.update({"STUDIO_LIVY_URL": url, "STUDIO_SESSION_NAME": run.session_name, "JUPYTER_PATH": jupyter_path})
        if stop_requested.is_set():
            run.interrupted = True
        else:
            log(f"running {options.notebook} on {url} (kernel {options.kernel})")
            run.livy_url = url
            worker = threading.Thread(target=run.execute, args=(env,), name="notebook", daemon=True)
            worker.start()
            while worker.is_alive():
                worker.join(0.2)
                if stop_requested.is_set() and not run.interrupted:
                    log("studio run: interrupted; cancelling the running cell and stopping the kernel")
                    run.interrupt()
                    worker.join(30)
                    if worker.is_alive():
                        run.kill_kernel()
                        worker.join(10)
                    break
            session = _session(url, run.session_name) or run.session  # the kernel may have deleted it already
            if session is not None and options.record is not None:
                end_of_log = driver_log(url, session)
    except RunError as exc:
        log(f"studio run: {exc}")
        run.failure = run.failure or (-1, "RunError", str(exc))
    finally:
        for report in run.reports:
            if report.status == "running":
                report.status = "failed" if not run.interrupted else "interrupted"
                run.notebook.cells[report.index].metadata["papermill"]["status"] = report.status
        try:
            run.save()
        except RunError as exc:  # written once already: this is a disk that filled up meanwhile
            log(f"studio run: {exc}")
        if url:
            _delete_session(url, run.session_name)  # whatever the kernel managed to do
        if service is not None:
            service.stop()
    if options.record is not None:
        try:
            write_record(run, options, url, session, end_of_log)
        except OSError as exc:
            log(f"studio run: warning: the record could not be written ({exc})")
    if options.html is not None:
        try:
            write_html(options.output, options.html)
        except Exception as exc:  # noqa: BLE001 - the run's own result stands; say what is missing
            log(f"studio run: warning: the HTML could not be written ({type(exc).__name__}: {exc}); "
                f"the output notebook is complete")
    if run.interrupted:
        ran = sum(1 for r in run.reports if r.status in ("completed", "failed"))
        message = f"interrupted after {ran} of {len(run.reports)} cells"
        log(f"studio run: {message}; the output notebook is {options.output}")
        return EXIT_INTERRUPTED, "interrupted", message
    if run.failure:
        index, ename, evalue = run.failure
        message = f"{run.cell_label(index)} failed: {ename}: {evalue}"
        log(f"studio run: {message}")
        log(f"studio run: the output notebook is {options.output}")
        return EXIT_FAILED, "failed", message
    message = f"all {len(run.reports)} cells succeeded"
    log(f"studio run: {message}; the output notebook is {options.output}")
    return EXIT_OK, "succeeded", message
