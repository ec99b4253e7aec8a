"""WorkspaceManager: workspaces, their lifecycle, idle stops and recovery after a restart.

A workspace is a record in the store plus a folder ``<root>/<name>`` of notebooks (made, moved
and removed by ``studio.workspaces.folders``); while it runs it also has a live
``JupyterLabProcess``. Every change of state goes through
``_transition``, which checks the table in ``models.TRANSITIONS`` and records the reason, so
the UI can always say why a workspace is where it is ("Stopped after 3600 s without activity").

Which compute a workspace is attached to lives only here, never in a file inside the workspace
(a cloned repository could bring such a file): every JupyterLab gets ``STUDIO_SERVER_URL``,
``STUDIO_WORKSPACE_ID`` and a secret of its own, ``STUDIO_KERNEL_TOKEN``, and its PySpark kernels
ask ``GET /api/workspaces/{id}/connection`` with that secret whenever they start a Spark session,
so an attach takes effect without restarting kernels, and the compute's credentials stay on the
server. Only the secret's SHA-256 is kept (in the workspace's process record, so kernels keep
working across a restart of the server).

Starting and stopping run as background tasks (the API answers ``Starting``/``Stopping`` at
once); attaching is a health check, so it runs within the request. The manager
raises only ``studio.errors``.

Running workspaces outlive the server: when ``studio serve`` stops (SIGTERM, Ctrl-C: an upgrade)
it leaves their JupyterLabs and kernels running, as a crash does, and the next server on the same
state directory finds them again (``recover``) with their state; their kernels keep their Spark
sessions. ``stop_sessions_on_exit`` stops them instead. A JupyterLab that no server comes back for
stops itself after its workspace's idle timeout (``jupyter.idle_limits``).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hmac
import json
import logging
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, Iterable

from studio.auth import quotas
from studio.auth.gate import ADMIN, Principal
from studio.auth.tokens import digest
from studio.config import Settings
from studio.errors import (
    ComputeUnreachableError,
    ConflictError,
    ForbiddenError,
    LimitReachedError,
    NotFoundError,
    StudioError,
)
from studio.events import Event, EventBus
from studio.process import describe_exit
from studio.store import Store
from studio.workspaces import access, folders, git
from studio.workspaces.computes import Compute, ComputeManager
from studio.workspaces.jupyter import JupyterLabProcess, self_shutdown
from studio.workspaces.models import (
    OPEN_STATES,
    RUNNING_STATES,
    TRANSITIONS,
    CreateWorkspace,
    UpdateWorkspace,
    WorkspaceState,
    check_name,
    record_id,
)

log = logging.getLogger("studio.workspaces")

SERVER_FILE = "serve.json"  # in the state directory: {"url": where this server listens now}


class Workspace:
    """A workspace's record, plus its JupyterLab while it runs."""

    def __init__(self, row: dict[str, Any], root: Path) -> None:
        self.id: int = row["id"]
        self.name: str = row["name"]
        self.description: str = row.get("description") or ""
        self.owner: str | None = row.get("owner")
        self.collaborators: list[str] = list(row.get("collaborators") or [])
        # Whom its running JupyterLab's kernels act for (who started it); None while it is stopped.
        self.started_by: str | None = row.get("started_by")
        self.repository_url: str | None = row.get("repository_url")
        self.compute: str | None = row.get("compute")
        self.idle_timeout: float | None = row.get("idle_timeout")
        self.state = WorkspaceState(row["state"])
        self.reason: str | None = row.get("reason")
        self.created_at: float = row["created_at"]
        self.updated_at: float | None = row.get("updated_at")
        self.state_changed_at: float | None = row.get("state_changed_at")
        self.last_activity: float | None = row.get("last_activity")
        self.process_state: dict[str, Any] | None = row.get("process")
        # SHA-256 of the secret its running JupyterLab's kernels ask for their compute with.
        self.kernel_token_sha256: str | None = (self.process_state or {}).get("kernel_token_sha256")
        # Whom that secret acts for, when it is a token of the users' directory (a running workspace's
        # kernels send it to the session service as that person); None for a JupyterLab of an older version.
        self.kernel_acts_for: str | None = (self.process_state or {}).get("kernel_acts_for")
        self.root = root
        self.lab: JupyterLabProcess | None = None
        self.task: asyncio.Task[None] | None = None  # the start or stop under way
        self.watcher: asyncio.Task[None] | None = None  # notices a JupyterLab that exits by itself

    @property
    def folder(self) -> Path:
        return self.root / self.name

    def effective_idle_timeout(self, settings: Settings) -> float:
        """Its own idle timeout, else the server's (STUDIO_WORKSPACE_IDLE_TIMEOUT); 0: never."""
        return settings.workspace_idle_timeout if self.idle_timeout is None else self.idle_timeout

    def to_json(self, settings: Settings) -> dict[str, Any]:
        idle_timeout = self.effective_idle_timeout(settings)
        lab = self.lab if self.state in OPEN_STATES else None
        return {
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "owner": self.owner,
            "collaborators": list(self.collaborators),
            # Who its running JupyterLab and kernels act for; only they may open it.
            "running_for": self.started_by if self.state.is_running else None,
            "state": self.state.value,
            "reason": self.reason,
            "compute": self.compute,
            "repository_url": self.repository_url,
            "folder": str(self.folder),
            "idle_timeout": idle_timeout,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "state_changed_at": self.state_changed_at,
            "last_activity": self.last_activity,
            # Opening it redirects to JupyterLab with its token, which no listing ever shows.
            "url": f"/api/workspaces/{self.id}/open" if lab else None,
            "jupyterlab": {"pid": lab.pid, "port": lab.port} if lab else None,
        }


class WorkspaceManager:
    """Creates, starts, stops, attaches and deletes workspaces; raises only ``studio.errors``."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        computes: ComputeManager,
        jupyter_dir: Path,
        jupyter_config_dir: Path,
        server_url: str = "",
        identity: access.Identity | None = None,
    ) -> None:
        self.settings = settings
        # The users' directory: tokens that act for a person (a running workspace's kernels), quotas.
        self.identity = identity
        self.store = store
        self.computes = computes
        self.jupyter_dir = jupyter_dir  # holds kernels/pyspark/kernel.json; goes first on JUPYTER_PATH
        self.jupyter_config_dir = jupyter_config_dir  # JupyterLab defaults; goes first on JUPYTER_CONFIG_PATH
        self.server_url = server_url  # where the workspaces' kernels reach this server
        self.root = settings.root
        self.seed_dir = settings.workspace_seed_dir or folders.default_seed_dir()
        self._workspaces: dict[int, Workspace] = {}
        self._creating: set[str] = set()  # names reserved while their repository is cloned
        self._culler: asyncio.Task[None] | None = None
        self.events: EventBus | None = None  # every state change is published here (GET /events, webhooks)

    # -- startup and shutdown --------------------------------------------------------------

    async def recover(self) -> None:
        """Load the records; find running JupyterLabs again or mark their workspaces Idle with the reason."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.server_url:
            server_file = self.settings.state_dir / SERVER_FILE
            server_file.with_suffix(".tmp").write_text(json.dumps({"url": self.server_url, "pid": os.getpid()}) + "\n")
            server_file.with_suffix(".tmp").replace(server_file)
        for row in self.store.all("workspaces"):
            workspace = Workspace(row, self.root)
            self._workspaces[workspace.id] = workspace
            await self._recover_one(workspace)
        self._culler = asyncio.create_task(self._cull_forever(), name="workspace-culler")

    async def _recover_one(self, workspace: Workspace) -> None:
        state = workspace.state
        if state is WorkspaceState.DELETING:
            self._restore(workspace, WorkspaceState.IDLE, "Its deletion was interrupted by a restart of studio serve; delete it again.")
            return
        if state is not WorkspaceState.STOPPING and not state.is_running:
            self._forget_missing_compute(workspace)
            return
        lab = None
        if workspace.process_state:
            lab = await JupyterLabProcess.adopt(
                self.settings, workspace.folder, self._layout_dir(workspace), {}, workspace.process_state
            )
        if lab is None or state is WorkspaceState.STOPPING:
            if lab is not None:
                await lab.stop()
                reason = "Stopped: it was stopping when studio serve restarted."
            else:
                reason = "JupyterLab was no longer running when studio serve restarted."
                idle_for = self_shutdown(self._log_path(workspace))
                if idle_for is not None:
                    reason = (
                        f"JupyterLab stopped itself after {idle_for} s without activity while studio serve was not "
                        "running (the workspace's idle timeout)."
                    )
            self._restore(workspace, WorkspaceState.IDLE, reason)
            self._forget_missing_compute(workspace)
            return
        workspace.lab = lab
        if workspace.started_by is None:  # started by a version before per-user access: its owner's
            workspace.started_by = workspace.owner or ADMIN
            self._save(workspace, started_by=workspace.started_by)
        self._forget_missing_compute(workspace)
        found = WorkspaceState.ATTACHED if workspace.compute else WorkspaceState.READY
        self._restore(workspace, found, f"Found running again (JupyterLab pid {lab.pid}) after studio serve restarted.")
        self._watch(workspace)
        log.info("workspace %s: found its JupyterLab (pid %s) again", workspace.name, lab.pid)

    def _restore(self, workspace: Workspace, state: WorkspaceState, reason: str) -> None:
        """Set a state found at startup; not a transition, so the table does not apply."""
        self._publish(workspace, state.value, reason)
        workspace.state = state
        workspace.reason = reason
        workspace.state_changed_at = time.time()
        if state is WorkspaceState.IDLE:
            workspace.process_state = None
        self._save(workspace, state=state.value, reason=reason, state_changed_at=workspace.state_changed_at, process=workspace.process_state)
        if state is WorkspaceState.IDLE:
            self._release(workspace)

    async def shutdown(self) -> None:
        """studio serve is stopping. Running workspaces keep running (JupyterLab, kernels, the kernels'
        Spark sessions) for the next start, which finds them again; a start under way is stopped (it
        has no kernels yet) and a stop under way finishes. With ``stop_sessions_on_exit`` every
        running workspace is stopped, recording why."""
        if self._culler is not None:
            self._culler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._culler
        if self.settings.stop_sessions_on_exit:
            ending = [w for w in self._workspaces.values() if w.state.is_running or w.state is WorkspaceState.STOPPING]
        else:
            ending = [w for w in self._workspaces.values() if w.state in (WorkspaceState.STARTING, WorkspaceState.STOPPING)]
        await asyncio.gather(
            *(self._stop_now_or_wait(w, self._shutdown_reason(w)) for w in ending),
            return_exceptions=True,
        )
        for workspace in self._workspaces.values():
            if workspace.state.is_running and workspace.lab is not None:
                await self._leave_running(workspace, workspace.lab)

    @staticmethod
    def _shutdown_reason(workspace: Workspace) -> str:
        if workspace.state is WorkspaceState.STARTING:
            return "Stopped because studio serve stopped while it was starting."
        return "Stopped because studio serve stopped."

    async def _leave_running(self, workspace: Workspace, lab: JupyterLabProcess) -> None:
        """Let go of a running workspace without stopping anything: its record keeps its state and
        its JupyterLab's process record, so the next server adopts it (an attach under way ends
        as it would after a crash: the workspace is found Attached to its compute)."""
        tasks = [task for task in (workspace.watcher, workspace.task) if task is not None and not task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        workspace.watcher = workspace.task = None
        await lab.close()
        log.info("workspace %s: left running (JupyterLab pid %s) for the next start of studio serve", workspace.name, lab.pid)

    async def _stop_now_or_wait(self, workspace: Workspace, reason: str) -> None:
        if workspace.state is WorkspaceState.STOPPING and workspace.task is not None:
            await asyncio.gather(workspace.task, return_exceptions=True)
            return
        self._begin_stop(workspace, reason)
        assert workspace.task is not None
        await asyncio.gather(workspace.task, return_exceptions=True)

    # -- reading ----------------------------------------------------------------------------

    def list(self) -> list[Workspace]:
        return sorted(self._workspaces.values(), key=lambda w: w.id)

    def visible(self, actor: Principal) -> builtins.list[Workspace]:
        """The workspaces ``actor`` may see: its own, the ones shared with it (every one for an admin)."""
        return [w for w in self.list() if access.may_see_workspace(actor, w.owner, w.collaborators)]

    def get(self, workspace_id: int | str) -> Workspace:
        key = record_id(workspace_id, "Workspace")
        workspace = self._workspaces.get(key)
        if workspace is None:
            raise NotFoundError(f"Workspace {key} not found.")
        return workspace

    def get_for(self, actor: Principal, workspace_id: int | str) -> Workspace:
        """The workspace, if ``actor`` may see and use it (owner, collaborator, admin); else 403."""
        workspace = self.get(workspace_id)
        access.check_see_workspace(actor, str(workspace.id), workspace.owner, workspace.collaborators)
        return workspace

    def get_to_manage(self, actor: Principal, workspace_id: int | str, what: str) -> Workspace:
        """The workspace, if ``actor`` is its owner or an admin; 403 (after the usual 403 for one it
        may not see at all) otherwise."""
        workspace = self.get_for(actor, workspace_id)
        access.check_manage_workspace(actor, workspace.name, workspace.owner, what)
        return workspace

    def attached_to(self, compute: str, actor: Principal | None = None) -> builtins.list[str]:
        """Names of the workspaces attached to a compute (those ``actor`` may see, when given)."""
        found = self.list() if actor is None else self.visible(actor)
        return [w.name for w in found if w.compute == compute]

    def to_json(self, workspace: Workspace) -> dict[str, Any]:
        return workspace.to_json(self.settings)

    # -- create, update, delete -----------------------------------------------------------

    async def create(self, body: CreateWorkspace, actor: Principal) -> Workspace:
        """A new workspace of ``actor``'s, Idle (or Failed if its repository could not be cloned); started if asked."""
        owner = actor.name
        name = check_name(body.name)
        self._check_name_free(name)
        # Refused (400) before anything happens; credentials in the URL are kept apart from here on.
        source = git.check_repository_url(body.repository_url, self.settings.git_allow_local) if body.repository_url else None
        if body.start:
            self._check_running_budget()
            self._check_quota(actor)
        compute = self.computes.get_for(actor, body.compute) if body.compute else None
        folder = self.root / name
        self._creating.add(name)
        try:
            reason = await folders.make_folder(self.settings, folder, source, self.seed_dir)
            state = WorkspaceState.FAILED if reason else WorkspaceState.IDLE  # a clone that failed says why
            now = time.time()
            workspace_id = self.store.next_id("workspace")
            row = {
                "id": workspace_id,
                "name": name,
                "description": body.description,
                "owner": owner,
                "repository_url": source.url if source else None,  # without credentials
                "compute": compute.name if compute else None,
                "idle_timeout": body.idle_timeout,
                "state": state.value,
                "reason": reason,
                "created_at": now,
                "updated_at": now,
                "state_changed_at": now,
            }
            self.store.insert("workspaces", row)
        finally:
            self._creating.discard(name)
        workspace = Workspace(self.store.get("workspaces", workspace_id) or row, self.root)
        self._workspaces[workspace.id] = workspace
        self._publish(workspace, state.value, reason or "Created.", old=None)
        log.info("workspace %s created in %s (%s)", name, folder, state.value)
        if body.start and state is WorkspaceState.IDLE:
            self.start(workspace.id, actor)
        return workspace

    def _check_running_budget(self) -> None:
        """429 when STUDIO_MAX_RUNNING_WORKSPACES JupyterLabs already run (or start)."""
        limit = self.settings.max_running_workspaces
        running = sorted(w.name for w in self._workspaces.values() if w.state.is_running)
        if len(running) >= limit:
            raise LimitReachedError(
                f"{len(running)} workspaces are running, the most this server allows (STUDIO_MAX_RUNNING_WORKSPACES="
                f"{limit}); stop one of them ({', '.join(running[:5])}{', ...' if len(running) > 5 else ''}) first."
            )

    def _check_quota(self, actor: Principal) -> None:
        """429 when ``actor`` already has as many running workspaces as its quota allows (the ones
        that run for it: started by it)."""
        in_use = sum(1 for w in self._workspaces.values() if w.state.is_running and w.started_by == actor.name)
        overrides = self.identity.quotas(actor.name) if self.identity is not None else None
        quotas.check(self.settings, actor.name, actor.role, "running_workspaces", in_use, overrides)

    def _check_name_free(self, name: str, ignore: Workspace | None = None) -> None:
        taken = name in self._creating or any(w.name == name and w is not ignore for w in self._workspaces.values())
        if taken:
            raise ConflictError(f"A workspace named '{name}' already exists.")

    def update(self, workspace_id: int | str, body: UpdateWorkspace, actor: Principal) -> Workspace:
        """Change the description, idle timeout or name (a rename moves the folder, so only while Idle);
        its owner or an admin."""
        workspace = self.get_to_manage(actor, workspace_id, "change")
        given = body.model_fields_set
        changes: dict[str, Any] = {}
        if "name" in given and body.name is not None and body.name != workspace.name:
            name = check_name(body.name)
            self._check_name_free(name, ignore=workspace)
            if workspace.state not in (WorkspaceState.IDLE, WorkspaceState.FAILED):
                raise ConflictError(
                    f"Workspace '{workspace.name}' is {workspace.state.value}; stop it before renaming it (its folder moves)."
                )
            folders.move_folder(workspace.folder, self.root / name)
            workspace.name = name
            changes["name"] = name
        if "description" in given and body.description is not None:
            workspace.description = body.description
            changes["description"] = body.description
        if "idle_timeout" in given:
            workspace.idle_timeout = body.idle_timeout
            changes["idle_timeout"] = body.idle_timeout
        if changes:
            workspace.updated_at = time.time()
            self._save(workspace, updated_at=workspace.updated_at, **changes)
        return workspace

    async def delete(
        self, workspace_id: int | str, actor: Principal, force: bool = False, remove_files: bool = False
    ) -> dict[str, Any]:
        """Delete a workspace's record (its owner or an admin); its notebook files are kept unless ``remove_files``.

        A running workspace is refused (409) unless ``force``, which stops it first.
        """
        workspace = self.get_to_manage(actor, workspace_id, "delete")
        if workspace.state is WorkspaceState.DELETING:
            raise ConflictError(f"Workspace '{workspace.name}' is already being deleted.")
        if workspace.state.is_running or workspace.state is WorkspaceState.STOPPING:
            if not force:
                raise ConflictError(
                    f"Workspace '{workspace.name}' is {workspace.state.value}; stop it first, or delete with force=true "
                    "to stop and delete it."
                )
            await self._stop_now_or_wait(workspace, "Stopped to be deleted.")
        if workspace.state not in TRANSITIONS[WorkspaceState.DELETING]:
            raise ConflictError(f"Workspace '{workspace.name}' is {workspace.state.value} and cannot be deleted now.")
        self._transition(workspace, WorkspaceState.DELETING, "Deleting" + (" with its files." if remove_files else "; its files are kept."))
        folder = workspace.folder
        try:
            if remove_files:
                await asyncio.to_thread(folders.remove_folder, self.root, folder)
            shutil.rmtree(self._state_dir(workspace), ignore_errors=True)
        except OSError as exc:
            self._transition(workspace, WorkspaceState.FAILED, f"Deleting its files failed: {exc}")
            raise StudioError(f"Deleting the files of workspace '{workspace.name}' failed: {exc}") from None
        self.store.delete("workspaces", workspace.id)
        del self._workspaces[workspace.id]
        self._publish(workspace, "Deleted", "Deleted" + (" with its files." if remove_files else "; its files are kept."))
        log.info("workspace %s deleted (%s)", workspace.name, "files removed" if remove_files else f"files kept in {folder}")
        return {
            "msg": "deleted",
            "id": workspace.id,
            "name": workspace.name,
            "folder": str(folder),
            "files": "removed" if remove_files else "kept",
        }

    def share(self, workspace_id: int | str, collaborators: object, actor: Principal) -> Workspace:
        """Set who besides its owner may use the workspace (its owner or an admin). Names must be
        users of the directory; the owner is not listed as its own collaborator. A workspace that
        runs for someone who may no longer use it is stopped: their browser holds its JupyterLab's
        token and their kernels a token of theirs, and both must end with their access."""
        workspace = self.get_to_manage(actor, workspace_id, "share")
        names = access.check_user_names(collaborators, "collaborators", self.identity)
        names = [name for name in names if name != workspace.owner]
        workspace.collaborators = names
        workspace.updated_at = time.time()
        self._save(workspace, collaborators=names, updated_at=workspace.updated_at)
        log.info("workspace %s: shared with %s by %s", workspace.name, ", ".join(names) or "nobody", actor.name)
        runs_for = workspace.started_by
        if (
            workspace.state.is_running
            and workspace.state is not WorkspaceState.STOPPING
            and runs_for is not None
            and runs_for not in (workspace.owner, *names)
            and not (self.identity is not None and self.identity.role(runs_for) == "admin")
        ):
            self._begin_stop(workspace, f"Stopped: it ran for {runs_for}, who is no longer one of its collaborators.")
        return workspace

    # -- start and stop ---------------------------------------------------------------------

    def start(self, workspace_id: int | str, actor: Principal) -> Workspace:
        """Idle or Failed -> Starting; JupyterLab is launched in the background and acts for ``actor``
        (its kernels get a token of ``actor``'s, revoked when it stops)."""
        workspace = self.get_for(actor, workspace_id)
        if workspace.state in (WorkspaceState.STARTING, WorkspaceState.STOPPING, WorkspaceState.DELETING):
            raise ConflictError(f"Workspace '{workspace.name}' is {workspace.state.value}; wait until it is done.")
        if workspace.state in (WorkspaceState.READY, WorkspaceState.ATTACHING, WorkspaceState.ATTACHED):
            raise ConflictError(f"Workspace '{workspace.name}' is already running ({workspace.state.value}).")
        if workspace.repository_url and not (workspace.folder / ".git").exists():
            raise ConflictError(
                f"Workspace '{workspace.name}' has no clone of {workspace.repository_url} (the clone failed); "
                "delete it and create it again."
            )
        self._check_running_budget()
        self._check_quota(actor)
        compute = self.computes.find(workspace.compute) if workspace.compute else None
        if compute is not None and not self._may_use(compute, actor.name):
            raise ForbiddenError(
                f"Workspace '{workspace.name}' is attached to compute '{compute.name}', which {actor.name} may not use; "
                "attach it to another compute first."
            )
        kernel_token = self._new_kernel_token(workspace, actor.name)
        self._transition(workspace, WorkspaceState.STARTING, None)
        workspace.started_by = actor.name
        self._save(workspace, started_by=actor.name)
        workspace.kernel_token_sha256 = digest(kernel_token)
        workspace.kernel_acts_for = actor.name if self.identity is not None else None
        # The process handle exists before the task runs, so a stop that comes at once has something to stop.
        workspace.lab = JupyterLabProcess(
            self.settings,
            workspace.folder,
            self._log_path(workspace),
            self._layout_dir(workspace),
            self._lab_env(workspace, kernel_token),
            idle_timeout=workspace.effective_idle_timeout(self.settings),
        )
        workspace.task = asyncio.create_task(self._run_start(workspace, workspace.lab), name=f"start-{workspace.name}")
        return workspace

    async def _run_start(self, workspace: Workspace, lab: JupyterLabProcess) -> None:
        try:
            workspace.folder.mkdir(parents=True, exist_ok=True)
            await lab.start()
            workspace.process_state = {
                **lab.state(),
                "kernel_token_sha256": workspace.kernel_token_sha256,
                "kernel_acts_for": workspace.kernel_acts_for,
            }
            self._save(workspace, process=workspace.process_state)
            await lab.wait_ready()
        except Exception as exc:  # noqa: BLE001 - whatever went wrong, the workspace must not stay Starting
            if workspace.state is WorkspaceState.STARTING:  # not a stop that interrupted the start
                message = exc.msg if isinstance(exc, StudioError) else f"{type(exc).__name__}: {exc}"
                if not isinstance(exc, StudioError):
                    log.exception("starting workspace %s failed", workspace.name)
                await lab.kill()
                workspace.lab = None
                workspace.process_state = None
                self._save(workspace, process=None)
                self._transition(workspace, WorkspaceState.FAILED, f"JupyterLab did not start: {message}")
            return
        if workspace.state is not WorkspaceState.STARTING:
            return  # stopped in the moment it became ready; the stop takes care of the process
        workspace.last_activity = time.time()
        self._save(workspace, last_activity=workspace.last_activity)
        self._watch(workspace)
        log.info("workspace %s: JupyterLab ready on port %s (pid %s)", workspace.name, lab.port, lab.pid)
        compute = self.computes.find(workspace.compute) if workspace.compute else None
        if compute is None:
            if workspace.compute:  # its compute was removed meanwhile
                workspace.compute = None
                self._save(workspace, compute=None)
            self._transition(workspace, WorkspaceState.READY, None)
            return
        self._transition(workspace, WorkspaceState.ATTACHING, f"Attaching to compute '{compute.name}'.")
        try:
            await self.computes.check(compute)
        except ComputeUnreachableError as exc:
            if workspace.state is WorkspaceState.ATTACHING:
                self._transition(workspace, WorkspaceState.READY, f"Not attached: {exc.msg} Attach it again when it answers.")
            return
        if workspace.state is WorkspaceState.ATTACHING:
            self._transition(workspace, WorkspaceState.ATTACHED, None)

    def stop(self, workspace_id: int | str, actor: Principal) -> Workspace:
        """Running -> Stopping -> Idle in the background; a Failed workspace becomes Idle at once."""
        workspace = self.get_for(actor, workspace_id)
        if workspace.state is WorkspaceState.FAILED:
            self._transition(workspace, WorkspaceState.IDLE, f"Stopped after it failed: {workspace.reason}")
            return workspace
        if workspace.state is WorkspaceState.IDLE:
            raise ConflictError(f"Workspace '{workspace.name}' is already stopped (Idle).")
        if workspace.state in (WorkspaceState.STOPPING, WorkspaceState.DELETING):
            raise ConflictError(f"Workspace '{workspace.name}' is already {workspace.state.value}.")
        by = "" if actor.name == workspace.started_by else f" by {actor.name}"
        self._begin_stop(workspace, f"Stopped on request{by}.")
        return workspace

    def _begin_stop(self, workspace: Workspace, reason: str) -> None:
        self._transition(workspace, WorkspaceState.STOPPING, reason)
        previous = workspace.task
        workspace.task = asyncio.create_task(self._run_stop(workspace, reason, previous), name=f"stop-{workspace.name}")

    async def _run_stop(self, workspace: Workspace, reason: str, previous: asyncio.Task[None] | None) -> None:
        lab = workspace.lab
        try:
            if lab is not None:
                step = await lab.stop()
                log.info("workspace %s: JupyterLab stopped (%s)", workspace.name, step.value)
            if previous is not None:  # a start under way ends as soon as its JupyterLab is stopped
                await asyncio.gather(previous, return_exceptions=True)
        finally:
            if workspace.watcher is not None:
                workspace.watcher.cancel()
                workspace.watcher = None
            workspace.lab = None
            workspace.process_state = None
            self._save(workspace, process=None)
            if workspace.state is WorkspaceState.STOPPING:
                self._transition(workspace, WorkspaceState.IDLE, reason)

    def _watch(self, workspace: Workspace) -> None:
        """Notice a JupyterLab that exits on its own (crash, OOM kill) and say so: Failed with the reason."""
        lab = workspace.lab
        assert lab is not None

        async def watch() -> None:
            code = await lab.wait_exit()
            if workspace.lab is lab and workspace.state in RUNNING_STATES:
                workspace.lab = None
                workspace.process_state = None
                self._save(workspace, process=None)
                await lab.stop(now=True)  # its kernels, if any survived it
                idle_for = self_shutdown(lab.log_path) if code == 0 else None
                if idle_for is not None:  # its own idle limit, set when it started (a later change of the timeout)
                    reason = f"JupyterLab stopped itself after {idle_for} s without activity (its idle timeout when it started)."
                    self._transition(workspace, WorkspaceState.STOPPING, reason)
                    self._transition(workspace, WorkspaceState.IDLE, reason)
                    return
                self._transition(
                    workspace,
                    WorkspaceState.FAILED,
                    f"JupyterLab {describe_exit(code)} unexpectedly; see its log ({lab.log_path}). Start it again.",
                )

        workspace.watcher = asyncio.create_task(watch(), name=f"watch-{workspace.name}")

    # -- computes ---------------------------------------------------------------------------

    async def attach(self, workspace_id: int | str, compute_name: str, actor: Principal) -> Workspace:
        """Point the workspace's PySpark kernels at a compute (after checking that it answers); the
        compute must be one ``actor`` may use, and the one the workspace runs for."""
        workspace = self.get_for(actor, workspace_id)
        compute = self.computes.get_for(actor, compute_name)
        runs_for = workspace.started_by if workspace.state.is_running else None
        if runs_for and runs_for != actor.name and not self._may_use(compute, runs_for):
            raise ForbiddenError(
                f"Workspace '{workspace.name}' runs for {runs_for}, who may not use compute '{compute.name}'."
            )
        state = workspace.state
        if state in (WorkspaceState.STARTING, WorkspaceState.ATTACHING, WorkspaceState.STOPPING, WorkspaceState.DELETING):
            raise ConflictError(f"Workspace '{workspace.name}' is {state.value}; attach it when that is done.")
        if state in (WorkspaceState.IDLE, WorkspaceState.FAILED):
            # Recorded now and attached for real when it starts.
            await self.computes.check(compute)
            self._set_compute(workspace, compute)
            return workspace
        self._transition(workspace, WorkspaceState.ATTACHING, f"Attaching to compute '{compute.name}'.")
        try:
            await self.computes.check(compute)
        except ComputeUnreachableError as exc:
            if workspace.state is WorkspaceState.ATTACHING:
                if state is WorkspaceState.ATTACHED:
                    self._transition(workspace, state, f"Still attached to '{workspace.compute}': attaching to '{compute.name}' failed.")
                else:
                    self._transition(workspace, state, f"Attaching to '{compute.name}' failed: {exc.msg}")
            raise
        if workspace.state is not WorkspaceState.ATTACHING:  # stopped meanwhile
            raise ConflictError(f"Workspace '{workspace.name}' was {workspace.state.value} before it was attached.")
        self._set_compute(workspace, compute)
        self._transition(workspace, WorkspaceState.ATTACHED, None)
        return workspace

    def detach(self, workspace_id: int | str, actor: Principal) -> Workspace:
        workspace = self.get_for(actor, workspace_id)
        if workspace.compute is None:
            raise ConflictError(f"Workspace '{workspace.name}' is not attached to a compute.")
        if workspace.state in (WorkspaceState.STARTING, WorkspaceState.ATTACHING, WorkspaceState.STOPPING, WorkspaceState.DELETING):
            raise ConflictError(f"Workspace '{workspace.name}' is {workspace.state.value}; detach it when that is done.")
        detached_from = workspace.compute
        workspace.compute = None
        self._save(workspace, compute=None)
        if workspace.state is WorkspaceState.ATTACHED:
            self._transition(workspace, WorkspaceState.READY, f"Detached from compute '{detached_from}'.")
        return workspace

    def _set_compute(self, workspace: Workspace, compute: Compute) -> None:
        workspace.compute = compute.name
        self._save(workspace, compute=compute.name)

    def _forget_missing_compute(self, workspace: Workspace) -> None:
        """At startup: a compute removed meanwhile is no longer attached."""
        if workspace.compute is not None and self.computes.find(workspace.compute) is None:
            workspace.compute = None
            self._save(workspace, compute=None)

    def lab_url(self, workspace_id: int | str, actor: Principal) -> str:
        """The workspace's JupyterLab address with its token (for a redirect; never listed), for
        the person it runs for only: its token is a key to act as that person."""
        workspace = self.get_for(actor, workspace_id)
        if workspace.state not in OPEN_STATES or workspace.lab is None:
            raise ConflictError(f"Workspace '{workspace.name}' is {workspace.state.value}; start it to open JupyterLab.")
        runs_for = workspace.started_by or workspace.owner
        if runs_for != actor.name:
            raise ConflictError(
                f"Workspace '{workspace.name}' is running for {runs_for}: its JupyterLab and kernels act for {runs_for}, "
                f"so only {runs_for} can open it. Ask {runs_for} to stop it, then start it yourself."
            )
        return workspace.lab.lab_url

    def workspace_for_kernel(self, secret: str) -> int | None:
        """The running workspace whose kernels hold this secret (STUDIO_KERNEL_TOKEN), or None."""
        wanted = digest(secret)
        for workspace in self._workspaces.values():
            known = workspace.kernel_token_sha256
            if known and workspace.state.is_running and hmac.compare_digest(known, wanted):
                return workspace.id
        return None

    def connection(self, workspace_id: int | str, secret: str | None) -> dict[str, Any]:
        """Where the workspace's kernels send their cells, with the credentials to send; only for the
        kernels of this running workspace (``secret``: the STUDIO_KERNEL_TOKEN they were given).

        For the studio's own compute the kernels send their own token, which acts for the person the
        workspace runs for (never the studio's token); another compute gets its stored credentials,
        if that person may use it."""
        workspace = self.get(workspace_id)
        known = workspace.kernel_token_sha256
        if not (secret and known and workspace.state.is_running and hmac.compare_digest(known, digest(secret))):
            raise ForbiddenError(
                f"Only the kernels of workspace {workspace.id} while it runs may ask for its connection."
            )
        compute = self.computes.find(workspace.compute) if workspace.compute else None
        if compute is None:
            raise ConflictError(
                f"Workspace '{workspace.name}' is not attached to a compute; attach one in the Studio, then run the "
                "cell again."
            )
        runs_for = workspace.started_by or workspace.owner or ADMIN
        if not self._may_use(compute, runs_for):
            raise ForbiddenError(
                f"Workspace '{workspace.name}' runs for {runs_for}, who may not use compute '{compute.name}'; attach "
                "another compute."
            )
        if not self.computes.sends_own_token(compute):
            user, token = self.computes.credentials(compute)
            return {"compute": compute.name, "livy_url": compute.url, "user": user, "token": token}
        if self.identity is None:  # no users' directory: one administrator, as before
            user, token = self.computes.credentials(compute)
        elif workspace.kernel_acts_for:
            user, token = None, secret
        else:
            raise ConflictError(
                f"Workspace '{workspace.name}' was started by an older version of Spark Studio, whose kernels cannot act "
                "for a person; stop it and start it again."
            )
        return {"compute": compute.name, "livy_url": compute.url, "user": user, "token": token}

    def _may_use(self, compute: Compute, user: str) -> bool:
        return self.computes.allows(compute, user, self._is_admin(user))

    def _is_admin(self, user: str) -> bool:
        if user == ADMIN:
            return True
        return self.identity is not None and self.identity.role(user) == "admin"

    def _new_kernel_token(self, workspace: Workspace, user: str) -> str:
        """The secret a starting workspace's kernels get: a `kernel` token of ``user`` (scope
        ``workspace:<id>``) when there is a users' directory, else a random one (its hash only is kept)."""
        if self.identity is None:
            return secrets.token_urlsafe(32)
        scope = access.kernel_scope(workspace.id)
        self.identity.revoke("kernel", scope)  # one left by a server that died before it could
        return self.identity.token_for(user, "kernel", scope, f"kernels of workspace {workspace.name}")

    def _release(self, workspace: Workspace) -> None:
        """The workspace stopped, failed or was found dead: its kernels' token is revoked (refused at once
        by both servers) and it runs for nobody."""
        if self.identity is not None:
            try:
                revoked = self.identity.revoke("kernel", access.kernel_scope(workspace.id))
            except Exception:  # noqa: BLE001 - a stop must finish; the token is revoked at the next start
                log.exception("workspace %s: revoking its kernels' token failed", workspace.name)
            else:
                if revoked:
                    log.info("workspace %s: its kernels' token (acting for %s) is revoked", workspace.name, workspace.started_by)
        workspace.kernel_token_sha256 = workspace.kernel_acts_for = None
        if workspace.started_by is not None:
            workspace.started_by = None
            self._save(workspace, started_by=None)

    # -- idle culling -----------------------------------------------------------------------

    async def _cull_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.workspace_cull_interval)
            try:
                await self.cull()
            except Exception:  # noqa: BLE001 - the culler must survive anything
                log.exception("culling workspaces failed")

    async def cull(self) -> None:
        """Stop every running workspace that has been idle longer than its idle timeout, saying why."""
        for workspace in list(self._workspaces.values()):
            if workspace.state not in OPEN_STATES or workspace.lab is None:
                continue
            try:
                await self._cull_if_idle(workspace)
            except Exception:  # noqa: BLE001 - one workspace must not stop the others' culling
                log.exception("culling workspace %s failed", workspace.name)

    async def _cull_if_idle(self, workspace: Workspace) -> None:
        lab = workspace.lab
        assert lab is not None
        try:
            last_activity, busy = await lab.last_activity()
        except StudioError:
            return  # not answering right now; the watcher notices if it died
        if busy:
            last_activity = time.time()  # a long Spark job with no output is not idleness
        if last_activity != workspace.last_activity:
            workspace.last_activity = last_activity
            self._save(workspace, last_activity=last_activity)
        timeout = workspace.effective_idle_timeout(self.settings)
        idle_for = time.time() - last_activity
        is_enabled, is_idle_long_enough = timeout > 0, idle_for > timeout
        if is_enabled and is_idle_long_enough and workspace.state in OPEN_STATES:
            log.info("stopping workspace %s after %.0f s without activity (idle timeout %g s)", workspace.name, idle_for, timeout)
            self._begin_stop(workspace, f"Stopped after {timeout:g} s without activity (idle timeout).")

    # -- plumbing ---------------------------------------------------------------------------

    def _transition(self, workspace: Workspace, state: WorkspaceState, reason: str | None) -> None:
        allowed = TRANSITIONS.get(state, frozenset())
        if workspace.state not in allowed:
            raise ConflictError(
                f"Workspace '{workspace.name}' cannot go from {workspace.state.value} to {state.value}."
            )
        log.info("workspace %s: %s -> %s%s", workspace.name, workspace.state.value, state.value, f" ({reason})" if reason else "")
        self._publish(workspace, state.value, reason)
        workspace.state = state
        workspace.reason = reason
        workspace.state_changed_at = time.time()
        self._save(workspace, state=state.value, reason=reason, state_changed_at=workspace.state_changed_at)
        if state in (WorkspaceState.IDLE, WorkspaceState.FAILED):
            self._release(workspace)

    def _save(self, workspace: Workspace, **fields: Any) -> None:
        self.store.update("workspaces", workspace.id, **fields)

    def _publish(self, workspace: Workspace, new: str, reason: str | None, old: str | None = "") -> None:
        """The event of a state change (``old`` "": its current state; None: it is new)."""
        if self.events is not None:
            was = workspace.state.value if old == "" else old
            self.events.publish(Event("workspace", str(workspace.id), new, was, reason or "", name=workspace.name, owner=workspace.owner))

    def _state_dir(self, workspace: Workspace) -> Path:
        return self.settings.state_dir / "workspaces" / str(workspace.id)

    def _log_path(self, workspace: Workspace) -> Path:
        return self._state_dir(workspace) / "jupyterlab.log"

    def _layout_dir(self, workspace: Workspace) -> Path:
        return self._state_dir(workspace) / "lab-layout"

    def _lab_env(self, workspace: Workspace, kernel_token: str) -> dict[str, str]:
        """How the workspace's kernels reach this server; our kernelspec and lab defaults first on Jupyter's paths.

        The studio's own secrets are not passed on: a JupyterLab runs the user's code."""

        def first(directory: Path, variable: str) -> str:
            return os.pathsep.join([str(directory), *filter(None, os.environ.get(variable, "").split(os.pathsep))])

        return {
            "STUDIO_SERVER_URL": self.server_url,
            # Read first: a restarted server may listen elsewhere, and kernels outlive it.
            "STUDIO_SERVER_FILE": str(self.settings.state_dir / SERVER_FILE),
            "STUDIO_WORKSPACE_ID": str(workspace.id),
            "STUDIO_KERNEL_TOKEN": kernel_token,
            "JUPYTER_PATH": first(self.jupyter_dir, "JUPYTER_PATH"),
            "JUPYTER_CONFIG_PATH": first(self.jupyter_config_dir, "JUPYTER_CONFIG_PATH"),
        }

    def log_text(self, workspace_id: int | str, actor: Principal, max_bytes: int = 64 * 1024) -> str:
        """The end of the workspace's JupyterLab log."""
        path = self._log_path(self.get_for(actor, workspace_id))
        try:
            with open(path, "rb") as handle:
                handle.seek(0, os.SEEK_END)
                size = handle.tell()
                handle.seek(max(0, size - max_bytes))
                return handle.read().decode(errors="replace")
        except FileNotFoundError:
            return ""


def counts_by_state(workspaces: Iterable[Workspace]) -> dict[str, int]:
    counts = {state.value: 0 for state in WorkspaceState}
    for workspace in workspaces:
        counts[workspace.state.value] += 1
    return counts
