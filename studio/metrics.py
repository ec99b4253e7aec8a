"""What both servers' ``GET /metrics`` share: a registry of their own and Prometheus' text format.

Each server has its own ``CollectorRegistry``, never prometheus-client's global one: the tests run
many servers in one process, and a metric registered twice in one registry is an error. Gauges are
read from the live objects when Prometheus scrapes (a custom collector per server: nothing to keep
in step); only what has no live source (histograms of latencies, counters of sign-ins) is kept here.
"""

from __future__ import annotations

from typing import Any, Callable, cast

from prometheus_client import CollectorRegistry, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from studio.errors import InvalidRequestError
from studio.events import Event, EventStream, kinds_param

# Prometheus' text exposition format 0.0.4: what every Prometheus and agent scrapes.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds: a warm session answers in well under a second, a cold driver takes 10-20 s, a
# statement may run for minutes.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


def new_registry() -> CollectorRegistry:
    # auto_describe off: a custom collector is asked for its samples only when scraped
    return CollectorRegistry(auto_describe=False)


def metrics_response(registry: CollectorRegistry) -> Response:
    """The registry's samples as Prometheus' text format 0.0.4."""
    return Response(generate_latest(registry), media_type=CONTENT_TYPE, headers={"Cache-Control": "no-store"})


def observability_routes(may_see: Callable[[Any, Any, Event], bool]) -> list[Route]:
    """``GET /metrics`` (the server's registry, ``app.state.metrics``) and ``GET /events`` (its bus,
    ``app.state.events``, each event shown when ``may_see(app.state, caller, event)``), alike on both
    servers; only who may see which event differs between them."""

    async def metrics_endpoint(request: Request) -> Response:
        return metrics_response(request.app.state.metrics)

    async def events_endpoint(request: Request) -> Response:
        try:
            kinds = kinds_param(request.query_params.get("kinds"))
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from None
        state, caller = request.app.state, request.user

        def visible(event: Event) -> bool:
            return (kinds is None or event.kind in kinds) and may_see(state, caller, event)

        return cast(Response, EventStream(state.events, visible))

    return [Route("/metrics", metrics_endpoint, methods=["GET"]), Route("/events", events_endpoint, methods=["GET"])]
