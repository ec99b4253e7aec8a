"""Livy's wire models: request bodies with Livy's field names verbatim, states and their
allowed transitions, and time strings.

Parsing is strict like Livy's (an unknown field is a 400 naming the known ones) but lax where
Livy is lax: numeric strings for integer fields, numbers and booleans as ``conf`` values.
"""

from __future__ import annotations

import enum
import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from studio.errors import InvalidRequestError
from studio.web import parse_body  # noqa: F401 - shared by both servers; still importable from here


class SessionState(str, enum.Enum):
    NOT_STARTED = "not_started"
    STARTING = "starting"
    RECOVERING = "recovering"
    IDLE = "idle"
    RUNNING = "running"
    BUSY = "busy"
    SHUTTING_DOWN = "shutting_down"
    ERROR = "error"
    DEAD = "dead"
    KILLED = "killed"
    SUCCESS = "success"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({SessionState.ERROR, SessionState.DEAD, SessionState.KILLED, SessionState.SUCCESS})

_LIVE = frozenset({SessionState.STARTING, SessionState.IDLE, SessionState.BUSY})

# state -> the states it may be entered from (Livy's StatementState predecessor style).
SESSION_TRANSITIONS: dict[SessionState, frozenset[SessionState]] = {
    SessionState.IDLE: frozenset({SessionState.STARTING, SessionState.BUSY}),
    SessionState.BUSY: frozenset({SessionState.IDLE}),
    SessionState.SHUTTING_DOWN: _LIVE,
    SessionState.DEAD: _LIVE | {SessionState.SHUTTING_DOWN},
    SessionState.KILLED: _LIVE | {SessionState.SHUTTING_DOWN},
    SessionState.ERROR: _LIVE,
}

# Batches: starting -> running -> success | dead | killed.
BATCH_TRANSITIONS: dict[SessionState, frozenset[SessionState]] = {
    SessionState.RUNNING: frozenset({SessionState.STARTING}),
    SessionState.SUCCESS: frozenset({SessionState.STARTING, SessionState.RUNNING}),
    SessionState.DEAD: frozenset({SessionState.STARTING, SessionState.RUNNING}),
    SessionState.KILLED: frozenset({SessionState.STARTING, SessionState.RUNNING}),
}


class StatementState(str, enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    AVAILABLE = "available"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in (StatementState.AVAILABLE, StatementState.CANCELLED)


STATEMENT_TRANSITIONS: dict[StatementState, frozenset[StatementState]] = {
    StatementState.RUNNING: frozenset({StatementState.WAITING}),
    StatementState.AVAILABLE: frozenset({StatementState.RUNNING}),
    StatementState.CANCELLING: frozenset({StatementState.RUNNING}),
    StatementState.CANCELLED: frozenset({StatementState.WAITING, StatementState.CANCELLING}),
}


def view(items: list[Any], start: int, size: int) -> list[Any]:
    """Livy's list paging, Scala's ``items.view(from, from + size)``: a negative ``from`` reads
    from the start but still ends at ``from + size``; a size that ends before the start (a
    negative one) gives nothing."""
    first = max(0, start)
    return items[first : start + size] if start + size > first else []


def check_transition(table: dict[Any, frozenset[Any]], current: Any, new: Any, what: str) -> None:
    """Refuse a state change the table does not allow (a bug, never the client's fault)."""
    if current not in table.get(new, frozenset()):
        raise RuntimeError(f"{what}: illegal state change {current.value} -> {new.value}")


class SessionKind(str, enum.Enum):
    PYSPARK = "pyspark"
    SQL = "sql"
    SHARED = "shared"


# Kinds Livy knows that this server does not run, with their aliases.
UNSUPPORTED_KINDS = {"spark", "scala", "sparkr", "r", "pyspark3"}
KIND_ALIASES = {"python": "pyspark"}


def parse_kind(value: Any, *, statement: bool) -> SessionKind | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequestError(f"Field \"kind\" must be a string, got {json.dumps(value)}.")
    name = KIND_ALIASES.get(value.lower(), value.lower())
    if name in UNSUPPORTED_KINDS:
        raise InvalidRequestError(
            f"Kind '{value}' is not supported: this server runs pyspark and sql code "
            f"(session kinds pyspark, sql and shared)."
        )
    try:
        kind = SessionKind(name)
    except ValueError:
        raise InvalidRequestError(
            f"Invalid kind '{value}': expected one of pyspark, sql{'' if statement else ', shared'}."
        ) from None
    if statement and kind is SessionKind.SHARED:
        raise InvalidRequestError("Invalid statement kind 'shared': expected pyspark or sql.")
    return kind


_TIME = re.compile(r"^\s*(\d+)\s*(us|ms|s|m|min|h|d)?\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: str | None, field: str) -> float | None:
    """Livy's time strings (``\\d+(us|ms|s|m|min|h|d)?``; a bare number is milliseconds) in seconds."""
    if value is None:
        return None
    match = _TIME.match(str(value))
    if not match:
        raise InvalidRequestError(
            f"Rejected, Reason: invalid {field} '{value}': use a number with a unit, e.g. 30s, 10m, 2h."
        )
    number, unit = match.groups()
    return int(number) * _UNIT_SECONDS[(unit or "ms").lower()]


# JVM memory sizes as Spark parses them (JavaUtils.byteStringAs): whole numbers, an optional unit;
# a bare number is bytes. Checked here so a typo is a 400 instead of a driver that never starts.
_MEMORY = re.compile(r"^\s*\d+(b|k|kb|m|mb|g|gb|t|tb|p|pb)?\s*$", re.IGNORECASE)


def check_memory(value: str | None, field: str) -> None:
    if value is not None and not _MEMORY.match(value):
        raise InvalidRequestError(
            f"Rejected, Reason: invalid {field} '{value}': use a whole number with a unit, e.g. 512m, 2g."
        )


def _conf_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    raise ValueError("conf values must be strings, numbers or booleans")


class _LivyBody(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("conf", mode="before", check_fields=False)
    @classmethod
    def _conf_strings(cls, value: Any) -> Any:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError("conf must be an object of string values")
        return {str(k): _conf_value(v) for k, v in value.items()}


class _SparkSettings(_LivyBody):
    """Settings shared by sessions and batches; they become Spark conf."""

    proxyUser: str | None = None
    jars: list[str] = Field(default_factory=list)
    pyFiles: list[str] = Field(default_factory=list)
    files: list[str] = Field(default_factory=list)
    archives: list[str] = Field(default_factory=list)
    driverMemory: str | None = None
    driverCores: int | None = None
    executorMemory: str | None = None
    executorCores: int | None = None
    numExecutors: int | None = None
    queue: str | None = None
    name: str | None = None
    conf: dict[str, str] = Field(default_factory=dict)

    @field_validator("jars", "pyFiles", "files", "archives", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return [] if value is None else value


class CreateSession(_SparkSettings):
    kind: str | None = None
    heartbeatTimeoutInSecond: int = 0
    ttl: str | None = None
    idleTimeout: str | None = None


class CreateStatement(_LivyBody):
    code: str
    kind: str | None = None


class CompletionRequest(_LivyBody):
    code: str
    kind: str | None = None
    cursor: int | None = None


class InspectRequest(_LivyBody):
    """An extension of Livy's API: what Jupyter's shift-Tab shows for the name at ``cursor``."""

    code: str
    cursor: int | None = None
    detail_level: int = 0


class CreateBatch(_SparkSettings):
    file: str
    className: str | None = None
    args: list[str] = Field(default_factory=list)

    @field_validator("args", mode="before")
    @classmethod
    def _args(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, list):
            if not all(isinstance(v, (str, int, float, bool)) for v in value):
                raise ValueError("args must be a list of strings (numbers and booleans are turned into strings)")
            return [_conf_value(v) for v in value]
        return value
