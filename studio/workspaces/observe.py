"""``GET /metrics`` and ``GET /events`` of the workspace server (``studio serve``).

Metrics (Prometheus' text format, ``studio.metrics``), read from the managers when scraped:

* ``studio_workspaces{state}``: workspaces by state (Idle, Starting, Ready, Attached, ...).
* ``studio_executions{status}``: notebook executions by status (EMR's, START_PENDING ... STOPPED).
* ``studio_sign_ins_total{outcome, method}``: browser sign-ins since this server started (``ok`` or
  ``failed``; ``password``, ``token``, ``studio-token``, ``token-url``, ``oidc``), and
  ``studio_sign_outs_total``: the gate tells of each (the audit trail keeps who and from where).

Events (``text/event-stream``, ``studio.events.EventStream``): every state change of workspaces
(created, each transition, ``Deleted``) and executions. Admins see all; a workspace's events go to
its owner and collaborators, an execution's to its owner and whoever may see its workspace
(``studio.workspaces.access``). Both routes sit behind the gate (only ``/health`` is open).
"""

from __future__ import annotations

from collections import Counter as Tally
from typing import TYPE_CHECKING, Any, Iterator

from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.datastructures import State

from studio import metrics
from studio.errors import NotFoundError
from studio.events import close_server, Event, EventBus, Webhooks
from studio.workspaces import access
from studio.workspaces.models import ExecutionStatus, WorkspaceState

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from studio.auth.gate import Gate
    from studio.config import Settings


class StudioCollector(Collector):
    """Workspaces by state and executions by status, read from ``state`` when scraped."""

    def __init__(self, state: State) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        workspaces = GaugeMetricFamily("studio_workspaces", "Workspaces by state", labels=["state"])
        executions = GaugeMetricFamily("studio_executions", "Notebook executions by status", labels=["status"])
        manager = getattr(self.state, "workspaces", None)
        by_state = Tally(w.state.value for w in manager.list()) if manager is not None else Tally()
        for state in WorkspaceState:
            workspaces.add_metric([state.value], by_state[state.value])
        runs = getattr(self.state, "executions", None)
        by_status = Tally(e.status.value for e in runs.list()) if runs is not None else Tally()
        for status in ExecutionStatus:
            executions.add_metric([status.value], by_status[status.value])
        yield workspaces
        yield executions


def install(app: "Starlette", gate: "Gate") -> None:
    """When the app is made (after ``audit.middleware`` gave the gate its sign-in hook): the metrics
    registry with its collector, and sign-ins counted on their way to the audit trail."""
    registry = metrics.new_registry()
    registry.register(StudioCollector(app.state))
    sign_ins = Counter("studio_sign_ins", "Browser sign-ins by outcome and method", ["outcome", "method"], registry=registry)
    sign_outs = Counter("studio_sign_outs", "Browser sign-outs", registry=registry)
    app.state.metrics = registry
    audit_hook = gate.on_sign_in

    def on_sign_in(user: str, client: str, outcome: str, method: str, *, scope: Any) -> None:
        if outcome == "signed-out":
            sign_outs.inc()
        else:
            sign_ins.labels("ok" if outcome == "ok" else "failed", method).inc()
        if audit_hook is not None:
            audit_hook(user, client, outcome, method, scope=scope)

    gate.on_sign_in = on_sign_in


def start(state: State, settings: "Settings") -> EventBus:
    """At the server's start, before anything publishes: the event bus and the webhooks
    (``STUDIO_EVENT_WEBHOOKS``, checked here: a bad URL stops the start)."""
    bus = EventBus()
    state.events = bus
    webhooks = Webhooks(list(settings.event_webhooks))
    webhooks.start(bus)
    state.webhooks = webhooks
    return bus


async def close(state: State) -> None:
    """At the server's stop (``studio.events.close_server``)."""
    await close_server(state)


# -- routes -----------------------------------------------------------------------------------


def may_see(state: State, actor: Any, event: Event) -> bool:
    """Whether ``actor`` is shown ``event`` (see the module's docstring)."""
    if actor.is_admin:
        return True
    if event.kind == "workspace":
        try:
            workspace = state.workspaces.get(event.id)
        except NotFoundError:  # deleted: its owner (and admins) only
            return event.owner is not None and event.owner == actor.name
        return access.may_see_workspace(actor, workspace.owner, workspace.collaborators)
    if event.kind == "execution":
        try:
            return bool(state.executions.may_see(actor, state.executions.get(event.id)))
        except NotFoundError:
            return event.owner is not None and event.owner == actor.name
    return event.owner is not None and event.owner == actor.name


ROUTES = metrics.observability_routes(may_see)
