"""Notebook executions: the workspace server's analogue of EMR's StartNotebookExecution.

An execution runs one notebook of a workspace, headless, on a compute: it is a ``studio run``
child process (``studio.execution``) given the compute's Livy URL, an output folder and the
parameters, so the API and the CLI share one implementation. This module queues executions up to
``max_concurrent_executions``, follows each run through the JSON lines ``studio run --events``
appends (``studio.execution.events``; never its console text), maps them to EMR's statuses
(``models.ExecutionStatus``, every change checked against ``models.EXECUTION_TRANSITIONS``) and
keeps the record in the store.

Statuses: ``START_PENDING`` (queued) -> ``STARTING`` (process and kernel starting) -> ``RUNNING``
(cells run) -> ``FINISHING`` (last cell done; output, HTML, session cleanup) -> ``FINISHED``; a
failing cell goes ``FAILING`` -> ``FAILED``; a stop goes ``STOP_PENDING`` -> ``STOPPING``
(SIGINT: the running cell is cancelled, the output written, the session deleted) -> ``STOPPED``.
Every change has a ``last_state_change_reason``.

Each run's files are in ``<state_dir>/executions/<id>/``: ``output.ipynb``, ``output.html``,
``record.json`` (``studio run --record``), ``parameters.yaml``, ``run.log`` (what the run printed,
for people) and ``events.jsonl`` (its progress, for this module).

Runs outlive the server. A ``studio run`` child is a ``studio.process.ChildProcess`` in a session
of its own that does not die with the server (its notebook is bounded: a run that loses its
server simply finishes), and its process record is in the store while it runs. A server that
stops leaves its runs running, unless ``stop_sessions_on_exit`` asks it to stop everything (then
they are STOPPED with the reason, as before); the next server adopts each one (pid and create
time, never a reused pid) and follows its events file from the start. A run that ended while no
server watched is finished from its ``finished`` event; one that is gone without a word is
queued again if it never started a cell, else FAILED (STOPPED if it was being stopped) with the
reason. Nothing is silently lost. Queued runs start again.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

from studio.auth import quotas
from studio.auth.credentials import without_secrets
from studio.auth.gate import ADMIN, Principal
from studio.config import Settings
from studio.errors import ConflictError, ForbiddenError, InvalidRequestError, NotFoundError
from studio.events import Event, EventBus
from studio.execution import RunError, inject_parameters, json_safe, read_notebook
from studio.execution import events as ev
from studio.process import ChildProcess, describe_exit, python_command
from studio.store import Store
from studio.workspaces import access
from studio.workspaces.computes import LOCAL, ComputeManager
from studio.workspaces.manager import WorkspaceManager
from studio.workspaces.models import (
    STOP_STATUSES,
    ExecutionStatus,
    StartExecution,
    check_execution_transition,
    record_id,
)

log = logging.getLogger("studio.workspaces.executions")

FOLLOW_SECONDS = 0.25  # how often a running execution's events file is read
KILL_AFTER_SIGTERM_SECONDS = 10.0


class Execution:
    """An execution's record, plus its ``studio run`` process while it runs."""

    def __init__(self, row: dict[str, Any], folder: Path) -> None:
        self.id: int = row["id"]
        self.name: str = row.get("name") or ""
        self.owner: str | None = row.get("owner")
        self.workspace_id: int | None = row.get("workspace_id")
        self.workspace: str = row.get("workspace") or ""
        self.notebook: str = row["notebook"]
        self.parameters: dict[str, Any] = row.get("parameters") or {}
        self.compute: str = row.get("compute") or ""
        self.livy_url: str = row.get("livy_url") or ""
        self.kernel: str = row.get("kernel") or "pyspark"
        self.cell_timeout: float | None = row.get("cell_timeout")
        self.status = ExecutionStatus(row["state"])
        self.reason: str | None = row.get("reason")
        self.created_at: float = row["created_at"]
        self.started_at: float | None = row.get("started_at")
        self.ended_at: float | None = row.get("ended_at")
        self.state_changed_at: float | None = row.get("state_changed_at")
        self.exit_code: int | None = row.get("exit_code")
        self.warnings: list[str] = row.get("warnings") or []
        self.process_record: dict[str, Any] | None = row.get("process")  # studio.process's record while it runs
        self.folder = folder
        self.process: ChildProcess | None = None
        self.task: asyncio.Task[None] | None = None
        self.escalation: asyncio.Task[None] | None = None  # SIGTERM, then SIGKILL, if a stop takes too long
        self.events = ev.EventReader(self.events_path)
        self.handles_signals = False  # its `started` event came: a SIGINT now ends it cleanly
        self._record: dict[str, Any] | None = None  # record.json, kept once the run is over
        self.cells_started = 0
        self.cells_done = 0
        self.cells_total: int | None = None
        self.finished: dict[str, Any] | None = None  # its `finished` event

    @property
    def output_path(self) -> Path:
        return self.folder / "output.ipynb"

    @property
    def html_path(self) -> Path:
        return self.folder / "output.html"

    @property
    def record_path(self) -> Path:
        return self.folder / "record.json"

    @property
    def log_path(self) -> Path:
        return self.folder / "run.log"

    @property
    def events_path(self) -> Path:
        return self.folder / "events.jsonl"

    def record(self) -> dict[str, Any] | None:
        """``record.json`` of the run; read once it is final (the UI asks every few seconds)."""
        if self._record is not None:
            return self._record
        try:
            record: dict[str, Any] = json.loads(self.record_path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict):
            return None
        if self.status.is_final:
            self._record = record
        return record

    def to_json(self) -> dict[str, Any]:
        """The API's view; strict JSON whatever a record holds (records of older versions may hold NaN)."""
        record = self.record()
        base = f"/api/executions/{self.id}"
        return json_safe({
            "id": self.id,
            "name": self.name,
            "owner": self.owner,
            "status": self.status.value,
            "last_state_change_reason": self.reason,
            "workspace": {"id": self.workspace_id, "name": self.workspace},
            "notebook": self.notebook,
            "parameters": self.parameters,
            "compute": self.compute,
            "livy_url": self.livy_url,
            "kernel": self.kernel,
            "cell_timeout": self.cell_timeout,
            "created_at": self.created_at,
            "start_time": self.started_at,
            "end_time": self.ended_at,
            "state_changed_at": self.state_changed_at,
            "exit_code": self.exit_code,
            "warnings": self.warnings,
            "progress": {"cells_done": self.cells_done, "cells_total": self.cells_total} if not self.status.is_final else None,
            "spark_app_id": record.get("spark_app_id") if record else None,
            "record": record,
            "output": {
                "notebook": f"{base}/output.ipynb" if self.output_path.is_file() else None,
                "html": f"{base}/output.html" if self.html_path.is_file() else None,
                "log": f"{base}/log",
                "driver_log": f"{base}/driver.log" if (self.folder / "driver.log").is_file() else None,
            },
        })


class ExecutionManager:
    """Starts, queues, follows, adopts and stops executions; raises only ``studio.errors``."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        workspaces: WorkspaceManager,
        computes: ComputeManager,
        identity: access.Identity | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.workspaces = workspaces
        self.computes = computes
        self.identity = identity  # the users' directory: a run's token acting for its owner, quotas
        self._executions: dict[int, Execution] = {}
        self._closing = False
        self.events: EventBus | None = None  # every status change is published here (GET /events, webhooks)

    def _folder(self, execution_id: int) -> Path:
        return self.settings.state_dir / "executions" / str(execution_id)

    # -- startup and shutdown --------------------------------------------------------------

    async def recover(self) -> None:
        """Load the records; adopt the runs a previous server left running, account for the ones
        that ended meanwhile (see the module); queued ones start."""
        for row in self.store.all("executions"):
            try:
                execution = Execution(row, self._folder(row["id"]))
            except (KeyError, TypeError, ValueError) as exc:  # one unreadable record must not hide the others
                log.error("execution record %s cannot be read (%s); it is left out", row.get("id"), exc)
                continue
            self._executions[execution.id] = execution
            if not execution.status.is_final and execution.status is not ExecutionStatus.START_PENDING:
                self._recover_one(execution)
        self._schedule()

    def _recover_one(self, execution: Execution) -> None:
        was = execution.status
        process = ChildProcess.adopt(
            execution.process_record,
            name=f"execution {execution.id}",
            stop_timeout=self.settings.execution_stop_timeout,
            descendants=True,  # its kernel, in a session of its own
        )
        if process is not None and not self._is_its_run(execution, process):
            process = None
        self._catch_up(execution)
        if process is not None:
            execution.process = process
            log.info("execution %s: found its studio run (pid %s) again, %s", execution.id, process.pid, was.value)
            if execution.status in STOP_STATUSES:  # the previous server had asked it to stop
                self._signal(execution, signal.SIGINT)
            execution.task = asyncio.create_task(self._follow_adopted(execution), name=f"execution-{execution.id}")
            execution.task.add_done_callback(lambda _: self._schedule())
            return
        if execution.finished is not None:  # it ended while no server was watching, and said how
            self._finish(execution, _exit_code(execution.finished))
            return
        if execution.process_record is None and not execution.events_path.exists():  # a record of an older version
            self._set(
                execution,
                ExecutionStatus.STOPPED,
                f"Stopped: studio serve stopped while it was {was.value} (its run was ended with the server); the "
                "output notebook holds the cells that ran.",
                ended_at=execution.ended_at or time.time(),
                process=None,
            )
            return
        if was in STOP_STATUSES:
            self._set(execution, ExecutionStatus.STOPPED, self._lost_reason(execution, "stopping"), ended_at=time.time(), process=None)
        elif execution.cells_started == 0:
            # Nothing of the notebook ran, so running it again from the start loses nothing.
            self._set(
                execution,
                ExecutionStatus.START_PENDING,
                f"Queued again: its studio run ended while studio serve was restarting ({was.value}), before it ran a "
                "cell.",
                process=None,
            )
        else:
            self._set(execution, ExecutionStatus.FAILED, self._lost_reason(execution, "running"), ended_at=time.time(), process=None)

    @staticmethod
    def _lost_reason(execution: Execution, doing: str) -> str:
        total = f" of {execution.cells_total}" if execution.cells_total else ""
        where = f" during cell {execution.cells_started}{total}" if execution.cells_started > execution.cells_done else (
            f" after {execution.cells_done}{total} cells"
        )
        return (
            f"Lost: its studio run ended{where} while studio serve was restarting, without saying how (it was "
            f"{doing}); the output notebook holds the cells that ran."
        )

    def _is_its_run(self, execution: Execution, process: ChildProcess) -> bool:
        """The adopted process is this execution's `studio run` (its command names the execution's folder):
        pid and create time already say so; this also refuses a record that a bug mixed up."""
        try:
            command = psutil.Process(process.pid).cmdline()
        except psutil.Error:
            return False
        return str(execution.events_path) in command

    async def shutdown(self) -> None:
        """The server is stopping. Its runs keep running for the next start, which adopts them; with
        ``stop_sessions_on_exit`` they are stopped (STOPPED, with the reason). Queued ones stay queued."""
        self._closing = True
        running = [e for e in self._executions.values() if e.task is not None and not e.task.done()]
        if not self.settings.stop_sessions_on_exit:
            for execution in running:
                assert execution.task is not None
                execution.task.cancel()
                if execution.escalation is not None:
                    execution.escalation.cancel()
                pid = execution.process.pid if execution.process is not None else None
                log.info("execution %s: left %s (studio run pid %s) for the next start", execution.id, execution.status.value, pid)
            await asyncio.gather(*(e.task for e in running if e.task is not None), return_exceptions=True)
            return
        for execution in running:
            if execution.status not in STOP_STATUSES:
                self._set(execution, ExecutionStatus.STOP_PENDING, "Stopping because studio serve is stopping.")
            self._signal(execution, signal.SIGINT)
        await asyncio.gather(*(e.task for e in running if e.task is not None), return_exceptions=True)

    # -- reading ----------------------------------------------------------------------------

    def list(
        self, status: str | None = None, workspace: str | None = None, actor: Principal | None = None
    ) -> list[Execution]:
        """Oldest first; with ``actor``, only the executions it may see."""
        items = sorted(self._executions.values(), key=lambda e: e.id)
        if actor is not None:
            items = [e for e in items if self.may_see(actor, e)]
        if status:
            wanted = set()
            for value in status.split(","):
                try:
                    wanted.add(ExecutionStatus(value.strip().upper()))
                except ValueError:
                    raise InvalidRequestError(
                        f"Unknown execution status '{value.strip()}'; use one of {', '.join(s.value for s in ExecutionStatus)}."
                    ) from None
            items = [e for e in items if e.status in wanted]
        if workspace:
            items = [e for e in items if workspace in (e.workspace, str(e.workspace_id))]
        return items

    def get(self, execution_id: int | str) -> Execution:
        key = record_id(execution_id, "Execution")
        execution = self._executions.get(key)
        if execution is None:
            raise NotFoundError(f"Execution {key} not found.")
        return execution

    def may_see(self, actor: Principal, execution: Execution) -> bool:
        """Its owner, whoever may use its workspace, and admins."""
        try:
            workspace = self.workspaces.get(execution.workspace_id) if execution.workspace_id is not None else None
        except NotFoundError:
            workspace = None
        if workspace is None:
            return access.may_see_execution(actor, execution.owner, None, None)
        return access.may_see_execution(actor, execution.owner, workspace.owner, workspace.collaborators)

    def get_for(self, actor: Principal, execution_id: int | str) -> Execution:
        """The execution, if ``actor`` may see it (and read its outputs, and stop it); 403 otherwise."""
        execution = self.get(execution_id)
        if not self.may_see(actor, execution):
            raise ForbiddenError(
                f"{actor.name} may not see execution {execution.id}: only its owner, the people of its workspace "
                "and admins may."
            )
        return execution

    # -- start ------------------------------------------------------------------------------

    async def start(self, body: StartExecution, actor: Principal) -> Execution:
        """Check everything that can be checked now, record the execution (``actor``'s, acting for
        it) and queue it."""
        if self._closing:
            raise ConflictError("studio serve is stopping; start the execution again after it restarts.")
        owner = actor.name
        workspace = self._workspace(body.workspace)
        asked = str(body.workspace) if isinstance(body.workspace, int) or str(body.workspace).isdigit() else f"'{body.workspace}'"
        access.check_see_workspace(actor, asked, workspace.owner, workspace.collaborators)
        in_use = sum(1 for e in self._executions.values() if e.owner == owner and not e.status.is_final)
        overrides = self.identity.quotas(owner) if self.identity is not None else None
        quotas.check(self.settings, owner, actor.role, "executions", in_use, overrides)
        path = self._notebook_path(workspace.folder, body.notebook)
        warnings = self._check_parameters(path, body.parameters)
        compute = self.computes.get_for(actor, body.compute or workspace.compute or LOCAL)
        await self.computes.check(compute)  # 502 when it does not answer or refuses the credentials

        execution_id = self.store.next_id("execution")
        now = time.time()
        row = {
            "id": execution_id,
            "name": body.name or Path(body.notebook).stem,
            "owner": owner,
            "workspace_id": workspace.id,
            "workspace": workspace.name,
            "notebook": path.relative_to(workspace.folder.resolve()).as_posix(),
            "parameters": body.parameters,
            "compute": compute.name,
            "livy_url": compute.url,
            "kernel": body.kernel,
            "cell_timeout": body.cell_timeout,
            "state": ExecutionStatus.START_PENDING.value,
            "reason": "Waiting for a free execution slot.",
            "created_at": now,
            "state_changed_at": now,
            "warnings": warnings,
        }
        self.store.insert("executions", row)
        execution = Execution(row, self._folder(execution_id))
        self._executions[execution_id] = execution
        self._publish(execution, execution.status.value, execution.reason or "", None)
        log.info("execution %s: %s in workspace %s on %s", execution_id, execution.notebook, workspace.name, compute.name)
        self._schedule()
        return execution

    def _workspace(self, ref: int | str) -> Any:
        if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
            return self.workspaces.get(ref)
        for workspace in self.workspaces.list():
            if workspace.name == ref:
                return workspace
        raise NotFoundError(f"Workspace '{ref}' not found.")

    @staticmethod
    def _notebook_path(folder: Path, notebook: str) -> Path:
        if not notebook.strip():
            raise InvalidRequestError("'notebook' is empty; give the notebook's path inside the workspace.")
        relative = Path(notebook)
        if relative.is_absolute():
            raise InvalidRequestError(f"Notebook path '{notebook}' is absolute; give it relative to the workspace's folder.")
        root = folder.resolve()
        path = (root / relative).resolve()
        if path != root and root not in path.parents:
            raise InvalidRequestError(f"Notebook path '{notebook}' leads outside the workspace's folder.")
        if path.suffix != ".ipynb":
            raise InvalidRequestError(f"Notebook path '{notebook}' is not an .ipynb file.")
        if not path.is_file():
            raise NotFoundError(f"Notebook '{notebook}' not found in the workspace's folder {folder}.")
        return path

    @staticmethod
    def _check_parameters(path: Path, parameters: dict[str, Any]) -> builtins.list[str]:
        """The run's own checks (unknown names, wrong types) before anything is queued; returns warnings."""
        try:
            _, notebook = read_notebook(path)
        except RunError as exc:
            raise InvalidRequestError(str(exc).replace(str(path), f"Notebook '{path.name}'")) from None
        for name, value in parameters.items():
            if not _finite(value):
                raise InvalidRequestError(
                    f"parameter '{name}' holds NaN or Infinity, which JSON cannot carry; pass a finite number "
                    "(or set it in the notebook's parameters cell)."
                )
        warnings: list[str] = []
        try:
            inject_parameters(notebook, {name: (value, False) for name, value in parameters.items()}, warnings.append)
        except RunError as exc:
            raise InvalidRequestError(str(exc)) from None
        return warnings

    # -- stop -------------------------------------------------------------------------------

    def stop(self, execution_id: int | str, actor: Principal) -> Execution:
        execution = self.get_for(actor, execution_id)
        if execution.status.is_final:
            raise ConflictError(f"Execution {execution.id} is already {execution.status.value}; there is nothing to stop.")
        if execution.status in STOP_STATUSES:
            return execution
        if execution.status is ExecutionStatus.START_PENDING:
            self._set(execution, ExecutionStatus.STOPPED, "Stopped on request before it started.", ended_at=time.time())
            return execution
        self._set(execution, ExecutionStatus.STOP_PENDING, "Stop requested.")
        self._signal(execution, signal.SIGINT)
        return execution

    def _signal(self, execution: Execution, sig: int) -> None:
        """Signal the run. A SIGINT waits until the run handles it (its ``started`` event, see
        ``_apply``): earlier it would kill the process before it could write its output notebook."""
        process = execution.process
        if process is None or process.poll() is not None:
            return
        if sig == signal.SIGINT and execution.status in STOP_STATUSES:
            if execution.status is ExecutionStatus.STOP_PENDING:
                self._set(execution, ExecutionStatus.STOPPING, "Cancelling the running cell and deleting the Spark session.")
            if execution.escalation is None or execution.escalation.done():  # (again, for a run adopted while stopping)
                execution.escalation = asyncio.create_task(self._escalate_stop(execution))
        if sig == signal.SIGINT and not execution.handles_signals:
            return
        process.send_signal(sig)

    async def _escalate_stop(self, execution: Execution) -> None:
        """A stopped run that does not end in time gets SIGTERM, then SIGKILL with its kernel."""
        await asyncio.sleep(self.settings.execution_stop_timeout)
        process = execution.process
        if process is None:
            return
        process.send_signal(signal.SIGTERM)
        await asyncio.sleep(KILL_AFTER_SIGTERM_SECONDS)
        if process.poll() is None:
            await process.kill()

    # -- running ----------------------------------------------------------------------------

    def _schedule(self) -> None:
        if self._closing:
            return
        running = sum(1 for e in self._executions.values() if e.task is not None and not e.task.done())
        for execution in sorted(self._executions.values(), key=lambda e: e.id):
            if running >= self.settings.max_concurrent_executions:
                break
            if execution.status is ExecutionStatus.START_PENDING and (execution.task is None or execution.task.done()):
                execution.task = asyncio.create_task(self._run(execution), name=f"execution-{execution.id}")
                execution.task.add_done_callback(lambda _: self._schedule())  # once done, it frees its slot
                running += 1

    async def _run(self, execution: Execution) -> None:
        try:
            if self._start_process(execution):
                await self._follow(execution)
        except Exception as exc:  # noqa: BLE001 - a run's failure must never reach the server
            log.exception("execution %s failed to run", execution.id)
            if not execution.status.is_final:
                self._set(execution, ExecutionStatus.FAILED, f"studio run could not be started: {exc}", ended_at=time.time())

    async def _follow_adopted(self, execution: Execution) -> None:
        try:
            await self._follow(execution)
        except Exception:  # noqa: BLE001 - one run's failure must never reach the server
            log.exception("execution %s: following its adopted run failed", execution.id)

    def _command(self, execution: Execution, notebook: Path) -> builtins.list[str]:
        command = python_command(
            "studio", "run", str(notebook),
            "-o", str(execution.output_path), "--html", str(execution.html_path),
            "--livy-url", execution.livy_url, "--record", str(execution.folder), "--kernel", execution.kernel,
            "--events", str(execution.events_path),
        )  # fmt: skip
        if execution.parameters:
            params = execution.folder / "parameters.yaml"
            params.write_text(yaml.safe_dump(execution.parameters, sort_keys=False, allow_unicode=True))
            command += ["-f", str(params)]
        if execution.cell_timeout:
            command += ["--cell-timeout", f"{execution.cell_timeout:g}"]
        return command

    def _start_process(self, execution: Execution) -> bool:
        """Start the run's `studio run` (no await between the check and the start: a stop cannot slip in)."""
        if execution.status is not ExecutionStatus.START_PENDING:  # stopped while it was being scheduled
            return False
        execution.folder.mkdir(parents=True, exist_ok=True)
        compute = self.computes.find(execution.compute)  # its URL now: `local` moves when the server restarts
        if compute is None:
            self._set(execution, ExecutionStatus.FAILED, f"Compute '{execution.compute}' was removed before the run started.", ended_at=time.time())
            return False
        execution.livy_url = compute.url
        self._save(execution, livy_url=compute.url)
        folder = self._workspace_folder(execution)
        notebook = folder / execution.notebook
        # A run queued again after a restart starts afresh: the events of the lost run are not this run's.
        execution.events_path.unlink(missing_ok=True)
        execution.events = ev.EventReader(execution.events_path)
        execution.handles_signals, execution.finished = False, None
        execution.cells_started = execution.cells_done = 0
        execution.cells_total = None
        self._set(execution, ExecutionStatus.STARTING, f"Starting the PySpark kernel and a session on compute '{execution.compute}'.")
        execution.started_at = time.time()
        self._save(execution, started_at=execution.started_at)
        # The run talks to its compute with the compute's credentials, given in its environment (never on its
        # command line, where `ps` shows them); the studio's own secrets stay out, the notebook runs user code.
        env = {k: v for k, v in without_secrets(dict(os.environ)).items() if k != "STUDIO_LIVY_URL"}
        user, token = self._credentials(execution, compute)
        env.update({"STUDIO_LIVY_TOKEN": token} if token else {})
        env.update({"STUDIO_LIVY_USER": user} if user else {})
        # Its own session (a Ctrl-C at the server's terminal is the server's to handle) and no tie to the
        # server's life: the run outlives a restart, and the next server adopts it.
        execution.process = ChildProcess(
            self._command(execution, notebook),
            name=f"execution {execution.id}",
            cwd=folder if folder.is_dir() else execution.folder,
            env=env,
            output=execution.log_path,
            stop_timeout=self.settings.execution_stop_timeout,
            descendants=True,  # its kernel, in a session of its own
        )
        execution.process.start()
        record = execution.process.record
        execution.process_record = record.to_json() if record is not None else None
        self._save(execution, process=execution.process_record)
        return True

    def _credentials(self, execution: Execution, compute: Any) -> tuple[str | None, str | None]:
        """What the run sends its compute: for the studio's own compute an `execution` token of its
        owner (scope ``execution:<id>``, revoked when the run ends), so that it acts for that person;
        another compute's stored credentials otherwise."""
        if not self.computes.sends_own_token(compute) or self.identity is None:
            return self.computes.credentials(compute)
        scope = access.execution_scope(execution.id)
        self.identity.revoke("execution", scope)  # one of a run that was lost and is queued again
        owner = execution.owner or ADMIN  # records of the single-token versions: the administrator's
        return None, self.identity.token_for(owner, "execution", scope, f"notebook execution {execution.id}")

    def _workspace_folder(self, execution: Execution) -> Path:
        """The workspace's folder now (it may have been renamed since), or where it was."""
        try:
            return self.workspaces.get(execution.workspace_id).folder  # type: ignore[arg-type]
        except NotFoundError:
            return self.settings.root / execution.workspace

    async def _follow(self, execution: Execution) -> None:
        """Follow the run's events until its process exits, then finish its record."""
        process = execution.process
        assert process is not None
        exited = asyncio.ensure_future(process.wait())
        try:
            while not exited.done():
                self._catch_up(execution)
                await asyncio.wait({exited}, timeout=FOLLOW_SECONDS)
            self._catch_up(execution)
        finally:
            if not exited.done():  # the server is stopping and leaves the run running
                exited.cancel()
            if execution.escalation is not None and exited.done():
                execution.escalation.cancel()
        code: int | None = exited.result()
        if process.adopted:  # not our child: only the run itself can say how it ended
            code = _exit_code(execution.finished) if execution.finished is not None else None
        self._finish(execution, code)

    def _catch_up(self, execution: Execution) -> None:
        for event in execution.events.read():
            self._apply(execution, event)

    def _apply(self, execution: Execution, event: dict[str, Any]) -> None:
        """Move the status on from one of ``studio run``'s events (also replayed ones: each moves
        the status forward only, so reading a run's events again changes nothing)."""
        kind = event.get("event")
        if kind == ev.STARTED and not execution.handles_signals:
            execution.handles_signals = True
            if execution.status in STOP_STATUSES and execution.process is not None:  # a stop that came early
                execution.process.send_signal(signal.SIGINT)
            return
        if kind == ev.FINISHED:
            execution.finished = event
            return
        if kind == ev.KERNEL_READY:
            execution.cells_total = _int(event.get("cells"), execution.cells_total)
        elif kind in (ev.CELL_STARTED, ev.CELL_FINISHED):
            number, total = _int(event.get("number"), 0), _int(event.get("total"), None)
            execution.cells_total = total or execution.cells_total
            if kind == ev.CELL_STARTED:
                execution.cells_started = max(execution.cells_started, number or 0)
            else:
                execution.cells_done = max(execution.cells_done, number or 0)
        if execution.status in STOP_STATUSES or execution.status.is_final:
            return
        if kind == ev.KERNEL_READY and execution.status is ExecutionStatus.STARTING:
            self._set(execution, ExecutionStatus.RUNNING, "The kernel is running the notebook's cells.")
        elif kind == ev.CELL_FINISHED:
            status, number, total = event.get("status"), execution.cells_done, execution.cells_total
            if status == "failed" and execution.status in (ExecutionStatus.RUNNING, ExecutionStatus.FINISHING):
                self._set(execution, ExecutionStatus.FAILING, f"Cell {number} of {total} failed; saving the output and deleting the session.")
            elif status == "completed" and number == total and execution.status is ExecutionStatus.RUNNING:
                self._set(execution, ExecutionStatus.FINISHING, "All cells ran; saving the output and deleting the session.")

    def _finish(self, execution: Execution, code: int | None) -> None:
        """The run is over: its final status and reason, from its exit code and its `finished` event."""
        execution.process = None
        if execution.escalation is not None:
            execution.escalation.cancel()
        if code is None:  # an adopted run that ended without its `finished` event: killed, or crashed
            doing = "stopping" if execution.status in STOP_STATUSES else "running"
            status = ExecutionStatus.STOPPED if doing == "stopping" else ExecutionStatus.FAILED
            reason = self._last_error(execution) or self._lost_reason(execution, doing)
            self._set(execution, status, reason, ended_at=time.time(), process=None)
            log.info("execution %s: %s (%s)", execution.id, status.value, reason)
            return
        ended = time.time()
        took = ended - (execution.started_at or ended)
        record = execution.record() or {}
        cells = record.get("cells") or []
        if cells:
            execution.cells_total = len(cells)
            execution.cells_done = sum(1 for c in cells if c.get("status") in ("completed", "failed"))
        said = str((execution.finished or {}).get("message") or "")
        if execution.status in STOP_STATUSES:
            status, reason = ExecutionStatus.STOPPED, self._stop_reason(execution, cells)
        elif code == 0:
            count = len(cells) or execution.cells_total or 0
            ran = "The notebook has no code cells" if count == 0 else "1 cell succeeded" if count == 1 else f"All {count} cells succeeded"
            status, reason = ExecutionStatus.FINISHED, f"{ran} in {took:.1f} s."
        elif code == 130 or code == -signal.SIGTERM:
            status, reason = ExecutionStatus.STOPPED, "Stopped: studio run was interrupted from outside the Studio."
        else:
            status = ExecutionStatus.FAILED
            reason = said or self._last_error(execution) or f"studio run {describe_exit(code)}."
        self._set(execution, status, reason, ended_at=ended, exit_code=code, process=None)
        log.info("execution %s: %s (%s)", execution.id, status.value, reason)

    def _stop_reason(self, execution: Execution, cells: builtins.list[dict[str, Any]]) -> str:
        why = "Stopped because studio serve stopped" if self._closing else "Stopped on request"
        done, total = execution.cells_done, execution.cells_total
        of = f" of {total}" if total else ""
        if any(c.get("status") == "interrupted" for c in cells):
            return f"{why} during cell {done + 1}{of}, which was cancelled; the Spark session was deleted."
        if not done:
            return f"{why} before any cell ran."
        return f"{why} after {done}{of} cells; the Spark session was deleted."

    @staticmethod
    def _last_error(execution: Execution) -> str | None:
        """Why a run failed when its events do not say (it failed before it could, or crashed): the
        error it printed for people last, or the last line of its traceback."""
        try:
            lines = [line for line in execution.log_path.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return None
        progress = ("studio run: started", "studio run: kernel ready", "studio run: warning: ", "studio run: interrupted")
        for line in reversed(lines):
            if line.startswith("studio run: ") and not line.startswith(progress) and "output notebook is" not in line:
                return line[len("studio run: ") :]
        if any(line.startswith("Traceback") for line in lines):
            return f"studio run crashed: {lines[-1].strip()}"
        return None

    # -- records ----------------------------------------------------------------------------

    def _set(self, execution: Execution, status: ExecutionStatus, reason: str, **fields: Any) -> None:
        check_execution_transition(execution.id, execution.status, status)
        log.info("execution %s: %s -> %s (%s)", execution.id, execution.status.value, status.value, reason)
        self._publish(execution, status.value, reason, execution.status.value)
        execution.status = status
        execution.reason = reason
        execution.state_changed_at = time.time()
        for name, value in fields.items():
            # The stored `process` is the process record; `execution.process` is the live handle.
            setattr(execution, "process_record" if name == "process" else name, value)
        self._save(execution, state=status.value, reason=reason, state_changed_at=execution.state_changed_at, **fields)
        if status.is_final and self.identity is not None:
            try:
                self.identity.revoke("execution", access.execution_scope(execution.id))
            except Exception:  # noqa: BLE001 - the record is final either way; a token left is found at the next start
                log.exception("execution %s: revoking its token failed", execution.id)

    def _save(self, execution: Execution, **fields: Any) -> None:
        self.store.update("executions", execution.id, **fields)

    def _publish(self, execution: Execution, new: str, reason: str, old: str | None) -> None:
        if self.events is not None:
            self.events.publish(Event("execution", str(execution.id), new, old, reason, name=execution.name or None, owner=execution.owner))


def _int(value: Any, default: Any) -> Any:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _exit_code(finished: dict[str, Any]) -> int | None:
    code = finished.get("exit_code")
    return code if isinstance(code, int) and not isinstance(code, bool) else None


def _finite(value: Any) -> bool:
    """No NaN or infinity anywhere in a JSON value (Python's JSON parser accepts them; JSON does not)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True
