"""State changes as events: one in-process bus per server, read by ``GET /events`` and webhooks.

Whatever changes state (an application, a session, a job run, a workspace, an execution) publishes
an ``Event`` here. Publishing never blocks and never fails the change it reports: each subscriber
has a bounded queue, and one that does not keep up loses its oldest events and is told how many.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterator, Callable
from urllib.parse import urlsplit, urlunsplit

from starlette.types import Receive, Scope, Send

from studio.errors import StudioError

log = logging.getLogger("studio.events")

QUEUE_SIZE = 1000  # events a subscriber may fall behind by before it loses the oldest


@dataclass(frozen=True)
class Event:
    kind: str  # application | session | jobrun | workspace | execution
    id: str
    new: str
    old: str | None = None
    reason: str = ""
    name: str | None = None
    owner: str | None = None
    application: str | None = None  # the application's name, for sessions and job runs
    time: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Subscription:
    """The events published after it was made, in order; ``lost`` counts those it missed."""

    def __init__(self, bus: "EventBus", size: int) -> None:
        self._bus = bus
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue(size)
        self.lost = 0

    def _offer(self, event: Event | None) -> None:
        while True:
            try:
                self._queue.put_nowait(event)
                return
            except asyncio.QueueFull:
                self._queue.get_nowait()  # the oldest goes: a slow reader must not hold the bus up
                self.lost += 1

    async def next(self, timeout: float | None = None) -> Event | None:
        """The next event; None when the bus closed or ``timeout`` passed without one."""
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    def close(self) -> None:
        self._bus._subscribers.discard(self)

    async def __aiter__(self) -> AsyncIterator[Event]:
        while (event := await self.next()) is not None:
            yield event


class EventBus:
    def __init__(self, queue_size: int = QUEUE_SIZE) -> None:
        self._subscribers: set[Subscription] = set()
        self._queue_size = queue_size
        self.listeners: list[Any] = []  # sync callables given every event (webhooks, metrics)
        self.closed = False

    def publish(self, event: Event) -> None:
        if self.closed:
            return
        for subscription in list(self._subscribers):
            subscription._offer(event)
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:  # noqa: BLE001 - a listener must never fail the change it hears of
                log.exception("an event listener failed on %s %s", event.kind, event.id)

    def subscribe(self) -> Subscription:
        subscription = Subscription(self, self._queue_size)
        self._subscribers.add(subscription)
        return subscription

    def close(self) -> None:
        self.closed = True
        for subscription in list(self._subscribers):
            subscription._offer(None)
        self._subscribers.clear()


# -- server-sent events (GET /events on both servers) ----------------------------------------------

HEARTBEAT_SECONDS = 15.0  # a comment line this often: proxies keep the stream open, a gone client is noticed
KINDS = ("application", "session", "jobrun", "workspace", "execution")
_streams: set["EventStream"] = set()  # the open streams of this process: a stopping server ends them


def server_stopping() -> None:
    """The server was told to stop: every open event stream ends now (uvicorn waits for open
    responses before it shuts the app down, so a stream left open would hold the stop up)."""
    for stream in list(_streams):
        stream.end()


class EventStream:
    """An ASGI response: the bus's events as ``text/event-stream``, those ``visible`` keeps, each as
    ``id: <n>`` (its number in this stream), ``event: <kind>``, ``data: <JSON>``. A comment at once
    (the subscription is in place) and every ``HEARTBEAT_SECONDS``; ``: lost N events`` when this
    reader fell behind the bus and missed some. It ends when the client goes, the bus closes or the
    server stops."""

    def __init__(self, bus: EventBus, visible: Callable[[Event], bool], heartbeat: float = HEARTBEAT_SECONDS) -> None:
        self.subscription = bus.subscribe()  # now, not when the body starts: nothing after the request is missed
        self.bus = bus
        self.visible = visible
        self.heartbeat = heartbeat
        self.ended = False

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self.subscription._offer(None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        _streams.add(self)
        watcher = asyncio.create_task(self._watch(receive), name="events-disconnect")
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"cache-control", b"no-store"),
                        (b"x-accel-buffering", b"no"),  # a proxy in front must not hold events back
                    ],
                }
            )
            await self._stream(send)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client went away while we wrote (ASGI 2.4 servers raise OSError then)
        finally:
            watcher.cancel()
            self.subscription.close()
            _streams.discard(self)

    async def _watch(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.end()
                return

    async def _stream(self, send: Send) -> None:
        async def write(text: str) -> None:
            await send({"type": "http.response.body", "body": text.encode("utf-8"), "more_body": True})

        await write(": events of Spark Studio\n\n")
        number, told_lost = 0, 0
        while not self.ended:
            event = await self.subscription.next(timeout=self.heartbeat)
            if self.subscription.lost > told_lost:
                await write(f": lost {self.subscription.lost - told_lost} events\n\n")
                told_lost = self.subscription.lost
            if event is None:
                if self.ended or self.bus.closed:
                    return
                await write(": keep-alive\n\n")
                continue
            try:
                shown = self.visible(event)
            except Exception:  # noqa: BLE001 - a broken check hides the event, never ends the stream
                log.exception("checking who may see %s %s failed", event.kind, event.id)
                shown = False
            if shown:
                number += 1
                data = json.dumps(event.to_json(), ensure_ascii=False, separators=(",", ":"), default=str)
                await write(f"id: {number}\nevent: {event.kind}\ndata: {data}\n\n")


def kinds_param(raw: str | None) -> frozenset[str] | None:
    """``?kinds=session,jobrun``: the kinds asked for (None: all), ValueError naming an unknown one."""
    if not raw:
        return None
    wanted = frozenset(part.strip().lower() for part in raw.split(",") if part.strip())
    unknown = sorted(wanted - set(KINDS))
    if unknown:
        raise ValueError(f"Unknown event kind '{unknown[0][:40]}'; use some of {', '.join(KINDS)}.")
    return wanted


# -- webhooks (STUDIO_EVENT_WEBHOOKS) ---------------------------------------------------------------

WEBHOOK_TIMEOUT = 5.0  # seconds for one POST: a slow receiver delays only its own later events
WEBHOOK_QUEUE = 1000  # events a receiver may fall behind by; beyond, the oldest are dropped (and logged)


def shown_url(url: str) -> str:
    """A webhook URL as the log may show it: no user info, no query, no fragment (either may hold a secret)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(an unparsable URL)"
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def check_webhook_urls(urls: list[str]) -> list[str]:
    """The URLs, each an absolute http(s) URL with a host; StudioError naming the first that is not
    (as ``shown_url`` shows it: its credentials and query stay out of the message)."""
    checked = []
    for raw in urls:
        url = raw.strip()
        problem = None
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            parts, problem = None, "it cannot be parsed"
        if parts is not None:
            if any(ord(char) < 0x21 or char == "\x7f" for char in url):
                problem = "it holds spaces or control characters"
            elif parts.scheme.lower() not in ("http", "https"):
                problem = "only http and https URLs may receive events"
            elif not parts.hostname:
                problem = "it names no host"
        if problem is not None:
            raise StudioError(f"STUDIO_EVENT_WEBHOOKS: '{shown_url(url)}' is not a webhook URL: {problem}.")
        checked.append(url)
    return checked


class Webhooks:
    """POSTs every event of a bus as JSON (``Event.to_json``) to each URL, from a subscription of
    its own per URL (bounded: a receiver that is down or slow loses the oldest events, which is
    logged), one at a time with a ``WEBHOOK_TIMEOUT``; a failure is logged and the event dropped
    (no retries: the stream of states goes on, and the objects' own APIs have their current state)."""

    def __init__(self, urls: list[str], timeout: float = WEBHOOK_TIMEOUT, queue_size: int = WEBHOOK_QUEUE) -> None:
        self.urls = check_webhook_urls(urls)
        self.timeout = timeout
        self.queue_size = queue_size
        self.delivered = 0
        self.failed = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._client: Any = None

    def start(self, bus: EventBus) -> None:
        """Deliver from now on (inside the running event loop); ends when the bus closes or ``close``."""
        if not self.urls:
            return
        import httpx

        self._client = httpx.AsyncClient(timeout=self.timeout, follow_redirects=False, trust_env=False)
        for url in self.urls:
            subscription = Subscription(bus, self.queue_size)
            bus._subscribers.add(subscription)
            self._tasks.append(asyncio.create_task(self._deliver(url, subscription), name="webhook"))
        log.info("posting events to %d webhook(s): %s", len(self.urls), ", ".join(shown_url(u) for u in self.urls))

    async def _deliver(self, url: str, subscription: Subscription) -> None:
        shown, told_lost = shown_url(url), 0
        try:
            async for event in subscription:
                if subscription.lost > told_lost:
                    log.warning("webhook %s: %d events dropped (it did not keep up)", shown, subscription.lost - told_lost)
                    told_lost = subscription.lost
                try:
                    response = await self._client.post(url, json=event.to_json(), headers={"User-Agent": "spark-studio-events"})
                except Exception as exc:  # noqa: BLE001 - any failure: logged, the next event goes on
                    self.failed += 1
                    log.warning("webhook %s: posting %s %s failed: %s", shown, event.kind, event.id, type(exc).__name__)
                    continue
                if response.status_code >= 300:
                    self.failed += 1
                    log.warning("webhook %s: %s %s answered %d", shown, event.kind, event.id, response.status_code)
                else:
                    self.delivered += 1
        finally:
            subscription.close()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._client is not None:
            await self._client.aclose()
            self._client = None


async def close_server(state: Any) -> None:
    """A server stops (either one): open event streams end, its bus closes, its webhooks stop (what
    they hold is dropped)."""
    server_stopping()
    bus = getattr(state, "events", None)
    if bus is not None:
        bus.close()
    webhooks = getattr(state, "webhooks", None)
    if webhooks is not None:
        await webhooks.close()
