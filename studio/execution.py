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
import keyword
import math
import os
import re
import secrets
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

from studio.errors import ServiceStartError
from studio.launcher import ServiceLauncher

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# Progress lines on stderr that the executions API reads to follow a run (studio.workspaces.executions).
# RUN_STARTED: the run handles SIGINT/SIGTERM from now on (a stop before it would kill the process raw).
RUN_STARTED = "studio run: started"
KERNEL_READY = "studio run: kernel ready"
CELL_LINE = re.compile(r"^\[(\d+)/(\d+)\] (completed|failed)")


class RunError(Exception):
    """Bad input for a run (missing notebook, unknown parameter, wrong type): exit code 2."""


class RunStopped(Exception):
    """A stop was requested before the next cell started: no further cell runs."""


# -- parameters ---------------------------------------------------------------------------------


def parameters_cell(notebook: Any) -> int | None:
    for index, cell in enumerate(notebook.cells):
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            return index
    return None


def check_parameter_names(names: Any) -> None:
    """Every name must be a plain Python name: the injected cell assigns it as code."""
    for name in names:
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            raise RunError(f"parameter name {name!r} is not a Python name (letters, digits and _, not a keyword)")


def declared_parameters(source: str) -> dict[str, Any]:
    """Names the parameters cell assigns, with their literal defaults (Ellipsis when not literal).

    ``a, b = 1, 2`` declares both names with their own defaults."""
    code = re.sub(r"^%%local[^\n]*\n", "", source)
    try:
        module = ast.parse(code)
    except SyntaxError as exc:
        raise RunError(f"the parameters cell does not parse: {exc}") from None
    declared: dict[str, Any] = {}

    def declare(target: ast.AST, value: ast.AST | None) -> None:
        if isinstance(target, ast.Name):
            try:
                declared[target.id] = ast.literal_eval(value) if value is not None else Ellipsis
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                declared[target.id] = Ellipsis
        elif isinstance(target, (ast.Tuple, ast.List)):
            values = value.elts if isinstance(value, (ast.Tuple, ast.List)) and len(value.elts) == len(target.elts) else None
            for index, element in enumerate(target.elts):
                declare(element.value if isinstance(element, ast.Starred) else element, values[index] if values else None)

    for node in module.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for target in targets:
            declare(target, getattr(node, "value", None))
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


def _container(text: str, expected: type) -> Any:
    """A list, tuple, dict or set from the command line: JSON, or a Python literal."""
    try:
        parsed = json.loads(text)
    except ValueError:
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise ValueError(text) from None
    return _as_container(parsed, expected)


def _as_container(value: Any, expected: type) -> Any:
    if expected in (tuple, set, frozenset) and isinstance(value, (list, tuple, set, frozenset)):
        return expected(value)
    if expected is list and isinstance(value, (tuple, list)):
        return list(value)
    if isinstance(value, expected):
        return value
    raise ValueError(value)


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
        if expected in (list, tuple, set, frozenset):
            try:
                return _as_container(value, expected)
            except ValueError:
                pass
        raise RunError(f"parameter '{name}' expects {expected.__name__} (default {default!r}), got {type(value).__name__} {value!r}")
    try:
        if expected is bool:
            lowered = value.strip().lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return lowered in ("true", "1", "yes")
        if expected in (int, float, str):
            return expected(value)
        return _container(value, expected)
    except ValueError:
        raise RunError(f"parameter '{name}' expects {expected.__name__} (default {default!r}), got {value!r}") from None


def python_source(value: Any) -> str:
    """Python code that evaluates to ``value``: its repr, except that NaN and infinities (whose repr,
    ``nan``/``inf``, is no Python name) become ``float('nan')`` and ``float('inf')``, also inside
    lists, tuples, sets and dicts. RunError for a value that has no such code."""
    if isinstance(value, float) and not math.isfinite(value):
        return "float('nan')" if math.isnan(value) else "float('inf')" if value > 0 else "-float('inf')"
    if isinstance(value, list):
        return "[" + ", ".join(python_source(v) for v in value) + "]"
    if isinstance(value, tuple):
        return "(" + ", ".join(python_source(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, (set, frozenset)) and value:
        items = "{" + ", ".join(python_source(v) for v in value) + "}"
        return items if isinstance(value, set) else f"frozenset({items})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{python_source(k)}: {python_source(v)}" for k, v in value.items()) + "}"
    text = repr(value)
    try:
        same = ast.literal_eval(text) == value
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        same = False
    if not same:
        raise RunError(f"a parameter value of type {type(value).__name__} cannot be written as Python code: {text[:80]}")
    return text


def json_safe(value: Any) -> Any:
    """``value`` as strict JSON can carry it: NaN and infinities become the strings "NaN",
    "Infinity" and "-Infinity" (JSON has no such numbers; a bare NaN token breaks most readers),
    tuples and sets become lists, dates ISO text, other objects their str."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in value]
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    return str(value)


def inject_parameters(notebook: Any, given: dict[str, tuple[Any, bool]], warn: Callable[[str], None]) -> dict[str, Any]:
    """Insert the injected-parameters cell; returns the typed values. ``given``: name -> (value, from_text)."""
    check_parameter_names(given)
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
    lines = ["# Parameters injected by studio run"] + [f"{name} = {python_source(value)}" for name, value in values.items()]
    source = ("%%local\n" if local else "") + "\n".join(lines)
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    notebook.cells.insert(position, cell)
    return values


def load_parameter_file(path: Path) -> dict[str, Any]:
    """Parameters from YAML; dates and times (YAML reads ``2026-11-01`` as a date) become ISO text."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise RunError(f"cannot read parameters from {path}: {exc}") from None
    if not isinstance(data, dict):
        raise RunError(f"{path} must hold a mapping of parameter names to values")
    check_parameter_names(data)
    return {name: _plain(value, f"{path}: parameter '{name}'") for name, value in data.items()}


def _plain(value: Any, where: str) -> Any:
    """A YAML value as the plain Python value a parameter can take."""
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, dict):
        return {_plain(k, where): _plain(v, where) for k, v in value.items()}
    raise RunError(f"{where} is a {type(value).__name__}; use text, numbers, booleans, lists or mappings")


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
    """A `studio livy` just for this run (cold sessions only: no warm pool to fill), stopped after;
    it dies with the run even when the run is killed (``studio.launcher``)."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="studio-run-"))
        self.url = ""
        self.token = secrets.token_urlsafe(32)  # this run's service answers only this run
        self.launcher = ServiceLauncher(
            "livy",
            # Its sessions are this run's: they stop with it (its folder is removed after).
            ["--port", "0", "--pool", "0", "--state-dir", str(self.folder), "--stop-sessions-on-exit"],
            ready_file=self.folder / "ready.json",
            log_path=self.folder / "service.log",
            env={**os.environ, "STUDIO_TOKEN": self.token},  # in the environment: `ps` shows command lines
        )

    def start(self, timeout: float = 120.0) -> str:
        try:
            self.url = self.launcher.start_sync(timeout)
        except ServiceStartError as exc:
            raise RunError(f"the embedded session service did not start: {exc.msg}") from None
        return self.url

    def stop(self) -> None:
        if self.launcher.pid is not None:
            self.launcher.stop_sync(timeout=120)
        shutil.rmtree(self.folder, ignore_errors=True)


def read_notebook(path: Path) -> tuple[bytes, Any]:
    """(the file's bytes, the notebook), or RunError saying why it is not a notebook.

    Cells without ``metadata`` (or code cells without ``outputs``), which some generators write,
    get empty ones: nothing is lost by that, and the notebook runs."""
    if not path.is_file():
        raise RunError(f"no notebook at {path}")
    try:
        raw = path.read_bytes()
        data = json.loads(raw.decode("utf-8"))
    except OSError as exc:
        raise RunError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise RunError(f"{path} is not a notebook: it is not JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("cells", data.get("worksheets")), list):
        raise RunError(f"{path} is not a notebook: its JSON has no list of 'cells'")
    for cell in data.get("cells", []):
        if isinstance(cell, dict):
            cell.setdefault("metadata", {})
            if cell.get("cell_type") == "code":
                cell.setdefault("outputs", [])
                cell.setdefault("execution_count", None)
    try:
        notebook = nbformat.reads(json.dumps(data), as_version=4)
    except Exception as exc:  # noqa: BLE001 - nbformat raises several kinds for a malformed notebook
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunError(f"{path} is not a valid notebook: {reason}") from None
    return raw, notebook


class NotebookRun:
    def __init__(self, options: RunOptions, log: Callable[[str], None], stop_requested: threading.Event | None = None) -> None:
        self.options = options
        self.log = log
        self.stop_requested = stop_requested or threading.Event()
        self.session_name = f"studio-run-{uuid.uuid4().hex[:12]}"
        self.reports: list[CellReport] = []
        self.failure: tuple[int, str, str] | None = None  # (notebook cell index, ename, evalue)
        self.interrupted = False
        self.started = _now()
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

    def on_notebook_start(self, notebook: Any) -> None:
        self.log(f"{KERNEL_READY}; running {len(self.reports)} code cells")

    def on_cell_start(self, cell: Any, cell_index: int) -> None:
        report = self._report(cell_index)
        if report is None:  # markdown and empty cells are not run
            return
        if self.stop_requested.is_set():
            raise RunStopped(f"stopped before {self.cell_label(cell_index)}")
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
            if report.ename == "KeyboardInterrupt" and self.stop_requested.is_set():
                report.status = "interrupted"
        cell.metadata["papermill"] = {
            "status": report.status,
            "start_time": report.start,
            "end_time": report.end,
            "duration": report.duration,
            "exception": failed,
        }
        number = [r.index for r in self.reports].index(cell_index) + 1
        first_line = (cell.source.strip().splitlines() or [""])[0][:60]
        self.log(f"[{number}/{len(self.reports)}] {report.status} in {report.duration:.1f}s  {first_line}")
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


# What a repository's own .git/config could make `git status` run: an fsmonitor command, hooks
# (post-index-change), clean filters, and the same again inside submodules. All off.
_SAFE_GIT = ["-c", "core.fsmonitor=false", "-c", "core.hooksPath=/dev/null", "-c", "core.untrackedCache=false"]


def git_commit(folder: Path) -> dict[str, Any] | None:
    """The commit the notebook's folder is at, and whether it has changes; None outside a repository.

    The folder may be a cloned repository whose ``.git/config`` names commands; nothing it names runs.
    """
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_OPTIONAL_LOCKS": "0", "GIT_PAGER": "cat"}

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *_SAFE_GIT, *args], capture_output=True, text=True, timeout=10, cwd=folder, env=env)

    try:
        commit = git("rev-parse", "--verify", "HEAD")
        if commit.returncode != 0:
            return None
        # Reading config runs nothing; every filter it defines is switched off for the status below.
        filters = git("config", "--name-only", "--get-regexp", r"^filter\..*\.(clean|smudge|process)$").stdout.split()
        off = [arg for name in filters for arg in ("-c", f"{name}=")]
        dirty = git(*off, "status", "--porcelain", "--ignore-submodules=all")
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.TimeoutExpired):
        return None


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
    """Run a notebook to its output file; returns the process exit code.

    SIGINT and SIGTERM are handled from the first line on (``RUN_STARTED`` says so to the
    executions API), so a stop at any moment ends the run cleanly with its output notebook."""
    stop_requested = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop_requested.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        log(f"{RUN_STARTED} (pid {os.getpid()})")
        with tempfile.TemporaryDirectory(prefix="studio-kernelspec-") as folder:
            return _run(options, log, stop_requested, Path(folder))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(options: RunOptions, log: Callable[[str], None], stop_requested: threading.Event, kernelspecs: Path) -> int:
    from studio.kernel.install import write_kernelspec

    run = NotebookRun(options, log, stop_requested)
    write_kernelspec(kernelspecs)
    jupyter_path = os.pathsep.join(p for p in (str(kernelspecs), os.environ.get("JUPYTER_PATH", "")) if p)
    os.environ["JUPYTER_PATH"] = jupyter_path  # nbclient finds the kernelspec in this process
    try:  # everything that can be checked is checked before a service or a kernel starts
        run.prepare()
        run.check_writable()
        check_kernel(options.kernel)
    except RunError as exc:
        log(f"studio run: {exc}")
        return EXIT_USAGE
    service = None if options.livy_url else EmbeddedService()
    url = options.livy_url or ""
    session: dict[str, Any] | None = None
    driver_log: list[str] | None = None
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
                driver_log = _driver_log(url, session)
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
            write_record(run, options, url, session, driver_log)
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
        log(f"studio run: interrupted after {ran} of {len(run.reports)} cells; the output notebook is {options.output}")
        return EXIT_INTERRUPTED
    if run.failure:
        index, ename, evalue = run.failure
        log(f"studio run: {run.cell_label(index)} failed: {ename}: {evalue}")
        log(f"studio run: the output notebook is {options.output}")
        return EXIT_FAILED
    log(f"studio run: all {len(run.reports)} cells succeeded; the output notebook is {options.output}")
    return EXIT_OK


DRIVER_LOG_LINES = 10_000  # the end of the driver log that a record keeps


def _driver_log(url: str, session: dict[str, Any]) -> list[str] | None:
    """The end of the session's driver log, kept in the record: the service's link to it dies with
    the session. Read from ``appInfo.driverLogUrl``, which Spark Studio's service keeps for a while
    after a DELETE; else from ``/sessions/{id}/log`` while the session is listed."""
    from studio.livy_client import LivyClient, LivyError

    client = LivyClient(url, timeout=30)
    try:
        link = (session.get("appInfo") or {}).get("driverLogUrl")
        # Only on the service itself: its credentials go with the request, and a compute chooses this URL.
        if isinstance(link, str) and _same_origin(link, client.url):
            response = client.http.get(link)
            if response.status_code == 200:
                return response.text.splitlines()[-DRIVER_LOG_LINES:]
        return client.log(session["id"], size=DRIVER_LOG_LINES)
    except (LivyError, OSError, ValueError):
        return None
    except Exception:  # noqa: BLE001 - httpx errors: the record is written without the log
        return None
    finally:
        client.close()


def _same_origin(url: str, base: str) -> bool:
    """Same scheme, host and port (a prefix test would let ``http://127.0.0.1:8998.evil.example`` pass)."""
    from urllib.parse import urlsplit

    left, right = urlsplit(url), urlsplit(base)
    try:
        return (left.scheme, left.hostname, left.port) == (right.scheme, right.hostname, right.port) and not left.username
    except ValueError:  # a port that is not a number
        return False


def write_record(
    run: NotebookRun, options: RunOptions, url: str, session: dict[str, Any] | None, driver_log: list[str] | None = None
) -> Path:
    """The run record: what ran, with what, where, and how each cell went; the driver log beside it."""
    folder: Path = options.record  # type: ignore[assignment]
    folder.mkdir(parents=True, exist_ok=True)
    kept = None
    if session is not None:
        kept = {k: session.get(k) for k in ("id", "appId", "appInfo", "kind", "driverMemory", "executorMemory", "conf", "jars", "pyFiles")}
        if driver_log is not None:
            (folder / "driver.log").write_text("\n".join(driver_log) + "\n", encoding="utf-8", errors="replace")
            kept["driver_log"] = "driver.log"  # beside record.json; appInfo.driverLogUrl ends with the session
    failure = None
    if run.failure:
        index, ename, evalue = run.failure
        numbers = [r.index for r in run.reports]
        failure = {"cell": numbers.index(index) + 1 if index in numbers else None, "index": index, "ename": ename, "evalue": evalue}
    record = {
        "notebook": str(options.notebook),
        "notebook_sha256": hashlib.sha256(run.source_bytes).hexdigest(),
        "output": str(options.output),
        "parameters": run.values,
        "git": git_commit(options.notebook.parent),
        "livy_url": url,
        "session_name": run.session_name,
        "session": kept,
        "spark_app_id": session.get("appId") if session else None,
        "kernel": options.kernel,
        "started": run.started,
        "ended": _now(),
        "status": "interrupted" if run.interrupted else "failed" if run.failure else "succeeded",
        "failure": failure,
        "cells": [r.__dict__ for r in run.reports],
    }
    path = folder / "record.json"
    path.write_text(json.dumps(json_safe(record), indent=2, allow_nan=False) + "\n")
    return path
