"""Who may see and change the session service's sessions and batches, and as whom they run:
Livy's access control (``livy.server.access-control.*``) and impersonation (``proxyUser``), with
the studio's roles in place of Livy's superusers.

* **Owner**: the user the request authenticated as (``request.user``), never a name the client
  chooses.
* **View** (GET a session or batch, its state, statements and their output, its logs, Arrow
  results): its owner, its Spark user (``proxyUser``, as Livy), the users in ``STUDIO_VIEW_USERS``
  and ``STUDIO_MODIFY_USERS``, and admins.
* **Modify** (statements, cancel, completion, inspection, DELETE): its owner, its Spark user, the
  users in ``STUDIO_MODIFY_USERS``, and admins.

Anyone else gets 403 ``{"msg"}`` on every route about the object; ``GET /sessions`` and ``GET
/batches`` list only what the caller may view (so sparkmagic's ``%%cleanup -f`` removes only the
caller's own sessions).

**proxyUser** (and Livy's ``?doAs=``, which wins): an admin may name anyone, a user only itself;
anything else is 403, never silently dropped. The Spark user of a session or batch is its
proxyUser, else its owner, and its JSON's ``proxyUser`` shows it (as Livy with impersonation on).
The name reaches the driver's environment (``SPARK_USER``, ``HADOOP_USER_NAME``), so it must be a
plain user name (``USER_NAME``, the users' directory's own rule).

**Quotas**: creating a session or batch when the owner already has as many live ones as its
quota (``studio.auth.quotas``, key ``sessions``: its own from the users' directory, else its
role's) is 429 before anything starts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from studio.auth.users import NAME_PATTERN
from studio.errors import ForbiddenError, InvalidRequestError

if TYPE_CHECKING:
    from studio.auth.users import Directory
    from studio.config import Settings

# A user name that may become a Spark user (an environment variable of the driver, Hadoop's user):
# the users' directory's rule, so every user's own name passes.
USER_NAME: re.Pattern[str] = NAME_PATTERN


class Caller(Protocol):
    """What access control needs of a request's principal (``studio.auth.gate.Principal``)."""

    @property
    def name(self) -> str: ...

    @property
    def is_admin(self) -> bool: ...


class Owned(Protocol):
    """A session or a batch: who created it, and as whom it runs."""

    @property
    def owner(self) -> str | None: ...

    @property
    def spark_user(self) -> str | None: ...


def valid_user_name(name: str) -> bool:
    return bool(USER_NAME.fullmatch(name))


@dataclass(frozen=True)
class Parties:
    """The owner and Spark user of an object that is no longer live (from its record)."""

    owner: str | None
    spark_user: str | None


@dataclass(frozen=True)
class Access:
    view_users: frozenset[str] = frozenset()
    modify_users: frozenset[str] = frozenset()

    @classmethod
    def for_settings(cls, settings: "Settings") -> "Access":
        return cls(frozenset(settings.view_users), frozenset(settings.modify_users))

    def may_view(self, caller: Caller, item: Owned) -> bool:
        return caller.is_admin or caller.name in (item.owner, item.spark_user) or caller.name in self.view_users or caller.name in self.modify_users

    def may_modify(self, caller: Caller, item: Owned) -> bool:
        return caller.is_admin or caller.name in (item.owner, item.spark_user) or caller.name in self.modify_users

    def check(self, caller: Caller, item: Owned, what: str, modify: bool = False) -> None:
        """403 unless ``caller`` may view (or, with ``modify``, change) ``item``. ``what`` names the
        object as the request did (an id or a name): the answer says nothing about the object."""
        if modify:
            if not self.may_modify(caller, item):
                raise ForbiddenError(f"User '{caller.name}' may not change {what}.")
        elif not self.may_view(caller, item):
            raise ForbiddenError(f"User '{caller.name}' may not see {what}.")

    def spark_user(self, caller: Caller, proxy_user: str | None) -> str:
        """The user a new session or batch runs as: ``proxy_user`` (the body's ``proxyUser`` or the
        query's ``doAs``) if the caller may name it, else the caller itself; 403 for a user naming
        another (Livy's words), 400 for a name that cannot be a Spark user."""
        wanted = (proxy_user or "").strip() or caller.name
        if wanted != caller.name and not caller.is_admin:
            raise ForbiddenError(f"User '{caller.name}' not allowed to impersonate '{wanted}'.")
        if not valid_user_name(wanted):
            raise InvalidRequestError(
                f"Rejected, Reason: '{wanted[:80]}' cannot be a Spark user: a user name is lower-case letters, digits, "
                "'.', '_' and '-' (at most 64, not starting with a digit, '.' or '-')."
            )
        return wanted


def quota_overrides(directory: "Directory", name: str) -> Mapping[str, int | None] | None:
    """The user's own quotas from the users' directory (None: the role's defaults apply)."""
    user = directory.get_user(name)
    return user.quotas if user is not None else None
