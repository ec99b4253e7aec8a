"""State changes as events: one in-process bus per server, read by ``GET /events`` and webhooks.

Whatever changes state (an application, a session, a job run, a workspace, an execution) publishes
an ``Event`` here. Publishing never blocks and never fails the change it reports: each subscriber
has a bounded queue, and one that does not keep up loses its oldest events and is told how many.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterator

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
