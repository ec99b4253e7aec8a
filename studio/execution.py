"""Headless notebook runs: ``studio run NOTEBOOK [-p NAME VALUE ...] ...``.

Parameters follow papermill's convention: the cell tagged ``parameters`` holds the defaults, and
a cell tagged ``injected-parameters`` with the given values is inserted after it (or at the top,
with a warning, when there is none). Unlike papermill, a name the parameters cell does not define
or a value of the wrong type is an error before anything runs.

The notebook runs with nbclient (the PySpark kernel by default) in a worker thread, while the main
thread watches for SIGINT/SIGTERM: on either, the running statement is interrupted, the kernel shut
down and the Spark session deleted. Whatever happens, the output notebook is written (after every
cell, with papermill-style per-cell status and timings) and the session is deleted by the name
the run gave it.
"""

from __future__ import annotations

import ast
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import nbformat

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# Progress lines on stderr that the executions API reads to follow a run (studio.workspaces.executions).
KERNEL_READY = "studio run: kernel ready"
CELL_LINE = re.compile(r"^\[(\d+)/(\d+)\] cell \d+ (completed|failed)")


class RunError(Exception):
    """Bad input for a run (missing notebook, unknown parameter, wrong type): exit code 2."""


# -- parameters ---------------------------------------------------------------------------------


def parameters_cell(notebook: Any) -> int | None:
    for index, cell in enumerate(notebook.cells):
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            return index
    return None


def declared_parameters(source: str) -> dict[str, Any]:
    """Names the parameters cell assigns, with their literal defaults (Ellipsis when not literal)."""
    code = re.sub(r"^%%local[^\n]*\n", "", source)
    try:
        module = ast.parse(code)
    except SyntaxError as exc:
        raise RunError(f"the parameters cell does not parse: {exc}") from None
    declared: dict[str, Any] = {}
    for node in module.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        value = getattr(node, "value", None)
        for target in targets:
            if isinstance(target, ast.Name):
                try:
                    declared[target.id] = ast.literal_eval(value) if value is not None else Ellipsis
                except ValueError:
                    declared[target.id] = Ellipsis
    return declared


def _infer(text: str) -> Any:
    """A command-line value without a typed default, read the way papermill's -p reads it."""
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _coerce(name: str, value: Any, default: Any, from_text: bool) -> Any:
    """The value in the type of the parameter's default; RunError when it cannot be."""
    if default is Ellipsis or default is None:
        return _infer(value) if from_text else value
    expected = type(default)
    if not from_text:
        if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
            return value
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        raise RunError(f"parameter '{name}' expects {expected.__name__} (default {default!r}), got {type(value).__name__} {value!r}")
    try:
        if expected is bool:
            lowered = value.strip().lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return lowered in ("true", "1", "yes")
        if expected in (int, float, str):
            return expected(value)
        parsed = json.loads(value)
        if not isinstance(parsed, expected):
            raise ValueError(value)
        return parsed
    except ValueError:
        raise RunError(f"parameter '{name}' expects {expected.__name__} (default {default!r}), got {value!r}") from None


def inject_parameters(notebook: Any, given: dict[str, tuple[Any, bool]], warn: Callable[[str], None]) -> dict[str, Any]:
    """Insert the injected-parameters cell; returns the typed values. ``given``: name -> (value, from_text)."""
    notebook.cells = [c for c in notebook.cells if "injected-parameters" not in c.get("metadata", {}).get("tags", [])]
    if not given:
        return {}
    index = parameters_cell(notebook)
    local = False
    if index is None:
        warn("the notebook has no cell tagged 'parameters'; injecting the parameters at the top")
        values = {name: (_infer(v) if text else v) for name, (v, text) in given.items()}
        position = 0
    else:
        source = notebook.cells[index].source
        local = source.lstrip().startswith("%%local")
        declared = declared_parameters(source)
        unknown = sorted(set(given) - set(declared))
        if unknown:
            raise RunError(
                f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: the parameters cell defines "
                f"{', '.join(sorted(declared)) or 'none'}"
            )
        values = {name: _coerce(name, v, declared[name], text) for name, (v, text) in given.items()}
        position = index + 1
    lines = ["# Parameters injected by studio run"] + [f"{name} = {value!r}" for name, value in values.items()]
    source = ("%%local\n" if local else "") + "\n".join(lines)
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    notebook.cells.insert(position, cell)
    return values


def load_parameter_file(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise RunError(f"cannot read parameters from {path}: {exc}") from None
    if not isinstance(data, dict):
        raise RunError(f"{path} must hold a mapping of parameter names to values")
    return data


# -- running -------------------------------------------------------------------------------------


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


@dataclass
class CellReport:
    index: int
    status: str = "pending"
    start: str | None = None
    end: str | None = None
    duration: float | None = None
    ename: str | None = None
    evalue: str | None = None


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


class EmbeddedService:
    """A `studio livy` just for this run (cold sessions only: no warm pool to fill), stopped after."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="studio-run-"))
        self.process: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self) -> str:
        command = [sys.executable, "-m", "studio", "livy", "--port", "0", "--pool", "0", "--state-dir", str(self.folder)]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=open(self.folder / "service.log", "ab"), text=True, start_new_session=True
        )
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if "listening on " in line:
                self.url = line.split("listening on ", 1)[1].split()[0]
                return self.url
        raise RunError(f"the embedded session service did not start; see {self.folder / 'service.log'}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


class NotebookRun:
    def __init__(self, options: RunOptions, log: Callable[[str], None]) -> None:
        self.options = options
        self.log = log
        self.session_name = f"studio-run-{uuid.uuid4().hex[:12]}"
        self.reports: list[CellReport] = []
        self.failure: tuple[int, str, str] | None = None  # (cell number, ename, evalue)
        self.interrupted = False
        self.started = _now()
        self.client: Any = None

    def prepare(self) -> Any:
        path = self.options.notebook
        if not path.is_file():
            raise RunError(f"no notebook at {path}")
        try:
            self.source_bytes = path.read_bytes()
            notebook = nbformat.reads(self.source_bytes.decode("utf-8"), as_version=4)
        except (ValueError, UnicodeDecodeError) as exc:
            raise RunError(f"{path} is not a notebook: {exc}") from None
        self.values = inject_parameters(notebook, self.options.parameters, lambda m: self.log(f"warning: {m}"))
        metadata = notebook.metadata.setdefault("papermill", {})
        metadata.update({"parameters": self.values, "input_path": str(path), "output_path": str(self.options.output)})
        for index, cell in enumerate(notebook.cells):
            if cell.cell_type == "code" and cell.source.strip():
                cell.outputs = []
                cell.execution_count = None
                cell.metadata["papermill"] = {"status": "pending"}
                self.reports.append(CellReport(index))
        self.notebook = notebook
        return notebook

    def save(self) -> None:
        self.options.output.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.options.output.with_suffix(".tmp")
        nbformat.write(self.notebook, str(tmp))
        os.replace(tmp, self.options.output)

    # -- nbclient hooks ----------------------------------------------------------------------

    def _report(self, index: int) -> CellReport | None:
        return next((r for r in self.reports if r.index == index), None)

    def on_notebook_start(self, notebook: Any) -> None:
        self.log(f"{KERNEL_READY}; running {len(self.reports)} code cells")

    def on_cell_start(self, cell: Any, cell_index: int) -> None:
        report = self._report(cell_index)
        if report is None:  # markdown and empty cells are not run
            return
        report.status, report.start = "running", _now()
        cell.metadata["papermill"] = {"status": "running", "start_time": report.start}
        self._t0 = time.monotonic()

    def on_cell_executed(self, cell: Any, cell_index: int, execute_reply: dict[str, Any]) -> None:
        report = self._report(cell_index)
        if report is None:
            return
        report.end = _now()
        report.duration = round(time.monotonic() - self._t0, 3)
        content = execute_reply.get("content", {})
        failed = content.get("status") == "error"
        report.status = "failed" if failed else "completed"
        if failed:
            report.ename, report.evalue = content.get("ename"), content.get("evalue")
        cell.metadata["papermill"] = {
            "status": report.status,
            "start_time": report.start,
            "end_time": report.end,
            "duration": report.duration,
            "exception": failed,
        }
        number = [r.index for r in self.reports].index(cell_index) + 1
        first_line = (cell.source.strip().splitlines() or [""])[0][:60]
        self.log(f"[{number}/{len(self.reports)}] cell {cell_index} {report.status} in {report.duration:.1f}s  {first_line}")
        self.save()

    # -- the run -------------------------------------------------------------------------------

    def execute(self, jupyter_path: Path, env: dict[str, str]) -> None:
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
        except CellExecutionError as exc:
            failed = next((r for r in self.reports if r.status == "failed"), None)
            number = failed.index if failed else -1
            self.failure = (number, exc.ename, exc.evalue)
            limit = self.options.cell_timeout
            if failed and limit and exc.ename == "KeyboardInterrupt" and not self.interrupted and (failed.duration or 0) >= limit:
                # nbclient interrupted the kernel at the timeout; the kernel cancelled the statement.
                failed.ename, failed.evalue = "CellTimeoutError", f"the cell ran longer than {limit:g}s and was cancelled"
                self.failure = (number, failed.ename, failed.evalue)
        except CellTimeoutError as exc:
            running = next((r for r in self.reports if r.status == "running"), None)
            if running is not None:
                running.status, running.ename, running.evalue = "failed", "CellTimeoutError", str(exc)
                self.notebook.cells[running.index].metadata["papermill"]["status"] = "failed"
            self.failure = (running.index if running else -1, "CellTimeoutError", f"the cell ran longer than {self.options.cell_timeout}s")
        except (DeadKernelError, RuntimeError, Exception) as exc:  # noqa: BLE001 - also after an interrupt
            if not self.failure:
                self.failure = (-1, type(exc).__name__, str(exc))

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
        session; nbclient then sees the cell fail and shuts the kernel down (deleting the session)."""
        self.interrupted = True
        self._signal_kernel(signal.SIGINT)

    def kill_kernel(self) -> None:
        self._signal_kernel(signal.SIGTERM)


def git_commit(folder: Path) -> dict[str, Any] | None:
    try:
        commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain"], capture_output=True, text=True, timeout=10)
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.TimeoutExpired):
        return None


def _session(url: str, name: str) -> dict[str, Any] | None:
    from studio.kernel.livy_client import LivyClient, LivyError

    client = LivyClient(url, timeout=10)
    try:
        return client.get_session(name)
    except LivyError:
        return None
    finally:
        client.close()


def _delete_session(url: str, name: str) -> None:
    from studio.kernel.livy_client import LivyClient, LivyError

    client = LivyClient(url, timeout=120)
    try:
        client.delete_session(name)
    except LivyError:
        pass  # the service is gone, and its sessions with it
    finally:
        client.close()


def _nbconvert_data_dir() -> str | None:
    """The ``share/jupyter`` of the prefix nbconvert is installed in, which holds its templates.

    Jupyter's search path only has this environment's prefix, so a virtualenv made with
    ``--system-site-packages`` sees nbconvert's code but not its templates without this."""
    import nbconvert

    prefix = Path(nbconvert.__file__).resolve().parents[4]  # <prefix>/lib/pythonX.Y/site-packages/nbconvert
    data = prefix / "share" / "jupyter"
    return str(data) if (data / "nbconvert" / "templates").is_dir() else None


def write_html(notebook_path: Path, html_path: Path) -> None:
    from nbconvert import HTMLExporter

    extra = _nbconvert_data_dir()
    paths = os.environ.get("JUPYTER_PATH", "").split(os.pathsep)
    if extra and extra not in paths:
        os.environ["JUPYTER_PATH"] = os.pathsep.join(p for p in (*paths, extra) if p)
    body, _ = HTMLExporter().from_filename(str(notebook_path))
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(body, encoding="utf-8")


def run(options: RunOptions, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> int:
    """Run a notebook to its output file; returns the process exit code."""
    run = NotebookRun(options, log)
    try:
        run.prepare()
    except RunError as exc:
        log(f"studio run: {exc}")
        return EXIT_USAGE
    run.save()
    service = None if options.livy_url else EmbeddedService()
    url = options.livy_url or ""
    stop_requested = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop_requested.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    session: dict[str, Any] | None = None
    try:
        if service is not None:
            log("starting an embedded Spark session service for this run")
            url = service.start()
        with tempfile.TemporaryDirectory(prefix="studio-kernelspec-") as folder:
            from studio.kernel.install import write_kernelspec

            write_kernelspec(Path(folder))
            env = {k: v for k, v in os.environ.items() if k != "STUDIO_WORKSPACE_DIR"}
            env.update(
                {
                    "STUDIO_LIVY_URL": url,
                    "STUDIO_SESSION_NAME": run.session_name,
                    "JUPYTER_PATH": os.pathsep.join(p for p in (folder, os.environ.get("JUPYTER_PATH", "")) if p),
                }
            )
            os.environ["JUPYTER_PATH"] = env["JUPYTER_PATH"]  # nbclient finds the kernelspec in this process
            log(f"running {options.notebook} on {url} (kernel {options.kernel})")
            worker = threading.Thread(target=run.execute, args=(Path(folder), env), name="notebook", daemon=True)
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
            session = _session(url, run.session_name)
    except RunError as exc:
        log(f"studio run: {exc}")
        run.failure = run.failure or (-1, "RunError", str(exc))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for report in run.reports:
            if report.status == "running":
                report.status = "failed" if not run.interrupted else "interrupted"
                run.notebook.cells[report.index].metadata["papermill"]["status"] = report.status
        run.save()
        if url:
            _delete_session(url, run.session_name)  # whatever the kernel managed to do
        if service is not None:
            service.stop()
    if options.record is not None:
        write_record(run, options, url, session)
    if options.html is not None:
        try:
            write_html(options.output, options.html)
        except Exception as exc:  # noqa: BLE001 - the run's own result stands; say what is missing
            log(f"studio run: warning: the HTML could not be written ({type(exc).__name__}: {exc}); "
                f"the output notebook is complete")
    if run.interrupted:
        log(f"studio run: interrupted; the output notebook is {options.output}")
        return EXIT_INTERRUPTED
    if run.failure:
        number, ename, evalue = run.failure
        where = f"cell {number}" if number >= 0 else "the run"
        log(f"studio run: {where} failed: {ename}: {evalue}")
        log(f"studio run: the output notebook is {options.output}")
        return EXIT_FAILED
    log(f"studio run: all {len(run.reports)} cells succeeded; the output notebook is {options.output}")
    return EXIT_OK


def write_record(run: NotebookRun, options: RunOptions, url: str, session: dict[str, Any] | None) -> Path:
    """The run record: what ran, with what, where, and how each cell went."""
    options.record.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
    record = {
        "notebook": str(options.notebook),
        "notebook_sha256": hashlib.sha256(run.source_bytes).hexdigest(),
        "output": str(options.output),
        "parameters": run.values,
        "git": git_commit(options.notebook.parent),
        "livy_url": url,
        "session_name": run.session_name,
        "session": None
        if session is None
        else {k: session.get(k) for k in ("id", "appId", "appInfo", "kind", "driverMemory", "executorMemory", "conf", "jars", "pyFiles")},
        "spark_app_id": session.get("appId") if session else None,
        "kernel": options.kernel,
        "started": run.started,
        "ended": _now(),
        "status": "interrupted" if run.interrupted else "failed" if run.failure else "succeeded",
        "failure": None if not run.failure else dict(zip(("cell", "ename", "evalue"), run.failure)),
        "cells": [r.__dict__ for r in run.reports],
    }
    path = options.record / "record.json"  # type: ignore[operator]
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path
