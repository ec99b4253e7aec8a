"""``GET /metrics`` and ``GET /events`` of a real session service (the suite's shared warm one):
the metrics parse with prometheus-client's own parser and move with a session's life, and an event
stream sees every state change of that life in order, shown only to those who may see the session."""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import shared_service
from helpers import ServiceProcess, auth_headers
from studio.auth.users import Directory

FINAL = {"dead", "killed", "success", "error"}


@pytest.fixture(scope="module")
def service(warm_service: ServiceProcess) -> Iterator[ServiceProcess]:
    yield from shared_service(warm_service, ready=1)


@pytest.fixture(scope="module")
def tokens(service: ServiceProcess) -> dict[str, str]:
    """Two users of the service's directory (its identity directory is its state directory)."""
    with Directory(service.state_dir) as directory:
        return {name: directory.add_user(name)[1] for name in ("ann", "ben")}


class Stream:
    """``GET /events`` read in a thread: each event as (kind, data) on ``events``."""

    def __init__(self, url: str, token: str) -> None:
        self.events: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self.comments: list[str] = []
        self.open = threading.Event()
        self.client = httpx.Client(base_url=url, headers=auth_headers(token), timeout=httpx.Timeout(10, read=60), trust_env=False)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        assert self.open.wait(30), "the event stream did not start"

    def _read(self) -> None:
        try:
            with self.client.stream("GET", "/events") as response:
                assert response.status_code == 200, response.read()
                assert response.headers["content-type"].startswith("text/event-stream")
                fields: dict[str, str] = {}
                for line in response.iter_lines():
                    if line.startswith(":"):
                        self.comments.append(line)
                        self.open.set()
                    elif not line:
                        if "event" in fields:
                            self.events.put((fields["event"], json.loads(fields["data"])))
                        fields = {}
                    else:
                        name, _, value = line.partition(": ")
                        fields[name] = value
        except httpx.HTTPError:
            pass  # closed by the test

    def of_session(self, session_id: int, until_final: bool = True, timeout: float = 120) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                kind, data = self.events.get(timeout=0.5 if until_final else 2)
            except queue.Empty:
                if not until_final:
                    return found
                continue
            if kind == "session" and data["id"] == str(session_id):
                found.append(data)
                if until_final and data["new"] in FINAL:
                    return found
        raise AssertionError(f"no final state of session {session_id} in {found}")

    def close(self) -> None:
        self.client.close()
        self.thread.join(10)


def scrape(service: ServiceProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = service.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(metrics: dict, name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def test_a_sessions_life_moves_the_metrics_and_every_state_change_reaches_those_who_may_see_it(service, tokens):
    ann_events, ben_events = Stream(service.url, tokens["ann"]), Stream(service.url, tokens["ben"])
    before = scrape(service)
    ann = httpx.Client(base_url=service.url, headers=auth_headers(tokens["ann"]), timeout=120, trust_env=False)
    try:
        created = ann.post("/sessions", json={"kind": "pyspark"})
        assert created.status_code == 201, created.text
        session_id = created.json()["id"]
        deadline = time.monotonic() + 240
        while ann.get(f"/sessions/{session_id}").json()["state"] != "idle":
            assert time.monotonic() < deadline, "the session did not become idle"
            time.sleep(0.2)
        statement = ann.post(f"/sessions/{session_id}/statements", json={"code": "1 + 1"}).json()
        done = ann.get(f"/sessions/{session_id}/statements/{statement['id']}", params={"wait": 30}).json()
        assert done["state"] == "available" and done["output"]["data"]["text/plain"] == "2", done
        while ann.get(f"/sessions/{session_id}").json()["state"] != "idle":
            time.sleep(0.1)
        during = scrape(service)
        assert value(during, "studio_application_sessions", application="default", state="idle") >= 1
        assert value(during, "studio_application_state", application="default", state="STARTED") == 1
        assert value(during, "studio_application_is_idle", application="default") == 0
        assert ann.delete(f"/sessions/{session_id}").status_code == 200

        life = ann_events.of_session(session_id)
        states = [event["new"] for event in life]
        assert states[0] == "starting" and life[0]["old"] is None, states
        assert "idle" in states and "busy" in states and states[-1] in FINAL, states
        assert states.index("busy") > states.index("idle"), states
        for earlier, later in zip(life, life[1:]):  # nothing missed: each change starts where the last ended
            assert later["old"] == earlier["new"], life
        assert all(e["owner"] == "ann" and e["application"] == "default" and e["time"] > 0 for e in life)
        assert ben_events.of_session(session_id, until_final=False) == []  # not his to see

        after = scrape(service)
        grew = {
            name: value(after, name, application="default") - value(before, name, application="default")
            for name in ("studio_statement_seconds_count", "studio_session_first_result_seconds_count", "studio_application_pool_hits_total")
        }
        assert grew["studio_statement_seconds_count"] >= 1, grew
        assert grew["studio_session_first_result_seconds_count"] >= 1, grew
        assert grew["studio_application_pool_hits_total"] >= 1, grew  # the warm pool had a driver ready
    finally:
        ann.close()
        ann_events.close()
        ben_events.close()


def test_metrics_and_events_refuse_without_a_token(service):
    for path in ("/metrics", "/events"):
        response = httpx.get(service.url + path, timeout=10, trust_env=False)
        assert response.status_code == 401, (path, response.text)
        assert "Authentication required" in response.json()["msg"]
