"""The audit trail through a real `studio serve` and the session service it starts (one Spark
driver for the module): both write one trail in the server's identity directory; a statement a
user sends is on record under that user's name with its code hash and first line; failed
sign-ins and refusals are too; `GET /api/audit` is for admins only; and `GET /api/audit`,
`studio audit` and the JSON-lines file all tell the same story."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time

import httpx
import pytest

from helpers import REPO, LivyClient
from workspace_helpers import StudioProcess

CODE = "\n# audit me\nanswer = 6 * 7\nprint(answer)\n"


@pytest.fixture(scope="module")
def studio(test_root):
    process = StudioProcess(test_root / "audit", pool=0).start()
    yield process
    assert process.stop() == 0
    assert not process.leftovers()


@pytest.fixture(scope="module")
def bob(studio):
    """A user added with `studio users add` while the server runs: his first personal token."""
    added = subprocess.run(
        [sys.executable, "-m", "studio", "users", "add", "bob", "--state-dir", str(studio.state_dir)],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=True,
    )
    return added.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def livy(studio, bob):
    """Bob's Livy client of the session service `studio serve` started (its compute `local`)."""
    with studio.http() as http:
        url = http.get("/api/computes/local", params={"check": "false"}).json()["url"]
    client = LivyClient(url, bob)
    yield client
    client.close()


@pytest.fixture(scope="module")
def statement(livy):
    """One session (a cold Spark driver) and one statement in it: (session, statement)."""
    session = livy.create_session(kind="pyspark", name="audited")
    livy.wait_session(session["id"])
    ran = livy.run(session["id"], CODE)
    assert ran["output"]["data"]["text/plain"].strip() == "42"
    yield session, ran
    livy.http.delete(f"/sessions/{session['id']}")


def records(studio: StudioProcess, **params: object) -> list[dict]:
    response = studio.get("/api/audit", params=params)
    assert response.status_code == 200, response.text
    return response.json()["records"]


def test_a_statement_is_on_record_with_its_user_code_hash_and_first_line(studio, livy, statement):
    session, ran = statement
    (record,) = records(studio, action="POST /sessions/{session_id}/statements")
    assert record["user"] == "bob" and record["auth"] == "personal" and record["client"] == "127.0.0.1"
    assert record["server"] == "livy" and record["outcome"] == "201"
    assert record["target"] == f"/sessions/{session['id']}/statements/{ran['id']}"
    assert record["code_sha256"] == hashlib.sha256(CODE.encode()).hexdigest()
    assert record["first_line"] == "# audit me"
    assert record["detail"] == {"session": session["id"], "statement": ran["id"]}
    found = records(studio, action="POST /sessions", target=f"/sessions/{session['id']}", outcome="201")
    (created,) = [r for r in found if r["action"] == "POST /sessions"]  # the statement's action has it too
    assert created["user"] == "bob" and created["detail"] == {"kind": "pyspark", "name": "audited", "proxyUser": "bob"}
    (added,) = records(studio, action="studio users add")
    assert (added["server"], added["auth"], added["target"]) == ("cli", "local", "/api/users/bob")
    # reads (the polls of the statement, the session) are not on record
    assert records(studio, action="GET /sessions") == []


def test_a_failed_sign_in_and_refusals_are_on_record(studio, livy):
    since = time.time() - 1
    with httpx.Client(base_url=studio.url, trust_env=False, timeout=30) as anonymous:
        failed = anonymous.post("/login", data={"token": "guess", "next": "/"})
        assert failed.status_code == 401
        cross_site = anonymous.post(
            "/api/workspaces", json={"name": "x"}, headers={"Authorization": f"Bearer {studio.token}", "Origin": "http://evil.example"}
        )
        assert cross_site.status_code == 403
    assert httpx.get(livy.url + "/sessions", trust_env=False).status_code == 401  # the session service's own refusals too
    found = [(r["server"], r["action"], r["outcome"], r["user"]) for r in records(studio, since=since)]
    assert ("serve", "sign-in", "401", None) in found
    assert ("serve", "POST /api/workspaces", "403", None) in found
    assert ("livy", "GET /sessions", "401", None) in found
    assert "guess" not in (studio.state_dir / "audit.jsonl").read_text()


def test_only_admins_read_the_trail(studio, bob):
    refused = httpx.get(studio.url + "/api/audit", headers={"Authorization": f"Bearer {bob}"}, trust_env=False, timeout=30)
    assert refused.status_code == 403 and refused.json() == {"msg": "Only admins may read the audit trail."}
    (record,) = records(studio, action="GET /api/audit")
    assert (record["user"], record["auth"], record["outcome"]) == ("bob", "personal", "403")
    assert bob not in (studio.state_dir / "audit.jsonl").read_text()


def test_api_audit_filters_and_pages(studio, statement):
    session, _ = statement
    everything = records(studio, limit=1000)
    assert [r["id"] for r in everything] == sorted((r["id"] for r in everything), reverse=True)
    assert {r["server"] for r in everything} == {"serve", "livy", "cli"}
    about_session = records(studio, target=f"/sessions/{session['id']}")
    assert {r["target"] for r in about_session} <= {f"/sessions/{session['id']}", f"/sessions/{session['id']}/statements/0"}
    assert len(about_session) == 2
    assert {r["user"] for r in records(studio, user="bob")} == {"bob"}
    assert records(studio, user="nobody") == []
    newest = everything[0]
    assert [r["id"] for r in records(studio, since=newest["time"], until=newest["time"])] == [newest["id"]]
    assert [r["id"] for r in records(studio, since=newest["timestamp"])] == [newest["id"]]
    first = studio.get("/api/audit", params={"limit": 2}).json()
    second = studio.get("/api/audit", params={"limit": 2, "before": first["next"]}).json()
    assert [r["id"] for r in first["records"] + second["records"]] == [r["id"] for r in everything[:4]]
    assert studio.get("/api/audit", params={"limit": 1001}).status_code == 400


def test_studio_audit_and_the_json_lines_tell_the_same(studio, statement):
    command = [sys.executable, "-m", "studio", "audit", "--state-dir", str(studio.state_dir)]
    shown = subprocess.run([*command, "--json", "--action", "statements"], capture_output=True, text=True, cwd=REPO, timeout=60, check=True)
    (record,) = [json.loads(line) for line in shown.stdout.splitlines()]
    assert record["first_line"] == "# audit me"
    people = subprocess.run([*command, "--user", "bob", "--limit", "2"], capture_output=True, text=True, cwd=REPO, timeout=60, check=True)
    assert len(people.stdout.splitlines()) == 2 and all(" bob (personal) @127.0.0.1 " in line for line in people.stdout.splitlines())
    verified = subprocess.run([*command, "--verify"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert verified.returncode == 0, verified.stderr
    lines = [json.loads(line) for line in (studio.state_dir / "audit.jsonl").read_text().splitlines()]
    assert lines == list(reversed(records(studio, limit=1000)))
    assert studio.token not in (studio.state_dir / "audit.jsonl").read_text()


def test_a_client_cannot_choose_the_address_on_record(studio, livy):
    """X-Forwarded-For from a local process is not believed (no proxy is configured)."""
    since = time.time() - 1
    spoofed = {"X-Forwarded-For": "203.0.113.9", "Authorization": f"Bearer {studio.token}"}
    assert httpx.post(studio.url + "/api/workspaces", json={"name": ".x"}, headers=spoofed, trust_env=False, timeout=30).status_code == 400
    assert httpx.get(livy.url + "/sessions", headers={"X-Forwarded-For": "203.0.113.9"}, trust_env=False, timeout=30).status_code == 401
    found = records(studio, since=since)
    assert {r["client"] for r in found if r["action"] in ("POST /api/workspaces", "GET /sessions")} == {"127.0.0.1"}
    assert "203.0.113.9" not in (studio.state_dir / "audit.jsonl").read_text()
