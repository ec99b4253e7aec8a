"""Quotas per user: how many live sessions, running workspaces and concurrent executions a user
may have. Each role has a default (``STUDIO_USER_MAX_*``, ``STUDIO_ADMIN_MAX_*``; empty means no
limit); a user's own quota, kept in the users' directory, overrides the role's. A request over its
quota gets 429 with what is in use and the limit, and nothing is started.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from studio.errors import QuotaExceededError

if TYPE_CHECKING:
    from studio.config import Settings

QUOTAS = {
    "sessions": "live Spark sessions and batches",
    "running_workspaces": "running workspaces",
    "executions": "queued or running notebook executions",
}


def limit(settings: "Settings", role: str, key: str, overrides: Mapping[str, int | None] | None = None) -> int | None:
    """The limit of ``key`` for a user of ``role`` with these overrides; None: no limit."""
    if key not in QUOTAS:
        raise ValueError(f"unknown quota {key!r}; known: {', '.join(QUOTAS)}")
    if overrides and key in overrides:
        return overrides[key]
    prefix = "admin" if role == "admin" else "user"
    value: int | None = getattr(settings, f"{prefix}_max_{key}")
    return value


def check(
    settings: "Settings",
    user: str,
    role: str,
    key: str,
    in_use: int,
    overrides: Mapping[str, int | None] | None = None,
) -> None:
    """Raise QuotaExceededError (429) when one more of ``key`` would pass the user's limit."""
    allowed = limit(settings, role, key, overrides)
    if allowed is not None and in_use >= allowed:
        raise QuotaExceededError(
            f"Quota reached: {user} has {in_use} {QUOTAS[key]} and may have {allowed}. "
            "Stop one first, or ask an administrator for a larger quota."
        )
