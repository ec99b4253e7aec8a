"""``GET /metrics`` and ``GET /events`` of the session service: what its applications, sessions and
job runs are doing, for Prometheus and for anyone following state changes.

Metrics (Prometheus' text format, ``studio.metrics``), per application (label ``application``, its
name), read from the live objects when scraped, as EMR Serverless publishes per application:

* ``studio_application_state{state}``: 1 for its current state, 0 for the others.
* ``studio_application_drivers{state}``: its drivers by what they do: ``warm`` (ready in the pool),
  ``starting`` (a pool refill or a session's driver coming up), ``idle`` and ``busy`` (a session's
  driver without and with a statement running; a running job run's driver is busy).
* ``studio_application_capacity_used{resource}`` and ``studio_application_capacity_maximum{resource}``:
  ``drivers``, ``cpu`` (cores) and ``memory_mb``, against its ``maximumCapacity`` (a maximum it does
  not set is not shown). ``studio_application_initial_drivers``: its ``initialCapacity``.
* ``studio_application_sessions{state}``, ``studio_application_job_runs{state}``: by state.
* ``studio_application_pool_hits_total``, ``studio_application_pool_misses_total``: sessions that got
  a warm driver, and those that had to start one.
* ``studio_application_is_idle``: EMR's ``IsIdle`` (no live session, no job run running or queued).
* ``studio_session_first_result_seconds``: from a session's create to its first statement's result;
  ``studio_statement_seconds``: a statement's run time (histograms, since this service started).

Events (``text/event-stream``, ``studio.events.EventStream``): every state change of applications,
sessions and job runs. Admins see all of them; every signed-in user sees the applications'; a
session's or job run's events are shown to whoever may view the object (``studio.livy.access``:
its owner, its Spark user, the view and modify users). ``?kinds=session,jobrun`` narrows them.
Both routes sit behind the gate like every other (only ``/version`` and ``/health`` are open).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Iterator

from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.datastructures import State

from studio import metrics
from studio.events import close_server, Event, EventBus, Webhooks
from studio.livy.access import Parties
from studio.livy.models import SessionState

log = logging.getLogger("studio.livy.observe")

DEFAULT = "default"  # the application the root Livy routes serve (also without the applications registry)
APPLICATION_STATES = ("CREATING", "CREATED", "STARTING", "STARTED", "STOPPING", "STOPPED", "TERMINATED")


class _Target:
    """One application as the collector sees it (the registry's ``Application``, or the service's
    single pool while there is no registry)."""

    def __init__(self, name: str, app: Any, pool: Any) -> None:
        self.name = name
        self.app = app
        self.pool = pool


def _applications(state: State) -> list[_Target]:
    registry = getattr(state, "applications", None)
    if registry is not None:
        return [_Target(app.name, app, app.pool) for app in registry.list()]
    return [_Target(DEFAULT, None, getattr(state, "pool", None))]


def _by_id(state: State) -> dict[str, str]:
    registry = getattr(state, "applications", None)
    return {app.id: app.name for app in registry.list()} if registry is not None else {}


def application_name(state: State, item: Any, names: dict[str, str] | None = None) -> str:
    """The name of the application a session or job run belongs to (``default`` when it names none)."""
    named = getattr(item, "application_name", None)
    if isinstance(named, str) and named:
        return named
    app = getattr(item, "application", None)
    if app is not None and getattr(app, "name", None):
        return str(app.name)
    app_id = getattr(item, "application_id", None)
    if app_id is None:
        return DEFAULT
    names = names if names is not None else _by_id(state)
    return names.get(str(app_id), str(app_id))


def _run_state(batch: Any) -> str:
    run_state = getattr(batch, "run_state", None)
    return str(getattr(run_state, "value", run_state) if run_state is not None else batch.state.value)


def _job_run_states() -> list[str]:
    try:
        from studio.livy.batches import JobRunState  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        return [s.value for s in SessionState]
    return [s.value for s in JobRunState]


class LivyCollector(Collector):
    """The per-application gauges and counters, read from ``state`` (``request.app.state``) at scrape time."""

    def __init__(self, state: State) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        state = self.state
        targets = _applications(state)
        names = _by_id(state)
        labels = ["application"]
        app_state = GaugeMetricFamily("studio_application_state", "1 for the application's current state", labels=[*labels, "state"])
        drivers = GaugeMetricFamily("studio_application_drivers", "Drivers by what they do (warm, starting, idle, busy)", labels=[*labels, "state"])
        used = GaugeMetricFamily("studio_application_capacity_used", "Capacity in use (drivers, cpu cores, memory_mb)", labels=[*labels, "resource"])
        maximum = GaugeMetricFamily("studio_application_capacity_maximum", "maximumCapacity (drivers, cpu cores, memory_mb)", labels=[*labels, "resource"])
        initial = GaugeMetricFamily("studio_application_initial_drivers", "initialCapacity: warm drivers kept ready", labels=labels)
        sessions = GaugeMetricFamily("studio_application_sessions", "Sessions by state", labels=[*labels, "state"])
        runs = GaugeMetricFamily("studio_application_job_runs", "Job runs (batches) by state", labels=[*labels, "state"])
        hits = CounterMetricFamily("studio_application_pool_hits", "Sessions handed a warm driver", labels=labels)
        misses = CounterMetricFamily("studio_application_pool_misses", "Sessions that had to start a driver", labels=labels)
        idle = GaugeMetricFamily("studio_application_is_idle", "1 when no session is live and no job run runs or waits (EMR's IsIdle)", labels=labels)

        session_counts: Counter[tuple[str, str]] = Counter()
        manager = getattr(state, "sessions", None)
        for session in list(getattr(manager, "sessions", {}).values()):
            session_counts[(application_name(state, session, names), session.state.value)] += 1
        run_counts: Counter[tuple[str, str]] = Counter()
        batches = getattr(state, "batches", None)
        for batch in list(getattr(batches, "batches", {}).values()):
            run_counts[(application_name(state, batch, names), _run_state(batch))] += 1
        run_states = _job_run_states()

        for target in targets:
            name, app, pool = target.name, target.app, target.pool
            current = str(getattr(app.state, "value", app.state)) if app is not None else "STARTED"
            for value in APPLICATION_STATES:
                app_state.add_metric([name, value], 1.0 if value == current else 0.0)
            for value in SessionState:
                sessions.add_metric([name, value.value], session_counts[(name, value.value)])
            for value in run_states:
                runs.add_metric([name, value], run_counts[(name, value)])
            ready = pool.ready_count() if pool is not None and hasattr(pool, "ready_count") else _pool_status(pool, "ready")
            warm = pool.warm_count() if pool is not None and hasattr(pool, "warm_count") else ready + _pool_status(pool, "starting")
            running_runs = sum(run_counts[(name, s)] for s in ("RUNNING", "running"))
            drivers.add_metric([name, "warm"], ready)
            drivers.add_metric([name, "starting"], (warm - ready) + session_counts[(name, "starting")])
            drivers.add_metric([name, "idle"], session_counts[(name, "idle")])
            drivers.add_metric([name, "busy"], session_counts[(name, "busy")] + running_runs)
            if app is not None:
                usage, limits = app.usage(), app.limits()
                for resource, key in (("drivers", "drivers"), ("cpu", "cpu"), ("memory_mb", "memoryMB")):
                    used.add_metric([name, resource], float(usage.get(key) or 0))
                    if limits.get(key) is not None:
                        maximum.add_metric([name, resource], float(limits[key]))
                initial.add_metric([name], float(getattr(app, "initial_capacity", 0) or 0))
                hits.add_metric([name], float(app.pool_hits))
                misses.add_metric([name], float(app.pool_misses))
                idle.add_metric([name], 1.0 if app.is_idle() else 0.0)
            else:  # one pool, no registry: what the service itself knows
                live = sum(n for (_, s), n in session_counts.items() if s in ("starting", "idle", "busy"))
                live_runs = sum(n for (_, s), n in run_counts.items() if s in ("starting", "running", "not_started"))
                used.add_metric([name, "drivers"], float(live + live_runs + warm))
                settings = getattr(state, "settings", None)
                if settings is not None:
                    maximum.add_metric([name, "drivers"], float(settings.max_sessions))
                initial.add_metric([name], float(getattr(pool, "size", 0) or 0))
                hits.add_metric([name], float(getattr(pool, "handed_out", 0)))
                idle.add_metric([name], 1.0 if live == 0 and live_runs == 0 else 0.0)
        yield from (app_state, drivers, used, maximum, initial, sessions, runs, hits, misses, idle)


def _pool_status(pool: Any, key: str) -> int:
    if pool is None:
        return 0
    try:
        return int(pool.status().get(key, 0))
    except Exception:  # noqa: BLE001 - a scrape shows what it can
        return 0


def install(state: State) -> None:
    """At the service's start (its lifespan, once ``state.sessions`` exists): the event bus (unless
    there is one), the metrics registry with its collector and histograms, the session manager's
    hooks, and the webhooks (``STUDIO_EVENT_WEBHOOKS``, checked here: a bad URL stops the start)."""
    if getattr(state, "events", None) is None:
        state.events = EventBus()
    registry = metrics.new_registry()
    registry.register(LivyCollector(state))
    first_result = Histogram(
        "studio_session_first_result_seconds",
        "Seconds from a session's create to its first statement's result",
        ["application"],
        registry=registry,
        buckets=metrics.LATENCY_BUCKETS,
    )
    statement_seconds = Histogram(
        "studio_statement_seconds",
        "Seconds a statement took, from its start to its result",
        ["application"],
        registry=registry,
        buckets=metrics.LATENCY_BUCKETS,
    )
    state.metrics = registry

    def on_first_result(session: Any, seconds: float) -> None:
        first_result.labels(application_name(state, session)).observe(max(0.0, seconds))

    def on_statement_done(session: Any, statement: Any, seconds: float) -> None:
        statement_seconds.labels(application_name(state, session)).observe(max(0.0, seconds))

    state.sessions.on_first_result = on_first_result
    state.sessions.on_statement_done = on_statement_done
    webhooks = Webhooks(list(state.settings.event_webhooks))
    webhooks.start(state.events)
    state.webhooks = webhooks


async def close(state: State) -> None:
    """At the server's stop (``studio.events.close_server``)."""
    await close_server(state)


# -- routes -----------------------------------------------------------------------------------


def may_see(state: State, caller: Any, event: Event) -> bool:
    """Whether ``caller`` (the request's principal) is shown ``event`` (see the module's docstring)."""
    if caller.is_admin or event.kind == "application":
        return True
    if event.kind in ("session", "jobrun"):
        manager = getattr(state, "sessions" if event.kind == "session" else "batches", None)
        found = getattr(manager, "sessions" if event.kind == "session" else "batches", {})
        try:
            item = found.get(int(event.id))
        except ValueError:
            item = None
        owned = item if item is not None else Parties(event.owner, None)
        return bool(state.access.may_view(caller, owned))
    return event.owner is not None and event.owner == caller.name


ROUTES = metrics.observability_routes(may_see)
