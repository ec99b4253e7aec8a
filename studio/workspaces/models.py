"""Workspace and execution states with their allowed transitions, names, and the request bodies
of the API.

Workspace states are EMR Studio's (``Starting``, ``Ready``, ``Attaching``, ``Attached``, ``Idle``,
``Stopping``, ``Deleting``) plus ``Failed``, which EMR lacks and which says what went wrong
instead of leaving a workspace silently ``Idle``. Execution statuses are EMR's notebook execution
statuses. Every change of either is checked against its table (``TRANSITIONS``,
``EXECUTION_TRANSITIONS``), as the session service checks Livy's.
"""

from __future__ import annotations

import enum
import re
from urllib.parse import urlsplit

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from studio.errors import InvalidRequestError, NotFoundError, StudioError


class WorkspaceState(str, enum.Enum):
    IDLE = "Idle"  # stopped (EMR's word): a record and a folder of notebooks, no process
    STARTING = "Starting"  # JupyterLab is starting; cannot be opened yet
    READY = "Ready"  # JupyterLab answers; no compute attached
    ATTACHING = "Attaching"  # checking a compute and pointing the workspace's kernels at it
    ATTACHED = "Attached"  # JupyterLab answers and its PySpark kernels use the attached compute
    STOPPING = "Stopping"  # JupyterLab and its kernels are being shut down
    DELETING = "Deleting"  # the record (and, if asked, the files) are being removed
    FAILED = "Failed"  # a start, a clone or a running JupyterLab failed; ``reason`` says how

    @property
    def is_running(self) -> bool:
        """JupyterLab runs (or is being started or attached)."""
        return self in RUNNING_STATES


RUNNING_STATES = frozenset({WorkspaceState.STARTING, WorkspaceState.READY, WorkspaceState.ATTACHING, WorkspaceState.ATTACHED})
OPEN_STATES = frozenset({WorkspaceState.READY, WorkspaceState.ATTACHED})  # JupyterLab can be opened

# state -> the states it may be entered from; every transition is checked against this table.
TRANSITIONS: dict[WorkspaceState, frozenset[WorkspaceState]] = {
    WorkspaceState.STARTING: frozenset({WorkspaceState.IDLE, WorkspaceState.FAILED}),
    # from Attaching when a compute does not answer, from Attached on detach
    WorkspaceState.READY: frozenset({WorkspaceState.STARTING, WorkspaceState.ATTACHING, WorkspaceState.ATTACHED}),
    # Starting -> Attaching when the workspace was attached before it started
    WorkspaceState.ATTACHING: frozenset({WorkspaceState.STARTING, WorkspaceState.READY, WorkspaceState.ATTACHED}),
    WorkspaceState.ATTACHED: frozenset({WorkspaceState.ATTACHING}),
    WorkspaceState.STOPPING: RUNNING_STATES,
    # Failed -> Idle: a stop acknowledges the failure
    WorkspaceState.IDLE: frozenset({WorkspaceState.STOPPING, WorkspaceState.FAILED}),
    WorkspaceState.DELETING: frozenset({WorkspaceState.IDLE, WorkspaceState.FAILED}),
    WorkspaceState.FAILED: RUNNING_STATES | {WorkspaceState.STOPPING},
}


class ExecutionStatus(str, enum.Enum):
    START_PENDING = "START_PENDING"  # queued for a free slot (again, after a restart lost its run before a cell)
    STARTING = "STARTING"  # `studio run` and its kernel are starting
    RUNNING = "RUNNING"  # the kernel runs the notebook's cells
    FINISHING = "FINISHING"  # the last cell is done: output, HTML, session cleanup
    FINISHED = "FINISHED"
    FAILING = "FAILING"  # a cell failed: output and cleanup
    FAILED = "FAILED"
    STOP_PENDING = "STOP_PENDING"  # stop asked; waiting until the run handles signals
    STOPPING = "STOPPING"  # SIGINT: the running cell is cancelled, the output written, the session deleted
    STOPPED = "STOPPED"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset({ExecutionStatus.FINISHED, ExecutionStatus.FAILED, ExecutionStatus.STOPPED})
STOP_STATUSES = frozenset({ExecutionStatus.STOP_PENDING, ExecutionStatus.STOPPING})
_RUN_STATUSES = frozenset({ExecutionStatus.STARTING, ExecutionStatus.RUNNING, ExecutionStatus.FINISHING, ExecutionStatus.FAILING})

# status -> the statuses it may be entered from; every change is checked against this table.
EXECUTION_TRANSITIONS: dict[ExecutionStatus, frozenset[ExecutionStatus]] = {
    # queued again: a restarted server found the run gone before it had run a cell
    ExecutionStatus.START_PENDING: frozenset({ExecutionStatus.STARTING, ExecutionStatus.RUNNING}),
    ExecutionStatus.STARTING: frozenset({ExecutionStatus.START_PENDING}),
    ExecutionStatus.RUNNING: frozenset({ExecutionStatus.STARTING}),
    ExecutionStatus.FINISHING: frozenset({ExecutionStatus.RUNNING}),
    ExecutionStatus.FAILING: frozenset({ExecutionStatus.RUNNING, ExecutionStatus.FINISHING}),
    # exit code 0 also from STARTING/RUNNING: a notebook without code cells, or a run followed from its record
    ExecutionStatus.FINISHED: frozenset({ExecutionStatus.STARTING, ExecutionStatus.RUNNING, ExecutionStatus.FINISHING}),
    # from START_PENDING: its compute was removed, or `studio run` could not be started
    ExecutionStatus.FAILED: _RUN_STATUSES | {ExecutionStatus.START_PENDING},
    ExecutionStatus.STOP_PENDING: _RUN_STATUSES,
    ExecutionStatus.STOPPING: frozenset({ExecutionStatus.STOP_PENDING}),
    # from a run status: interrupted from outside the Studio, or lost with a stopping server
    ExecutionStatus.STOPPED: _RUN_STATUSES | STOP_STATUSES | {ExecutionStatus.START_PENDING},
}


def check_execution_transition(execution_id: int, current: ExecutionStatus, new: ExecutionStatus) -> None:
    """Refuse a status change the table does not allow (a bug in the server, never the client's fault)."""
    if current not in EXECUTION_TRANSITIONS.get(new, frozenset()):
        raise StudioError(f"Execution {execution_id} cannot go from {current.value} to {new.value}.")


MAX_NAME_LENGTH = 64
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def check_name(name: object, what: str = "Workspace") -> str:
    """A workspace or compute name, or InvalidRequestError saying what is wrong with it.

    A workspace's name is also its folder under the root, so it must stay one plain path
    component: letters, digits, ``-``, ``_`` and ``.`` (not first, so no ``..`` or hidden
    folders), at most 64 characters.
    """
    if not isinstance(name, str) or not name:
        raise InvalidRequestError(f"{what} name is empty; use letters, digits, '-', '_' and '.'.")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidRequestError(f"{what} name '{name[:70]}' is longer than {MAX_NAME_LENGTH} characters.")
    if "/" in name or "\\" in name:
        raise InvalidRequestError(f"{what} name '{name}' contains a slash; a name is one folder, not a path.")
    if name.startswith("."):
        raise InvalidRequestError(f"{what} name '{name}' starts with '.'; names may not be hidden or relative paths.")
    if not _NAME.fullmatch(name):
        raise InvalidRequestError(f"{what} name '{name}' may contain only letters, digits, '-', '_' and '.'.")
    return name


def record_id(value: int | str, what: str) -> int:
    """The integer id in a URL, or NotFoundError (no such record can exist) naming what was asked for."""
    try:
        return int(value)
    except (TypeError, ValueError):
        raise NotFoundError(f"{what} '{value}' not found; {what.lower()} ids are integers.") from None


def check_livy_url(url: object) -> str:
    """An http(s) URL without query or fragment, trailing slash removed."""
    if not isinstance(url, str) or not url.strip():
        raise InvalidRequestError("Compute URL is empty; give the Livy endpoint, e.g. http://127.0.0.1:8998.")
    url = url.strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequestError(f"Compute URL '{url}' is not an http:// or https:// URL with a host.")
    if parts.query or parts.fragment:
        raise InvalidRequestError(f"Compute URL '{url}' must not have a query or fragment.")
    try:
        parts.port
    except ValueError:
        raise InvalidRequestError(f"Compute URL '{url}' has an invalid port.") from None
    return url.rstrip("/")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateWorkspace(_Body):
    name: str
    description: str = Field("", max_length=2000)
    repository_url: str | None = Field(None, max_length=2000)
    compute: str | None = None
    idle_timeout: float | None = Field(None, ge=0)
    start: bool = False


class UpdateWorkspace(_Body):
    name: str | None = None
    description: str | None = Field(None, max_length=2000)
    idle_timeout: float | None = Field(None, ge=0)


class AttachCompute(_Body):
    compute: str


class SetCollaborators(_Body):
    collaborators: list[Any] = Field(max_length=100, description="User names who may use the workspace besides its owner.")


class StartExecution(_Body):
    workspace: int | str = Field(description="The workspace's id or name.")
    notebook: str = Field(max_length=4096, description="Path of the notebook inside the workspace's folder.")
    parameters: dict[str, Any] = Field(default_factory=dict)
    compute: str | None = Field(None, description="Compute to run on; default the workspace's, else 'local'.")
    name: str | None = Field(None, max_length=256)
    kernel: str = Field("pyspark", min_length=1, max_length=128)
    cell_timeout: float | None = Field(None, gt=0)


class CreateCompute(_Body):
    name: str
    url: str
    # Credentials for a Livy that wants them: a token (Bearer, or the Basic password with `username`),
    # or a user name and password for HTTP Basic. Kept on the server; never shown again.
    token: str | None = Field(None, max_length=4096)
    username: str | None = Field(None, max_length=256)
    password: str | None = Field(None, max_length=4096)
    # Who may use it besides admins (user names); empty: everyone.
    allowed_users: list[Any] = Field(default_factory=list, max_length=100)


class SetAllowedUsers(_Body):
    allowed_users: list[Any] = Field(max_length=100, description="User names who may use the compute; empty: everyone.")
