"""The event bus, its server-sent event stream and webhooks (studio.events), and both servers'
``/metrics`` through their real apps (no session service, no JVM)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from studio.errors import StudioError

from studio.events import Event, EventBus, EventStream, Webhooks, check_webhook_urls, kinds_param, server_stopping, shown_url

from .conftest import STUDIO_BASE


def event(n: int, kind: str = "session", owner: str | None = "ann") -> Event:
    return Event(kind, str(n), "idle", "starting", owner=owner)


def test_a_slow_subscriber_loses_the_oldest_and_is_told_how_many():
    async def main() -> None:
        bus = EventBus(queue_size=3)
        subscription = bus.subscribe()
        for n in range(5):
            bus.publish(event(n))
        assert [(await subscription.next(0.1)).id for _ in range(3)] == ["2", "3", "4"]  # type: ignore[union-attr]
        assert subscription.lost == 2
        assert await subscription.next(0.01) is None  # nothing more

    asyncio.run(main())


def test_closing_the_bus_ends_every_subscription_and_later_events_go_nowhere():
    async def main() -> None:
        bus = EventBus()
        subscription = bus.subscribe()
        bus.publish(event(1))
        bus.close()
        bus.publish(event(2))
        assert [e.id async for e in subscription] == ["1"]

    asyncio.run(main())


class Client:
    """The ASGI side of one event stream: what it was sent, and a disconnect when told."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.gone = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    @property
    def text(self) -> str:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body").decode()

    def events(self) -> list[tuple[str, dict[str, Any]]]:
        found = []
        for block in self.text.split("\n\n"):
            lines = dict(line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":"))
            if "event" in lines:
                found.append((lines["event"], json.loads(lines["data"])))
        return found


def run_stream(bus: EventBus, actions, visible=lambda e: True, heartbeat: float = 15.0) -> Client:  # noqa: ANN001
    async def main() -> Client:
        client = Client()
        stream = EventStream(bus, visible, heartbeat=heartbeat)
        task = asyncio.create_task(stream({"type": "http"}, client.receive, client.send))
        await asyncio.sleep(0)
        await actions(client)
        await asyncio.wait_for(task, 5)
        return client

    return asyncio.run(main())


def test_the_stream_shows_what_is_visible_in_order_and_ends_when_the_client_goes():
    bus = EventBus()

    async def actions(client: Client) -> None:
        for n in range(4):
            bus.publish(event(n, owner="ann" if n % 2 == 0 else "bob"))
        await asyncio.sleep(0.05)
        client.gone.set()

    client = run_stream(bus, actions, visible=lambda e: e.owner == "ann")
    start = client.sent[0]
    assert start["status"] == 200 and (b"content-type", b"text/event-stream; charset=utf-8") in start["headers"]
    assert [(kind, data["id"]) for kind, data in client.events()] == [("session", "0"), ("session", "2")]
    assert "id: 1\nevent: session\n" in client.text and "id: 2\nevent: session\n" in client.text
    assert client.sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert not bus._subscribers  # the subscription went with the client


def test_the_stream_says_how_many_events_a_slow_reader_lost_and_sends_heartbeats():
    bus = EventBus(queue_size=2)

    async def actions(client: Client) -> None:
        for n in range(5):  # before the stream reads: all but the last two are lost
            bus.publish(event(n))
        await asyncio.sleep(0.3)
        bus.close()

    client = run_stream(bus, actions, heartbeat=0.1)
    assert ": lost 3 events\n\n" in client.text
    assert [data["id"] for _, data in client.events()] == ["3", "4"]
    assert ": keep-alive\n\n" in client.text


def test_a_stopping_server_ends_its_streams():
    bus = EventBus()

    async def actions(client: Client) -> None:
        bus.publish(event(1))
        await asyncio.sleep(0.05)
        server_stopping()

    client = run_stream(bus, actions)
    assert [data["id"] for _, data in client.events()] == ["1"]


def test_event_kinds_are_checked():
    assert kinds_param(None) is None
    assert kinds_param("session, jobrun") == {"session", "jobrun"}
    with pytest.raises(ValueError, match="Unknown event kind 'sessions'"):
        kinds_param("sessions")


@pytest.mark.parametrize(
    "url, problem",
    [
        ("ftp://hooks.example.com/x", "only http and https"),
        ("file:///etc/passwd", "only http and https"),
        ("https:///path", "names no host"),
        ("https://hooks.example.com/a b", "spaces or control characters"),
        ("http://hooks.example.com:port/", "cannot be parsed"),
    ],
)
def test_webhook_urls_must_be_http_and_name_a_host(url, problem):
    with pytest.raises(StudioError, match=problem):
        check_webhook_urls([url])


def test_webhook_urls_are_shown_without_credentials_or_query():
    secret = "https://hook:s3cret@hooks.example.com/in?token=s3cret#s3cret"
    assert check_webhook_urls([f" {secret} "]) == [secret]
    assert shown_url(secret) == "https://hooks.example.com/in"
    with pytest.raises(StudioError) as refused:
        check_webhook_urls(["gopher://hook:s3cret@hooks.example.com/?token=s3cret"])
    assert "s3cret" not in refused.value.msg


def test_webhooks_post_each_event_as_json_and_survive_a_receiver_that_fails(caplog):
    async def main() -> tuple[list[dict[str, Any]], Webhooks]:
        received: list[dict[str, Any]] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            length = int(next(line.split(":")[1] for line in head.split("\r\n") if line.lower().startswith("content-length")))
            body = json.loads(await reader.readexactly(length))
            received.append(body)
            status = b"500 Internal Server Error" if body["id"] == "2" else b"204 No Content"
            writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        bus = EventBus()
        hooks = Webhooks([f"http://127.0.0.1:{port}/hook?key=s3cret"])
        hooks.start(bus)
        for n in (1, 2, 3):
            bus.publish(event(n))
        for _ in range(100):
            if hooks.delivered + hooks.failed == 3:
                break
            await asyncio.sleep(0.05)
        await hooks.close()
        server.close()
        return received, hooks

    received, hooks = asyncio.run(main())
    assert [body["id"] for body in received] == ["1", "2", "3"]
    assert received[0]["kind"] == "session" and received[0]["new"] == "idle" and received[0]["old"] == "starting"
    assert (hooks.delivered, hooks.failed) == (2, 1)
    assert "answered 500" in caplog.text and "s3cret" not in caplog.text


def families(text: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def test_the_session_services_metrics_parse_and_need_a_token(livy):
    response = livy.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    found = families(response.text)
    state = {s.labels["state"]: s.value for s in found["studio_application_state"].samples if s.labels["application"] == "default"}
    assert state["STARTED"] == 1 and sum(state.values()) == 1
    assert "studio_statement_seconds" in found and "studio_session_first_result_seconds" in found
    token = livy.headers.pop("Authorization")
    try:
        for path in ("/metrics", "/events"):
            refused = livy.get(path)
            assert refused.status_code == 401 and "Authentication required" in refused.json()["msg"], path
    finally:
        livy.headers["Authorization"] = token


def test_an_unknown_event_kind_is_a_400(livy):
    response = livy.get("/events", params={"kinds": "nope"})
    assert response.status_code == 400 and "Unknown event kind" in response.json()["msg"]


def test_the_studios_metrics_count_workspaces_and_sign_ins(studio):
    def samples(name: str) -> dict[tuple[tuple[str, str], ...], float]:
        response = studio.get("/metrics")
        assert response.status_code == 200, response.text
        family = families(response.text)[name]
        return {tuple(sorted(s.labels.items())): s.value for s in family.samples if s.name == family.name or s.name.endswith("_total")}

    assert samples("studio_workspaces")[(("state", "Idle"),)] == 0
    assert studio.post("/api/workspaces", json={"name": "counted"}).status_code in (200, 201)
    assert samples("studio_workspaces")[(("state", "Idle"),)] == 1
    assert samples("studio_executions")[(("status", "RUNNING"),)] == 0
    form = {"Content-Type": "application/x-www-form-urlencoded", "Origin": STUDIO_BASE}
    token = studio.headers.pop("Authorization")
    try:
        assert studio.post("/login", content="token=nope&next=/", headers=form).status_code == 401
        assert studio.post("/login", content=f"token={token.split()[1]}&next=/", headers=form, follow_redirects=False).status_code == 303
        assert studio.get("/metrics").status_code == 200  # with the cookie that sign-in gave
        studio.cookies.clear()
        assert studio.get("/metrics").status_code == 401
    finally:
        studio.headers["Authorization"] = token
    sign_ins = samples("studio_sign_ins")
    assert sign_ins[(("method", "studio-token"), ("outcome", "ok"))] == 1
    assert sign_ins[(("method", "password"), ("outcome", "failed"))] == 1  # "nope" was not a token
