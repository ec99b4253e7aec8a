"""Connection budgets for both servers: how many connections, and how long a request head may take.

uvicorn closes idle kept-alive connections, but a *new* connection (or a kept-alive one that has
begun its next request) that trickles its request line and headers a byte at a time is held open
forever, and enough of them take every slot the server has (slowloris). ``protocol_class`` is
uvicorn's own HTTP protocol with one more timer: a request head that is not complete within
``header_timeout`` seconds of its first byte (or of the connection) closes the connection.
``ConnectionBudget`` answers 503 with ``{"msg"}`` once more than ``max_connections`` are open.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger("studio.http")


class _HeadTimer:
    """Mixed into a uvicorn protocol: closes the connection when a request head takes too long."""

    header_timeout: float = 15.0
    _head_timer: asyncio.TimerHandle | None = None
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            peer = self.transport.get_extra_info("peername")
            log.warning("closed a connection from %s: no complete request head within %g s", peer, self.header_timeout)
            self.transport.close()


def protocol_class(header_timeout: float) -> type:
    """uvicorn's HTTP protocol (httptools when installed, else h11) with the request-head timer."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # no httptools: the pure-Python parser
        return _h11_protocol(header_timeout)

    class HeadTimeoutHttpTools(_HeadTimer, HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_timer()

        def on_message_begin(self) -> None:  # the first bytes of a request, also the next on a kept-alive connection
            super().on_message_begin()
            self._arm_head_timer()

        def on_headers_complete(self) -> None:
            self._disarm_head_timer()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_head_timer()
            super().connection_lost(exc)

    HeadTimeoutHttpTools.header_timeout = header_timeout
    return HeadTimeoutHttpTools


def _h11_protocol(header_timeout: float) -> type:
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadTimeoutH11(_HeadTimer, H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_timer()

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:  # a request head was read
                self._disarm_head_timer()
            elif self.conn.trailing_data[0]:  # part of the next request's head is waiting
                self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_head_timer()
            super().connection_lost(exc)

    HeadTimeoutH11.header_timeout = header_timeout
    return HeadTimeoutH11


class ConnectionBudget:
    """ASGI wrapper: 503 ``{"msg"}`` (and the connection closed) while more than ``limit`` connections are open."""

    def __init__(self, app: ASGIApp, server_state: Any, limit: int) -> None:
        self.app = app
        self.server_state = server_state  # uvicorn's ServerState: .connections holds every open connection
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and len(self.server_state.connections) > self.limit:
            body = json.dumps(
                {"msg": f"The server has {len(self.server_state.connections)} open connections, more than it accepts "
                 f"(STUDIO_MAX_CONNECTIONS={self.limit}); try again shortly."}
            ).encode()  # fmt: skip
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
                (b"retry-after", b"5"),
            ]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)
