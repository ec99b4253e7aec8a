"""Workspace states with their allowed transitions, names, and the request bodies of the API.

The states are EMR Studio's (``Starting``, ``Ready``, ``Attaching``, ``Attached``, ``Idle``,
``Stopping``, ``Deleting``) plus ``Failed``, which EMR lacks and which says what went wrong
instead of leaving a workspace silently ``Idle``.
"""

from __future__ import annotations

import enum
import re
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from studio.errors import InvalidRequestError, NotFoundError


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


class CreateCompute(_Body):
    name: str
    url: str
    # Credentials for a Livy that wants them: a token (Bearer, or the Basic password with `username`),
    # or a user name and password for HTTP Basic. Kept on the server; never shown again.
    token: str | None = Field(None, max_length=4096)
    username: str | None = Field(None, max_length=256)
    password: str | None = Field(None, max_length=4096)
