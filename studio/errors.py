"""The studio's exception tree.

Managers raise only these; the web layer turns any of them into Livy's error shape
``{"msg": "..."}`` with the class's status code, in one handler.

    StudioError (500)
    ├── InvalidRequestError (400)          bad JSON, wrong field types, unknown fields
    │   ├── SessionNotActiveError (400)    statement to a finished session
    │   └── TooManySessionsError (400)     the configured cap of live sessions is reached
    ├── ForbiddenError (403)               authenticated, but this user may not see or change that object
    ├── NotFoundError (404)                unknown session, statement, batch, workspace or compute
    ├── NotAcceptableError (406)           an Accept header asking for an unknown API version
    ├── ConflictError (409)                right request, wrong moment (a session still starting,
    │                                      a workspace started twice), or a name that is taken
    ├── PayloadTooLargeError (413)         code or request body over the configured limit
    ├── ComputeUnreachableError (502)      a compute (a Livy URL) did not answer or answered nonsense
    ├── CapacityError (503)                not enough free memory to start another worker
    ├── LimitReachedError (429)            a budget is used up (running workspaces, ...)
    │   └── QuotaExceededError             a user's own quota (live sessions, running workspaces,
    │                                      concurrent executions): says what is in use and the limit
    ├── StorageFullError (507)             the state disk is full: the request could not be recorded,
    │                                      so it was not accepted (nothing changed)
    ├── WorkerError (500)                  a worker failed in a way its session cannot recover from
    │   ├── WorkerStartError               the worker exited or timed out before it was ready
    │   └── WorkerDiedError                the worker exited while it had work
    ├── JupyterLabError (500)              a workspace's JupyterLab did not start (exited, timed out)
    └── ServiceStartError (500)            a studio server started as a child (the embedded session
                                           service) exited or timed out before it listened
"""

from __future__ import annotations


class StudioError(Exception):
    """Base of every error the studio raises on purpose.

    ``msg`` is what the client sees; ``log_message`` (optional) is extra detail for the log only.
    """

    status_code = 500

    def __init__(self, msg: str, *, log_message: str = "") -> None:
        super().__init__(msg)
        self.msg = msg
        self.log_message = log_message


class InvalidRequestError(StudioError):
    status_code = 400


class SessionNotActiveError(InvalidRequestError):
    pass


class TooManySessionsError(InvalidRequestError):
    pass


class ForbiddenError(StudioError):
    """The request is authenticated but its user may not see or change the object (Livy: 403)."""

    status_code = 403


class NotFoundError(StudioError):
    status_code = 404


class NotAcceptableError(StudioError):
    status_code = 406


class ConflictError(StudioError):
    status_code = 409


class PayloadTooLargeError(StudioError):
    status_code = 413


class CapacityError(StudioError):
    status_code = 503


class StorageFullError(StudioError):
    """The state disk (the store's database, logs, results) has no room: what the request asked for
    could not be recorded, so it was not done. 507 Insufficient Storage."""

    status_code = 507


class LimitReachedError(StudioError):
    """A configured budget is used up (running workspaces, ...); the message names the setting."""

    status_code = 429


class QuotaExceededError(LimitReachedError):
    """A user's quota is used up; the message says what is in use and the limit."""


class WorkerError(StudioError):
    status_code = 500


class WorkerStartError(WorkerError):
    pass


class WorkerDiedError(WorkerError):
    pass


class ComputeUnreachableError(StudioError):
    status_code = 502


class JupyterLabError(StudioError):
    status_code = 500


class ServiceStartError(StudioError):
    status_code = 500
